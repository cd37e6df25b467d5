//! The shared checkpoint tracker of one run: `ShardProgress` per shard behind a lock, with a
//! notification when paths report, each shard's lease guard (so that keyed workers write
//! nothing of a shard once its guard expired), and the lives keyed workers had to drop.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::lease::{
    CheckpointPosition, LeaseEpoch, ShardCheckpoint, SnapshotPart, WatermarkAdvance,
};
use crate::lease_guard::LeaseGuard;
use crate::position::{RecordPosition, ShardId};
use crate::protocol::checkpoint::{Epoch, EpochRead, ShardProgress};
use crate::sink::Held;

/// A path committed every output derived from `shard`'s epochs up to `epoch`; at that point
/// its state held records from epoch `hold` on. `lease_epoch` names the shard's life the
/// epochs belong to: a shard released and taken again counts its epochs from 1 again, and a
/// report of the earlier life must never count for the later one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Report {
    pub(crate) shard: ShardId,
    pub(crate) lease_epoch: LeaseEpoch,
    pub(crate) epoch: Epoch,
    pub(crate) hold: Option<Epoch>,
    /// The path's part of the snapshot taken right after `epoch`, stored before this report.
    pub(crate) part: Option<SnapshotPart>,
}

/// Why a keyed worker dropped a shard's life (its state and uncommitted outputs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum DropReason {
    /// A sink refused a write of it as fenced: another owner wrote the shard.
    Fenced,
    /// Its lease guard expired (or the life ended) before its outputs were written.
    GuardExpired,
    /// A sink failed, after its own retries, to commit outputs of it: the shard backs off.
    SinkFailed,
    /// The keyed operator (`stage`) panicked on the input record at `at`: the shard starts
    /// again at once, with that record dead-lettered before `key_by`.
    Panicked {
        /// The input record.
        at: RecordPosition,
        /// The operator's label.
        stage: Arc<str>,
    },
    /// The keyed path cannot go on with the shard and no record can be dead-lettered for
    /// it (a refused keyed result without a dead-letter sink that takes it, a panic outside
    /// any record): the shard stops there (`ShardStopped::KeyedPath`).
    Stop {
        /// What failed.
        reason: String,
    },
}

/// A shard's life a keyed worker dropped: the rest of the life cannot be processed right (that
/// path lost its state), so the worker ends it like a lost lease and looks at the table again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DroppedLife {
    pub(crate) shard: ShardId,
    pub(crate) lease_epoch: LeaseEpoch,
    pub(crate) reason: DropReason,
}

/// One shard's current life in this run.
struct Life {
    lease_epoch: LeaseEpoch,
    guard: LeaseGuard,
    progress: ShardProgress,
}

