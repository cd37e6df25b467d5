//! Kinesis Data Streams: the prefetching spout, the KPL aggregation format, stream
//! administration, and client configuration (feature `kinesis`).

pub mod admin;
pub mod aggregation;
mod config;
mod error;
mod metrics;
mod spout;

pub use admin::{StreamAdmin, StreamSummary};
pub use config::KinesisConfig;
pub use error::KinesisError;
pub use metrics::SpoutMetrics;
pub use spout::{KinesisSource, SpoutConfig, MAX_RECORDS_PER_CALL};
