//! The keyed stage: the `KeyedOperator` primitive that windows and reductions implement, the
//! exchange that hashes records to keyed workers, and the worker loop.

use std::hash::{BuildHasher, Hash};
use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;
use rustc_hash::{FxBuildHasher, FxHashMap};
use tokio::sync::mpsc;

use crate::checkpoint::Epoch;
use crate::error::Error;
use crate::pool::VecPool;
use crate::position::{EventTime, ShardId};
use crate::runtime::metrics::Metrics;
use crate::runtime::tracker::Tracker;
use crate::topology::chain::{next_capacity, Control, Emit, EpochCx, Ident, Mode, RecordCx};

/// A record after `key_by`, on its way to the keyed worker that owns its key.
#[derive(Clone, Debug)]
pub struct KeyedRecord<K, T> {
    /// The key.
    pub key: K,
    /// The value.
    pub value: T,
    /// The event time.
    pub event_time: EventTime,
    /// The shard's watermark when the record arrived.
    pub watermark: EventTime,
    index: u32,
    fanout: u32,
}

impl<K, T> KeyedRecord<K, T> {
    /// A record of input record 0 of its epoch (for tests; the exchange makes real ones).
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn new(key: K, value: T, event_time: EventTime, watermark: EventTime) -> Self {
        Self {
            key,
            value,
            event_time,
            watermark,
            index: 0,
            fanout: 0,
        }
    }

    /// The record's context (for a late record sent to a side output, whose identity is the
    /// input record's).
    pub fn cx(&self) -> RecordCx {
        RecordCx {
            event_time: self.event_time,
            watermark: self.watermark,
            ident: Ident::Record {
                index: self.index,
                fanout: self.fanout,
            },
        }
    }
}

/// Where a keyed operator sends results and late records.
pub struct KeyedOutput<'a, In, Out> {
    main: &'a mut dyn Emit<Out>,
    late: &'a mut dyn Emit<In>,
    late_count: u64,
    emitted: u64,
}

impl<'a, In, Out> KeyedOutput<'a, In, Out> {
    pub(crate) fn new(main: &'a mut dyn Emit<Out>, late: &'a mut dyn Emit<In>) -> Self {
        Self {
            main,
            late,
            late_count: 0,
            emitted: 0,
        }
    }

    /// Emits a result.
    pub fn emit(&mut self, cx: &RecordCx, value: Out) {
        self.emitted += 1;
        self.main.emit(cx, value);
    }

    /// Routes a record that arrived after its window closed to the late side output.
    pub fn late<K>(&mut self, record: KeyedRecord<K, In>) {
        self.late_count += 1;
        let cx = record.cx();
        self.late.emit(&cx, record.value);
    }
}

/// A stateful operator on keyed records, with state per source shard.
///
/// The runtime calls `on_record` for each record of an epoch, then `on_watermark` with the
/// shard's watermark after the epoch (never during a replay), and reports `hold` to the
/// checkpoint tracker: the oldest epoch whose records the state still needs.
pub trait KeyedOperator: Send + 'static {
    /// The key type.
    type Key: Send + 'static;
    /// The input value type.
    type In: Send + 'static;
    /// The output type.
    type Out: Send + 'static;
    /// Everything the operator keeps for one source shard.
    type State: Default + Send + 'static;

    /// Handles one record of `epoch`.
    fn on_record(
        &mut self,
        state: &mut Self::State,
        record: KeyedRecord<Self::Key, Self::In>,
        epoch: Epoch,
        mode: Mode,
        out: &mut KeyedOutput<'_, Self::In, Self::Out>,
    );

    /// The shard's watermark advanced: fire and close what it completes.
    fn on_watermark(
        &mut self,
        state: &mut Self::State,
        watermark: EventTime,
        out: &mut KeyedOutput<'_, Self::In, Self::Out>,
    );

    /// A bounded run reached the end of its input: emit what open state holds, keep the state.
    fn on_end_of_input(
        &mut self,
        _state: &mut Self::State,
        _out: &mut KeyedOutput<'_, Self::In, Self::Out>,
    ) {
    }

    /// The worker is about to commit its sinks, after one or more epochs of this shard (also
    /// before a closed shard's state is dropped). Operators that emit running results emit
    /// them here, so that many epochs' updates of a key become one output per commit.
    fn on_commit(
        &mut self,
        _state: &mut Self::State,
        _out: &mut KeyedOutput<'_, Self::In, Self::Out>,
    ) {
    }

    /// The oldest epoch the state holds records of, if any.
    fn hold(&self, state: &Self::State) -> Option<Epoch>;
}

