//! The shared checkpoint tracker of one run: `ShardProgress` per shard behind a lock, with a
//! notification when paths report.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::lease::{CheckpointPosition, ShardCheckpoint};
use crate::position::ShardId;
use crate::protocol::checkpoint::{Epoch, EpochRead, ShardProgress};
use crate::sink::Held;

/// Progress of every shard this worker processes. Cloning shares it.
#[derive(Clone, Default)]
pub(crate) struct Tracker {
    shards: Arc<Mutex<HashMap<ShardId, ShardProgress>>>,
    reported: Arc<Notify>,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ShardId, ShardProgress>> {
        self.shards
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn start_shard(&self, shard: &ShardId, resumed: ShardCheckpoint, paths: usize) {
        self.lock()
            .insert(shard.clone(), ShardProgress::new(resumed, paths));
    }

    pub(crate) fn stop_shard(&self, shard: &ShardId) {
        self.lock().remove(shard);
    }

    pub(crate) fn record_epoch(&self, shard: &ShardId, epoch: Epoch, read: EpochRead) {
        if let Some(p) = self.lock().get_mut(shard) {
            p.record_epoch(epoch, read);
        }
    }

    /// Records of `shard` read in this run and not covered by `checkpoint`.
    pub(crate) fn lag(&self, shard: &ShardId, checkpoint: &CheckpointPosition) -> u64 {
        self.lock().get(shard).map_or(0, |p| p.lag(checkpoint))
    }

    /// Path `path` committed these (shard, epoch, hold) reports.
    pub(crate) fn report(&self, path: usize, reports: &[(ShardId, Epoch, Option<Epoch>)]) {
        {
            let mut shards = self.lock();
            for (shard, epoch, hold) in reports {
                // A shard released meanwhile has no progress to update.
                if let Some(p) = shards.get_mut(shard) {
                    p.report(path, *epoch, *hold);
                }
            }
        }
        self.reported.notify_waiters();
    }

    /// Where the shard path's sinks let `shard`'s checkpoint stop (see `SinkWriter::held`).
    pub(crate) fn hold_back(&self, shard: &ShardId, held: &[(ShardId, Held)]) {
        let holds = held
            .iter()
            .filter(|(s, _)| s == shard)
            .map(|(_, h)| h.clone())
            .collect();
        let changed = self
            .lock()
            .get_mut(shard)
            .is_some_and(|p| p.hold_back(holds));
        // Most sinks hold nothing: no wake-up per epoch for an unchanged nothing.
        if changed {
            self.reported.notify_waiters();
        }
    }

    /// The checkpoint `shard` may advance to, if it moved.
    pub(crate) fn checkpoint(&self, shard: &ShardId) -> Option<ShardCheckpoint> {
        let mut shards = self.lock();
        let p = shards.get_mut(shard)?;
        let cp = p.checkpoint();
        p.prune();
        cp
    }

    pub(crate) fn committed_epoch(&self, shard: &ShardId) -> Epoch {
        self.lock()
            .get(shard)
            .map_or(0, ShardProgress::committed_epoch)
    }

    /// Resolves at the next report of any path.
    pub(crate) async fn reported(&self) {
        self.reported.notified().await;
    }
}
