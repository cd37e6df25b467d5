//! The keyed worker loop: runs a keyed operator over the epochs the exchange sends it, keeps
//! its state per source shard, commits its sinks every commit interval and reports the
//! committed epochs to the checkpoint tracker.
//!
//! A commit holds outputs of several shards. Nothing of a shard is written once its lease
//! guard expired (epochs still queued or uncommitted when the lease moved are dropped), and a
//! sink's fencing refusal of one shard drops that shard's life only: the other shards' outputs
//! of the commit are committed again. A dropped life is reported to the control loop, which
//! ends it like a lost lease; later epochs of it are ignored until its `Release` arrives.

use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet};
use tokio::sync::mpsc;

use crate::dead_letter::{DeadLetterRecord, RefusedResult};
use crate::error::Error;
use crate::lease::{LeaseEpoch, SnapshotPart, SnapshotRef};
use crate::metrics::Metrics;
use crate::operator::{
    Control, Emit, EpochCx, Ident, KeyedOperator, KeyedOutput, Mode, RecordCx, Refused, StateOrder,
};
use crate::position::{EventTime, RecordPosition, ShardId};
use crate::sink::{KeyId, OutputId};
use crate::state_store::{part_name, StateStore};
use crate::tracker::{DropReason, DroppedLife, Report, Tracker};

use super::exchange::{worker_of, ExchangeMsg, RecordPool};
use super::sink_emitter::SinkEmitter;
use super::user_code;

/// Runs one keyed worker until every shard task dropped its sender.
pub(crate) struct KeyedWorker<Op: KeyedOperator> {
    pub(crate) op: Op,
    pub(crate) main: Box<dyn Emit<Op::Out>>,
    pub(crate) late: Box<dyn Emit<Op::In>>,
    /// The dead-letter policy's sink, if it has one: keyed dead letters of results a sink
    /// refused go there, committed with the worker's other outputs.
    pub(crate) letters: Option<SinkEmitter<DeadLetterRecord>>,
    /// The source stream, which dead letters name.
    pub(crate) stream: String,
    /// The operator's metrics label.
    pub(crate) label: Arc<str>,
    pub(crate) tracker: Tracker,
    /// Where emptied record buffers go back to the shard tasks.
    pub(crate) pool: RecordPool<Op::Key, Op::In>,
    pub(crate) path: usize,
    pub(crate) commit_interval: std::time::Duration,
    pub(crate) metrics: Metrics,
    pub(crate) topology: String,
    /// Where snapshot parts go (`state(Snapshot)`).
    pub(crate) state_store: Option<Arc<dyn StateStore>>,
    /// This worker's number among the branch's `workers`: it owns the keys the exchange
    /// hashes to it (`exchange::worker_of`), and restores those.
    pub(crate) worker: usize,
    pub(crate) workers: usize,
    pub(crate) _key: PhantomData<fn() -> Op::Key>,
}

/// A snapshot part to store at the next commit: the state of `shard` after `epoch`.
struct Take {
    shard: ShardId,
    lease_epoch: LeaseEpoch,
    epoch: u64,
    prefix: Arc<str>,
}

/// Why a life could not restore its state from a snapshot.
enum RestoreFailed {
    /// The store failed (a retry may work): the shard backs off and starts again.
    Store(crate::error::SinkError),
    /// The snapshot does not fit the topology, or a part is missing or unreadable.
    Broken(String),
}

/// Most messages a worker handles before it commits its sinks and reports, whatever the commit
/// interval: bounds what a commit carries and what a crash repeats.
const MESSAGES_PER_COMMIT: usize = 128;

/// A shard's life: the shard and the lease epoch it is processed under.
type Life = (ShardId, LeaseEpoch);

/// What a worker holds between commits.
struct Pending<S> {
    /// Operator state per source shard.
    states: FxHashMap<ShardId, S>,
    /// The life each shard's state belongs to: a new life starts from its checkpoint, never
    /// from an older life's state (one may be left after a life ended while finishing).
    life_of: FxHashMap<ShardId, LeaseEpoch>,
    /// Epochs handled since the last commit, reported once the sinks committed them.
    reports: Vec<Report>,
    /// The last epoch of each shard handled since the last commit: at the commit, running
    /// results are emitted under it.
    uncommitted: Vec<EpochCx>,
    /// Lives with outputs in the sinks' writers since the last commit.
    touched: Vec<Life>,
    /// Lives this worker dropped; their epochs are ignored until their `Release` arrives.
    dropped: FxHashSet<Life>,
    /// The last record of each shard's current life this worker was sent: a keyed dead
    /// letter names it (its result derives from records up to there).
    last_read: FxHashMap<ShardId, RecordPosition>,
    /// Snapshot parts owed at the next commit.
    takes: Vec<Take>,
}

