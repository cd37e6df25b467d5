//! Kinesis Data Streams: the prefetching spout, the producer, the KPL aggregation format, stream
//! administration, and client configuration (feature `kinesis`).

pub mod admin;
pub mod aggregation;
mod config;
mod error;
mod metrics;
mod producer;
mod producer_metrics;
mod spout;

pub use admin::{StreamAdmin, StreamSummary};
pub use config::KinesisConfig;
pub use error::KinesisError;
pub use metrics::SpoutMetrics;
pub use producer::{
    KinesisProducer, ProducerConfig, ProducerError, PutResult, Ticket, MAX_PARTITION_KEY_CHARS,
    MAX_RECORDS_PER_REQUEST, MAX_RECORD_BYTES, MAX_REQUEST_BYTES,
};
pub use producer_metrics::ProducerMetrics;
pub use spout::{KinesisSource, SpoutConfig, MAX_RECORDS_PER_CALL};
