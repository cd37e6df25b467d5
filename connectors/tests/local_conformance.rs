//! The core conformance suites, run against the local backend's lease store and sink.
#![cfg(feature = "local")]

use serde::{Deserialize, Serialize};
use shardflow_connectors::local::{FileLeaseStore, LocalDirSink};
use shardflow_core::testing::{lease_store_conformance, sink_conformance};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn file_lease_store_passes_the_lease_store_conformance_suite() {
    let root = tempfile::tempdir().unwrap();
    let counter = std::sync::atomic::AtomicUsize::new(0);
    lease_store_conformance(|| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = root.path().join(format!("store-{n}"));
        async move { FileLeaseStore::new(dir) }
    })
    .await;
}

#[tokio::test]
async fn file_lease_store_without_fsync_passes_the_conformance_suite_on_one_thread() {
    let root = tempfile::tempdir().unwrap();
    let counter = std::sync::atomic::AtomicUsize::new(0);
    lease_store_conformance(|| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = root.path().join(format!("store-{n}"));
        async move { FileLeaseStore::new(dir).fsync(false) }
    })
    .await;
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Count {
    key: String,
    n: u64,
}

#[tokio::test]
async fn local_dir_sink_passes_the_sink_conformance_suite_with_a_struct() {
    let root = tempfile::tempdir().unwrap();
    let counter = std::sync::atomic::AtomicUsize::new(0);
    sink_conformance(
        || {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let dir = root.path().join(format!("sink-{n}"));
            async move { LocalDirSink::new(dir) }
        },
        |i| Count {
            key: format!("k{i}"),
            n: i,
        },
    )
    .await;
}

#[tokio::test]
async fn local_dir_sink_passes_the_sink_conformance_suite_with_json_values() {
    let root = tempfile::tempdir().unwrap();
    let counter = std::sync::atomic::AtomicUsize::new(0);
    sink_conformance(
        || {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let dir = root.path().join(format!("sink-{n}"));
            async move { LocalDirSink::new(dir).fsync(false) }
        },
        |i| serde_json::json!({ "i": i, "tags": ["a", i.to_string()] }),
    )
    .await;
}
