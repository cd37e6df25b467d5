//! A random topology: its declaration as data, drawn from the seed, built with the real
//! builder API. The oracle interprets the same data by the documented semantics.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardflow_core::dead_letter::{DeadLetter, DeadLetterRecord};
use shardflow_core::decode::SourceExt;
use shardflow_core::error::SinkError;
use shardflow_core::memory::MemoryStream;
use shardflow_core::random::Random;
use shardflow_core::sink::{MemorySink, Sink, SinkContext, SinkWriter};
use shardflow_core::state_store::{MemoryStateStore, StateStore};
use shardflow_core::testing::{HoldingSink, ScriptedSink};
use shardflow_core::topology::{Keyed, ShardStage, Sharded, StatePolicy, Stream, Topology};
use shardflow_operators::{
    Count, KeyBy, Max, SessionWindow, ShardStreamExt, SlidingWindow, StreamExt, Sum, TumblingWindow,
};

use super::model::{decode, Event, Res};

/// A stateless user function.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    Map {
        add: i64,
    },
    Filter {
        modulo: i64,
        rest: i64,
    },
    FlatMap {
        copies: u8,
    },
    /// Fails for ever on values divisible by `fail_mod` (dead-lettered), and on the first call
    /// for each record whose value is divisible by `flaky_mod` (retried).
    TryMap {
        fail_mod: i64,
        flaky_mod: i64,
    },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Map { .. } => "map",
            Op::Filter { .. } => "filter",
            Op::FlatMap { .. } => "flat_map",
            Op::TryMap { .. } => "try_map",
        }
    }

    pub fn map_value(add: i64, v: i64) -> i64 {
        v.wrapping_add(add)
    }

    pub fn keeps(modulo: i64, rest: i64, v: i64) -> bool {
        v.rem_euclid(modulo) != rest
    }

    pub fn copy_value(v: i64, i: u8) -> i64 {
        v.wrapping_mul(4).wrapping_add(i64::from(i))
    }

    pub fn fails_for_ever(fail_mod: i64, v: i64) -> bool {
        v.rem_euclid(fail_mod) == 0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Agg {
    Count,
    Sum,
    Max,
    /// `reduce` with a function that depends on the order of the values (`a * 3 + b`).
    Reduce,
}

/// The order-dependent reduction of `Agg::Reduce`.
pub fn reduce_values(a: i64, b: i64) -> i64 {
    a.wrapping_mul(3).wrapping_add(b)
}

fn reduce_events(a: &Event, b: &Event) -> Event {
    Event {
        value: reduce_values(a.value, b.value),
        ..b.clone()
    }
}

#[derive(Clone, Copy, Debug)]
pub enum KeyedSpec {
    Tumbling {
        size: i64,
        lateness: i64,
    },
    Sliding {
        size: i64,
        slide: i64,
        lateness: i64,
    },
    Session {
        gap: i64,
        lateness: i64,
    },
    Running,
}

impl KeyedSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            KeyedSpec::Tumbling { .. } => "tumbling",
            KeyedSpec::Sliding { .. } => "sliding",
            KeyedSpec::Session { .. } => "session",
            KeyedSpec::Running => "running",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub enum SinkSpec {
    Plain,
    /// Units of `per_unit` records or `latency_ms` on a quiet shard (S3Sink's model).
    Holding {
        per_unit: usize,
        latency_ms: u64,
    },
}

#[derive(Clone, Debug)]
pub enum Branch {
    Records {
        ops: Vec<Op>,
        sink: SinkSpec,
    },
    Keyed {
        ops: Vec<Op>,
        key_mod: u32,
        op: KeyedSpec,
        agg: Agg,
        after: Vec<Op>,
        late: bool,
        /// The results sink refuses (`Sink::check`) results whose value is 1 modulo this:
        /// each becomes a keyed dead letter and the run goes on.
        refuse: Option<i64>,
    },
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub shards: usize,
    pub out_of_orderness: i64,
    pub pre: Vec<Op>,
    pub branches: Vec<Branch>,
    /// Records with extreme event times (i64::MIN, i64::MAX) are generated.
    pub extremes: bool,
    /// How far ahead of arrival an event time may be (`max_event_time_skew`).
    pub max_skew: i64,
    /// The idleness timeout, if any.
    pub idleness: Option<i64>,
    /// The dead-letter sink: plain, or one gathering dead letters into units (S3Sink's model).
    pub dead: SinkSpec,
    /// Keyed state snapshotted every so many milliseconds (`StatePolicy::Snapshot`), if any;
    /// 0 snapshots after every live epoch.
    pub snapshot_every: Option<u64>,
    /// The state store fails for a while when a sink does (gets, puts and deletes).
    pub flaky_state: bool,
}

/// Most `flat_map`s on one path from an identity root (the source or a keyed operator).
pub const MAX_FANOUT_DEPTH: usize = 3;

fn pick<T: Copy>(random: &Random, options: &[T]) -> T {
    options[(random.fraction() * options.len() as f64) as usize % options.len()]
}

fn chance(random: &Random, p: f64) -> bool {
    random.fraction() < p
}

fn below(random: &Random, n: usize) -> usize {
    (random.fraction() * n as f64) as usize % n.max(1)
}

fn stateless_op(random: &Random, fallible: bool, depth: &mut usize) -> Op {
    loop {
        let op = match below(random, if fallible { 4 } else { 3 }) {
            0 => Op::Map {
                add: pick(random, &[1, 7, -3]),
            },
            1 => Op::Filter {
                modulo: pick(random, &[3, 5, 7]),
                rest: pick(random, &[0, 1]),
            },
            2 => Op::FlatMap {
                copies: pick(random, &[0, 1, 2, 3]),
            },
            _ => Op::TryMap {
                fail_mod: pick(random, &[11, 13, 17]),
                flaky_mod: pick(random, &[2, 3, 5]),
            },
        };
        if matches!(op, Op::FlatMap { .. }) {
            if *depth >= MAX_FANOUT_DEPTH {
                continue;
            }
            *depth += 1;
        }
        return op;
    }
}

fn ops(random: &Random, n: usize, fallible: bool, depth: &mut usize) -> Vec<Op> {
    (0..below(random, n + 1))
        .map(|_| stateless_op(random, fallible, depth))
        .collect()
}

fn holding_sink_spec(random: &Random) -> SinkSpec {
    SinkSpec::Holding {
        per_unit: 1 + below(random, 8),
        latency_ms: pick(random, &[100, 500, 2_000]),
    }
}

impl Spec {
    /// A random topology.
    pub fn random(random: &Random) -> Self {
        let mut depth = 0;
        let pre = ops(random, 2, true, &mut depth);
        let branches = (0..1 + below(random, 3))
            .map(|_| {
                let mut depth = depth;
                if chance(random, 0.3) {
                    Branch::Records {
                        ops: ops(random, 2, true, &mut depth),
                        sink: if chance(random, 0.5) {
                            holding_sink_spec(random)
                        } else {
                            SinkSpec::Plain
                        },
                    }
                } else {
                    let ops = ops(random, 1, true, &mut depth);
                    let lateness = pick(random, &[0, 100, 1_000]);
                    let op = match below(random, 4) {
                        0 => KeyedSpec::Tumbling {
                            size: pick(random, &[100, 500, 2_000]),
                            lateness,
                        },
                        1 => {
                            let size = pick(random, &[200, 1_000]);
                            KeyedSpec::Sliding {
                                size,
                                slide: size / pick(random, &[2, 4]),
                                lateness,
                            }
                        }
                        2 => KeyedSpec::Session {
                            gap: pick(random, &[100, 500]),
                            lateness,
                        },
                        _ => KeyedSpec::Running,
                    };
                    let mut after_depth = 0;
                    Branch::Keyed {
                        ops,
                        key_mod: pick(random, &[1, 3, 8, 1000]),
                        op,
                        agg: pick(random, &[Agg::Count, Agg::Sum, Agg::Max, Agg::Reduce]),
                        after: self::ops(random, 2, false, &mut after_depth),
                        late: !matches!(op, KeyedSpec::Running) && chance(random, 0.6),
                        refuse: None,
                    }
                }
            })
            .collect();
        Self {
            shards: 1 + below(random, 3),
            out_of_orderness: pick(random, &[0, 50, 200, 1_000]),
            pre,
            branches,
            extremes: chance(random, 0.2),
            max_skew: pick(random, &[60_000, 3_600_000]),
            idleness: chance(random, 0.5).then(|| pick(random, &[500, 2_000])),
            dead: SinkSpec::Plain,
            snapshot_every: None,
            flaky_state: false,
        }
    }

    /// Draws the state policy from `random` (a source of its own, as for the dead-letter
    /// sink): half the seeds snapshot their keyed state, some after every epoch.
    pub fn with_snapshots_from(mut self, random: &Random) -> Self {
        if chance(random, 0.5) {
            self.snapshot_every = Some(pick(random, &[0, 20, 100, 700]));
            self.flaky_state = chance(random, 0.3);
        }
        self
    }

    /// Draws the dead-letter sink from `random`, a source of its own so that the draws of
    /// `Spec::random` (and the seeds found before it existed) stay as they were.
    pub fn with_dead_letters_from(self, random: &Random) -> Self {
        let dead = if chance(random, 0.4) {
            holding_sink_spec(random)
        } else {
            SinkSpec::Plain
        };
        Self { dead, ..self }
    }

    /// Draws which keyed branches' sinks refuse some results from `random` (a source of its
    /// own, as for the dead-letter sink).
    pub fn with_refusals_from(mut self, random: &Random) -> Self {
        for branch in &mut self.branches {
            if let Branch::Keyed { refuse, .. } = branch {
                *refuse = chance(random, 0.3).then(|| pick(random, &[2, 3, 9]));
            }
        }
        self
    }

    /// The most `flat_map`s on one path from an identity root.
    pub fn fanout_depth(&self) -> usize {
        let flat = |ops: &[Op]| {
            ops.iter()
                .filter(|o| matches!(o, Op::FlatMap { .. }))
                .count()
        };
        let pre = flat(&self.pre);
        self.branches
            .iter()
            .map(|b| match b {
                Branch::Records { ops, .. } => pre + flat(ops),
                Branch::Keyed { ops, after, .. } => (pre + flat(ops)).max(flat(after)),
            })
            .max()
            .unwrap_or(0)
            .max(pre)
    }

    /// Operator kinds in the topology, for the coverage table.
    pub fn kinds(&self) -> Vec<&'static str> {
        let mut kinds: Vec<&'static str> = self.pre.iter().map(Op::name).collect();
        for b in &self.branches {
            match b {
                Branch::Records { ops, sink } => {
                    kinds.extend(ops.iter().map(Op::name));
                    if matches!(sink, SinkSpec::Holding { .. }) {
                        kinds.push("holding_sink");
                    }
                }
                Branch::Keyed {
                    ops,
                    op,
                    after,
                    late,
                    ..
                } => {
                    kinds.extend(ops.iter().chain(after).map(Op::name));
                    kinds.push(op.kind());
                    if *late {
                        kinds.push("late_output");
                    }
                }
            }
        }
        if self.idleness.is_some() {
            kinds.push("idleness");
        }
        if matches!(self.dead, SinkSpec::Holding { .. }) {
            kinds.push("holding_dlq");
        }
        kinds.sort_unstable();
        kinds.dedup();
        kinds
    }
}

