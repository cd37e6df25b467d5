//! `DynamoLeaseStore`: leases as items of a DynamoDB table, one per shard, in the spirit of the
//! KCL's lease table. Every mutation is a conditional write on the lease counter, and the rule
//! that decides it is core's `apply_update`, the same as every other store.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;

use shardflow_core::error::{BoxError, LeaseError};
use shardflow_core::lease::{
    apply_update, check_delete, CheckpointPosition, Lease, LeaseStore, LeaseUpdate,
    ShardCheckpoint, WatermarkAdvance,
};
use shardflow_core::position::{RecordPosition, SequenceNumber};

use super::table::ensure_table;

// Attribute names: the KCL's where it has one.
const LEASE_KEY: &str = "leaseKey";
const LEASE_OWNER: &str = "leaseOwner";
const LEASE_COUNTER: &str = "leaseCounter";
const CHECKPOINT: &str = "checkpoint";
const CHECKPOINT_SUB: &str = "checkpointSubSequenceNumber";
const OWNER_SWITCHES: &str = "ownerSwitchesSinceCheckpoint";
const PARENTS: &str = "parentShardId";
/// shardflow's: the worker a graceful handoff was asked for (KCL 3.x keeps the old owner in
/// `checkpointOwner` instead; shardflow keeps the owner until it releases).
const HANDOFF_TO: &str = "handoffTo";
// shardflow's own: the rebuild point for open windows and the watermarks.
const COMMITTED_WATERMARK: &str = "committedWatermark";
const REBUILD_FROM: &str = "rebuildFrom";
const REBUILD_FROM_SUB: &str = "rebuildFromSubSequenceNumber";
const REBUILD_WATERMARK: &str = "rebuildWatermark";
// The time of an AT_TIMESTAMP checkpoint (ms since the epoch); the KCL keeps it in its config.
const CHECKPOINT_TIMESTAMP: &str = "checkpointTimestamp";
const REBUILD_FROM_TIMESTAMP: &str = "rebuildFromTimestamp";
// Where each sink that holds record outputs resumes (a map by sink name of maps with the
// three fields below), when that is not `checkpoint`.
const SINK_POSITIONS: &str = "sinkPositions";
const SINK_POSITION: &str = "position";
const SINK_SUB: &str = "subSequenceNumber";
const SINK_TIMESTAMP: &str = "timestamp";
// Watermark advances decided on processing time (a list of maps with the position fields
// above and the watermark).
const ADVANCES: &str = "watermarkAdvances";
const ADVANCE_WATERMARK: &str = "watermark";
// The snapshot of keyed state the checkpoint names (`SnapshotRef` as JSON: a small manifest of
// part names, read back whole).
const SNAPSHOT: &str = "stateSnapshot";

/// Every top-level attribute shardflow writes to a lease item. An update replaces these and
/// keeps every other attribute (a KCL tool or an operator's own notes may share the table).
const OWN_ATTRIBUTES: [&str; 17] = [
    LEASE_KEY,
    LEASE_OWNER,
    LEASE_COUNTER,
    CHECKPOINT,
    CHECKPOINT_SUB,
    OWNER_SWITCHES,
    PARENTS,
    HANDOFF_TO,
    COMMITTED_WATERMARK,
    REBUILD_FROM,
    REBUILD_FROM_SUB,
    REBUILD_WATERMARK,
    CHECKPOINT_TIMESTAMP,
    REBUILD_FROM_TIMESTAMP,
    SINK_POSITIONS,
    ADVANCES,
    SNAPSHOT,
];

// Checkpoint sentinels. "The topology's initial position" has always been written as the KCL's
// TRIM_HORIZON, so tables written by earlier versions keep their meaning; an operator's reset
// to the trim horizon (whatever the topology's start) has its own sentinel.
const SHARD_END: &str = "SHARD_END";
const INITIAL: &str = "TRIM_HORIZON";
const TRIM_HORIZON_RESET: &str = "TRIM_HORIZON_RESET";
const AT_TIMESTAMP: &str = "AT_TIMESTAMP";

/// The item that holds the table's generation (see `LeaseEpoch`), keyed so that no lease can
/// collide with it: shard ids and stream names never contain `#`.
const GENERATION_KEY: &str = "#tableGeneration";
/// Its attribute: the table's creation time in milliseconds, as DynamoDB reported it (one
/// clock for every worker, so a recreated table's generation is always larger).
const GENERATION: &str = "tableGeneration";

