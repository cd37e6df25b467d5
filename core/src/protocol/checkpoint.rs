//! Checkpoint progress: pure decisions of how far a shard's checkpoint may advance.
//!
//! A shard's input is cut into epochs (one per read batch, or an empty one that only says
//! something about the shard). Every path from the shard to its sinks (the shard task's own
//! sinks and dead letters, and each keyed worker of each keyed branch) reports, after its
//! sinks committed, the last epoch whose outputs are durable and the oldest epoch its operator
//! state still holds at that point. The checkpoint's `committed` position is the end of the
//! last epoch every path committed; its `rebuild_from` position is the end of an epoch before
//! the oldest one held then, so that a restart rebuilds every open window.
//!
//! Sinks that gather record outputs into units across commits (S3 objects) are tracked one by
//! one: each has its own position, the end of its last stored unit or, when it buffers
//! nothing, the end of the last epoch it was given. A replay writes to such a sink only the
//! outputs of records after its own position, so that it starts a new unit exactly where its
//! last stored one ended, whatever the other sinks' units and whatever the other paths did.
//!
//! Memory stays bounded: epochs before the rebuild point are forgotten, and when a shard's
//! state holds one epoch for long (a running aggregate holds its first for ever) the epochs in
//! between are thinned, keeping the newest exact; a thinned rebuild or commit point is an
//! earlier epoch's end, which rebuilds and re-emits more, never less. No I/O here.

use std::collections::{BTreeMap, VecDeque};

use crate::lease::{
    CheckpointPosition, LeaseEpoch, ShardCheckpoint, SnapshotPart, SnapshotRef, WatermarkAdvance,
};
use crate::position::{EventTime, RecordPosition};
use crate::sink::Held;

/// An epoch number: the n-th batch a shard task read in this run, from 1.
pub type Epoch = u64;

/// Epoch ends kept per shard at most; beyond it the older half is thinned.
const MAX_ANCHORS: usize = 512;
/// The newest epoch ends never thinned: commits and sink positions land among them.
const EXACT_ANCHORS: usize = 128;
/// Watermark advances decided on processing time kept per shard at most.
const MAX_ADVANCES: usize = 256;
/// Snapshots (complete or not) kept per shard at most; beyond it the oldest goes (a restart
/// then restores a newer one, or rebuilds by replay where none is early enough).
const MAX_SNAPSHOTS: usize = 32;
/// Hold reports kept per path at most; beyond it the older ones are merged (keeping the
/// oldest hold of those merged, which rebuilds more, never less).
const MAX_HOLD_REPORTS: usize = 512;

/// A point of a shard's input: a position and the watermark right after it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Anchor {
    position: CheckpointPosition,
    watermark: Option<EventTime>,
    /// Records read in this run up to here.
    read: u64,
}

/// One epoch as the shard task read it.
#[derive(Clone, Debug)]
pub struct EpochRead {
    /// The position of its last record (`None` for an empty batch).
    pub last: Option<RecordPosition>,
    /// How many records it holds.
    pub records: usize,
    /// The shard's watermark after it.
    pub watermark: Option<EventTime>,
    /// Whether it is the shard's last.
    pub shard_end: bool,
}

#[derive(Clone, Debug, Default)]
struct PathState {
    committed: Epoch,
    /// Oldest held epoch as of each reported epoch not yet below the committed checkpoint.
    holds: VecDeque<(Epoch, Option<Epoch>)>,
}

/// A sink on the shard's own path that holds record outputs back (`SinkWriter::held`).
#[derive(Clone, Debug)]
struct HoldingSink {
    /// What it said after the shard path committed epoch `at`.
    held: Held,
    at: Epoch,
    /// The furthest position known to be a valid place for it to resume after: a stop once
    /// valid stays valid (units after it start after it).
    floor: CheckpointPosition,
}

/// Tracks one shard's epochs and the progress of every path, and derives its checkpoint.
#[derive(Clone, Debug)]
pub struct ShardProgress {
    start: Anchor,
    resumed: ShardCheckpoint,
    epochs: BTreeMap<Epoch, Anchor>,
    paths: Vec<PathState>,
    last_epoch: Epoch,
    shard_end: Option<Epoch>,
    /// Holding sinks of the shard's own path, by name.
    sinks: BTreeMap<String, HoldingSink>,
    /// Watermark advances decided on processing time since the rebuild point, oldest first.
    advances: Vec<WatermarkAdvance>,
    /// The last checkpoint decided (at first, the resumed one).
    last: ShardCheckpoint,
    /// Snapshots of the keyed state, if the topology keeps them.
    snapshots: Option<Snapshots>,
    /// The epoch of the last `hold_back` (0: none yet).
    last_hold_back: Epoch,
    /// The rebuild epoch of the last checkpoint decided (0: none yet): no checkpoint this life
    /// decided names a snapshot taken after it.
    decided_rebuild: Epoch,
}

/// The snapshots of one shard's keyed state a life knows of: the one it resumed from (as of
/// epoch 0, the resume point) and those its keyed paths took since, by epoch. A snapshot is
/// complete once every keyed path reported its part; only a complete one is ever named.
#[derive(Clone, Debug)]
struct Snapshots {
    life: LeaseEpoch,
    /// Paths that write parts: every path but the shard's own (path 0).
    keyed_paths: usize,
    /// Parts by epoch, then by path.
    taken: BTreeMap<Epoch, BTreeMap<usize, SnapshotPart>>,
    /// The snapshot the life resumed from, standing for the state as of epoch 0.
    resumed: Option<SnapshotRef>,
    /// Parts of snapshots forgotten since the last `take_garbage`.
    garbage: Vec<String>,
}

impl Snapshots {
    /// The complete snapshot taken after `epoch`, if there is one.
    fn complete(&self, epoch: Epoch) -> Option<SnapshotRef> {
        if epoch == 0 {
            return self.resumed.clone();
        }
        let parts = self.taken.get(&epoch)?;
        let complete = parts.len() == self.keyed_paths
            // A mutation check: a snapshot some keyed paths never stored a part of is named.
            || cfg!(shardflow_mutation = "incomplete_snapshots");
        complete.then(|| SnapshotRef {
            lease_epoch: self.life,
            epoch,
            // Filled in by `ShardProgress::rebuild_point`, which knows where epochs end.
            position: CheckpointPosition::Initial,
            watermark: None,
            parts: parts.values().cloned().collect(),
        })
    }

    /// The newest complete snapshot taken at or before `limit`.
    fn newest_through(&self, limit: Epoch) -> Option<(Epoch, SnapshotRef)> {
        self.taken
            .range(..=limit)
            .rev()
            .find_map(|(e, _)| self.complete(*e).map(|s| (*e, s)))
            .or_else(|| self.resumed.clone().map(|s| (0, s)))
    }
}