/// Progress of every shard this worker processes, with the lease epoch and guard of the
/// shard's current life. Cloning shares it.
#[derive(Clone, Default)]
pub(crate) struct Tracker {
    shards: Arc<Mutex<BTreeMap<ShardId, Life>>>,
    reported: Arc<Notify>,
    /// Lives keyed workers dropped, until the control loop takes them.
    dropped: Arc<Mutex<Vec<DroppedLife>>>,
    dropped_notify: Arc<Notify>,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ShardId, Life>> {
        self.shards
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn start_shard(
        &self,
        shard: &ShardId,
        lease_epoch: LeaseEpoch,
        guard: LeaseGuard,
        resumed: ShardCheckpoint,
        paths: usize,
        snapshots: bool,
    ) {
        let progress = ShardProgress::new(resumed, paths);
        let progress = if snapshots {
            progress.with_snapshots(lease_epoch)
        } else {
            progress
        };
        self.lock().insert(
            shard.clone(),
            Life {
                lease_epoch,
                guard,
                progress,
            },
        );
    }

    /// Whether outputs of `shard`'s life `lease_epoch` may still be written: it is the
    /// shard's current life and its lease guard is valid. A life that ended (finished,
    /// released, forgotten) or whose lease may have moved writes nothing more.
    pub(crate) fn may_write(&self, shard: &ShardId, lease_epoch: LeaseEpoch) -> bool {
        if cfg!(shardflow_mutation = "skip_keyed_guard") {
            // A mutation check: keyed paths write whatever their shard's guard says.
            return true;
        }
        self.lock()
            .get(shard)
            .is_some_and(|l| l.lease_epoch == lease_epoch && l.guard.is_valid())
    }

    /// A keyed worker dropped a life: the control loop ends it (`take_dropped`).
    pub(crate) fn drop_life(&self, dropped: DroppedLife) {
        self.dropped
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(dropped);
        self.dropped_notify.notify_one();
    }

    /// The lives dropped since the last call.
    pub(crate) fn take_dropped(&self) -> Vec<DroppedLife> {
        std::mem::take(
            &mut *self
                .dropped
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Resolves once a life was dropped (at once if one was since the last wait).
    pub(crate) async fn dropped(&self) {
        self.dropped_notify.notified().await;
    }

    /// Forgets `shard`'s life; returns the parts of the snapshots it took that no checkpoint
    /// it decided named (`ShardProgress::unnamed_parts`).
    pub(crate) fn stop_shard(&self, shard: &ShardId) -> Vec<String> {
        self.lock()
            .remove(shard)
            .map(|l| l.progress.unnamed_parts())
            .unwrap_or_default()
    }

    /// Registers `shard`'s next epoch; returns how many epochs its progress keeps now.
    pub(crate) fn record_epoch(&self, shard: &ShardId, epoch: Epoch, read: EpochRead) -> usize {
        self.lock().get_mut(shard).map_or(0, |l| {
            l.progress.record_epoch(epoch, read);
            l.progress.tracked_epochs()
        })
    }

    /// Records of `shard` read in this run and not covered by `checkpoint`.
    pub(crate) fn lag(&self, shard: &ShardId, checkpoint: &CheckpointPosition) -> u64 {
        self.lock()
            .get(shard)
            .map_or(0, |l| l.progress.lag(checkpoint))
    }

    /// Path `path` committed these reports.
    pub(crate) fn report(&self, path: usize, reports: &[Report]) {
        {
            let mut shards = self.lock();
            for r in reports {
                // A shard released meanwhile has no progress to update, and a report of an
                // earlier life of the shard counts for nothing.
                if let Some(life) = shards.get_mut(&r.shard) {
                    if life.lease_epoch == r.lease_epoch {
                        if let Some(part) = &r.part {
                            life.progress.snapshot_part(path, r.epoch, part.clone());
                        }
                        life.progress.report(path, r.epoch, r.hold);
                    }
                }
            }
        }
        self.reported.notify_waiters();
    }

    /// What the shard path's sinks hold back of `shard` after it committed epoch `at` (see
    /// `SinkWriter::held`).
    pub(crate) fn hold_back(&self, shard: &ShardId, at: Epoch, held: &[(String, ShardId, Held)]) {
        let holds = held
            .iter()
            .filter(|(_, s, _)| s == shard)
            .map(|(name, _, h)| (name.clone(), h.clone()))
            .collect();
        let changed = self
            .lock()
            .get_mut(shard)
            .is_some_and(|l| l.progress.hold_back(at, holds));
        // Most sinks hold nothing: no wake-up per epoch for an unchanged nothing.
        if changed {
            self.reported.notify_waiters();
        }
    }

    /// Records a watermark advance of `shard` decided on processing time; false if the shard
    /// keeps too many already (`ShardProgress::record_advance`).
    pub(crate) fn record_advance(&self, shard: &ShardId, advance: WatermarkAdvance) -> bool {
        self.lock()
            .get_mut(shard)
            .is_some_and(|l| l.progress.record_advance(advance))
    }

    /// The checkpoint to write so that `shard`'s recorded advances are durable.
    pub(crate) fn with_advances(&self, shard: &ShardId) -> Option<ShardCheckpoint> {
        self.lock()
            .get_mut(shard)
            .map(|l| l.progress.with_advances())
    }

    /// The checkpoint `shard` may advance to, if it moved.
    pub(crate) fn checkpoint(&self, shard: &ShardId) -> Option<ShardCheckpoint> {
        let mut shards = self.lock();
        let progress = &mut shards.get_mut(shard)?.progress;
        let cp = progress.checkpoint();
        progress.prune();
        cp
    }

    /// Snapshot parts of `shard` no checkpoint names any more, once the checkpoint decided
    /// last was written (`ShardProgress::take_garbage`).
    pub(crate) fn take_garbage(&self, shard: &ShardId) -> Vec<String> {
        self.lock()
            .get_mut(shard)
            .map(|l| l.progress.take_garbage())
            .unwrap_or_default()
    }

    pub(crate) fn committed_epoch(&self, shard: &ShardId) -> Epoch {
        self.lock()
            .get(shard)
            .map_or(0, |l| l.progress.committed_epoch())
    }

    /// Resolves at the next report of any path.
    pub(crate) async fn reported(&self) {
        self.reported.notified().await;
    }
}
