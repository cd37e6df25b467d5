//! The `Source` trait: what a stream (Kinesis, the embedded backend, memory) offers the runtime.

use async_trait::async_trait;

use crate::error::SourceError;
use crate::position::{ShardInfo, StartPosition};
use crate::record::RawBatch;

/// Limits on one read, so that memory stays bounded however far behind a shard is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadLimits {
    /// At most this many records per batch.
    pub max_records: usize,
    /// At most about this many payload bytes per batch (a single larger record is still returned).
    pub max_bytes: usize,
}

impl Default for ReadLimits {
    fn default() -> Self {
        // The Kinesis GetRecords maximum is 10 000 records; a smaller batch keeps epochs short,
        // so checkpoints follow the input closely.
        Self {
            max_records: 2_000,
            max_bytes: 4 * 1024 * 1024,
        }
    }
}

/// Whether more records may follow a batch right away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardStatus {
    /// More records are available now.
    More,
    /// The reader is at the tip of an open shard: nothing more until producers write.
    CaughtUp,
    /// The shard is closed (split or merged) and this batch holds its last records.
    Ended,
}

/// One read from a shard.
#[derive(Debug)]
pub struct ReadBatch {
    /// The records, in sequence order.
    pub records: RawBatch,
    /// How far behind the tip of the shard the reader is, where the source knows.
    pub millis_behind_latest: Option<u64>,
    /// What follows.
    pub status: ShardStatus,
}

/// What a stream says about itself that decides when the lease of a shard it no longer lists
/// may be deleted (see `protocol::vanished`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamFacts {
    /// When the stream was created (ms since the Unix epoch): a stream deleted and created
    /// again under its name has a later one.
    pub created_ms: i64,
    /// How long the stream keeps records.
    pub retention: std::time::Duration,
}

/// A stream of shards.
#[async_trait]
pub trait Source: Send + Sync + 'static {
    /// The stream's name (lease keys and metrics use it).
    fn stream_name(&self) -> &str;

    /// The stream's shards, open and closed, with parent links: all of them, or an error
    /// (a partial listing would make live leases look vanished).
    async fn list_shards(&self) -> Result<Vec<ShardInfo>, SourceError>;

    /// The stream's creation time and retention period, if this source can tell them. `None`
    /// (the default) keeps every lease of a shard the stream stopped listing.
    async fn facts(&self) -> Result<Option<StreamFacts>, SourceError> {
        Ok(None)
    }

    /// Opens a reader of `shard` from `start`.
    async fn open_shard(
        &self,
        shard: &ShardInfo,
        start: StartPosition,
        limits: ReadLimits,
    ) -> Result<Box<dyn ShardReader>, SourceError>;
}

/// Reads one shard in order.
#[async_trait]
pub trait ShardReader: Send {
    /// The next batch. An empty batch with [`ShardStatus::CaughtUp`] means nothing new yet; the
    /// runtime waits before asking again. After [`ShardStatus::Ended`] the reader is done.
    async fn read(&mut self) -> Result<ReadBatch, SourceError>;
}
