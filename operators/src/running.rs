//! The running (unwindowed) keyed aggregate: state per (shard, key), emitted per batch.

use rustc_hash::FxHashMap;
use shardflow_core::checkpoint::Epoch;
use shardflow_core::position::EventTime;
use shardflow_core::topology::{
    Ident, KeyedOperator, KeyedOutput, KeyedRecord, Mode, RecordCx, SavedState,
};

use crate::aggregate::Aggregator;
use crate::key::Key;
use crate::keyed::KeyedValue;
use crate::snapshot::{decode, encode};

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

    const SNAPSHOTS: bool = true;

    fn save(&self, state: &Self::State) -> Result<SavedState, String> {
        // Saved right after a commit: every change was emitted, nothing is owed.
        let entries: Vec<(&K, &A::Acc)> =
            state.slots.iter().map(|(k, (acc, _))| (k, acc)).collect();
        let keys = entries.len() as u64;
        let bytes = encode(KIND, &(state.watermark, entries))?;
        Ok(SavedState { bytes, keys })
    }

    fn restore(
        &self,
        state: &mut Self::State,
        part: &[u8],
        owns: &dyn Fn(&K) -> bool,
        held_from: Epoch,
    ) -> Result<u64, String> {
        let (watermark, entries): (EventTime, Vec<(K, A::Acc)>) = decode(KIND, part)?;
        state.watermark = state.watermark.max(watermark);
        let mut taken = 0;
        for (key, acc) in entries {
            if owns(&key) {
                state.slots.insert(key, (acc, false));
                taken += 1;
            }
        }
        if !state.slots.is_empty() {
            // The snapshot holds every record up to the resume point: the state needs it.
            state.first_epoch = Some(state.first_epoch.map_or(held_from, |e| e.min(held_from)));
        }
        Ok(taken)
    }
}

/// The kind a running aggregate's snapshot parts say they hold.
const KIND: &str = "running-aggregate";
