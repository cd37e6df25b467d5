//! The typed topology builder: `Topology::builder`, stream handles with their stage, and the
//! primitives (`stateless`, `keyed`, `sink`) that operators are built on.

use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::dead_letter::DeadLetter;
use crate::decode::{Decoded, Decoder};
use crate::error::BuildError;
use crate::operator::{KeyedOperator, Stateless};
use crate::position::{EventTime, StartPosition};
use crate::protocol::watermark::DEFAULT_MAX_SKEW_MS;
use crate::sink::Sink;
use crate::source::Source;
use crate::topology::graph::{
    lock, ExchangeDecl, FallibleDecl, Graph, InstantiateBranch, InstantiateRoot, KeyedBranchDecl,
    Node, SinkDecl, SourceDecl, SourceSettings, StatelessDecl, TeeDecl,
};
use crate::topology::stage::{Keyed, ShardStage, Sharded, SourceStage, Sourced, Stage};
use crate::topology::StatePolicy;

/// A typed stream of values of type `T` at stage `S`. Clone it to fan out to several branches.
pub struct Stream<T, S = Sharded> {
    graph: Arc<Mutex<Graph>>,
    node: Arc<Node<T>>,
    /// The operator whose output this is (`.name(..)` names it), if any.
    op: Option<usize>,
    _stage: PhantomData<fn() -> S>,
}

impl<T: Clone + Send + 'static, S> Clone for Stream<T, S> {
    fn clone(&self) -> Self {
        *lock(&self.node.fan_out) = Some(Arc::new(TeeDecl));
        Self {
            graph: Arc::clone(&self.graph),
            node: Arc::clone(&self.node),
            op: self.op,
            _stage: PhantomData,
        }
    }
}

/// Starts declaring a topology.
pub struct TopologyBuilder {
    name: String,
    dead_letter: DeadLetter,
    start: StartPosition,
    state: StatePolicy,
}

/// A declared, validated topology, ready for `Runtime::new`.
pub struct Topology {
    pub(crate) name: String,
    pub(crate) source: Arc<dyn Source>,
    pub(crate) root: Arc<dyn InstantiateRoot>,
    pub(crate) keyed: Vec<Arc<dyn InstantiateBranch>>,
    pub(crate) dead_letter: DeadLetter,
    pub(crate) start: StartPosition,
    /// Bits per level of `flat_map` in output identities: 64 over the deepest chain of them.
    pub(crate) fanout_bits: u32,
    /// How keyed state survives restarts.
    pub(crate) state: StatePolicy,
}

impl Topology {
    /// Starts declaring a topology named `name` (it names lease keys, output folders, metrics).
    pub fn builder(name: impl Into<String>) -> TopologyBuilder {
        TopologyBuilder {
            name: name.into(),
            dead_letter: DeadLetter::default(),
            start: StartPosition::TrimHorizon,
            state: StatePolicy::Replay,
        }
    }

    /// The topology's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The source stream's name.
    pub fn stream_name(&self) -> &str {
        self.source.stream_name()
    }

    /// Paths from a shard to sinks: the shard task's own, plus one per keyed worker.
    pub(crate) fn paths(&self, parallelism: usize) -> usize {
        1 + self.keyed.len() * parallelism
    }
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology")
            .field("name", &self.name)
            .field("stream", &self.source.stream_name())
            .field("keyed_branches", &self.keyed.len())
            .field("dead_letter", &self.dead_letter)
            .finish_non_exhaustive()
    }
}

impl TopologyBuilder {
    /// What happens to records that fail to decode or whose user function fails
    /// (default: [`DeadLetter::StopShard`]).
    pub fn dead_letter(mut self, policy: DeadLetter) -> Self {
        self.dead_letter = policy;
        self
    }

    /// Where shards without a checkpoint start (default: [`StartPosition::TrimHorizon`]).
    pub fn start_at(mut self, position: StartPosition) -> Self {
        self.start = position;
        self
    }

    /// How keyed state survives a restart (default: [`StatePolicy::Replay`]). With
    /// [`StatePolicy::Snapshot`] a restart restores the newest snapshot and replays only what
    /// came after it; every keyed operator must support snapshots (the built-in windows and
    /// aggregates do: their keys and accumulators are serde types), or `build` refuses it.
    pub fn state(mut self, policy: StatePolicy) -> Self {
        self.state = policy;
        self
    }

