//! The oracle: what every sink must hold at the end, computed from the input shard by shard by
//! the semantics `docs/design.md` states, without the runtime's code.
//!
//! - Watermark: per shard, `W` starts unset; each record is judged by `W` as it was before the
//!   record (unset: nothing is late); a decodable record whose event time lies in the valid
//!   range and at most the maximum skew after its arrival raises `W` to its event time minus
//!   the out-of-orderness bound. A record whose event time is outside the valid range is
//!   dead-lettered (stage `event_time`) before any operator; other untimely records never
//!   move `W` and are late for windows.
//! - Idleness: the advances the runtime recorded in the lease (each `W` at least some value,
//!   right after some record) are inputs, as the clock was: each applies after its record.
//! - A record enters a fixed window if the window closes (end plus allowed lateness) after
//!   the record's watermark; a record that enters none of its windows is late.
//! - Sessions of a key: before a record, sessions that end at or before its watermark have
//!   fired (their result as it was then is final under their identity) and sessions whose end
//!   plus lateness is at or before it are closed; the record is late if its own window closes
//!   by then, otherwise it merges with every open session it touches into an unfired one.
//! - Running aggregates take every record. At the end every shard is closed: every window and
//!   session fires with what it holds.
//! - Operators after a keyed operator see every result it emits, and a result can be emitted
//!   several times (running results once per commit, windows refined by late records), when
//!   faults and commits happen to fall. A filter there leaves in the sink the last emission
//!   it let through: where the final result is filtered out, the sink may hold any earlier
//!   value of that result that passed the filter, or nothing.
//! - A result value a sink refuses (`Sink::check`) is not written: it becomes a keyed dead
//!   letter under the sink's name and the result's identity, and the run goes on. Where the
//!   final value is refused, its letter must stand, and the sink may hold any earlier value it
//!   accepted, or nothing (as after a filter); a letter may stand for any refused value.
//! - Identities: `r/<seq>-0-<fanout>` for outputs of records, `w/<start>-<end>/<key>` and
//!   `k/<key>` for keyed results (`/<fanout>` added when a later `flat_map` fanned them out);
//!   each `flat_map` level shifts the fanout left by 64 / (the topology's deepest chain of
//!   `flat_map`s) bits and adds the output's index.

use std::collections::BTreeMap;

use super::model::{decode_bytes, Event, Res};
use super::spec::{reduce_values, refuses, Agg, Branch, KeyedSpec, Op, Spec};

/// Event times outside this range are invalid: their records are dead-lettered.
pub const VALID_EVENT_TIME: i64 = i64::MAX / 4;

/// One record as the generator wrote it.
#[derive(Clone, Debug)]
pub struct Input {
    pub seq: u128,
    pub arrival: i64,
    pub data: Vec<u8>,
}

/// What the sinks must hold, by (shard, identity path).
#[derive(Debug, Default)]
pub struct Expected {
    /// Per branch: record outputs (records branches) or results (keyed branches).
    pub records: BTreeMap<usize, BTreeMap<(String, String), Event>>,
    pub results: BTreeMap<usize, BTreeMap<(String, String), Res>>,
    /// Per keyed branch: identities the final results do not produce, with the earlier values
    /// their results took that the operators after the keyed one let through (the sink may
    /// hold one of them, or nothing).
    pub earlier: BTreeMap<usize, BTreeMap<(String, String), Vec<Res>>>,
    pub late: BTreeMap<usize, BTreeMap<(String, String), Event>>,
    /// Dead letters: identity to stage.
    pub dead: BTreeMap<(String, String), String>,
    /// Keyed dead letters that may stand (a result value a sink refused), by their identity
    /// in the dead-letter sink: whether one must (the result's final value was refused), and
    /// the refused result's identity in its own sink.
    pub keyed_letters: BTreeMap<(String, String), (bool, String)>,
}