/// Leases in a DynamoDB table (created on first use, on-demand billing).
#[derive(Clone, Debug)]
pub struct DynamoLeaseStore {
    client: Client,
    table: String,
    /// The table's generation as last read: refreshed by every `list` (the generation item
    /// comes with the scan), so a worker notices a recreated table at its next shard sync.
    /// Never goes down.
    generation: Arc<AtomicU64>,
    /// The table's creation time when this store opened it: a generation is never below it,
    /// so a table restored from a backup (a new table holding an old generation item) still
    /// gets a later generation.
    created_ms: u64,
    /// Items the last `list` skipped: not leases this store can read.
    skipped: Arc<AtomicUsize>,
}

type Item = HashMap<String, AttributeValue>;

fn store_error(
    operation: &'static str,
    retryable: bool,
    source: impl Into<BoxError>,
) -> LeaseError {
    LeaseError::Store {
        operation,
        retryable,
        source: source.into(),
    }
}

fn sdk_error<E>(
    operation: &'static str,
    err: SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>,
) -> LeaseError
where
    E: std::error::Error + aws_sdk_dynamodb::error::ProvideErrorMetadata + Send + Sync + 'static,
{
    let retryable = super::retry::retryable(&err, |_| false);
    store_error(operation, retryable, err)
}

impl DynamoLeaseStore {
    /// Leases in `table`, created (on-demand billing) if it does not exist yet.
    ///
    /// # Errors
    /// The table could not be described or created, or did not become active.
    pub async fn open(client: Client, table: impl Into<String>) -> Result<Self, LeaseError> {
        let mut store = Self {
            client,
            table: table.into(),
            generation: Arc::new(AtomicU64::new(0)),
            created_ms: 0,
            skipped: Arc::default(),
        };
        store.ensure_table().await?;
        store.created_ms = store.creation_time().await?;
        store.establish_generation().await?;
        Ok(store)
    }

    /// The table name a topology's leases use by default.
    pub fn default_table_name(topology: &str) -> String {
        format!("shardflow-leases-{topology}")
    }

    async fn ensure_table(&self) -> Result<(), LeaseError> {
        ensure_table(&self.client, &self.table, LEASE_KEY)
            .await
            .map_err(|e| store_error(e.operation, e.retryable, e.source))
    }

