//! How a topology's keyed state survives a restart: rebuilt by replay, or restored from
//! snapshots in a state store.

use std::sync::Arc;
use std::time::Duration;

use crate::state_store::StateStore;

/// How a topology's keyed state survives a restart, a crash or a lease move
/// (`TopologyBuilder::state`).
#[derive(Clone, Default)]
pub enum StatePolicy {
    /// Rebuilt by replaying the shard from the oldest record the state holds (the default):
    /// fine for short windows. A running aggregate replays its shard from the start, so its
    /// recovery grows with the shard's history and breaks once the stream's retention trimmed
    /// the first records.
    #[default]
    Replay,
    /// Each keyed worker stores its part of a shard's state in `store` every `every` (at a
    /// commit, as of the epoch it committed); a checkpoint names the newest complete snapshot
    /// early enough, and a restart restores it (at any parallelism) and replays only the
    /// records after it. With leases in DynamoDB a shard may move to another machine: use a
    /// store every worker reaches (S3), not a local directory.
    Snapshot {
        /// Where the parts go.
        store: Arc<dyn StateStore>,
        /// How often a shard's state is snapshotted (its replay after a restart is at most
        /// about this long, plus the commit interval).
        every: Duration,
    },
}

impl StatePolicy {
    /// Snapshots into `store` every `every`.
    pub fn snapshot(store: impl StateStore, every: Duration) -> Self {
        Self::Snapshot {
            store: Arc::new(store),
            every,
        }
    }

    /// The store and interval, if the policy takes snapshots.
    pub(crate) fn snapshots(&self) -> Option<(&Arc<dyn StateStore>, Duration)> {
        match self {
            Self::Replay => None,
            Self::Snapshot { store, every } => Some((store, *every)),
        }
    }
}

impl std::fmt::Debug for StatePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Replay => f.write_str("Replay"),
            Self::Snapshot { store, every } => f
                .debug_struct("Snapshot")
                .field("store", &store.name())
                .field("every", every)
                .finish(),
        }
    }
}
