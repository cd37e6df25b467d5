//! The shared checkpoint tracker of one run: `ShardProgress` per shard behind a lock, with a
//! notification when paths report.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::lease::{CheckpointPosition, LeaseEpoch, ShardCheckpoint, WatermarkAdvance};
use crate::position::ShardId;
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
}

/// Progress of every shard this worker processes, with the lease epoch of the shard's
/// current life. Cloning shares it.
#[derive(Clone, Default)]
pub(crate) struct Tracker {
    shards: Arc<Mutex<BTreeMap<ShardId, (LeaseEpoch, ShardProgress)>>>,
    reported: Arc<Notify>,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ShardId, (LeaseEpoch, ShardProgress)>> {
        self.shards
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn start_shard(
        &self,
        shard: &ShardId,
        lease_epoch: LeaseEpoch,
        resumed: ShardCheckpoint,
        paths: usize,
    ) {
        self.lock().insert(
            shard.clone(),
            (lease_epoch, ShardProgress::new(resumed, paths)),
        );
    }

    pub(crate) fn stop_shard(&self, shard: &ShardId) {
        self.lock().remove(shard);
    }

    /// Registers `shard`'s next epoch; returns how many epochs its progress keeps now.
    pub(crate) fn record_epoch(&self, shard: &ShardId, epoch: Epoch, read: EpochRead) -> usize {
        self.lock().get_mut(shard).map_or(0, |(_, p)| {
            p.record_epoch(epoch, read);
            p.tracked_epochs()
        })
    }

    /// Records of `shard` read in this run and not covered by `checkpoint`.
    pub(crate) fn lag(&self, shard: &ShardId, checkpoint: &CheckpointPosition) -> u64 {
        self.lock().get(shard).map_or(0, |(_, p)| p.lag(checkpoint))
    }

    /// Path `path` committed these reports.
    pub(crate) fn report(&self, path: usize, reports: &[Report]) {
        {
            let mut shards = self.lock();
            for r in reports {
                // A shard released meanwhile has no progress to update, and a report of an
                // earlier life of the shard counts for nothing.
                if let Some((life, p)) = shards.get_mut(&r.shard) {
                    if *life == r.lease_epoch {
                        p.report(path, r.epoch, r.hold);
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
            .is_some_and(|(_, p)| p.hold_back(at, holds));
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
            .is_some_and(|(_, p)| p.record_advance(advance))
    }

    /// The checkpoint to write so that `shard`'s recorded advances are durable.
    pub(crate) fn with_advances(&self, shard: &ShardId) -> Option<ShardCheckpoint> {
        self.lock().get_mut(shard).map(|(_, p)| p.with_advances())
    }

    /// The checkpoint `shard` may advance to, if it moved.
    pub(crate) fn checkpoint(&self, shard: &ShardId) -> Option<ShardCheckpoint> {
        let mut shards = self.lock();
        let (_, p) = shards.get_mut(shard)?;
        let cp = p.checkpoint();
        p.prune();
        cp
    }

    pub(crate) fn committed_epoch(&self, shard: &ShardId) -> Epoch {
        self.lock()
            .get(shard)
            .map_or(0, |(_, p)| p.committed_epoch())
    }

    /// Resolves at the next report of any path.
    pub(crate) async fn reported(&self) {
        self.reported.notified().await;
    }
}
