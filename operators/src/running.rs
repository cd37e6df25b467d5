//! The running (unwindowed) keyed aggregate: state per (shard, key), emitted per batch.

use rustc_hash::FxHashMap;
use shardflow_core::checkpoint::Epoch;
use shardflow_core::position::EventTime;
use shardflow_core::topology::{Ident, KeyedOperator, KeyedOutput, KeyedRecord, Mode, RecordCx};

use crate::aggregate::Aggregator;
use crate::key::Key;
use crate::keyed::KeyedValue;

pub(crate) struct RunningAggregate<K, T, A: Aggregator<T>> {
    agg: A,
    _p: std::marker::PhantomData<fn(K, T)>,
}

impl<K, T, A: Aggregator<T>> RunningAggregate<K, T, A> {
    pub(crate) fn new(agg: A) -> Self {
        Self {
            agg,
            _p: std::marker::PhantomData,
        }
    }
}

pub(crate) struct RunningState<K, Acc> {
    slots: FxHashMap<K, (Acc, bool)>,
    /// Keys changed since the last emission (each once: the flag in `slots` says so), so that
    /// an epoch costs what it touched, not the number of keys.
    touched: Vec<K>,
    first_epoch: Option<Epoch>,
    watermark: EventTime,
}

impl<K, Acc> Default for RunningState<K, Acc> {
    fn default() -> Self {
        Self {
            slots: FxHashMap::default(),
            touched: Vec::new(),
            first_epoch: None,
            watermark: EventTime::MIN,
        }
    }
}

impl<K: Key, T: Send + 'static, A: Aggregator<T>> RunningAggregate<K, T, A> {
    /// Emits the current value of every key changed since the last emission.
    fn emit_touched(
        &self,
        state: &mut RunningState<K, A::Acc>,
        out: &mut KeyedOutput<'_, T, KeyedValue<K, A::Out>>,
    ) {
        for key in state.touched.drain(..) {
            let (acc, dirty) = state.slots.get_mut(&key).expect("slots are never removed");
            *dirty = false;
            let cx = RecordCx {
                event_time: state.watermark,
                watermark: state.watermark,
                ident: Ident::keyed(key.key_id(), None),
            };
            out.emit(
                &cx,
                KeyedValue {
                    key,
                    value: self.agg.result(acc),
                },
            );
        }
    }
}

impl<K: Key, T: Send + 'static, A: Aggregator<T>> KeyedOperator for RunningAggregate<K, T, A> {
    type Key = K;
    type In = T;
    type Out = KeyedValue<K, A::Out>;
    type State = RunningState<K, A::Acc>;

    fn on_record(
        &mut self,
        state: &mut Self::State,
        record: KeyedRecord<K, T>,
        epoch: Epoch,
        _mode: Mode,
        _out: &mut KeyedOutput<'_, T, Self::Out>,
    ) {
        state.first_epoch.get_or_insert(epoch);
        let slot = match state.slots.get_mut(&record.key) {
            Some(slot) => slot,
            None => state
                .slots
                .entry(record.key.clone())
                .or_insert_with(|| (self.agg.init(&record.value), false)),
        };
        self.agg.add(&mut slot.0, &record.value);
        if !std::mem::replace(&mut slot.1, true) {
            state.touched.push(record.key);
        }
    }

    fn on_watermark(
        &mut self,
        state: &mut Self::State,
        watermark: EventTime,
        _out: &mut KeyedOutput<'_, T, Self::Out>,
    ) {
        // Results go out at commit time, one per key however many epochs changed it.
        state.watermark = watermark;
    }

    fn on_commit(&mut self, state: &mut Self::State, out: &mut KeyedOutput<'_, T, Self::Out>) {
        self.emit_touched(state, out);
    }

    fn on_end_of_input(
        &mut self,
        state: &mut Self::State,
        out: &mut KeyedOutput<'_, T, Self::Out>,
    ) {
        self.emit_touched(state, out);
    }

    fn hold(&self, state: &Self::State) -> Option<Epoch> {
        // The state never closes: it needs every record of the shard.
        state.first_epoch
    }
}
