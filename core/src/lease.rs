//! Leases: who owns a shard and how far its processing is checkpointed. The `LeaseStore` trait,
//! the pure update rules every store applies, and the in-memory store.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::LeaseError;
use crate::position::{EventTime, RecordPosition};
pub use crate::protocol::lease_rules::{apply_update, check_delete};

/// A position in a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckpointPosition {
    /// Nothing processed yet: start at the topology's initial position.
    Initial,
    /// Nothing processed yet: start at the oldest record the stream retains, whatever the
    /// topology's initial position (an operator's reset, `shardflow leases reset`).
    TrimHorizon,
    /// Nothing processed yet: start at the first record that arrived at or after this time,
    /// in milliseconds since the epoch (an operator's reset).
    AtTimestamp(EventTime),
    /// Everything up to and including this record.
    At(RecordPosition),
    /// The whole shard, which is closed; its children may start.
    ShardEnd,
}

impl CheckpointPosition {
    /// Whether `self` is at or before `other` in a shard.
    pub fn le(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Initial | Self::TrimHorizon | Self::AtTimestamp(_), _) | (_, Self::ShardEnd) => {
                true
            }
            (Self::At(x), Self::At(y)) => x <= y,
            (Self::At(_) | Self::ShardEnd, _) => false,
        }
    }

    /// Whether nothing of the shard was processed yet (reading starts at a start position).
    pub const fn is_unprocessed(&self) -> bool {
        matches!(
            self,
            Self::Initial | Self::TrimHorizon | Self::AtTimestamp(_)
        )
    }
}

/// How far a shard's processing has gone, as stored in its lease.
///
/// `committed` is the classic KCL checkpoint: every output derived from records up to it is
/// durable in every sink. Open windows need older records to be rebuilt after a restart, so
/// reading resumes after `rebuild_from` (never later than `committed`), and records up to
/// `committed` are only replayed into window state, never re-emitted. The watermarks are the
/// shard's event-time watermark at each position, so that the replay classifies late records
/// exactly as the first run did. See `docs/design.md`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardCheckpoint {
    /// Outputs of every record up to here are committed.
    pub committed: CheckpointPosition,
    /// The watermark after the record at `committed`.
    pub committed_watermark: Option<EventTime>,
    /// Reading resumes after this position to rebuild open windows.
    pub rebuild_from: CheckpointPosition,
    /// The watermark after the record at `rebuild_from`.
    pub rebuild_watermark: Option<EventTime>,
    /// Where sinks that gather record outputs into units across commits (`S3Sink`) have
    /// them durable, by sink name, where that is not `committed`: a replay writes to such a
    /// sink only outputs of records after its own position, so that it starts a unit exactly
    /// where its last stored one ended. `rebuild_from` is never after any of them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sinks: BTreeMap<String, CheckpointPosition>,
    /// Watermark advances decided on processing time (an idle shard) at or after
    /// `rebuild_from`, oldest first: a replay makes each again where it was made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advances: Vec<WatermarkAdvance>,
    /// The snapshot of the shard's keyed state as of `rebuild_from`, if the topology keeps
    /// snapshots and the state needs one: a restart restores it and replays only the records
    /// after `rebuild_from`. It is durable before the checkpoint that names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotRef>,
}

/// A complete snapshot of one shard's keyed state: the state every keyed operator held right
/// after epoch `epoch` of the life `lease_epoch`, in one part per keyed worker (the manifest
/// a checkpoint carries). Only the owner writes the checkpoint that names a snapshot, so a
/// stale owner's parts are never named.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRef {
    /// The life that took it.
    pub lease_epoch: LeaseEpoch,
    /// The epoch of that life it was taken after.
    pub epoch: u64,
    /// Where the state it holds stands: the end of that epoch, and the watermark there. A
    /// checkpoint that names it rebuilds from exactly there; a restore refuses a checkpoint
    /// that does not (one written by a version that kept the attribute without knowing it).
    pub position: CheckpointPosition,
    /// The watermark at `position`.
    pub watermark: Option<EventTime>,
    /// Its parts, by operator and worker.
    pub parts: Vec<SnapshotPart>,
}