impl ShardProgress {
    /// Progress of a shard resumed from `resumed`, with `paths` paths reporting.
    ///
    /// # Panics
    /// If `paths` is zero: a topology without a sink does not build.
    pub fn new(resumed: ShardCheckpoint, paths: usize) -> Self {
        assert!(paths > 0, "a shard has at least one path to a sink");
        Self {
            start: Anchor {
                position: resumed.rebuild_from.clone(),
                watermark: resumed.rebuild_watermark,
                read: 0,
            },
            epochs: BTreeMap::new(),
            paths: vec![PathState::default(); paths],
            last_epoch: 0,
            shard_end: None,
            // A sink's resumed position stands until it says more: it may not write (or even
            // open) before the replay passes its position.
            sinks: resumed
                .sinks
                .iter()
                .map(|(name, p)| {
                    let sink = HoldingSink {
                        held: Held::default(),
                        at: 0,
                        floor: p.clone(),
                    };
                    (name.clone(), sink)
                })
                .collect(),
            advances: resumed.advances.clone(),
            last: resumed.clone(),
            resumed,
            snapshots: None,
            last_hold_back: 0,
            decided_rebuild: 0,
        }
    }

    /// Keeps snapshots of the keyed state, taken by the life `life` on every path but the
    /// shard's own: a checkpoint may then name one instead of rebuilding by replay from the
    /// state's oldest record.
    #[must_use]
    pub fn with_snapshots(mut self, life: LeaseEpoch) -> Self {
        self.snapshots = Some(Snapshots {
            life,
            keyed_paths: self.paths.len() - 1,
            taken: BTreeMap::new(),
            resumed: self.resumed.snapshot.clone(),
            garbage: Vec::new(),
        });
        self
    }

    /// Path `path` stored its part of the snapshot taken right after `epoch` (before it
    /// reports the epoch). Ignored without [`with_snapshots`](Self::with_snapshots), or for
    /// an epoch already forgotten.
    pub fn snapshot_part(&mut self, path: usize, epoch: Epoch, part: SnapshotPart) {
        let oldest = self.start_epoch();
        let Some(snapshots) = self.snapshots.as_mut() else {
            return;
        };
        // A part of an epoch whose end was thinned away (a worker that lagged far behind)
        // cannot be named: the checkpoint would rebuild from an earlier end than it stands for.
        if path == 0 || epoch == 0 || epoch < oldest || !self.epochs.contains_key(&epoch) {
            return;
        }
        snapshots.taken.entry(epoch).or_default().insert(path, part);
        if snapshots.taken.len() > MAX_SNAPSHOTS {
            // The oldest may be the one the last checkpoint named: it stays. Of the others an
            // incomplete one goes first (it can never be named), else the oldest.
            let keyed_paths = snapshots.keyed_paths;
            let mut others = snapshots.taken.iter().skip(1);
            let victim = others
                .clone()
                .find(|(e, parts)| parts.len() < keyed_paths && **e != epoch)
                .or_else(|| others.next())
                .map(|(e, _)| *e)
                .expect("over the limit");
            let parts = snapshots.taken.remove(&victim).expect("a key just read");
            snapshots
                .garbage
                .extend(parts.into_values().map(|p| p.name));
        }
    }

    /// The first epoch still kept (0: none forgotten yet).
    fn start_epoch(&self) -> Epoch {
        self.epochs.keys().next().copied().unwrap_or(0)
    }

    /// Where a checkpoint with `committed` may rebuild from: the epoch before the oldest one
    /// the state held at `committed`, unless a complete snapshot at or after that epoch and
    /// at or before `limit` (the commit, and every holding sink's position) stands for the
    /// state there; then that snapshot's epoch, and the snapshot.
    fn rebuild_point(&self, committed: Epoch, limit: Epoch) -> (Epoch, Option<SnapshotRef>) {
        let by_replay = match self.hold_at(committed) {
            Some(held) => held.saturating_sub(1).min(committed),
            None => committed,
        };
        let by_replay = by_replay.min(limit);
        match self
            .snapshots
            .as_ref()
            .and_then(|s| s.newest_through(limit.min(committed)))
        {
            Some((epoch, mut snapshot))
                if by_replay <= epoch && !cfg!(shardflow_mutation = "ignore_snapshots") =>
            {
                if epoch > 0 {
                    let end = self.anchor(epoch);
                    snapshot.position = end.position;
                    snapshot.watermark = end.watermark;
                }
                (epoch, Some(snapshot))
            }
            _ => (by_replay, None),
        }
    }

    /// The part names of the snapshots taken after the rebuild point of every checkpoint this
    /// life decided: none of them was ever named, so once the life ends (its checkpoints
    /// written or not) no checkpoint will name them.
    pub fn unnamed_parts(&self) -> Vec<String> {
        let Some(snapshots) = &self.snapshots else {
            return Vec::new();
        };
        let after = self.decided_rebuild.saturating_add(1);
        snapshots
            .taken
            .range(after..)
            .flat_map(|(_, parts)| parts.values().map(|p| p.name.clone()))
            .collect()
    }

    /// The part names of snapshots no checkpoint decided from now on names, and no checkpoint
    /// decided before: once the checkpoint decided last is written, the state store may delete
    /// them (the one written before may still name some until then).
    pub fn take_garbage(&mut self) -> Vec<String> {
        self.snapshots
            .as_mut()
            .map(|s| std::mem::take(&mut s.garbage))
            .unwrap_or_default()
    }

    /// Registers the next epoch: it ends at `read.last` (or where the previous one ended, for
    /// an empty batch). Epochs marked `replay` only rebuild state; `shard_end` marks the last.
    ///
    /// # Panics
    /// If `epoch` is not the next epoch number, a broken invariant of the shard task.
    pub fn record_epoch(&mut self, epoch: Epoch, read: EpochRead) {
        assert_eq!(epoch, self.last_epoch + 1, "epochs are registered in order");
        let previous = self.anchor(self.last_epoch);
        let position = match read.last {
            Some(p) => CheckpointPosition::At(p),
            None => previous.position.clone(),
        };
        self.epochs.insert(
            epoch,
            Anchor {
                position,
                watermark: read.watermark,
                read: previous.read + read.records as u64,
            },
        );
        self.last_epoch = epoch;
        if read.shard_end {
            self.shard_end = Some(epoch);
        }
        self.thin();
    }

    /// Records read in this run that `checkpoint` (the last one written, or the resumed one)
    /// does not cover: what a crash now would read again, besides rebuilding open windows.
    pub fn lag(&self, checkpoint: &CheckpointPosition) -> u64 {
        if *checkpoint == CheckpointPosition::ShardEnd {
            return 0;
        }
        let read = self.anchor(self.last_epoch).read;
        let covered = self.anchor(self.epoch_through(checkpoint)).read;
        read.saturating_sub(covered)
    }

