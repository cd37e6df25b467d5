//! The sink end of a chain: buffers an epoch's outputs, hands them to the sink's writer on
//! flush, commits on commit, retrying retryable sink errors with backoff and jitter.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{Error, GuardExpired, SinkError};
use crate::lease::CheckpointPosition;
use crate::lease_guard::LeaseGuard;
use crate::metrics::Metrics;
use crate::operator::{Control, Emit, EpochCx, Ident, RecordCx, Refused, ReportFailure};
use crate::position::ShardId;
use crate::random::Random;
use crate::sink::{Held, Output, OutputBatch, OutputId, Sink, SinkContext, SinkWriter};

use super::chain::next_capacity;
use super::holding;

/// Attempts of a retryable sink operation before the pipeline fails.
const SINK_ATTEMPTS: u32 = 6;
/// First wait between sink attempts; doubles with full jitter.
const SINK_BACKOFF: Duration = Duration::from_millis(50);

/// A refused output's identity as known when it is emitted: a late record's position is
/// looked up at the flush.
enum RefusedId {
    Keyed(OutputId),
    Record(u32, u64),
}

/// Feeds a sink writer: buffers an epoch's outputs, writes them on flush, commits on commit.
pub(crate) struct SinkEmitter<T> {
    pub(crate) sink: Arc<dyn Sink<T>>,
    pub(crate) cx: SinkContext,
    pub(crate) writer: Option<Box<dyn SinkWriter<T>>>,
    /// Outputs whose identity is known at emission (keyed results).
    pub(crate) ready: Vec<Output<T>>,
    /// Outputs of input records: (index in the epoch's batch, fanout, value); their positions
    /// are looked up when the epoch is flushed.
    pub(crate) of_records: Vec<(u32, u64, T)>,
    pub(crate) written: bool,
    /// What the writer's `bytes_written` was at the last commit.
    pub(crate) bytes_reported: u64,
    pub(crate) metrics: Metrics,
    /// Where outputs the sink refuses (`Sink::check`) send their input record, on a shard's
    /// own path.
    pub(crate) failures: Option<Arc<dyn ReportFailure>>,
    /// Backoff jitter.
    pub(crate) random: Random,
    /// For a sink that holds record outputs, on a shard's own path: outputs of records up to
    /// here are in units it stored, whether the epoch is a replay or not.
    pub(crate) skip_through: Option<CheckpointPosition>,
    /// Whether what the writer holds back reaches a shard's checkpoint: on a shard's own
    /// path. After `key_by` nothing tracks it, and a writer that holds anything is refused.
    pub(crate) holds_tracked: bool,
    /// On a shard's own path, the shard's lease guard: the writer is called only while it
    /// holds (another sink's commit before this one may have stalled past the lease).
    pub(crate) guard: Option<(ShardId, LeaseGuard)>,
    /// After `key_by`: the results the sink refused since the last flush (their identities,
    /// a late record's by its index in the epoch), and the refusals of live epochs flushed
    /// since the keyed worker last took them.
    refused_now: Vec<(RefusedId, String, Option<u64>)>,
    refused: Vec<Refused>,
}

