//! `DynamoSink`: one item per output identity, so a replay overwrites instead of duplicating,
//! and (by default) each write conditional on the lease epoch, so a stale owner of a shard can
//! never overwrite what a newer owner wrote.
//!
//! Item layout (hash key `id`, a string):
//! - `id`: `<topology>/<shard>/<identity path>` (e.g. `clicks/shardId-0/w/<start>-<end>/c-1`);
//! - `topology`, `shard`, `path`, `leaseEpoch` (N);
//! - `key` (up to 1 KiB; longer keys only in `path`), `windowStart`, `windowEnd` (N) for keyed
//!   results; `sequenceNumber`,
//!   `subSequenceNumber` for outputs of one record;
//! - `value`: the output as an attribute (through serde_json: a struct becomes a map).

use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use super::retry::retryable;
use async_trait::async_trait;
use aws_sdk_dynamodb::operation::batch_write_item::BatchWriteItemError;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use aws_sdk_dynamodb::Client;
use futures::stream::{self, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use shardflow_core::error::{BoxError, Fenced, SinkError};
use shardflow_core::lease::LeaseEpoch;
use shardflow_core::position::ShardId;
use shardflow_core::redact::without_values;
use shardflow_core::sink::{
    InspectSink, Output, OutputBatch, OutputId, Sink, SinkContext, SinkWriter,
};

use super::attribute::{from_attribute, item_size, to_attribute};
use super::table::ensure_table;

/// DynamoDB's item size limit.
pub const MAX_ITEM_BYTES: usize = 400 * 1024;
/// Room `check` leaves for the identity attributes (id, shard, path, key, window, epoch).
const IDENTITY_ROOM: usize = 2 * 1024;

/// The longest key written whole in the `key` attribute; a longer one is left out (the `path`
/// names it by a readable prefix and a digest, and a keyed value usually holds it too), so the
/// attributes stay within `IDENTITY_ROOM` whatever the key.
const MAX_KEY_ATTRIBUTE_BYTES: usize = 1024;
/// Items per BatchWriteItem request (the API's limit).
const BATCH_ITEMS: usize = 25;

const ID: &str = "id";
const LEASE_EPOCH: &str = "leaseEpoch";
/// The lease table generation of the epoch (see `LeaseEpoch`); items written before
/// generations existed have none, and count as generation 0.
const LEASE_GENERATION: &str = "leaseGeneration";

/// The condition of a fenced put: the item is new, or was last written by an epoch no newer
/// than the writer's, comparing (generation, counter) in that order.
const fn fence_condition(generation: u64) -> &'static str {
    if generation > 0 {
        "attribute_not_exists(#id) OR attribute_not_exists(#gen) OR #gen < :gen \
         OR (#gen = :gen AND #epoch <= :epoch)"
    } else {
        "attribute_not_exists(#id) OR ((attribute_not_exists(#gen) OR #gen = :gen) \
         AND #epoch <= :epoch)"
    }
}

/// How the sink writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DynamoWriteMode {
    /// One conditional PutItem per output (`concurrency` in flight): an item last written by a
    /// newer lease epoch is never overwritten. The default.
    Fenced {
        /// Requests in flight per writer.
        concurrency: usize,
    },
    /// BatchWriteItem, 25 items per request, unprocessed items re-sent: fewer requests, but
    /// DynamoDB takes no conditions in a batch, so a stale owner's late write can overwrite a
    /// newer result until the newer owner writes it again.
    Batch,
}

impl Default for DynamoWriteMode {
    fn default() -> Self {
        Self::Fenced { concurrency: 16 }
    }
}

/// An item id (`<topology>/<shard>/<identity path>`) as errors show it: without its key.
fn shown_id(id: &str) -> String {
    shardflow_core::redact::output_path(id)
}

