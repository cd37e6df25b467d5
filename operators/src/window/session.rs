//! Session windows: a key's records closer than a gap form one window; the operator merges
//! sessions as records bridge them.

use std::time::Duration;

use rustc_hash::FxHashMap;
use shardflow_core::checkpoint::Epoch;
use shardflow_core::position::EventTime;
use shardflow_core::sink::Window;
use shardflow_core::topology::{KeyedOperator, KeyedOutput, KeyedRecord, Mode, SavedState};

use super::{admission, clamped, emit_result, millis, Admission, WindowAssigner, WindowResult};
use crate::aggregate::Aggregator;
use crate::key::Key;
use crate::snapshot::{decode, encode};

/// Sessions of activity separated by at least `gap` without records.
#[derive(Clone, Copy, Debug)]
pub struct SessionWindow {
    gap: i64,
}

impl SessionWindow {
    /// Sessions separated by `gap`.
    ///
    /// # Panics
    /// If `gap` is under a millisecond.
    pub fn with_gap(gap: Duration) -> Self {
        let gap = millis(gap);
        assert!(gap > 0, "a session gap is at least 1 ms");
        Self { gap }
    }
}

impl WindowAssigner for SessionWindow {
    fn describe(&self) -> String {
        format!("window-session-{}", super::span(self.gap))
    }

    fn assign(&self, t: EventTime, out: &mut Vec<Window>) {
        out.push(Window::new(t, t.saturating_add(self.gap)));
    }

    fn session_gap(&self) -> Option<i64> {
        Some(self.gap)
    }
}

pub(crate) struct SessionOperator<K, T, A, W> {
    assigner: W,
    agg: A,
    lateness: i64,
    _p: std::marker::PhantomData<fn(K, T)>,
}

impl<K, T, A, W> SessionOperator<K, T, A, W> {
    pub(crate) fn new(assigner: W, agg: A, lateness: i64) -> Self {
        Self {
            assigner,
            agg,
            lateness,
            _p: std::marker::PhantomData,
        }
    }
}

pub(crate) struct Session<Acc> {
    window: Window,
    acc: Acc,
    first_epoch: Epoch,
    fired: bool,
    dirty: bool,
}

/// Sessions of one shard, per key, sorted by start and never overlapping.
pub(crate) struct SessionState<K, Acc> {
    keys: FxHashMap<K, Vec<Session<Acc>>>,
}

impl<K, Acc> Default for SessionState<K, Acc> {
    fn default() -> Self {
        Self {
            keys: FxHashMap::default(),
        }
    }
}

/// Emits session `s` of `key` and marks it fired.
fn emit_session<K: Key, T, A: Aggregator<T>>(
    agg: &A,
    key: &K,
    s: &mut Session<A::Acc>,
    watermark: EventTime,
    out: &mut KeyedOutput<'_, T, WindowResult<K, A::Out>>,
) {
    emit_result(out, key, s.window, watermark, agg.result(&s.acc));
    s.fired = true;
    s.dirty = false;
}

