//! shardflow-connectors: the backends a topology reads from and writes to: the embedded,
//! file-backed `local` backend and Kinesis (feature `kinesis`); DynamoDB and S3 join behind
//! their own features.
#![deny(missing_docs)]

#[cfg(feature = "kpl")]
pub mod kinesis;
#[cfg(feature = "local")]
pub mod local;

#[cfg(feature = "local")]
pub use local::{
    FileLeaseStore, LocalDirSink, LocalProducer, LocalSource, LocalStream, LocalStreamConfig,
};