impl<Op> KeyedWorker<Op>
where
    Op: KeyedOperator,
    Op::Key: Hash + Eq,
{
    pub(crate) async fn run(
        mut self,
        mut rx: mpsc::Receiver<ExchangeMsg<Op::Key, Op::In>>,
    ) -> Result<(), Error> {
        let mut pending = Pending {
            states: FxHashMap::default(),
            life_of: FxHashMap::default(),
            reports: Vec::new(),
            uncommitted: Vec::new(),
            touched: Vec::new(),
            dropped: FxHashSet::default(),
            last_read: FxHashMap::default(),
            takes: Vec::new(),
        };
        // When the epochs gathered so far must be committed.
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let msg = match deadline {
                None => rx.recv().await,
                Some(at) => tokio::select! {
                    biased;
                    msg = rx.recv() => msg,
                    () = tokio::time::sleep_until(at) => {
                        let committed = self.commit(&mut pending).await;
                        self.isolate(&mut pending, committed).await?;
                        deadline = None;
                        continue;
                    }
                },
            };
            let Some(msg) = msg else { break };
            // The end of a shard, of the input or of the shard's processing is committed at
            // once: the run waits for it.
            // So is an epoch after which a snapshot is taken: its part stands for the state
            // right after it.
            let urgent = matches!(
                msg.epoch.control,
                Control::EndOfInput | Control::ShardEnd | Control::Stop
            ) || matches!(msg.epoch.state, StateOrder::Take(_));
            let handled = self.handle(&mut pending, msg).await;
            self.isolate(&mut pending, handled).await?;
            let lettered = self.dead_letter_refused(&mut pending).await;
            self.isolate(&mut pending, lettered).await?;
            let at =
                *deadline.get_or_insert_with(|| tokio::time::Instant::now() + self.commit_interval);
            if urgent
                || pending.reports.len() >= MESSAGES_PER_COMMIT
                || tokio::time::Instant::now() >= at
            {
                let committed = self.commit(&mut pending).await;
                self.isolate(&mut pending, committed).await?;
                deadline = None;
            }
        }
        let committed = self.commit(&mut pending).await;
        self.isolate(&mut pending, committed).await
    }

    /// A sink error left after the sink's own retries costs the lives whose outputs the
    /// writers held, not the worker: one commit holds every touched life's outputs, so each
    /// is dropped (`DropReason::SinkFailed`) and its shard backs off and starts again from its
    /// checkpoint. Fencing refusals are handled by `commit`; other errors end the worker.
    async fn isolate(
        &mut self,
        pending: &mut Pending<Op::State>,
        result: Result<(), Error>,
    ) -> Result<(), Error> {
        let error = match result {
            Err(Error::Sink(error)) if error.is_failed_store() => error,
            other => return other,
        };
        let mut lives: Vec<Life> = pending.touched.clone();
        lives.extend(
            pending
                .uncommitted
                .iter()
                .map(|e| (e.shard.clone(), e.lease_epoch)),
        );
        lives.sort();
        lives.dedup();
        tracing::warn!(path = self.path, %error, lives = lives.len(), "a sink failed after its retries on a keyed path; dropping the shards whose outputs it held");
        for (shard, lease_epoch) in lives {
            if !pending.dropped.contains(&(shard.clone(), lease_epoch)) {
                self.drop_life(pending, shard, lease_epoch, DropReason::SinkFailed)
                    .await?;
            }
        }
        Ok(())
    }

    /// Lets operators emit running results, commits the sinks, then reports the epochs.
    /// Lives whose guard expired are dropped first; a life a sink fences is dropped and the
    /// rest committed again.
    async fn commit(&mut self, pending: &mut Pending<Op::State>) -> Result<(), Error> {
        // Before the running results go to the writers (a writer may write through at once),
        // and again before the commit, which emitting may have waited for.
        self.drop_expired(pending).await?;
        for epoch in std::mem::take(&mut pending.uncommitted) {
            let emitted = match pending.states.get_mut(&epoch.shard) {
                Some(state) => self.emit_running(state, &epoch).await?,
                None => true,
            };
            if !emitted {
                self.panicked_outside_records(pending, &epoch).await?;
            }
        }
        self.dead_letter_refused(pending).await?;
        self.drop_expired(pending).await?;
        // Each refusal drops one life; a writer that keeps refusing after it was told to
        // drop the shard (`SinkWriter::release_shard`) breaks its contract.
        let mut refusals_left = pending.touched.len();
        loop {
            let committed = match self.main.commit().await {
                // The main commit may have stalled past a guard: the late sink's commit is
                // another write.
                Ok(()) => self.commit_after_main(pending).await,
                Err(e) => Err(e),
            };
            match committed {
                Ok(()) => break,
                Err(Error::Sink(e)) if refusals_left > 0 => {
                    let Some(life) = e
                        .fenced()
                        .map(|f| (f.shard.clone(), f.epoch))
                        .filter(|life| pending.touched.contains(life))
                    else {
                        return Err(Error::Sink(e));
                    };
                    refusals_left -= 1;
                    tracing::warn!(shard = %life.0, lease_epoch = %life.1, error = %e, "fenced on a keyed path; dropping the shard");
                    self.drop_life(pending, life.0, life.1, DropReason::Fenced)
                        .await?;
                }
                Err(e) => return Err(e),
            }
        }
        pending.touched.clear();
        self.store_parts(pending).await;
        if !pending.reports.is_empty() {
            self.tracker.report(self.path, &pending.reports);
            pending.reports.clear();
        }
        Ok(())
    }

    /// Stores the snapshot parts owed, after the commit of the epochs they stand for and
    /// before those epochs are reported, and attaches each to its epoch's report. A part that
    /// cannot be saved or stored is left out (with a warning): that snapshot stays incomplete,
    /// no checkpoint names it, and the next one may do.
    async fn store_parts(&mut self, pending: &mut Pending<Op::State>) {
        let Some(store) = self.state_store.clone() else {
            pending.takes.clear();
            return;
        };
        for take in std::mem::take(&mut pending.takes) {
            let life = (take.shard.clone(), take.lease_epoch);
            let current = pending.life_of.get(&take.shard) == Some(&take.lease_epoch);
            if pending.dropped.contains(&life) || !current {
                continue;
            }
            let started = std::time::Instant::now();
            let labels = (
                self.topology.as_str(),
                take.shard.as_str(),
                &*self.label,
                self.worker,
            );
            let saved = {
                let op = &self.op;
                let state = pending.states.get(&take.shard);
                user_code::call(|| match state {
                    Some(state) => op.save(state),
                    None => op.save(&Op::State::default()),
                })
            };
            let saved = match saved {
                Ok(Ok(saved)) => saved,
                Ok(Err(why)) => {
                    tracing::warn!(shard = %take.shard, operator = %self.label, epoch = take.epoch, %why, "a snapshot part could not be saved; the snapshot is left incomplete");
                    self.metrics.snapshot_part(labels, None, started.elapsed());
                    continue;
                }
                Err(_) => {
                    tracing::warn!(shard = %take.shard, operator = %self.label, epoch = take.epoch, "saving a snapshot part panicked; the snapshot is left incomplete");
                    self.metrics.snapshot_part(labels, None, started.elapsed());
                    continue;
                }
            };
            let name = part_name(
                &take.prefix,
                take.lease_epoch,
                take.epoch,
                &self.label,
                self.worker,
            );
            if let Err(error) = store.put(&name, &saved.bytes).await {
                tracing::warn!(shard = %take.shard, operator = %self.label, epoch = take.epoch, bytes = saved.bytes.len(), %error, "a snapshot part could not be stored; the snapshot is left incomplete");
                self.metrics.snapshot_part(labels, None, started.elapsed());
                continue;
            }
            let bytes = saved.bytes.len() as u64;
            self.metrics
                .snapshot_part(labels, Some((saved.keys, bytes)), started.elapsed());
            tracing::debug!(shard = %take.shard, operator = %self.label, epoch = take.epoch, keys = saved.keys, bytes, "snapshot part stored");
            let part = SnapshotPart {
                operator: self.label.to_string(),
                worker: u32::try_from(self.worker).unwrap_or(u32::MAX),
                name,
                keys: saved.keys,
                bytes: saved.bytes.len() as u64,
            };
            if let Some(report) = pending.reports.iter_mut().find(|r| {
                r.shard == take.shard && r.lease_epoch == take.lease_epoch && r.epoch == take.epoch
            }) {
                report.part = Some(part);
            }
        }
    }

    /// The state of a life that resumes from `snapshot`: this worker's keys of every part of
    /// its operator, merged, held from `epoch`.
    async fn restore(
        &mut self,
        snapshot: &SnapshotRef,
        epoch: u64,
    ) -> Result<Op::State, RestoreFailed> {
        let store = self.state_store.clone().ok_or_else(|| {
            RestoreFailed::Broken(
                "the checkpoint names a snapshot of keyed state and the topology has no state \
                 store (state(Replay)): set state(Snapshot) with the store that holds it, or \
                 reset the shard's checkpoint"
                    .to_owned(),
            )
        })?;
        let parts: Vec<SnapshotPart> = snapshot
            .parts
            .iter()
            .filter(|p| p.operator == *self.label)
            .cloned()
            .collect();
        if parts.is_empty() {
            return Err(RestoreFailed::Broken(format!(
                "the snapshot the checkpoint names holds no state of operator {:?}: the \
                 topology changed since it was taken (name operators with .name(..) so that \
                 their ids stay stable, or reset the shard's checkpoint)",
                self.label
            )));
        }
        // Written at this parallelism, a part holds exactly the keys its worker owned, which
        // this worker owns now if it has the same number: only that part is read.
        let parts: Vec<SnapshotPart> = if parts.len() == self.workers {
            parts
                .into_iter()
                .filter(|p| p.worker as usize == self.worker)
                .collect()
        } else {
            parts
        };
        let mut state = Op::State::default();
        let (worker, workers) = (self.worker, self.workers);
        let owns = move |key: &Op::Key| worker_of(key, workers) == worker;
        for part in parts {
            let bytes = store
                .get(&part.name)
                .await
                .map_err(RestoreFailed::Store)?
                .ok_or_else(|| {
                    RestoreFailed::Broken(format!(
                        "snapshot part {} of operator {:?} is missing from state store {}",
                        part.name,
                        self.label,
                        store.name()
                    ))
                })?;
            let restored = {
                let op = &self.op;
                user_code::call(|| op.restore(&mut state, &bytes, &owns, epoch))
            };
            match restored {
                Ok(Ok(_keys)) => {}
                Ok(Err(why)) => {
                    return Err(RestoreFailed::Broken(format!(
                        "snapshot part {} of operator {:?} ({} bytes) cannot be read: {why}",
                        part.name,
                        self.label,
                        bytes.len()
                    )))
                }
                Err(_) => {
                    return Err(RestoreFailed::Broken(format!(
                        "restoring snapshot part {} of operator {:?} panicked",
                        part.name, self.label
                    )))
                }
            }
        }
        Ok(state)
    }

    /// Commits the late records' sink and then the keyed dead letters, each only for lives
    /// whose guard still holds: the commit before it may have stalled past one.
    async fn commit_after_main(&mut self, pending: &mut Pending<Op::State>) -> Result<(), Error> {
        self.drop_expired(pending).await?;
        self.late.commit().await?;
        if let Some(letters) = self.letters.as_mut() {
            if cfg!(shardflow_mutation = "letters_unguarded") {
                // A mutation check: keyed dead letters are committed whatever the guards say.
                return letters.commit().await;
            }
            self.drop_expired(pending).await?;
            let letters = self.letters.as_mut().expect("checked above");
            letters.commit().await?;
        }
        Ok(())
    }

    /// Dead-letters the keyed results sinks refused (`Sink::check`) in live epochs: each
    /// becomes a keyed dead letter, written with the life's other outputs and committed with
    /// them (so before the checkpoint passes the epoch that made it; a replay of that epoch
    /// reports nothing again), and the run goes on without the result. Where the policy has
    /// no dead-letter sink, or that sink refuses even the letter, no record can stand for the
    /// result: its shard stops (`ShardStopped::KeyedPath`); the other shards go on.
    async fn dead_letter_refused(&mut self, pending: &mut Pending<Op::State>) -> Result<(), Error> {
        let mut refused = Vec::new();
        self.main.take_refused(&mut refused);
        self.late.take_refused(&mut refused);
        for refused in refused {
            let life = (refused.shard.clone(), refused.lease_epoch);
            // A refusal of a life that ended since (a commit that failed before its letters
            // were made, a release) or whose guard ran out is not written: the shard starts
            // again from its checkpoint and makes the result, and its refusal, again.
            let current = pending.life_of.get(&refused.shard) == Some(&refused.lease_epoch);
            if pending.dropped.contains(&life) || !current {
                continue;
            }
            if !self.may_write(&refused.shard, refused.lease_epoch) {
                // The guard may hold again after a late renewal: the life ends here, so that
                // no commit passes the epoch without the result's letter.
                let (shard, lease_epoch) = life;
                self.drop_life(pending, shard, lease_epoch, DropReason::GuardExpired)
                    .await?;
                continue;
            }
            let after = match &refused.identity {
                OutputId::Record { position, .. } => Some(position.clone()),
                OutputId::Keyed { .. } => pending.last_read.get(&refused.shard).cloned(),
            };
            let letter = match (&self.letters, after) {
                (Some(letters), Some(after)) => {
                    let sink = Arc::clone(&letters.sink);
                    let letter = DeadLetterRecord::of_result(
                        self.stream.clone(),
                        refused.shard.clone(),
                        after,
                        RefusedResult::new(
                            self.topology.clone(),
                            refused.sink.clone(),
                            &refused.identity,
                            refused.size,
                        ),
                        refused.reason.clone(),
                    );
                    letter.fit(|l| sink.check(l)).map_err(|reason| {
                        format!(
                            "dead-letter sink {} refuses the letter: {reason}",
                            sink.name()
                        )
                    })
                }
                (Some(_), None) => Err("no record of the shard was read before it".to_owned()),
                (None, _) => Err("the dead-letter policy has no sink".to_owned()),
            };
            let (shard, lease_epoch) = life.clone();
            match letter {
                Ok(letter) => {
                    let letters = self.letters.as_mut().expect("a letter implies its sink");
                    let cx = RecordCx {
                        event_time: 0,
                        watermark: 0,
                        ident: letter_ident(&refused),
                    };
                    letters.emit(&cx, letter);
                    let epoch = EpochCx {
                        shard: shard.clone(),
                        lease_epoch,
                        epoch: 0,
                        raw: Arc::default(),
                        watermark: None,
                        mode: Mode::Live,
                        control: Control::Continue,
                        state: StateOrder::Keep,
                    };
                    letters.flush(&epoch).await?;
                    if !pending.touched.contains(&life) {
                        pending.touched.push(life.clone());
                    }
                    let mut refused_letter = Vec::new();
                    letters.take_refused(&mut refused_letter);
                    if let Some(again) = refused_letter.pop() {
                        // `fit` accepted it a moment ago: a sink whose `check` changes its mind.
                        let reason = format!(
                            "sink {} refused a keyed result ({}) and the dead-letter sink {} \
                             refuses its letter: {}",
                            refused.sink, refused.reason, again.sink, again.reason
                        );
                        self.drop_life(pending, shard, lease_epoch, DropReason::Stop { reason })
                            .await?;
                        continue;
                    }
                    tracing::warn!(%shard, sink = %refused.sink, size = ?refused.size, sink_reason = %refused.reason, "a sink refused a keyed result; it is dead-lettered and the shard goes on");
                    self.metrics
                        .dead_lettered(&self.topology, shard.as_str(), 1);
                }
                Err(why) => {
                    tracing::error!(%shard, sink = %refused.sink, sink_reason = %refused.reason, why = %why, "a sink refused a keyed result that cannot be dead-lettered; stopping the shard");
                    let reason = format!(
                        "sink {} refused a keyed result ({}) and {why}",
                        refused.sink, refused.reason
                    );
                    self.drop_life(pending, shard, lease_epoch, DropReason::Stop { reason })
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Drops every life with outputs in the writers or running results owed whose guard
    /// expired.
    async fn drop_expired(&mut self, pending: &mut Pending<Op::State>) -> Result<(), Error> {
        let lives: Vec<Life> = pending
            .touched
            .iter()
            .cloned()
            .chain(
                pending
                    .uncommitted
                    .iter()
                    .map(|e| (e.shard.clone(), e.lease_epoch)),
            )
            .collect();
        for (shard, lease_epoch) in lives {
            let life = (shard, lease_epoch);
            if pending.dropped.contains(&life) || self.may_write(&life.0, life.1) {
                continue;
            }
            let (shard, lease_epoch) = life;
            self.drop_life(pending, shard, lease_epoch, DropReason::GuardExpired)
                .await?;
        }
        Ok(())
    }

    /// Whether outputs of the life may still be written (`Tracker::may_write`).
    fn may_write(&self, shard: &ShardId, lease_epoch: LeaseEpoch) -> bool {
        self.tracker.may_write(shard, lease_epoch)
    }

    /// Drops a shard's life: its state, its uncommitted epochs and the outputs the writers
    /// hold for it, and tells the control loop, which ends the life like a lost lease.
    async fn drop_life(
        &mut self,
        pending: &mut Pending<Op::State>,
        shard: ShardId,
        lease_epoch: LeaseEpoch,
        reason: DropReason,
    ) -> Result<(), Error> {
        let life = (shard, lease_epoch);
        self.release(pending, &life).await?;
        pending.dropped.insert(life.clone());
        let (shard, lease_epoch) = life;
        self.tracker.drop_life(DroppedLife {
            shard,
            lease_epoch,
            reason,
        });
        Ok(())
    }

    /// Forgets a life without a word more of it: state, reports, and what the writers hold.
    async fn release(
        &mut self,
        pending: &mut Pending<Op::State>,
        (shard, lease_epoch): &Life,
    ) -> Result<(), Error> {
        pending.states.remove(shard);
        pending.life_of.remove(shard);
        pending.last_read.remove(shard);
        pending.takes.retain(|t| &t.shard != shard);
        pending
            .reports
            .retain(|r| &r.shard != shard || r.lease_epoch != *lease_epoch);
        pending.uncommitted.retain(|e| &e.shard != shard);
        pending
            .touched
            .retain(|(s, e)| s != shard || e != lease_epoch);
        self.main.discard();
        self.late.discard();
        let release = EpochCx {
            shard: shard.clone(),
            lease_epoch: *lease_epoch,
            epoch: 0,
            raw: Arc::default(),
            watermark: None,
            mode: Mode::Live,
            control: Control::Release,
            state: StateOrder::Keep,
        };
        self.main.flush(&release).await?;
        self.late.flush(&release).await?;
        if let Some(letters) = self.letters.as_mut() {
            letters.discard();
            letters.flush(&release).await?;
        }
        Ok(())
    }

    /// A keyed operator panicked outside any record: closing windows, emitting what its state
    /// owes, or ending the input (in user code such as `Aggregator::result`). Its state may be
    /// half-changed and no input record can be dead-lettered for it, and a replay would panic
    /// the same way: the shard stops there (`ShardStopped::KeyedPath`), visibly, with its
    /// checkpoint before the epoch; the other shards go on.
    async fn panicked_outside_records(
        &mut self,
        pending: &mut Pending<Op::State>,
        epoch: &EpochCx,
    ) -> Result<(), Error> {
        tracing::error!(shard = %epoch.shard, operator = %self.label, epoch = epoch.epoch, "a keyed operator panicked outside any record; stopping the shard");
        let reason = format!(
            "operator {} panicked outside any record (closing windows or emitting results; its \
             message is on stderr)",
            self.label
        );
        self.drop_life(
            pending,
            epoch.shard.clone(),
            epoch.lease_epoch,
            DropReason::Stop { reason },
        )
        .await
    }

    /// Lets the operator emit the running results `state` owes, under `epoch`. `Ok(false)`
    /// if it panicked (the caller stops the shard).
    async fn emit_running(
        &mut self,
        state: &mut Op::State,
        epoch: &EpochCx,
    ) -> Result<bool, Error> {
        let mut out = KeyedOutput::new(&mut *self.main, &mut *self.late);
        let op = &mut self.op;
        if user_code::call(|| op.on_commit(state, &mut out)).is_err() {
            return Ok(false);
        }
        let emitted = out.emitted();
        if !epoch.replay() {
            self.count(&epoch.shard, 0, emitted);
        }
        self.main.flush(epoch).await?;
        self.late.flush(epoch).await?;
        Ok(true)
    }

    /// Adds records into and results out of the operator to the metrics of `shard`.
    fn count(&self, shard: &ShardId, records_in: u64, records_out: u64) {
        self.metrics.operator(
            &self.topology,
            shard.as_str(),
            &self.label,
            (records_in, records_out),
        );
    }

    async fn handle(
        &mut self,
        pending: &mut Pending<Op::State>,
        msg: ExchangeMsg<Op::Key, Op::In>,
    ) -> Result<(), Error> {
        let ExchangeMsg { epoch, mut records } = msg;
        let life = (epoch.shard.clone(), epoch.lease_epoch);
        if epoch.control == Control::Release {
            // The lease may have moved: nothing more of this life is emitted, written or
            // reported.
            self.pool.give(records);
            pending.dropped.remove(&life);
            return self.release(pending, &life).await;
        }
        if pending.dropped.contains(&life) {
            self.pool.give(records);
            return Ok(());
        }
        // An epoch of this life: no earlier life of the shard sends anything more.
        pending
            .dropped
            .retain(|(s, e)| s != &epoch.shard || *e == epoch.lease_epoch);
        match pending.life_of.get(&epoch.shard).copied() {
            Some(current) if current == epoch.lease_epoch => {}
            Some(_) if cfg!(shardflow_mutation = "keep_old_life_state") => {
                // A mutation check: the new life builds on what an older one left.
            }
            // An older life whose `Release` never came (it ended while finishing, or its
            // release failed): released now, before anything of the new life, so that neither
            // its state nor what the writers hold of it (nor a later drop of it, which
            // releases by shard) can touch the new life.
            Some(older) => self.release(pending, &(epoch.shard.clone(), older)).await?,
            None => {}
        }
        pending
            .life_of
            .insert(epoch.shard.clone(), epoch.lease_epoch);
        if !self.may_write(&epoch.shard, epoch.lease_epoch) {
            // Queued while the lease moved (or while this worker was paused past it).
            self.pool.give(records);
            let reason = DropReason::GuardExpired;
            return self
                .drop_life(pending, epoch.shard, epoch.lease_epoch, reason)
                .await;
        }
        if !pending.touched.contains(&life) {
            pending.touched.push(life);
        }
        if let Some(last) = epoch.raw.last_position() {
            pending.last_read.insert(epoch.shard.clone(), last.clone());
        }
        pending.uncommitted.retain(|e| e.shard != epoch.shard);
        if epoch.control == Control::Stop {
            // An orderly stop: what the state owes goes out with the epochs it derives from,
            // which the final checkpoint then covers.
            self.pool.give(records);
            if let Some(mut state) = pending.states.remove(&epoch.shard) {
                if !self.emit_running(&mut state, &epoch).await? {
                    return self.panicked_outside_records(pending, &epoch).await;
                }
            }
            return Ok(());
        }
        if let StateOrder::Restore(restore) = &epoch.state {
            // A mutation check (skip_restore): a life resumed from a snapshot starts empty.
            if !pending.states.contains_key(&epoch.shard)
                && !cfg!(shardflow_mutation = "skip_restore")
            {
                match self.restore(&restore.snapshot, epoch.epoch).await {
                    Ok(state) => {
                        pending.states.insert(epoch.shard.clone(), state);
                        // What the restored state emits derives from records up to the
                        // resume point: a keyed dead letter of it names that record.
                        if let Some(after) = &restore.after {
                            pending
                                .last_read
                                .entry(epoch.shard.clone())
                                .or_insert_with(|| after.clone());
                        }
                    }
                    Err(failed) => {
                        self.pool.give(records);
                        let reason = match failed {
                            RestoreFailed::Store(error) => {
                                tracing::warn!(shard = %epoch.shard, operator = %self.label, %error, "the state store failed while restoring a snapshot; the shard backs off");
                                DropReason::SinkFailed
                            }
                            RestoreFailed::Broken(reason) => {
                                tracing::error!(shard = %epoch.shard, operator = %self.label, %reason, "a snapshot cannot be restored; stopping the shard");
                                DropReason::Stop { reason }
                            }
                        };
                        return self
                            .drop_life(pending, epoch.shard, epoch.lease_epoch, reason)
                            .await;
                    }
                }
            }
        }
        let state = pending.states.entry(epoch.shard.clone()).or_default();
        let mut out = KeyedOutput::new(&mut *self.main, &mut *self.late);
        let records_in = records.len() as u64;
        let mut panicked = None;
        for record in records.drain(..) {
            let index = record.input_index();
            let op = &mut self.op;
            let called =
                user_code::call(|| op.on_record(state, record, epoch.epoch, epoch.mode, &mut out));
            if called.is_err() {
                panicked = Some(index);
                break;
            }
        }
        self.pool.give(records);
        if let Some(index) = panicked {
            // The state may be half-changed: the life ends, and the shard starts again from its
            // checkpoint with the record dead-lettered before `key_by`, so its keys' state is
            // rebuilt as if the record had never come.
            let position = epoch.raw.get(index as usize).position.clone();
            tracing::warn!(shard = %epoch.shard, %position, operator = %self.label, "a keyed operator panicked on a record; the shard starts again from its checkpoint without it");
            let reason = DropReason::Panicked {
                at: position,
                stage: Arc::clone(&self.label),
            };
            return self
                .drop_life(pending, epoch.shard, epoch.lease_epoch, reason)
                .await;
        }
        // A replayed epoch fires and closes windows as the first run did; its outputs are
        // dropped (they were committed then), so the state ends as the first run's was.
        let op = &mut self.op;
        let called = user_code::call(|| {
            match epoch.control {
                Control::ShardEnd => op.on_watermark(state, EventTime::MAX, &mut out),
                _ => {
                    if let Some(wm) = epoch.watermark {
                        op.on_watermark(state, wm, &mut out);
                    }
                }
            }
            if epoch.control == Control::EndOfInput && epoch.mode == Mode::Live {
                op.on_end_of_input(state, &mut out);
            }
            if epoch.control == Control::ShardEnd {
                // The shard is closed: its state goes below, with what it owes.
                op.on_commit(state, &mut out);
            }
        });
        if called.is_err() {
            return self.panicked_outside_records(pending, &epoch).await;
        }
        let live = epoch.mode == Mode::Live;
        if out.late_count() > 0 && live {
            self.metrics.late(&self.topology, out.late_count());
        }
        let hold = if cfg!(shardflow_mutation = "skip_hold") {
            // A mutation check: open windows do not hold the rebuild point back.
            None
        } else if epoch.control == Control::ShardEnd {
            // The shard is closed: its state went out with what it owed (above), and holds
            // nothing.
            pending.states.remove(&epoch.shard);
            None
        } else {
            pending.uncommitted.push(epoch.clone());
            self.op.hold(state)
        };
        if live {
            // A replay only rebuilds state: the run that first read it counted it.
            let emitted = out.emitted();
            self.count(&epoch.shard, records_in, emitted);
        }
        self.main.flush(&epoch).await?;
        self.late.flush(&epoch).await?;
        if let StateOrder::Take(prefix) = &epoch.state {
            if epoch.control != Control::ShardEnd {
                pending.takes.push(Take {
                    shard: epoch.shard.clone(),
                    lease_epoch: epoch.lease_epoch,
                    epoch: epoch.epoch,
                    prefix: Arc::clone(prefix),
                });
            }
        }
        pending.reports.push(Report {
            shard: epoch.shard.clone(),
            lease_epoch: epoch.lease_epoch,
            epoch: epoch.epoch,
            hold,
            part: None,
        });
        Ok(())
    }
}

/// A keyed dead letter's identity in the dead-letter sink: the refused result's, under the
/// refusing sink's name (two sinks may refuse one result); a late record's by its position.
fn letter_ident(refused: &Refused) -> Ident {
    match &refused.identity {
        OutputId::Keyed { key, window, index } => Ident::Keyed {
            key: KeyId::text(format!("{}/{key}", refused.sink)),
            window: *window,
            fanout: *index,
        },
        OutputId::Record { position, index } => Ident::Keyed {
            key: KeyId::text(format!("{}/late/{position}", refused.sink)),
            window: None,
            fanout: *index,
        },
    }
}