/// One keyed worker's part of a snapshot: the state of the keys it owned, for one operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotPart {
    /// The operator's name (its stable id in the topology).
    pub operator: String,
    /// The worker that wrote it (of `workers` for the operator).
    pub worker: u32,
    /// The object's name in the state store (`state_store::part_name`).
    pub name: String,
    /// Keys it holds.
    pub keys: u64,
    /// Its size in bytes.
    pub bytes: u64,
}

/// A watermark advance decided on processing time (a quiet shard's idleness timeout, see
/// `protocol::watermark`): right after the record at `after`, the shard's watermark became at
/// least `watermark`. It is written to the lease before anything derived from it is written,
/// so that a replay makes it again at the same place instead of asking the clock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatermarkAdvance {
    /// The record after which it was made (a start position: before any record).
    pub after: CheckpointPosition,
    /// The watermark it set, at least.
    pub watermark: EventTime,
}

impl ShardCheckpoint {
    /// The checkpoint of a shard nobody processed yet.
    pub const fn initial() -> Self {
        Self {
            committed: CheckpointPosition::Initial,
            committed_watermark: None,
            rebuild_from: CheckpointPosition::Initial,
            rebuild_watermark: None,
            sinks: BTreeMap::new(),
            advances: Vec::new(),
            snapshot: None,
        }
    }

    /// The checkpoint of a shard to be processed again from the oldest retained record, as an
    /// operator's reset leaves it: nothing committed, no watermark.
    pub const fn trim_horizon() -> Self {
        Self {
            committed: CheckpointPosition::TrimHorizon,
            committed_watermark: None,
            rebuild_from: CheckpointPosition::TrimHorizon,
            rebuild_watermark: None,
            sinks: BTreeMap::new(),
            advances: Vec::new(),
            snapshot: None,
        }
    }

    /// The checkpoint of a shard to be processed again from the first record that arrived at or
    /// after `ms` (milliseconds since the epoch), as an operator's reset leaves it.
    pub const fn at_timestamp(ms: EventTime) -> Self {
        Self {
            committed: CheckpointPosition::AtTimestamp(ms),
            committed_watermark: None,
            rebuild_from: CheckpointPosition::AtTimestamp(ms),
            rebuild_watermark: None,
            sinks: BTreeMap::new(),
            advances: Vec::new(),
            snapshot: None,
        }
    }

    /// The checkpoint of a shard read to its end.
    pub const fn shard_end() -> Self {
        Self {
            committed: CheckpointPosition::ShardEnd,
            committed_watermark: None,
            rebuild_from: CheckpointPosition::ShardEnd,
            rebuild_watermark: None,
            sinks: BTreeMap::new(),
            advances: Vec::new(),
            snapshot: None,
        }
    }

    /// Whether the shard was read to its end.
    pub fn is_shard_end(&self) -> bool {
        self.committed == CheckpointPosition::ShardEnd
    }
}

/// A worker's fencing token for one shard: the lease table's generation and the lease counter
/// it observed when it took the lease, compared in that order. Every take bumps the counter, so
/// a later owner in one table always holds a larger epoch, and a sink can refuse a write from a
/// stale owner (one paused or partitioned past its lease) that would overwrite a newer owner's
/// output. The generation is fixed when the lease table is created and grows with each new
/// table, so a recreated table, whose counters start again at 1, never fences on the outputs
/// written under the old one.
///
/// The two stay separate numbers: packing a clock reading above the counter in one integer
/// would let a worker whose clock runs behind fence a newer table.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct LeaseEpoch {
    /// The lease table's generation (its creation time in milliseconds for the stores that
    /// persist; 0 for outputs written before generations existed).
    pub generation: u64,
    /// The lease counter when the owner took the lease.
    pub counter: u64,
}

impl LeaseEpoch {
    /// The epoch of a take that saw `counter` in the table of `generation`.
    pub const fn new(generation: u64, counter: u64) -> Self {
        Self {
            generation,
            counter,
        }
    }
}

impl std::fmt::Display for LeaseEpoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.generation, self.counter)
    }
}

