//! The SQLite sink against the sink and fencing conformance suites, and what a user reads back
//! with SQL: typed key and window columns, one row per identity after a replay.

use serde::{Deserialize, Serialize};
use shardflow_connectors::sqlite::SqliteSink;
use shardflow_core::lease::LeaseEpoch;
use shardflow_core::position::ShardId;
use shardflow_core::sink::{KeyId, Output, OutputBatch, OutputId, Sink, SinkContext, Window};
use shardflow_core::testing::{fencing_sink_conformance, sink_conformance};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Count {
    key: String,
    n: u64,
}

fn count(i: u64) -> Count {
    Count {
        key: format!("k{i}"),
        n: i,
    }
}

/// A fresh database per sink the suites ask for.
fn databases() -> (tempfile::TempDir, impl Fn() -> std::path::PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().to_owned();
    let counter = std::sync::atomic::AtomicUsize::new(0);
    let next = move || {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        dir.join(format!("db-{n}/results.sqlite"))
    };
    (root, next)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_sink_passes_the_sink_conformance_suite() {
    let (_root, next) = databases();
    sink_conformance(
        || {
            let path = next();
            async move { SqliteSink::new(path, "counts").unwrap() }
        },
        count,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_sink_passes_the_fencing_conformance_suite() {
    let (_root, next) = databases();
    fencing_sink_conformance(
        || {
            let path = next();
            async move { SqliteSink::new(path, "counts").unwrap() }
        },
        count,
    )
    .await;
}

fn cx() -> SinkContext {
    SinkContext {
        topology: "t".into(),
        instance: "shard-0".into(),
    }
}

#[tokio::test]
async fn keys_and_windows_are_typed_columns_a_query_can_group_by() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("results.sqlite");
    let sink = SqliteSink::<u64>::new(&path, "per_minute").unwrap();
    let mut writer = sink.open(&cx()).await.unwrap();
    let keyed =
        |key: KeyId, start: i64| OutputId::keyed(key, Some(Window::new(start, start + 60_000)));
    for shard in ["shardId-0", "shardId-1"] {
        let outputs = vec![
            Output {
                id: keyed(KeyId::unsigned(7), 0),
                value: 2,
            },
            Output {
                id: keyed(KeyId::text("campaign é"), 60_000),
                value: 3,
            },
        ];
        writer
            .write(OutputBatch {
                shard: ShardId::new(shard),
                lease_epoch: LeaseEpoch::new(1, 1),
                outputs,
            })
            .await
            .unwrap();
    }
    writer.commit().await.unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let rows: Vec<(String, rusqlite::types::Value, i64, i64)> = conn
        .prepare(
            "SELECT typeof(key), key, window_start, SUM(CAST(value AS INTEGER)) FROM per_minute \
             GROUP BY key, window_start ORDER BY window_start",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        rows,
        [
            ("integer".into(), rusqlite::types::Value::Integer(7), 0, 4),
            (
                "text".into(),
                rusqlite::types::Value::Text("campaign é".into()),
                60_000,
                6
            ),
        ],
        "one row per key and window after summing the shards' partials"
    );
}

#[test]
fn table_names_that_need_quoting_are_refused_before_anything_opens() {
    let error = SqliteSink::<u64>::new("x.sqlite", "per-minute")
        .err()
        .unwrap();
    assert!(error.to_string().contains("ASCII letters"), "{error}");
}
