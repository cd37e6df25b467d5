//! One task per owned shard: read batches, cut them into epochs, push them through the fused
//! chain, write dead letters and shard-stage sinks, hand keyed records to the exchange.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::clock::WallClock;
use crate::dead_letter::DeadLetterRecord;
use crate::error::{Error, ShardStopped};
use crate::exec::{Failures, SinkEmitter};
use crate::lease::{CheckpointPosition, LeaseEpoch, ShardCheckpoint, WatermarkAdvance};
use crate::lease_guard::LeaseGuard;
use crate::metrics::Metrics;
use crate::operator::{Control, Emit, EpochCx, Ident, Mode, RecordCx, Restore, StateOrder};
use crate::payload_store::payload_name;
use crate::position::{EventTime, RecordPosition, ShardId, ShardInfo, StartPosition};
use crate::protocol::checkpoint::{Epoch, EpochRead};
use crate::protocol::lease_keys::StreamScope;
use crate::protocol::resume::{next_epoch_len, plan_resume, ResumePlan};
use crate::random::Random;
use crate::record::RawBatch;
use crate::runtime::decisions::DecisionLog;
use crate::runtime::leases::LeaseManager;
use crate::runtime::{RunMode, RuntimeConfig};
use crate::sink::{Held, SinkContext};
use crate::source::{ShardReader, ShardStatus};
use crate::state_store::shard_prefix;
use crate::topology::{Exchanges, InstanceCx, Quarantined, ShardPipeline, Topology};
use crate::tracker::{Report, Tracker};

/// How a shard task ended.
#[derive(Debug)]
pub(crate) enum ShardOutcome {
    /// Read to the end (closed shard) or to the tip (bounded run); `last_epoch` is final.
    Finished { last_epoch: Epoch, shard_end: bool },
    /// Stopped on request (shutdown or lost lease) after `last_epoch`.
    Cancelled { last_epoch: Epoch, released: bool },
    /// A sink refused a write as stale: a newer lease epoch owns the shard.
    Fenced,
    /// A sink or the dead-letter sink failed after its own retries: the shard's state is
    /// dropped and nothing more of this life is written; the control loop backs off.
    SinkFailed(crate::error::SinkError),
}

/// Why an epoch's dead letters could not be made ready for the dead-letter sink.
enum Fit {
    /// The sink refuses a letter even without its payload: the shard stops at its record.
    Refused(ShardStopped),
    /// The overflow store failed to store a payload: the shard backs off like on any sink
    /// failure, and the epoch is read again.
    Overflow(crate::error::SinkError),
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
    /// The wall clock idle advances read.
    pub(crate) clock: WallClock,
    /// Where idle advances are written before they are made.
    pub(crate) leases: Arc<LeaseManager>,
    pub(crate) lease_key: String,
    pub(crate) decisions: DecisionLog,
    /// Records a keyed operator panicked on in an earlier life (`InstanceCx::quarantined`).
    pub(crate) quarantined: Quarantined,
}

