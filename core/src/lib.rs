//! shardflow-core: record and position types, the typed topology builder, the runtime, the
//! checkpoint tracker, and the `Source`, `Sink` and `LeaseStore` traits. No AWS SDK here.
#![deny(missing_docs)]

pub mod balance;
pub mod checkpoint;
pub mod decode;
pub mod error;
pub mod lease;
pub mod memory;
pub mod pool;
pub mod position;
pub mod record;
pub mod shard_sync;
pub mod sink;
pub mod source;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use error::{Error, Result};
pub mod dead_letter;
pub mod runtime;
pub mod topology;

pub use dead_letter::{DeadLetter, DeadLetterRecord};
pub use runtime::{Health, RunMode, RunReport, Runtime, RuntimeConfig};
pub use topology::{Stream, Topology};
