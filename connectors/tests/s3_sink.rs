//! `S3Sink` against s3rver (started by scripts/test.sh): the sink and fencing conformance suites
//! (also against moto's server, which enforces S3's conditional writes), objects cut at the
//! same records by a replay (including one cut short by the latency bound), gzip and raw
//! bytes, multipart uploads, and a runtime whose checkpoint waits for the object holding a
//! record. Races between two writers of one key are in `s3_conditional.rs`.

use std::collections::BTreeSet;
use std::io::Read as _;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::Client;
use shardflow_connectors::s3::S3Sink;
use shardflow_connectors::AwsConfig;
use shardflow_core::decode::SourceExt;
use shardflow_core::lease::{CheckpointPosition, LeaseEpoch, LeaseStore, MemoryLeaseStore};
use shardflow_core::memory::MemoryStream;
use shardflow_core::position::{RecordPosition, SequenceNumber, ShardId};
use shardflow_core::runtime::{RunMode, Runtime, RuntimeConfig};
use shardflow_core::sink::{Held, Output, OutputBatch, OutputId, Sink, SinkContext};
use shardflow_core::testing::{fencing_sink_conformance, sink_conformance};
use shardflow_core::topology::Topology;

async fn client() -> Client {
    client_at("SHARDFLOW_S3_ENDPOINT").await
}

async fn client_at(var: &str) -> Client {
    let endpoint =
        std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run scripts/test.sh"));
    AwsConfig::emulator(endpoint)
        .static_credentials("S3RVER", "S3RVER")
        .s3_client()
        .await
}

async fn bucket(client: &Client) -> String {
    let name = format!("b-{}-{}", std::process::id(), rand::random::<u32>());
    client
        .create_bucket()
        .bucket(&name)
        .send()
        .await
        .expect("bucket");
    name
}

fn cx() -> SinkContext {
    SinkContext {
        topology: "t".into(),
        instance: "w".into(),
    }
}

fn pos(n: u128) -> RecordPosition {
    RecordPosition::new(SequenceNumber::from_u128(n))
}

fn records(range: std::ops::RangeInclusive<u128>) -> OutputBatch<u64> {
    OutputBatch {
        shard: ShardId::new("shard-0"),
        lease_epoch: LeaseEpoch::new(1, 1),
        outputs: range
            .map(|n| Output {
                id: OutputId::Record {
                    position: pos(n),
                    index: 0,
                },
                value: n as u64,
            })
            .collect(),
    }
}

async fn keys(client: &Client, bucket: &str) -> Vec<String> {
    let out = client
        .list_objects_v2()
        .bucket(bucket)
        .send()
        .await
        .unwrap();
    let mut keys: Vec<String> = out
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_owned))
        .collect();
    keys.sort();
    keys
}