/// What went wrong in the DynamoDB sink, as the source of a [`SinkError`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DynamoSinkError {
    /// The item would exceed DynamoDB's 400 KB limit.
    #[error(
        "item {} is {size} bytes, over DynamoDB's {MAX_ITEM_BYTES}-byte item limit",
        shown_id(id)
    )]
    ItemTooLarge {
        /// The item's id.
        id: String,
        /// Its size as DynamoDB counts it (approximately).
        size: usize,
    },
    /// The output does not serialize to JSON (a map with non-string keys, say).
    #[error("output {} cannot be encoded: {}", shown_id(id), without_values(&source.to_string()))]
    Encode {
        /// The item's id.
        id: String,
        /// The serde error.
        source: serde_json::Error,
    },
    /// A stored item does not hold what this sink writes.
    #[error("item {} is malformed: {reason}", shown_id(id))]
    Malformed {
        /// The item's id.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// A DynamoDB request failed.
    #[error("{operation} failed: {source}")]
    Request {
        /// The API call.
        operation: &'static str,
        /// The SDK's error.
        source: BoxError,
    },
    /// Retries ran out with items still unwritten.
    #[error("{count} items still unprocessed after {attempts} attempts")]
    Unprocessed {
        /// Items left.
        count: usize,
        /// Attempts made.
        attempts: u32,
    },
}

/// Writes outputs of type `T` to a DynamoDB table (created on first use, on-demand billing).
pub struct DynamoSink<T> {
    inner: Arc<Inner>,
    _values: PhantomData<fn(T) -> T>,
}

struct Inner {
    client: Client,
    table: String,
    name: String,
    mode: DynamoWriteMode,
    max_attempts: u32,
    backoff_base: Duration,
    backoff_max: Duration,
}

impl<T> Clone for DynamoSink<T> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            _values: PhantomData,
        }
    }
}

impl<T> DynamoSink<T> {
    /// A sink writing to `table`, creating it if absent.
    ///
    /// # Errors
    /// The table could not be described, created, or did not become active.
    pub async fn open(client: Client, table: impl Into<String>) -> Result<Self, SinkError> {
        let table = table.into();
        let name = format!("dynamodb:{table}");
        ensure_table(&client, &table, ID)
            .await
            .map_err(|e| SinkError {
                sink: name.clone(),
                operation: e.operation,
                retryable: e.retryable,
                source: e.source,
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                table,
                name,
                mode: DynamoWriteMode::default(),
                max_attempts: 10,
                backoff_base: Duration::from_millis(50),
                backoff_max: Duration::from_secs(5),
            }),
            _values: PhantomData,
        })
    }

    /// Sets the write mode (default: fenced conditional puts, 16 in flight).
    ///
    /// # Panics
    /// If called after the sink was cloned, or with a concurrency of zero.
    #[must_use]
    pub fn mode(mut self, mode: DynamoWriteMode) -> Self {
        if let DynamoWriteMode::Fenced { concurrency } = mode {
            assert!(
                concurrency > 0,
                "DynamoWriteMode::Fenced needs a concurrency of at least 1"
            );
        }
        Arc::get_mut(&mut self.inner)
            .expect("configure the sink before cloning it")
            .mode = mode;
        self
    }

    /// The table written to.
    pub fn table(&self) -> &str {
        &self.inner.table
    }
}

impl Inner {
    fn error(
        &self,
        operation: &'static str,
        retryable: bool,
        source: impl Into<BoxError>,
    ) -> SinkError {
        SinkError {
            sink: self.name.clone(),
            operation,
            retryable,
            source: source.into(),
        }
    }

    /// Full jitter: a uniform wait up to the doubled base, capped.
    fn backoff(&self, attempt: u32) -> Duration {
        let cap = self
            .backoff_base
            .saturating_mul(1 << attempt.min(16))
            .min(self.backoff_max);
        cap.mul_f64(rand::random::<f64>())
    }

