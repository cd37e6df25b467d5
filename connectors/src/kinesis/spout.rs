//! The prefetching Kinesis spout: per shard, a background task loops GetRecords into a bounded
//! queue, de-aggregates KPL records, backs off when idle or throttled, renews expired
//! iterators, and reports shard end.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::{Record, ShardIteratorType};
use aws_sdk_kinesis::Client;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use shardflow_core::error::SourceError;
use shardflow_core::position::{RecordPosition, SequenceNumber, ShardInfo, StartPosition};
use shardflow_core::record::RawBatch;
use shardflow_core::source::{
    ReadBatch, ReadLimits, ShardReader, ShardStatus, Source, StreamFacts,
};

use super::admin::StreamAdmin;
use super::aggregation::deaggregate;
use super::error::KinesisError;
use super::metrics::SpoutMetrics;

/// Most records one GetRecords call may return (the service limit).
pub const MAX_RECORDS_PER_CALL: i32 = 10_000;
/// GetRecords calls allowed per shard per second (the service limit): at most one per 200 ms.
const MIN_CALL_INTERVAL: Duration = Duration::from_millis(200);

/// How the spout reads.
#[derive(Clone, Debug)]
pub struct SpoutConfig {
    /// Records per GetRecords call (at most 10 000; the runtime's read limit lowers it further).
    pub records_per_call: i32,
    /// Responses fetched ahead per shard (the queue holds at most this many batches).
    pub queue_batches: usize,
    /// Payload bytes fetched ahead per shard.
    pub queue_bytes: usize,
    /// Wait after an empty response; doubles while responses stay empty...
    pub idle_min: Duration,
    /// ...up to this.
    pub idle_max: Duration,
    /// Longest wait after throttling or a retryable error (exponential with jitter below it).
    pub backoff_max: Duration,
}

