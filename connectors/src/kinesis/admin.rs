//! Stream administration: create, delete, describe, list shards (paginated), split, merge,
//! scale and retention. Used by the tests and the command-line tool.

use std::time::Duration;

use aws_sdk_kinesis::types::{ScalingType, Shard, StreamStatus};
use aws_sdk_kinesis::Client;
use shardflow_core::position::{ShardId, ShardInfo};

use super::error::KinesisError;

/// Longest wait for a stream to become ACTIVE after a change.
const ACTIVE_TIMEOUT: Duration = Duration::from_secs(120);
/// Pause between status polls.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A stream's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamSummary {
    /// CREATING, ACTIVE, UPDATING, DELETING.
    pub status: String,
    /// Open shards.
    pub open_shards: usize,
    /// Retention in hours.
    pub retention_hours: i32,
    /// When the stream was created (ms since the Unix epoch), if the service said.
    pub created_ms: Option<i64>,
}

/// Administers streams with one client.
#[derive(Clone, Debug)]
pub struct StreamAdmin {
    client: Client,
}

impl StreamAdmin {
    /// Administers through `client`.
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// Creates `stream` with `shards` shards and waits until it is ACTIVE.
    ///
    /// # Errors
    /// The call failed (for example the stream exists) or the stream did not become active.
    pub async fn create_stream(&self, stream: &str, shards: i32) -> Result<(), KinesisError> {
        self.client
            .create_stream()
            .stream_name(stream)
            .shard_count(shards)
            .send()
            .await
            .map_err(|e| KinesisError::from_sdk("CreateStream", stream, e))?;
        self.wait_active(stream).await
    }

    /// Deletes `stream` (with its consumers).
    ///
    /// # Errors
    /// The call failed.
    pub async fn delete_stream(&self, stream: &str) -> Result<(), KinesisError> {
        self.client
            .delete_stream()
            .stream_name(stream)
            .enforce_consumer_deletion(true)
            .send()
            .await
            .map_err(|e| KinesisError::from_sdk("DeleteStream", stream, e))?;
        Ok(())
    }

    /// The stream's status, open shard count and retention.
    ///
    /// # Errors
    /// The call failed.
    pub async fn describe(&self, stream: &str) -> Result<StreamSummary, KinesisError> {
        let out = self
            .client
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
            .map_err(|e| KinesisError::from_sdk("DescribeStreamSummary", stream, e))?;
        let summary =
            out.stream_description_summary()
                .ok_or_else(|| KinesisError::BadResponse {
                    stream: stream.to_owned(),
                    what: "stream summary",
                    value: "missing".into(),
                })?;
        Ok(StreamSummary {
            status: summary.stream_status().as_str().to_owned(),
            open_shards: usize::try_from(summary.open_shard_count()).unwrap_or(0),
            retention_hours: summary.retention_period_hours(),
            created_ms: summary.stream_creation_timestamp().to_millis().ok(),
        })
    }

    /// Every shard, open and closed, following pagination.
    ///
    /// # Errors
    /// A call failed or a shard's hash range is not a number.
    pub async fn list_shards(&self, stream: &str) -> Result<Vec<ShardInfo>, KinesisError> {
        let mut shards = Vec::new();
        let mut next: Option<String> = None;
        loop {
            // With a token, the stream name must be absent (the token encodes it).
            let request = match &next {
                Some(token) => self.client.list_shards().next_token(token),
                None => self.client.list_shards().stream_name(stream),
            };
            let out = request
                .send()
                .await
                .map_err(|e| KinesisError::from_sdk("ListShards", stream, e))?;
            for shard in out.shards() {
                shards.push(shard_info(stream, shard)?);
            }
            match out.next_token() {
                Some(token) if !token.is_empty() => next = Some(token.to_owned()),
                _ => return Ok(shards),
            }
        }
    }

