//! `S3Sink`: the outputs of records cut into objects of a fixed number of records per shard,
//! named by the first record's position, so a replay cuts the same objects and overwrites them
//! with the same content; keyed results one object each, named by their identity.
//!
//! Layout under `<prefix>/<topology>/`:
//! - `<shard>/<first sequence, 56 digits>-<sub-sequence>.jsonl[.gz]` (or `.bin[.gz]`): records.
//!   Metadata: `shard`, `first-sequence`, `first-sub`, `last-sequence`, `last-sub`, `records`,
//!   `lease-generation` and `lease-epoch` (the writer's `LeaseEpoch`), `write-id` (unique per
//!   store call).
//! - `[dt=YYYY-MM-DD/hour=HH/]<shard>/<identity path>.json[.gz]`: keyed results (window results
//!   partitioned by their window's start with [`S3Sink::partition_windows_by_hour`]).
//!
//! Objects are cut by count or size, by a latency bound on a quiet shard, and at shard end.
//! What decides a cut in one run (time, say) must decide it in the replay too: before starting
//! an object the writer looks for an existing one at the same first record and, if there is
//! one, ends the new object where that one ended. The same lookup fences: an object written by
//! a newer lease epoch is never overwritten. The write is conditional on what the lookup saw
//! (`If-None-Match: *` where there was no object, `If-Match` its ETag where there was one), so
//! a second owner that wrote the key in between, however long after the lookup, makes S3
//! refuse this write; the writer then stops like a fenced one, unless the object there is its
//! own earlier try whose reply was lost (see `conditional`).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_s3::Client;
use serde::de::DeserializeOwned;
use serde::Serialize;

use shardflow_core::error::{BoxError, Fenced, SinkError};
use shardflow_core::lease::LeaseEpoch;
use shardflow_core::position::{RecordPosition, SequenceNumber, ShardId};
use shardflow_core::sink::{
    Held, InspectSink, Output, OutputBatch, OutputId, Sink, SinkContext, SinkWriter,
};

use super::conditional::{self, Refusal, WRITE_ID};
use super::objects::{self, NewObject, Precondition, RequestError, Stored};

type Encode<T> = dyn Fn(&OutputId, &T, &mut Vec<u8>) -> Result<(), BoxError> + Send + Sync;
type Decode<T> = fn(&[u8]) -> Result<T, BoxError>;

/// How outputs become bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// `{"id": "<identity>", "value": <value>}` per line; keyed results as the JSON value.
    JsonLines,
    /// The output's bytes as they are, concatenated.
    Raw,
}

/// What went wrong in the S3 sink, as the source of a [`SinkError`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum S3SinkError {
    /// An output could not be encoded.
    #[error(
        "output {} cannot be encoded: {}",
        shardflow_core::redact::output_path(id),
        shardflow_core::redact::without_values(&source.to_string())
    )]
    Encode {
        /// The output's identity.
        id: String,
        /// Why.
        source: BoxError,
    },
    /// A stored object does not hold what this sink writes.
    #[error(
        "object {} is malformed: {reason}",
        shardflow_core::redact::output_path(key)
    )]
    Malformed {
        /// The object key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// Raw objects carry no identities to read back.
    #[error("objects in the raw format carry no output identities")]
    NoIdentities,
    /// An S3 request failed.
    #[error("{operation} failed: {source}")]
    Request {
        /// The API call.
        operation: &'static str,
        /// The SDK's error.
        source: BoxError,
    },
}

/// Writes outputs of type `T` to S3 objects.
pub struct S3Sink<T> {
    inner: Arc<Inner<T>>,
}

struct Inner<T> {
    client: Client,
    bucket: String,
    prefix: String,
    name: String,
    format: Format,
    encode: Arc<Encode<T>>,
    decode: Option<Decode<T>>,
    records_per_object: usize,
    max_object_bytes: usize,
    max_latency: Duration,
    gzip: bool,
    multipart_above: usize,
    partition_windows_by_hour: bool,
}