/// A keyed dead letter's identity path: the refused result's identity under the sink's name.
fn letter_path(branch: usize, key: u32, window: Option<(i64, i64)>, fanout: u64) -> String {
    shardflow_core::sink::OutputId::Keyed {
        key: shardflow_core::sink::KeyId::text(format!("results-{branch}/{key}")),
        window: window.map(|(s, e)| shardflow_core::sink::Window::new(s, e)),
        index: fanout,
    }
    .to_path()
}

fn record_path(seq: u128, fanout: u64) -> String {
    format!("r/{seq}-0-{fanout}")
}

fn keyed_path(key: u32, window: Option<(i64, i64)>, fanout: u64) -> String {
    let mut p = match window {
        Some((s, e)) => format!("w/{s:020}-{e:020}/{key}"),
        None => format!("k/{key}"),
    };
    if fanout != 0 {
        p.push_str(&format!("/{fanout}"));
    }
    p
}

fn compose(fanout: u64, index: u64, bits: u32) -> u64 {
    if bits >= 64 {
        index
    } else {
        (fanout << bits) | index
    }
}

struct Chain<'a> {
    bits: u32,
    flaky_ok: bool,
    failed: &'a mut Option<&'static str>,
}

impl Chain<'_> {
    /// Applies `ops` to `(value, fanout)` pairs of one input record.
    fn events(&mut self, ops: &[Op], input: Vec<(Event, u64)>) -> Vec<(Event, u64)> {
        let mut values = input;
        for op in ops {
            let mut next = Vec::new();
            for (e, fan) in values {
                match *op {
                    Op::Map { add } => next.push((
                        Event {
                            value: Op::map_value(add, e.value),
                            ..e
                        },
                        fan,
                    )),
                    Op::Filter { modulo, rest } => {
                        if Op::keeps(modulo, rest, e.value) {
                            next.push((e, fan));
                        }
                    }
                    Op::FlatMap { copies } => {
                        for i in 0..copies {
                            next.push((
                                Event {
                                    value: Op::copy_value(e.value, i),
                                    ..e.clone()
                                },
                                compose(fan, u64::from(i), self.bits),
                            ));
                        }
                    }
                    Op::TryMap { fail_mod, .. } => {
                        // A flaky record fails once and succeeds on its retry.
                        let _ = self.flaky_ok;
                        if Op::fails_for_ever(fail_mod, e.value) {
                            self.failed.get_or_insert("try_map");
                        } else {
                            next.push((e, fan));
                        }
                    }
                }
            }
            values = next;
        }
        values
    }
}

fn results(ops: &[Op], input: Vec<(Res, u64)>, bits: u32) -> Vec<(Res, u64)> {
    let mut values = input;
    for op in ops {
        let mut next = Vec::new();
        for (r, fan) in values {
            match *op {
                Op::Map { add } => next.push((
                    Res {
                        value: Op::map_value(add, r.value),
                        ..r
                    },
                    fan,
                )),
                Op::Filter { modulo, rest } => {
                    if Op::keeps(modulo, rest, r.value) {
                        next.push((r, fan));
                    }
                }
                Op::FlatMap { copies } => {
                    for i in 0..copies {
                        next.push((
                            Res {
                                value: Op::copy_value(r.value, i),
                                ..r.clone()
                            },
                            compose(fan, u64::from(i), bits),
                        ));
                    }
                }
                Op::TryMap { .. } => unreachable!("no fallible operators after key_by"),
            }
        }
        values = next;
    }
    values
}

#[derive(Clone, Copy, Debug)]
struct Acc {
    count: i64,
    sum: i64,
    max: i64,
    /// `Agg::Reduce`: the values folded in the order they came (merged sessions fold in
    /// the other session's result after the record that bridged them).
    reduced: Option<i64>,
}

