//! One task per owned shard: read batches, cut them into epochs, push them through the fused
//! chain, write dead letters and shard-stage sinks, hand keyed records to the exchange.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::dead_letter::DeadLetterRecord;
use crate::error::Error;
use crate::exec::{Failures, SinkEmitter};
use crate::lease::{LeaseEpoch, ShardCheckpoint};
use crate::metrics::Metrics;
use crate::operator::{Control, Emit, EpochCx, Ident, Mode, RecordCx};
use crate::position::{EventTime, ShardId, ShardInfo, StartPosition};
use crate::protocol::checkpoint::{Epoch, EpochRead};
use crate::protocol::resume::{plan_resume, split_replay, ResumePlan};
use crate::random::Random;
use crate::record::RawBatch;
use crate::runtime::lease_guard::LeaseGuard;
use crate::runtime::{RunMode, RuntimeConfig};
use crate::sink::{Held, SinkContext};
use crate::source::{ShardReader, ShardStatus};
use crate::topology::{Exchanges, InstanceCx, ShardPipeline, Topology};
use crate::tracker::{Report, Tracker};

/// How a shard task ended.
#[derive(Debug)]
pub(crate) enum ShardOutcome {
    /// Read to the end (closed shard) or to the tip (bounded run); `last_epoch` is final.
    Finished { last_epoch: Epoch, shard_end: bool },
    /// Stopped on request (shutdown or lost lease) after `last_epoch`.
    Cancelled { last_epoch: Epoch },
    /// A sink refused a write as stale: a newer lease epoch owns the shard.
    Fenced,
}

/// The path number of the shard task itself (its sinks and dead letters).
pub(crate) const SHARD_PATH: usize = 0;

/// Longest wait between attempts to read a shard after retryable errors.
const MAX_READ_BACKOFF: Duration = Duration::from_secs(5);

pub(crate) struct ShardTask {
    pub(crate) shard: ShardInfo,
    pub(crate) resume: ShardCheckpoint,
    pub(crate) lease_epoch: LeaseEpoch,
    /// Checked before each batch goes on to the sinks: a worker paused past its lease waits
    /// for a renewal (and learns there whether the lease is still its own).
    pub(crate) lease_guard: LeaseGuard,
    pub(crate) topology: Arc<Topology>,
    pub(crate) config: Arc<RuntimeConfig>,
    pub(crate) tracker: Tracker,
    pub(crate) metrics: Metrics,
    pub(crate) exchanges: Exchanges,
    pub(crate) cancel: CancellationToken,
    /// Backoff jitter.
    pub(crate) random: Random,
}

struct Running {
    pipeline: Box<dyn ShardPipeline>,
    dead_letters: Option<SinkEmitter<DeadLetterRecord>>,
    failures: Failures,
    /// The shard's watermark after the last record processed (`protocol::watermark`).
    watermark: Option<EventTime>,
    epoch: Epoch,
}

impl Running {
    /// What the shard path's sinks and its dead-letter sink hold back.
    fn held(&self) -> Vec<(String, ShardId, Held)> {
        let mut held = self.pipeline.held();
        if let Some(dead) = &self.dead_letters {
            dead.held(&mut held);
        }
        held
    }
}