    /// Path `path` committed every output derived from epochs up to `epoch`; at that point
    /// its operator state held epochs from `hold` on (`None`: no state derived from this shard).
    ///
    /// # Panics
    /// If `path` is out of range or reports go backwards, broken invariants of the runtime.
    pub fn report(&mut self, path: usize, epoch: Epoch, hold: Option<Epoch>) {
        let state = &mut self.paths[path];
        assert!(
            epoch >= state.committed,
            "path {path} reported epoch {epoch} after {}",
            state.committed
        );
        state.committed = epoch;
        if state.holds.len() >= MAX_HOLD_REPORTS {
            // Merge the two oldest reports: the earlier epoch with the older hold, so that
            // the state at every epoch from the first on is said to hold at least as much as
            // it did (under the later epoch, the epochs in between would find no report).
            let (e, first) = state.holds.pop_front().expect("full");
            let (_, second) = state.holds.pop_front().expect("full");
            let oldest = match (first, second) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            state.holds.push_front((e, oldest));
        }
        state.holds.push_back((epoch, hold));
    }

    /// What the holding sinks of the shard's own path said after the shard path committed
    /// epoch `at`, by sink name; a sink that said nothing of the shard holds nothing of it
    /// (it stored everything, at shard end say). Returns whether anything changed.
    pub fn hold_back(&mut self, at: Epoch, holds: Vec<(String, Held)>) -> bool {
        let mut changed = false;
        for (name, sink) in &mut self.sinks {
            if !holds.iter().any(|(n, _)| n == name) {
                changed |= sink.held != Held::default();
                sink.held = Held::default();
                sink.at = at;
            }
        }
        // A sink that said nothing of the shard when asked last held nothing of it then: what
        // it holds now came after, so it may resume after that epoch (at the earliest, after
        // its resumed position). The resumed position alone may lie before the epochs kept.
        let before = self.anchor(self.last_hold_back).position;
        self.last_hold_back = at;
        for (name, held) in holds {
            let resumed = self
                .resumed
                .sinks
                .get(&name)
                .unwrap_or(&self.resumed.committed)
                .clone();
            let floor = if resumed.le(&before) {
                before.clone()
            } else {
                resumed
            };
            let sink = self.sinks.entry(name).or_insert_with(|| {
                changed = true;
                HoldingSink {
                    held: Held::default(),
                    at,
                    floor,
                }
            });
            if sink.held != held || sink.at != at {
                changed |= sink.held != held;
                sink.held = held;
                sink.at = at;
            }
        }
        changed
    }

    /// The last epoch every path committed.
    pub fn committed_epoch(&self) -> Epoch {
        self.paths.iter().map(|p| p.committed).min().unwrap_or(0)
    }

    /// Whether every path committed the shard's final epoch with no state left: the shard may
    /// be checkpointed at `SHARD_END` and its children may start.
    pub fn is_finished(&self) -> bool {
        self.sinks.values().all(|s| !s.held.buffered)
            && self
                .shard_end
                .is_some_and(|end| self.committed_epoch() >= end && self.hold_at(end).is_none())
    }

    /// Where holding sink `sink` may resume after: the end of its last stored unit, or the end
    /// of the last epoch it was given if it buffers nothing; never before an earlier answer.
    fn sink_position(&self, sink: &HoldingSink) -> CheckpointPosition {
        let now = if sink.held.buffered {
            sink.held
                .cuts
                .last()
                .map(|c| CheckpointPosition::At(c.clone()))
        } else {
            Some(self.anchor(sink.at).position)
        };
        match now {
            Some(p) if sink.floor.le(&p) => p,
            _ => sink.floor.clone(),
        }
    }

    /// The checkpoint the shard may advance to, or `None` while it may not move past the
    /// checkpoint it resumed from (nothing committed yet, or still replaying). Positions it
    /// returns are never taken back.
    pub fn checkpoint(&mut self) -> Option<ShardCheckpoint> {
        if self.is_finished() {
            // A shard at its end holds no state: no snapshot of it is needed again.
            if let Some(snapshots) = self.snapshots.as_mut() {
                let taken = std::mem::take(&mut snapshots.taken);
                let names = taken.into_values().flat_map(BTreeMap::into_values);
                snapshots.garbage.extend(names.map(|p| p.name));
                let resumed = snapshots.resumed.take().into_iter();
                let names = resumed.flat_map(|s| s.parts.into_iter().map(|p| p.name));
                snapshots.garbage.extend(names);
            }
            return Some(ShardCheckpoint::shard_end());
        }
        let committed = self.committed_epoch();
        let end = self.anchor(committed);
        if committed == 0 || !at_or_past(&self.last, &end) {
            // Still replaying (or stopped mid-replay): the resumed checkpoint stands. Or the
            // committed epoch's end was thinned away while a path lagged: an earlier epoch's
            // end would take back a position already written.
            return None;
        }
        let positions: Vec<(String, CheckpointPosition)> = self
            .sinks
            .iter()
            .map(|(name, s)| (name.clone(), self.sink_position(s)))
            .collect();
        for (name, p) in &positions {
            if let Some(s) = self.sinks.get_mut(name) {
                s.floor = p.clone();
            }
        }
        // Reading restarts early enough for every sink and for the state held at `committed`
        // (or at a snapshot of it).
        let mut limit = committed;
        for (_, p) in &positions {
            if !end.position.le(p) {
                limit = limit.min(self.epoch_through(p));
            }
        }
        let (rebuild, snapshot) = self.rebuild_point(committed, limit);
        self.decided_rebuild = self.decided_rebuild.max(rebuild);
        let rebuild = self.anchor(rebuild);
        let checkpoint = ShardCheckpoint {
            committed: end.position.clone(),
            committed_watermark: end.watermark,
            rebuild_from: rebuild.position,
            rebuild_watermark: rebuild.watermark,
            sinks: positions
                .into_iter()
                // A mutation check (forget_sink_positions): holding sinks resume where the
                // shard does.
                .filter(|(_, p)| {
                    *p != end.position && !cfg!(shardflow_mutation = "forget_sink_positions")
                })
                .collect(),
            advances: Vec::new(),
            snapshot,
        };
        let checkpoint = ShardCheckpoint {
            advances: self.advances_from(&checkpoint.rebuild_from),
            ..checkpoint
        };
        if checkpoint == self.resumed {
            return None;
        }
        self.last = checkpoint.clone();
        Some(checkpoint)
    }

    /// Records a watermark advance decided on processing time. Advances with no record
    /// between them are one (the later watermark). Returns false, recording nothing, if
    /// `MAX_ADVANCES` are already kept (a state that holds its first epoch for ever between
    /// many quiet spells): the shard then waits for records instead.
    pub fn record_advance(&mut self, advance: WatermarkAdvance) -> bool {
        let full = self.advances.len() >= MAX_ADVANCES;
        match self.advances.last_mut() {
            Some(last) if last.after == advance.after => {
                last.watermark = last.watermark.max(advance.watermark);
                true
            }
            _ if full => false,
            _ => {
                self.advances.push(advance);
                true
            }
        }
    }

