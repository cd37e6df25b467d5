//! The fused push chain a batch flows through: the `Emit` trait, per-record context, fan-out,
//! stateless operator nodes, sink emitters and the failure handler behind the dead-letter policy.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::checkpoint::Epoch;
use crate::dead_letter::{DeadLetter, DeadLetterRecord};
use crate::error::{Error, ShardStopped, SinkError};
use crate::lease::LeaseEpoch;
use crate::position::{EventTime, ShardId};
use crate::record::RawBatch;
use crate::runtime::metrics::Metrics;
use crate::sink::{
    Held, KeyId, Output, OutputBatch, OutputId, Sink, SinkContext, SinkWriter, Window,
};
use crate::topology::stream::InstanceCx;

/// The watermark before any record was seen.
pub const NO_WATERMARK: EventTime = EventTime::MIN;

/// What an operator knows about the record it handles.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordCx {
    /// The record's event time.
    pub event_time: EventTime,
    /// The shard's watermark when the record arrived: records of windows that ended (plus the
    /// allowed lateness) before it are late.
    pub watermark: EventTime,
    /// What the output's identity derives from.
    pub ident: Ident,
}

/// The source of an output's identity.
#[derive(Clone, Debug, PartialEq)]
pub enum Ident {
    /// The record at `index` of its epoch's batch; `fanout` numbers the outputs `flat_map`
    /// made of it (16 bits per level).
    Record {
        /// Index in the epoch's raw batch.
        index: u32,
        /// Which output of the record.
        fanout: u32,
    },
    /// A keyed (and possibly windowed) result.
    Keyed {
        /// The key, rendered.
        key: KeyId,
        /// The window, if any.
        window: Option<Window>,
    },
}

/// What a flush is about: one epoch of one shard.
#[derive(Clone, Debug)]
pub struct EpochCx {
    /// The source shard.
    pub shard: ShardId,
    /// The worker's lease epoch for the shard (the fencing token sinks receive).
    pub lease_epoch: LeaseEpoch,
    /// The epoch.
    pub epoch: Epoch,
    /// The epoch's raw records (resolves `Ident::Record` to positions).
    pub raw: Arc<RawBatch>,
    /// The shard's watermark after the epoch, once any record was seen.
    pub watermark: Option<EventTime>,
    /// Whether the epoch is live or only rebuilds state.
    pub mode: Mode,
    /// What else the epoch says about the shard.
    pub control: Control,
}

impl EpochCx {
    /// A replay epoch only rebuilds state: its outputs were committed by an earlier run.
    pub fn replay(&self) -> bool {
        matches!(self.mode, Mode::Rebuild { .. })
    }
}

/// How records of an epoch are handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Normal processing.
    Live,
    /// The records were processed and their outputs committed by an earlier run; they only
    /// rebuild operator state. Windows that had closed by `committed_watermark` are final.
    Rebuild {
        /// The watermark at the committed checkpoint.
        committed_watermark: EventTime,
    },
}

/// What an epoch says about its shard beyond its records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Nothing: more epochs follow.
    Continue,
    /// A bounded run reached the tip: emit what open windows hold, but keep them (a later run
    /// may refine them).
    EndOfInput,
    /// The shard is closed and fully read: close every window and drop the shard's state.
    ShardEnd,
    /// The shard is no longer ours (lease lost, stopped): drop its state without output.
    Release,
}

/// A consumer of values in a fused chain. `emit` is synchronous and buffers; `flush` and
/// `commit` do the I/O once per epoch.
#[async_trait]
pub trait Emit<T>: Send {
    /// Takes one value.
    fn emit(&mut self, cx: &RecordCx, value: T);
    /// Writes what the epoch produced.
    async fn flush(&mut self, epoch: &EpochCx) -> Result<(), Error>;
    /// Makes everything written durable.
    async fn commit(&mut self) -> Result<(), Error>;
    /// Drops what was buffered for the current epoch (the shard stops before it).
    fn discard(&mut self);
    /// Adds what this consumer's sinks hold back after a commit (see `SinkWriter::held`).
    fn held(&self, _out: &mut Vec<(ShardId, Held)>) {}
}

