//! The typed topology builder: `Topology::builder`, stream handles with their stage, and the
//! primitives (`stateless`, `keyed`, `sink`) that operators are built on.

use std::any::Any;
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::dead_letter::DeadLetter;
use crate::decode::{Decoded, Decoder};
use crate::error::{BuildError, Error};
use crate::position::{EventTime, ShardId, StartPosition};
use crate::record::RawBatch;
use crate::runtime::metrics::Metrics;
use crate::runtime::tracker::Tracker;
use crate::sink::{Held, Sink, SinkContext};
use crate::source::Source;
use crate::topology::chain::{
    Discard, Emit, EpochCx, Failures, Ident, OperatorCounts, RecordCx, SinkEmitter, Stateless,
    StatelessNode, Tee, NO_WATERMARK,
};
use crate::topology::keyed::{
    exchange, record_pool, Exchange, ExchangeEmitter, Exchanges, KeyedOperator, KeyedWorker,
};

/// Where in the topology a stream is; operators are allowed or not by stage.
pub trait Stage: Send + Sync + 'static {
    /// The stage of a stateless operator's output.
    type AfterOp: Stage;
}

/// Stages before `key_by`, where every value still has its input record: fallible operators
/// (whose failures are dead-lettered with the record) and `key_by` itself live here.
pub trait ShardStage: Stage {}

/// Straight out of the source: event time and watermarks are configured here.
#[derive(Debug)]
pub enum Sourced {}
/// After a stateless operator, before `key_by`.
#[derive(Debug)]
pub enum Sharded {}
/// After a keyed operator: results of windows and reductions.
#[derive(Debug)]
pub enum Keyed {}

impl Stage for Sourced {
    type AfterOp = Sharded;
}
impl Stage for Sharded {
    type AfterOp = Sharded;
}
impl Stage for Keyed {
    type AfterOp = Keyed;
}
impl ShardStage for Sourced {}
impl ShardStage for Sharded {}

/// What a pipeline instance (a shard task or a keyed worker) is built with.
pub(crate) struct InstanceCx {
    pub(crate) topology: String,
    pub(crate) instance: String,
    pub(crate) failures: Option<Failures>,
    pub(crate) exchanges: Exchanges,
    pub(crate) metrics: Metrics,
}

type Factory<T> = Box<dyn Fn(&InstanceCx) -> Box<dyn Emit<T>> + Send + Sync>;
type TeeMaker<T> = fn(Vec<Box<dyn Emit<T>>>) -> Box<dyn Emit<T>>;

/// A point of the graph: the consumers of one stream.
pub(crate) struct Node<T> {
    consumers: Mutex<Vec<Factory<T>>>,
    tee: Mutex<Option<TeeMaker<T>>>,
}

impl<T: Send + 'static> Node<T> {
    fn new() -> Self {
        Self {
            consumers: Mutex::new(Vec::new()),
            tee: Mutex::new(None),
        }
    }

    fn add(&self, factory: Factory<T>) {
        self.consumers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(factory);
    }

    pub(crate) fn instantiate(&self, cx: &InstanceCx) -> Box<dyn Emit<T>> {
        let consumers = self
            .consumers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match consumers.len() {
            0 => Box::new(Discard),
            1 => consumers[0](cx),
            _ => {
                let tee = self
                    .tee
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                // Only `Stream::clone` adds a second consumer, and it sets the tee.
                let tee = tee.expect("a stream with several consumers was cloned");
                tee(consumers.iter().map(|f| f(cx)).collect())
            }
        }
    }
}

/// The whole graph while it is being declared.
pub(crate) struct Graph {
    name: String,
    dead_letter: DeadLetter,
    start: StartPosition,
    source: Option<Arc<dyn Source>>,
    root: Option<Arc<dyn RootFactory>>,
    /// The `Arc<SourceSettings<T>>` of the source's item type.
    source_settings: Box<dyn Any + Send + Sync>,
    keyed: Vec<Arc<dyn KeyedBranch>>,
    sinks: usize,
    /// Operators added so far: each is labelled `<n>-<kind>` in metrics, in the order added.
    operators: usize,
}

impl Graph {
    /// The metrics label of the next operator of `kind`.
    fn label(&mut self, kind: &str) -> Arc<str> {
        self.operators += 1;
        format!("{}-{kind}", self.operators).into()
    }
}

/// A typed stream of values of type `T` at stage `S`. Clone it to fan out to several branches.
pub struct Stream<T, S = Sharded> {
    graph: Arc<Mutex<Graph>>,
    node: Arc<Node<T>>,
    _stage: PhantomData<fn() -> S>,
}