    /// The checkpoint to write now so that the advances recorded are durable: the one the
    /// shard may advance to, or the last one decided with them.
    pub fn with_advances(&mut self) -> ShardCheckpoint {
        match self.checkpoint() {
            Some(cp) => cp,
            None => {
                let mut cp = self.last.clone();
                cp.advances = self.advances_from(&cp.rebuild_from);
                cp
            }
        }
    }

    /// The advances a replay from `rebuild_from` makes again (earlier ones are in its
    /// watermark).
    fn advances_from(&self, rebuild_from: &CheckpointPosition) -> Vec<WatermarkAdvance> {
        self.advances
            .iter()
            .filter(|a| rebuild_from.le(&a.after))
            .cloned()
            .collect()
    }

    /// Forgets what no future checkpoint needs: epochs before the current rebuild point and
    /// hold reports before the committed epoch.
    pub fn prune(&mut self) {
        let committed = self.committed_epoch();
        if committed == 0 || !self.past_resumed(&self.anchor(committed)) {
            return;
        }
        for path in &mut self.paths {
            while path.holds.len() > 1 && path.holds[1].0 <= committed {
                path.holds.pop_front();
            }
        }
        let mut limit = committed;
        for s in self.sinks.values() {
            limit = limit.min(self.epoch_through(&s.floor));
        }
        let (keep_from, named) = self.rebuild_point(committed, limit);
        let keep_from = self
            .epochs
            .range(..=keep_from)
            .next_back()
            .map_or(0, |(e, _)| *e);
        if keep_from > 0 {
            // Epochs before `keep_from` are never a rebuild point again: holds only grow and
            // sink positions only advance.
            self.start = self.anchor(keep_from);
            self.epochs = self.epochs.split_off(&keep_from);
            self.epochs.remove(&keep_from);
            self.epochs.insert(keep_from, self.start.clone());
        }
        let start = self.start.position.clone();
        self.advances.retain(|a| start.le(&a.after));
        if let Some(snapshots) = self.snapshots.as_mut() {
            // Older snapshots are never named again (the rebuild point never moves back); the
            // resumed one goes once the rebuild point passed it.
            let kept = snapshots.taken.split_off(&keep_from);
            let old = std::mem::replace(&mut snapshots.taken, kept);
            let names = old.into_values().flat_map(BTreeMap::into_values);
            snapshots.garbage.extend(names.map(|p| p.name));
            let resumed_named = named.is_some() && named == snapshots.resumed;
            if keep_from > 0 && !resumed_named {
                let resumed = snapshots.resumed.take().into_iter();
                let names = resumed.flat_map(|s| s.parts.into_iter().map(|p| p.name));
                snapshots.garbage.extend(names);
            }
        }
    }

    /// Whether the end of an epoch is at or past the checkpoint the shard resumed from: past
    /// its position, or at it with the watermark it had (epochs of watermark advances end
    /// where the record before them ended, so the position alone does not say whether the
    /// replay of the advances made there is over).
    fn past_resumed(&self, end: &Anchor) -> bool {
        at_or_past(&self.resumed, end)
    }

    /// Keeps the number of epoch ends bounded: beyond `MAX_ANCHORS`, every other one of the
    /// older ones goes (never the first, nor the newest `EXACT_ANCHORS`).
    fn thin(&mut self) {
        if self.epochs.len() <= MAX_ANCHORS {
            return;
        }
        let old: Vec<Epoch> = self
            .epochs
            .keys()
            .copied()
            .take(self.epochs.len() - EXACT_ANCHORS)
            .collect();
        let snapshot_taken = |e: &Epoch| {
            self.snapshots
                .as_ref()
                .is_some_and(|s| s.taken.contains_key(e))
        };
        let thinned: Vec<Epoch> = old
            .iter()
            .skip(1)
            .step_by(2)
            .copied()
            // A snapshot stands for the state at its epoch's exact end.
            .filter(|e| !snapshot_taken(e))
            .collect();
        for e in thinned {
            self.epochs.remove(&e);
        }
    }

    /// Oldest epoch any path held as of `epoch`.
    fn hold_at(&self, epoch: Epoch) -> Option<Epoch> {
        self.paths
            .iter()
            .filter_map(|path| {
                // The last report at or before `epoch` describes the state at `epoch`: a path
                // reports every epoch, so this is the report of `epoch` itself.
                path.holds
                    .iter()
                    .rev()
                    .find(|(e, _)| *e <= epoch)
                    .and_then(|(_, h)| *h)
            })
            .min()
    }

    /// The last epoch (0: the start) ending at or before `position`.
    fn epoch_through(&self, position: &CheckpointPosition) -> Epoch {
        self.epochs
            .iter()
            .take_while(|(_, a)| a.position.le(position))
            .last()
            .map_or(0, |(epoch, _)| *epoch)
    }

    /// The end of `epoch`, or of the last epoch kept before it (thinned ones are gone: an
    /// earlier end rebuilds and re-emits more, never less).
    fn anchor(&self, epoch: Epoch) -> Anchor {
        self.epochs
            .range(..=epoch)
            .next_back()
            .map_or_else(|| self.start.clone(), |(_, a)| a.clone())
    }

    /// Epoch ends kept (for tests of the memory bound).
    pub fn tracked_epochs(&self) -> usize {
        self.epochs.len()
    }
}