/// Fans a value out to several consumers (a stream handle used more than once).
pub(crate) struct Tee<T> {
    pub(crate) outs: Vec<Box<dyn Emit<T>>>,
}

#[async_trait]
impl<T: Clone + Send + 'static> Emit<T> for Tee<T> {
    fn emit(&mut self, cx: &RecordCx, value: T) {
        if let Some((last, rest)) = self.outs.split_last_mut() {
            for out in rest {
                out.emit(cx, value.clone());
            }
            last.emit(cx, value);
        }
    }
    async fn flush(&mut self, epoch: &EpochCx) -> Result<(), Error> {
        for out in &mut self.outs {
            out.flush(epoch).await?;
        }
        Ok(())
    }
    async fn commit(&mut self) -> Result<(), Error> {
        for out in &mut self.outs {
            out.commit().await?;
        }
        Ok(())
    }
    fn discard(&mut self) {
        self.outs.iter_mut().for_each(|o| o.discard());
    }
    fn held(&self, out: &mut Vec<(ShardId, Held)>) {
        self.outs.iter().for_each(|o| o.held(out));
    }
}

/// The end of a branch nobody consumes.
pub(crate) struct Discard;

#[async_trait]
impl<T: Send + 'static> Emit<T> for Discard {
    fn emit(&mut self, _cx: &RecordCx, _value: T) {}
    async fn flush(&mut self, _epoch: &EpochCx) -> Result<(), Error> {
        Ok(())
    }
    async fn commit(&mut self) -> Result<(), Error> {
        Ok(())
    }
    fn discard(&mut self) {}
}

/// What the failure handler decided about a failed record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureAction {
    /// Call the function again after this wait.
    RetryAfter(Duration),
    /// The record was dead-lettered or the shard will stop; go on with the next record.
    Handled,
}

/// Applies a shard's dead-letter policy to failed records of the current epoch.
#[derive(Clone)]
pub struct Failures {
    inner: Arc<Mutex<FailureState>>,
}

struct FailureState {
    policy: DeadLetter,
    stream: String,
    shard: ShardId,
    raw: Arc<RawBatch>,
    replay: bool,
    dead: Vec<(u32, DeadLetterRecord)>,
    stop: Option<ShardStopped>,
}

