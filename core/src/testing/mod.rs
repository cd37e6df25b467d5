//! Conformance suites every `LeaseStore` and `Sink` implementation passes (feature `testing`).

mod lease_store;
mod sink;

pub use lease_store::lease_store_conformance;
pub use sink::sink_conformance;
