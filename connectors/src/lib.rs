//! shardflow-connectors: the backends a topology reads from and writes to: the embedded,
//! file-backed `local` backend, Kinesis (feature `kinesis`) and the DynamoDB lease store
//! (feature `dynamodb`); S3 joins behind its own feature.
#![deny(missing_docs)]

#[cfg(any(feature = "kinesis", feature = "dynamodb"))]
mod aws;
#[cfg(feature = "dynamodb")]
pub mod dynamodb;
#[cfg(feature = "kpl")]
pub mod kinesis;

#[cfg(any(feature = "kinesis", feature = "dynamodb"))]
pub use aws::AwsConfig;
#[cfg(feature = "local")]
pub mod local;

#[cfg(feature = "local")]
pub use local::{
    FileLeaseStore, LocalDirSink, LocalProducer, LocalSource, LocalStream, LocalStreamConfig,
};