/// Whether the end of an epoch is at or past `checkpoint`'s committed point: past its
/// position, or at it with at least its watermark.
fn at_or_past(checkpoint: &ShardCheckpoint, end: &Anchor) -> bool {
    if end.position == checkpoint.committed {
        return end.watermark >= checkpoint.committed_watermark;
    }
    checkpoint.committed.le(&end.position)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::SequenceNumber;

    fn pos(n: u128) -> RecordPosition {
        RecordPosition::new(SequenceNumber::from_u128(n))
    }

    fn at(n: u128) -> CheckpointPosition {
        CheckpointPosition::At(pos(n))
    }

    /// An epoch of ten records.
    /// (`_replay` says what the epoch is to the reader of the test; the tracker needs not know:
    /// a replay ends where the resumed checkpoint is.)
    fn read(
        last: Option<RecordPosition>,
        watermark: Option<EventTime>,
        _replay: bool,
        shard_end: bool,
    ) -> EpochRead {
        EpochRead {
            last,
            records: 10,
            watermark,
            shard_end,
        }
    }

    /// Epoch `e` ends at sequence `10 * e` with watermark `100 * e`.
    fn progress(paths: usize, epochs: u64) -> ShardProgress {
        let mut p = ShardProgress::new(ShardCheckpoint::initial(), paths);
        for e in 1..=epochs {
            p.record_epoch(
                e,
                read(
                    Some(pos(u128::from(e) * 10)),
                    Some(100 * e as i64),
                    false,
                    false,
                ),
            );
        }
        p
    }

    fn held(cuts: &[u128], buffered: bool) -> Held {
        Held {
            cuts: cuts.iter().map(|n| pos(*n)).collect(),
            buffered,
        }
    }

    fn one(name: &str, h: Held) -> Vec<(String, Held)> {
        vec![(name.to_owned(), h)]
    }

    #[test]
    fn a_sink_holding_outputs_back_resumes_at_its_last_cut_and_reading_restarts_before_it() {
        let mut p = progress(1, 3);
        p.report(0, 3, None);
        p.hold_back(3, one("s3", held(&[7, 15], true)));
        let cp = p.checkpoint().expect("moves");
        assert_eq!(cp.committed, at(30), "every path committed epoch 3");
        assert_eq!(
            cp.sinks.get("s3"),
            Some(&at(15)),
            "the sink resumes after its cut"
        );
        assert_eq!(
            (cp.rebuild_from.clone(), cp.rebuild_watermark),
            (at(10), Some(100)),
            "reading restarts at the epoch end before the cut"
        );
        p.prune();
        assert_eq!(p.checkpoint(), Some(cp), "pruning keeps the decision");
        p.hold_back(3, one("s3", held(&[15], false)));
        let cp = p.checkpoint().unwrap();
        assert_eq!(cp.committed, at(30));
        assert!(
            cp.sinks.is_empty(),
            "nothing buffered: the sink is where the shard is"
        );
        assert_eq!(cp.rebuild_from, at(30));
    }

    #[test]
    fn two_holding_sinks_whose_cuts_never_meet_let_the_checkpoint_advance() {
        let mut p = progress(1, 3);
        p.report(0, 3, None);
        p.hold_back(
            3,
            vec![
                ("a".into(), held(&[7, 21], true)),
                ("b".into(), held(&[15, 25], true)),
            ],
        );
        let cp = p.checkpoint().unwrap();
        assert_eq!(cp.committed, at(30));
        assert_eq!(cp.sinks.get("a"), Some(&at(21)));
        assert_eq!(cp.sinks.get("b"), Some(&at(25)));
        assert_eq!(cp.rebuild_from, at(20), "before the earliest sink position");
    }

    #[test]
    fn a_sink_position_never_moves_back_when_it_buffers_again() {
        let mut p = progress(1, 4);
        p.report(0, 3, None);
        // After epoch 3 the sink stored everything (its last unit ended at 27; nothing after).
        p.hold_back(3, one("s3", held(&[27], false)));
        let cp = p.checkpoint().unwrap();
        assert_eq!(cp.committed, at(30));
        assert!(cp.sinks.is_empty());
        p.prune();
        // Epoch 4 starts a unit the sink buffers: its last cut is still 27, but 30 stays valid.
        p.report(0, 4, None);
        p.hold_back(4, one("s3", held(&[27], true)));
        let cp = p.checkpoint().unwrap();
        assert_eq!(cp.committed, at(40));
        assert_eq!(cp.sinks.get("s3"), Some(&at(30)), "never before 30 again");
        assert_eq!(cp.rebuild_from, at(30));
    }

    #[test]
    fn a_sink_ahead_of_a_lagging_path_keeps_its_own_position() {
        let mut p = progress(2, 3);
        p.report(0, 3, None);
        p.report(1, 1, None);
        p.hold_back(3, one("s3", held(&[25], true)));
        let cp = p.checkpoint().unwrap();
        assert_eq!(
            cp.committed,
            at(10),
            "the keyed path committed only epoch 1"
        );
        assert_eq!(
            cp.sinks.get("s3"),
            Some(&at(25)),
            "the sink skips what its stored units hold on replay"
        );
        assert_eq!(cp.rebuild_from, at(10));
    }

    #[test]
    fn a_resumed_sink_position_is_where_the_sink_starts() {
        let mut resumed = ShardCheckpoint {
            committed: at(30),
            committed_watermark: Some(300),
            rebuild_from: at(10),
            rebuild_watermark: Some(100),
            sinks: BTreeMap::new(),
            advances: Vec::new(),
            snapshot: None,
        };
        resumed.sinks.insert("s3".into(), at(15));
        let mut p = ShardProgress::new(resumed, 1);
        p.record_epoch(1, read(Some(pos(30)), Some(300), true, false));
        p.record_epoch(2, read(Some(pos(40)), Some(400), false, false));
        p.report(0, 2, None);
        // The replay gave the sink records 16..=30: still buffered, no new cut.
        p.hold_back(2, one("s3", held(&[], true)));
        let cp = p.checkpoint().unwrap();
        assert_eq!(cp.committed, at(40));
        assert_eq!(
            cp.sinks.get("s3"),
            Some(&at(15)),
            "the resumed position holds"
        );
        assert_eq!(cp.rebuild_from, at(10));
    }

    #[test]
    fn a_resumed_sink_position_stands_until_the_sink_says_more() {
        let mut resumed = ShardCheckpoint::initial();
        resumed.committed = at(10);
        resumed.rebuild_from = at(10);
        resumed.sinks.insert("s3".into(), at(25));
        let mut p = ShardProgress::new(resumed, 1);
        p.record_epoch(1, read(Some(pos(20)), Some(200), false, false));
        p.report(0, 1, None);
        // The sink wrote nothing yet (outputs up to 25 are in its stored units).
        let cp = p.checkpoint().unwrap();
        assert_eq!(cp.committed, at(20));
        assert_eq!(cp.sinks.get("s3"), Some(&at(25)), "not forgotten");
    }

    #[test]
    fn nothing_durable_yet_keeps_the_resumed_checkpoint_and_the_shard_unfinished() {
        let mut p = progress(1, 2);
        p.record_epoch(3, read(None, Some(300), false, true));
        p.report(0, 3, None);
        p.hold_back(3, one("s3", held(&[], true)));
        assert!(!p.is_finished(), "buffered outputs keep the shard open");
        let cp = p.checkpoint().unwrap();
        assert_eq!(cp.sinks.get("s3"), Some(&CheckpointPosition::Initial));
        assert_eq!(cp.rebuild_from, CheckpointPosition::Initial);
        p.hold_back(3, one("s3", held(&[20], false)));
        assert!(p.is_finished());
    }

    #[test]
    fn checkpoint_waits_for_sink_commit() {
        let mut p = progress(2, 3);
        assert_eq!(p.checkpoint(), None, "nothing committed");
        p.report(0, 3, None);
        assert_eq!(
            p.checkpoint(),
            None,
            "one of two paths committed nothing yet"
        );
        p.report(1, 2, None);
        let cp = p.checkpoint().unwrap();
        assert_eq!(cp.committed, at(20), "the slower path decides");
        assert_eq!(cp.committed_watermark, Some(200));
        assert_eq!(
            cp.rebuild_from,
            at(20),
            "no state held: rebuild from the commit point"
        );
    }

    #[test]
    fn open_windows_hold_the_rebuild_point_back() {
        let mut p = progress(1, 5);
        p.report(0, 5, Some(3)); // a window holds records of epoch 3 onwards
        let cp = p.checkpoint().unwrap();
        assert_eq!(cp.committed, at(50));
        assert_eq!(cp.rebuild_from, at(20), "rebuild starts after epoch 2");
        assert_eq!(cp.rebuild_watermark, Some(200));
    }

    #[test]
    fn rebuild_point_uses_the_hold_as_of_the_committed_epoch() {
        let mut p = progress(2, 6);
        p.report(0, 4, Some(2));
        p.report(0, 6, Some(5)); // by epoch 6 the window of epoch 2 closed
        p.report(1, 4, None);
        let cp = p.checkpoint().unwrap();
        assert_eq!(cp.committed, at(40));
        assert_eq!(
            cp.rebuild_from,
            at(10),
            "at epoch 4 the window from epoch 2 was still open"
        );
    }

    #[test]
    fn hold_from_the_first_epoch_rebuilds_from_the_resumed_point() {
        let resumed = ShardCheckpoint {
            committed: at(7),
            committed_watermark: Some(70),
            rebuild_from: at(5),
            rebuild_watermark: Some(50),
            sinks: BTreeMap::new(),
            advances: Vec::new(),
            snapshot: None,
        };
        let mut p = ShardProgress::new(resumed, 1);
        p.record_epoch(1, read(Some(pos(7)), Some(70), true, false));
        p.record_epoch(2, read(Some(pos(9)), Some(90), false, false));
        p.report(0, 1, Some(1));
        assert_eq!(p.checkpoint(), None, "a replay epoch changes nothing");
        p.report(0, 2, Some(1));
        let cp = p.checkpoint().unwrap();
        assert_eq!(cp.committed, at(9));
        assert_eq!((cp.rebuild_from, cp.rebuild_watermark), (at(5), Some(50)));
    }

    #[test]
    fn a_replay_stopped_half_way_leaves_the_resumed_checkpoint() {
        let mut resumed = ShardCheckpoint {
            committed: at(30),
            committed_watermark: Some(300),
            rebuild_from: at(10),
            rebuild_watermark: Some(100),
            sinks: BTreeMap::new(),
            advances: Vec::new(),
            snapshot: None,
        };
        resumed.sinks.insert("s3".into(), at(25));
        let mut p = ShardProgress::new(resumed, 1);
        p.record_epoch(1, read(Some(pos(20)), Some(200), true, false));
        p.report(0, 1, None);
        p.hold_back(1, one("s3", held(&[], false)));
        assert_eq!(p.checkpoint(), None, "20 is before the resumed 30");
        p.prune();
        p.record_epoch(2, read(Some(pos(40)), Some(400), false, false));
        p.report(0, 2, None);
        p.hold_back(2, one("s3", held(&[], true)));
        let cp = p.checkpoint().unwrap();
        assert_eq!(cp.committed, at(40));
        assert_eq!(
            cp.sinks.get("s3"),
            Some(&at(25)),
            "the sink's own position holds"
        );
    }

    #[test]
    fn a_replay_is_over_only_when_the_advances_at_its_last_record_are_made_again() {
        let mut resumed = ShardCheckpoint::initial();
        resumed.committed = at(20);
        resumed.committed_watermark = Some(500);
        let mut p = ShardProgress::new(resumed, 1);
        p.record_epoch(1, read(Some(pos(20)), Some(200), true, false));
        p.report(0, 1, None);
        // At the resumed position but before its watermark: the idle advance made after record
        // 20 (to 500) is not replayed yet.
        assert_eq!(p.checkpoint(), None, "never back to watermark 200 at 20");
        p.record_epoch(2, read(None, Some(500), true, false));
        p.report(0, 2, None);
        let cp = p.checkpoint().expect("the rebuild point moves up");
        assert_eq!((cp.committed, cp.committed_watermark), (at(20), Some(500)));
        p.record_epoch(3, read(Some(pos(30)), Some(600), false, false));
        p.report(0, 3, None);
        assert_eq!(p.checkpoint().unwrap().committed, at(30));
    }

    #[test]
    fn replay_epochs_never_move_the_checkpoint_back() {
        let resumed = ShardCheckpoint {
            committed: at(30),
            committed_watermark: Some(300),
            rebuild_from: at(10),
            rebuild_watermark: Some(100),
            sinks: BTreeMap::new(),
            advances: Vec::new(),
            snapshot: None,
        };
        let mut p = ShardProgress::new(resumed, 1);
        p.record_epoch(1, read(Some(pos(20)), Some(200), true, false));
        p.record_epoch(2, read(Some(pos(30)), Some(300), true, false));
        p.report(0, 1, Some(1));
        assert_eq!(p.checkpoint(), None);
        p.report(0, 2, Some(1));
        assert_eq!(p.checkpoint(), None, "same as resumed");
    }

    #[test]
    fn shard_end_needs_every_path_and_no_state() {
        let mut p = progress(2, 2);
        p.record_epoch(3, read(None, Some(300), false, true));
        p.report(0, 3, None);
        p.report(1, 3, Some(2));
        assert!(!p.is_finished(), "state still held");
        assert_ne!(p.checkpoint(), Some(ShardCheckpoint::shard_end()));
        p.report(1, 3, None);
        assert!(p.is_finished());
        assert_eq!(p.checkpoint(), Some(ShardCheckpoint::shard_end()));
    }

    #[test]
    fn empty_final_epoch_ends_where_the_previous_ended() {
        let mut p = progress(1, 1);
        p.record_epoch(2, read(None, Some(100), false, false));
        p.report(0, 2, Some(2));
        let cp = p.checkpoint().unwrap();
        assert_eq!(cp.committed, at(10));
        assert_eq!(cp.rebuild_from, at(10));
    }

    #[test]
    fn pruning_keeps_every_later_decision_unchanged() {
        let mut pruned = progress(1, 4);
        let mut full = pruned.clone();
        for (epoch, hold) in [(2, Some(2)), (3, Some(2)), (4, Some(4))] {
            pruned.report(0, epoch, hold);
            full.report(0, epoch, hold);
            pruned.prune();
            assert_eq!(pruned.checkpoint(), full.checkpoint());
        }
        for e in 5..=8 {
            for p in [&mut pruned, &mut full] {
                p.record_epoch(
                    e,
                    read(
                        Some(pos(u128::from(e) * 10)),
                        Some(100 * e as i64),
                        false,
                        false,
                    ),
                );
                p.report(0, e, Some(e - 1));
            }
            pruned.prune();
            assert_eq!(pruned.checkpoint(), full.checkpoint());
        }
        assert!(
            pruned.epochs.len() <= 3,
            "pruned to a few epochs: {:?}",
            pruned.epochs.keys()
        );
    }

    #[test]
    fn a_state_held_for_ever_keeps_memory_bounded_and_its_rebuild_point() {
        let mut p = progress(1, 0);
        for e in 1..=100_000u64 {
            p.record_epoch(
                e,
                read(
                    Some(pos(u128::from(e) * 10)),
                    Some(100 * e as i64),
                    false,
                    false,
                ),
            );
            p.report(0, e, Some(1)); // a running aggregate holds its first epoch for ever
            if e % 7 == 0 {
                let cp = p.checkpoint().unwrap();
                assert_eq!(cp.rebuild_from, CheckpointPosition::Initial);
                assert_eq!(cp.committed, at(u128::from(e) * 10), "commits stay exact");
                p.prune();
            }
        }
        assert!(p.tracked_epochs() <= MAX_ANCHORS, "{}", p.tracked_epochs());
        assert!(p.paths[0].holds.len() <= MAX_HOLD_REPORTS);
    }

    #[test]
    fn a_path_far_ahead_of_another_keeps_the_holds_of_the_epochs_the_other_is_at() {
        let mut p = progress(2, 600);
        // Path 0 runs far ahead: more reports than are kept, all holding epoch 3 on.
        p.report(0, 1, None);
        p.report(0, 2, None);
        for e in 3..=600 {
            p.report(0, e, Some(3));
        }
        p.report(1, 50, None);
        let cp = p.checkpoint().unwrap();
        // (Epoch ends are thinned past 512 epochs: a point may be an earlier epoch's end.)
        assert!(
            at(480).le(&cp.committed) && cp.committed.le(&at(500)),
            "the lagging path decides: {:?}",
            cp.committed
        );
        assert!(
            cp.rebuild_from.le(&at(20)),
            "at epoch 50 path 0 still held epoch 3: {:?}",
            cp.rebuild_from
        );
        assert!(p.paths[0].holds.len() <= MAX_HOLD_REPORTS);
    }

    #[test]
    fn a_checkpoint_never_moves_back_when_its_epoch_end_is_thinned() {
        let mut p = progress(2, 300);
        p.report(0, 300, None);
        p.report(1, 200, None);
        let cp = p.checkpoint().unwrap();
        assert_eq!(cp.committed, at(2000));
        // Path 0 runs on while path 1 stays: epoch 200's end is thinned away.
        for e in 301..=800u64 {
            p.record_epoch(
                e,
                read(
                    Some(pos(u128::from(e) * 10)),
                    Some(100 * e as i64),
                    false,
                    false,
                ),
            );
            p.report(0, e, None);
        }
        assert!(!p.epochs.contains_key(&200), "thinned");
        if let Some(later) = p.checkpoint() {
            assert!(
                at(2000).le(&later.committed),
                "moved back to {:?}",
                later.committed
            );
        }
        assert_eq!(p.with_advances().committed, at(2000));
        // Once the lagging path catches up, the checkpoint moves on.
        p.report(1, 800, None);
        assert_eq!(p.checkpoint().unwrap().committed, at(8000));
    }

    #[test]
    fn a_sink_that_never_cuts_keeps_memory_bounded() {
        let mut p = progress(1, 0);
        for e in 1..=50_000u64 {
            p.record_epoch(
                e,
                read(
                    Some(pos(u128::from(e) * 10)),
                    Some(100 * e as i64),
                    false,
                    false,
                ),
            );
            p.report(0, e, None);
            p.hold_back(e, one("s3", held(&[15], true)));
            let cp = p.checkpoint().unwrap();
            assert_eq!(cp.sinks.get("s3"), Some(&at(15)));
            assert_eq!(cp.rebuild_from, at(10));
            p.prune();
        }
        assert!(p.tracked_epochs() <= MAX_ANCHORS, "{}", p.tracked_epochs());
    }

    #[test]
    fn lag_counts_the_records_read_after_the_checkpoint() {
        let mut p = progress(1, 4);
        assert_eq!(
            p.lag(&CheckpointPosition::Initial),
            40,
            "nothing covered yet"
        );
        assert_eq!(p.lag(&at(20)), 20, "epochs 3 and 4");
        assert_eq!(
            p.lag(&at(25)),
            20,
            "mid-epoch: the partial epoch still counts"
        );
        assert_eq!(p.lag(&at(40)), 0);
        p.report(0, 4, Some(3));
        let cp = p.checkpoint().expect("moves");
        p.prune();
        assert_eq!(p.lag(&cp.committed), 0, "pruning keeps the counts");
        p.record_epoch(5, read(Some(pos(50)), Some(500), false, false));
        assert_eq!(p.lag(&cp.committed), 10);
        assert_eq!(p.lag(&CheckpointPosition::ShardEnd), 0);
    }

    fn part(path: usize, epoch: Epoch) -> SnapshotPart {
        SnapshotPart {
            operator: "count".into(),
            worker: path as u32,
            name: format!("p/{epoch}/{path}"),
            keys: 1,
            bytes: 10,
        }
    }

    const LIFE: LeaseEpoch = LeaseEpoch::new(1, 7);

    /// Every path commits epochs `from..=through`; the keyed paths (all but 0) hold epoch 1
    /// for ever, as a running aggregate does.
    fn running(p: &mut ShardProgress, paths: usize, from: Epoch, through: Epoch) {
        for e in from..=through {
            p.report(0, e, None);
            for path in 1..paths {
                p.report(path, e, Some(1));
            }
        }
    }

    #[test]
    fn a_complete_snapshot_moves_the_rebuild_point_to_it_and_an_incomplete_one_never() {
        let mut p = progress(3, 6).with_snapshots(LIFE);
        // Epoch 3: one keyed path of two stored its part. Epoch 5: both did.
        p.snapshot_part(1, 3, part(1, 3));
        p.snapshot_part(1, 5, part(1, 5));
        p.snapshot_part(2, 5, part(2, 5));
        running(&mut p, 3, 1, 4);
        let cp = p.checkpoint().expect("moved");
        assert_eq!(cp.committed, at(40));
        assert_eq!(
            cp.rebuild_from,
            CheckpointPosition::Initial,
            "no complete snapshot yet"
        );
        assert_eq!(cp.snapshot, None);
        running(&mut p, 3, 5, 6);
        let cp = p.checkpoint().expect("moved");
        assert_eq!(cp.committed, at(60));
        assert_eq!(
            cp.rebuild_from,
            at(50),
            "the snapshot stands for the state at epoch 5"
        );
        assert_eq!(cp.rebuild_watermark, Some(500));
        let snapshot = cp.snapshot.expect("named");
        assert_eq!((snapshot.lease_epoch, snapshot.epoch), (LIFE, 5));
        assert_eq!((snapshot.position, snapshot.watermark), (at(50), Some(500)));
        assert_eq!(snapshot.parts, vec![part(1, 5), part(2, 5)]);
    }

    #[test]
    fn without_snapshots_kept_parts_are_ignored() {
        let mut p = progress(2, 4);
        p.snapshot_part(1, 2, part(1, 2));
        running(&mut p, 2, 1, 4);
        let cp = p.checkpoint().expect("moved");
        assert_eq!(cp.rebuild_from, CheckpointPosition::Initial);
        assert_eq!(cp.snapshot, None);
    }

    #[test]
    fn a_snapshot_is_not_named_past_a_holding_sink() {
        let mut p = progress(2, 6).with_snapshots(LIFE);
        p.snapshot_part(1, 2, part(1, 2));
        p.snapshot_part(1, 5, part(1, 5));
        running(&mut p, 2, 1, 6);
        // A sink on the shard path stored a unit up to 30 and buffers what follows.
        p.hold_back(6, one("s3", held(&[30], true)));
        let cp = p.checkpoint().expect("moved");
        assert_eq!(
            cp.rebuild_from,
            at(20),
            "the newest snapshot at or before the sink"
        );
        assert_eq!(cp.snapshot.map(|s| s.epoch), Some(2));
    }

    #[test]
    fn state_that_needs_no_snapshot_names_none() {
        let mut p = progress(2, 4).with_snapshots(LIFE);
        p.snapshot_part(1, 2, part(1, 2));
        for e in 1..=4 {
            p.report(0, e, None);
            // A window opened at epoch 4 holds nothing older.
            p.report(1, e, (e == 4).then_some(4));
        }
        let cp = p.checkpoint().expect("moved");
        assert_eq!(
            cp.rebuild_from,
            at(30),
            "replay from the open window is shorter"
        );
        assert_eq!(cp.snapshot, None);
    }

    #[test]
    fn a_resumed_snapshot_stays_named_until_a_newer_one_and_then_is_garbage() {
        let resumed_snapshot = SnapshotRef {
            lease_epoch: LeaseEpoch::new(1, 3),
            epoch: 9,
            position: at(10),
            watermark: Some(100),
            parts: vec![part(1, 9)],
        };
        let resumed = ShardCheckpoint {
            committed: at(20),
            rebuild_from: at(10),
            rebuild_watermark: Some(100),
            snapshot: Some(resumed_snapshot.clone()),
            ..ShardCheckpoint::initial()
        };
        let mut p = ShardProgress::new(resumed, 2).with_snapshots(LIFE);
        for e in 1..=3 {
            let end = 10 + 10 * u128::from(e);
            p.record_epoch(
                e,
                read(Some(pos(end)), Some(100 + 100 * e as i64), false, false),
            );
        }
        // The restored state holds "epoch 1" (the first of the life) on.
        for e in 1..=3 {
            p.report(0, e, None);
            p.report(1, e, Some(1));
        }
        let cp = p.checkpoint().expect("moved past the resumed commit");
        assert_eq!(cp.committed, at(40));
        assert_eq!(cp.rebuild_from, at(10));
        assert_eq!(cp.snapshot.as_ref(), Some(&resumed_snapshot));
        p.prune();
        assert!(
            p.take_garbage().is_empty(),
            "the resumed snapshot is still named"
        );

        p.record_epoch(4, read(Some(pos(50)), Some(500), false, false));
        p.snapshot_part(1, 4, part(1, 4));
        p.report(0, 4, None);
        p.report(1, 4, Some(1));
        let cp = p.checkpoint().expect("moved");
        assert_eq!(cp.rebuild_from, at(50));
        assert_eq!(cp.snapshot.map(|s| s.epoch), Some(4));
        p.prune();
        assert_eq!(
            p.take_garbage(),
            vec!["p/9/1".to_owned()],
            "the resumed snapshot's parts go once a checkpoint names a newer one"
        );
    }

    #[test]
    fn thinning_keeps_the_end_of_every_snapshot_epoch() {
        let mut p = ShardProgress::new(ShardCheckpoint::initial(), 2).with_snapshots(LIFE);
        let total = (MAX_ANCHORS * 3) as u64;
        for e in 1..=total {
            p.record_epoch(
                e,
                read(Some(pos(u128::from(e) * 10)), Some(e as i64), false, false),
            );
            if e % 7 == 3 {
                p.snapshot_part(1, e, part(1, e));
            }
        }
        let taken: Vec<Epoch> = p
            .snapshots
            .as_ref()
            .unwrap()
            .taken
            .keys()
            .copied()
            .collect();
        assert_eq!(taken.len(), MAX_SNAPSHOTS, "snapshots kept are bounded");
        for e in taken {
            assert!(p.epochs.contains_key(&e), "snapshot epoch {e} kept exact");
        }
        assert!(p.tracked_epochs() < total as usize, "others are thinned");
    }

    #[test]
    fn a_holding_sink_seen_first_after_pruning_resumes_after_the_epoch_before() {
        // Seed 189 of the checker: a snapshot let the rebuild point move while no holding sink
        // had said anything; a dead-letter sink that then buffered a letter took the resumed
        // position (the start) as its own, before the epochs kept.
        let mut p = progress(2, 6).with_snapshots(LIFE);
        p.snapshot_part(1, 4, part(1, 4));
        for e in 1..=5 {
            // The runtime asks the sinks after every epoch of the shard path.
            p.hold_back(e, Vec::new());
            running(&mut p, 2, e, e);
        }
        let cp = p.checkpoint().expect("moved");
        assert_eq!(cp.rebuild_from, at(40));
        p.prune();
        p.hold_back(6, one("dead-letters", held(&[], true)));
        p.report(0, 6, None);
        p.report(1, 6, Some(1));
        let cp = p.checkpoint().expect("moved");
        assert_eq!(cp.committed, at(60));
        assert_eq!(cp.sinks.get("dead-letters"), Some(&at(50)));
        assert!(cp.rebuild_from.le(&at(50)), "{cp:?}");
    }

    #[test]
    fn a_shard_at_its_end_leaves_every_snapshot_behind() {
        let mut p = progress(2, 3).with_snapshots(LIFE);
        p.record_epoch(4, read(None, Some(400), false, true));
        p.snapshot_part(1, 2, part(1, 2));
        running(&mut p, 2, 1, 3);
        let cp = p.checkpoint().expect("moved");
        assert_eq!(cp.snapshot.map(|s| s.epoch), Some(2));
        p.prune();
        assert!(p.take_garbage().is_empty());
        p.report(0, 4, None);
        p.report(1, 4, None);
        assert_eq!(p.checkpoint(), Some(ShardCheckpoint::shard_end()));
        assert_eq!(p.take_garbage(), vec!["p/2/1".to_owned()]);
    }

    #[test]
    fn a_life_that_ends_leaves_the_snapshots_no_checkpoint_named() {
        let mut p = progress(2, 6).with_snapshots(LIFE);
        p.snapshot_part(1, 2, part(1, 2));
        p.snapshot_part(1, 5, part(1, 5));
        running(&mut p, 2, 1, 3);
        let cp = p.checkpoint().expect("moved");
        assert_eq!(cp.snapshot.map(|s| s.epoch), Some(2));
        assert_eq!(
            p.unnamed_parts(),
            vec!["p/5/1".to_owned()],
            "epoch 5 was never named; epoch 2 is (by the last checkpoint decided)"
        );
    }
}