impl ShardTask {
    pub(crate) async fn run(self) -> Result<ShardOutcome, Error> {
        let id = self.shard.id.clone();
        let (start, mut replay_until) = match plan_resume(&self.resume, &self.topology.start) {
            ResumePlan::Finished => {
                return Ok(ShardOutcome::Finished {
                    last_epoch: 0,
                    shard_end: true,
                })
            }
            ResumePlan::Read {
                start,
                replay_until,
            } => (start, replay_until),
        };
        let instance = InstanceCx {
            topology: self.topology.name.clone(),
            instance: format!("shard-{id}"),
            failures: None,
            exchanges: Arc::clone(&self.exchanges),
            metrics: self.metrics.clone(),
            random: self.random.clone(),
            fanout_bits: self.topology.fanout_bits,
            resumed: Some(self.resume.clone()),
        };
        let failures = Failures::new(
            self.topology.dead_letter.clone(),
            self.topology.source.stream_name().to_owned(),
            id.clone(),
        );
        let instance = InstanceCx {
            failures: Some(Arc::new(failures.clone())),
            ..instance
        };
        let pipeline = self.topology.root.instantiate(&instance);
        let dead_letters = self.topology.dead_letter.sink().map(|sink| {
            let cx = SinkContext {
                topology: self.topology.name.clone(),
                instance: format!("dead-letters-{id}"),
            };
            // A dead-letter sink that holds record outputs resumes after its own last unit.
            let skip = sink.holds_record_outputs().then(|| {
                self.resume
                    .sinks
                    .get(sink.name())
                    .unwrap_or(&self.resume.committed)
                    .clone()
            });
            SinkEmitter::new(
                Arc::clone(sink),
                cx,
                self.metrics.clone(),
                self.random.clone(),
            )
            .skipping_through(skip)
        });
        let mut run = Running {
            pipeline,
            dead_letters,
            failures,
            watermark: self.resume.rebuild_watermark,
            epoch: 0,
        };

        let Some(mut reader) = self.open(start).await? else {
            return Ok(ShardOutcome::Cancelled { last_epoch: 0 });
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            let batch = tokio::select! {
                biased;
                () = self.cancel.cancelled() => return self.stop(&mut run).await,
                batch = reader.read() => batch,
            };
            let batch = match batch {
                Ok(batch) => {
                    backoff = Duration::from_millis(100);
                    batch
                }
                Err(e) if e.is_retryable() => {
                    tracing::warn!(shard = %id, error = %e, "read failed, backing off");
                    if self.pause(self.random.equal_jitter(backoff)).await {
                        return self.stop(&mut run).await;
                    }
                    backoff = (backoff * 2).min(MAX_READ_BACKOFF);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if !self.lease_guard.wait_valid(&self.cancel).await {
                return self.release(&mut run).await;
            }
            if let Some(behind) = batch.millis_behind_latest {
                self.metrics
                    .behind(&self.topology.name, id.as_str(), behind);
            }
            let empty = batch.records.is_empty();
            self.metrics.read(
                &self.topology.name,
                id.as_str(),
                batch.records.len(),
                batch.records.byte_len(),
            );
            let mut rest = batch.records;
            while !rest.is_empty() {
                let (part, replay) = match &replay_until {
                    Some(until) => {
                        let split = split_replay(&rest, until);
                        if split.done {
                            replay_until = None;
                        }
                        if split.replayed == 0 {
                            (std::mem::take(&mut rest), false)
                        } else {
                            let tail = rest.split_off(split.replayed);
                            (std::mem::replace(&mut rest, tail), true)
                        }
                    }
                    None => (std::mem::take(&mut rest), false),
                };
                let done = self.epoch(&mut run, part, replay, Control::Continue).await;
                if let Some(fenced) = self.fenced(&mut run, done).await? {
                    return Ok(fenced);
                }
            }
            match batch.status {
                ShardStatus::Ended => {
                    let done = self
                        .epoch(&mut run, RawBatch::default(), false, Control::ShardEnd)
                        .await;
                    if let Some(fenced) = self.fenced(&mut run, done).await? {
                        return Ok(fenced);
                    }
                    return Ok(ShardOutcome::Finished {
                        last_epoch: run.epoch,
                        shard_end: true,
                    });
                }
                ShardStatus::CaughtUp if self.config.mode == RunMode::UntilCaughtUp => {
                    let done = self
                        .epoch(&mut run, RawBatch::default(), false, Control::EndOfInput)
                        .await;
                    if let Some(fenced) = self.fenced(&mut run, done).await? {
                        return Ok(fenced);
                    }
                    return Ok(ShardOutcome::Finished {
                        last_epoch: run.epoch,
                        shard_end: false,
                    });
                }
                ShardStatus::CaughtUp if empty => {
                    let done = self.idle_commit(&mut run).await.map(|()| None);
                    if let Some(fenced) = self.fenced(&mut run, done).await? {
                        return Ok(fenced);
                    }
                    if self.pause(self.config.idle_wait).await {
                        return self.stop(&mut run).await;
                    }
                }
                ShardStatus::CaughtUp | ShardStatus::More => {}
            }
        }
    }

    /// Opens the reader, retrying retryable errors; `None` if cancelled meanwhile.
    async fn open(&self, start: StartPosition) -> Result<Option<Box<dyn ShardReader>>, Error> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let opened = self
                .topology
                .source
                .open_shard(&self.shard, start.clone(), self.config.read_limits)
                .await;
            match opened {
                Ok(reader) => return Ok(Some(reader)),
                Err(e) if e.is_retryable() => {
                    tracing::warn!(shard = %self.shard.id, error = %e, "opening shard failed, backing off");
                    if self.pause(self.random.equal_jitter(backoff)).await {
                        return Ok(None);
                    }
                    backoff = (backoff * 2).min(MAX_READ_BACKOFF);
                }
                Err(e) => return Err(Error::Source(e)),
            }
        }
    }

