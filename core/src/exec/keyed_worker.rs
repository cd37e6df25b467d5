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
use crate::protocol::checkpoint::Epoch;
use crate::tracker::Tracker;

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

impl<Op> KeyedWorker<Op>
where
    Op: KeyedOperator,
    Op::Key: Hash + Eq,
{
    pub(crate) async fn run(
        mut self,
        mut rx: mpsc::Receiver<ExchangeMsg<Op::Key, Op::In>>,
    ) -> Result<(), Error> {
        let mut states: FxHashMap<ShardId, Op::State> = FxHashMap::default();
        let mut reports: Vec<(ShardId, Epoch, Option<Epoch>)> = Vec::new();
        // The last epoch of each shard handled since the last commit.
        let mut uncommitted: Vec<EpochCx> = Vec::new();
        // When the epochs gathered so far must be committed.
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let msg = match deadline {
                None => rx.recv().await,
                Some(at) => tokio::select! {
                    biased;
                    msg = rx.recv() => msg,
                    () = tokio::time::sleep_until(at) => {
                        self.commit(&mut states, &mut uncommitted, &mut reports).await?;
                        deadline = None;
                        continue;
                    }
                },
            };
            let Some(msg) = msg else { break };
            // The end of a shard or of the input is committed at once: a run waits for it.
            let urgent = matches!(msg.epoch.control, Control::EndOfInput | Control::ShardEnd);
            if let Some(report) = self.handle(&mut states, msg, &mut uncommitted).await? {
                reports.push(report);
            }
            let at =
                *deadline.get_or_insert_with(|| tokio::time::Instant::now() + self.commit_interval);
            if urgent || reports.len() >= MESSAGES_PER_COMMIT || tokio::time::Instant::now() >= at {
                self.commit(&mut states, &mut uncommitted, &mut reports)
                    .await?;
                deadline = None;
            }
        }
        self.commit(&mut states, &mut uncommitted, &mut reports)
            .await
    }

    /// Lets operators emit running results, commits the sinks, then reports the epochs.
    async fn commit(
        &mut self,
        states: &mut FxHashMap<ShardId, Op::State>,
        uncommitted: &mut Vec<EpochCx>,
        reports: &mut Vec<(ShardId, Epoch, Option<Epoch>)>,
    ) -> Result<(), Error> {
        for epoch in uncommitted.drain(..) {
            if let Some(state) = states.get_mut(&epoch.shard) {
                let mut out = KeyedOutput::new(&mut *self.main, &mut *self.late);
                self.op.on_commit(state, &mut out);
                let emitted = out.emitted();
                if !epoch.replay() {
                    self.count(&epoch.shard, 0, emitted);
                }
                self.main.flush(&epoch).await?;
                self.late.flush(&epoch).await?;
            }
        }
        self.main.commit().await?;
        self.late.commit().await?;
        if !reports.is_empty() {
            self.tracker.report(self.path, reports);
            reports.clear();
        }
        Ok(())
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
        states: &mut FxHashMap<ShardId, Op::State>,
        msg: ExchangeMsg<Op::Key, Op::In>,
        uncommitted: &mut Vec<EpochCx>,
    ) -> Result<Option<(ShardId, Epoch, Option<Epoch>)>, Error> {
        let ExchangeMsg { epoch, mut records } = msg;
        uncommitted.retain(|e| e.shard != epoch.shard);
        if epoch.control == Control::Release {
            states.remove(&epoch.shard);
            self.main.discard();
            self.late.discard();
            return Ok(None);
        }
        let state = states.entry(epoch.shard.clone()).or_default();
        let mut out = KeyedOutput::new(&mut *self.main, &mut *self.late);
        let records_in = records.len() as u64;
        for record in records.drain(..) {
            self.op
                .on_record(state, record, epoch.epoch, epoch.mode, &mut out);
        }
        self.pool.give(records);
        if epoch.mode == Mode::Live {
            match epoch.control {
                Control::ShardEnd => self.op.on_watermark(state, EventTime::MAX, &mut out),
                _ => {
                    if let Some(wm) = epoch.watermark {
                        self.op.on_watermark(state, wm, &mut out);
                    }
                }
            }
            if epoch.control == Control::EndOfInput {
                self.op.on_end_of_input(state, &mut out);
            }
        }
        if out.late_count() > 0 {
            self.metrics.late(&self.topology, out.late_count());
        }
        let hold = self.op.hold(state);
        if epoch.control == Control::ShardEnd {
            self.op.on_commit(state, &mut out);
            states.remove(&epoch.shard);
        } else {
            uncommitted.push(epoch.clone());
        }
        if epoch.mode == Mode::Live {
            // A replay only rebuilds state: the run that first read it counted it.
            let emitted = out.emitted();
            self.count(&epoch.shard, records_in, emitted);
        }
        self.main.flush(&epoch).await?;
        self.late.flush(&epoch).await?;
        Ok(Some((epoch.shard.clone(), epoch.epoch, hold)))
    }
}