impl<T> Clone for S3Sink<T> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<T: Serialize + DeserializeOwned + 'static> S3Sink<T> {
    /// Newline-delimited JSON: one `{"id": …, "value": …}` line per record output, so a reader
    /// can see (and deduplicate by) each output's identity.
    pub fn json_lines(
        client: Client,
        bucket: impl Into<String>,
        prefix: impl Into<String>,
    ) -> Self {
        let encode: Arc<Encode<T>> = Arc::new(|id: &OutputId, value: &T, out: &mut Vec<u8>| {
            match id {
                OutputId::Record { .. } => {
                    #[derive(Serialize)]
                    struct Line<'a, V> {
                        id: String,
                        value: &'a V,
                    }
                    serde_json::to_writer(
                        &mut *out,
                        &Line {
                            id: id.to_path(),
                            value,
                        },
                    )?;
                    out.push(b'\n');
                }
                OutputId::Keyed { .. } => serde_json::to_writer(&mut *out, value)?,
            }
            Ok(())
        });
        Self::new(
            client,
            bucket.into(),
            &prefix.into(),
            Format::JsonLines,
            encode,
        )
        .with_decode(|bytes| Ok(serde_json::from_slice(bytes)?))
    }
}

impl<T: AsRef<[u8]> + 'static> S3Sink<T> {
    /// Each output's bytes as they are, concatenated (add delimiters in the topology).
    pub fn raw(client: Client, bucket: impl Into<String>, prefix: impl Into<String>) -> Self {
        let encode: Arc<Encode<T>> = Arc::new(|_: &OutputId, value: &T, out: &mut Vec<u8>| {
            out.extend_from_slice(value.as_ref());
            Ok(())
        });
        Self::new(client, bucket.into(), &prefix.into(), Format::Raw, encode)
    }
}

impl<T> S3Sink<T> {
    fn new(
        client: Client,
        bucket: String,
        prefix: &str,
        format: Format,
        encode: Arc<Encode<T>>,
    ) -> Self {
        let prefix = prefix.trim_matches('/').to_owned();
        Self {
            inner: Arc::new(Inner {
                name: format!("s3://{bucket}/{prefix}"),
                client,
                bucket,
                prefix,
                format,
                encode,
                decode: None,
                records_per_object: 10_000,
                max_object_bytes: 64 * 1024 * 1024,
                max_latency: Duration::from_secs(60),
                gzip: false,
                multipart_above: 16 * 1024 * 1024,
                partition_windows_by_hour: false,
            }),
        }
    }

    fn configure(mut self, f: impl FnOnce(&mut Inner<T>)) -> Self {
        f(Arc::get_mut(&mut self.inner).expect("configure the sink before cloning it"));
        self
    }

    fn with_decode(self, decode: Decode<T>) -> Self {
        self.configure(|i| i.decode = Some(decode))
    }

    /// Records per object (default 10 000): a replay cuts objects at the same records.
    ///
    /// # Panics
    /// If `n` is zero.
    #[must_use]
    pub fn records_per_object(self, n: usize) -> Self {
        assert!(n > 0, "records_per_object must be at least 1");
        self.configure(|i| i.records_per_object = n)
    }

    /// Cut an object once it holds this many bytes, before compression (default 64 MiB).
    ///
    /// # Panics
    /// If `bytes` is zero.
    #[must_use]
    pub fn max_object_bytes(self, bytes: usize) -> Self {
        assert!(bytes > 0, "max_object_bytes must be at least 1");
        self.configure(|i| i.max_object_bytes = bytes)
    }

    /// A quiet shard's records are delivered at most this long after the first of them
    /// arrived at the sink (default 60 s).
    #[must_use]
    pub fn max_latency(self, latency: Duration) -> Self {
        self.configure(|i| i.max_latency = latency)
    }

