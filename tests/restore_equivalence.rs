//! Restore equivalence: a windowed topology over 1 M events on the local backend gives a
//! byte-identical output directory whether it runs uninterrupted, or is aborted in process at
//! 20 random points and restarted from the lease store at another parallelism.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use shardflow::local::{
    FileLeaseStore, LocalDirSink, LocalProducer, LocalSource, LocalStream, LocalStreamConfig,
};
use shardflow::prelude::*;

const EVENTS: u64 = 1_000_000;
const KEYS: u64 = 40;
const ABORTS: usize = 20;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Event {
    key: String,
    ts: i64,
    amount: i64,
}

fn topology(stream: &LocalStream, out: &Path) -> Topology {
    let late_dir = out.join("late");
    Topology::builder("restore")
        .source(LocalSource::new(stream).json::<Event>())
        .event_time(|e: &Event| e.ts)
        .max_out_of_orderness(Duration::from_millis(300))
        .key_by(|e: &Event| e.key.clone())
        .window(TumblingWindow::of(Duration::from_secs(5)))
        .allowed_lateness(Duration::from_millis(200))
        .late_records(move |late| {
            late.sink(LocalDirSink::new(late_dir).fsync(false));
        })
        .aggregate(Sum::of(|e: &Event| e.amount))
        .sink(LocalDirSink::new(out.join("windows")).fsync(false))
        .build()
        .expect("valid topology")
}

fn config(parallelism: usize) -> RuntimeConfig {
    RuntimeConfig {
        worker_id: "restore-worker".into(),
        parallelism,
        mode: RunMode::UntilCaughtUp,
        checkpoint_interval: Duration::from_millis(25),
        ..RuntimeConfig::default()
    }
}

/// Every file under `dir` (relative path to bytes), ignoring nothing: temp files would differ.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("readable dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir).expect("under dir").to_path_buf();
                out.insert(rel, std::fs::read(&path).expect("readable file"));
            }
        }
    }
    out
}

/// Writes the events; returns the sum of their amounts.
async fn produce(stream: &LocalStream) -> i64 {
    let producer = LocalProducer::new(stream.clone());
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut batch = Vec::with_capacity(10_000);
    let mut total = 0;
    for i in 0..EVENTS {
        let key = format!("key-{}", rng.gen_range(0..KEYS));
        // Event time advances 1 ms per event with up to 1 s of disorder: some records are
        // late beyond the bound plus lateness and take the side output.
        let ts = i as i64 - rng.gen_range(0..1_000);
        let event = Event {
            key: key.clone(),
            ts,
            amount: rng.gen_range(1..100),
        };
        total += event.amount;
        batch.push((key, serde_json::to_vec(&event).expect("serialisable")));
        if batch.len() == 10_000 {
            producer.put_batch(&batch).await.expect("put");
            batch.clear();
        }
    }
    if !batch.is_empty() {
        producer.put_batch(&batch).await.expect("put");
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_and_restored_runs_write_the_same_outputs() {
    let root = tempfile::tempdir().expect("temp dir");
    let stream = LocalStream::create(
        root.path(),
        "events",
        4,
        LocalStreamConfig::new().fsync(false),
    )
    .expect("stream");
    let input_total = produce(&stream).await;

    // Uninterrupted, parallelism 2.
    let straight = root.path().join("straight");
    let leases = Arc::new(FileLeaseStore::new(root.path().join("leases-straight")).fsync(false));
    Runtime::new(topology(&stream, &straight), leases)
        .with_config(config(2))
        .run()
        .await
        .expect("run");

    // Aborted at 20 random points, restarted each time from the lease store, parallelism 3.
    let restored = root.path().join("restored");
    let leases_dir = root.path().join("leases-restored");
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut finished_early = 0;
    for _ in 0..ABORTS {
        let leases = Arc::new(FileLeaseStore::new(&leases_dir).fsync(false));
        let runtime = Runtime::new(topology(&stream, &restored), leases).with_config(config(3));
        let run = tokio::spawn(runtime.run());
        tokio::time::sleep(Duration::from_millis(rng.gen_range(20..150))).await;
        if run.is_finished() {
            finished_early += 1;
        }
        run.abort();
        let _ = run.await;
    }
    let leases = Arc::new(FileLeaseStore::new(&leases_dir).fsync(false));
    Runtime::new(topology(&stream, &restored), leases)
        .with_config(config(3))
        .run()
        .await
        .expect("final run");
    assert!(
        finished_early < ABORTS / 2,
        "most aborts must hit a running pipeline"
    );

    let a = snapshot(&straight);
    let b = snapshot(&restored);
    let windows = a.keys().filter(|p| p.starts_with("windows")).count();
    let late = a.keys().filter(|p| p.starts_with("late")).count();
    assert!(
        windows > 1000,
        "expected many window outputs, got {windows}"
    );
    assert!(late > 0, "the input has late records");
    let missing: Vec<_> = a.keys().filter(|k| !b.contains_key(*k)).take(5).collect();
    let extra: Vec<_> = b.keys().filter(|k| !a.contains_key(*k)).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );
    let differing: Vec<_> = a
        .iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, _)| k)
        .take(5)
        .collect();
    assert!(differing.is_empty(), "outputs differ: {differing:?}");

    // Nothing lost, nothing twice: every event is in exactly one window or in the late output.
    let windowed: i64 = a
        .iter()
        .filter(|(p, _)| p.starts_with("windows"))
        .map(|(_, v)| {
            serde_json::from_slice::<WindowResult<String, i64>>(v)
                .expect("window json")
                .value
        })
        .sum();
    let late_total: i64 = a
        .iter()
        .filter(|(p, _)| p.starts_with("late"))
        .map(|(_, v)| {
            serde_json::from_slice::<Event>(v)
                .expect("event json")
                .amount
        })
        .sum();
    assert_eq!(windowed + late_total, input_total);
}
