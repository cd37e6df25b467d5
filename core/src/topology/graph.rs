//! The declared graph: nodes (the consumers of one stream), the declarations of the stages
//! that consume them, and the interfaces through which the executor (`exec/`) turns a
//! declaration into running instances.
//!
//! Everything here is data. Each declaration type has its behaviour in `exec/` (which
//! implements the traits below for it), so that this module names nothing of the machinery:
//! the runtime instantiates a topology only through these traits.

use std::any::Any;
use std::collections::HashSet;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::task::JoinSet;

use crate::dead_letter::DeadLetter;
use crate::decode::Decoder;
use crate::error::{BuildError, Error};
use crate::lease::ShardCheckpoint;
use crate::lease_guard::LeaseGuard;
use crate::metrics::Metrics;
use crate::operator::{Emit, EpochCx, KeyedOperator, ReportFailure};
use crate::position::{EventTime, RecordPosition, ShardId, StartPosition};
use crate::protocol::watermark::WatermarkRules;
use crate::random::Random;
use crate::record::RawBatch;
use crate::sink::{Held, Sink};
use crate::source::Source;
use crate::tracker::Tracker;

/// What a pipeline instance (a shard task or a keyed worker) is built with.
pub(crate) struct InstanceCx {
    pub(crate) topology: String,
    pub(crate) instance: String,
    /// The shard's dead-letter policy, on a shard's own path (none in keyed workers).
    pub(crate) failures: Option<Arc<dyn ReportFailure>>,
    pub(crate) exchanges: Exchanges,
    pub(crate) metrics: Metrics,
    /// Backoff jitter.
    pub(crate) random: Random,
    /// Bits per level of `flat_map` in output identities (`RecordCx::nth_output`).
    pub(crate) fanout_bits: u32,
    /// On a shard's own path, where its sinks that hold record outputs resume: the resumed
    /// checkpoint (`ShardCheckpoint::sinks`, `committed` for the others). None elsewhere.
    pub(crate) resumed: Option<ShardCheckpoint>,
    /// On a shard's own path, the shard's lease guard: its sinks are called only while it
    /// holds. None elsewhere (keyed workers check theirs through the tracker).
    pub(crate) guard: Option<(ShardId, LeaseGuard)>,
    /// On a shard's own path, records a keyed operator panicked on in an earlier life of the
    /// shard in this run, with the operator's label: they go to the dead-letter policy before
    /// they are decoded, so that the keyed state is rebuilt as if they had never come.
    pub(crate) quarantined: Quarantined,
}

/// Input records of a shard a keyed operator panicked on, with the operator's label.
pub(crate) type Quarantined = Arc<std::collections::BTreeMap<RecordPosition, Arc<str>>>;

/// The exchanges of one run, by keyed branch, type-erased: each is the `exec` exchange of its
/// branch's key and value types.
pub(crate) type Exchanges = Arc<Vec<Box<dyn Any + Send + Sync>>>;

/// What a keyed worker is built with.
pub(crate) struct WorkerCx {
    pub(crate) topology: String,
    pub(crate) tracker: Tracker,
    pub(crate) metrics: Metrics,
    pub(crate) capacity: usize,
    pub(crate) commit_interval: Duration,
    pub(crate) random: Random,
    pub(crate) fanout_bits: u32,
    /// Where keyed dead letters go.
    pub(crate) dead_letter: crate::dead_letter::DeadLetter,
    /// The source stream, which dead letters name.
    pub(crate) stream: String,
    /// Where snapshot parts go, if the topology takes snapshots.
    pub(crate) state_store: Option<Arc<dyn crate::state_store::StateStore>>,
}

/// A declared consumer of a stream of `T`, instantiated once per pipeline instance.
pub(crate) trait Instantiate<T>: Send + Sync {
    fn instantiate(&self, cx: &InstanceCx) -> Box<dyn Emit<T>>;
}

/// How several consumers of one stream share its values (declared when a stream is cloned,
/// where its values are known to be `Clone`).
pub(crate) trait FanOut<T>: Send + Sync {
    fn fan_out(&self, outs: Vec<Box<dyn Emit<T>>>) -> Box<dyn Emit<T>>;
}

/// Fan-out by cloning each value for every consumer but the last.
pub(crate) struct TeeDecl;

/// A point of the graph: the consumers of one stream.
pub(crate) struct Node<T> {
    pub(crate) consumers: Mutex<Vec<Arc<dyn Instantiate<T>>>>,
    pub(crate) fan_out: Mutex<Option<Arc<dyn FanOut<T>>>>,
    /// Fanning-out operators (`flat_map`s) between this stream and the root of its outputs'
    /// identities (the source, or the keyed operator whose results these are).
    pub(crate) depth: usize,
    /// Whether its values are identified by their input records (not keyed results).
    pub(crate) of_records: bool,
}