    /// The table's generation: read from its generation item, or (a new table, or one written
    /// by a version without generations) taken from the table's creation time and written
    /// there first-writer-wins, so every worker agrees on it.
    async fn establish_generation(&self) -> Result<u64, LeaseError> {
        if let Some(generation) = self.read_generation().await? {
            if generation < self.created_ms {
                // A table restored from a backup: its item predates the table. Raised (if no
                // one raised it first), so that workers which opened it earlier follow.
                let raised = self
                    .client
                    .update_item()
                    .table_name(&self.table)
                    .key(LEASE_KEY, AttributeValue::S(GENERATION_KEY.to_owned()))
                    .update_expression("SET #gen = :gen")
                    .condition_expression("#gen < :gen")
                    .expression_attribute_names("#gen", GENERATION)
                    .expression_attribute_values(
                        ":gen",
                        AttributeValue::N(self.created_ms.to_string()),
                    )
                    .send()
                    .await;
                if let Err(e) = raised {
                    if !e
                        .as_service_error()
                        .is_some_and(|s| s.is_conditional_check_failed_exception())
                    {
                        return Err(sdk_error("raise lease table generation", e));
                    }
                }
            }
            return Ok(self.observe_generation(generation));
        }
        let created = self.creation_time().await?;
        let put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item(LEASE_KEY, AttributeValue::S(GENERATION_KEY.to_owned()))
            .item(GENERATION, AttributeValue::N(created.to_string()))
            .condition_expression("attribute_not_exists(#key)")
            .expression_attribute_names("#key", LEASE_KEY)
            .send()
            .await;
        let generation = match put {
            Ok(_) => created,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                // Another worker wrote it first: theirs holds.
                self.read_generation().await?.ok_or_else(|| {
                    store_error(
                        "read lease table generation",
                        true,
                        "the generation item vanished after a write that found it",
                    )
                })?
            }
            Err(e) => return Err(sdk_error("write lease table generation", e)),
        };
        Ok(self.observe_generation(generation))
    }

    /// Takes in a generation read from the table; returns the one leases carry from now on.
    fn observe_generation(&self, read: u64) -> u64 {
        let generation = read.max(self.created_ms);
        self.generation
            .fetch_max(generation, Ordering::AcqRel)
            .max(generation)
    }

    /// The table's creation time (ms since the Unix epoch), as DynamoDB describes it.
    async fn creation_time(&self) -> Result<u64, LeaseError> {
        let described = self
            .client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .map_err(|e| sdk_error("describe lease table", e))?;
        described
            .table()
            .and_then(|t| t.creation_date_time())
            .and_then(|t| t.to_millis().ok())
            .and_then(|ms| u64::try_from(ms).ok())
            .filter(|ms| *ms > 0)
            .ok_or_else(|| {
                store_error(
                    "describe lease table",
                    false,
                    "the lease table's description has no creation time",
                )
            })
    }

    async fn read_generation(&self) -> Result<Option<u64>, LeaseError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(LEASE_KEY, AttributeValue::S(GENERATION_KEY.to_owned()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_error("read lease table generation", e))?;
        out.item().map(generation_of).transpose()
    }

    async fn read(&self, key: &str) -> Result<Option<Lease>, LeaseError> {
        Ok(self.read_item(key).await?.map(|(lease, _)| lease))
    }

    /// The lease and the item it was read from (with any attributes shardflow does not write).
    async fn read_item(&self, key: &str) -> Result<Option<(Lease, Item)>, LeaseError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(LEASE_KEY, AttributeValue::S(key.to_owned()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_error("get lease", e))?;
        let generation = self.generation.load(Ordering::Acquire);
        let Some(item) = out.item else {
            return Ok(None);
        };
        let lease = from_item(&item)?;
        Ok(Some((
            Lease {
                generation,
                ..lease
            },
            item,
        )))
    }

    /// Writes `lease` over `stored` (keeping the attributes shardflow does not write) if the
    /// stored counter is still `expected_counter`; `false` if it moved.
    async fn put_if_counter(
        &self,
        lease: &Lease,
        stored: Item,
        expected_counter: u64,
    ) -> Result<bool, LeaseError> {
        let put = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(merged(stored, to_item(lease))))
            .condition_expression("#counter = :expected")
            .expression_attribute_names("#counter", LEASE_COUNTER)
            .expression_attribute_values(
                ":expected",
                AttributeValue::N(expected_counter.to_string()),
            )
            .send()
            .await;
        match put {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(sdk_error("update lease", e)),
        }
    }
}