    /// One conditional put, retried while DynamoDB says trying again may help.
    async fn put_fenced(&self, pending: &Pending) -> Result<(), SinkError> {
        let mut attempt = 0;
        loop {
            let result = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(pending.item.clone()))
                .condition_expression(fence_condition(pending.epoch.generation))
                .expression_attribute_names("#id", ID)
                .expression_attribute_names("#epoch", LEASE_EPOCH)
                .expression_attribute_names("#gen", LEASE_GENERATION)
                .expression_attribute_values(
                    ":epoch",
                    AttributeValue::N(pending.epoch.counter.to_string()),
                )
                .expression_attribute_values(
                    ":gen",
                    AttributeValue::N(pending.epoch.generation.to_string()),
                )
                .send()
                .await;
            match result {
                Ok(_) => return Ok(()),
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
                {
                    return Err(self.error(
                        "put",
                        false,
                        Fenced {
                            shard: pending.shard.clone(),
                            output: pending.path.clone(),
                            epoch: pending.epoch,
                        },
                    ));
                }
                Err(e) if retryable(&e, put_throttled) && attempt + 1 < self.max_attempts => {
                    attempt += 1;
                    tokio::time::sleep(self.backoff(attempt)).await;
                }
                Err(e) => {
                    let retryable = retryable(&e, put_throttled);
                    return Err(self.error(
                        "put",
                        retryable,
                        DynamoSinkError::Request {
                            operation: "PutItem",
                            source: e.into(),
                        },
                    ));
                }
            }
        }
    }

    /// BatchWriteItem in chunks of 25, re-sending unprocessed items with backoff.
    async fn put_batches(&self, items: Vec<Pending>) -> Result<(), SinkError> {
        let mut requests: Vec<WriteRequest> = Vec::with_capacity(items.len());
        for pending in items {
            let put = PutRequest::builder()
                .set_item(Some(pending.item))
                .build()
                .map_err(|e| self.error("write", false, e))?;
            requests.push(WriteRequest::builder().put_request(put).build());
        }
        let mut attempt = 0;
        while !requests.is_empty() {
            let mut unprocessed = Vec::new();
            for chunk in requests.chunks(BATCH_ITEMS) {
                let result = self
                    .client
                    .batch_write_item()
                    .request_items(&self.table, chunk.to_vec())
                    .send()
                    .await;
                match result {
                    Ok(out) => {
                        if let Some(left) = out.unprocessed_items().and_then(|m| m.get(&self.table))
                        {
                            unprocessed.extend(left.iter().cloned());
                        }
                    }
                    Err(e) if retryable(&e, batch_throttled) => {
                        unprocessed.extend(chunk.iter().cloned());
                    }
                    Err(e) => {
                        return Err(self.error(
                            "write",
                            false,
                            DynamoSinkError::Request {
                                operation: "BatchWriteItem",
                                source: e.into(),
                            },
                        ))
                    }
                }
            }
            requests = unprocessed;
            if requests.is_empty() {
                break;
            }
            attempt += 1;
            if attempt >= self.max_attempts {
                return Err(self.error(
                    "commit",
                    true,
                    DynamoSinkError::Unprocessed {
                        count: requests.len(),
                        attempts: attempt,
                    },
                ));
            }
            tokio::time::sleep(self.backoff(attempt)).await;
        }
        Ok(())
    }
}

fn put_throttled(e: &PutItemError) -> bool {
    e.is_provisioned_throughput_exceeded_exception()
        || e.is_request_limit_exceeded()
        || e.is_internal_server_error()
}

fn batch_throttled(e: &BatchWriteItemError) -> bool {
    e.is_provisioned_throughput_exceeded_exception()
        || e.is_request_limit_exceeded()
        || e.is_internal_server_error()
}

/// An item ready to write.
struct Pending {
    shard: ShardId,
    path: String,
    epoch: LeaseEpoch,
    item: HashMap<String, AttributeValue>,
    /// The item's size as DynamoDB counts it (measured once, when it was built).
    size: usize,
}

struct DynamoWriter<T> {
    inner: Arc<Inner>,
    topology: String,
    /// By item id: the last write of an identity within a commit wins, and a batch never
    /// holds one key twice (DynamoDB rejects that).
    pending: BTreeMap<String, Pending>,
    /// Item bytes (as DynamoDB sizes them) of the commits so far.
    bytes_written: u64,
    _values: PhantomData<fn(T)>,
}

