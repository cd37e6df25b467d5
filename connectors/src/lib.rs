//! shardflow-connectors: the backends a topology reads from and writes to: the embedded,
//! file-backed `local` backend, Kinesis (feature `kinesis`), the DynamoDB lease store and sink
//! (feature `dynamodb`), the S3 sink (feature `s3`) and the SQLite sink (feature `sqlite`).
#![deny(missing_docs)]

#[cfg(any(feature = "kinesis", feature = "dynamodb", feature = "s3"))]
mod aws;
#[cfg(feature = "dynamodb")]
pub mod dynamodb;
#[cfg(feature = "kpl")]
pub mod kinesis;

#[cfg(any(feature = "kinesis", feature = "dynamodb", feature = "s3"))]
pub use aws::AwsConfig;
#[cfg(feature = "local")]
pub mod local;
#[cfg(feature = "s3")]
pub mod s3;
#[cfg(feature = "sqlite")]
pub mod sqlite;

#[cfg(feature = "local")]
pub use local::{
    FileLeaseStore, LocalDirSink, LocalProducer, LocalSource, LocalStream, LocalStreamConfig,
};