impl<K: Key, T: Send + 'static, A: Aggregator<T>, W: WindowAssigner> KeyedOperator
    for SessionOperator<K, T, A, W>
{
    type Key = K;
    type In = T;
    type Out = WindowResult<K, A::Out>;
    type State = SessionState<K, A::Acc>;

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
        if record.watermark == EventTime::MAX {
            // Untimely (`RecordCx::watermark`): late, and it moves nothing.
            return out.late(record);
        }
        let gap = self.assigner.session_gap().unwrap_or(1);
        let t = i128::from(record.event_time);
        let window = clamped(t, t + i128::from(gap));
        // What the watermark at the record's arrival completed is decided before the record
        // counts, so that merges depend on the shard's record order only, never on where
        // epochs end: fire the key's sessions it passed, drop those it closed.
        let sessions = state.keys.entry(record.key.clone()).or_default();
        for s in sessions.iter_mut() {
            if s.window.end <= record.watermark && (!s.fired || s.dirty) {
                emit_session(&self.agg, &record.key, s, record.watermark, out);
            }
        }
        sessions.retain(|s| s.window.end.saturating_add(self.lateness) > record.watermark);
        if admission(window, self.lateness, record.watermark) == Admission::Late {
            if sessions.is_empty() {
                state.keys.remove(&record.key);
            }
            return out.late(record);
        }
        let mut merged = Session {
            window,
            acc: self.agg.init(&record.value),
            first_epoch: epoch,
            fired: false,
            dirty: false,
        };
        self.agg.add(&mut merged.acc, &record.value);
        // Absorb every session the new one touches; the result is one session again.
        let mut kept = Vec::with_capacity(sessions.len() + 1);
        for s in sessions.drain(..) {
            if s.window.start <= merged.window.end && merged.window.start <= s.window.end {
                merged.window = Window::new(
                    merged.window.start.min(s.window.start),
                    merged.window.end.max(s.window.end),
                );
                self.agg.merge(&mut merged.acc, s.acc);
                merged.first_epoch = merged.first_epoch.min(s.first_epoch);
                // A session that grew is a new output; a fired one it replaces stays as it was.
            } else {
                kept.push(s);
            }
        }
        kept.push(merged);
        kept.sort_by_key(|s| s.window.start);
        *sessions = kept;
    }

    fn on_watermark(
        &mut self,
        state: &mut Self::State,
        watermark: EventTime,
        out: &mut KeyedOutput<'_, T, Self::Out>,
    ) {
        let mut empty = Vec::new();
        for (key, sessions) in state.keys.iter_mut() {
            for s in sessions.iter_mut() {
                if s.window.end <= watermark && (!s.fired || s.dirty) {
                    emit_session(&self.agg, key, s, watermark, out);
                }
            }
            sessions.retain(|s| s.window.end.saturating_add(self.lateness) > watermark);
            if sessions.is_empty() {
                empty.push(key.clone());
            }
        }
        for key in empty {
            state.keys.remove(&key);
        }
    }

    fn on_end_of_input(
        &mut self,
        state: &mut Self::State,
        out: &mut KeyedOutput<'_, T, Self::Out>,
    ) {
        for (key, sessions) in state.keys.iter_mut() {
            for s in sessions.iter_mut().filter(|s| !s.fired || s.dirty) {
                emit_session(&self.agg, key, s, EventTime::MAX, out);
            }
        }
    }

    fn hold(&self, state: &Self::State) -> Option<Epoch> {
        state.keys.values().flatten().map(|s| s.first_epoch).min()
    }

    const SNAPSHOTS: bool = true;

    fn save(&self, state: &Self::State) -> Result<SavedState, String> {
        let keys: Vec<(&K, Vec<SavedSession<'_, A::Acc>>)> = state
            .keys
            .iter()
            .map(|(key, sessions)| {
                let sessions = sessions
                    .iter()
                    .map(|s| (s.window, &s.acc, s.fired, s.dirty))
                    .collect();
                (key, sessions)
            })
            .collect();
        let count = keys.len() as u64;
        let kind = format!(
            "session-windows {} lateness={}ms",
            self.assigner.describe(),
            self.lateness
        );
        let bytes = encode(&kind, &keys)?;
        Ok(SavedState { bytes, keys: count })
    }

    fn restore(
        &self,
        state: &mut Self::State,
        part: &[u8],
        owns: &dyn Fn(&K) -> bool,
        held_from: Epoch,
    ) -> Result<u64, String> {
        type Entries<K, Acc> = Vec<(K, Vec<(Window, Acc, bool, bool)>)>;
        let kind = format!(
            "session-windows {} lateness={}ms",
            self.assigner.describe(),
            self.lateness
        );
        let keys: Entries<K, A::Acc> = decode(&kind, part)?;
        let mut taken = 0;
        for (key, sessions) in keys {
            if !owns(&key) || sessions.is_empty() {
                continue;
            }
            let sessions = sessions
                .into_iter()
                .map(|(window, acc, fired, dirty)| Session {
                    window,
                    acc,
                    first_epoch: held_from,
                    fired,
                    dirty,
                })
                .collect();
            state.keys.insert(key, sessions);
            taken += 1;
        }
        Ok(taken)
    }
}

/// A session as a snapshot part holds it: its window, accumulator, and whether it fired and
/// changed since.
type SavedSession<'a, Acc> = (Window, &'a Acc, bool, bool);
