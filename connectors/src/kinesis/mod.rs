//! Kinesis Data Streams: the prefetching spout, the producer, the KPL aggregation format, stream
//! administration, and client configuration (feature `kinesis`).

// The aggregation format needs no SDK (feature `kpl`); everything else does (feature `kinesis`).
pub mod aggregation;

#[cfg(feature = "kinesis")]
pub mod admin;
#[cfg(feature = "kinesis")]
mod error;
#[cfg(feature = "kinesis")]
mod metrics;
#[cfg(feature = "kinesis")]
mod producer;
#[cfg(feature = "kinesis")]
mod producer_metrics;
#[cfg(feature = "kinesis")]
mod spout;

#[cfg(feature = "kinesis")]
pub use admin::{StreamAdmin, StreamSummary};
#[cfg(feature = "kinesis")]
pub use error::KinesisError;
#[cfg(feature = "kinesis")]
pub use metrics::SpoutMetrics;
#[cfg(feature = "kinesis")]
pub use producer::{
    KinesisProducer, ProducerConfig, ProducerError, PutResult, Ticket, MAX_PARTITION_KEY_CHARS,
    MAX_RECORDS_PER_REQUEST, MAX_RECORD_BYTES, MAX_REQUEST_BYTES,
};
#[cfg(feature = "kinesis")]
pub use producer_metrics::ProducerMetrics;
#[cfg(feature = "kinesis")]
pub use spout::{KinesisSource, SpoutConfig, MAX_RECORDS_PER_CALL};