    /// Gzip objects (`Content-Encoding: gzip`, `.gz` suffix).
    #[must_use]
    pub fn gzip(self, gzip: bool) -> Self {
        self.configure(|i| i.gzip = gzip)
    }

    /// Upload objects larger than this in parts (default 16 MiB; parts of 8 MiB).
    #[must_use]
    pub fn multipart_above(self, bytes: usize) -> Self {
        self.configure(|i| i.multipart_above = bytes.max(objects::PART_BYTES))
    }

    /// Put window results under `dt=YYYY-MM-DD/hour=HH/` of their window's start (UTC).
    #[must_use]
    pub fn partition_windows_by_hour(self) -> Self {
        self.configure(|i| i.partition_windows_by_hour = true)
    }
}

impl<T> Inner<T> {
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

    fn request_error(&self, e: RequestError) -> SinkError {
        self.error(
            "write",
            e.retryable,
            S3SinkError::Request {
                operation: e.operation,
                source: e.source,
            },
        )
    }

    fn topology_prefix(&self, topology: &str) -> String {
        if self.prefix.is_empty() {
            format!("{topology}/")
        } else {
            format!("{}/{topology}/", self.prefix)
        }
    }

    fn suffix(&self, single: bool) -> &'static str {
        match (self.format, single, self.gzip) {
            (Format::JsonLines, false, false) => ".jsonl",
            (Format::JsonLines, false, true) => ".jsonl.gz",
            (Format::JsonLines, true, false) => ".json",
            (Format::JsonLines, true, true) => ".json.gz",
            (Format::Raw, _, false) => ".bin",
            (Format::Raw, _, true) => ".bin.gz",
        }
    }

    fn records_key(&self, topology: &str, shard: &ShardId, first: &RecordPosition) -> String {
        format!(
            "{}{}/{:0>56}-{}{}",
            self.topology_prefix(topology),
            shard.as_str(),
            first.sequence.to_string(),
            first.sub_sequence,
            self.suffix(false)
        )
    }

    fn keyed_key(&self, topology: &str, shard: &ShardId, id: &OutputId) -> String {
        let mut key = self.topology_prefix(topology);
        if let (
            true,
            OutputId::Keyed {
                window: Some(w), ..
            },
        ) = (self.partition_windows_by_hour, id)
        {
            key.push_str(&hour_partition(w.start));
        }
        key.push_str(shard.as_str());
        key.push('/');
        key.push_str(&id.to_path());
        key.push_str(self.suffix(true));
        key
    }

    fn content_type(&self, single: bool) -> &'static str {
        match (self.format, single) {
            (Format::JsonLines, false) => "application/x-ndjson",
            (Format::JsonLines, true) => "application/json",
            (Format::Raw, _) => "application/octet-stream",
        }
    }

    fn compress<'b>(&self, body: &'b [u8]) -> Result<Cow<'b, [u8]>, SinkError> {
        if !self.gzip {
            return Ok(Cow::Borrowed(body));
        }
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder
            .write_all(body)
            .and_then(|()| encoder.finish())
            .map(Cow::Owned)
            .map_err(|e| self.error("write", false, e))
    }

    /// Compresses (if configured) and stores one object, a records object or a `single` keyed
    /// result, if the key still holds what `replaces` says. Returns the bytes stored.
    async fn store(&self, object: Store<'_>, body: &[u8]) -> Result<u64, SinkError> {
        let Store {
            key,
            shard,
            epoch,
            replaces,
            single,
            mut metadata,
        } = object;
        let write_id = conditional::new_write_id();
        metadata.insert(WRITE_ID.to_owned(), write_id.clone());
        let body = self.compress(body)?;
        let object = NewObject {
            body: &body,
            metadata: &metadata,
            content_type: self.content_type(single),
            content_encoding: self.gzip.then_some("gzip"),
        };
        match objects::put(
            &self.client,
            &self.bucket,
            key,
            object,
            replaces,
            self.multipart_above,
        )
        .await
        {
            Ok(()) => {}
            Err(e) if e.precondition_failed => {
                let now = objects::head(&self.client, &self.bucket, key)
                    .await
                    .map_err(|e| self.request_error(e))?;
                match conditional::judge_refusal(&write_id, now.as_ref().map(|s| &s.metadata)) {
                    Refusal::OwnEarlierTry => {}
                    Refusal::Overtaken => {
                        tracing::warn!(
                            key = %shardflow_core::redact::output_path(key), %shard, %epoch,
                            "another writer stored this object since this one read it; fenced"
                        );
                        return Err(self.fenced(shard, key.to_owned(), epoch));
                    }
                }
            }
            Err(e) => return Err(self.request_error(e)),
        }
        Ok(body.len() as u64)
    }

    fn fenced(&self, shard: &ShardId, output: String, epoch: LeaseEpoch) -> SinkError {
        self.error(
            "write",
            false,
            Fenced {
                shard: shard.clone(),
                output,
                epoch,
            },
        )
    }

    /// Refuses if `metadata` says a newer lease epoch wrote the object.
    fn check_fence(
        &self,
        metadata: &HashMap<String, String>,
        shard: &ShardId,
        output: String,
        epoch: LeaseEpoch,
    ) -> Result<(), SinkError> {
        if epoch_of(metadata) > epoch {
            return Err(self.fenced(shard, output, epoch));
        }
        Ok(())
    }
}

