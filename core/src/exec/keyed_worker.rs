//! The keyed worker loop: runs a keyed operator over the epochs the exchange sends it, keeps
//! its state per source shard, commits its sinks every commit interval and reports the
//! committed epochs to the checkpoint tracker.

use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::Arc;

use rustc_hash::FxHashMap;
use tokio::sync::mpsc;

use crate::error::Error;
use crate::metrics::Metrics;
use crate::operator::{Control, Emit, EpochCx, KeyedOperator, KeyedOutput, Mode};
use crate::position::{EventTime, ShardId};
use crate::tracker::{Report, Tracker};

use super::exchange::{ExchangeMsg, RecordPool};

/// Runs one keyed worker until every shard task dropped its sender.
pub(crate) struct KeyedWorker<Op: KeyedOperator> {
    pub(crate) op: Op,
    pub(crate) main: Box<dyn Emit<Op::Out>>,
    pub(crate) late: Box<dyn Emit<Op::In>>,
    /// The operator's metrics label.
    pub(crate) label: Arc<str>,
    pub(crate) tracker: Tracker,
    /// Where emptied record buffers go back to the shard tasks.
    pub(crate) pool: RecordPool<Op::Key, Op::In>,
    pub(crate) path: usize,
    pub(crate) commit_interval: std::time::Duration,
    pub(crate) metrics: Metrics,
    pub(crate) topology: String,
    pub(crate) _key: PhantomData<fn() -> Op::Key>,
}

/// Most messages a worker handles before it commits its sinks and reports, whatever the commit
/// interval: bounds what a commit carries and what a crash repeats.
const MESSAGES_PER_COMMIT: usize = 128;

/// What a worker holds between commits.
struct Pending<S> {
    /// Operator state per source shard.
    states: FxHashMap<ShardId, S>,
    /// Epochs handled since the last commit, reported once the sinks committed them.
    reports: Vec<Report>,
    /// The last epoch of each shard handled since the last commit: at the commit, running
    /// results are emitted under it.
    uncommitted: Vec<EpochCx>,
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
            reports: Vec::new(),
            uncommitted: Vec::new(),
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
                        self.commit(&mut pending).await?;
                        deadline = None;
                        continue;
                    }
                },
            };
            let Some(msg) = msg else { break };
            // The end of a shard, of the input or of the shard's processing is committed at
            // once: the run waits for it.
            let urgent = matches!(
                msg.epoch.control,
                Control::EndOfInput | Control::ShardEnd | Control::Stop
            );
            self.handle(&mut pending, msg).await?;
            let at =
                *deadline.get_or_insert_with(|| tokio::time::Instant::now() + self.commit_interval);
            if urgent
                || pending.reports.len() >= MESSAGES_PER_COMMIT
                || tokio::time::Instant::now() >= at
            {
                self.commit(&mut pending).await?;
                deadline = None;
            }
        }
        self.commit(&mut pending).await
    }

    /// Lets operators emit running results, commits the sinks, then reports the epochs.
    async fn commit(&mut self, pending: &mut Pending<Op::State>) -> Result<(), Error> {
        for epoch in std::mem::take(&mut pending.uncommitted) {
            if let Some(state) = pending.states.get_mut(&epoch.shard) {
                self.emit_running(state, &epoch).await?;
            }
        }
        self.main.commit().await?;
        self.late.commit().await?;
        if !pending.reports.is_empty() {
            self.tracker.report(self.path, &pending.reports);
            pending.reports.clear();
        }
        Ok(())
    }

    /// Lets the operator emit the running results `state` owes, under `epoch`.
    async fn emit_running(&mut self, state: &mut Op::State, epoch: &EpochCx) -> Result<(), Error> {
        let mut out = KeyedOutput::new(&mut *self.main, &mut *self.late);
        self.op.on_commit(state, &mut out);
        let emitted = out.emitted();
        if !epoch.replay() {
            self.count(&epoch.shard, 0, emitted);
        }
        self.main.flush(epoch).await?;
        self.late.flush(epoch).await
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
        pending.uncommitted.retain(|e| e.shard != epoch.shard);
        match epoch.control {
            Control::Release => {
                // The lease may have moved: nothing more of this life is emitted or reported.
                pending.states.remove(&epoch.shard);
                pending
                    .reports
                    .retain(|r| r.shard != epoch.shard || r.lease_epoch != epoch.lease_epoch);
                self.main.discard();
                self.late.discard();
                self.pool.give(records);
                return Ok(());
            }
            Control::Stop => {
                // An orderly stop: what the state owes goes out with the epochs it derives
                // from, which the final checkpoint then covers.
                if let Some(mut state) = pending.states.remove(&epoch.shard) {
                    self.emit_running(&mut state, &epoch).await?;
                }
                self.pool.give(records);
                return Ok(());
            }
            Control::Continue | Control::EndOfInput | Control::ShardEnd => {}
        }
        let state = pending.states.entry(epoch.shard.clone()).or_default();
        let mut out = KeyedOutput::new(&mut *self.main, &mut *self.late);
        let records_in = records.len() as u64;
        for record in records.drain(..) {
            self.op
                .on_record(state, record, epoch.epoch, epoch.mode, &mut out);
        }
        self.pool.give(records);
        // A replayed epoch fires and closes windows as the first run did; its outputs are
        // dropped (they were committed then), so the state ends as the first run's was.
        match epoch.control {
            Control::ShardEnd => self.op.on_watermark(state, EventTime::MAX, &mut out),
            _ => {
                if let Some(wm) = epoch.watermark {
                    self.op.on_watermark(state, wm, &mut out);
                }
            }
        }
        if epoch.control == Control::EndOfInput && epoch.mode == Mode::Live {
            self.op.on_end_of_input(state, &mut out);
        }
        let live = epoch.mode == Mode::Live;
        if out.late_count() > 0 && live {
            self.metrics.late(&self.topology, out.late_count());
        }
        let hold = if cfg!(shardflow_mutation = "skip_hold") {
            // A mutation check: open windows do not hold the rebuild point back.
            None
        } else if epoch.control == Control::ShardEnd {
            // The shard is closed: its state goes, with what it owes, and holds nothing.
            self.op.on_commit(state, &mut out);
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
        pending.reports.push(Report {
            shard: epoch.shard.clone(),
            lease_epoch: epoch.lease_epoch,
            epoch: epoch.epoch,
            hold,
        });
        Ok(())
    }
}