#[async_trait]
impl LeaseStore for DynamoLeaseStore {
    async fn list(&self) -> Result<Vec<Lease>, LeaseError> {
        let mut leases = Vec::new();
        let mut skipped = 0;
        let mut generation = None;
        let mut start: Option<Item> = None;
        loop {
            let out = self
                .client
                .scan()
                .table_name(&self.table)
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| sdk_error("list leases", e))?;
            for item in out.items() {
                if item
                    .get(LEASE_KEY)
                    .and_then(|k| k.as_s().ok())
                    .map(String::as_str)
                    == Some(GENERATION_KEY)
                {
                    generation = Some(generation_of(item)?);
                } else {
                    match from_item(item) {
                        Ok(lease) => leases.push(lease),
                        Err(error) => {
                            // A stranger in the table (another tool's item, or a damaged one)
                            // must not stop every worker's shard sync.
                            skipped += 1;
                            let key = item.get(LEASE_KEY).and_then(|k| k.as_s().ok());
                            tracing::warn!(table = %self.table, key = ?key.map(|k| k.chars().take(128).collect::<String>()), %error, "skipping an item of the lease table that is not a lease shardflow can read");
                        }
                    }
                }
            }
            match out.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => break,
            }
        }
        // No generation item: the table was recreated (or never had one); it gets one now.
        let generation = match generation {
            Some(generation) => self.observe_generation(generation),
            None => self.establish_generation().await?,
        };
        for lease in &mut leases {
            lease.generation = generation;
        }
        leases.sort_by(|a, b| a.key.cmp(&b.key));
        self.skipped.store(skipped, Ordering::Relaxed);
        Ok(leases)
    }

    async fn get(&self, key: &str) -> Result<Option<Lease>, LeaseError> {
        self.read(key).await
    }

    async fn create_if_absent(&self, lease: &Lease) -> Result<bool, LeaseError> {
        let put = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(to_item(lease)))
            .condition_expression("attribute_not_exists(#key)")
            .expression_attribute_names("#key", LEASE_KEY)
            .send()
            .await;
        match put {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(sdk_error("create lease", e)),
        }
    }

    async fn update(
        &self,
        key: &str,
        expected_counter: u64,
        update: &LeaseUpdate,
    ) -> Result<Lease, LeaseError> {
        let (current, stored) = self
            .read_item(key)
            .await?
            .ok_or_else(|| LeaseError::NotFound {
                lease_key: key.to_owned(),
            })?;
        let next = apply_update(&current, expected_counter, update)?;
        if self.put_if_counter(&next, stored, expected_counter).await? {
            return Ok(next);
        }
        // The counter moved between the read and the write: the same verdict `apply_update`
        // gives a stale counter.
        Err(match update {
            LeaseUpdate::Take { .. }
            | LeaseUpdate::Reset { .. }
            | LeaseUpdate::RequestHandoff { .. } => LeaseError::ConditionFailed {
                lease_key: key.to_owned(),
                reason: "lease counter changed since it was read",
            },
            _ => LeaseError::LeaseLost {
                lease_key: key.to_owned(),
            },
        })
    }

    fn skipped_items(&self) -> usize {
        self.skipped.load(Ordering::Relaxed)
    }

    async fn delete(&self, key: &str, expected_counter: u64) -> Result<(), LeaseError> {
        let current = self.read(key).await?.ok_or_else(|| LeaseError::NotFound {
            lease_key: key.to_owned(),
        })?;
        check_delete(&current, expected_counter)?;
        let deleted = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key(LEASE_KEY, AttributeValue::S(key.to_owned()))
            .condition_expression("#counter = :expected")
            .expression_attribute_names("#counter", LEASE_COUNTER)
            .expression_attribute_values(
                ":expected",
                AttributeValue::N(expected_counter.to_string()),
            )
            .send()
            .await;
        match deleted {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                Err(LeaseError::ConditionFailed {
                    lease_key: key.to_owned(),
                    reason: "lease counter changed since it was read",
                })
            }
            Err(e) => Err(sdk_error("delete lease", e)),
        }
    }
}

/// A checkpoint position as the item stores it: the `checkpoint` text, the sub-sequence number
/// and, for `AT_TIMESTAMP`, the time.
fn position_text(p: &CheckpointPosition) -> (String, u32, Option<i64>) {
    match p {
        CheckpointPosition::Initial => (INITIAL.to_owned(), 0, None),
        CheckpointPosition::TrimHorizon => (TRIM_HORIZON_RESET.to_owned(), 0, None),
        CheckpointPosition::AtTimestamp(ms) => (AT_TIMESTAMP.to_owned(), 0, Some(*ms)),
        CheckpointPosition::ShardEnd => (SHARD_END.to_owned(), 0, None),
        CheckpointPosition::At(r) => (r.sequence.to_string(), r.sub_sequence, None),
    }
}