impl Acc {
    fn new() -> Self {
        Self {
            count: 0,
            sum: 0,
            max: i64::MIN,
            reduced: None,
        }
    }
    fn add(&mut self, v: i64) {
        self.count += 1;
        self.sum = self.sum.wrapping_add(v);
        self.max = self.max.max(v);
        self.reduced = Some(self.reduced.map_or(v, |a| reduce_values(a, v)));
    }
    fn merge(&mut self, o: Acc) {
        self.count += o.count;
        self.sum = self.sum.wrapping_add(o.sum);
        self.max = self.max.max(o.max);
        if let Some(other) = o.reduced {
            self.reduced = Some(self.reduced.map_or(other, |a| reduce_values(a, other)));
        }
    }
    fn result(&self, agg: Agg) -> i64 {
        match agg {
            Agg::Count => self.count,
            Agg::Sum => self.sum,
            Agg::Max => self.max,
            Agg::Reduce => self.reduced.expect("a result holds a value"),
        }
    }
}

/// Windows containing `ts` for a fixed-window operator, computed without overflow.
fn fixed_windows(op: KeyedSpec, ts: i64) -> Vec<(i64, i64)> {
    let floor = |t: i64, size: i64| -> i128 {
        let t = i128::from(t);
        let size = i128::from(size);
        t - t.rem_euclid(size)
    };
    let clamp = |v: i128| -> i64 { v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64 };
    match op {
        KeyedSpec::Tumbling { size, .. } => {
            let start = floor(ts, size);
            vec![(clamp(start), clamp(start + i128::from(size)))]
        }
        KeyedSpec::Sliding { size, slide, .. } => {
            let mut out = Vec::new();
            let mut start = floor(ts, slide);
            while start > i128::from(ts) - i128::from(size) {
                out.push((clamp(start), clamp(start + i128::from(size))));
                start -= i128::from(slide);
            }
            out
        }
        _ => unreachable!("not a fixed window"),
    }
}

#[derive(Clone, Debug)]
struct Session {
    start: i64,
    end: i64,
    acc: Acc,
    fired: bool,
}

/// A result's key, window (`None`: running) and every value it took, the last one final.
type ResultValues = (u32, Option<(i64, i64)>, Vec<i64>);

/// An accumulator and every result it gave on the way.
#[derive(Clone, Debug)]
struct Tracked {
    acc: Acc,
    results: Vec<Acc>,
}

impl Tracked {
    fn new() -> Self {
        Self {
            acc: Acc::new(),
            results: Vec::new(),
        }
    }
    fn add(&mut self, v: i64) {
        self.acc.add(v);
        self.results.push(self.acc);
    }
}

enum KeyedState {
    Fixed(BTreeMap<(u32, (i64, i64)), Tracked>),
    Sessions {
        open: BTreeMap<u32, Vec<Session>>,
        /// Every emission of each session identity, in order.
        emitted: BTreeMap<(u32, (i64, i64)), Vec<i64>>,
    },
    Running(BTreeMap<u32, Tracked>),
}

/// What `spec` writes for the records of every shard (all of them read to their end).
/// Watermark advances decided on processing time, per shard: after the record with this
/// sequence number (0: before any), the watermark became at least this.
pub type Advances = BTreeMap<String, BTreeMap<u128, i64>>;

pub fn expected(
    spec: &Spec,
    shards: &BTreeMap<String, Vec<Input>>,
    advances: &Advances,
) -> Expected {
    let depth = spec.fanout_depth().max(1);
    let bits = 64 / depth as u32;
    let mut out = Expected::default();
    for (i, b) in spec.branches.iter().enumerate() {
        match b {
            Branch::Records { .. } => {
                out.records.insert(i, BTreeMap::new());
            }
            Branch::Keyed { late, .. } => {
                out.results.insert(i, BTreeMap::new());
                out.earlier.insert(i, BTreeMap::new());
                if *late {
                    out.late.insert(i, BTreeMap::new());
                }
            }
        }
    }
    let none = BTreeMap::new();
    for (shard, records) in shards {
        let advances = advances.get(shard).unwrap_or(&none);
        shard_expected(spec, shard, records, advances, bits, &mut out);
    }
    out
}