/// One object to store, and the condition it is stored on.
struct Store<'a> {
    key: &'a str,
    shard: &'a ShardId,
    epoch: LeaseEpoch,
    /// What the writer read at `key` before deciding this object.
    replaces: &'a Precondition,
    single: bool,
    metadata: HashMap<String, String>,
}

/// The condition that a write replaces exactly what HEAD showed.
fn precondition(stored: Option<&Stored>) -> Precondition {
    match stored {
        None => Precondition::Absent,
        Some(s) => Precondition::Unchanged(s.etag.clone()),
    }
}

/// `dt=YYYY-MM-DD/hour=HH/` of a UTC time in milliseconds.
fn hour_partition(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let hour = ms.rem_euclid(86_400_000) / 3_600_000;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("dt={year:04}-{month:02}-{day:02}/hour={hour:02}/")
}

/// The object being filled for one shard.
struct Filling {
    first: RecordPosition,
    last: RecordPosition,
    records: usize,
    body: Vec<u8>,
    epoch: LeaseEpoch,
    started: Instant,
    /// Where an object already stored at `first` ended: the replay ends there too.
    ends_at: Option<RecordPosition>,
    /// What was stored at `first` when the object started: sealing replaces exactly that.
    replaces: Precondition,
}

/// Cuts remembered per shard: checkpoints lag the sink by far fewer objects than this.
const MAX_CUTS: usize = 256;

#[derive(Default)]
struct ShardState {
    filling: Option<Filling>,
    /// The last records of the objects this writer stored, oldest first: the checkpoint
    /// stops only at one of them (or where the shard resumed), never inside an object.
    cuts: VecDeque<RecordPosition>,
}

struct S3Writer<T> {
    inner: Arc<Inner<T>>,
    topology: String,
    shards: BTreeMap<ShardId, ShardState>,
    /// Keyed results, one object each, by key: the last write of an identity wins.
    singles: BTreeMap<String, (ShardId, OutputId, LeaseEpoch, Vec<u8>)>,
    /// Bytes of the objects stored so far (after compression).
    bytes_written: u64,
}

#[async_trait]
impl<T: Send + Sync + 'static> Sink<T> for S3Sink<T> {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn holds_record_outputs(&self) -> bool {
        true
    }

    async fn open(&self, cx: &SinkContext) -> Result<Box<dyn SinkWriter<T>>, SinkError> {
        Ok(Box::new(S3Writer {
            inner: Arc::clone(&self.inner),
            topology: cx.topology.clone(),
            shards: BTreeMap::new(),
            singles: BTreeMap::new(),
            bytes_written: 0,
        }))
    }
}

