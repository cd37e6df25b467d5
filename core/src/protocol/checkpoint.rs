//! Checkpoint progress: pure decisions of how far a shard's checkpoint may advance.
//!
//! A shard's input is cut into epochs (one per read batch). Every path from the shard to a sink
//! (the shard task's own sinks and dead letters, and each keyed worker of each keyed branch)
//! reports, after its sinks committed, the last epoch whose outputs are durable and the oldest
//! epoch its operator state still holds at that point. The checkpoint's `committed` position is
//! the end of the last epoch every path committed; its `rebuild_from` position is the end of the
//! epoch before the oldest held one, so that a restart rebuilds every open window. No I/O here.

use std::collections::{BTreeMap, VecDeque};

use crate::lease::{CheckpointPosition, ShardCheckpoint};
use crate::position::{EventTime, RecordPosition};
use crate::sink::Held;

/// An epoch number: the n-th batch a shard task read in this run, from 1.
pub type Epoch = u64;

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
    /// Whether it only rebuilds state (up to the resumed `committed` position).
    pub replay: bool,
    /// Whether it is the shard's last.
    pub shard_end: bool,
}

#[derive(Clone, Debug)]
struct EpochEnd {
    anchor: Anchor,
}

#[derive(Clone, Debug, Default)]
struct PathState {
    committed: Epoch,
    /// Oldest held epoch as of each reported epoch not yet below the committed checkpoint.
    holds: VecDeque<(Epoch, Option<Epoch>)>,
}