    /// Waits, or returns true at once if cancelled.
    async fn pause(&self, wait: Duration) -> bool {
        tokio::select! {
            biased;
            () = self.cancel.cancelled() => true,
            () = tokio::time::sleep(wait) => false,
        }
    }

    async fn epoch(
        &self,
        run: &mut Running,
        raw: RawBatch,
        replay: bool,
        control: Control,
    ) -> Result<Option<ShardOutcome>, Error> {
        let id = &self.shard.id;
        let raw = Arc::new(raw);
        run.epoch += 1;
        run.failures.begin_epoch(&raw, replay);
        let mut from = 0;
        loop {
            let processed = run.pipeline.process(&raw, from, &mut run.watermark);
            if let (Some(first), false) = (processed.first_untimely, replay) {
                let position = raw.get(first as usize).position;
                tracing::warn!(
                    shard = %id,
                    %position,
                    records = processed.untimely,
                    "event time invalid or beyond the maximum skew ahead of arrival: late for every window"
                );
                self.metrics
                    .untimely(&self.topology.name, id.as_str(), processed.untimely);
            }
            let Some(parked) = processed.parked_after else {
                break;
            };
            // A user function waits to be called again: wait on the runtime's clock, then
            // resume the chain where it stopped.
            while let Some(until) = run.failures.take_parked() {
                let cancelled = tokio::select! {
                    biased;
                    () = self.cancel.cancelled() => true,
                    () = tokio::time::sleep_until(until) => false,
                };
                if cancelled {
                    // The epoch never happened: the next owner (or run) reads it again.
                    run.pipeline.discard();
                    let _ = run.failures.end_epoch();
                    run.epoch -= 1;
                    return self.stop(run).await.map(Some);
                }
                run.pipeline.resume();
            }
            from = parked + 1;
        }
        let (dead, stop) = run.failures.end_epoch();
        if let Some(stopped) = stop {
            tracing::error!(shard = %id, error = %stopped, "stopping shard");
            run.pipeline.discard();
            run.epoch -= 1;
            self.release(run).await?;
            return Err(Error::ShardStopped(stopped));
        }
        let watermark = run.watermark;
        if let (Some(w), false) = (watermark, replay) {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            self.metrics
                .watermark(&self.topology.name, id.as_str(), w, now_ms);
        }
        let mode = if replay { Mode::Rebuild } else { Mode::Live };
        // Registered before anything is sent, so that reports always find their epoch.
        self.tracker.record_epoch(
            id,
            run.epoch,
            EpochRead {
                last: raw.last_position().cloned(),
                records: raw.len(),
                watermark,
                shard_end: control == Control::ShardEnd,
            },
        );
        let cx = EpochCx {
            shard: id.clone(),
            lease_epoch: self.lease_epoch,
            epoch: run.epoch,
            raw: Arc::clone(&raw),
            watermark,
            mode,
            control,
        };
        let n = dead.len();
        assert!(
            n == 0 || run.dead_letters.is_some(),
            "dead letters exist only with a sink"
        );
        if let (Some(emitter), true) = (
            run.dead_letters.as_mut(),
            n > 0 || control != Control::Continue,
        ) {
            for (index, letter) in dead {
                let rcx = RecordCx {
                    event_time: 0,
                    watermark: 0,
                    ident: Ident::Record { index, fanout: 0 },
                };
                emitter.emit(&rcx, letter);
            }
            emitter.flush(&cx).await?;
            // Committed before the epoch is reported: the checkpoint passes a dead-lettered
            // record only once its dead letter is durable.
            emitter.commit().await?;
            if n > 0 {
                self.metrics
                    .dead_lettered(&self.topology.name, id.as_str(), n);
            }
        }
        run.pipeline.flush(&cx).await?;
        run.pipeline.commit().await?;
        self.tracker.hold_back(id, run.epoch, &run.held());
        self.tracker.report(
            SHARD_PATH,
            &[Report {
                shard: id.clone(),
                lease_epoch: self.lease_epoch,
                epoch: run.epoch,
                hold: None,
            }],
        );
        Ok(None)
    }

