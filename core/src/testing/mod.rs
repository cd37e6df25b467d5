//! Conformance suites every `LeaseStore` and `Sink` implementation passes (feature `testing`).

mod keyed_harness;
mod lease_store;
mod sink;

pub use keyed_harness::KeyedHarness;
pub use lease_store::lease_store_conformance;
pub use sink::{fencing_sink_conformance, sink_conformance};

#[cfg(test)]
mod tests {
    use crate::lease::MemoryLeaseStore;
    use crate::sink::MemorySink;

    #[tokio::test]
    async fn memory_lease_store_passes_the_conformance_suite() {
        super::lease_store_conformance(|| async { MemoryLeaseStore::new() }).await;
    }

    #[tokio::test]
    async fn memory_sink_passes_the_conformance_suite() {
        super::sink_conformance(|| async { MemorySink::<u64>::new("memory") }, |i| i).await;
    }
}