/// Tracks one shard's epochs and the progress of every path, and derives its checkpoint.
#[derive(Clone, Debug)]
pub struct ShardProgress {
    start: Anchor,
    resumed: ShardCheckpoint,
    epochs: BTreeMap<Epoch, EpochEnd>,
    paths: Vec<PathState>,
    last_epoch: Epoch,
    replay_end: Epoch,
    shard_end: Option<Epoch>,
    /// Where sinks of the shard's own path let the checkpoint stop (`SinkWriter::held`).
    holds: Vec<Held>,
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
            resumed,
            epochs: BTreeMap::new(),
            paths: vec![PathState::default(); paths],
            last_epoch: 0,
            replay_end: 0,
            shard_end: None,
            holds: Vec::new(),
        }
    }

    /// Registers the next epoch: it ends at `read.last` (or where the previous one ended, for
    /// an empty final batch). Epochs marked `replay` only rebuild state; `shard_end` marks the
    /// last.
    ///
    /// # Panics
    /// If `epoch` is not the next epoch number, a broken invariant of the shard task.
    pub fn record_epoch(&mut self, epoch: Epoch, read: EpochRead) {
        assert_eq!(epoch, self.last_epoch + 1, "epochs are registered in order");
        let previous = self.anchor(self.last_epoch);
        let position = match read.last {
            Some(p) => CheckpointPosition::At(p),
            None => previous
                .as_ref()
                .map_or(CheckpointPosition::Initial, |a| a.position.clone()),
        };
        let before = previous.map_or(0, |a| a.read);
        self.epochs.insert(
            epoch,
            EpochEnd {
                anchor: Anchor {
                    position,
                    watermark: read.watermark,
                    read: before + read.records as u64,
                },
            },
        );
        self.last_epoch = epoch;
        if read.replay {
            self.replay_end = epoch;
        }
        if read.shard_end {
            self.shard_end = Some(epoch);
        }
    }

    /// Records read in this run that `checkpoint` (the last one written, or the resumed one)
    /// does not cover: what a crash now would read again, besides rebuilding open windows.
    pub fn lag(&self, checkpoint: &CheckpointPosition) -> u64 {
        let read = self.anchor(self.last_epoch).map_or(0, |a| a.read);
        if *checkpoint == CheckpointPosition::ShardEnd {
            return 0;
        }
        let covered = self
            .anchor(self.epoch_through(checkpoint))
            .map_or(0, |a| a.read);
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
        state.holds.push_back((epoch, hold));
    }

    /// Where the sinks of the shard's own path let the checkpoint stop, one [`Held`] per
    /// sink that constrains it (none: no constraint). Replaces the previous ones; returns
    /// whether they changed.
    pub fn hold_back(&mut self, holds: Vec<Held>) -> bool {
        let changed = self.holds != holds;
        self.holds = holds;
        changed
    }

    /// The furthest position at or before `position` every holding sink lets the checkpoint
    /// stop at: snapping for one sink can land inside another's unit, so until no sink moves it.
    fn stop_at(&self, position: &CheckpointPosition) -> CheckpointPosition {
        let mut at = position.clone();
        loop {
            let next = self
                .holds
                .iter()
                .fold(at.clone(), |at, h| h.snap(&at, &self.resumed.committed));
            if next == at {
                return at;
            }
            at = next;
        }
    }

    /// The last epoch every path committed.
    pub fn committed_epoch(&self) -> Epoch {
        self.paths.iter().map(|p| p.committed).min().unwrap_or(0)
    }

    /// Whether every path committed the shard's final epoch with no state left: the shard may
    /// be checkpointed at `SHARD_END` and its children may start.
    pub fn is_finished(&self) -> bool {
        self.holds.iter().all(|h| !h.buffered)
            && self
                .shard_end
                .is_some_and(|end| self.committed_epoch() >= end && self.hold_at(end).is_none())
    }

    /// The checkpoint the shard may advance to, or `None` while it may not move past the
    /// checkpoint it resumed from (nothing committed yet, or still replaying).
    pub fn checkpoint(&self) -> Option<ShardCheckpoint> {
        if self.is_finished() {
            return Some(ShardCheckpoint::shard_end());
        }
        let committed = self.committed_epoch();
        if committed == 0 || committed < self.replay_end {
            return None;
        }
        let mut end = self.anchor(committed)?;
        let mut rebuild = match self.hold_at(committed) {
            None => end.clone(),
            Some(held) => self.anchor(held.saturating_sub(1).min(committed))?,
        };
        if !self.holds.is_empty() {
            let stop = self.stop_at(&end.position);
            if stop != end.position {
                // The checkpoint moves back into epoch `through + 1`: the watermark and the
                // operator state as of the end of epoch `through` describe it safely (a
                // lower watermark re-emits, never skips; older holds rebuild more, never
                // less), plus whatever that epoch's records up to the stop opened.
                let through = self.epoch_through(&stop);
                let before = self.anchor(through)?;
                rebuild = match self.hold_at(through) {
                    None => before.clone(),
                    Some(held) => self.anchor(held.saturating_sub(1).min(through))?,
                };
                end = Anchor {
                    position: stop,
                    watermark: before.watermark,
                    read: before.read,
                };
            }
            if !rebuild.position.le(&end.position) {
                rebuild = end.clone();
            }
        }
        let checkpoint = ShardCheckpoint {
            committed: end.position,
            committed_watermark: end.watermark,
            rebuild_from: rebuild.position,
            rebuild_watermark: rebuild.watermark,
        };
        (checkpoint != self.resumed).then_some(checkpoint)
    }

    /// Forgets what no future checkpoint needs: epochs before the current rebuild point and
    /// hold reports before the committed epoch.
    pub fn prune(&mut self) {
        let mut committed = self.committed_epoch();
        if committed < self.replay_end || committed == 0 {
            return;
        }
        if !self.holds.is_empty() {
            // A held-back checkpoint sits in an earlier epoch: keep what it is derived from.
            if let Some(end) = self.anchor(committed) {
                committed = committed.min(self.epoch_through(&self.stop_at(&end.position)));
            }
        }
        for path in &mut self.paths {
            while path.holds.len() > 1 && path.holds[1].0 <= committed {
                path.holds.pop_front();
            }
        }
        let keep_from = match self.hold_at(committed) {
            Some(held) => held.saturating_sub(1).min(committed),
            None => committed,
        };
        if keep_from > 0 {
            if let Some(anchor) = self.anchor(keep_from) {
                // Epochs before `keep_from` are never a rebuild point again: holds only grow.
                self.start = anchor;
                self.epochs = self.epochs.split_off(&keep_from);
                self.epochs.remove(&keep_from);
                self.epochs.insert(
                    keep_from,
                    EpochEnd {
                        anchor: self.start.clone(),
                    },
                );
            }
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
            .take_while(|(_, e)| e.anchor.position.le(position))
            .last()
            .map_or(0, |(epoch, _)| *epoch)
    }

    fn anchor(&self, epoch: Epoch) -> Option<Anchor> {
        if epoch == 0 {
            return Some(self.start.clone());
        }
        self.epochs.get(&epoch).map(|e| e.anchor.clone())
    }
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
    fn read(
        last: Option<RecordPosition>,
        watermark: Option<EventTime>,
        replay: bool,
        shard_end: bool,
    ) -> EpochRead {
        EpochRead {
            last,
            records: 10,
            watermark,
            replay,
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

    #[test]
    fn a_sink_holding_outputs_back_stops_the_checkpoint_at_its_last_cut_mid_epoch() {
        let mut p = progress(1, 3);
        p.report(0, 3, None);
        p.hold_back(vec![held(&[7, 15], true)]);
        let cp = p.checkpoint().expect("moves to the cut");
        assert_eq!(cp.committed, at(15));
        assert_eq!(
            cp.committed_watermark,
            Some(100),
            "the watermark of the last epoch end before the cut"
        );
        assert_eq!(
            cp.rebuild_from,
            at(10),
            "state rebuilt from the epoch end before the stop"
        );
        p.prune();
        assert_eq!(
            p.checkpoint().unwrap().committed,
            at(15),
            "pruning keeps it"
        );
        p.hold_back(vec![held(&[15], false)]);
        assert_eq!(
            p.checkpoint().unwrap().committed,
            at(30),
            "nothing buffered: free after the last cut"
        );
    }

    #[test]
    fn a_lagging_path_never_puts_the_checkpoint_inside_a_stored_unit() {
        let mut p = progress(2, 3);
        // The sink's own path is through epoch 3 with units ending at 12 and 26; another
        // path only through epoch 2 (position 20), inside the unit 13..=26.
        p.report(0, 3, None);
        p.report(1, 2, None);
        p.hold_back(vec![held(&[12, 26], false)]);
        assert_eq!(p.checkpoint().unwrap().committed, at(12));
        // Two holding sinks: stops valid for both (their cuts interleave).
        p.report(1, 3, None);
        p.hold_back(vec![held(&[10, 20], true), held(&[15, 30], false)]);
        assert_eq!(
            p.checkpoint(),
            None,
            "no common cut after the resumed start"
        );
        p.hold_back(vec![held(&[10, 20], true), held(&[10, 30], true)]);
        assert_eq!(p.checkpoint().unwrap().committed, at(10));
    }

    #[test]
    fn a_checkpoint_held_back_to_an_earlier_epoch_rebuilds_what_was_open_then() {
        let mut p = progress(2, 3);
        p.report(0, 3, None);
        // The keyed path: a window opened in epoch 1 and closed in epoch 3.
        p.report(1, 1, Some(1));
        p.report(1, 2, Some(1));
        p.report(1, 3, Some(3));
        p.hold_back(vec![held(&[15], true)]);
        let cp = p.checkpoint().unwrap();
        assert_eq!(cp.committed, at(15));
        assert_eq!(
            cp.rebuild_from,
            CheckpointPosition::Initial,
            "the window open at position 15 is rebuilt from its first epoch"
        );
        p.prune();
        assert_eq!(p.checkpoint().unwrap(), cp, "pruning keeps the decision");
    }

    #[test]
    fn nothing_durable_yet_keeps_the_resumed_checkpoint_and_the_shard_unfinished() {
        let mut p = progress(1, 2);
        p.record_epoch(3, read(None, Some(300), false, true));
        p.report(0, 3, None);
        p.hold_back(vec![held(&[], true)]);
        assert_eq!(p.checkpoint(), None, "no move past the resumed point");
        assert!(!p.is_finished(), "buffered outputs keep the shard open");
        p.hold_back(Vec::new());
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
    fn replay_epochs_never_move_the_checkpoint_back() {
        let resumed = ShardCheckpoint {
            committed: at(30),
            committed_watermark: Some(300),
            rebuild_from: at(10),
            rebuild_watermark: Some(100),
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
}