    /// The source, with its decoder: `LocalSource::new(&stream).json::<Click>()`.
    pub fn source<S: Source, D: Decoder>(self, source: Decoded<S, D>) -> Stream<D::Item, Sourced> {
        let node = Arc::new(Node::new(0, true));
        let settings = Arc::new(SourceSettings {
            event_time: Mutex::new(None),
            out_of_orderness: Mutex::new(Duration::ZERO),
            max_skew: Mutex::new(Duration::from_millis(DEFAULT_MAX_SKEW_MS as u64)),
            idleness: Mutex::new(None),
        });
        let root = Arc::new(SourceDecl {
            decoder: source.decoder,
            settings: Arc::clone(&settings),
            node: Arc::clone(&node),
        });
        let graph = Graph {
            name: self.name,
            dead_letter: self.dead_letter,
            start: self.start,
            state: self.state,
            source: Some(source.source),
            root: Some(root),
            source_settings: Box::new(settings),
            keyed: Vec::new(),
            sinks: 0,
            holding_sinks: Vec::new(),
            operators: Vec::new(),
            fanout_depth: 0,
            refused: None,
        };
        Stream {
            graph: Arc::new(Mutex::new(graph)),
            node,
            op: None,
            _stage: PhantomData,
        }
    }
}

// Declared for every stage and bounded by `SourceStage`, so that a call after an operator
// says where it goes instead of "no method named `event_time`".
impl<T: Send + 'static, S: Stage> Stream<T, S> {
    /// Takes event time from the records (default: the stream's arrival time). Watermarks
    /// follow the largest event time seen in each shard. A record whose event time is
    /// garbage (2^61 ms or more from the Unix epoch, such as `i64::MIN` or `i64::MAX`) goes
    /// to the dead-letter policy (stage `event_time`) before any operator.
    pub fn event_time(self, f: impl Fn(&T) -> EventTime + Send + Sync + 'static) -> Self
    where
        S: SourceStage,
    {
        self.with_source(|s| *lock(&s.event_time) = Some(Arc::new(f)));
        self
    }

    /// How far out of order records may arrive: the watermark trails the largest event time
    /// seen by this much (default zero).
    pub fn max_out_of_orderness(self, bound: Duration) -> Self
    where
        S: SourceStage,
    {
        self.with_source(|s| *lock(&s.out_of_orderness) = bound);
        self
    }

    /// How far ahead of its arrival in the stream a record's event time may be (default one
    /// hour). A record further ahead (a producer whose clock is wrong) never moves the
    /// watermark and is late for every window: it goes to the late side output where there is
    /// one, and is counted in `shardflow_untimely_records_total` and logged.
    pub fn max_event_time_skew(self, skew: Duration) -> Self
    where
        S: SourceStage,
    {
        self.with_source(|s| *lock(&s.max_skew) = skew);
        self
    }

    /// A shard that reads nothing for `timeout` (processing time) advances its watermark as if
    /// a record stamped with the current time had arrived, so that its last windows fire
    /// (default: off, as Flink's `withIdleness`). Use it where event time follows the
    /// stream's clock. The advance is recorded in the lease before anything it fires is
    /// written, and a replay makes it again after the same record.
    pub fn idleness(self, timeout: Duration) -> Self
    where
        S: SourceStage,
    {
        self.with_source(|s| *lock(&s.idleness) = Some(timeout));
        self
    }

    fn with_source(&self, f: impl FnOnce(&SourceSettings<T>)) {
        let graph = lock(&self.graph);
        let settings = graph
            .source_settings
            .downcast_ref::<Arc<SourceSettings<T>>>()
            .expect("a sourced stream carries its source's item type");
        f(settings);
    }
}