impl<T: Send + 'static> SinkEmitter<T> {
    pub(crate) fn new(
        sink: Arc<dyn Sink<T>>,
        cx: SinkContext,
        metrics: Metrics,
        random: Random,
    ) -> Self {
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
            random,
            skip_through: None,
            holds_tracked: false,
            guard: None,
            refused_now: Vec::new(),
            refused: Vec::new(),
        }
    }

    /// On a shard's own path, where what the writer holds back reaches the shard's
    /// checkpoint: writes only outputs of records after `skip_through` (a holding sink
    /// resuming after its last stored unit).
    pub(crate) fn on_shard_path(
        mut self,
        skip_through: Option<CheckpointPosition>,
        guard: Option<(ShardId, LeaseGuard)>,
    ) -> Self {
        self.skip_through = skip_through;
        self.holds_tracked = true;
        self.guard = guard;
        self
    }

    /// Refuses to call the writer once the shard's lease guard ran out (on a shard's own path
    /// the writer holds outputs of that shard only).
    fn check_guard(&self, operation: &'static str) -> Result<(), Error> {
        if cfg!(shardflow_mutation = "skip_sink_guard") {
            // A mutation check: a shard's sinks are called whatever its guard says.
            return Ok(());
        }
        match &self.guard {
            Some((shard, guard)) if !guard.is_valid() => Err(Error::Sink(SinkError {
                sink: self.sink.name().to_owned(),
                operation,
                retryable: false,
                source: Box::new(GuardExpired {
                    shard: shard.clone(),
                    sink: self.sink.name().to_owned(),
                }),
            })),
            _ => Ok(()),
        }
    }

    /// Dead-letters the input records of outputs the sink refuses.
    pub(crate) fn with_failures(mut self, failures: Option<Arc<dyn ReportFailure>>) -> Self {
        self.failures = failures;
        self
    }

    async fn writer(&mut self) -> Result<&mut Box<dyn SinkWriter<T>>, Error> {
        if self.writer.is_none() {
            let sink = Arc::clone(&self.sink);
            let cx = self.cx.clone();
            let writer = with_retries(&self.random, || {
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
pub(crate) async fn with_retries<R, F, Fut>(random: &Random, mut op: F) -> Result<R, Error>
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
                let wait = random.full_jitter(cap);
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
                } else if self.refuses(&value, || RefusedId::Record(*index, *fanout)) {
                    // A late record on a keyed path's side output: refused like a keyed result.
                    return;
                }
                self.of_records.push((*index, *fanout, value));
            }
            Ident::Keyed {
                key,
                window,
                fanout,
            } => {
                let id = OutputId::Keyed {
                    key: key.clone(),
                    window: *window,
                    index: *fanout,
                };
                if self.failures.is_some() || !self.refuses(&value, || RefusedId::Keyed(id.clone()))
                {
                    self.ready.push(Output { id, value });
                }
            }
        }
    }

    async fn flush(&mut self, epoch: &EpochCx) -> Result<(), Error> {
        // A replayed epoch's results were committed (or dead-lettered) by the run that first
        // made them, and are dropped below: a refusal of one is not reported again.
        let refused = std::mem::take(&mut self.refused_now);
        if !epoch.replay() {
            let sink = self.sink.name();
            self.refused
                .extend(refused.into_iter().map(|(id, reason, size)| Refused {
                    shard: epoch.shard.clone(),
                    lease_epoch: epoch.lease_epoch,
                    sink: sink.to_owned(),
                    identity: match id {
                        RefusedId::Keyed(id) => id,
                        RefusedId::Record(index, fanout) => OutputId::Record {
                            position: epoch.raw.get(index as usize).position.clone(),
                            index: fanout,
                        },
                    },
                    reason,
                    size,
                }));
        }
        if let Some(skip) = &self.skip_through {
            // Stored units end at its own position, not at the shard's: what is after it is
            // new to it, replayed or not.
            self.of_records.retain(|(index, _, _)| {
                let position = epoch.raw.get(*index as usize).position;
                !CheckpointPosition::At(position.clone()).le(skip)
            });
            if epoch.replay() {
                self.ready.clear();
            }
        } else if epoch.replay() && !cfg!(shardflow_mutation = "live_replay") {
            // Replayed outputs were committed by the run that first produced them (a
            // mutation check, live_replay, writes them again).
            self.discard();
        }
        if !self.ready.is_empty() || !self.of_records.is_empty() {
            self.write(epoch).await?;
        }
        match epoch.control {
            Control::ShardEnd | Control::EndOfInput => {
                if self.writer.is_some() {
                    self.check_guard("end shard")?;
                }
                if let Some(writer) = self.writer.as_mut() {
                    writer.end_shard(&epoch.shard).await?;
                    let after = holding::After::EndShard(&epoch.shard);
                    holding::check(&*self.sink, &**writer, self.holds_tracked, after)?;
                }
            }
            // On a shard's own path a stop drops what a holding writer buffers (the
            // checkpoint never covers it); after `key_by` a stop's outputs are what the state
            // owes, committed before the final checkpoint.
            Control::Release | Control::Stop => {
                let release = epoch.control == Control::Release || self.holds_tracked;
                if let Some(writer) = self.writer.as_mut().filter(|_| release) {
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
        self.check_guard("commit")?;
        let started = std::time::Instant::now();
        let writer = self
            .writer
            .as_mut()
            .expect("written implies an open writer");
        if let Err(error) = writer.commit().await {
            if !error.is_fenced() {
                // Failed after the writer's own retries: whatever it still holds belongs to
                // lives that end now (`protocol::sink_failure`); the next write opens a new
                // writer.
                self.writer = None;
                self.written = false;
            }
            return Err(error.into());
        }
        self.metrics
            .sink_commit(&self.cx.topology, self.sink.name(), started.elapsed());
        let bytes = writer.bytes_written();
        self.metrics.sink_bytes(
            &self.cx.topology,
            self.sink.name(),
            bytes.saturating_sub(self.bytes_reported),
        );
        self.bytes_reported = bytes;
        holding::check(
            &*self.sink,
            &**writer,
            self.holds_tracked,
            holding::After::Commit,
        )?;
        // A writer holding outputs back gets commits even without new writes, so that it can
        // deliver them within its latency bound on a quiet shard.
        self.written = writer.held().iter().any(|(_, h)| h.buffered);
        Ok(())
    }

    fn discard(&mut self) {
        self.ready.clear();
        self.of_records.clear();
        self.refused_now.clear();
    }

    fn take_refused(&mut self, out: &mut Vec<Refused>) {
        out.append(&mut self.refused);
    }

    fn held(&self, out: &mut Vec<(String, ShardId, Held)>) {
        if let Some(writer) = &self.writer {
            let name = self.sink.name();
            out.extend(
                writer
                    .held()
                    .into_iter()
                    .map(|(shard, held)| (name.to_owned(), shard, held)),
            );
        }
    }
}

impl<T: Send + 'static> SinkEmitter<T> {
    /// Whether the sink refuses a keyed result (noted for the flush, which knows its shard).
    fn refuses(&mut self, value: &T, id: impl FnOnce() -> RefusedId) -> bool {
        match self.sink.check(value) {
            Ok(()) => false,
            Err(reason) => {
                let size = self.sink.size_of(value);
                self.refused_now.push((id(), reason, size));
                true
            }
        }
    }

    /// Hands the epoch's outputs to the writer.
    async fn write(&mut self, epoch: &EpochCx) -> Result<(), Error> {
        let of_records = !self.of_records.is_empty();
        let capacity = next_capacity(self.ready.len());
        let mut outputs = std::mem::replace(&mut self.ready, Vec::with_capacity(capacity));
        outputs.extend(
            self.of_records
                .drain(..)
                .map(|(index, fanout, value)| Output {
                    id: OutputId::Record {
                        position: epoch.raw.get(index as usize).position.clone(),
                        index: fanout,
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
        let (sink, tracked) = (Arc::clone(&self.sink), self.holds_tracked);
        self.check_guard("write")?;
        let writer = self.writer().await?;
        writer.write(batch).await?;
        let records_of = of_records.then_some(&epoch.shard);
        holding::check(
            &*sink,
            &**writer,
            tracked,
            holding::After::Write { records_of },
        )?;
        self.written = true;
        Ok(())
    }
}
