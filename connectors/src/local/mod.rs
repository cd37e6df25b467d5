//! The embedded, file-backed backend: a Kinesis-like stream in a directory, its producer and
//! source, a lease store and a sink that write JSON files. No AWS needed.
//!
//! - [`LocalStream`]: shards with MD5 hash key ranges, append-only logs with checksummed
//!   frames, split and merge with parent links, retention, crash recovery.
//! - [`LocalProducer`] and [`LocalSource`]: the stream from async code, and as a `Source`.
//! - [`FileLeaseStore`]: leases as JSON files, updated under a file lock.
//! - [`LocalDirSink`]: one JSON file per output identity, replaced atomically.

mod clock;
mod config;
mod crc;
mod dir_sink;
mod error;
mod escape;
mod frame;
mod fs;
mod hash;
mod lease_store;
mod limits;
mod log;
mod metadata;
mod payload_store;
mod producer;
mod reader;
mod source;
mod state_store;
mod stream;
mod writer;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{LocalStreamConfig, DEFAULT_RETENTION};
pub use dir_sink::{LocalDirSink, LocalDirSinkError};
pub use error::LocalStreamError;
pub use hash::partition_key_hash;
pub use lease_store::{FileLeaseStore, FileLeaseStoreError};
pub use limits::{MAX_PARTITION_KEY_CHARS, MAX_RECORD_BYTES};
pub use payload_store::LocalPayloadStore;
pub use producer::LocalProducer;
pub use reader::LocalShardReader;
pub use source::LocalSource;
pub use state_store::LocalStateStore;
pub use stream::{LocalStream, PutResult, TrimReport, MAX_SHARD_COUNT};

#[cfg(test)]
mod test_support;