impl<T: Send + 'static, S: Stage> Stream<T, S> {
    /// Names the operator this stream comes out of, in metrics (`operator` label) and logs,
    /// instead of its kind (`map`, `window-tumbling-60s`); a `try_map`'s dead letters keep the
    /// stage name it was given. Two operators given one name are refused by `build()`, as are
    /// two names for one operator and a name right after the source. Name operators before
    /// `build()`: the labels are fixed then.
    #[must_use]
    pub fn name(self, name: &str) -> Self {
        {
            let mut graph = lock(&self.graph);
            match self.op {
                Some(op) => graph.name_operator(op, name),
                None => {
                    let refusal = BuildError::NameWithoutOperator {
                        topology: graph.name.clone(),
                        name: name.to_owned(),
                    };
                    graph.refused.get_or_insert(refusal);
                }
            }
        }
        self
    }

    /// The stateless primitive: `op` (made fresh for each pipeline instance) turns each value
    /// into at most one value, which keeps the input's identity. `map`, `filter` and `try_map`
    /// are built on it. `kind` labels it in metrics and logs (with `-2`, `-3`, … on later
    /// operators of one label) unless `.name(..)` names it.
    ///
    /// An operator made this way must not emit twice for one input (the runtime stops with a
    /// panic naming this rule): use [`Stream::stateless_fan_out`].
    pub fn stateless<U, O, M>(self, kind: &str, make: M) -> Stream<U, S::AfterOp>
    where
        U: Send + 'static,
        O: Stateless<T, U>,
        M: Fn() -> O + Send + Sync + 'static,
    {
        self.stateless_decl(kind, make, false)
    }

    /// The fanning-out stateless primitive: like [`Stream::stateless`], but `op` may turn each
    /// value into any number of values, each with an identity of its own (the input's plus
    /// its index among the input's outputs). `flat_map` is built on it. A topology may chain
    /// at most eight of them on one path; each level numbers up to 2^(64 / the deepest chain)
    /// outputs of one input.
    pub fn stateless_fan_out<U, O, M>(self, kind: &str, make: M) -> Stream<U, S::AfterOp>
    where
        U: Send + 'static,
        O: Stateless<T, U>,
        M: Fn() -> O + Send + Sync + 'static,
    {
        self.stateless_decl(kind, make, true)
    }

    fn stateless_decl<U, O, M>(self, kind: &str, make: M, fans_out: bool) -> Stream<U, S::AfterOp>
    where
        U: Send + 'static,
        O: Stateless<T, U>,
        M: Fn() -> O + Send + Sync + 'static,
    {
        let depth = self.node.depth + usize::from(fans_out);
        let child: Arc<Node<U>> = Arc::new(Node::new(depth, self.node.of_records));
        let (op, label) = {
            let mut graph = lock(&self.graph);
            graph.fanout_depth = graph.fanout_depth.max(depth);
            graph.label(kind)
        };
        self.node.add(Arc::new(StatelessDecl {
            make,
            fans_out,
            label,
            down: Arc::clone(&child),
        }));
        Stream {
            graph: self.graph,
            node: child,
            op: Some(op),
            _stage: PhantomData,
        }
    }

    /// Writes the stream to `sink`. Returns a handle that builds the whole topology.
    ///
    /// A sink that gathers record outputs into units across commits (`S3Sink` with records)
    /// cannot take records after `key_by` (late records): `build` refuses it, since several
    /// keyed workers write one shard's records there and a replay at another parallelism
    /// would cut other units. Archive records before `key_by`, or send late records to a sink
    /// that stores each output on its own.
    pub fn sink(self, sink: impl Sink<T>) -> Pipeline {
        let sink: Arc<dyn Sink<T>> = Arc::new(sink);
        {
            let mut graph = lock(&self.graph);
            graph.sinks += 1;
            if S::AFTER_KEY_BY && self.node.of_records && sink.holds_record_outputs() {
                let refusal = BuildError::HoldingSinkAfterKeyBy {
                    topology: graph.name.clone(),
                    sink: sink.name().to_owned(),
                };
                graph.refused.get_or_insert(refusal);
            } else if sink.holds_record_outputs() && !S::AFTER_KEY_BY {
                // Only sinks on a shard's own path hold units; after key_by one takes keyed
                // results, stored one each, and may share its name with one before.
                let name = sink.name().to_owned();
                if graph.holding_sinks.contains(&name) {
                    let refusal = BuildError::HoldingSinkNamedTwice {
                        topology: graph.name.clone(),
                        sink: name,
                    };
                    graph.refused.get_or_insert(refusal);
                } else {
                    graph.holding_sinks.push(name);
                }
            }
        }
        self.node.add(Arc::new(SinkDecl { sink }));
        Pipeline { graph: self.graph }
    }

    /// Builds the topology this stream belongs to (every branch, not only this one).
    pub fn build(self) -> Result<Topology, BuildError> {
        Pipeline { graph: self.graph }.build()
    }
}