impl Failures {
    pub(crate) fn new(policy: DeadLetter, stream: String, shard: ShardId) -> Self {
        let state = FailureState {
            policy,
            stream,
            shard,
            raw: Arc::default(),
            replay: false,
            dead: Vec::new(),
            stop: None,
        };
        Self {
            inner: Arc::new(Mutex::new(state)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FailureState> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn begin_epoch(&self, raw: &Arc<RawBatch>, replay: bool) {
        let mut state = self.lock();
        state.raw = Arc::clone(raw);
        state.replay = replay;
    }

    /// Takes the dead letters and the stop request of the epoch.
    /// Dead letters come with the index of their record in the epoch's batch.
    pub(crate) fn end_epoch(&self) -> (Vec<(u32, DeadLetterRecord)>, Option<ShardStopped>) {
        let mut state = self.lock();
        state.raw = Arc::default();
        let dead = std::mem::take(&mut state.dead);
        (dead, state.stop.take())
    }

    /// Records that the record behind `cx` failed in `stage` on its `attempt`-th try (from 0).
    /// `retryable` is false for decoding, which would fail the same way again.
    pub fn fail(
        &self,
        cx: &RecordCx,
        stage: &str,
        error: &str,
        attempt: u32,
        retryable: bool,
    ) -> FailureAction {
        let mut state = self.lock();
        let Ident::Record { index, .. } = cx.ident else {
            // Fallible operators exist only before `key_by` (the types see to it), where every
            // value still has its input record.
            unreachable!("a fallible operator ran on a keyed result");
        };
        let mut policy = &state.policy;
        if let DeadLetter::Retry { max, backoff, then } = policy {
            if retryable && attempt < *max && !state.replay {
                return FailureAction::RetryAfter(backoff.saturating_mul(1 << attempt.min(16)));
            }
            policy = then;
        }
        if state.replay {
            // Replayed records were dead-lettered (or stopped the shard) in the run that
            // committed them; nothing to do again.
            return FailureAction::Handled;
        }
        let record = state.raw.get(index as usize);
        match policy {
            DeadLetter::To(_) => {
                let letter = DeadLetterRecord {
                    stream: state.stream.clone(),
                    shard: state.shard.clone(),
                    position: record.position.clone(),
                    partition_key: String::from_utf8_lossy(record.partition_key).into_owned(),
                    data: record.data.to_vec(),
                    stage: stage.to_owned(),
                    error: error.to_owned(),
                };
                // One dead letter per input record, even if two branches fail on it.
                if !state.dead.iter().any(|(i, _)| *i == index) {
                    state.dead.push((index, letter));
                }
            }
            DeadLetter::StopShard | DeadLetter::Retry { .. } => {
                if state.stop.is_none() {
                    state.stop = Some(ShardStopped::BadRecord {
                        shard: state.shard.clone(),
                        position: record.position.clone(),
                        reason: format!("{stage}: {error}"),
                    });
                }
            }
        }
        FailureAction::Handled
    }
}

/// Where a stateless operator sends its results, and how it reports failures.
pub struct Collector<'a, U> {
    down: &'a mut dyn Emit<U>,
    failures: Option<&'a Failures>,
    emitted: &'a mut u64,
}

impl<U> Collector<'_, U> {
    /// Emits a result.
    pub fn emit(&mut self, cx: &RecordCx, value: U) {
        *self.emitted += 1;
        self.down.emit(cx, value);
    }

    /// Reports that the user function `stage` failed on the record behind `cx` (attempt from 0)
    /// and returns what to do: retry after a wait, or go on (dead-lettered or stopping).
    ///
    /// # Panics
    /// After `key_by`, where failures have no input record; the stream types prevent it.
    pub fn fail(&mut self, cx: &RecordCx, stage: &str, error: &str, attempt: u32) -> FailureAction {
        self.failures
            .expect("fallible operators run only before key_by")
            .fail(cx, stage, error, attempt, true)
    }
}

/// A stateless operator: map, filter, flat_map and their fallible forms are thin layers on it.
pub trait Stateless<T, U>: Send + 'static {
    /// Handles one value.
    fn apply(&mut self, cx: &RecordCx, value: T, out: &mut Collector<'_, U>);
}

impl<T, U, F> Stateless<T, U> for F
where
    F: FnMut(&RecordCx, T, &mut Collector<'_, U>) + Send + 'static,
{
    fn apply(&mut self, cx: &RecordCx, value: T, out: &mut Collector<'_, U>) {
        self(cx, value, out);
    }
}

pub(crate) struct StatelessNode<O, U> {
    pub(crate) op: O,
    pub(crate) down: Box<dyn Emit<U>>,
    pub(crate) failures: Option<Failures>,
    pub(crate) counts: OperatorCounts,
}

/// Records into and out of one operator instance, counted per record and handed to the
/// metrics once per epoch.
pub(crate) struct OperatorCounts {
    label: Arc<str>,
    topology: String,
    metrics: Metrics,
    records_in: u64,
    records_out: u64,
}

impl OperatorCounts {
    pub(crate) fn new(label: Arc<str>, cx: &InstanceCx) -> Self {
        Self {
            label,
            topology: cx.topology.clone(),
            metrics: cx.metrics.clone(),
            records_in: 0,
            records_out: 0,
        }
    }

    /// Adds an epoch's counts to the metrics of `shard`.
    pub(crate) fn report(&mut self, shard: &ShardId) {
        let io = (
            std::mem::take(&mut self.records_in),
            std::mem::take(&mut self.records_out),
        );
        self.metrics
            .operator(&self.topology, shard.as_str(), &self.label, io);
    }

    /// Forgets counts of records that will be processed again.
    pub(crate) fn discard(&mut self) {
        self.records_in = 0;
        self.records_out = 0;
    }
}

#[async_trait]
impl<T, U, O> Emit<T> for StatelessNode<O, U>
where
    T: Send + 'static,
    U: Send + 'static,
    O: Stateless<T, U>,
{
    fn emit(&mut self, cx: &RecordCx, value: T) {
        self.counts.records_in += 1;
        let mut out = Collector {
            down: &mut *self.down,
            failures: self.failures.as_ref(),
            emitted: &mut self.counts.records_out,
        };
        self.op.apply(cx, value, &mut out);
    }
    async fn flush(&mut self, epoch: &EpochCx) -> Result<(), Error> {
        // A replay only rebuilds state: its records were counted by the run that read them.
        if epoch.replay() {
            self.counts.discard();
        } else {
            self.counts.report(&epoch.shard);
        }
        self.down.flush(epoch).await
    }
    async fn commit(&mut self) -> Result<(), Error> {
        self.down.commit().await
    }
    fn discard(&mut self) {
        self.counts.discard();
        self.down.discard();
    }
    fn held(&self, out: &mut Vec<(ShardId, Held)>) {
        self.down.held(out);
    }
}

/// Capacity for the buffer that replaces one handed on with `len` items: the next epoch likely
/// holds about as many, and a little headroom saves regrowing (and copying) the whole buffer
/// when it holds a few more.
pub(crate) fn next_capacity(len: usize) -> usize {
    len + len / 4
}

/// Attempts of a retryable sink operation before the pipeline fails.
const SINK_ATTEMPTS: u32 = 6;
/// First wait between sink attempts; doubles with full jitter.
const SINK_BACKOFF: Duration = Duration::from_millis(50);

/// Feeds a sink writer: buffers an epoch's outputs, writes them on flush, commits on commit.
pub(crate) struct SinkEmitter<T> {
    pub(crate) sink: Arc<dyn Sink<T>>,
    pub(crate) cx: SinkContext,
    pub(crate) writer: Option<Box<dyn SinkWriter<T>>>,
    /// Outputs whose identity is known at emission (keyed results).
    pub(crate) ready: Vec<Output<T>>,
    /// Outputs of input records: (index in the epoch's batch, fanout, value); their positions
    /// are looked up when the epoch is flushed.
    pub(crate) of_records: Vec<(u32, u32, T)>,
    pub(crate) written: bool,
    /// What the writer's `bytes_written` was at the last commit.
    pub(crate) bytes_reported: u64,
    pub(crate) metrics: Metrics,
    /// Where outputs the sink refuses (`Sink::check`) send their input record, on a shard's
    /// own path.
    pub(crate) failures: Option<Failures>,
}

impl<T: Send + 'static> SinkEmitter<T> {
    pub(crate) fn new(sink: Arc<dyn Sink<T>>, cx: SinkContext, metrics: Metrics) -> Self {
        Self {
            sink,
            cx,
            writer: None,
            ready: Vec::new(),
            of_records: Vec::new(),
            written: false,
            bytes_reported: 0,
            metrics,
            failures: None,
        }
    }

    /// Dead-letters the input records of outputs the sink refuses.
    pub(crate) fn with_failures(mut self, failures: Option<Failures>) -> Self {
        self.failures = failures;
        self
    }

    async fn writer(&mut self) -> Result<&mut Box<dyn SinkWriter<T>>, Error> {
        if self.writer.is_none() {
            let sink = Arc::clone(&self.sink);
            let cx = self.cx.clone();
            let writer = with_retries(|| {
                let sink = Arc::clone(&sink);
                let cx = cx.clone();
                async move { sink.open(&cx).await }
            })
            .await?;
            self.writer = Some(writer);
        }
        Ok(self.writer.as_mut().expect("writer was just opened"))
    }
}

/// Runs a sink operation, retrying retryable errors with exponential backoff and full jitter.
pub(crate) async fn with_retries<R, F, Fut>(mut op: F) -> Result<R, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<R, SinkError>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Ok(r) => return Ok(r),
            Err(e) if e.retryable && attempt + 1 < SINK_ATTEMPTS => {
                let cap = SINK_BACKOFF.saturating_mul(1 << attempt);
                let wait = cap.mul_f64(rand::random::<f64>());
                tracing::warn!(sink = %e.sink, error = %e, ?wait, "sink operation failed, retrying");
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[async_trait]
impl<T: Send + 'static> Emit<T> for SinkEmitter<T> {
    fn emit(&mut self, cx: &RecordCx, value: T) {
        match &cx.ident {
            Ident::Record { index, fanout } => {
                if let Some(failures) = &self.failures {
                    if let Err(reason) = self.sink.check(&value) {
                        let stage = format!("sink {}", self.sink.name());
                        failures.fail(cx, &stage, &reason, 0, false);
                        return;
                    }
                }
                self.of_records.push((*index, *fanout, value));
            }
            Ident::Keyed { key, window } => self.ready.push(Output {
                id: OutputId::Keyed {
                    key: key.clone(),
                    window: *window,
                },
                value,
            }),
        }
    }

    async fn flush(&mut self, epoch: &EpochCx) -> Result<(), Error> {
        if epoch.replay() || (self.ready.is_empty() && self.of_records.is_empty()) {
            // Replayed outputs were committed by the run that first produced them.
            self.discard();
        } else {
            self.write(epoch).await?;
        }
        match epoch.control {
            Control::ShardEnd | Control::EndOfInput => {
                if let Some(writer) = self.writer.as_mut() {
                    writer.end_shard(&epoch.shard).await?;
                }
            }
            Control::Release => {
                if let Some(writer) = self.writer.as_mut() {
                    writer.release_shard(&epoch.shard);
                }
            }
            Control::Continue => {}
        }
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), Error> {
        if !self.written {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let writer = self
            .writer
            .as_mut()
            .expect("written implies an open writer");
        writer.commit().await.map_err(Error::from)?;
        self.metrics
            .sink_commit(&self.cx.topology, self.sink.name(), started.elapsed());
        let bytes = writer.bytes_written();
        self.metrics.sink_bytes(
            &self.cx.topology,
            self.sink.name(),
            bytes.saturating_sub(self.bytes_reported),
        );
        self.bytes_reported = bytes;
        // A writer holding outputs back gets commits even without new writes, so that it can
        // deliver them within its latency bound on a quiet shard.
        self.written = writer.held().iter().any(|(_, h)| h.buffered);
        Ok(())
    }

    fn discard(&mut self) {
        self.ready.clear();
        self.of_records.clear();
    }

    fn held(&self, out: &mut Vec<(ShardId, Held)>) {
        if let Some(writer) = &self.writer {
            out.extend(writer.held());
        }
    }
}

impl<T: Send + 'static> SinkEmitter<T> {
    /// Hands the epoch's outputs to the writer.
    async fn write(&mut self, epoch: &EpochCx) -> Result<(), Error> {
        let capacity = next_capacity(self.ready.len());
        let mut outputs = std::mem::replace(&mut self.ready, Vec::with_capacity(capacity));
        outputs.extend(
            self.of_records
                .drain(..)
                .map(|(index, fanout, value)| Output {
                    id: OutputId::Record {
                        position: epoch.raw.get(index as usize).position.clone(),
                        index: u64::from(fanout),
                    },
                    value,
                }),
        );
        self.metrics.sink_records(
            &self.cx.topology,
            epoch.shard.as_str(),
            self.sink.name(),
            outputs.len(),
        );
        let batch = OutputBatch {
            shard: epoch.shard.clone(),
            lease_epoch: epoch.lease_epoch,
            outputs,
        };
        // Writers take the batch by value and retry inside (they know which requests are safe
        // to repeat); an error here is final for this pipeline instance.
        self.writer().await?.write(batch).await?;
        self.written = true;
        Ok(())
    }
}