/// The bytes of the item a value makes, as DynamoDB sizes them, with room for the identity
/// attributes; `Err` if it does not encode.
fn value_item_size<T: Serialize>(value: &T) -> Result<usize, String> {
    let value = serde_json::to_value(value).map_err(|e| {
        format!(
            "cannot be encoded: {}",
            shardflow_core::redact::without_values(&e.to_string())
        )
    })?;
    let mut item = HashMap::with_capacity(1);
    item.insert("value".to_owned(), to_attribute(&value));
    Ok(item_size(&item) + IDENTITY_ROOM)
}

#[async_trait]
impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> Sink<T> for DynamoSink<T> {
    fn name(&self) -> &str {
        &self.inner.name
    }

    /// Refuses values that do not encode, or whose item would be over 400 KB (its value plus
    /// room for the identity attributes): their input records go to the dead-letter policy.
    fn check(&self, value: &T) -> Result<(), String> {
        let size = value_item_size(value)?;
        if size > MAX_ITEM_BYTES {
            return Err(format!(
                "item of about {size} bytes is over DynamoDB's {MAX_ITEM_BYTES}-byte item limit"
            ));
        }
        Ok(())
    }

    fn size_of(&self, value: &T) -> Option<u64> {
        value_item_size(value).ok().map(|n| n as u64)
    }

    async fn open(&self, cx: &SinkContext) -> Result<Box<dyn SinkWriter<T>>, SinkError> {
        Ok(Box::new(DynamoWriter::<T> {
            inner: Arc::clone(&self.inner),
            topology: cx.topology.clone(),
            pending: BTreeMap::new(),
            bytes_written: 0,
            _values: PhantomData,
        }))
    }
}

impl<T: Serialize> DynamoWriter<T> {
    fn item(
        &self,
        shard: &ShardId,
        epoch: LeaseEpoch,
        output: &Output<T>,
    ) -> Result<(String, HashMap<String, AttributeValue>, usize), DynamoSinkError> {
        let path = output.id.to_path();
        let id = format!("{}/{}/{path}", self.topology, shard.as_str());
        let value =
            serde_json::to_value(&output.value).map_err(|source| DynamoSinkError::Encode {
                id: id.clone(),
                source,
            })?;
        let mut item: HashMap<String, AttributeValue> = HashMap::with_capacity(10);
        item.insert(ID.into(), AttributeValue::S(id.clone()));
        item.insert("topology".into(), AttributeValue::S(self.topology.clone()));
        item.insert("shard".into(), AttributeValue::S(shard.as_str().to_owned()));
        item.insert("path".into(), AttributeValue::S(path));
        item.insert(
            LEASE_EPOCH.into(),
            AttributeValue::N(epoch.counter.to_string()),
        );
        item.insert(
            LEASE_GENERATION.into(),
            AttributeValue::N(epoch.generation.to_string()),
        );
        match &output.id {
            OutputId::Record { position, .. } => {
                item.insert(
                    "sequenceNumber".into(),
                    AttributeValue::S(position.sequence.to_string()),
                );
                item.insert(
                    "subSequenceNumber".into(),
                    AttributeValue::N(position.sub_sequence.to_string()),
                );
            }
            OutputId::Keyed { key, window, index } => {
                let key = key.to_string();
                if key.len() <= MAX_KEY_ATTRIBUTE_BYTES {
                    item.insert("key".into(), AttributeValue::S(key));
                }
                if *index != 0 {
                    item.insert("outputIndex".into(), AttributeValue::N(index.to_string()));
                }
                if let Some(w) = window {
                    item.insert("windowStart".into(), AttributeValue::N(w.start.to_string()));
                    item.insert("windowEnd".into(), AttributeValue::N(w.end.to_string()));
                }
            }
        }
        item.insert("value".into(), to_attribute(&value));
        let size = item_size(&item);
        if size > MAX_ITEM_BYTES {
            return Err(DynamoSinkError::ItemTooLarge { id, size });
        }
        Ok((id, item, size))
    }
}

