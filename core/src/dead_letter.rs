//! The dead-letter policy: where a record goes when it cannot be decoded or a user function
//! fails on it. Never a silent skip.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::position::{RecordPosition, ShardId};
use crate::sink::Sink;

/// A record that could not be processed, with everything needed to replay it by hand.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterRecord {
    /// The stream it came from.
    pub stream: String,
    /// The shard it came from.
    pub shard: ShardId,
    /// Its position in the shard.
    pub position: RecordPosition,
    /// Its partition key (lossy UTF-8).
    pub partition_key: String,
    /// Its payload.
    pub data: Vec<u8>,
    /// Where it failed: `decode` or the name of the operator.
    pub stage: String,
    /// The error.
    pub error: String,
}

/// What happens to a record that fails.
#[derive(Clone)]
pub enum DeadLetter {
    /// Write it to a sink (with shard, sequence number and error); the checkpoint passes it only
    /// after that write is committed.
    To(Arc<dyn Sink<DeadLetterRecord>>),
    /// Call a failing user function again, up to `max` more times, waiting `backoff` doubled
    /// each time; then apply `then`. Decoding is not retried: it would fail the same way.
    Retry {
        /// Retries after the first failure.
        max: u32,
        /// Wait before the first retry.
        backoff: Duration,
        /// What happens when the retries are exhausted.
        then: Box<DeadLetter>,
    },
    /// Stop the shard: its checkpoint stays before the record and the run reports the error.
    StopShard,
}

impl Default for DeadLetter {
    /// Stopping the shard is the default: it loses nothing and makes the problem visible.
    fn default() -> Self {
        Self::StopShard
    }
}

impl DeadLetter {
    /// Dead-letters into `sink`.
    pub fn to(sink: impl Sink<DeadLetterRecord>) -> Self {
        Self::To(Arc::new(sink))
    }

    /// Retries a failing user function `max` times, then applies `then`.
    pub fn retry(max: u32, backoff: Duration, then: DeadLetter) -> Self {
        Self::Retry {
            max,
            backoff,
            then: Box::new(then),
        }
    }

    /// The sink this policy eventually writes to, if any.
    pub(crate) fn sink(&self) -> Option<&Arc<dyn Sink<DeadLetterRecord>>> {
        match self {
            Self::To(sink) => Some(sink),
            Self::Retry { then, .. } => then.sink(),
            Self::StopShard => None,
        }
    }
}

impl std::fmt::Debug for DeadLetter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::To(sink) => write!(f, "DeadLetter::To({:?})", sink.name()),
            Self::Retry { max, backoff, then } => f
                .debug_struct("DeadLetter::Retry")
                .field("max", max)
                .field("backoff", backoff)
                .field("then", then)
                .finish(),
            Self::StopShard => f.write_str("DeadLetter::StopShard"),
        }
    }
}
