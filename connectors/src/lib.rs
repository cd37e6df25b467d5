//! shardflow-connectors: the backends a topology reads from and writes to. Today the embedded,
//! file-backed `local` backend; Kinesis, DynamoDB and S3 join behind their own features.
#![deny(missing_docs)]

#[cfg(feature = "local")]
pub mod local;

#[cfg(feature = "local")]
pub use local::{
    FileLeaseStore, LocalDirSink, LocalProducer, LocalSource, LocalStream, LocalStreamConfig,
};
