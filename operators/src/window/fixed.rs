//! The operator behind tumbling and sliding windows: per shard, windows ordered by time, each
//! holding a slot per key.

use std::collections::VecDeque;

use std::hash::BuildHasher;

use hashbrown::HashTable;
use rustc_hash::FxBuildHasher;
use shardflow_core::checkpoint::Epoch;
use shardflow_core::position::EventTime;
use shardflow_core::sink::Window;
use shardflow_core::topology::{KeyedOperator, KeyedOutput, KeyedRecord, Mode, SavedState};

use super::{admission, emit_result, Admission, WindowAssigner, WindowResult};
use crate::aggregate::Aggregator;
use crate::key::Key;
use crate::snapshot::{decode, encode};

pub(crate) struct FixedWindows<K, T, A, W> {
    assigner: W,
    agg: A,
    lateness: i64,
    scratch: Vec<Window>,
    _p: std::marker::PhantomData<fn(K, T)>,
}

impl<K, T, A, W> FixedWindows<K, T, A, W> {
    pub(crate) fn new(assigner: W, agg: A, lateness: i64) -> Self {
        Self {
            assigner,
            agg,
            lateness,
            scratch: Vec::new(),
            _p: std::marker::PhantomData,
        }
    }
}

pub(crate) struct Slot<Acc> {
    acc: Acc,
    dirty: bool,
}

pub(crate) struct WindowState<K, Acc> {
    /// (key, slot) by the key's Fx hash: one hash and one probe per record, and a key is cloned
    /// only when it first enters the window.
    slots: HashTable<(K, Slot<Acc>)>,
    first_epoch: Epoch,
    fired: bool,
    dirty: bool,
}

/// Windows of one shard, sorted by start. All windows of an assigner have one size, so this
/// orders them by end too: the windows a watermark closes are a prefix, and the window most
/// records fall in is at the back.
pub(crate) struct FixedState<K, Acc> {
    windows: VecDeque<(Window, WindowState<K, Acc>)>,
    /// Keys the last closed window had: new windows start with room for as many.
    key_hint: usize,
    /// Index of the window the last record went to: the next one most likely goes there too.
    last: usize,
}

impl<K, Acc> FixedState<K, Acc> {
    /// The state of `window`, created (starting at `epoch`) if absent.
    #[inline]
    fn window_mut(&mut self, window: Window, epoch: Epoch) -> &mut WindowState<K, Acc> {
        if self
            .windows
            .get(self.last)
            .is_some_and(|(w, _)| *w == window)
        {
            return &mut self.windows[self.last].1;
        }
        // Searching from the back finds the current window in a step or two.
        let at = match self
            .windows
            .iter()
            .rposition(|(w, _)| w.start <= window.start)
        {
            Some(i) if self.windows[i].0 == window => i,
            found => {
                let at = found.map_or(0, |i| i + 1);
                let slots = HashTable::with_capacity(self.key_hint + self.key_hint / 4);
                let state = WindowState {
                    slots,
                    first_epoch: epoch,
                    fired: false,
                    dirty: false,
                };
                self.windows.insert(at, (window, state));
                at
            }
        };
        self.last = at;
        &mut self.windows[at].1
    }
}

impl<K, Acc> Default for FixedState<K, Acc> {
    fn default() -> Self {
        Self {
            windows: VecDeque::new(),
            key_hint: 0,
            last: 0,
        }
    }
}

impl<K: Key, T: Send + 'static, A: Aggregator<T>, W: WindowAssigner> FixedWindows<K, T, A, W> {
    /// What its snapshot parts say they hold: the windows and the lateness, so that a part of
    /// other windows (the size changed, say) is refused rather than restored into these.
    fn kind(&self) -> String {
        format!(
            "fixed-windows {} lateness={}ms",
            self.assigner.describe(),
            self.lateness
        )
    }

    /// Folds `record` into its slot of `window`.
    #[inline]
    fn add(
        &self,
        state: &mut FixedState<K, A::Acc>,
        window: Window,
        record: &KeyedRecord<K, T>,
        epoch: Epoch,
    ) {
        let w = state.window_mut(window, epoch);
        let hash = FxBuildHasher.hash_one(&record.key);
        let slot = match w.slots.find_mut(hash, |(k, _)| *k == record.key) {
            Some((_, slot)) => slot,
            None => {
                let slot = Slot {
                    acc: self.agg.init(&record.value),
                    dirty: false,
                };
                let entry = w
                    .slots
                    .insert_unique(hash, (record.key.clone(), slot), |(k, _)| {
                        FxBuildHasher.hash_one(k)
                    });
                &mut entry.into_mut().1
            }
        };
        self.agg.add(&mut slot.acc, &record.value);
        if w.fired {
            slot.dirty = true;
            w.dirty = true;
        }
    }

    fn emit_window(
        agg: &A,
        window: Window,
        state: &mut WindowState<K, A::Acc>,
        watermark: EventTime,
        out: &mut KeyedOutput<'_, T, WindowResult<K, A::Out>>,
    ) {
        let all = !state.fired;
        for (key, slot) in &mut state.slots {
            if all || slot.dirty {
                slot.dirty = false;
                emit_result(out, key, window, watermark, agg.result(&slot.acc));
            }
        }
        state.fired = true;
        state.dirty = false;
    }
}

