//! Hostile input on the embedded backend: one bad record or one odd key costs that record,
//! never the run (issue 14).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shardflow::core::memory::MemoryStream;
use shardflow::core::sink::InspectSink;
use shardflow::local::LocalDirSink;
use shardflow::operators::WindowResult;
use shardflow::prelude::*;
use shardflow::MemoryLeaseStore;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Click {
    user: String,
    ts: i64,
}

fn push(stream: &MemoryStream, shard: usize, user: &str, ts: i64) {
    let json = serde_json::to_vec(&Click {
        user: user.into(),
        ts,
    })
    .unwrap();
    stream.push(shard, ts, b"pk", &json);
}

fn bounded() -> RuntimeConfig {
    RuntimeConfig {
        worker_id: "test-worker".into(),
        parallelism: 2,
        mode: RunMode::UntilCaughtUp,
        checkpoint_interval: Duration::from_millis(20),
        ..RuntimeConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_and_odd_keys_get_identities_every_sink_can_store() {
    // 90 CJK characters made an 815-byte file name: the run failed with `NameTooLong`, and
    // every restart failed the same way.
    let keys = [
        "\u{4e2d}".repeat(90),
        format!("{}a", "x".repeat(300)),
        format!("{}b", "x".repeat(300)),
        "/".into(),
        "%".into(),
        "..".into(),
        "\0".into(),
        "a/../../etc".into(),
    ];
    let stream = MemoryStream::new("odd-keys", 1);
    for (i, key) in keys.iter().enumerate() {
        push(&stream, 0, key, i as i64);
        push(&stream, 0, key, i as i64 + 100);
    }
    let out = tempfile::tempdir().unwrap();
    let sink = LocalDirSink::new(out.path()).fsync(false);
    let topology = Topology::builder("odd")
        .source(stream.clone().json::<Click>())
        .event_time(|c: &Click| c.ts)
        .key_by(|c: &Click| c.user.clone())
        .window(TumblingWindow::of(Duration::from_secs(1)))
        .aggregate(Count)
        .sink(sink.clone())
        .build()
        .unwrap();
    Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
        .with_config(bounded())
        .run()
        .await
        .expect("long keys do not fail the run");
    let got: std::collections::BTreeMap<_, WindowResult<String, u64>> =
        InspectSink::committed(&sink).await.unwrap();
    assert_eq!(got.len(), keys.len(), "one result per key: {got:?}");
    for key in &keys {
        let (_, result) = got
            .iter()
            .find(|(_, r)| r.key == *key)
            .unwrap_or_else(|| panic!("no result for a key of {} bytes", key.len()));
        assert_eq!(result.value, 2);
    }
    for (_, path) in got.keys() {
        assert!(path.len() < 200, "{path}");
    }
}