/// The record values in every object, in key order.
async fn values(sink: &S3Sink<u64>) -> Vec<u64> {
    use shardflow_core::sink::InspectSink;
    sink.committed().await.unwrap().into_values().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_s3_sink_passes_the_sink_and_fencing_suites() {
    for endpoint in ["SHARDFLOW_S3_ENDPOINT", "SHARDFLOW_MOTO_S3_ENDPOINT"] {
        suites(client_at(endpoint).await).await;
    }
}

async fn suites(client: Client) {
    for gzip in [false, true] {
        sink_conformance(
            || {
                let client = client.clone();
                async move {
                    let b = bucket(&client).await;
                    S3Sink::<String>::json_lines(client, b, "out").gzip(gzip)
                }
            },
            |i| format!("value-{i}"),
        )
        .await;
    }
    fencing_sink_conformance(
        || {
            let client = client.clone();
            async move {
                let b = bucket(&client).await;
                S3Sink::<String>::json_lines(client, b, "out")
            }
        },
        |i| format!("value-{i}"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_cuts_the_same_objects_even_after_a_latency_cut() {
    let client = client().await;
    let b = bucket(&client).await;
    let sink = || S3Sink::<u64>::json_lines(client.clone(), &b, "p").records_per_object(10);
    let shard = ShardId::new("shard-0");

    // First run: 1..=25 gives objects 1-10 and 11-20 at once; 21-25 wait, held.
    let mut first = sink().open(&cx()).await.unwrap();
    first.write(records(1..=25)).await.unwrap();
    first.commit().await.unwrap();
    assert_eq!(
        first.held(),
        [(
            shard.clone(),
            Held {
                cuts: vec![pos(10), pos(20)],
                buffered: true
            }
        )]
    );
    assert_eq!(keys(&client, &b).await.len(), 2);
    // The latency bound then cuts 21-25 short.
    let mut first = {
        drop(first);
        let mut w = sink()
            .max_latency(Duration::ZERO)
            .open(&cx())
            .await
            .unwrap();
        w.write(records(21..=25)).await.unwrap();
        w
    };
    first.commit().await.unwrap();
    assert!(
        first.held().iter().all(|(_, h)| !h.buffered),
        "delivered within the latency bound"
    );

    // A replay from 11 (its checkpoint lagged) with more records available: same objects,
    // 21-25 ends where the stored one ended, then 26-30 starts a new one.
    let mut replay = sink().open(&cx()).await.unwrap();
    replay.write(records(11..=30)).await.unwrap();
    replay.commit().await.unwrap();
    assert_eq!(
        replay.held(),
        [(
            shard.clone(),
            Held {
                cuts: vec![pos(20), pos(25)],
                buffered: true
            }
        )],
        "the replay ends 11-20 and 21-25 where the stored objects ended"
    );
    replay.end_shard(&shard).await.unwrap();
    let stored = keys(&client, &b).await;
    let firsts: Vec<&str> = stored
        .iter()
        .map(|k| k.rsplit('/').next().unwrap().trim_start_matches('0'))
        .collect();
    assert_eq!(
        firsts,
        ["1-0.jsonl", "11-0.jsonl", "21-0.jsonl", "26-0.jsonl"],
        "{stored:?}"
    );
    assert!(stored[0].starts_with("p/t/shard-0/"), "{stored:?}");
    let mut got = values(&sink()).await;
    got.sort_unstable();
    assert_eq!(got, (1..=30).collect::<Vec<u64>>(), "every record once");
    let head = client
        .head_object()
        .bucket(&b)
        .key(&stored[2])
        .send()
        .await
        .unwrap();
    let meta = head.metadata().unwrap();
    assert_eq!(meta["first-sequence"], "21");
    assert_eq!(meta["last-sequence"], "25");
    assert_eq!(meta["records"], "5");
    assert_eq!(meta["lease-epoch"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_gzip_and_multipart_objects_hold_the_bytes_written() {
    let client = client().await;
    let b = bucket(&client).await;
    let sink = S3Sink::<Vec<u8>>::raw(client.clone(), &b, "raw")
        .gzip(true)
        .multipart_above(0);
    let mut writer = sink.open(&cx()).await.unwrap();
    // About 9 MiB of poorly compressible bytes: more than one 8 MiB part after gzip.
    let mut rng_state = 0x2545_f491_u64;
    let big: Vec<u8> = (0..9 * 1024 * 1024)
        .map(|_| {
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            rng_state as u8
        })
        .collect();
    let outputs = vec![
        Output {
            id: OutputId::Record {
                position: pos(1),
                index: 0,
            },
            value: b"first\n".to_vec(),
        },
        Output {
            id: OutputId::Record {
                position: pos(2),
                index: 0,
            },
            value: big.clone(),
        },
    ];
    writer
        .write(OutputBatch {
            shard: ShardId::new("s"),
            lease_epoch: LeaseEpoch::new(1, 3),
            outputs,
        })
        .await
        .unwrap();
    writer.end_shard(&ShardId::new("s")).await.unwrap();
    let stored = keys(&client, &b).await;
    assert_eq!(stored.len(), 1);
    assert!(stored[0].ends_with(".bin.gz"), "{stored:?}");
    let object = client
        .get_object()
        .bucket(&b)
        .key(&stored[0])
        .send()
        .await
        .unwrap();
    let compressed = object.body.collect().await.unwrap().into_bytes();
    assert!(compressed.len() > 8 * 1024 * 1024, "multipart sized");
    assert_eq!(
        writer.bytes_written(),
        compressed.len() as u64,
        "the writer counts the bytes it stored"
    );
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(&compressed[..])
        .read_to_end(&mut plain)
        .unwrap();
    let mut expected = b"first\n".to_vec();
    expected.extend_from_slice(&big);
    assert!(plain == expected, "the bytes, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_never_passes_a_record_whose_object_is_not_stored() {
    let client = client().await;
    let b = bucket(&client).await;
    let stream = MemoryStream::new("held", 1);
    for n in 0..20u64 {
        stream.push(0, n as i64, b"k", n.to_string().as_bytes());
    }
    let leases = Arc::new(MemoryLeaseStore::new());
    let sink = || {
        S3Sink::<u64>::json_lines(client.clone(), &b, "held")
            .records_per_object(7)
            .max_latency(Duration::from_secs(3600))
    };
    let topology = || {
        Topology::builder("held")
            .source(stream.clone().json::<u64>())
            .sink(sink())
            .build()
            .unwrap()
    };
    let config = RuntimeConfig {
        worker_id: "w".into(),
        parallelism: 1,
        checkpoint_interval: Duration::from_millis(20),
        idle_wait: Duration::from_millis(10),
        ..RuntimeConfig::default()
    };
    // A continuous run stores 1-7 and 8-14; 15-20 wait for more records or the latency bound.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(
        Runtime::new(topology(), leases.clone())
            .with_config(config.clone())
            .with_shutdown(shutdown.clone())
            .run(),
    );
    let lease = loop {
        let lease = leases.get(&lease_key("held", "shard-0")).await.unwrap();
        if let Some(l) = lease.filter(|l| l.checkpoint.committed != CheckpointPosition::Initial) {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    shutdown.cancel();
    run.await.unwrap().unwrap();
    let after = leases
        .get(&lease_key("held", "shard-0"))
        .await
        .unwrap()
        .unwrap();
    // Every path committed the 20 records, but the sink resumes after its last stored
    // object, and reading restarts early enough for it.
    let name = Sink::<u64>::name(&sink()).to_owned();
    for checkpoint in [&lease.checkpoint, &after.checkpoint] {
        assert_eq!(
            checkpoint.sinks.get(&name).unwrap_or(&checkpoint.committed),
            &CheckpointPosition::At(pos(14)),
            "the sink resumes after the last stored object, not the 20 records read: \
             {checkpoint:?}"
        );
        assert!(
            checkpoint.rebuild_from.le(&CheckpointPosition::At(pos(14))),
            "{checkpoint:?}"
        );
    }
    assert_eq!(
        (
            &after.checkpoint.committed,
            after.checkpoint.sinks.get(&name)
        ),
        (
            &CheckpointPosition::At(pos(20)),
            Some(&CheckpointPosition::At(pos(14)))
        ),
        "the shard's committed position and the sink's own, beside it"
    );
    assert_eq!(keys(&client, &b).await.len(), 2);

    // A bounded run resumes at 15 and stores the rest when it reaches the end of the input.
    Runtime::new(topology(), leases.clone())
        .with_config(RuntimeConfig {
            mode: RunMode::UntilCaughtUp,
            ..config
        })
        .run()
        .await
        .unwrap();
    let values: BTreeSet<u64> = values(&sink()).await.into_iter().collect();
    assert_eq!(values, (0..20).collect(), "every record, once");
    assert_eq!(keys(&client, &b).await.len(), 3);
}

/// The lease key of `shard` of the memory stream `stream` (created at time 0).
fn lease_key(stream: &str, shard: &str) -> String {
    shardflow_core::protocol::lease_keys::StreamScope::new(stream, 0).key(shard)
}

#[tokio::test]
async fn overflow_payloads_are_objects_named_by_position_and_a_replay_writes_them_again() {
    use shardflow_connectors::s3::S3PayloadStore;
    use shardflow_core::payload_store::PayloadStore;
    let client = client().await;
    let bucket = bucket(&client).await;
    let store = S3PayloadStore::new(client.clone(), &bucket, "/dead/");
    let name = "clicks/events/shardId-000000000001/4959-0";
    // Larger than a DynamoDB item: what an overflow store is for.
    let payload: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    store.put(name, &payload).await.unwrap();
    store.put(name, &payload).await.expect("a replay's put");
    assert_eq!(store.location(name), format!("s3://{bucket}/dead/{name}"));
    let got = client
        .get_object()
        .bucket(&bucket)
        .key(format!("dead/{name}"))
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    assert_eq!(got.as_ref(), payload.as_slice());
    // A bucket that is not there: an error that names the store and the operation.
    let missing = S3PayloadStore::new(client, format!("{bucket}-missing"), "");
    let error = missing.put(name, b"x").await.unwrap_err();
    assert_eq!(error.operation, "store a dead letter's payload");
    assert_eq!(error.sink, format!("s3:{bucket}-missing"));
}

/// The S3 state store passes the conformance suite against `endpoint_var`'s emulator, each
/// check in a fresh bucket, under a prefix.
async fn state_store_conformance_at(endpoint_var: &str) {
    use shardflow_connectors::s3::S3StateStore;
    let client = client_at(endpoint_var).await;
    shardflow_core::testing::state_store_conformance(|| {
        let client = client.clone();
        async move {
            let bucket = bucket(&client).await;
            S3StateStore::new(client, bucket, "/state/")
        }
    })
    .await;
}

#[tokio::test]
async fn the_state_store_passes_the_conformance_suite_on_s3rver() {
    state_store_conformance_at("SHARDFLOW_S3_ENDPOINT").await;
}

#[tokio::test]
async fn the_state_store_passes_the_conformance_suite_on_moto() {
    state_store_conformance_at("SHARDFLOW_MOTO_S3_ENDPOINT").await;
}
