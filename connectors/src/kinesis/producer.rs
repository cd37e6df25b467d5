//! The Kinesis producer: batches PutRecords within the service limits, re-sends only failed
//! entries with exponential backoff and full jitter until a per-record deadline, bounds buffered
//! bytes and in-flight requests (`send` waits when full), and optionally aggregates small
//! records into KPL records grouped by predicted shard.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use aws_sdk_kinesis::Client;
use md5::{Digest, Md5};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use shardflow_core::position::{RecordPosition, SequenceNumber, ShardId};

use super::admin::StreamAdmin;
use super::aggregation::{AggregateBuilder, UserRecord};
use super::error::KinesisError;
use super::producer_metrics::ProducerMetrics;

/// Most entries in one PutRecords request (service limit).
pub const MAX_RECORDS_PER_REQUEST: usize = 500;
/// Most bytes (data plus partition keys) in one PutRecords request (service limit).
pub const MAX_REQUEST_BYTES: usize = 5 * 1024 * 1024;
/// Most bytes of one record, data plus partition key (service limit).
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
/// Longest partition key, in Unicode characters (service limit).
pub const MAX_PARTITION_KEY_CHARS: usize = 256;

/// How the producer batches, retries and bounds memory.
#[derive(Clone, Debug)]
pub struct ProducerConfig {
    /// Bytes accepted by `send` and not yet written (or failed); `send` waits when full.
    pub max_buffered_bytes: usize,
    /// PutRecords requests in flight at once.
    pub max_in_flight: usize,
    /// A partial batch (or aggregate) is sent after waiting this long for more records.
    pub linger: Duration,
    /// A record not written within this time is reported failed to its sender.
    pub record_ttl: Duration,
    /// Aggregate user records into KPL records of at most this many bytes (`None`: off).
    pub aggregate_max_bytes: Option<usize>,
    /// At most one request in flight, failed entries re-sent before anything newer: per-key
    /// order holds.
    pub ordered: bool,
    /// First wait before re-sending failed entries; doubles per attempt, with full jitter.
    pub backoff_base: Duration,
    /// Longest such wait.
    pub backoff_max: Duration,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            max_buffered_bytes: 32 * 1024 * 1024,
            max_in_flight: 4,
            linger: Duration::from_secs(1),
            record_ttl: Duration::from_secs(30),
            aggregate_max_bytes: None,
            ordered: false,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// Where a record was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutResult {
    /// The shard.
    pub shard: ShardId,
    /// The record's position (sub-sequence = index inside an aggregate, 0 otherwise).
    pub position: RecordPosition,
}

/// Why a record was not written.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ProducerError {
    /// Data plus partition key exceed the 1 MiB record limit; nothing was sent.
    #[error("record of {size} bytes (data plus partition key) exceeds the {limit}-byte Kinesis limit; split it")]
    RecordTooLarge {
        /// The record's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The partition key is empty or longer than 256 characters; nothing was sent.
    #[error("partition key of {chars} characters is invalid: Kinesis takes 1 to 256")]
    InvalidPartitionKey {
        /// Its length in characters.
        chars: usize,
    },
    /// The record could not be written before its deadline; the last error is given.
    #[error("record not written within its {ttl_secs} s deadline after {attempts} attempts: {last_error}")]
    Expired {
        /// The deadline.
        ttl_secs: u64,
        /// Attempts made.
        attempts: u32,
        /// The last error code or message.
        last_error: String,
    },
    /// The service rejected the request for good (for example the stream does not exist).
    #[error("PutRecords failed: {0}")]
    Rejected(String),
    /// The producer was shut down.
    #[error("the producer is closed")]
    Closed,
}

/// The outcome of one `send`, to await if the caller cares.
#[derive(Debug)]
pub struct Ticket(oneshot::Receiver<Result<PutResult, ProducerError>>);

impl Ticket {
    /// Waits for the record to be written or to fail.
    ///
    /// # Errors
    /// See [`ProducerError`].
    pub async fn outcome(self) -> Result<PutResult, ProducerError> {
        self.0.await.unwrap_or(Err(ProducerError::Closed))
    }
}

/// One user record waiting to be written.
struct Pending {
    partition_key: String,
    data: Vec<u8>,
    deadline: Instant,
    ticket: oneshot::Sender<Result<PutResult, ProducerError>>,
    _budget: OwnedSemaphorePermit,
}

enum Command {
    Record(Pending),
    Flush(oneshot::Sender<()>),
}