#[async_trait]
impl<T: Serialize + Send + 'static> SinkWriter<T> for DynamoWriter<T> {
    async fn write(&mut self, batch: OutputBatch<T>) -> Result<(), SinkError> {
        for output in &batch.outputs {
            let (id, item, size) = self
                .item(&batch.shard, batch.lease_epoch, output)
                .map_err(|e| self.inner.error("write", false, e))?;
            let path = output.id.to_path();
            self.pending.insert(
                id,
                Pending {
                    shard: batch.shard.clone(),
                    path,
                    epoch: batch.lease_epoch,
                    item,
                    size,
                },
            );
        }
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), SinkError> {
        let items = std::mem::take(&mut self.pending);
        if items.is_empty() {
            return Ok(());
        }
        let bytes: usize = items.values().map(|p| p.size).sum();
        match self.inner.mode {
            DynamoWriteMode::Batch => {
                self.inner
                    .put_batches(items.into_values().collect())
                    .await?;
            }
            DynamoWriteMode::Fenced { concurrency } => self.put_fenced(items, concurrency).await?,
        }
        self.bytes_written += bytes as u64;
        Ok(())
    }

    fn release_shard(&mut self, shard: &ShardId) {
        self.pending.retain(|_, p| &p.shard != shard);
    }

    fn bytes_written(&self) -> u64 {
        self.bytes_written
    }
}

impl<T> DynamoWriter<T> {
    /// Puts a commit's items, each on its epoch condition. The items not written stay
    /// pending: after a fence the runtime releases the fenced shard and commits the rest
    /// again (see `SinkWriter::commit`).
    async fn put_fenced(
        &mut self,
        items: BTreeMap<String, Pending>,
        concurrency: usize,
    ) -> Result<(), SinkError> {
        let inner = &self.inner;
        let results: Vec<(String, Pending, Result<(), SinkError>)> = stream::iter(items)
            .map(|(id, p)| async move {
                let result = inner.put_fenced(&p).await;
                (id, p, result)
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        // A fencing refusal wins over other errors: it tells the runtime to stop the shard
        // rather than fail the run.
        let (mut fenced, mut other) = (None, None);
        for (id, p, result) in results {
            if let Err(e) = result {
                self.pending.insert(id, p);
                if e.is_fenced() {
                    fenced.get_or_insert(e);
                } else {
                    other.get_or_insert(e);
                }
            }
        }
        fenced.or(other).map_or(Ok(()), Err)
    }
}

#[async_trait]
impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> InspectSink<T> for DynamoSink<T> {
    async fn committed(&self) -> Result<BTreeMap<(ShardId, String), T>, SinkError> {
        let inner = &self.inner;
        let mut out = BTreeMap::new();
        let mut start = None;
        loop {
            let page = inner
                .client
                .scan()
                .table_name(&inner.table)
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| {
                    inner.error(
                        "read",
                        true,
                        DynamoSinkError::Request {
                            operation: "Scan",
                            source: e.into(),
                        },
                    )
                })?;
            for item in page.items() {
                let (shard, path, value) =
                    decode(item).map_err(|e| inner.error("read", false, e))?;
                let value: T = serde_json::from_value(value).map_err(|e| {
                    inner.error(
                        "read",
                        false,
                        DynamoSinkError::Malformed {
                            id: format!("{}/{path}", shard.as_str()),
                            reason: e.to_string(),
                        },
                    )
                })?;
                out.insert((shard, path), value);
            }
            match page.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => break,
            }
        }
        Ok(out)
    }
}

fn decode(
    item: &HashMap<String, AttributeValue>,
) -> Result<(ShardId, String, serde_json::Value), DynamoSinkError> {
    let id = item
        .get(ID)
        .and_then(|v| v.as_s().ok())
        .cloned()
        .unwrap_or_default();
    let malformed = |reason: &str| DynamoSinkError::Malformed {
        id: id.clone(),
        reason: reason.into(),
    };
    let text = |name: &str| {
        item.get(name)
            .and_then(|v| v.as_s().ok())
            .cloned()
            .ok_or_else(|| malformed(&format!("no string attribute {name}")))
    };
    let shard = ShardId::new(text("shard")?);
    let path = text("path")?;
    let value = item
        .get("value")
        .and_then(from_attribute)
        .ok_or_else(|| malformed("no value attribute JSON can hold"))?;
    Ok((shard, path, value))
}
