//! Restore equivalence: a windowed topology over 1 M events on the local backend gives a
//! byte-identical output directory, and the same rows in a SQLite database (compared by query),
//! whether it runs uninterrupted, or is aborted in process at 20 random points and restarted
//! from the lease store at another parallelism.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use shardflow::core::lease::CheckpointPosition;
use shardflow::local::{
    FileLeaseStore, LocalDirSink, LocalProducer, LocalSource, LocalStream, LocalStreamConfig,
};
use shardflow::prelude::*;
use shardflow::sqlite::{rusqlite, SqliteSink};

const EVENTS: u64 = 1_000_000;
const KEYS: u64 = 40;
const ABORTS: usize = 20;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Event {
    key: String,
    ts: i64,
    amount: i64,
}

/// The topology, writing its results both to the directory `out` and to the database `db`.
fn topology(stream: &LocalStream, out: &Path, db: &Path) -> Topology {
    let late_dir = out.join("late");
    let late_db = db.to_owned();
    let windows = Topology::builder("restore")
        .source(LocalSource::new(stream).json::<Event>())
        .event_time(|e: &Event| e.ts)
        .max_out_of_orderness(Duration::from_millis(300))
        .key_by(|e: &Event| e.key.clone())
        .window(TumblingWindow::of(Duration::from_secs(5)))
        .allowed_lateness(Duration::from_millis(200))
        .late_records(move |late| {
            late.clone()
                .sink(SqliteSink::new(late_db, "late").unwrap().fsync(false));
            late.sink(LocalDirSink::new(late_dir).fsync(false));
        })
        .aggregate(Sum::of(|e: &Event| e.amount));
    windows
        .clone()
        .sink(SqliteSink::new(db, "windows").unwrap().fsync(false));
    windows
        .sink(LocalDirSink::new(out.join("windows")).fsync(false))
        .build()
        .expect("valid topology")
}

/// (table, shard, identity, key, window start, JSON value).
type Row = (String, String, String, Option<String>, Option<i64>, String);

/// Every row of the database's two tables, by query: (table, shard, identity, key, window
/// start, JSON value). The lease epoch columns are left out: they differ between runs.
fn rows(db: &Path) -> Vec<Row> {
    let conn = rusqlite::Connection::open(db).expect("database");
    let mut stmt = conn
        .prepare(
            "SELECT 'windows', shard, output, key, window_start, value FROM windows \
             UNION ALL SELECT 'late', shard, output, key, window_start, value FROM late \
             ORDER BY 1, 2, 3",
        )
        .expect("query");
    stmt.query_map([], |r| {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
        ))
    })
    .expect("rows")
    .collect::<Result<_, _>>()
    .expect("rows")
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

/// The smallest committed sequence number over the shards' leases (0 before any checkpoint).
async fn min_committed(leases_dir: &Path) -> u128 {
    let leases = shardflow::LeaseStore::list(&FileLeaseStore::new(leases_dir))
        .await
        .expect("leases");
    if leases.is_empty() {
        return 0;
    }
    leases
        .iter()
        .map(|l| match &l.checkpoint.committed {
            CheckpointPosition::At(p) => p.sequence.as_u128().expect("local sequence numbers fit"),
            CheckpointPosition::ShardEnd => u128::MAX,
            CheckpointPosition::Initial
            | CheckpointPosition::TrimHorizon
            | CheckpointPosition::AtTimestamp(_) => 0,
        })
        .min()
        .unwrap_or(0)
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
    let straight_db = root.path().join("straight.sqlite");
    Runtime::new(topology(&stream, &straight, &straight_db), leases)
        .with_config(config(2))
        .run()
        .await
        .expect("run");

    // Aborted at 20 points spread over the input, restarted each time from the lease store at
    // parallelism 3. Attempt k is aborted once every shard's checkpoint passed 3k/80 of the
    // input (polled, so each abort lands after real progress), plus a random delay.
    let restored = root.path().join("restored");
    let restored_db = root.path().join("restored.sqlite");
    let leases_dir = root.path().join("leases-restored");
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut resumed_from_a_checkpoint = 0;
    let mut aborted_mid_run = 0;
    for attempt in 1..=ABORTS as u64 {
        let before = min_committed(&leases_dir).await;
        resumed_from_a_checkpoint += usize::from(before > 0);
        let leases = Arc::new(FileLeaseStore::new(&leases_dir).fsync(false));
        let runtime =
            Runtime::new(topology(&stream, &restored, &restored_db), leases).with_config(config(3));
        let run = tokio::spawn(runtime.run());
        // Checkpoints trail the readers, and the last quarter of the input goes by fast:
        // the abort points are spread over the first three quarters.
        let target = EVENTS as u128 * 3 * u128::from(attempt) / (4 * ABORTS as u128);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while min_committed(&leases_dir).await < target && !run.is_finished() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "attempt {attempt} made no progress"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..30))).await;
        aborted_mid_run += usize::from(!run.is_finished());
        run.abort();
        let _ = run.await;
    }
    assert!(
        resumed_from_a_checkpoint >= ABORTS - 1,
        "restarts resumed from checkpoints"
    );
    assert!(
        aborted_mid_run >= ABORTS - 1,
        "aborts hit running pipelines: {aborted_mid_run}"
    );
    let leases = Arc::new(FileLeaseStore::new(&leases_dir).fsync(false));
    Runtime::new(topology(&stream, &restored, &restored_db), leases)
        .with_config(config(3))
        .run()
        .await
        .expect("final run");

    let (a_rows, b_rows) = (rows(&straight_db), rows(&restored_db));
    assert_eq!(
        a_rows.len(),
        snapshot(&straight).len(),
        "one row per output file"
    );
    let differing: Vec<_> = a_rows
        .iter()
        .zip(&b_rows)
        .filter(|(a, b)| a != b)
        .take(5)
        .collect();
    assert!(
        a_rows.len() == b_rows.len() && differing.is_empty(),
        "the databases differ ({} rows against {}): {differing:?}",
        a_rows.len(),
        b_rows.len()
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