/// One lease: one item per shard, in the spirit of the KCL lease table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The lease key: `<stream>:<creation epoch seconds>:<shard id>` as stored
    /// (`protocol::lease_keys`), the shard id as the runtime sees it through its scope.
    pub key: String,
    /// The worker holding the lease, if any.
    pub owner: Option<String>,
    /// Bumped by every update; conditional writes compare it. The counter seen when a worker
    /// took the lease is that worker's epoch for the shard (a fencing token).
    pub counter: u64,
    /// Processing progress.
    pub checkpoint: ShardCheckpoint,
    /// Lease keys of the parent shards (after a split or merge).
    pub parents: Vec<String>,
    /// How often the owner changed since the last checkpoint (KCL's
    /// `ownerSwitchesSinceCheckpoint`); a high value flags a shard that keeps failing.
    pub owner_switches_since_checkpoint: u64,
    /// A worker that asked the owner to hand the lease over (graceful handoff): the owner
    /// finishes what it has in flight, checkpoints and releases; the lease then waits for this
    /// worker (others take it only once it expired). Cleared by a take.
    #[serde(default)]
    pub handoff_to: Option<String>,
    /// The generation of the lease table this lease was read from (see [`LeaseEpoch`]). Set by
    /// the store on every lease it returns, from the table, not kept per lease.
    #[serde(default, skip_serializing)]
    pub generation: u64,
}

impl Lease {
    /// The owner's fencing token, meaningful on the lease as its owner took it.
    pub const fn epoch(&self) -> LeaseEpoch {
        if cfg!(shardflow_mutation = "no_generation") {
            // A mutation check: epochs forget the table they were taken in.
            return LeaseEpoch::new(0, self.counter);
        }
        LeaseEpoch::new(self.generation, self.counter)
    }

    /// A new, unowned lease with no progress.
    pub fn new(key: impl Into<String>, parents: Vec<String>) -> Self {
        Self {
            key: key.into(),
            owner: None,
            counter: 0,
            checkpoint: ShardCheckpoint::initial(),
            parents,
            owner_switches_since_checkpoint: 0,
            handoff_to: None,
            generation: 0,
        }
    }
}

/// The owner name a worker process writes into the leases it takes: its worker id and its
/// incarnation (a random suffix drawn when the run starts), `<worker id>#<incarnation>`. Two
/// live processes configured with one worker id are then two owners, not one that takes "its
/// own" leases from itself; and a restarted process takes its former leases only once they
/// were released or expired, since the old process may still be writing.
pub fn holder(worker_id: &str, incarnation: &str) -> String {
    format!("{worker_id}#{incarnation}")
}

/// The worker id in a lease's owner name (see [`holder`]); an owner written without an
/// incarnation is the worker id itself.
pub fn worker_of(owner: &str) -> &str {
    owner.rsplit_once('#').map_or(owner, |(worker, _)| worker)
}

/// A conditional update of one lease. Every update requires the counter the caller last saw and
/// bumps it, so two writers can never both succeed from the same view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseUpdate {
    /// Become the owner (of an unowned, expired or stolen lease).
    Take {
        /// The new owner.
        owner: String,
    },
    /// Keep owning: proves the owner is alive.
    Renew {
        /// The current owner.
        owner: String,
    },
    /// Record progress.
    Checkpoint {
        /// The current owner.
        owner: String,
        /// The new progress.
        checkpoint: ShardCheckpoint,
    },
    /// Give the lease up so another worker may take it at once (the requester of a handoff,
    /// if one is pending).
    Release {
        /// The current owner.
        owner: String,
    },
    /// Ask the live owner to hand the lease over instead of taking it outright: the owner
    /// sees the request at its next write of the lease.
    RequestHandoff {
        /// The worker that wants the lease.
        requester: String,
    },
    /// An operator moves the progress of an unowned lease (replay from the start, say). Refused
    /// while a worker owns it: stop the workers (they release their leases) first.
    Reset {
        /// The new progress.
        checkpoint: ShardCheckpoint,
    },
}

impl LeaseUpdate {
    /// The operation's name, for errors and metrics.
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Take { .. } => "take",
            Self::Renew { .. } => "renew",
            Self::Checkpoint { .. } => "checkpoint",
            Self::Release { .. } => "release",
            Self::RequestHandoff { .. } => "request handoff",
            Self::Reset { .. } => "reset",
        }
    }
}