fn shard_expected(
    spec: &Spec,
    shard: &str,
    records: &[Input],
    advances: &BTreeMap<u128, i64>,
    bits: u32,
    out: &mut Expected,
) {
    let max_skew = spec.max_skew;
    let mut states: Vec<Option<KeyedState>> = spec
        .branches
        .iter()
        .map(|b| match b {
            Branch::Records { .. } => None,
            Branch::Keyed { op, .. } => Some(match op {
                KeyedSpec::Tumbling { .. } | KeyedSpec::Sliding { .. } => {
                    KeyedState::Fixed(BTreeMap::new())
                }
                KeyedSpec::Session { .. } => KeyedState::Sessions {
                    open: BTreeMap::new(),
                    emitted: BTreeMap::new(),
                },
                KeyedSpec::Running => KeyedState::Running(BTreeMap::new()),
            }),
        })
        .collect();
    let mut watermark: Option<i64> = None;
    let advance = |watermark: &mut Option<i64>, after: u128| {
        if let Some(w) = advances.get(&after) {
            *watermark = Some(watermark.map_or(*w, |old| old.max(*w)));
        }
    };
    advance(&mut watermark, 0);
    for input in records {
        let wm = watermark.unwrap_or(i64::MIN);
        let Some(event) = decode_bytes(&input.data) else {
            out.dead.insert(
                (shard.to_owned(), record_path(input.seq, 0)),
                "decode".into(),
            );
            advance(&mut watermark, input.seq);
            continue;
        };
        let ts = event.ts;
        if !(-VALID_EVENT_TIME..=VALID_EVENT_TIME).contains(&ts) {
            // A garbage timestamp: a bad record, before any operator.
            out.dead.insert(
                (shard.to_owned(), record_path(input.seq, 0)),
                "event_time".into(),
            );
            advance(&mut watermark, input.seq);
            continue;
        }
        let in_bounds = ts <= input.arrival.saturating_add(max_skew);
        if in_bounds {
            let w = ts.saturating_sub(spec.out_of_orderness);
            watermark = Some(watermark.map_or(w, |old| old.max(w)));
        }
        let mut failed = None;
        let mut chain = Chain {
            bits,
            flaky_ok: true,
            failed: &mut failed,
        };
        let head = chain.events(&spec.pre, vec![(event, 0)]);
        for (bi, branch) in spec.branches.iter().enumerate() {
            match branch {
                Branch::Records { ops, .. } => {
                    for (e, fan) in chain.events(ops, head.clone()) {
                        out.records
                            .get_mut(&bi)
                            .expect("records branch")
                            .insert((shard.to_owned(), record_path(input.seq, fan)), e);
                    }
                }
                Branch::Keyed {
                    ops,
                    key_mod,
                    op,
                    late,
                    ..
                } => {
                    let state = states[bi].as_mut().expect("keyed state");
                    for (e, fan) in chain.events(ops, head.clone()) {
                        let key = e.key % key_mod;
                        let is_late = match (&mut *state, *op) {
                            (KeyedState::Fixed(windows), op) => {
                                let (KeyedSpec::Tumbling { lateness, .. }
                                | KeyedSpec::Sliding { lateness, .. }) = op
                                else {
                                    unreachable!("a fixed window")
                                };
                                let mut admitted = false;
                                if in_bounds {
                                    for w in fixed_windows(op, ts) {
                                        if w.1.saturating_add(lateness) > wm {
                                            windows
                                                .entry((key, w))
                                                .or_insert_with(Tracked::new)
                                                .add(e.value);
                                            admitted = true;
                                        }
                                    }
                                }
                                !admitted
                            }
                            (
                                KeyedState::Sessions { open, emitted },
                                KeyedSpec::Session { gap, lateness },
                            ) => {
                                let sessions = open.entry(key).or_default();
                                for s in sessions.iter_mut() {
                                    if s.end <= wm && !s.fired {
                                        s.fired = true;
                                        emitted
                                            .entry((key, (s.start, s.end)))
                                            .or_default()
                                            .push(s.acc.result(agg_of(branch)));
                                    }
                                }
                                sessions.retain(|s| s.end.saturating_add(lateness) > wm);
                                let own = (ts, ts.saturating_add(gap));
                                if !in_bounds || own.1.saturating_add(lateness) <= wm {
                                    true
                                } else {
                                    let mut acc = Acc::new();
                                    acc.add(e.value);
                                    let mut merged = Session {
                                        start: own.0,
                                        end: own.1,
                                        acc,
                                        fired: false,
                                    };
                                    let mut kept = Vec::new();
                                    for s in sessions.drain(..) {
                                        if s.start <= merged.end && merged.start <= s.end {
                                            merged.start = merged.start.min(s.start);
                                            merged.end = merged.end.max(s.end);
                                            merged.acc.merge(s.acc);
                                        } else {
                                            kept.push(s);
                                        }
                                    }
                                    kept.push(merged);
                                    kept.sort_by_key(|s| s.start);
                                    *sessions = kept;
                                    false
                                }
                            }
                            (KeyedState::Running(keys), _) => {
                                keys.entry(key).or_insert_with(Tracked::new).add(e.value);
                                false
                            }
                            _ => unreachable!("state matches operator"),
                        };
                        if is_late && *late {
                            out.late
                                .get_mut(&bi)
                                .expect("late branch")
                                .insert((shard.to_owned(), record_path(input.seq, fan)), e);
                        }
                    }
                }
            }
        }
        if let Some(stage) = failed {
            out.dead
                .insert((shard.to_owned(), record_path(input.seq, 0)), stage.into());
        }
        advance(&mut watermark, input.seq);
    }
    // The shard ended: everything fires.
    for (bi, branch) in spec.branches.iter().enumerate() {
        let Branch::Keyed { after, refuse, .. } = branch else {
            continue;
        };
        let agg = agg_of(branch);
        // Per result identity: every value it took, the final one last.
        let mut res: Vec<ResultValues> = Vec::new();
        match states[bi].take().expect("keyed state") {
            KeyedState::Fixed(windows) => {
                for ((key, w), t) in windows {
                    let values = t.results.iter().map(|a| a.result(agg)).collect();
                    res.push((key, Some(w), values));
                }
            }
            KeyedState::Sessions { open, mut emitted } => {
                for (key, sessions) in open {
                    for s in sessions.into_iter().filter(|s| !s.fired) {
                        emitted
                            .entry((key, (s.start, s.end)))
                            .or_default()
                            .push(s.acc.result(agg));
                    }
                }
                for ((key, w), values) in emitted {
                    res.push((key, Some(w), values));
                }
            }
            KeyedState::Running(keys) => {
                for (key, t) in keys {
                    let values = t.results.iter().map(|a| a.result(agg)).collect();
                    res.push((key, None, values));
                }
            }
        }
        let sink = out.results.get_mut(&bi).expect("results branch");
        let earlier = out.earlier.get_mut(&bi).expect("results branch");
        for (key, window, values) in res {
            let (start, end) = window.unwrap_or((0, 0));
            let res_of = |value| Res {
                key,
                start,
                end,
                value,
            };
            let Some((last, before)) = values.split_last() else {
                continue;
            };
            for (r, fan) in results(after, vec![(res_of(*last), 0)], bits) {
                if refuses(*refuse, r.value) {
                    let letter = (shard.to_owned(), letter_path(bi, key, window, fan));
                    let result = keyed_path(key, window, fan);
                    out.keyed_letters.insert(letter, (true, result));
                } else {
                    sink.insert((shard.to_owned(), keyed_path(key, window, fan)), r);
                }
            }
            for value in before {
                for (r, fan) in results(after, vec![(res_of(*value), 0)], bits) {
                    if refuses(*refuse, r.value) {
                        let letter = (shard.to_owned(), letter_path(bi, key, window, fan));
                        let result = keyed_path(key, window, fan);
                        out.keyed_letters.entry(letter).or_insert((false, result));
                        continue;
                    }
                    let path = (shard.to_owned(), keyed_path(key, window, fan));
                    if !sink.contains_key(&path) {
                        earlier.entry(path).or_default().push(r);
                    }
                }
            }
        }
    }
}

fn agg_of(branch: &Branch) -> Agg {
    match branch {
        Branch::Keyed { agg, .. } => *agg,
        Branch::Records { .. } => unreachable!("records branches aggregate nothing"),
    }
}
