//! The SQLite sink against the sink and fencing conformance suites, and what a user reads back
//! with SQL: typed key and window columns, one row per identity after a replay.

use serde::{Deserialize, Serialize};
use shardflow_connectors::sqlite::SqliteSink;
use shardflow_core::lease::LeaseEpoch;
use shardflow_core::position::ShardId;
use std::time::Duration;

use shardflow_core::sink::{
    InspectSink, KeyId, Output, OutputBatch, OutputId, Sink, SinkContext, Window,
};
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

fn cx_of(topology: &str) -> SinkContext {
    SinkContext {
        topology: topology.into(),
        instance: "shard-0".into(),
    }
}

fn one(id: &str, value: u64, counter: u64) -> OutputBatch<u64> {
    OutputBatch {
        shard: ShardId::new("shardId-000000000000"),
        lease_epoch: LeaseEpoch::new(1, counter),
        outputs: vec![Output {
            id: OutputId::keyed(KeyId::text(id), None),
            value,
        }],
    }
}

/// Review of issue 13: two topologies writing one table (their shard ids and identities are
/// alike) overwrote each other, and the newer lease table's epochs fenced the other for ever.
#[tokio::test]
async fn two_topologies_on_one_table_keep_their_own_rows() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("results.sqlite");
    let sink = SqliteSink::<u64>::new(&path, "per_minute").unwrap();
    let mut clicks = sink.open(&cx_of("clicks")).await.unwrap();
    let mut uniques = sink.open(&cx_of("uniques")).await.unwrap();
    clicks.write(one("k", 100, 7)).await.unwrap();
    clicks.commit().await.unwrap();
    uniques.write(one("k", 7, 1)).await.unwrap();
    uniques
        .commit()
        .await
        .expect("another topology's epochs are its own");
    let conn = rusqlite::Connection::open(&path).unwrap();
    let rows: Vec<(String, String)> = conn
        .prepare("SELECT topology, value FROM per_minute ORDER BY topology")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        rows,
        [
            ("clicks".into(), "100".into()),
            ("uniques".into(), "7".into())
        ]
    );
    let error = sink
        .committed()
        .await
        .expect_err("one map cannot hold two topologies' outputs");
    assert!(error.to_string().contains("2 topologies"), "{error}");
}

/// Review of issue 13: a table that existed with other column types was used as it was; with
/// the epoch columns declared as text, `'9' >= '10'` let a stale writer overwrite a newer one.
#[tokio::test]
async fn a_table_with_other_columns_is_refused_at_open() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("results.sqlite");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "CREATE TABLE per_minute (topology TEXT NOT NULL, shard TEXT NOT NULL, \
         output TEXT NOT NULL, \"key\", window_start INTEGER, window_end INTEGER, \
         record_sequence TEXT, record_sub_sequence INTEGER, value TEXT NOT NULL, \
         lease_generation TEXT NOT NULL, lease_counter TEXT NOT NULL, \
         PRIMARY KEY (topology, shard, output)) WITHOUT ROWID",
    )
    .unwrap();
    let sink = SqliteSink::<u64>::new(&path, "per_minute").unwrap();
    let error = sink
        .open(&cx())
        .await
        .err()
        .expect("a table with text epochs is refused");
    assert!(
        !error.retryable && error.to_string().contains("lease_counter TEXT"),
        "{error}"
    );
}

/// Review of issue 13: a commit whose future was dropped (a timeout around it) lost its rows:
/// the next commit had nothing to write. They are now written by the next commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_dropped_mid_way_is_made_by_the_next_one() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("results.sqlite");
    let sink = SqliteSink::<u64>::new(&path, "per_minute")
        .unwrap()
        .busy_timeout(Duration::from_millis(300));
    let mut writer = sink.open(&cx()).await.unwrap();
    // Another process holds the write lock past the busy timeout: the dropped commit's
    // transaction never starts.
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    writer.write(one("k", 5, 1)).await.unwrap();
    let dropped = tokio::time::timeout(Duration::from_millis(100), writer.commit()).await;
    assert!(dropped.is_err(), "the commit waits for the lock");
    tokio::time::sleep(Duration::from_millis(600)).await;
    other.execute_batch("ROLLBACK").unwrap();
    writer.commit().await.expect("the next commit");
    let got = sink.committed().await.unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
}

/// Logs and errors never quote payloads: a stored value of the wrong type is reported by kind
/// and column only.
#[tokio::test]
async fn a_stored_value_of_the_wrong_type_is_reported_without_its_contents() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("results.sqlite");
    let text = SqliteSink::<String>::new(&path, "t").unwrap();
    let mut writer = text.open(&cx()).await.unwrap();
    writer
        .write(OutputBatch {
            shard: ShardId::new("s"),
            lease_epoch: LeaseEpoch::new(1, 1),
            outputs: vec![Output {
                id: OutputId::keyed(KeyId::text("k"), None),
                value: "secret-payload".to_string(),
            }],
        })
        .await
        .unwrap();
    writer.commit().await.unwrap();
    let numbers = SqliteSink::<u64>::new(&path, "t").unwrap();
    let error = numbers.committed().await.expect_err("not a number");
    assert!(!error.to_string().contains("secret"), "{error}");
}

/// A sink under another name (`Named`) is the same sink: it passes the fencing suite too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_sink_passes_the_fencing_conformance_suite() {
    let (_root, next) = databases();
    fencing_sink_conformance(
        || {
            let path = next();
            async move {
                shardflow_core::sink::Named::new(
                    "counts-db",
                    SqliteSink::new(path, "counts").unwrap(),
                )
            }
        },
        count,
    )
    .await;
}