/// The sinks of one simulated topology, shared by every run of it.
#[derive(Clone)]
pub enum SimSink {
    Records(ScriptedSink<MemorySink<Event>>),
    Holding(ScriptedSink<HoldingSink<Event>>),
    Results(ScriptedSink<MemorySink<Res>>),
}

/// Whether a results sink with `refuse` refuses a result of `value`.
pub fn refuses(refuse: Option<i64>, value: i64) -> bool {
    refuse.is_some_and(|m| !Op::keeps(m, 1, value))
}

/// A results sink that refuses (`Sink::check`) results whose value is 1 modulo `modulo`, as a
/// store refuses items over its size limit.
struct Refusing {
    inner: ScriptedSink<MemorySink<Res>>,
    modulo: i64,
}

#[async_trait::async_trait]
impl Sink<Res> for Refusing {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn open(&self, cx: &SinkContext) -> Result<Box<dyn SinkWriter<Res>>, SinkError> {
        self.inner.open(cx).await
    }
    fn check(&self, value: &Res) -> Result<(), String> {
        if refuses(Some(self.modulo), value.value) {
            return Err(format!("a value of 1 modulo {} is too large", self.modulo));
        }
        Ok(())
    }
    fn size_of(&self, _value: &Res) -> Option<u64> {
        Some(8)
    }
}

