//! Conformance suites every `LeaseStore` and `Sink` implementation passes, and the test
//! doubles the simulation checker is built from (feature `testing`).

mod holding;
mod keyed_harness;
mod lease_store;
mod scripted;
mod scripted_leases;
mod sink;
mod state_store;

pub use holding::HoldingSink;
pub use keyed_harness::KeyedHarness;
pub use lease_store::lease_store_conformance;
pub use scripted::{ScriptedSink, WriteAttempt};
pub use scripted_leases::ScriptedLeaseStore;
pub use sink::{fencing_sink_conformance, sink_conformance};
pub use state_store::state_store_conformance;

#[cfg(test)]
mod tests {
    use crate::lease::MemoryLeaseStore;
    use crate::sink::MemorySink;

    #[tokio::test]
    async fn memory_lease_store_passes_the_conformance_suite() {
        super::lease_store_conformance(|| async { MemoryLeaseStore::new() }).await;
    }

    #[tokio::test]
    async fn the_holding_sink_model_passes_the_conformance_suite() {
        super::sink_conformance(
            || async { super::HoldingSink::<u64>::new("holding", 3, std::time::Duration::ZERO) },
            |i| i,
        )
        .await;
    }

    #[tokio::test]
    async fn memory_state_store_passes_the_conformance_suite() {
        super::state_store_conformance(|| async { crate::state_store::MemoryStateStore::new() })
            .await;
    }

    #[tokio::test]
    async fn memory_sink_passes_the_conformance_suite() {
        super::sink_conformance(|| async { MemorySink::<u64>::new("memory") }, |i| i).await;
    }

    #[tokio::test]
    async fn the_fencing_memory_sink_passes_the_sink_and_fencing_suites() {
        super::sink_conformance(|| async { MemorySink::<u64>::fencing("memory") }, |i| i).await;
        super::fencing_sink_conformance(|| async { MemorySink::<u64>::fencing("memory") }, |i| i)
            .await;
    }
}