/// Durable, linearizable storage of leases.
///
/// Semantics every implementation provides (checked by `testing::lease_store_conformance`):
/// reads see every completed write; each `update` is atomic and applies [`apply_update`]; a
/// lease that does not exist is `NotFound`.
#[async_trait]
pub trait LeaseStore: Send + Sync + 'static {
    /// Every lease, ordered by key.
    async fn list(&self) -> Result<Vec<Lease>, LeaseError>;

    /// One lease.
    async fn get(&self, key: &str) -> Result<Option<Lease>, LeaseError>;

    /// Creates `lease` unless one with its key exists; returns whether it was created.
    async fn create_if_absent(&self, lease: &Lease) -> Result<bool, LeaseError>;

    /// Applies a conditional update and returns the lease as written.
    async fn update(
        &self,
        key: &str,
        expected_counter: u64,
        update: &LeaseUpdate,
    ) -> Result<Lease, LeaseError>;

    /// Deletes a lease if its counter is still `expected_counter` (cleanup of finished parents).
    async fn delete(&self, key: &str, expected_counter: u64) -> Result<(), LeaseError>;

    /// Items the last `list` skipped because they are not leases this store can read (another
    /// tool's items in a shared table, or damaged ones), each logged as it was skipped: a
    /// stranger in the table never fails a shard sync. A store that wraps another forwards it.
    fn skipped_items(&self) -> usize {
        0
    }
}

/// Leases in a map behind a mutex: for tests and single-process runs that need no durability.
/// Its table generation starts at 1; [`recreate`](Self::recreate) models a dropped and
/// recreated table.
pub struct MemoryLeaseStore {
    table: Mutex<MemoryTable>,
}

struct MemoryTable {
    generation: u64,
    leases: BTreeMap<String, Lease>,
}

impl MemoryTable {
    /// A stored lease as a reader sees it: with the table's generation.
    fn read(&self, key: &str) -> Option<Lease> {
        self.leases.get(key).map(|lease| Lease {
            generation: self.generation,
            ..lease.clone()
        })
    }
}

impl Default for MemoryLeaseStore {
    fn default() -> Self {
        Self {
            table: Mutex::new(MemoryTable {
                generation: 1,
                leases: BTreeMap::new(),
            }),
        }
    }
}

impl MemoryLeaseStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Drops every lease and starts the next table generation, as deleting the lease table
    /// and creating it again would (counters start over; epochs stay larger than the old
    /// table's).
    pub fn recreate(&self) {
        let mut table = self.lock();
        table.generation += 1;
        table.leases.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryTable> {
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl LeaseStore for MemoryLeaseStore {
    async fn list(&self) -> Result<Vec<Lease>, LeaseError> {
        let table = self.lock();
        Ok(table.leases.keys().filter_map(|k| table.read(k)).collect())
    }

    async fn get(&self, key: &str) -> Result<Option<Lease>, LeaseError> {
        Ok(self.lock().read(key))
    }

    async fn create_if_absent(&self, lease: &Lease) -> Result<bool, LeaseError> {
        let mut table = self.lock();
        if table.leases.contains_key(&lease.key) {
            return Ok(false);
        }
        table.leases.insert(lease.key.clone(), lease.clone());
        Ok(true)
    }

    async fn update(
        &self,
        key: &str,
        expected_counter: u64,
        update: &LeaseUpdate,
    ) -> Result<Lease, LeaseError> {
        let mut table = self.lock();
        let current = table.read(key).ok_or_else(|| LeaseError::NotFound {
            lease_key: key.to_owned(),
        })?;
        let next = apply_update(&current, expected_counter, update)?;
        table.leases.insert(key.to_owned(), next.clone());
        Ok(next)
    }

    async fn delete(&self, key: &str, expected_counter: u64) -> Result<(), LeaseError> {
        let mut table = self.lock();
        let current = table.read(key).ok_or_else(|| LeaseError::NotFound {
            lease_key: key.to_owned(),
        })?;
        check_delete(&current, expected_counter)?;
        table.leases.remove(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_come_before_every_record_and_shard_end_after() {
        use crate::position::SequenceNumber;
        let record = CheckpointPosition::At(RecordPosition::new(SequenceNumber::from_u128(5)));
        for start in [
            CheckpointPosition::Initial,
            CheckpointPosition::TrimHorizon,
            CheckpointPosition::AtTimestamp(1_000),
        ] {
            assert!(start.is_unprocessed());
            assert!(start.le(&record) && !record.le(&start), "{start:?}");
            assert!(start.le(&CheckpointPosition::ShardEnd));
        }
        assert!(!record.is_unprocessed());
        assert!(record.le(&CheckpointPosition::ShardEnd));
    }
}