/// The dead-letter sink of a simulated topology.
#[derive(Clone)]
pub enum DeadSink {
    Plain(ScriptedSink<MemorySink<DeadLetterRecord>>),
    Holding(ScriptedSink<HoldingSink<DeadLetterRecord>>),
}

impl DeadSink {
    fn policy(&self) -> DeadLetter {
        match self {
            DeadSink::Plain(s) => DeadLetter::to(s.clone()),
            DeadSink::Holding(s) => DeadLetter::to(s.clone()),
        }
    }
}

#[derive(Clone)]
pub struct Sinks {
    /// One per branch, in branch order.
    pub branches: Vec<SimSink>,
    /// The late side output of each keyed branch that has one.
    pub late: BTreeMap<usize, ScriptedSink<MemorySink<Event>>>,
    pub dead: DeadSink,
    /// How often each flaky record failed so far (by uid): the first call fails.
    pub flaky: Arc<Mutex<BTreeMap<u64, u32>>>,
    /// Where snapshots of keyed state go: it outlives every worker, as S3 would.
    pub state: Arc<MemoryStateStore>,
}

impl Sinks {
    pub fn new(spec: &Spec) -> Self {
        let mut late = BTreeMap::new();
        let branches = spec
            .branches
            .iter()
            .enumerate()
            .map(|(i, b)| match b {
                Branch::Records {
                    sink: SinkSpec::Plain,
                    ..
                } => SimSink::Records(ScriptedSink::new(MemorySink::fencing(format!(
                    "records-{i}"
                )))),
                Branch::Records {
                    sink:
                        SinkSpec::Holding {
                            per_unit,
                            latency_ms,
                        },
                    ..
                } => SimSink::Holding(ScriptedSink::new(HoldingSink::new(
                    format!("holding-{i}"),
                    *per_unit,
                    Duration::from_millis(*latency_ms),
                ))),
                Branch::Keyed { late: has_late, .. } => {
                    if *has_late {
                        late.insert(
                            i,
                            ScriptedSink::new(MemorySink::fencing(format!("late-{i}"))),
                        );
                    }
                    SimSink::Results(ScriptedSink::new(MemorySink::fencing(format!(
                        "results-{i}"
                    ))))
                }
            })
            .collect();
        Self {
            branches,
            late,
            dead: match spec.dead {
                SinkSpec::Plain => {
                    DeadSink::Plain(ScriptedSink::new(MemorySink::fencing("dead-letters")))
                }
                SinkSpec::Holding {
                    per_unit,
                    latency_ms,
                } => DeadSink::Holding(ScriptedSink::new(HoldingSink::new(
                    "dead-letters",
                    per_unit,
                    Duration::from_millis(latency_ms),
                ))),
            },
            flaky: Arc::default(),
            state: Arc::default(),
        }
    }
}