/// One epoch of one shard for one keyed worker.
pub(crate) struct ExchangeMsg<K, T> {
    pub(crate) epoch: EpochCx,
    pub(crate) records: Vec<KeyedRecord<K, T>>,
}

/// Record buffers of one exchange: a worker gives back each one it emptied, a shard task takes
/// one for each it sends.
pub(crate) type RecordPool<K, T> = Arc<VecPool<KeyedRecord<K, T>>>;

/// The pool of an exchange with `workers` workers: a spare buffer per worker and one more;
/// buffers of more than 2 MiB are not kept.
pub(crate) fn record_pool<K, T>(workers: usize) -> RecordPool<K, T> {
    Arc::new(VecPool::new(workers + 1, 2 << 20))
}

/// The shard tasks' side of one keyed branch: a sender per worker and the buffer pool.
pub(crate) struct Exchange<K, T> {
    pub(crate) senders: Vec<mpsc::Sender<ExchangeMsg<K, T>>>,
    pub(crate) pool: RecordPool<K, T>,
}

impl<K, T> Clone for Exchange<K, T> {
    fn clone(&self) -> Self {
        Self {
            senders: self.senders.clone(),
            pool: Arc::clone(&self.pool),
        }
    }
}

/// The shard-side end of an exchange: hashes each record's key to a worker and sends every
/// worker one message per epoch (possibly without records: each worker must see every epoch).
pub(crate) struct ExchangeEmitter<K, T, F> {
    pub(crate) key_fn: F,
    pub(crate) exchange: Exchange<K, T>,
    pub(crate) buffers: Vec<Vec<KeyedRecord<K, T>>>,
}

impl<K, T, F> ExchangeEmitter<K, T, F> {
    pub(crate) fn new(key_fn: F, exchange: Exchange<K, T>) -> Self {
        let buffers = exchange.senders.iter().map(|_| Vec::new()).collect();
        Self {
            key_fn,
            exchange,
            buffers,
        }
    }
}

#[async_trait]
impl<K, T, F> Emit<T> for ExchangeEmitter<K, T, F>
where
    K: Hash + Send + 'static,
    T: Send + 'static,
    F: Fn(&T) -> K + Send + 'static,
{
    fn emit(&mut self, cx: &RecordCx, value: T) {
        let key = (self.key_fn)(&value);
        let workers = self.buffers.len();
        let worker = if workers == 1 {
            0
        } else {
            // Multiply-shift maps the hash onto the workers without a division.
            let h = FxBuildHasher.hash_one(&key);
            ((u128::from(h) * workers as u128) >> 64) as usize
        };
        let Ident::Record { index, fanout } = cx.ident else {
            unreachable!("key_by runs before any keyed operator");
        };
        self.buffers[worker].push(KeyedRecord {
            key,
            value,
            event_time: cx.event_time,
            watermark: cx.watermark,
            index,
            fanout,
        });
    }

    async fn flush(&mut self, epoch: &EpochCx) -> Result<(), Error> {
        let Exchange { senders, pool } = &self.exchange;
        for (sender, buffer) in senders.iter().zip(&mut self.buffers) {
            let records = std::mem::replace(buffer, pool.take(next_capacity(buffer.len())));
            let msg = ExchangeMsg {
                epoch: epoch.clone(),
                records,
            };
            // A closed channel means the worker failed; the run reports the worker's error.
            sender
                .send(msg)
                .await
                .map_err(|_| Error::Task("keyed worker stopped".into()))?;
        }
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), Error> {
        // The workers commit their own sinks and report to the tracker.
        Ok(())
    }

    fn discard(&mut self) {
        self.buffers.iter_mut().for_each(Vec::clear);
    }
}

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
                let emitted = out.emitted;
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
        if out.late_count > 0 {
            self.metrics.late(&self.topology, out.late_count);
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
            let emitted = out.emitted;
            self.count(&epoch.shard, records_in, emitted);
        }
        self.main.flush(&epoch).await?;
        self.late.flush(&epoch).await?;
        Ok(Some((epoch.shard.clone(), epoch.epoch, hold)))
    }
}

/// Builds the exchange senders into a shard pipeline: the type-erased registry of one run.
pub(crate) type Exchanges = Arc<Vec<Box<dyn std::any::Any + Send + Sync>>>;

/// Takes a branch's typed exchange from the registry.
pub(crate) fn exchange<K: 'static + Send, T: 'static + Send>(
    exchanges: &Exchanges,
    branch: usize,
) -> Exchange<K, T> {
    exchanges[branch]
        .downcast_ref::<Exchange<K, T>>()
        .expect("the exchange registry holds the exchange of the branch's types")
        .clone()
}