impl Default for SpoutConfig {
    fn default() -> Self {
        Self {
            records_per_call: MAX_RECORDS_PER_CALL,
            queue_batches: 2,
            queue_bytes: 16 * 1024 * 1024,
            idle_min: Duration::from_millis(200),
            idle_max: Duration::from_secs(1),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// A Kinesis stream as a shardflow source: `KinesisSource::new(client, "clicks").json::<Click>()`.
#[derive(Clone)]
pub struct KinesisSource {
    client: Client,
    stream: String,
    config: SpoutConfig,
    metrics: SpoutMetrics,
}

impl KinesisSource {
    /// Reads `stream` through `client`.
    pub fn new(client: Client, stream: impl Into<String>) -> Self {
        Self {
            client,
            stream: stream.into(),
            config: SpoutConfig::default(),
            metrics: SpoutMetrics::unregistered(),
        }
    }

    /// Sets how it reads.
    pub fn with_config(mut self, config: SpoutConfig) -> Self {
        self.config = config;
        self
    }

    /// Reports into these metrics.
    pub fn with_metrics(mut self, metrics: SpoutMetrics) -> Self {
        self.metrics = metrics;
        self
    }
}

#[async_trait]
impl Source for KinesisSource {
    fn stream_name(&self) -> &str {
        &self.stream
    }

    async fn list_shards(&self) -> Result<Vec<ShardInfo>, SourceError> {
        StreamAdmin::new(self.client.clone())
            .list_shards(&self.stream)
            .await
            .map_err(|e| {
                // Not created yet (or deleted), or still being created (ListShards answers
                // ResourceInUseException while the stream is CREATING): the runtime waits for
                // a stream it never listed.
                if matches!(
                    e.code(),
                    Some("ResourceNotFoundException" | "ResourceInUseException")
                ) {
                    SourceError::StreamNotFound {
                        stream: self.stream.clone(),
                    }
                } else {
                    e.into()
                }
            })
    }

    /// From DescribeStreamSummary: one call, made only while a leased shard is missing from
    /// the listing.
    async fn facts(&self) -> Result<Option<StreamFacts>, SourceError> {
        let summary = StreamAdmin::new(self.client.clone())
            .describe(&self.stream)
            .await?;
        let retention_hours = u64::try_from(summary.retention_hours).unwrap_or(0);
        Ok(summary
            .created_ms
            .filter(|_| retention_hours > 0)
            .map(|created_ms| StreamFacts {
                created_ms,
                retention: std::time::Duration::from_secs(retention_hours * 3600),
            }))
    }

    async fn open_shard(
        &self,
        shard: &ShardInfo,
        start: StartPosition,
        limits: ReadLimits,
    ) -> Result<Box<dyn ShardReader>, SourceError> {
        let limit = self
            .config
            .records_per_call
            .min(i32::try_from(limits.max_records).unwrap_or(MAX_RECORDS_PER_CALL))
            .clamp(1, MAX_RECORDS_PER_CALL);
        let (tx, rx) = mpsc::channel(self.config.queue_batches.max(1));
        let bytes = Arc::new(Semaphore::new(self.config.queue_bytes.max(1)));
        let prefetch = Prefetch {
            client: self.client.clone(),
            stream: self.stream.clone(),
            shard: shard.clone(),
            config: self.config.clone(),
            metrics: self.metrics.clone(),
            limit,
            bytes: Arc::clone(&bytes),
            tx,
        };
        let task = tokio::spawn(prefetch.run(start));
        Ok(Box::new(KinesisShardReader { rx, task }))
    }
}

type Queued = Result<(ReadBatch, OwnedSemaphorePermit), SourceError>;

/// The pipeline's end of a shard's prefetch queue. Dropping it stops the prefetch task.
struct KinesisShardReader {
    rx: mpsc::Receiver<Queued>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KinesisShardReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[async_trait]
impl ShardReader for KinesisShardReader {
    async fn read(&mut self) -> Result<ReadBatch, SourceError> {
        match self.rx.recv().await {
            // The permit returns the batch's bytes to the queue's budget as it leaves the queue.
            Some(Ok((batch, _permit))) => Ok(batch),
            Some(Err(e)) => Err(e),
            None => Err(SourceError::Other {
                what: "the shard's prefetch task".into(),
                retryable: false,
                source: "prefetch task ended without reporting shard end".into(),
            }),
        }
    }
}

/// The background GetRecords loop of one shard.
struct Prefetch {
    client: Client,
    stream: String,
    shard: ShardInfo,
    config: SpoutConfig,
    metrics: SpoutMetrics,
    limit: i32,
    bytes: Arc<Semaphore>,
    tx: mpsc::Sender<Queued>,
}

impl Prefetch {
    async fn run(self, start: StartPosition) {
        if let Err(e) = self.fetch(start).await {
            let _ = self.tx.send(Err(e.into())).await;
        }
    }

    async fn fetch(&self, start: StartPosition) -> Result<(), KinesisError> {
        // Resuming after a checkpoint reads AT its sequence number and skips user records up to
        // it: for an aggregated record, the rest of its user records still follow.
        let skip_through = match &start {
            StartPosition::After(p) => Some(p.clone()),
            _ => None,
        };
        let mut iterator = self.iterator(&start).await?;
        let mut last_sequence: Option<String> = None;
        let mut idle = self.config.idle_min;
        let mut backoff = Duration::from_millis(100);
        let mut next_call = Instant::now();
        loop {
            tokio::time::sleep_until(next_call).await;
            next_call = Instant::now() + MIN_CALL_INTERVAL;
            let started = Instant::now();
            let response = self
                .client
                .get_records()
                .shard_iterator(&iterator)
                .limit(self.limit)
                .send()
                .await;
            let out = match response {
                Ok(out) => out,
                Err(e) => {
                    let error = KinesisError::from_get_records(&self.stream, e);
                    if error.is_expired_iterator() {
                        self.metrics
                            .expired_iterator(&self.stream, self.shard.id.as_str());
                        tracing::info!(stream = %self.stream, shard = %self.shard.id, "shard iterator expired, renewing");
                        iterator = match &last_sequence {
                            Some(seq) => self.iterator_after(seq).await?,
                            None => self.iterator(&start).await?,
                        };
                        continue;
                    }
                    if !error.is_retryable() {
                        return Err(error);
                    }
                    if error.is_throttling() {
                        self.metrics.throttled(&self.stream, self.shard.id.as_str());
                    }
                    tracing::warn!(stream = %self.stream, shard = %self.shard.id, %error, "GetRecords failed, backing off");
                    next_call = Instant::now() + jittered(backoff);
                    backoff = (backoff * 2).min(self.config.backoff_max);
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            let records = out.records();
            let behind = out.millis_behind_latest();
            let (batch, byte_len) = self.to_batch(records, skip_through.as_ref())?;
            if let Some(last) = records.last() {
                last_sequence = Some(last.sequence_number().to_owned());
            }
            self.metrics.read(
                &self.stream,
                self.shard.id.as_str(),
                batch.len(),
                byte_len,
                behind,
                started.elapsed(),
            );
            let next = out.next_shard_iterator().map(str::to_owned);
            let status = match &next {
                None => ShardStatus::Ended,
                Some(_) if records.is_empty() && behind.unwrap_or(0) == 0 => ShardStatus::CaughtUp,
                Some(_) => ShardStatus::More,
            };
            let empty = records.is_empty();
            let permits = u32::try_from(byte_len.clamp(1, self.config.queue_bytes.max(1)))
                .unwrap_or(u32::MAX);
            let Ok(permit) = Arc::clone(&self.bytes).acquire_many_owned(permits).await else {
                return Ok(());
            };
            let millis_behind_latest = behind.and_then(|b| u64::try_from(b).ok());
            let batch = ReadBatch {
                records: batch,
                millis_behind_latest,
                status,
            };
            if self.tx.send(Ok((batch, permit))).await.is_err() {
                return Ok(()); // the pipeline let go of the shard
            }
            let Some(next) = next else { return Ok(()) };
            iterator = next;
            if empty {
                next_call = next_call.max(Instant::now() + idle);
                idle = (idle * 2).min(self.config.idle_max);
            } else {
                idle = self.config.idle_min;
            }
        }
    }

    /// Turns a response's records into a raw batch of user records.
    fn to_batch(
        &self,
        records: &[Record],
        skip_through: Option<&RecordPosition>,
    ) -> Result<(RawBatch, usize), KinesisError> {
        let mut batch = RawBatch::with_capacity(records.len(), 0);
        let mut bytes = 0;
        let mut outside = 0;
        for record in records {
            let sequence = SequenceNumber::parse(record.sequence_number()).map_err(|_| {
                KinesisError::BadResponse {
                    stream: self.stream.clone(),
                    what: "sequence number",
                    value: record.sequence_number().to_owned(),
                }
            })?;
            let arrival = record.approximate_arrival_timestamp().map_or(0, millis);
            let data = record.data().as_ref();
            bytes += data.len();
            let key = record.partition_key().unwrap_or_default().as_bytes();
            let keep = |p: &RecordPosition| skip_through.is_none_or(|s| p > s);
            match deaggregate(data) {
                Ok(None) => {
                    let position = RecordPosition::new(sequence);
                    if keep(&position) {
                        batch.push(position, arrival, key, data);
                    }
                }
                Ok(Some(users)) => {
                    for (i, user) in users.iter().enumerate() {
                        let sub = u32::try_from(i).unwrap_or(u32::MAX);
                        let position = RecordPosition::with_sub_sequence(sequence.clone(), sub);
                        if !keep(&position) {
                            continue;
                        }
                        if let Some(ehk) = user.explicit_hash_key {
                            let (lo, hi) = self.shard.hash_key_range;
                            if ehk.parse::<u128>().map_or(true, |h| h < lo || h > hi) {
                                outside += 1;
                            }
                        }
                        batch.push(position, arrival, user.partition_key.as_bytes(), user.data);
                    }
                }
                Err(error) => {
                    let position = RecordPosition::new(sequence);
                    if keep(&position) {
                        batch.push_faulty(
                            position,
                            arrival,
                            key,
                            data,
                            format!("KPL aggregate: {error}"),
                        );
                    }
                }
            }
        }
        if outside > 0 {
            self.metrics
                .outside_range(&self.stream, self.shard.id.as_str(), outside);
        }
        Ok((batch, bytes))
    }

    async fn iterator(&self, start: &StartPosition) -> Result<String, KinesisError> {
        let request = self
            .client
            .get_shard_iterator()
            .stream_name(&self.stream)
            .shard_id(self.shard.id.as_str());
        let request = match start {
            StartPosition::TrimHorizon => {
                request.shard_iterator_type(ShardIteratorType::TrimHorizon)
            }
            StartPosition::Latest => request.shard_iterator_type(ShardIteratorType::Latest),
            StartPosition::AtSequence(s) => request
                .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
                .starting_sequence_number(s.to_string()),
            StartPosition::After(p) => request
                .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
                .starting_sequence_number(p.sequence.to_string()),
            StartPosition::AtTimestamp(ms) => request
                .shard_iterator_type(ShardIteratorType::AtTimestamp)
                .timestamp(DateTime::from_millis(*ms)),
        };
        self.with_retries("GetShardIterator", || request.clone().send())
            .await
    }

    async fn iterator_after(&self, sequence: &str) -> Result<String, KinesisError> {
        let request = self
            .client
            .get_shard_iterator()
            .stream_name(&self.stream)
            .shard_id(self.shard.id.as_str())
            .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
            .starting_sequence_number(sequence);
        self.with_retries("GetShardIterator", || request.clone().send())
            .await
    }

    async fn with_retries<F, Fut, E>(
        &self,
        operation: &'static str,
        call: F,
    ) -> Result<String, KinesisError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<
            Output = Result<
                aws_sdk_kinesis::operation::get_shard_iterator::GetShardIteratorOutput,
                aws_sdk_kinesis::error::SdkError<E, aws_sdk_kinesis::config::http::HttpResponse>,
            >,
        >,
        E: aws_sdk_kinesis::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let mut backoff = Duration::from_millis(100);
        loop {
            match call().await {
                Ok(out) => {
                    return out.shard_iterator().map(str::to_owned).ok_or_else(|| {
                        KinesisError::BadResponse {
                            stream: self.stream.clone(),
                            what: "shard iterator",
                            value: "missing".into(),
                        }
                    })
                }
                Err(e) => {
                    let error = KinesisError::from_sdk(operation, &self.stream, e);
                    if !error.is_retryable() {
                        return Err(error);
                    }
                    tokio::time::sleep(jittered(backoff)).await;
                    backoff = (backoff * 2).min(self.config.backoff_max);
                }
            }
        }
    }
}

fn millis(t: &DateTime) -> i64 {
    t.to_millis().unwrap_or(0)
}

/// Full jitter: a uniform wait up to `cap`.
fn jittered(cap: Duration) -> Duration {
    cap.mul_f64(rand::random::<f64>())
}