fn apply_ops<S>(
    stream: Stream<Event, S>,
    ops: &[Op],
    flaky: &Arc<Mutex<BTreeMap<u64, u32>>>,
) -> Stream<Event, Sharded>
where
    S: ShardStage<AfterOp = Sharded>,
{
    let (first, rest) = match ops.split_first() {
        Some((first, rest)) => (*first, rest),
        None => (Op::Map { add: 0 }, &[][..]),
    };
    let mut s = apply_op(stream, first, flaky);
    for op in rest {
        s = apply_op(s, *op, flaky);
    }
    s
}

fn apply_op<S>(
    stream: Stream<Event, S>,
    op: Op,
    flaky: &Arc<Mutex<BTreeMap<u64, u32>>>,
) -> Stream<Event, Sharded>
where
    S: ShardStage<AfterOp = Sharded>,
{
    match op {
        Op::Map { add } => stream.map(move |mut e: Event| {
            e.value = Op::map_value(add, e.value);
            e
        }),
        Op::Filter { modulo, rest } => {
            stream.filter(move |e: &Event| Op::keeps(modulo, rest, e.value))
        }
        Op::FlatMap { copies } => stream.flat_map(move |e: Event| {
            (0..copies).map(move |i| Event {
                value: Op::copy_value(e.value, i),
                ..e.clone()
            })
        }),
        Op::TryMap {
            fail_mod,
            flaky_mod,
        } => {
            let flaky = Arc::clone(flaky);
            stream.try_map("try_map", move |e: &Event| {
                if Op::fails_for_ever(fail_mod, e.value) {
                    return Err("fails for ever");
                }
                if e.value.rem_euclid(flaky_mod) == 0 {
                    let mut calls = flaky.lock().unwrap();
                    let n = calls.entry(e.uid).or_default();
                    *n += 1;
                    if *n == 1 {
                        return Err("flaky");
                    }
                }
                Ok(e.clone())
            })
        }
    }
}