impl<T: Send + Sync + 'static> S3Writer<T> {
    fn encode(&self, id: &OutputId, value: &T, out: &mut Vec<u8>) -> Result<(), SinkError> {
        (self.inner.encode)(id, value, out).map_err(|source| {
            self.inner.error(
                "write",
                false,
                S3SinkError::Encode {
                    id: id.to_path(),
                    source,
                },
            )
        })
    }

    /// Starts an object at `first`, ending where a stored one at the same place ended.
    async fn start(
        &self,
        shard: &ShardId,
        first: &RecordPosition,
        epoch: LeaseEpoch,
    ) -> Result<Filling, SinkError> {
        let key = self.inner.records_key(&self.topology, shard, first);
        let stored = objects::head(&self.inner.client, &self.inner.bucket, &key)
            .await
            .map_err(|e| self.inner.request_error(e))?;
        let replaces = precondition(stored.as_ref());
        let ends_at = match stored {
            None => None,
            Some(Stored { metadata, .. }) => match last_position(&metadata) {
                Some(end) => {
                    self.inner
                        .check_fence(&metadata, shard, key.clone(), epoch)?;
                    Some(end)
                }
                // Not an object this sink completed: S3 stores a PUT whole or not at all, but
                // s3rver was seen to keep an object without its metadata after a worker was
                // killed mid-PUT. It can only be a crashed run's last object: replace it.
                None => {
                    tracing::warn!(key = %shardflow_core::redact::output_path(&key), "object without shardflow metadata; replacing it");
                    None
                }
            },
        };
        Ok(Filling {
            first: first.clone(),
            last: first.clone(),
            records: 0,
            body: Vec::new(),
            epoch,
            started: Instant::now(),
            ends_at,
            replaces,
        })
    }

    /// Stores the shard's filling object.
    async fn seal(&mut self, shard: &ShardId) -> Result<(), SinkError> {
        let Some(filling) = self.shards.get_mut(shard).and_then(|s| s.filling.take()) else {
            return Ok(());
        };
        let key = self
            .inner
            .records_key(&self.topology, shard, &filling.first);
        let metadata: HashMap<String, String> = [
            ("shard", shard.as_str().to_owned()),
            ("first-sequence", filling.first.sequence.to_string()),
            ("first-sub", filling.first.sub_sequence.to_string()),
            ("last-sequence", filling.last.sequence.to_string()),
            ("last-sub", filling.last.sub_sequence.to_string()),
            ("records", filling.records.to_string()),
            ("lease-epoch", filling.epoch.counter.to_string()),
            ("lease-generation", filling.epoch.generation.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let object = Store {
            key: &key,
            shard,
            epoch: filling.epoch,
            replaces: &filling.replaces,
            single: false,
            metadata,
        };
        self.bytes_written += self.inner.store(object, &filling.body).await?;
        let cuts = &mut self.shards.entry(shard.clone()).or_default().cuts;
        if cuts.len() == MAX_CUTS {
            cuts.pop_front();
        }
        cuts.push_back(filling.last);
        Ok(())
    }

    /// Whether the filling object ends before `next` (a record not yet in it).
    fn full_before(&self, filling: &Filling, next: &RecordPosition) -> bool {
        match &filling.ends_at {
            // Replaying over a stored object: end exactly where it ended.
            Some(end) => next > end,
            None => {
                filling.records >= self.inner.records_per_object
                    || filling.body.len() >= self.inner.max_object_bytes
            }
        }
    }

    async fn write_record(
        &mut self,
        shard: &ShardId,
        epoch: LeaseEpoch,
        output: &Output<T>,
        position: &RecordPosition,
    ) -> Result<(), SinkError> {
        let mut encoded = Vec::new();
        self.encode(&output.id, &output.value, &mut encoded)?;
        let new_record = match self.shards.get(shard).and_then(|s| s.filling.as_ref()) {
            // Outputs of one record (flat_map) always share an object.
            Some(f) if &f.last == position && f.records > 0 => false,
            Some(f) if self.full_before(f, position) => {
                self.seal(shard).await?;
                true
            }
            _ => true,
        };
        if self.shards.get(shard).is_none_or(|s| s.filling.is_none()) {
            let filling = self.start(shard, position, epoch).await?;
            self.shards.entry(shard.clone()).or_default().filling = Some(filling);
        }
        let filling = self
            .shards
            .get_mut(shard)
            .and_then(|s| s.filling.as_mut())
            .expect("started above");
        if new_record {
            filling.records += 1;
            filling.last = position.clone();
        }
        filling.body.extend_from_slice(&encoded);
        Ok(())
    }
}

impl<T> S3Writer<T> {
    /// Stores one keyed result, fenced by the epoch that wrote what is there.
    async fn store_single(
        &self,
        key: &str,
        (shard, id, epoch, body): &(ShardId, OutputId, LeaseEpoch, Vec<u8>),
    ) -> Result<u64, SinkError> {
        let stored = objects::head(&self.inner.client, &self.inner.bucket, key)
            .await
            .map_err(|e| self.inner.request_error(e))?;
        if let Some(stored) = &stored {
            self.inner
                .check_fence(&stored.metadata, shard, id.to_path(), *epoch)?;
        }
        let object = Store {
            key,
            shard,
            epoch: *epoch,
            replaces: &precondition(stored.as_ref()),
            single: true,
            metadata: [
                ("shard".to_owned(), shard.as_str().to_owned()),
                ("identity".to_owned(), id.to_path()),
                ("lease-epoch".to_owned(), epoch.counter.to_string()),
                ("lease-generation".to_owned(), epoch.generation.to_string()),
            ]
            .into(),
        };
        self.inner.store(object, body).await
    }
}

/// The epoch that wrote an object, from its metadata; objects written before generations
/// existed count as generation 0, and objects without an epoch as epoch 0/0.
fn epoch_of(metadata: &HashMap<String, String>) -> LeaseEpoch {
    let number = |name: &str| {
        metadata
            .get(name)
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    LeaseEpoch::new(number("lease-generation"), number("lease-epoch"))
}

fn last_position(metadata: &HashMap<String, String>) -> Option<RecordPosition> {
    let sequence = SequenceNumber::parse(metadata.get("last-sequence")?).ok()?;
    let sub: u32 = metadata.get("last-sub")?.parse().ok()?;
    Some(RecordPosition::with_sub_sequence(sequence, sub))
}

#[async_trait]
impl<T: Send + Sync + 'static> SinkWriter<T> for S3Writer<T> {
    fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    async fn write(&mut self, batch: OutputBatch<T>) -> Result<(), SinkError> {
        for output in &batch.outputs {
            match &output.id {
                OutputId::Record { position, .. } => {
                    self.write_record(&batch.shard, batch.lease_epoch, output, position)
                        .await?;
                }
                OutputId::Keyed { .. } => {
                    let mut body = Vec::new();
                    self.encode(&output.id, &output.value, &mut body)?;
                    let key = self
                        .inner
                        .keyed_key(&self.topology, &batch.shard, &output.id);
                    self.singles.insert(
                        key,
                        (
                            batch.shard.clone(),
                            output.id.clone(),
                            batch.lease_epoch,
                            body,
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), SinkError> {
        while let Some((key, single)) = self.singles.pop_first() {
            match self.store_single(&key, &single).await {
                Ok(bytes) => self.bytes_written += bytes,
                Err(e) => {
                    // Kept for the next commit, this one and the rest (see `SinkWriter`).
                    self.singles.insert(key, single);
                    return Err(e);
                }
            }
        }
        // The latency bound: a filling object older than it is stored short (and a replay
        // finds it and ends there too).
        let overdue: Vec<ShardId> = self
            .shards
            .iter()
            .filter(|(_, s)| {
                s.filling.as_ref().is_some_and(|f| {
                    f.ends_at.is_none() && f.started.elapsed() >= self.inner.max_latency
                })
            })
            .map(|(shard, _)| shard.clone())
            .collect();
        for shard in overdue {
            self.seal(&shard).await?;
        }
        Ok(())
    }

    fn held(&self) -> Vec<(ShardId, Held)> {
        self.shards
            .iter()
            .filter(|(_, s)| s.filling.is_some() || !s.cuts.is_empty())
            .map(|(shard, s)| {
                let held = Held {
                    cuts: s.cuts.iter().cloned().collect(),
                    buffered: s.filling.is_some(),
                };
                (shard.clone(), held)
            })
            .collect()
    }

    async fn end_shard(&mut self, shard: &ShardId) -> Result<(), SinkError> {
        self.seal(shard).await?;
        self.shards.remove(shard);
        Ok(())
    }

    fn release_shard(&mut self, shard: &ShardId) {
        self.shards.remove(shard);
        self.singles.retain(|_, (s, ..)| s != shard);
    }
}

#[async_trait]
impl<T: Send + Sync + 'static> InspectSink<T> for S3Sink<T> {
    /// Reads every object of every topology under the prefix (for tests and small outputs).
    async fn committed(&self) -> Result<BTreeMap<(ShardId, String), T>, SinkError> {
        let inner = &self.inner;
        let decode = inner
            .decode
            .ok_or_else(|| inner.error("read", false, S3SinkError::NoIdentities))?;
        let prefix = if inner.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", inner.prefix)
        };
        let keys = objects::list(&inner.client, &inner.bucket, &prefix)
            .await
            .map_err(|e| inner.request_error(e))?;
        let mut out = BTreeMap::new();
        for key in keys {
            let (body, metadata) = objects::get(&inner.client, &inner.bucket, &key)
                .await
                .map_err(|e| inner.request_error(e))?;
            let malformed = |reason: String| {
                inner.error(
                    "read",
                    false,
                    S3SinkError::Malformed {
                        key: key.clone(),
                        reason,
                    },
                )
            };
            let body = if key.ends_with(".gz") {
                let mut plain = Vec::new();
                std::io::Read::read_to_end(
                    &mut flate2::read::GzDecoder::new(&body[..]),
                    &mut plain,
                )
                .map_err(|e| malformed(e.to_string()))?;
                plain
            } else {
                body
            };
            let shard = ShardId::new(
                metadata
                    .get("shard")
                    .ok_or_else(|| malformed("no shard metadata".into()))?
                    .as_str(),
            );
            if let Some(identity) = metadata.get("identity") {
                let value = decode(&body).map_err(|e| malformed(e.to_string()))?;
                out.insert((shard, identity.clone()), value);
                continue;
            }
            for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                #[derive(serde::Deserialize)]
                struct Line {
                    id: String,
                    value: serde_json::Value,
                }
                let line: Line =
                    serde_json::from_slice(line).map_err(|e| malformed(e.to_string()))?;
                let value = serde_json::to_vec(&line.value)
                    .map_err(BoxError::from)
                    .and_then(|bytes| decode(&bytes))
                    .map_err(|e| malformed(e.to_string()))?;
                out.insert((shard.clone(), line.id), value);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::hour_partition;

    #[test]
    fn hour_partitions_are_utc_civil_dates() {
        assert_eq!(hour_partition(0), "dt=1970-01-01/hour=00/");
        // 2024-02-29T13:05:00Z, a leap day.
        assert_eq!(hour_partition(1_709_211_900_000), "dt=2024-02-29/hour=13/");
        assert_eq!(hour_partition(-1), "dt=1969-12-31/hour=23/");
    }
}