impl<T: Send + 'static> Node<T> {
    pub(crate) fn new(depth: usize, of_records: bool) -> Self {
        Self {
            consumers: Mutex::new(Vec::new()),
            fan_out: Mutex::new(None),
            depth,
            of_records,
        }
    }

    pub(crate) fn add(&self, consumer: Arc<dyn Instantiate<T>>) {
        lock(&self.consumers).push(consumer);
    }
}

/// A stateless operator made fresh by `make` for each instance, feeding `down`.
pub(crate) struct StatelessDecl<U, M> {
    pub(crate) make: M,
    /// Whether it may make several outputs of one input (`flat_map`).
    pub(crate) fans_out: bool,
    pub(crate) label: LabelSlot,
    pub(crate) down: Arc<Node<U>>,
}

/// A user function that may fail (`try_map`), made fresh by `make` for each instance.
pub(crate) struct FallibleDecl<U, M> {
    pub(crate) make: M,
    /// The stage its failures are dead-lettered under.
    pub(crate) stage: &'static str,
    pub(crate) label: LabelSlot,
    pub(crate) down: Arc<Node<U>>,
}

/// A sink.
pub(crate) struct SinkDecl<T> {
    pub(crate) sink: Arc<dyn Sink<T>>,
}

/// `key_by`: records go to the workers of keyed branch `branch` by `key_fn`.
pub(crate) struct ExchangeDecl<K, F> {
    pub(crate) key_fn: F,
    pub(crate) branch: usize,
    pub(crate) _key: PhantomData<fn() -> K>,
}

/// A keyed branch: the operator made by `make_op` in each keyed worker, its results and its
/// late records.
pub(crate) struct KeyedBranchDecl<Op: KeyedOperator, M> {
    pub(crate) make_op: M,
    pub(crate) label: LabelSlot,
    pub(crate) main: Arc<Node<Op::Out>>,
    pub(crate) late: Arc<Node<Op::In>>,
    pub(crate) _op: PhantomData<fn() -> Op>,
}

pub(crate) type EventTimeFn<T> = Arc<dyn Fn(&T) -> EventTime + Send + Sync>;

/// How event time is read off the source's records.
pub(crate) struct SourceSettings<T> {
    pub(crate) event_time: Mutex<Option<EventTimeFn<T>>>,
    pub(crate) out_of_orderness: Mutex<Duration>,
    pub(crate) max_skew: Mutex<Duration>,
    pub(crate) idleness: Mutex<Option<Duration>>,
}

/// The source's decoder, event-time settings and first node.
pub(crate) struct SourceDecl<D: Decoder> {
    pub(crate) decoder: Arc<D>,
    pub(crate) settings: Arc<SourceSettings<D::Item>>,
    pub(crate) node: Arc<Node<D::Item>>,
}

/// A shard pipeline as the shard task drives it: decode, timestamp, and push a batch through
/// the fused chain, then flush and commit its sinks.
#[async_trait]
pub(crate) trait ShardPipeline: Send {
    /// Pushes the records of `raw` from index `from` through the chain, judging each by the
    /// shard's `watermark` and advancing it (`protocol::watermark`), until the end or until a
    /// user function parked a value (`Processed::parked_after`).
    fn process(
        &mut self,
        raw: &Arc<RawBatch>,
        from: usize,
        watermark: &mut Option<EventTime>,
    ) -> Processed;
    /// Calls parked user functions whose wait is over.
    fn resume(&mut self);
    /// How the shard's watermark follows its records and the clock.
    fn rules(&self) -> WatermarkRules;
    async fn flush(&mut self, epoch: &EpochCx) -> Result<(), Error>;
    async fn commit(&mut self) -> Result<(), Error>;
    fn discard(&mut self);
    /// What the shard path's sinks hold back after a commit, by sink name.
    fn held(&self) -> Vec<(String, ShardId, Held)>;
}

/// What a batch's processing found beyond its outputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Processed {
    /// Processing stopped after the record at this index: a user function is to be called
    /// again later (`ShardPipeline::resume`), and the batch goes on after it.
    pub(crate) parked_after: Option<usize>,
    /// Records whose event time was untimely (too far ahead of their arrival; invalid ones are
    /// dead-lettered instead).
    pub(crate) untimely: usize,
    /// The index of the first of them in the batch.
    pub(crate) first_untimely: Option<u32>,
}

/// Makes shard pipelines (type-erased over the source's item type).
pub(crate) trait InstantiateRoot: Send + Sync {
    fn instantiate(&self, cx: &InstanceCx) -> Box<dyn ShardPipeline>;
}

