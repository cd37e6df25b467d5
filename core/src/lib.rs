//! shardflow-core: record and position types, the typed topology builder, the runtime, the
//! checkpoint tracker, and the `Source`, `Sink` and `LeaseStore` traits. No AWS SDK here.
#![deny(missing_docs)]

pub mod clock;
pub mod decode;
pub mod error;
pub mod lease;
pub(crate) mod lease_guard;
pub mod memory;
pub mod metrics;
pub mod operator;
pub mod payload_store;
pub mod pool;
pub mod position;
pub mod protocol;
pub mod random;
pub mod record;
pub mod redact;
pub mod sink;
pub mod source;
pub mod state_store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use error::{Error, Result};
pub mod dead_letter;
mod exec;
pub mod runtime;
pub mod topology;
pub(crate) mod tracker;

// The protocol's modules at the paths they had before they moved to `protocol/`.
pub use protocol::{balance, checkpoint, shard_sync};

pub use dead_letter::{DeadLetter, DeadLetterRecord};
pub use runtime::{Health, RunMode, RunReport, Runtime, RuntimeConfig};
pub use topology::{Stream, Topology};