    /// On a quiet shard, lets sinks that hold outputs back deliver them on their own clock.
    async fn idle_commit(&self, run: &mut Running) -> Result<(), Error> {
        if !run.held().iter().any(|(_, _, h)| h.buffered) {
            return Ok(());
        }
        run.pipeline.commit().await?;
        if let Some(dead) = run.dead_letters.as_mut() {
            dead.commit().await?;
        }
        self.tracker
            .hold_back(&self.shard.id, run.epoch, &run.held());
        Ok(())
    }

    /// Passes an epoch's result on, except a sink's fencing refusal: the lease moved on, so the
    /// shard stops like a lost lease (state dropped, nothing checkpointed) instead of failing
    /// the run.
    async fn fenced(
        &self,
        run: &mut Running,
        done: Result<Option<ShardOutcome>, Error>,
    ) -> Result<Option<ShardOutcome>, Error> {
        match done {
            Ok(ended) => Ok(ended),
            Err(Error::Sink(error)) if error.is_fenced() => {
                tracing::warn!(shard = %self.shard.id, %error, "fenced by a newer lease epoch; stopping the shard");
                self.release(run).await?;
                Ok(Some(ShardOutcome::Fenced))
            }
            Err(error) => Err(error),
        }
    }

    /// The task was asked to stop: if the lease is surely still this worker's, the keyed
    /// workers emit what their state owes (running results) and commit it before the final
    /// checkpoint (`Control::Stop`); otherwise the lease may have moved and they drop the
    /// shard without a word more (`Control::Release`): the next owner emits it.
    async fn stop(&self, run: &mut Running) -> Result<ShardOutcome, Error> {
        let control = if self.lease_guard.is_valid() {
            Control::Stop
        } else {
            Control::Release
        };
        self.end(run, control).await
    }

    /// Drops the shard's state without output (lease lost, fenced, stopped at a bad record).
    async fn release(&self, run: &mut Running) -> Result<ShardOutcome, Error> {
        self.end(run, Control::Release).await
    }

    /// Ends the shard's pipeline with `control` and returns `Cancelled`.
    async fn end(&self, run: &mut Running, control: Control) -> Result<ShardOutcome, Error> {
        let cx = EpochCx {
            shard: self.shard.id.clone(),
            lease_epoch: self.lease_epoch,
            epoch: run.epoch + 1,
            raw: Arc::default(),
            watermark: None,
            mode: Mode::Live,
            control,
        };
        run.pipeline.discard();
        run.pipeline.flush(&cx).await?;
        if let Some(dead) = run.dead_letters.as_mut() {
            dead.discard();
            dead.flush(&cx).await?;
        }
        Ok(ShardOutcome::Cancelled {
            last_epoch: run.epoch,
        })
    }
}