/// A keyed branch, type-erased: spawns its workers and hands out their exchange.
pub(crate) trait InstantiateBranch: Send + Sync {
    /// Spawns `n` workers reporting as paths `first_path..first_path + n`; returns the branch's
    /// exchange for the registry.
    fn spawn(
        &self,
        n: usize,
        first_path: usize,
        cx: &WorkerCx,
        tasks: &mut JoinSet<Result<(), Error>>,
    ) -> Box<dyn Any + Send + Sync>;

    /// The operator's label: its stable id in snapshots.
    fn label(&self) -> Arc<str>;

    /// Whether the operator can save and restore its state (`KeyedOperator::SNAPSHOTS`).
    fn snapshots(&self) -> bool;
}

/// The whole graph while it is being declared.
pub(crate) struct Graph {
    pub(crate) name: String,
    pub(crate) dead_letter: DeadLetter,
    pub(crate) start: StartPosition,
    pub(crate) source: Option<Arc<dyn Source>>,
    pub(crate) root: Option<Arc<dyn InstantiateRoot>>,
    /// The `Arc<SourceSettings<T>>` of the source's item type.
    pub(crate) source_settings: Box<dyn Any + Send + Sync>,
    pub(crate) keyed: Vec<Arc<dyn InstantiateBranch>>,
    pub(crate) sinks: usize,
    /// How keyed state survives restarts.
    pub(crate) state: super::StatePolicy,
    /// Names of the sinks on the shard path that gather record outputs into units: each has
    /// its own position in the shard's checkpoint, by name.
    pub(crate) holding_sinks: Vec<String>,
    /// Operators added so far, in the order added: each is labelled in metrics and logs by its
    /// kind or the name `.name(..)` gave it, made unique when the topology is built.
    pub(crate) operators: Vec<OperatorName>,
    /// The most fanning-out operators on a path from an identity root.
    pub(crate) fanout_depth: usize,
    /// What makes the topology unbuildable, found while it was declared.
    pub(crate) refused: Option<BuildError>,
}

/// An operator's label, set when the topology is built (see [`Graph::settle_labels`]).
pub(crate) type LabelSlot = Arc<OnceLock<Arc<str>>>;

/// The label of an instantiated operator (always set: topologies are instantiated once built).
pub(crate) fn label_of(slot: &LabelSlot) -> Arc<str> {
    slot.get()
        .cloned()
        .unwrap_or_else(|| Arc::from("unlabelled"))
}

/// One declared operator's label: what it is, and the name the user gave it, if any.
pub(crate) struct OperatorName {
    kind: String,
    given: Option<String>,
    slot: LabelSlot,
}

impl Graph {
    /// Declares the next operator, of `kind` (`map`, `window-tumbling-60s`): its index (for
    /// `.name(..)`) and the slot its label is set in at build time.
    pub(crate) fn label(&mut self, kind: &str) -> (usize, LabelSlot) {
        let slot = LabelSlot::default();
        self.operators.push(OperatorName {
            kind: kind.to_owned(),
            given: None,
            slot: Arc::clone(&slot),
        });
        (self.operators.len() - 1, slot)
    }

    /// Names operator `index` (`.name(..)` after it); a second name for one operator (through
    /// a clone of its stream) is refused at build time.
    pub(crate) fn name_operator(&mut self, index: usize, name: &str) {
        let op = &mut self.operators[index];
        match &op.given {
            Some(first) if first != name => {
                let refusal = BuildError::NamedTwice {
                    topology: self.name.clone(),
                    first: first.clone(),
                    second: name.to_owned(),
                };
                self.refused.get_or_insert(refusal);
            }
            _ => op.given = Some(name.to_owned()),
        }
    }

    /// Sets every operator's label: its given name (two given names alike are refused), or its
    /// kind, with `-2`, `-3`, … on the second and later operators of one label.
    pub(crate) fn settle_labels(&self) -> Result<(), BuildError> {
        let mut taken: HashSet<String> = HashSet::new();
        for op in &self.operators {
            if let Some(given) = &op.given {
                if !taken.insert(given.clone()) {
                    return Err(BuildError::NameTwice {
                        topology: self.name.clone(),
                        name: given.clone(),
                    });
                }
            }
        }
        for op in &self.operators {
            let label = match &op.given {
                Some(given) => given.clone(),
                None => {
                    let mut label = op.kind.clone();
                    let mut n = 1;
                    while !taken.insert(label.clone()) {
                        n += 1;
                        label = format!("{}-{n}", op.kind);
                    }
                    label
                }
            };
            // A topology built twice keeps the labels of its first build.
            let _ = op.slot.set(Arc::from(label));
        }
        Ok(())
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