fn to_item(lease: &Lease) -> Item {
    let mut item = Item::new();
    item.insert(LEASE_KEY.into(), AttributeValue::S(lease.key.clone()));
    if let Some(owner) = &lease.owner {
        item.insert(LEASE_OWNER.into(), AttributeValue::S(owner.clone()));
    }
    if let Some(requester) = &lease.handoff_to {
        item.insert(HANDOFF_TO.into(), AttributeValue::S(requester.clone()));
    }
    item.insert(
        LEASE_COUNTER.into(),
        AttributeValue::N(lease.counter.to_string()),
    );
    let cp = &lease.checkpoint;
    let (committed, committed_sub, committed_time) = position_text(&cp.committed);
    item.insert(CHECKPOINT.into(), AttributeValue::S(committed));
    item.insert(
        CHECKPOINT_SUB.into(),
        AttributeValue::N(committed_sub.to_string()),
    );
    if let Some(ms) = committed_time {
        item.insert(
            CHECKPOINT_TIMESTAMP.into(),
            AttributeValue::N(ms.to_string()),
        );
    }
    let (rebuild, rebuild_sub, rebuild_time) = position_text(&cp.rebuild_from);
    item.insert(REBUILD_FROM.into(), AttributeValue::S(rebuild));
    item.insert(
        REBUILD_FROM_SUB.into(),
        AttributeValue::N(rebuild_sub.to_string()),
    );
    if let Some(ms) = rebuild_time {
        item.insert(
            REBUILD_FROM_TIMESTAMP.into(),
            AttributeValue::N(ms.to_string()),
        );
    }
    if let Some(w) = cp.committed_watermark {
        item.insert(COMMITTED_WATERMARK.into(), AttributeValue::N(w.to_string()));
    }
    if let Some(w) = cp.rebuild_watermark {
        item.insert(REBUILD_WATERMARK.into(), AttributeValue::N(w.to_string()));
    }
    if !cp.sinks.is_empty() {
        let sinks = cp
            .sinks
            .iter()
            .map(|(name, p)| (name.clone(), AttributeValue::M(position_map(p))))
            .collect();
        item.insert(SINK_POSITIONS.into(), AttributeValue::M(sinks));
    }
    if !cp.advances.is_empty() {
        let advances = cp
            .advances
            .iter()
            .map(|a| {
                let mut m = position_map(&a.after);
                m.insert(
                    ADVANCE_WATERMARK.into(),
                    AttributeValue::N(a.watermark.to_string()),
                );
                AttributeValue::M(m)
            })
            .collect();
        item.insert(ADVANCES.into(), AttributeValue::L(advances));
    }
    if let Some(snapshot) = &cp.snapshot {
        let json = serde_json::to_string(snapshot).expect("a snapshot reference serializes");
        item.insert(SNAPSHOT.into(), AttributeValue::S(json));
    }
    if !lease.parents.is_empty() {
        // A string set may not be empty: no attribute means no parents.
        item.insert(PARENTS.into(), AttributeValue::Ss(lease.parents.clone()));
    }
    item.insert(
        OWNER_SWITCHES.into(),
        AttributeValue::N(lease.owner_switches_since_checkpoint.to_string()),
    );
    item
}

/// `stored` with shardflow's attributes replaced by `ours`: every other attribute stays.
fn merged(mut stored: Item, ours: Item) -> Item {
    for name in OWN_ATTRIBUTES {
        stored.remove(name);
    }
    stored.extend(ours);
    stored
}

/// A checkpoint position as a map attribute (in sink positions and watermark advances).
fn position_map(p: &CheckpointPosition) -> Item {
    let (text, sub, time) = position_text(p);
    let mut m = Item::new();
    m.insert(SINK_POSITION.into(), AttributeValue::S(text));
    m.insert(SINK_SUB.into(), AttributeValue::N(sub.to_string()));
    if let Some(ms) = time {
        m.insert(SINK_TIMESTAMP.into(), AttributeValue::N(ms.to_string()));
    }
    m
}

/// The inverse of `position_map`; `None` if malformed.
fn position_of_map(m: &Item) -> Option<CheckpointPosition> {
    let number = |f: &str| -> Option<Option<i128>> {
        match m.get(f) {
            None => Some(None),
            Some(v) => v.as_n().ok()?.parse::<i128>().ok().map(Some),
        }
    };
    let text = m.get(SINK_POSITION)?.as_s().ok()?;
    parse_position(text, number(SINK_SUB)?, number(SINK_TIMESTAMP)?)
}

/// A checkpoint position from its stored text, sub-sequence number and time (the inverse of
/// `position_text`); `None` if malformed.
fn parse_position(text: &str, sub: Option<i128>, time: Option<i128>) -> Option<CheckpointPosition> {
    Some(match text {
        INITIAL => CheckpointPosition::Initial,
        TRIM_HORIZON_RESET => CheckpointPosition::TrimHorizon,
        AT_TIMESTAMP => CheckpointPosition::AtTimestamp(i64::try_from(time?).ok()?),
        SHARD_END => CheckpointPosition::ShardEnd,
        digits => {
            let sequence = SequenceNumber::parse(digits).ok()?;
            let sub = u32::try_from(sub.unwrap_or(0)).ok()?;
            CheckpointPosition::At(RecordPosition::with_sub_sequence(sequence, sub))
        }
    })
}

