//! `LocalStreamError`: what can go wrong creating, writing, resharding and reading a local stream.

use std::io;
use std::path::PathBuf;

use shardflow_core::error::SourceError;
use shardflow_core::position::ShardId;

use super::limits::{MAX_PARTITION_KEY_CHARS, MAX_RECORD_BYTES};

/// An operation on a [`LocalStream`](super::LocalStream) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalStreamError {
    /// The stream name cannot name a directory.
    #[error(
        "invalid stream name {name:?}: use 1 to 128 characters from a-z, A-Z, 0-9, '-', '_' and \
         '.', not starting with '.'"
    )]
    InvalidStreamName {
        /// The rejected name.
        name: String,
    },
    /// A stream needs at least one shard.
    #[error("invalid shard count {count} for stream {stream:?}: use 1 to {max}")]
    InvalidShardCount {
        /// The stream.
        stream: String,
        /// The rejected count.
        count: u32,
        /// The largest count allowed.
        max: u32,
    },
    /// `create` found a stream already there.
    #[error("stream {stream:?} already exists in {dir}: open it instead, or delete the directory")]
    StreamExists {
        /// The stream.
        stream: String,
        /// The stream's directory.
        dir: PathBuf,
    },
    /// `open` found no stream.
    #[error("stream {stream:?} not found in {dir}: create it first or check the name")]
    StreamNotFound {
        /// The stream.
        stream: String,
        /// The directory searched.
        dir: PathBuf,
    },
    /// No shard with this id.
    #[error("shard {shard} of stream {stream:?} not found")]
    ShardNotFound {
        /// The stream.
        stream: String,
        /// The shard.
        shard: ShardId,
    },
    /// A split or merge named a closed shard; only open shards can be resharded.
    #[error("shard {shard} of stream {stream:?} is closed: reshard its open children instead")]
    ShardClosed {
        /// The stream.
        stream: String,
        /// The shard.
        shard: ShardId,
    },
    /// A split key outside the shard's range (it must be above the range's start, at most its
    /// end, so that both children are non-empty).
    #[error(
        "cannot split shard {shard} of stream {stream:?} at hash key {key}: it must be in \
         ({start}, {end}]"
    )]
    InvalidSplitKey {
        /// The stream.
        stream: String,
        /// The shard.
        shard: ShardId,
        /// The rejected key.
        key: u128,
        /// The shard's first hash key.
        start: u128,
        /// The shard's last hash key.
        end: u128,
    },
    /// A merge of shards whose hash key ranges do not touch.
    #[error(
        "cannot merge shards {shard} and {adjacent} of stream {stream:?}: ranges not adjacent"
    )]
    NotAdjacent {
        /// The stream.
        stream: String,
        /// The shard to merge.
        shard: ShardId,
        /// The other shard.
        adjacent: ShardId,
    },
    /// A partition key of the wrong length; nothing of the batch was written.
    #[error(
        "record {index} for stream {stream:?}: partition key has {chars} characters; use 1 to \
         {MAX_PARTITION_KEY_CHARS} (nothing of the batch was written)"
    )]
    InvalidPartitionKey {
        /// The stream.
        stream: String,
        /// The record's index in the batch.
        index: usize,
        /// The key's length in characters.
        chars: usize,
    },
    /// A record over the size limit; nothing of the batch was written.
    #[error(
        "record {index} for stream {stream:?} is {bytes} bytes (data + partition key); the limit \
         is {MAX_RECORD_BYTES} bytes (1 MiB): split the payload or store it elsewhere and send a \
         reference (nothing of the batch was written)"
    )]
    RecordTooLarge {
        /// The stream.
        stream: String,
        /// The record's index in the batch.
        index: usize,
        /// The record's size.
        bytes: usize,
    },
    /// Another handle writes this stream. One writer per stream: share one `LocalStream` (it is
    /// `Clone`) instead of opening the stream twice for writing.
    #[error(
        "stream {stream:?} in {dir} is being written by another handle (in this or another \
         process): share one LocalStream for writing (it is Clone), or drop the other handle or \
         call its release_writer()"
    )]
    WriterBusy {
        /// The stream.
        stream: String,
        /// The stream's directory.
        dir: PathBuf,
    },
    /// A start position this stream cannot have (a sequence number beyond `u128`).
    #[error("invalid start position for shard {shard} of stream {stream:?}: {reason}")]
    InvalidStartPosition {
        /// The stream.
        stream: String,
        /// The shard.
        shard: ShardId,
        /// What is wrong.
        reason: String,
    },
    /// Stored data is damaged beyond what crash recovery repairs.
    #[error("stream {stream:?} is corrupt at {path} (offset {offset}): {reason}")]
    Corrupt {
        /// The stream.
        stream: String,
        /// The damaged file.
        path: PathBuf,
        /// Where in the file.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The metadata file is not valid JSON of the expected shape.
    #[error("metadata of stream {stream:?} at {path} is unreadable: {source}")]
    Metadata {
        /// The stream.
        stream: String,
        /// The metadata file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A file system operation failed.
    #[error("stream {stream:?}: {operation} {path} failed: {source}")]
    Io {
        /// The stream.
        stream: String,
        /// What was being done.
        operation: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A reader was dropped in the middle of a read (its future was cancelled), so its position
    /// is lost; open the shard again from the last checkpoint.
    #[error("reader of shard {shard} of stream {stream:?} was cancelled mid-read: reopen it")]
    ReaderCancelled {
        /// The stream.
        stream: String,
        /// The shard.
        shard: ShardId,
    },
}

impl LocalStreamError {
    /// Whether the operation may succeed if tried again.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Io { .. } | Self::WriterBusy { .. } => true,
            Self::InvalidStreamName { .. }
            | Self::InvalidShardCount { .. }
            | Self::StreamExists { .. }
            | Self::StreamNotFound { .. }
            | Self::ShardNotFound { .. }
            | Self::ShardClosed { .. }
            | Self::InvalidSplitKey { .. }
            | Self::NotAdjacent { .. }
            | Self::InvalidPartitionKey { .. }
            | Self::RecordTooLarge { .. }
            | Self::InvalidStartPosition { .. }
            | Self::Corrupt { .. }
            | Self::Metadata { .. }
            | Self::ReaderCancelled { .. } => false,
        }
    }

    pub(crate) fn io(
        stream: &str,
        operation: &'static str,
        path: impl Into<PathBuf>,
        source: io::Error,
    ) -> Self {
        Self::Io {
            stream: stream.to_owned(),
            operation,
            path: path.into(),
            source,
        }
    }
}

impl From<LocalStreamError> for SourceError {
    fn from(error: LocalStreamError) -> Self {
        match error {
            LocalStreamError::StreamNotFound { stream, .. } => Self::StreamNotFound { stream },
            LocalStreamError::ShardNotFound { stream, shard } => {
                Self::ShardNotFound { stream, shard }
            }
            other => {
                let what = match &other {
                    LocalStreamError::Io { path, .. }
                    | LocalStreamError::Corrupt { path, .. }
                    | LocalStreamError::Metadata { path, .. } => {
                        format!("local stream file {}", path.display())
                    }
                    _ => "local stream".to_owned(),
                };
                Self::Other {
                    what,
                    retryable: other.is_retryable(),
                    source: Box::new(other),
                }
            }
        }
    }
}