/// Writes records to a Kinesis stream. Cloning shares the background task.
#[derive(Clone)]
pub struct KinesisProducer {
    tx: mpsc::Sender<Command>,
    budget: Arc<Semaphore>,
    budget_bytes: usize,
    metrics: ProducerMetrics,
}

impl KinesisProducer {
    /// A producer writing to `stream`. With aggregation on it reads the shard map first.
    ///
    /// # Errors
    /// Listing the shards failed.
    pub async fn new(
        client: Client,
        stream: impl Into<String>,
        config: ProducerConfig,
    ) -> Result<Self, KinesisError> {
        Self::with_metrics(client, stream, config, ProducerMetrics::unregistered()).await
    }

    /// As [`KinesisProducer::new`], reporting into `metrics`.
    ///
    /// # Errors
    /// Listing the shards failed.
    pub async fn with_metrics(
        client: Client,
        stream: impl Into<String>,
        config: ProducerConfig,
        metrics: ProducerMetrics,
    ) -> Result<Self, KinesisError> {
        let stream = stream.into();
        let shard_map = match config.aggregate_max_bytes {
            Some(_) => Some(ShardMap::load(&client, &stream).await?),
            None => None,
        };
        let budget_bytes = config.max_buffered_bytes.max(MAX_RECORD_BYTES);
        let budget = Arc::new(Semaphore::new(budget_bytes));
        // The channel itself holds little: the byte budget is what bounds memory.
        let (tx, rx) = mpsc::channel(1024);
        let worker = Worker {
            client,
            stream,
            in_flight: Arc::new(Semaphore::new(if config.ordered {
                1
            } else {
                config.max_in_flight.max(1)
            })),
            config,
            metrics: metrics.clone(),
            shard_map,
            batch: Batch::default(),
            aggregates: HashMap::new(),
            requests: JoinSet::new(),
        };
        tokio::spawn(worker.run(rx));
        Ok(Self {
            tx,
            budget,
            budget_bytes,
            metrics,
        })
    }

    /// The producer's metrics.
    pub fn metrics(&self) -> &ProducerMetrics {
        &self.metrics
    }

    /// Queues a record; waits while the buffer is full (backpressure). Await the returned
    /// ticket for its outcome.
    ///
    /// # Errors
    /// The record is invalid (too large, bad key), checked before anything is sent; or the
    /// producer is closed.
    pub async fn send(
        &self,
        partition_key: &str,
        data: impl Into<Vec<u8>>,
    ) -> Result<Ticket, ProducerError> {
        let data = data.into();
        let chars = partition_key.chars().count();
        if chars == 0 || chars > MAX_PARTITION_KEY_CHARS {
            return Err(ProducerError::InvalidPartitionKey { chars });
        }
        let size = partition_key.len() + data.len();
        if size > MAX_RECORD_BYTES {
            return Err(ProducerError::RecordTooLarge {
                size,
                limit: MAX_RECORD_BYTES,
            });
        }
        let permits = u32::try_from(size.clamp(1, self.budget_bytes)).unwrap_or(u32::MAX);
        let budget = Arc::clone(&self.budget)
            .acquire_many_owned(permits)
            .await
            .map_err(|_| ProducerError::Closed)?;
        let (ticket_tx, ticket_rx) = oneshot::channel();
        let pending = Pending {
            partition_key: partition_key.to_owned(),
            data,
            deadline: Instant::now(), // set by the worker relative to its TTL
            ticket: ticket_tx,
            _budget: budget,
        };
        self.tx
            .send(Command::Record(pending))
            .await
            .map_err(|_| ProducerError::Closed)?;
        Ok(Ticket(ticket_rx))
    }

    /// Sends everything queued and waits until every record sent before the call was written
    /// or failed.
    ///
    /// # Errors
    /// The producer is closed.
    pub async fn flush(&self) -> Result<(), ProducerError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Command::Flush(done))
            .await
            .map_err(|_| ProducerError::Closed)?;
        wait.await.map_err(|_| ProducerError::Closed)
    }
}

/// A Kinesis record about to be put: plain, or an aggregate of several user records.
struct Entry {
    partition_key: String,
    explicit_hash_key: Option<String>,
    data: Vec<u8>,
    /// The user records it carries, with their index inside an aggregate (`None`: plain).
    users: Vec<(Pending, Option<u32>)>,
    /// Shard the entry was aggregated for, to notice a changed shard map.
    predicted: Option<ShardId>,
}