impl<T: Clone + Send + 'static, S> Clone for Stream<T, S> {
    fn clone(&self) -> Self {
        *self
            .node
            .tee
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(|outs| Box::new(Tee { outs }));
        Self {
            graph: Arc::clone(&self.graph),
            node: Arc::clone(&self.node),
            _stage: PhantomData,
        }
    }
}

/// Starts declaring a topology.
pub struct TopologyBuilder {
    name: String,
    dead_letter: DeadLetter,
    start: StartPosition,
}

/// A declared, validated topology, ready for `Runtime::new`.
pub struct Topology {
    pub(crate) name: String,
    pub(crate) source: Arc<dyn Source>,
    pub(crate) root: Arc<dyn RootFactory>,
    pub(crate) keyed: Vec<Arc<dyn KeyedBranch>>,
    pub(crate) dead_letter: DeadLetter,
    pub(crate) start: StartPosition,
}

impl Topology {
    /// Starts declaring a topology named `name` (it names lease keys, output folders, metrics).
    pub fn builder(name: impl Into<String>) -> TopologyBuilder {
        TopologyBuilder {
            name: name.into(),
            dead_letter: DeadLetter::default(),
            start: StartPosition::TrimHorizon,
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

    /// The source, with its decoder: `LocalSource::new(&stream).json::<Click>()`.
    pub fn source<S: Source, D: Decoder>(self, source: Decoded<S, D>) -> Stream<D::Item, Sourced> {
        let node = Arc::new(Node::new());
        let settings = Arc::new(SourceSettings {
            event_time: Mutex::new(None),
            out_of_orderness: Mutex::new(Duration::ZERO),
        });
        let spec = Arc::new(SourceSpec {
            decoder: source.decoder,
            settings: Arc::clone(&settings),
            node: Arc::clone(&node),
        });
        let graph = Graph {
            name: self.name,
            dead_letter: self.dead_letter,
            start: self.start,
            source: Some(source.source),
            root: Some(spec),
            source_settings: Box::new(settings),
            keyed: Vec::new(),
            sinks: 0,
            operators: 0,
        };
        Stream {
            graph: Arc::new(Mutex::new(graph)),
            node,
            _stage: PhantomData,
        }
    }
}

type EventTimeFn<T> = Arc<dyn Fn(&T) -> EventTime + Send + Sync>;

struct SourceSettings<T> {
    event_time: Mutex<Option<EventTimeFn<T>>>,
    out_of_orderness: Mutex<Duration>,
}

struct SourceSpec<D: Decoder> {
    decoder: Arc<D>,
    settings: Arc<SourceSettings<D::Item>>,
    node: Arc<Node<D::Item>>,
}

impl<T: Send + 'static> Stream<T, Sourced> {
    /// Takes event time from the records (default: the stream's arrival time). Watermarks
    /// follow the largest event time seen in each shard.
    pub fn event_time(self, f: impl Fn(&T) -> EventTime + Send + Sync + 'static) -> Self {
        self.with_source(|s| *lock(&s.event_time) = Some(Arc::new(f)));
        self
    }

    /// How far out of order records may arrive: the watermark trails the largest event time
    /// seen by this much (default zero).
    pub fn max_out_of_orderness(self, bound: Duration) -> Self {
        self.with_source(|s| *lock(&s.out_of_orderness) = bound);
        self
    }

    fn with_source(&self, f: impl FnOnce(&SourceSettings<T>)) {
        let graph = self
            .graph
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let settings = graph
            .source_settings
            .downcast_ref::<Arc<SourceSettings<T>>>()
            .expect("a sourced stream carries its source's item type");
        f(settings);
    }
}

impl<T: Send + 'static, S: Stage> Stream<T, S> {
    /// The stateless primitive: `op` (made fresh for each pipeline instance) turns each value
    /// into zero or more values. `map`, `filter`, `flat_map` and `try_map` are built on it.
    /// `kind` names it in metrics (`<n>-<kind>`, n its place in the topology).
    pub fn stateless<U, O, M>(self, kind: &str, make: M) -> Stream<U, S::AfterOp>
    where
        U: Send + 'static,
        O: Stateless<T, U>,
        M: Fn() -> O + Send + Sync + 'static,
    {
        let child: Arc<Node<U>> = Arc::new(Node::new());
        let down = Arc::clone(&child);
        let label = self
            .graph
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .label(kind);
        self.node
            .add(Box::new(move |cx: &InstanceCx| -> Box<dyn Emit<T>> {
                Box::new(StatelessNode {
                    op: make(),
                    down: down.instantiate(cx),
                    failures: cx.failures.clone(),
                    counts: OperatorCounts::new(Arc::clone(&label), cx),
                })
            }));
        Stream {
            graph: self.graph,
            node: child,
            _stage: PhantomData,
        }
    }