fn apply_after(stream: Stream<Res, Keyed>, ops: &[Op]) -> Stream<Res, Keyed> {
    let mut s = stream;
    for op in ops {
        s = match *op {
            Op::Map { add } => s.map(move |mut r: Res| {
                r.value = Op::map_value(add, r.value);
                r
            }),
            Op::Filter { modulo, rest } => {
                s.filter(move |r: &Res| Op::keeps(modulo, rest, r.value))
            }
            Op::FlatMap { copies } => s.flat_map(move |r: Res| {
                (0..copies).map(move |i| Res {
                    value: Op::copy_value(r.value, i),
                    ..r.clone()
                })
            }),
            Op::TryMap { .. } => unreachable!("no fallible operators after key_by"),
        };
    }
    s
}

/// The topology of `spec` over `stream`, writing to `sinks`.
pub fn topology(spec: &Spec, stream: &MemoryStream, sinks: &Sinks) -> Topology {
    let state = match spec.snapshot_every {
        Some(ms) => StatePolicy::Snapshot {
            store: Arc::clone(&sinks.state) as Arc<dyn StateStore>,
            every: Duration::from_millis(ms),
        },
        None => StatePolicy::Replay,
    };
    let source = Topology::builder("sim")
        .state(state)
        .dead_letter(DeadLetter::retry(
            2,
            Duration::from_millis(5),
            sinks.dead.policy(),
        ))
        .source(stream.clone().decode_fn(decode))
        .event_time(|e: &Event| e.ts)
        .max_out_of_orderness(Duration::from_millis(spec.out_of_orderness as u64))
        .max_event_time_skew(Duration::from_millis(spec.max_skew as u64));
    let source = match spec.idleness {
        Some(ms) => source.idleness(Duration::from_millis(ms as u64)),
        None => source,
    };
    let head = apply_ops(source, &spec.pre, &sinks.flaky);
    let mut pipeline = None;
    for (i, branch) in spec.branches.iter().enumerate() {
        let stream = head.clone();
        let p = match branch {
            Branch::Records { ops, .. } => {
                let s = if ops.is_empty() {
                    stream
                } else {
                    apply_ops(stream, ops, &sinks.flaky)
                };
                match &sinks.branches[i] {
                    SimSink::Records(sink) => s.sink(sink.clone()),
                    SimSink::Holding(sink) => s.sink(sink.clone()),
                    SimSink::Results(_) => unreachable!("a records branch has a records sink"),
                }
            }
            Branch::Keyed {
                ops,
                key_mod,
                op,
                agg,
                after,
                refuse,
                ..
            } => {
                let s = if ops.is_empty() {
                    stream
                } else {
                    apply_ops(stream, ops, &sinks.flaky)
                };
                let m = *key_mod;
                let keyed = s.key_by(move |e: &Event| e.key % m);
                let late = sinks.late.get(&i).cloned();
                let results = keyed_results(keyed, *op, *agg, late);
                let SimSink::Results(sink) = &sinks.branches[i] else {
                    unreachable!("a keyed branch has a results sink")
                };
                let results = apply_after(results, after);
                match refuse {
                    Some(modulo) => results.sink(Refusing {
                        inner: sink.clone(),
                        modulo: *modulo,
                    }),
                    None => results.sink(sink.clone()),
                }
            }
        };
        pipeline = Some(p);
    }
    pipeline
        .expect("a topology has a branch")
        .build()
        .expect("a valid topology")
}