impl Entry {
    fn size(&self) -> usize {
        self.partition_key.len() + self.data.len()
    }

    fn deadline(&self) -> Instant {
        self.users
            .iter()
            .map(|(p, _)| p.deadline)
            .min()
            .unwrap_or_else(Instant::now)
    }
}

#[derive(Default)]
struct Batch {
    entries: Vec<Entry>,
    bytes: usize,
    started: Option<Instant>,
}

impl Batch {
    fn fits(&self, entry: &Entry) -> bool {
        self.entries.len() < MAX_RECORDS_PER_REQUEST
            && self.bytes + entry.size() <= MAX_REQUEST_BYTES
    }
}

/// Why an aggregate was closed: full (the next record would not fit), or early (linger time or
/// an explicit flush). Only full ones say how well aggregation packs a steady input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sealed {
    Full,
    Early,
}

/// An aggregate being filled for one predicted shard.
struct Filling {
    builder: AggregateBuilder,
    users: Vec<(Pending, Option<u32>)>,
    explicit_hash_key: String,
    started: Instant,
}

struct Worker {
    client: Client,
    stream: String,
    config: ProducerConfig,
    metrics: ProducerMetrics,
    in_flight: Arc<Semaphore>,
    shard_map: Option<ShardMap>,
    batch: Batch,
    aggregates: HashMap<ShardId, Filling>,
    requests: JoinSet<Option<ShardId>>,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            let linger_at = self.next_linger_deadline();
            tokio::select! {
                command = rx.recv() => match command {
                    Some(Command::Record(mut pending)) => {
                        pending.deadline = Instant::now() + self.config.record_ttl;
                        self.add(pending).await;
                    }
                    Some(Command::Flush(done)) => {
                        self.flush_all().await;
                        while let Some(joined) = self.requests.join_next().await {
                            self.note_stale_map(joined.ok().flatten()).await;
                        }
                        let _ = done.send(());
                    }
                    None => {
                        self.flush_all().await;
                        while self.requests.join_next().await.is_some() {}
                        return;
                    }
                },
                () = sleep_until_opt(linger_at) => self.flush_lingering().await,
                Some(joined) = self.requests.join_next(), if !self.requests.is_empty() => {
                    self.note_stale_map(joined.ok().flatten()).await;
                }
            }
        }
    }

    fn next_linger_deadline(&self) -> Option<Instant> {
        let batch = self.batch.started.map(|t| t + self.config.linger);
        let aggregate = self
            .aggregates
            .values()
            .map(|f| f.started + self.config.linger)
            .min();
        batch.into_iter().chain(aggregate).min()
    }

    async fn add(&mut self, mut pending: Pending) {
        let data = std::mem::take(&mut pending.data);
        let plain = |pending: Pending, data: Vec<u8>| Entry {
            partition_key: pending.partition_key.clone(),
            explicit_hash_key: None,
            data,
            users: vec![(pending, None)],
            predicted: None,
        };
        let (Some(max), Some(map)) = (self.config.aggregate_max_bytes, self.shard_map.as_ref())
        else {
            return self.push_entry(plain(pending, data)).await;
        };
        let limit = max.min(MAX_RECORD_BYTES);
        let Some((shard, start_hash)) = map.predict(&pending.partition_key) else {
            return self.push_entry(plain(pending, data)).await;
        };
        let user = UserRecord {
            partition_key: pending.partition_key.clone(),
            explicit_hash_key: None,
            data,
        };
        if AggregateBuilder::new().size_with(&user) + user.partition_key.len() > limit {
            // The aggregation overhead would push it over the limit: send it as it is.
            return self.push_entry(plain(pending, user.data)).await;
        }
        let full = self
            .aggregates
            .get(&shard)
            .is_some_and(|f| f.builder.size_with(&user) + first_key_len(f) > limit);
        if full {
            if let Some(filling) = self.aggregates.remove(&shard) {
                self.seal(shard.clone(), filling, limit, Sealed::Full).await;
            }
        }
        let filling = self.aggregates.entry(shard).or_insert_with(|| Filling {
            builder: AggregateBuilder::new(),
            users: Vec::new(),
            explicit_hash_key: start_hash.to_string(),
            started: Instant::now(),
        });
        let index = u32::try_from(filling.builder.len()).unwrap_or(u32::MAX);
        filling.builder.add(user);
        filling.users.push((pending, Some(index)));
    }

    async fn seal(&mut self, shard: ShardId, mut filling: Filling, limit: usize, why: Sealed) {
        let size = filling.builder.size() + first_key_len(&filling);
        self.metrics
            .aggregate_filled(size as f64 / limit as f64, why == Sealed::Full);
        let data = filling.builder.finish();
        let partition_key = filling.users[0].0.partition_key.clone();
        let entry = Entry {
            partition_key,
            explicit_hash_key: Some(filling.explicit_hash_key),
            data,
            users: filling.users,
            predicted: Some(shard),
        };
        self.push_entry(entry).await;
    }

    async fn push_entry(&mut self, entry: Entry) {
        if !self.batch.fits(&entry) {
            self.send_batch().await;
        }
        self.batch.bytes += entry.size();
        self.batch.entries.push(entry);
        self.batch.started.get_or_insert_with(Instant::now);
        if self.batch.entries.len() == MAX_RECORDS_PER_REQUEST {
            self.send_batch().await;
        }
    }

    async fn flush_lingering(&mut self) {
        let now = Instant::now();
        if let Some(max) = self.config.aggregate_max_bytes {
            let limit = max.min(MAX_RECORD_BYTES);
            let due: Vec<ShardId> = self
                .aggregates
                .iter()
                .filter(|(_, f)| f.started + self.config.linger <= now)
                .map(|(s, _)| s.clone())
                .collect();
            for shard in due {
                if let Some(filling) = self.aggregates.remove(&shard) {
                    self.seal(shard, filling, limit, Sealed::Early).await;
                }
            }
        }
        if self
            .batch
            .started
            .is_some_and(|t| t + self.config.linger <= now)
        {
            self.send_batch().await;
        }
    }

    async fn flush_all(&mut self) {
        if let Some(max) = self.config.aggregate_max_bytes {
            let limit = max.min(MAX_RECORD_BYTES);
            let shards: Vec<ShardId> = self.aggregates.keys().cloned().collect();
            for shard in shards {
                if let Some(filling) = self.aggregates.remove(&shard) {
                    self.seal(shard, filling, limit, Sealed::Early).await;
                }
            }
        }
        self.send_batch().await;
    }

    /// Hands the current batch to a request task, waiting for an in-flight slot.
    async fn send_batch(&mut self) {
        let batch = std::mem::take(&mut self.batch);
        if batch.entries.is_empty() {
            return;
        }
        let Ok(slot) = Arc::clone(&self.in_flight).acquire_owned().await else {
            return;
        };
        let request = Request {
            client: self.client.clone(),
            stream: self.stream.clone(),
            config: self.config.clone(),
            metrics: self.metrics.clone(),
        };
        self.requests.spawn(async move {
            let stale = request.put(batch.entries).await;
            drop(slot);
            stale
        });
        if self.config.ordered {
            // The next batch may not overtake this one's retries.
            while let Some(joined) = self.requests.join_next().await {
                self.note_stale_map(joined.ok().flatten()).await;
            }
        }
    }

    /// A record landed in another shard than predicted: the shard map changed; reload it.
    async fn note_stale_map(&mut self, stale: Option<ShardId>) {
        if stale.is_none() || self.shard_map.is_none() {
            return;
        }
        match ShardMap::load(&self.client, &self.stream).await {
            Ok(map) => {
                tracing::info!(stream = %self.stream, "shard map changed, reloaded");
                self.shard_map = Some(map);
            }
            Err(error) => {
                tracing::warn!(stream = %self.stream, %error, "reloading the shard map failed");
            }
        }
    }
}

