//! Keyed state snapshots on the local backend: a running total stays right across a restart
//! after retention trimmed the records it was built from (issue 15's 25-hour scenario), at
//! another parallelism; old snapshot parts are deleted; a snapshot that does not fit the
//! topology stops the shard with an error naming the operator.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shardflow::core::source::ReadLimits;
use shardflow::local::{
    FileLeaseStore, LocalDirSink, LocalProducer, LocalSource, LocalStateStore, LocalStream,
    LocalStreamConfig, ManualClock,
};
use shardflow::prelude::*;
use shardflow::LeaseStore;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Event {
    key: String,
    amount: i64,
}

const T0: i64 = 1_764_547_200_000;
const KEYS: [&str; 5] = ["a", "b", "c", "d", "e"];

struct Setup {
    _root: tempfile::TempDir,
    stream: LocalStream,
    clock: ManualClock,
    out: PathBuf,
    state: PathBuf,
    leases: PathBuf,
    metrics: prometheus::Registry,
}

fn setup() -> Setup {
    let root = tempfile::tempdir().expect("temp dir");
    let clock = ManualClock::new(T0);
    let stream = LocalStream::create(
        root.path(),
        "totals",
        1,
        LocalStreamConfig::new().fsync(false).clock(clock.clone()),
    )
    .expect("stream");
    Setup {
        out: root.path().join("out"),
        state: root.path().join("state"),
        leases: root.path().join("leases"),
        metrics: prometheus::Registry::new(),
        stream,
        clock,
        _root: root,
    }
}

/// A running total per key, its state snapshotted after every epoch (`every` zero) or
/// rebuilt by replay.
fn topology(s: &Setup, operator: &str, snapshots: bool) -> Topology {
    let state = if snapshots {
        StatePolicy::snapshot(LocalStateStore::new(&s.state), Duration::ZERO)
    } else {
        StatePolicy::Replay
    };
    Topology::builder("totals")
        .state(state)
        .source(LocalSource::new(&s.stream).json::<Event>())
        .key_by(|e: &Event| e.key.clone())
        .aggregate(Sum::of(|e: &Event| e.amount))
        .name(operator)
        .sink(LocalDirSink::new(&s.out).fsync(false))
        .build()
        .expect("valid topology")
}

/// Reads to the tip at `parallelism` keyed workers, a few records per batch (many epochs,
/// so many snapshots).
async fn run(
    s: &Setup,
    topology: Topology,
    parallelism: usize,
) -> shardflow::Result<shardflow::RunReport> {
    let leases = Arc::new(FileLeaseStore::new(&s.leases).fsync(false));
    Runtime::new(topology, leases)
        .with_metrics(shardflow::Metrics::new(&s.metrics))
        .with_config(RuntimeConfig {
            worker_id: "snapshots".into(),
            parallelism,
            mode: RunMode::UntilCaughtUp,
            checkpoint_interval: Duration::from_millis(20),
            read_limits: ReadLimits {
                max_records: 3,
                max_bytes: 1 << 20,
            },
            ..RuntimeConfig::default()
        })
        .run()
        .await
}

/// Writes `per_key` events of amount 1 for every key.
async fn produce(s: &Setup, per_key: usize) {
    let producer = LocalProducer::new(s.stream.clone());
    for _ in 0..per_key {
        for key in KEYS {
            let event = Event {
                key: key.to_owned(),
                amount: 1,
            };
            let data = serde_json::to_vec(&event).expect("serialisable");
            producer.put(key, data).await.expect("put");
        }
    }
}