impl<T: Send + 'static, S: ShardStage> Stream<T, S> {
    /// The fallible primitive: `f` (made fresh for each pipeline instance by `make`) turns
    /// each value into one value or fails. A failure goes to the topology's dead-letter policy
    /// under `stage`: retried (the wait is the runtime's, on its clock: no thread sleeps, and
    /// the shard's later records wait behind the retried one), dead-lettered with the input
    /// record, or stopping the shard. `try_map` is built on it. Only before `key_by`, where
    /// every value still has its input record.
    pub fn try_stateless<U, F, M>(self, stage: &'static str, make: M) -> Stream<U, S::AfterOp>
    where
        U: Send + 'static,
        F: FnMut(&T) -> Result<U, String> + Send + 'static,
        M: Fn() -> F + Send + Sync + 'static,
    {
        let child: Arc<Node<U>> = Arc::new(Node::new(self.node.depth, self.node.of_records));
        let (op, label) = lock(&self.graph).label(stage);
        self.node.add(Arc::new(FallibleDecl {
            make,
            stage,
            label,
            down: Arc::clone(&child),
        }));
        Stream {
            graph: self.graph,
            node: child,
            op: Some(op),
            _stage: PhantomData,
        }
    }

    /// The keyed primitive: hashes `key_fn(value)` over the keyed workers and runs an operator
    /// made by `make_op` in each. Returns the operator's results and its late records. `kind`
    /// names it in metrics, as for [`Stream::stateless`].
    pub fn keyed<K, Op, F, M>(
        self,
        kind: &str,
        key_fn: F,
        make_op: M,
    ) -> (Stream<Op::Out, Keyed>, Stream<T, Keyed>)
    where
        K: Hash + Eq + Send + 'static,
        F: Fn(&T) -> K + Clone + Send + Sync + 'static,
        Op: KeyedOperator<Key = K, In = T>,
        M: Fn() -> Op + Send + Sync + 'static,
    {
        // Results are identified by key and window; late records keep their input's identity.
        let main: Arc<Node<Op::Out>> = Arc::new(Node::new(0, false));
        let late: Arc<Node<T>> = Arc::new(Node::new(self.node.depth, true));
        let (op, branch) = {
            let mut graph = lock(&self.graph);
            let (op, label) = graph.label(kind);
            graph.keyed.push(Arc::new(KeyedBranchDecl::<Op, _> {
                make_op,
                label,
                main: Arc::clone(&main),
                late: Arc::clone(&late),
                _op: PhantomData,
            }));
            (op, graph.keyed.len() - 1)
        };
        self.node.add(Arc::new(ExchangeDecl {
            key_fn,
            branch,
            _key: PhantomData,
        }));
        let main = Stream {
            graph: Arc::clone(&self.graph),
            node: main,
            op: Some(op),
            _stage: PhantomData,
        };
        let late = Stream {
            graph: self.graph,
            node: late,
            op: None,
            _stage: PhantomData,
        };
        (main, late)
    }
}

/// A topology with at least one sink; `build` validates and freezes it.
pub struct Pipeline {
    graph: Arc<Mutex<Graph>>,
}

/// Longest topology name: it appears in lease keys, table names and file paths.
const MAX_NAME_LEN: usize = 100;

/// Most `flat_map`s chained on one path: each numbers its outputs in 64 / this many bits of
/// the identity, so eight leave 256 outputs of one input per level.
const MAX_FANOUT_DEPTH: usize = 8;

impl Pipeline {
    /// Validates the topology.
    pub fn build(self) -> Result<Topology, BuildError> {
        let graph = lock(&self.graph);
        let name_ok = !graph.name.is_empty()
            && graph.name.len() <= MAX_NAME_LEN
            && graph
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && !graph.name.starts_with('.');
        if !name_ok {
            return Err(BuildError::InvalidName {
                name: graph.name.clone(),
            });
        }
        if graph.sinks == 0 {
            return Err(BuildError::NoSink {
                topology: graph.name.clone(),
            });
        }
        if let Some(refused) = &graph.refused {
            return Err(refused.clone());
        }
        graph.settle_labels()?;
        if let Some(dead) = graph.dead_letter.sink() {
            if dead.holds_record_outputs() && graph.holding_sinks.iter().any(|n| n == dead.name()) {
                return Err(BuildError::HoldingSinkNamedTwice {
                    topology: graph.name.clone(),
                    sink: dead.name().to_owned(),
                });
            }
        }
        if graph.fanout_depth > MAX_FANOUT_DEPTH {
            return Err(BuildError::FanOutTooDeep {
                topology: graph.name.clone(),
                depth: graph.fanout_depth,
                max: MAX_FANOUT_DEPTH,
            });
        }
        if graph.state.snapshots().is_some() {
            if let Some(branch) = graph.keyed.iter().find(|b| !b.snapshots()) {
                return Err(BuildError::NoSnapshots {
                    topology: graph.name.clone(),
                    operator: branch.label().to_string(),
                });
            }
        }
        let fanout_bits = 64 / graph.fanout_depth.max(1) as u32;
        Ok(Topology {
            name: graph.name.clone(),
            source: Arc::clone(graph.source.as_ref().expect("builder sets the source")),
            root: Arc::clone(graph.root.as_ref().expect("builder sets the root")),
            keyed: graph.keyed.clone(),
            dead_letter: graph.dead_letter.clone(),
            start: graph.start.clone(),
            fanout_bits,
            state: graph.state.clone(),
        })
    }
}