    /// Splits `shard` at `new_starting_hash_key` and waits until the stream is ACTIVE.
    ///
    /// # Errors
    /// The call failed.
    pub async fn split_shard(
        &self,
        stream: &str,
        shard: &ShardId,
        new_starting_hash_key: u128,
    ) -> Result<(), KinesisError> {
        self.client
            .split_shard()
            .stream_name(stream)
            .shard_to_split(shard.as_str())
            .new_starting_hash_key(new_starting_hash_key.to_string())
            .send()
            .await
            .map_err(|e| KinesisError::from_sdk("SplitShard", stream, e))?;
        self.wait_active(stream).await
    }

    /// Merges two adjacent shards and waits until the stream is ACTIVE.
    ///
    /// # Errors
    /// The call failed (for example the shards are not adjacent).
    pub async fn merge_shards(
        &self,
        stream: &str,
        shard: &ShardId,
        adjacent: &ShardId,
    ) -> Result<(), KinesisError> {
        self.client
            .merge_shards()
            .stream_name(stream)
            .shard_to_merge(shard.as_str())
            .adjacent_shard_to_merge(adjacent.as_str())
            .send()
            .await
            .map_err(|e| KinesisError::from_sdk("MergeShards", stream, e))?;
        self.wait_active(stream).await
    }

    /// Scales to `target` open shards (uniform scaling) and waits until the stream is ACTIVE.
    ///
    /// # Errors
    /// The call failed.
    pub async fn update_shard_count(&self, stream: &str, target: i32) -> Result<(), KinesisError> {
        self.client
            .update_shard_count()
            .stream_name(stream)
            .target_shard_count(target)
            .scaling_type(ScalingType::UniformScaling)
            .send()
            .await
            .map_err(|e| KinesisError::from_sdk("UpdateShardCount", stream, e))?;
        self.wait_active(stream).await
    }

    /// Sets the retention to `hours`, increasing or decreasing it as needed.
    ///
    /// # Errors
    /// The call failed (Kinesis allows 24 to 8760 hours).
    pub async fn set_retention(&self, stream: &str, hours: i32) -> Result<(), KinesisError> {
        let current = self.describe(stream).await?.retention_hours;
        if hours > current {
            self.client
                .increase_stream_retention_period()
                .stream_name(stream)
                .retention_period_hours(hours)
                .send()
                .await
                .map_err(|e| KinesisError::from_sdk("IncreaseStreamRetentionPeriod", stream, e))?;
        } else if hours < current {
            self.client
                .decrease_stream_retention_period()
                .stream_name(stream)
                .retention_period_hours(hours)
                .send()
                .await
                .map_err(|e| KinesisError::from_sdk("DecreaseStreamRetentionPeriod", stream, e))?;
        }
        self.wait_active(stream).await
    }

    /// Polls until the stream is ACTIVE (bounded).
    ///
    /// # Errors
    /// The stream did not become active in time, or a call failed.
    pub async fn wait_active(&self, stream: &str) -> Result<(), KinesisError> {
        let deadline = tokio::time::Instant::now() + ACTIVE_TIMEOUT;
        loop {
            let summary = self.describe(stream).await?;
            if summary.status == StreamStatus::Active.as_str() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(KinesisError::NotReady {
                    stream: stream.to_owned(),
                    wanted: "ACTIVE",
                    waited_secs: ACTIVE_TIMEOUT.as_secs(),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

/// A shard as core describes it.
pub(crate) fn shard_info(stream: &str, shard: &Shard) -> Result<ShardInfo, KinesisError> {
    let range = shard.hash_key_range();
    let parse = |what: &'static str, value: Option<&str>| -> Result<u128, KinesisError> {
        value
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| KinesisError::BadResponse {
                stream: stream.to_owned(),
                what,
                value: value.unwrap_or("missing").to_owned(),
            })
    };
    let start = parse("starting hash key", range.map(|r| r.starting_hash_key()))?;
    let end = parse("ending hash key", range.map(|r| r.ending_hash_key()))?;
    let parents = shard
        .parent_shard_id()
        .into_iter()
        .chain(shard.adjacent_parent_shard_id())
        .map(ShardId::new)
        .collect();
    let closed = shard
        .sequence_number_range()
        .and_then(|r| r.ending_sequence_number())
        .is_some();
    Ok(ShardInfo {
        id: ShardId::new(shard.shard_id()),
        parents,
        hash_key_range: (start, end),
        closed,
    })
}