/// The total the sink holds for `key`.
fn total(s: &Setup, key: &str) -> i64 {
    let path = s
        .out
        .join("totals/shardId-000000000000/k")
        .join(format!("{key}.json"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let value: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
    value["value"].as_i64().expect("a number")
}

/// Every file under `dir`, relative.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir).expect("under dir");
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

async fn lease_checkpoint(s: &Setup) -> shardflow::core::lease::ShardCheckpoint {
    let leases = FileLeaseStore::new(&s.leases).list().await.expect("leases");
    assert_eq!(leases.len(), 1, "one shard");
    leases[0].checkpoint.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_total_survives_a_restart_after_retention_trimmed_its_records() {
    let s = setup();
    produce(&s, 10).await;
    run(&s, topology(&s, "total", true), 2)
        .await
        .expect("first run");
    for key in KEYS {
        assert_eq!(total(&s, key), 10, "key {key} after the first run");
    }
    let checkpoint = lease_checkpoint(&s).await;
    let snapshot = checkpoint
        .snapshot
        .expect("the checkpoint names a snapshot");
    assert!(
        snapshot.parts.iter().map(|p| p.keys).sum::<u64>() == KEYS.len() as u64,
        "the snapshot holds every key once: {snapshot:?}"
    );

    // 25 hours later the stream's retention (24 h) removed every record so far.
    s.clock.advance(25 * 3_600_000);
    let trimmed = s.stream.trim().expect("trim");
    assert_eq!(trimmed.records_removed, 10 * KEYS.len() as u64);
    produce(&s, 1).await;
    // At another parallelism: each key is restored in the worker that owns it now.
    run(&s, topology(&s, "total", true), 3)
        .await
        .expect("second run");
    for key in KEYS {
        assert_eq!(
            total(&s, key),
            11,
            "key {key}: the total restored from the snapshot plus the new record"
        );
    }
    // Every part stored is counted, and the state gauges add up to the keys held.
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&s.metrics.gather())
        .expect("metrics encode");
    let stored = text
        .lines()
        .find(|l| l.starts_with("shardflow_snapshot_parts_total") && l.contains("stored"))
        .unwrap_or_else(|| panic!("parts stored are counted: {text}"));
    assert!(!stored.ends_with(" 0"), "{stored}");
    let keys: f64 = text
        .lines()
        .filter(|l| l.starts_with("shardflow_state_keys{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(keys, KEYS.len() as f64, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_snapshot_parts_are_deleted_once_no_checkpoint_names_them() {
    let s = setup();
    produce(&s, 20).await;
    run(&s, topology(&s, "total", true), 2).await.expect("run");
    let named: Vec<String> = lease_checkpoint(&s)
        .await
        .snapshot
        .expect("a snapshot is named")
        .parts
        .into_iter()
        .map(|p| p.name)
        .collect();
    // Deletes run in the background after each checkpoint: give the last ones a moment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let left = loop {
        let left = files(&s.state);
        if left.len() <= named.len() * 3 || tokio::time::Instant::now() >= deadline {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for name in &named {
        assert!(
            left.contains(name),
            "the named part {name} is kept: {left:?}"
        );
    }
    // 100 records, 3 per batch: over 30 snapshots were taken, each of 2 parts.
    assert!(
        left.len() <= named.len() * 3,
        "old parts are deleted: {} files left, {} named",
        left.len(),
        named.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_another_operator_stops_the_shard_naming_it() {
    let s = setup();
    produce(&s, 3).await;
    run(&s, topology(&s, "total", true), 1).await.expect("run");
    produce(&s, 1).await;
    let error = run(&s, topology(&s, "renamed", true), 1)
        .await
        .expect_err("the snapshot holds no state of the renamed operator");
    let message = error.to_string();
    assert!(
        message.contains("\"total\"") || message.contains("\"renamed\""),
        "the error names the operator: {message}"
    );
    // Nothing was written over the right totals.
    assert_eq!(total(&s, "a"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_naming_a_snapshot_is_refused_by_a_replay_topology() {
    let s = setup();
    produce(&s, 3).await;
    run(&s, topology(&s, "total", true), 1).await.expect("run");
    produce(&s, 1).await;
    let error = run(&s, topology(&s, "total", false), 1)
        .await
        .expect_err("a replay topology cannot restore the snapshot");
    assert!(
        error.to_string().contains("state store"),
        "the error says what is missing: {error}"
    );
    assert_eq!(
        total(&s, "a"),
        3,
        "nothing was written over the right totals"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_whose_rebuild_point_is_not_its_snapshots_is_refused() {
    // A shardflow that does not know snapshots keeps the attribute it does not know while it
    // writes its own rebuild point (from the shard's start, for a running total): restoring
    // the snapshot and replaying from there would count the first records twice.
    let s = setup();
    produce(&s, 3).await;
    run(&s, topology(&s, "total", true), 1).await.expect("run");
    let store = FileLeaseStore::new(&s.leases);
    let lease = store.list().await.expect("leases").remove(0);
    let mut checkpoint = lease.checkpoint.clone();
    assert!(checkpoint.snapshot.is_some());
    checkpoint.rebuild_from = shardflow::core::lease::CheckpointPosition::Initial;
    checkpoint.rebuild_watermark = None;
    store
        .update(
            &lease.key,
            lease.counter,
            &shardflow::core::lease::LeaseUpdate::Reset { checkpoint },
        )
        .await
        .expect("an old version's checkpoint");
    produce(&s, 1).await;
    let error = run(&s, topology(&s, "total", true), 1)
        .await
        .expect_err("the snapshot does not stand for the rebuild point");
    assert!(error.to_string().contains("rebuilds from"), "{error}");
    assert_eq!(
        total(&s, "a"),
        3,
        "nothing was written over the right totals"
    );
}