fn keyed_results<F>(
    keyed: shardflow_operators::keyed::KeyedStream<Event, u32, F, Sharded>,
    op: KeyedSpec,
    agg: Agg,
    late: Option<ScriptedSink<MemorySink<Event>>>,
) -> Stream<Res, Keyed>
where
    F: Fn(&Event) -> u32 + Clone + Send + Sync + 'static,
{
    macro_rules! windowed {
        ($assigner:expr, $lateness:expr) => {{
            let mut w = keyed
                .window($assigner)
                .allowed_lateness(Duration::from_millis($lateness as u64));
            if let Some(late) = late {
                w = w.late_records(move |l| {
                    l.sink(late);
                });
            }
            match agg {
                Agg::Count => w.aggregate(Count).map(|r| Res {
                    key: r.key,
                    start: r.window.start,
                    end: r.window.end,
                    value: r.value as i64,
                }),
                Agg::Sum => w.aggregate(Sum::of(|e: &Event| e.value)).map(|r| Res {
                    key: r.key,
                    start: r.window.start,
                    end: r.window.end,
                    value: r.value,
                }),
                Agg::Max => w.aggregate(Max::of(|e: &Event| e.value)).map(|r| Res {
                    key: r.key,
                    start: r.window.start,
                    end: r.window.end,
                    value: r.value,
                }),
                Agg::Reduce => w.reduce(reduce_events).map(|r| Res {
                    key: r.key,
                    start: r.window.start,
                    end: r.window.end,
                    value: r.value.value,
                }),
            }
        }};
    }
    match op {
        KeyedSpec::Tumbling { size, lateness } => {
            windowed!(
                TumblingWindow::of(Duration::from_millis(size as u64)),
                lateness
            )
        }
        KeyedSpec::Sliding {
            size,
            slide,
            lateness,
        } => windowed!(
            SlidingWindow::of(
                Duration::from_millis(size as u64),
                Duration::from_millis(slide as u64)
            ),
            lateness
        ),
        KeyedSpec::Session { gap, lateness } => {
            windowed!(
                SessionWindow::with_gap(Duration::from_millis(gap as u64)),
                lateness
            )
        }
        KeyedSpec::Running => match agg {
            Agg::Count => keyed.aggregate(Count).map(|r| Res {
                key: r.key,
                start: 0,
                end: 0,
                value: r.value as i64,
            }),
            Agg::Sum => keyed.aggregate(Sum::of(|e: &Event| e.value)).map(|r| Res {
                key: r.key,
                start: 0,
                end: 0,
                value: r.value,
            }),
            Agg::Max => keyed.aggregate(Max::of(|e: &Event| e.value)).map(|r| Res {
                key: r.key,
                start: 0,
                end: 0,
                value: r.value,
            }),
            Agg::Reduce => keyed.reduce(reduce_events).map(|r| Res {
                key: r.key,
                start: 0,
                end: 0,
                value: r.value.value,
            }),
        },
    }
}