fn first_key_len(filling: &Filling) -> usize {
    filling
        .users
        .first()
        .map_or(0, |(p, _)| p.partition_key.len())
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One PutRecords batch and its retries.
struct Request {
    client: Client,
    stream: String,
    config: ProducerConfig,
    metrics: ProducerMetrics,
}

impl Request {
    /// Puts `entries`, re-sending only failed ones, until all are written or expired. Returns a
    /// shard whose prediction was wrong, if any.
    async fn put(self, mut entries: Vec<Entry>) -> Option<ShardId> {
        let mut attempt: u32 = 0;
        let mut stale = None;
        loop {
            attempt += 1;
            let request_entries = entries
                .iter()
                .map(|e| {
                    PutRecordsRequestEntry::builder()
                        .partition_key(&e.partition_key)
                        .set_explicit_hash_key(e.explicit_hash_key.clone())
                        .data(Blob::new(e.data.clone()))
                        .build()
                        .expect("partition key and data are set")
                })
                .collect();
            let started = Instant::now();
            let sent = self
                .client
                .put_records()
                .stream_name(&self.stream)
                .set_records(Some(request_entries))
                .send()
                .await;
            self.metrics.request(started.elapsed());
            let mut retry = Vec::new();
            let mut last_error = String::new();
            match sent {
                Ok(out) => {
                    let results = out.records();
                    for (i, entry) in entries.drain(..).enumerate() {
                        let result = results.get(i);
                        match result.and_then(|r| r.error_code().map(str::to_owned)) {
                            None if result.is_some() => {
                                let r = result.expect("checked above");
                                let shard = ShardId::new(r.shard_id().unwrap_or_default());
                                if entry.predicted.as_ref().is_some_and(|p| *p != shard) {
                                    stale = Some(shard.clone());
                                }
                                let Ok(sequence) =
                                    SequenceNumber::parse(r.sequence_number().unwrap_or_default())
                                else {
                                    resolve_all(
                                        entry,
                                        &Err(ProducerError::Rejected(
                                            "unusable sequence number".into(),
                                        )),
                                    );
                                    continue;
                                };
                                self.metrics.written(entry.users.len(), entry.size());
                                for (pending, sub) in entry.users {
                                    let position = RecordPosition::with_sub_sequence(
                                        sequence.clone(),
                                        sub.unwrap_or(0),
                                    );
                                    let _ = pending.ticket.send(Ok(PutResult {
                                        shard: shard.clone(),
                                        position,
                                    }));
                                }
                            }
                            code => {
                                last_error = code.unwrap_or_else(|| "missing result".into());
                                self.metrics.failed_entry();
                                retry.push(entry);
                            }
                        }
                    }
                }
                Err(e) => {
                    let error = KinesisError::from_put_records(&self.stream, e);
                    if !error.is_retryable() {
                        for entry in entries.drain(..) {
                            resolve_all(entry, &Err(ProducerError::Rejected(error.to_string())));
                        }
                        return stale;
                    }
                    last_error = error.to_string();
                    retry = std::mem::take(&mut entries);
                }
            }
            if retry.is_empty() {
                return stale;
            }
            let now = Instant::now();
            let cap = self
                .config
                .backoff_base
                .saturating_mul(1 << attempt.min(16))
                .min(self.config.backoff_max);
            let wait = cap.mul_f64(rand::random::<f64>());
            for entry in retry {
                if entry.deadline() <= now + wait {
                    let ttl_secs = self.config.record_ttl.as_secs();
                    resolve_all(
                        entry,
                        &Err(ProducerError::Expired {
                            ttl_secs,
                            attempts: attempt,
                            last_error: last_error.clone(),
                        }),
                    );
                } else {
                    entries.push(entry);
                }
            }
            if entries.is_empty() {
                return stale;
            }
            self.metrics.retried(entries.len());
            tokio::time::sleep(wait).await;
        }
    }
}

fn resolve_all(entry: Entry, outcome: &Result<PutResult, ProducerError>) {
    for (pending, _) in entry.users {
        let _ = pending.ticket.send(outcome.clone());
    }
}

/// Open shards by hash key range: which shard a partition key lands in.
struct ShardMap {
    /// (starting hash key, ending hash key, shard), sorted by start.
    ranges: Vec<(u128, u128, ShardId)>,
}

impl ShardMap {
    async fn load(client: &Client, stream: &str) -> Result<Self, KinesisError> {
        let shards = StreamAdmin::new(client.clone()).list_shards(stream).await?;
        let mut ranges: Vec<_> = shards
            .into_iter()
            .filter(|s| !s.closed)
            .map(|s| (s.hash_key_range.0, s.hash_key_range.1, s.id))
            .collect();
        ranges.sort_by_key(|r| r.0);
        Ok(Self { ranges })
    }

    /// The shard `partition_key` maps to, and its starting hash key (`None` with no open shard).
    fn predict(&self, partition_key: &str) -> Option<(ShardId, u128)> {
        let hash = u128::from_be_bytes(Md5::digest(partition_key.as_bytes()).into());
        let i = self
            .ranges
            .partition_point(|r| r.0 <= hash)
            .checked_sub(1)?;
        let (start, end, shard) = self.ranges.get(i)?;
        (hash <= *end).then(|| (shard.clone(), *start))
    }
}