struct Running {
    pipeline: Box<dyn ShardPipeline>,
    dead_letters: Option<SinkEmitter<DeadLetterRecord>>,
    failures: Failures,
    /// The shard's watermark after the last record processed (`protocol::watermark`).
    watermark: Option<EventTime>,
    epoch: Epoch,
    /// Where reading is: the last record processed (at first, where reading resumed).
    position: CheckpointPosition,
    /// The last record of the replay, while replaying.
    replay_until: Option<RecordPosition>,
    /// Watermark advances an earlier run decided, still to be made again after their records.
    advances: VecDeque<WatermarkAdvance>,
    /// Since when the shard read nothing and its watermark did not advance.
    quiet_since: tokio::time::Instant,
    /// An idle advance decided at the current record and recorded in the tracker, not yet
    /// written to the lease and made.
    pending_advance: Option<WatermarkAdvance>,
    /// The snapshot the keyed workers restore at the first epoch, until it is sent.
    restore: Option<Arc<Restore>>,
    /// Where this shard's snapshot parts go and how often, if the topology takes snapshots.
    snapshots: Option<(Arc<str>, Duration)>,
    /// When the last snapshot was ordered (at first, when the life started).
    last_snapshot: tokio::time::Instant,
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
        let (start, replay_until, advances) = match plan_resume(&self.resume, &self.topology.start)
        {
            ResumePlan::Finished => {
                return Ok(ShardOutcome::Finished {
                    last_epoch: 0,
                    shard_end: true,
                })
            }
            ResumePlan::Read {
                start,
                replay_until,
                advances,
            } => (start, replay_until, advances),
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
            guard: Some((id.clone(), self.lease_guard.clone())),
            quarantined: Arc::clone(&self.quarantined),
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
            .on_shard_path(skip, Some((id.clone(), self.lease_guard.clone())))
        });
        let mut run = Running {
            pipeline,
            dead_letters,
            failures,
            watermark: self.resume.rebuild_watermark,
            epoch: 0,
            position: self.resume.rebuild_from.clone(),
            replay_until,
            advances: advances.into(),
            quiet_since: tokio::time::Instant::now(),
            pending_advance: None,
            restore: self.resume.snapshot.clone().map(|snapshot| {
                let after = match &self.resume.rebuild_from {
                    CheckpointPosition::At(p) => Some(p.clone()),
                    _ => None,
                };
                Arc::new(Restore { snapshot, after })
            }),
            snapshots: self
                .topology
                .state
                .snapshots()
                .filter(|_| !self.topology.keyed.is_empty())
                .map(|(_, every)| {
                    (
                        shard_prefix(&self.topology.name, &self.lease_key).into(),
                        every,
                    )
                }),
            last_snapshot: tokio::time::Instant::now(),
        };
        if let Some(stopped) = self.snapshot_misfit() {
            tracing::error!(shard = %id, error = %stopped, "stopping shard");
            self.release(&mut run).await?;
            return Err(Error::ShardStopped(stopped));
        }
        if let Some(ended) = self.make_recorded_advances(&mut run).await? {
            return Ok(ended);
        }

        let Some(mut reader) = self.open(start).await? else {
            return Ok(ShardOutcome::Cancelled {
                last_epoch: 0,
                released: false,
            });
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
            if !empty {
                run.quiet_since = tokio::time::Instant::now();
                // An advance decided at the last record goes before the records after it.
                let done = self.make_pending_advance(&mut run, true).await;
                if let Some(ended) = self.fenced(&mut run, done).await? {
                    return Ok(ended);
                }
            }
            let mut rest = batch.records;
            while !rest.is_empty() {
                if run
                    .replay_until
                    .as_ref()
                    .is_some_and(|u| rest.first_position().is_some_and(|f| f > u))
                {
                    run.replay_until = None;
                }
                // An epoch ends at the replay's end and at each recorded advance.
                let next_advance = run.advances.front().and_then(|a| match &a.after {
                    CheckpointPosition::At(p) => Some(p.clone()),
                    _ => None,
                });
                let take =
                    next_epoch_len(&rest, run.replay_until.iter().chain(next_advance.as_ref()));
                let part = if take == rest.len() {
                    std::mem::take(&mut rest)
                } else {
                    let tail = rest.split_off(take);
                    std::mem::replace(&mut rest, tail)
                };
                let last = part.last_position().cloned().expect("a part has records");
                let replay = run.replay_until.as_ref().is_some_and(|u| last <= *u);
                let ends_replay = run.replay_until.as_ref().is_some_and(|u| last >= *u);
                let done = self
                    .epoch(&mut run, part, replay, Control::Continue, None)
                    .await;
                if let Some(ended) = self.fenced(&mut run, done).await? {
                    // Ended in the middle of the epoch (a stop while a retry waited): where
                    // reading is and whether the replay is over stay as before it.
                    return Ok(ended);
                }
                // Only once the epoch is done: a stop during it must still see the replay.
                if ends_replay {
                    run.replay_until = None;
                }
                run.position = CheckpointPosition::At(last);
                if let Some(ended) = self.make_recorded_advances(&mut run).await? {
                    return Ok(ended);
                }
            }
            match batch.status {
                ShardStatus::Ended => {
                    let done = self
                        .epoch(
                            &mut run,
                            RawBatch::default(),
                            false,
                            Control::ShardEnd,
                            None,
                        )
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
                        .epoch(
                            &mut run,
                            RawBatch::default(),
                            false,
                            Control::EndOfInput,
                            None,
                        )
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
                    let done = self.idle_advance(&mut run).await;
                    if let Some(ended) = self.fenced(&mut run, done).await? {
                        return Ok(ended);
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
        advance: Option<EventTime>,
    ) -> Result<Option<ShardOutcome>, Error> {
        let id = &self.shard.id;
        let raw = Arc::new(raw);
        if let Some(w) = advance {
            run.watermark = Some(run.watermark.map_or(w, |old| old.max(w)));
        }
        run.epoch += 1;
        run.failures.begin_epoch(&raw, replay);
        let mut from = 0;
        let mut waited = false;
        loop {
            let processed = run.pipeline.process(&raw, from, &mut run.watermark);
            if let (Some(first), false) = (processed.first_untimely, replay) {
                let position = raw.get(first as usize).position;
                tracing::warn!(
                    shard = %id,
                    %position,
                    records = processed.untimely,
                    "event time beyond the maximum skew ahead of arrival: late for every window"
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
                waited = true;
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
        // Retries may have waited past the lease: as before a batch, the epoch goes on to the
        // sinks only while the lease is surely this worker's.
        if waited && !self.lease_guard.wait_valid(&self.cancel).await {
            run.pipeline.discard();
            let _ = run.failures.end_epoch();
            run.epoch -= 1;
            return self.stop(run).await.map(Some);
        }
        let (dead, mut stop) = run.failures.end_epoch();
        let dead = match self.fit_dead_letters(dead, replay).await {
            Ok(dead) => dead,
            Err(Fit::Refused(refused)) => {
                stop.get_or_insert(refused);
                Vec::new()
            }
            Err(Fit::Overflow(error)) => {
                // Nothing of the epoch was sent: it is read again after the sink backoff.
                run.pipeline.discard();
                run.epoch -= 1;
                return Err(Error::Sink(error));
            }
        };
        if let Some(stopped) = stop {
            tracing::error!(shard = %id, error = %stopped, "stopping shard");
            run.pipeline.discard();
            run.epoch -= 1;
            self.release(run).await?;
            return Err(Error::ShardStopped(stopped));
        }
        let watermark = run.watermark;
        if let (Some(w), false) = (watermark, replay) {
            let now_ms = self.clock.now_ms();
            self.metrics
                .watermark(&self.topology.name, id.as_str(), w, now_ms);
        }
        let mode = if replay { Mode::Rebuild } else { Mode::Live };
        // Registered before anything is sent, so that reports always find their epoch.
        let tracked = self.tracker.record_epoch(
            id,
            run.epoch,
            EpochRead {
                last: raw.last_position().cloned(),
                records: raw.len(),
                watermark,
                shard_end: control == Control::ShardEnd,
            },
        );
        self.decisions.observe_tracked_epochs(tracked);
        let state = Self::state_order(run, replay, control);
        let cx = EpochCx {
            shard: id.clone(),
            lease_epoch: self.lease_epoch,
            epoch: run.epoch,
            raw: Arc::clone(&raw),
            watermark,
            mode,
            control,
            state,
        };
        let n = dead.len();
        assert!(
            n == 0 || run.dead_letters.is_some(),
            "dead letters exist only with a sink"
        );
        if let Some(emitter) = run.dead_letters.as_mut() {
            // A replay dead-letters its records again: the emitter drops what the run that
            // committed them wrote (all of it, or, for a sink gathering units, what its last
            // stored unit holds).
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
            // record only once its dead letter is durable. Every epoch, so that a sink holding
            // letters back delivers them on its own clock (a no-op for one holding nothing).
            emitter.commit().await?;
            if n > 0 && !replay {
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
                part: None,
            }],
        );
        Ok(None)
    }

    /// What the keyed workers do with the shard's state at the epoch being sent: restore the
    /// resumed snapshot at the first, take a snapshot after a live epoch once `every` passed
    /// since the last (never after a replayed one: the resumed checkpoint already covers it).
    fn state_order(run: &mut Running, replay: bool, control: Control) -> StateOrder {
        if let Some(snapshot) = run.restore.take() {
            return StateOrder::Restore(snapshot);
        }
        match &run.snapshots {
            Some((prefix, every))
                if !replay
                    && control == Control::Continue
                    && run.last_snapshot.elapsed() >= *every =>
            {
                run.last_snapshot = tokio::time::Instant::now();
                StateOrder::Take(Arc::clone(prefix))
            }
            _ => StateOrder::Keep,
        }
    }

    /// Why the snapshot the shard resumes from does not fit the topology, if it does not: it
    /// holds state of an operator the topology no longer has (a keyed operator the topology
    /// has and the snapshot lacks is found by its workers). Restoring part of the state and
    /// replaying only after the snapshot would emit wrong results: the shard stops instead.
    fn snapshot_misfit(&self) -> Option<ShardStopped> {
        let snapshot = self.resume.snapshot.as_ref()?;
        if snapshot.position != self.resume.rebuild_from
            || snapshot.watermark != self.resume.rebuild_watermark
        {
            // A checkpoint written by a version that does not know snapshots keeps the
            // attribute it does not know: restoring it and replaying from another point would
            // count records twice, or miss some.
            return Some(ShardStopped::KeyedPath {
                shard: self.shard.id.clone(),
                reason: format!(
                    "the checkpoint names a snapshot of keyed state taken at {:?}, but rebuilds \
                     from {:?} (written by a shardflow that does not know snapshots?): reset \
                     the shard's checkpoint",
                    snapshot.position, self.resume.rebuild_from
                ),
            });
        }
        let labels: Vec<Arc<str>> = self.topology.keyed.iter().map(|b| b.label()).collect();
        let stray = snapshot
            .parts
            .iter()
            .find(|p| !labels.iter().any(|l| **l == *p.operator))?;
        Some(ShardStopped::KeyedPath {
            shard: self.shard.id.clone(),
            reason: format!(
                "the snapshot the checkpoint names holds state of operator {:?}, which the \
                 topology does not have: restore the topology's operator (with its name), or \
                 reset the shard's checkpoint",
                stray.operator
            ),
        })
    }

    /// The epoch's dead letters as the dead-letter sink accepts them (`Sink::check`): whole, or
    /// truncated with the payload's size and digest. A letter the sink refuses even without its
    /// payload stops the shard at its record: nothing is skipped.
    async fn fit_dead_letters(
        &self,
        dead: Vec<(u32, DeadLetterRecord)>,
        replay: bool,
    ) -> Result<Vec<(u32, DeadLetterRecord)>, Fit> {
        let Some(sink) = self.topology.dead_letter.sink() else {
            return Ok(dead);
        };
        let overflow = self.topology.dead_letter.overflow();
        let mut fitted = Vec::with_capacity(dead.len());
        for (index, mut letter) in dead {
            let position = letter.position.clone();
            let size = letter.size;
            if let (Some(store), Err(_)) = (overflow, sink.check(&letter)) {
                // Stored whole before its letter is written, in a replay too (the same bytes
                // under the same name): a holding sink may write a replayed letter again, and
                // it must never name an object that is not there.
                let created_secs = self.leases.scope().map_or(0, StreamScope::created_secs);
                let name = payload_name(
                    &self.topology.name,
                    &letter.stream,
                    created_secs,
                    &letter.shard,
                    &position,
                );
                store
                    .put(&name, &letter.data)
                    .await
                    .map_err(Fit::Overflow)?;
                if !replay {
                    tracing::warn!(shard = %self.shard.id, %position, size, store = store.name(), "dead letter too large for its sink: payload stored whole in the overflow store");
                }
                letter.stored_at = Some(store.location(&name));
            }
            match letter.fit(|l| sink.check(l)) {
                Ok(letter) => {
                    if letter.truncated && !replay {
                        tracing::warn!(shard = %self.shard.id, %position, size, kept = letter.data.len(), sink = sink.name(), stored = letter.stored_at.is_some(), "dead letter too large for its sink: payload truncated, size and digest kept");
                        self.metrics
                            .dead_letter_truncated(&self.topology.name, self.shard.id.as_str());
                    }
                    fitted.push((index, letter));
                }
                Err(reason) => {
                    return Err(Fit::Refused(ShardStopped::BadRecord {
                        shard: self.shard.id.clone(),
                        position,
                        reason: format!(
                            "dead-letter sink {} refuses the record's dead letter: {reason}",
                            sink.name()
                        ),
                    }))
                }
            }
        }
        Ok(fitted)
    }

    /// Makes again the watermark advances an earlier run decided after the records read so
    /// far, each as an epoch of its own (a replayed one if the run committed past it).
    async fn make_recorded_advances(
        &self,
        run: &mut Running,
    ) -> Result<Option<ShardOutcome>, Error> {
        while run
            .advances
            .front()
            .is_some_and(|a| a.after.le(&run.position))
        {
            let advance = run.advances.pop_front().expect("front exists");
            if cfg!(shardflow_mutation = "forget_advances") {
                // A mutation check: a replay asks the clock again instead.
                continue;
            }
            run.quiet_since = tokio::time::Instant::now();
            for (replay, watermark) in replayed_advance(&advance, &self.resume) {
                let done = self
                    .epoch(
                        run,
                        RawBatch::default(),
                        replay,
                        Control::Continue,
                        Some(watermark),
                    )
                    .await;
                if let Some(ended) = self.fenced(run, done).await? {
                    return Ok(Some(ended));
                }
            }
        }
        Ok(None)
    }

    /// A shard at its tip that read nothing for the idleness timeout advances its watermark
    /// on the clock (`protocol::watermark`): the advance is written to the lease first, then
    /// made as an epoch of its own, which fires what it completes.
    async fn idle_advance(&self, run: &mut Running) -> Result<Option<ShardOutcome>, Error> {
        if run.replay_until.is_some() || !run.advances.is_empty() {
            return Ok(None);
        }
        if run.pending_advance.is_none() {
            let rules = run.pipeline.rules();
            let quiet = run.quiet_since.elapsed();
            let Some(watermark) = rules.idle_advance(run.watermark, self.clock.now_ms(), quiet)
            else {
                return Ok(None);
            };
            let advance = WatermarkAdvance {
                after: run.position.clone(),
                watermark,
            };
            if !self.tracker.record_advance(&self.shard.id, advance.clone()) {
                tracing::warn!(shard = %self.shard.id, "too many idle advances since the rebuild point; waiting for records");
                run.quiet_since = tokio::time::Instant::now();
                return Ok(None);
            }
            // From here the advance may become durable with any checkpoint this worker writes:
            // it is made before any later record.
            run.pending_advance = Some(advance);
        }
        self.make_pending_advance(run, false).await
    }

    /// Writes the advance decided at this record to the lease and makes it. If the write fails
    /// retryably, it is tried again at the next quiet tick, or at once (`persist`) when records
    /// wait behind it.
    async fn make_pending_advance(
        &self,
        run: &mut Running,
        persist: bool,
    ) -> Result<Option<ShardOutcome>, Error> {
        let Some(advance) = run.pending_advance.clone() else {
            return Ok(None);
        };
        let id = &self.shard.id;
        let mut backoff = Duration::from_millis(100);
        loop {
            let decide = || self.tracker.with_advances(id);
            match self.leases.checkpoint_with(&self.lease_key, decide).await {
                Ok(Some(_)) => break,
                Ok(None) => return Ok(None),
                Err(error) if error.is_retryable() => {
                    tracing::warn!(shard = %id, %error, "idle watermark advance not recorded yet; retrying");
                    if !persist {
                        return Ok(None);
                    }
                    if self.pause(self.random.equal_jitter(backoff)).await {
                        return self.stop(run).await.map(Some);
                    }
                    backoff = (backoff * 2).min(MAX_READ_BACKOFF);
                }
                Err(error) => {
                    tracing::warn!(shard = %id, %error, "lease lost (recording an idle advance)");
                    return self.release(run).await.map(Some);
                }
            }
        }
        run.pending_advance = None;
        self.decisions.record(|| {
            format!(
                "shard {id} idle: watermark {} after {:?}",
                advance.watermark, advance.after
            )
        });
        run.quiet_since = tokio::time::Instant::now();
        self.epoch(
            run,
            RawBatch::default(),
            false,
            Control::Continue,
            Some(advance.watermark),
        )
        .await
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

    /// Passes an epoch's result on, except a sink's error: a fencing refusal (the lease moved
    /// on) stops the shard like a lost lease, any other sink error after the sink's retries
    /// ends it for a backoff; either way its state is dropped and nothing checkpointed, and the
    /// run goes on.
    async fn fenced(
        &self,
        run: &mut Running,
        done: Result<Option<ShardOutcome>, Error>,
    ) -> Result<Option<ShardOutcome>, Error> {
        match done {
            Ok(ended) => Ok(ended),
            Err(Error::Sink(error)) if error.is_fenced() || error.is_guard_expired() => {
                tracing::warn!(shard = %self.shard.id, %error, "fenced by a newer lease epoch, or the lease guard ran out on the way to a sink; stopping the shard");
                self.release(run).await?;
                Ok(Some(ShardOutcome::Fenced))
            }
            Err(Error::Sink(error)) if error.is_failed_store() => {
                tracing::warn!(shard = %self.shard.id, %error, "a sink failed after its retries; dropping the shard's state to start again from its checkpoint after a pause");
                // Dropping writes nothing, but a writer may still be asked to let the shard go.
                if let Err(release) = self.release(run).await {
                    tracing::warn!(shard = %self.shard.id, error = %release, "releasing the shard's writers failed too");
                }
                Ok(Some(ShardOutcome::SinkFailed(error)))
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
        // Stopped in the middle of a replay, the state is not yet what the resumed checkpoint
        // covers: what it owes was emitted by the run that committed it, and its partial
        // values must not overwrite that.
        let mode = if run.replay_until.is_some() {
            Mode::Rebuild
        } else {
            Mode::Live
        };
        let cx = EpochCx {
            shard: self.shard.id.clone(),
            lease_epoch: self.lease_epoch,
            epoch: run.epoch + 1,
            raw: Arc::default(),
            watermark: None,
            mode,
            control,
            state: StateOrder::Keep,
        };
        run.pipeline.discard();
        run.pipeline.flush(&cx).await?;
        if let Some(dead) = run.dead_letters.as_mut() {
            dead.discard();
            dead.flush(&cx).await?;
        }
        Ok(ShardOutcome::Cancelled {
            last_epoch: run.epoch,
            released: control == Control::Release,
        })
    }
}

/// The epochs that make a recorded watermark advance again, as (replay, watermark): what the
/// resumed checkpoint committed of it is replayed (its outputs dropped), the rest is live. An
/// advance before the committed record was committed whole, one after it not at all; at the
/// committed record itself, up to the committed watermark (later advances at one record are
/// kept as one, so part of it may have been committed).
fn replayed_advance(
    advance: &WatermarkAdvance,
    resumed: &ShardCheckpoint,
) -> Vec<(bool, EventTime)> {
    let committed = &resumed.committed;
    if advance.after != *committed {
        return vec![(advance.after.le(committed), advance.watermark)];
    }
    match resumed.committed_watermark {
        Some(c) if c >= advance.watermark => vec![(true, advance.watermark)],
        Some(c) => vec![(true, c), (false, advance.watermark)],
        None => vec![(false, advance.watermark)],
    }
}