impl<K: Key, T: Send + 'static, A: Aggregator<T>, W: WindowAssigner> KeyedOperator
    for FixedWindows<K, T, A, W>
{
    type Key = K;
    type In = T;
    type Out = WindowResult<K, A::Out>;
    type State = FixedState<K, A::Acc>;

    fn on_record(
        &mut self,
        state: &mut Self::State,
        record: KeyedRecord<K, T>,
        epoch: Epoch,
        mode: Mode,
        out: &mut KeyedOutput<'_, T, Self::Out>,
    ) {
        // Replayed records are judged exactly as live ones; the runtime drops what they emit.
        let _ = mode;
        if let Some(window) = self.assigner.single(record.event_time) {
            match admission(window, self.lateness, record.watermark) {
                Admission::Open => self.add(state, window, &record, epoch),
                Admission::Late => out.late(record),
            }
            return;
        }
        self.scratch.clear();
        self.assigner.assign(record.event_time, &mut self.scratch);
        let mut accepted = false;
        for i in 0..self.scratch.len() {
            let window = self.scratch[i];
            if admission(window, self.lateness, record.watermark) == Admission::Open {
                accepted = true;
                self.add(state, window, &record, epoch);
            }
        }
        if !accepted {
            out.late(record);
        }
    }

    fn on_watermark(
        &mut self,
        state: &mut Self::State,
        watermark: EventTime,
        out: &mut KeyedOutput<'_, T, Self::Out>,
    ) {
        for (window, w) in &mut state.windows {
            if window.end > watermark {
                break;
            }
            if !w.fired || w.dirty {
                Self::emit_window(&self.agg, *window, w, watermark, out);
            }
        }
        while let Some((window, _)) = state.windows.front() {
            if window.end.saturating_add(self.lateness) > watermark {
                break;
            }
            if let Some((_, w)) = state.windows.pop_front() {
                state.key_hint = w.slots.len();
            }
        }
    }

    fn on_end_of_input(
        &mut self,
        state: &mut Self::State,
        out: &mut KeyedOutput<'_, T, Self::Out>,
    ) {
        for (window, w) in &mut state.windows {
            if !w.fired || w.dirty {
                Self::emit_window(&self.agg, *window, w, EventTime::MAX, out);
            }
        }
    }

    fn hold(&self, state: &Self::State) -> Option<Epoch> {
        state.windows.iter().map(|(_, w)| w.first_epoch).min()
    }

    const SNAPSHOTS: bool = true;

    fn save(&self, state: &Self::State) -> Result<SavedState, String> {
        let mut keys = 0;
        let windows: Vec<SavedWindow<'_, K, A::Acc>> = state
            .windows
            .iter()
            .map(|(window, w)| {
                keys += w.slots.len() as u64;
                SavedWindow {
                    window: *window,
                    fired: w.fired,
                    slots: w.slots.iter().map(|(k, s)| (k, &s.acc, s.dirty)).collect(),
                }
            })
            .collect();
        let bytes = encode(&self.kind(), &windows)?;
        Ok(SavedState { bytes, keys })
    }

    fn restore(
        &self,
        state: &mut Self::State,
        part: &[u8],
        owns: &dyn Fn(&K) -> bool,
        held_from: Epoch,
    ) -> Result<u64, String> {
        type Entries<K, Acc> = Vec<(Window, bool, Vec<(K, Acc, bool)>)>;
        let windows: Entries<K, A::Acc> = decode(&self.kind(), part)?;
        let mut taken = 0;
        for (window, fired, slots) in windows {
            let mut slots = slots.into_iter().filter(|(k, _, _)| owns(k)).peekable();
            if slots.peek().is_none() {
                // None of its keys is this worker's: as if the window never had a record here.
                continue;
            }
            let w = state.window_mut(window, held_from);
            w.first_epoch = w.first_epoch.min(held_from);
            w.fired |= fired;
            for (key, acc, dirty) in slots {
                let hash = FxBuildHasher.hash_one(&key);
                w.dirty |= dirty;
                w.slots
                    .insert_unique(hash, (key, Slot { acc, dirty }), |(k, _)| {
                        FxBuildHasher.hash_one(k)
                    });
                taken += 1;
            }
        }
        Ok(taken)
    }
}

/// A window as a snapshot part holds it: whether it fired, and each key's accumulator and
/// whether a late record changed it since.
#[derive(serde::Serialize)]
struct SavedWindow<'a, K, Acc> {
    window: Window,
    fired: bool,
    slots: Vec<(&'a K, &'a Acc, bool)>,
}