    /// Writes the stream to `sink`. Returns a handle that builds the whole topology.
    pub fn sink(self, sink: impl Sink<T>) -> Pipeline {
        let sink: Arc<dyn Sink<T>> = Arc::new(sink);
        self.graph
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .sinks += 1;
        self.node
            .add(Box::new(move |cx: &InstanceCx| -> Box<dyn Emit<T>> {
                let sink_cx = SinkContext {
                    topology: cx.topology.clone(),
                    instance: cx.instance.clone(),
                };
                Box::new(
                    SinkEmitter::new(Arc::clone(&sink), sink_cx, cx.metrics.clone())
                        .with_failures(cx.failures.clone()),
                )
            }));
        Pipeline { graph: self.graph }
    }

    /// Builds the topology this stream belongs to (every branch, not only this one).
    pub fn build(self) -> Result<Topology, BuildError> {
        Pipeline { graph: self.graph }.build()
    }
}

impl<T: Send + 'static, S: ShardStage> Stream<T, S> {
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
        let main: Arc<Node<Op::Out>> = Arc::new(Node::new());
        let late: Arc<Node<T>> = Arc::new(Node::new());
        let branch = {
            let mut graph = self
                .graph
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let label = graph.label(kind);
            graph.keyed.push(Arc::new(KeyedBranchSpec {
                make_op,
                label,
                main: Arc::clone(&main),
                late: Arc::clone(&late),
                _op: PhantomData,
            }));
            graph.keyed.len() - 1
        };
        self.node
            .add(Box::new(move |cx: &InstanceCx| -> Box<dyn Emit<T>> {
                Box::new(ExchangeEmitter::new(
                    key_fn.clone(),
                    exchange::<K, T>(&cx.exchanges, branch),
                ))
            }));
        let main = Stream {
            graph: Arc::clone(&self.graph),
            node: main,
            _stage: PhantomData,
        };
        let late = Stream {
            graph: self.graph,
            node: late,
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

impl Pipeline {
    /// Validates the topology.
    pub fn build(self) -> Result<Topology, BuildError> {
        let graph = self
            .graph
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
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
        Ok(Topology {
            name: graph.name.clone(),
            source: Arc::clone(graph.source.as_ref().expect("builder sets the source")),
            root: Arc::clone(graph.root.as_ref().expect("builder sets the root")),
            keyed: graph.keyed.clone(),
            dead_letter: graph.dead_letter.clone(),
            start: graph.start.clone(),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A shard pipeline: decode, timestamp, and push a batch through the fused chain.
#[async_trait]
pub(crate) trait ShardPipeline: Send {
    /// Pushes `raw` through the chain; `max_event_time` carries the shard's largest event time.
    fn process(&mut self, raw: &Arc<RawBatch>, max_event_time: &mut Option<EventTime>);
    /// How far the watermark trails the largest event time, in milliseconds.
    fn out_of_orderness_ms(&self) -> i64;
    async fn flush(&mut self, epoch: &EpochCx) -> Result<(), Error>;
    async fn commit(&mut self) -> Result<(), Error>;
    fn discard(&mut self);
    /// What the shard path's sinks hold back after a commit.
    fn held(&self) -> Vec<(ShardId, Held)>;
}

/// Makes shard pipelines (type-erased over the source's item type).
pub(crate) trait RootFactory: Send + Sync {
    fn instantiate(&self, cx: &InstanceCx, failures: Failures) -> Box<dyn ShardPipeline>;
}

impl<D: Decoder> RootFactory for SourceSpec<D> {
    fn instantiate(&self, cx: &InstanceCx, failures: Failures) -> Box<dyn ShardPipeline> {
        let bound = *lock(&self.settings.out_of_orderness);
        Box::new(SourcePipeline {
            decoder: Arc::clone(&self.decoder),
            event_time: lock(&self.settings.event_time).clone(),
            bound_ms: i64::try_from(bound.as_millis()).unwrap_or(i64::MAX),
            down: self.node.instantiate(cx),
            failures,
        })
    }
}

struct SourcePipeline<D: Decoder> {
    decoder: Arc<D>,
    event_time: Option<EventTimeFn<D::Item>>,
    bound_ms: i64,
    down: Box<dyn Emit<D::Item>>,
    failures: Failures,
}

#[async_trait]
impl<D: Decoder> ShardPipeline for SourcePipeline<D> {
    fn process(&mut self, raw: &Arc<RawBatch>, max_event_time: &mut Option<EventTime>) {
        // Plain locals in the loop; the Option is only the interface.
        let (mut seen, mut max) = (
            max_event_time.is_some(),
            max_event_time.unwrap_or(EventTime::MIN),
        );
        for (index, record) in raw.iter().enumerate() {
            // Batches hold at most 4 GiB of records, far fewer than u32::MAX of them.
            let index = index as u32;
            let watermark = if seen {
                max.saturating_sub(self.bound_ms)
            } else {
                NO_WATERMARK
            };
            if let Some(reason) = raw.fault(index as usize) {
                let cx = RecordCx {
                    event_time: record.arrival_ms,
                    watermark,
                    ident: Ident::Record { index, fanout: 0 },
                };
                self.failures.fail(&cx, "source", reason, 0, false);
                continue;
            }
            match self.decoder.decode(record) {
                Ok(value) => {
                    let event_time = match &self.event_time {
                        Some(f) => f(&value),
                        None => record.arrival_ms,
                    };
                    max = if seen {
                        max.max(event_time)
                    } else {
                        event_time
                    };
                    seen = true;
                    let cx = RecordCx {
                        event_time,
                        watermark,
                        ident: Ident::Record { index, fanout: 0 },
                    };
                    self.down.emit(&cx, value);
                }
                Err(error) => {
                    let cx = RecordCx {
                        event_time: record.arrival_ms,
                        watermark,
                        ident: Ident::Record { index, fanout: 0 },
                    };
                    self.failures
                        .fail(&cx, "decode", &error.to_string(), 0, false);
                }
            }
        }
        if seen {
            *max_event_time = Some(max);
        }
    }

    fn out_of_orderness_ms(&self) -> i64 {
        self.bound_ms
    }

    async fn flush(&mut self, epoch: &EpochCx) -> Result<(), Error> {
        self.down.flush(epoch).await
    }

    async fn commit(&mut self) -> Result<(), Error> {
        self.down.commit().await
    }

    fn discard(&mut self) {
        self.down.discard();
    }
    fn held(&self) -> Vec<(ShardId, Held)> {
        let mut out = Vec::new();
        self.down.held(&mut out);
        out
    }
}

/// What a keyed worker is built with.
pub(crate) struct WorkerCx {
    pub(crate) topology: String,
    pub(crate) tracker: Tracker,
    pub(crate) metrics: Metrics,
    pub(crate) capacity: usize,
    pub(crate) commit_interval: std::time::Duration,
}

/// A keyed branch, type-erased: spawns its workers and hands out their exchange.
pub(crate) trait KeyedBranch: Send + Sync {
    /// Spawns `n` workers reporting as paths `first_path..first_path + n`; returns the
    /// `Vec<mpsc::Sender<ExchangeMsg<K, T>>>` for the exchange registry.
    fn spawn(
        &self,
        n: usize,
        first_path: usize,
        cx: &WorkerCx,
        tasks: &mut JoinSet<Result<(), Error>>,
    ) -> Box<dyn Any + Send + Sync>;
}

struct KeyedBranchSpec<Op: KeyedOperator, M> {
    make_op: M,
    label: Arc<str>,
    main: Arc<Node<Op::Out>>,
    late: Arc<Node<Op::In>>,
    _op: PhantomData<fn() -> Op>,
}

impl<Op, M> KeyedBranch for KeyedBranchSpec<Op, M>
where
    Op: KeyedOperator,
    Op::Key: Hash + Eq,
    M: Fn() -> Op + Send + Sync + 'static,
{
    fn spawn(
        &self,
        n: usize,
        first_path: usize,
        cx: &WorkerCx,
        tasks: &mut JoinSet<Result<(), Error>>,
    ) -> Box<dyn Any + Send + Sync> {
        let mut senders = Vec::with_capacity(n);
        let pool = record_pool(n);
        for worker in 0..n {
            let (tx, rx) = mpsc::channel(cx.capacity);
            senders.push(tx);
            let path = first_path + worker;
            let instance = InstanceCx {
                topology: cx.topology.clone(),
                instance: format!("worker-{path}"),
                failures: None,
                exchanges: Arc::new(Vec::new()),
                metrics: cx.metrics.clone(),
            };
            let worker = KeyedWorker {
                op: (self.make_op)(),
                main: self.main.instantiate(&instance),
                late: self.late.instantiate(&instance),
                label: Arc::clone(&self.label),
                tracker: cx.tracker.clone(),
                pool: Arc::clone(&pool),
                path,
                commit_interval: cx.commit_interval,
                metrics: cx.metrics.clone(),
                topology: cx.topology.clone(),
                _key: PhantomData,
            };
            tasks.spawn(worker.run(rx));
        }
        Box::new(Exchange { senders, pool })
    }
}