fn generation_of(item: &Item) -> Result<u64, LeaseError> {
    item.get(GENERATION)
        .and_then(|v| v.as_n().ok())
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| {
            store_error(
                "read lease table generation",
                false,
                "the generation item has a missing or malformed tableGeneration",
            )
        })
}

fn from_item(item: &Item) -> Result<Lease, LeaseError> {
    let bad = |what: &str| {
        store_error(
            "read lease",
            false,
            // Attribute names only: an item a stranger wrote may hold anything.
            format!(
                "lease item has a missing or malformed {what} (attributes: {:?})",
                item.keys().collect::<std::collections::BTreeSet<_>>()
            ),
        )
    };
    let text = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).cloned();
    let number = |name: &str| -> Result<Option<i128>, LeaseError> {
        item.get(name)
            .map(|v| {
                v.as_n()
                    .ok()
                    .and_then(|n| n.parse::<i128>().ok())
                    .ok_or_else(|| bad(name))
            })
            .transpose()
    };
    let position = |name: &str, sub: &str, time: &str| -> Result<CheckpointPosition, LeaseError> {
        let text = text(name).ok_or_else(|| bad(name))?;
        parse_position(&text, number(sub)?, number(time)?).ok_or_else(|| bad(name))
    };
    let sinks = match item.get(SINK_POSITIONS) {
        None => BTreeMap::new(),
        Some(v) => {
            let sinks = v.as_m().map_err(|_| bad(SINK_POSITIONS))?;
            let mut out = BTreeMap::new();
            for (name, p) in sinks {
                let p = p.as_m().map_err(|_| bad(SINK_POSITIONS))?;
                let position = position_of_map(p).ok_or_else(|| bad(SINK_POSITIONS))?;
                out.insert(name.clone(), position);
            }
            out
        }
    };
    let advances = match item.get(ADVANCES) {
        None => Vec::new(),
        Some(v) => {
            let list = v.as_l().map_err(|_| bad(ADVANCES))?;
            let mut out = Vec::with_capacity(list.len());
            for a in list {
                let a = a.as_m().map_err(|_| bad(ADVANCES))?;
                let after = position_of_map(a).ok_or_else(|| bad(ADVANCES))?;
                let watermark = a
                    .get(ADVANCE_WATERMARK)
                    .and_then(|v| v.as_n().ok())
                    .and_then(|n| n.parse::<i64>().ok())
                    .ok_or_else(|| bad(ADVANCES))?;
                out.push(WatermarkAdvance { after, watermark });
            }
            out
        }
    };
    let snapshot = match item.get(SNAPSHOT) {
        None => None,
        Some(v) => {
            let json = v.as_s().map_err(|_| bad(SNAPSHOT))?;
            Some(serde_json::from_str(json).map_err(|_| bad(SNAPSHOT))?)
        }
    };
    let watermark = |name: &str| -> Result<Option<i64>, LeaseError> {
        number(name)?
            .map(|n| i64::try_from(n).map_err(|_| bad(name)))
            .transpose()
    };
    let counter = |name: &str| -> Result<u64, LeaseError> {
        u64::try_from(number(name)?.unwrap_or(0)).map_err(|_| bad(name))
    };
    Ok(Lease {
        key: text(LEASE_KEY).ok_or_else(|| bad(LEASE_KEY))?,
        owner: text(LEASE_OWNER),
        counter: counter(LEASE_COUNTER)?,
        checkpoint: ShardCheckpoint {
            committed: position(CHECKPOINT, CHECKPOINT_SUB, CHECKPOINT_TIMESTAMP)?,
            committed_watermark: watermark(COMMITTED_WATERMARK)?,
            rebuild_from: position(REBUILD_FROM, REBUILD_FROM_SUB, REBUILD_FROM_TIMESTAMP)?,
            rebuild_watermark: watermark(REBUILD_WATERMARK)?,
            sinks,
            advances,
            snapshot,
        },
        parents: {
            let mut parents = item
                .get(PARENTS)
                .and_then(|v| v.as_ss().ok())
                .cloned()
                .unwrap_or_default();
            // A string set has no order; keep the leases' order stable.
            parents.sort();
            parents
        },
        owner_switches_since_checkpoint: counter(OWNER_SWITCHES)?,
        handoff_to: text(HANDOFF_TO),
        // Set by the caller from the table's generation item.
        generation: 0,
    })
}
