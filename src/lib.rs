//! shardflow: typed stream processing over Amazon Kinesis Data Streams, as one binary.
//!
//! Declare a topology with [`Topology::builder`], run it with [`Runtime`]. The embedded backend
//! ([`local`]) runs the same topologies on one machine without AWS.
#![deny(missing_docs)]

pub use shardflow_connectors as connectors;
pub mod ops;
pub mod run;
pub use run::{run, run_app};
pub use shardflow_core as core;
pub use shardflow_operators as operators;

#[cfg(feature = "dynamodb")]
pub use shardflow_connectors::dynamodb;
#[cfg(feature = "kinesis")]
pub use shardflow_connectors::kinesis;
pub use shardflow_connectors::local;
#[cfg(feature = "s3")]
pub use shardflow_connectors::s3;
#[cfg(feature = "sqlite")]
pub use shardflow_connectors::sqlite;
#[cfg(any(feature = "kinesis", feature = "dynamodb", feature = "s3"))]
pub use shardflow_connectors::AwsConfig;
pub use shardflow_core::dead_letter::{DeadLetter, DeadLetterRecord};
pub use shardflow_core::decode::SourceExt;
pub use shardflow_core::lease::{LeaseStore, MemoryLeaseStore};
pub use shardflow_core::position::{EventTime, ShardId, StartPosition};
pub use shardflow_core::runtime::metrics::Metrics;
pub use shardflow_core::runtime::{Health, RunMode, RunReport, Runtime, RuntimeConfig};
pub use shardflow_core::sink::{MemorySink, Sink, Window};
pub use shardflow_core::topology::{StatePolicy, Stream, Topology};
pub use shardflow_core::{Error, Result};

// Every Rust block of the README and the guide compiles and runs as a doc test. The guide's
// last part needs the AWS features.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
mod readme_doctests {}
#[cfg(all(
    doctest,
    feature = "sqlite",
    feature = "kinesis",
    feature = "dynamodb",
    feature = "s3"
))]
#[doc = include_str!("../docs/guide.md")]
mod guide_doctests {}

/// Everything a topology declaration needs, in one import.
pub mod prelude {
    pub use shardflow_core::dead_letter::{DeadLetter, DeadLetterRecord};
    pub use shardflow_core::decode::SourceExt;
    pub use shardflow_core::runtime::{RunMode, Runtime, RuntimeConfig};
    pub use shardflow_core::sink::Window;
    pub use shardflow_core::topology::{StatePolicy, Stream, Topology};
    pub use shardflow_operators::{
        Aggregator, Count, KeyBy, Max, Min, Reduce, SessionWindow, ShardStreamExt, SlidingWindow,
        StreamExt, Sum, TumblingWindow, WindowResult,
    };
}
