//! Two writers of one S3 key, against moto's server (it enforces `If-None-Match` and `If-Match`;
//! s3rver ignores them): the second to store loses and is refused as fenced, whatever its epoch
//! and however long after its lookup it stores, for single and multipart objects; and a writer
//! whose reply was lost accepts its own earlier try instead of calling it a fence.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use aws_sdk_s3::Client;
use shardflow_connectors::s3::S3Sink;
use shardflow_connectors::AwsConfig;
use shardflow_core::lease::LeaseEpoch;
use shardflow_core::position::{RecordPosition, SequenceNumber, ShardId};
use shardflow_core::sink::{InspectSink, Output, OutputBatch, OutputId, Sink, SinkContext};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn endpoint() -> String {
    let var = "SHARDFLOW_MOTO_S3_ENDPOINT";
    std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run scripts/test.sh"))
}

async fn client_to(endpoint: String) -> Client {
    AwsConfig::emulator(endpoint)
        .static_credentials("moto", "moto")
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

fn cx(instance: &str) -> SinkContext {
    SinkContext {
        topology: "t".into(),
        instance: instance.into(),
    }
}

fn shard() -> ShardId {
    ShardId::new("shard-0")
}

/// Records `range` of shard-0, each output `value(n)`, written under `epoch`.
fn records<T>(
    epoch: u64,
    range: std::ops::RangeInclusive<u128>,
    value: impl Fn(u128) -> T,
) -> OutputBatch<T> {
    OutputBatch {
        shard: shard(),
        lease_epoch: LeaseEpoch::new(1, epoch),
        outputs: range
            .map(|n| Output {
                id: OutputId::Record {
                    position: RecordPosition::new(SequenceNumber::from_u128(n)),
                    index: 0,
                },
                value: value(n),
            })
            .collect(),
    }
}

/// The records object keys under the bucket.
async fn keys(client: &Client, bucket: &str) -> Vec<String> {
    let out = client
        .list_objects_v2()
        .bucket(bucket)
        .send()
        .await
        .expect("list");
    out.contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_owned))
        .collect()
}

/// Both writers look up the same first record (nothing stored there, or the same object), each
/// fills its own cut of the shard, and `first` stores before `second`: `second` must be refused
/// as fenced and `first`'s object must stay whole. Without conditional writes `second` silently
/// replaces it: records twice (a longer object over a shorter one whose successor exists) or
/// records lost (a shorter one over a longer one).
async fn race<T: Send + Sync + 'static>(
    sink: &S3Sink<T>,
    first: OutputBatch<T>,
    second: OutputBatch<T>,
) -> shardflow_core::error::SinkError {
    let mut a = sink.open(&cx("first")).await.expect("open");
    let mut b = sink.open(&cx("second")).await.expect("open");
    // `second` starts its object (and looks up the key) first, and stores it last.
    b.write(second)
        .await
        .expect("the later writer fills its object");
    a.write(first)
        .await
        .expect("the earlier writer fills its object");
    a.end_shard(&shard()).await.expect("the first store wins");
    b.end_shard(&shard())
        .await
        .expect_err("the second store of the key is refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owners_short_object_never_replaces_a_newer_owners_longer_one() {
    let client = client_to(endpoint()).await;
    let b = bucket(&client).await;
    let sink = S3Sink::<u64>::json_lines(client.clone(), &b, "out").records_per_object(100);
    // The stale owner (epoch 1) looked first and holds records 1-3 (its latency bound would
    // cut there); the new owner (epoch 2) stores 1-5 first.
    let refused = race(
        &sink,
        records(2, 1..=5, |n| n as u64),
        records(1, 1..=3, |n| n as u64),
    )
    .await;
    assert!(refused.is_fenced(), "refused as fenced: {refused}");
    let stored: Vec<u64> = sink
        .committed()
        .await
        .expect("read")
        .into_values()
        .collect();
    assert_eq!(stored, vec![1, 2, 3, 4, 5], "the newer object stays whole");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_owner_that_stores_second_is_fenced_too_and_its_replay_conforms() {
    let client = client_to(endpoint()).await;
    let b = bucket(&client).await;
    let sink = S3Sink::<u64>::json_lines(client.clone(), &b, "out").records_per_object(100);
    // The stale owner stores its short object 1-3 between the new owner's lookup and store.
    let refused = race(
        &sink,
        records(1, 1..=3, |n| n as u64),
        records(2, 1..=5, |n| n as u64),
    )
    .await;
    assert!(refused.is_fenced(), "refused as fenced: {refused}");
    // The new owner's shard restarts from its checkpoint: its replay ends the first object
    // where the stored one ends and goes on after it, so every record is stored once.
    let mut replay = sink.open(&cx("replay")).await.expect("open");
    replay
        .write(records(2, 1..=5, |n| n as u64))
        .await
        .expect("replay");
    replay.end_shard(&shard()).await.expect("replay stores");
    assert_eq!(keys(&client, &b).await.len(), 2, "objects 1-3 and 4-5");
    let stored: Vec<u64> = sink
        .committed()
        .await
        .expect("read")
        .into_values()
        .collect();
    assert_eq!(stored, vec![1, 2, 3, 4, 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_stores_only_over_the_object_it_read() {
    let client = client_to(endpoint()).await;
    let b = bucket(&client).await;
    let sink = S3Sink::<u64>::json_lines(client.clone(), &b, "out").records_per_object(100);
    // A crashed run left object 1-4; two owners replay over it (If-Match on its ETag).
    let mut crashed = sink.open(&cx("crashed")).await.expect("open");
    crashed
        .write(records(1, 1..=4, |n| n as u64))
        .await
        .expect("write");
    crashed.end_shard(&shard()).await.expect("store");
    let refused = race(
        &sink,
        records(3, 1..=4, |n| n as u64 * 10),
        records(2, 1..=4, |n| n as u64 * 100),
    )
    .await;
    assert!(refused.is_fenced(), "refused as fenced: {refused}");
    let stored: Vec<u64> = sink
        .committed()
        .await
        .expect("read")
        .into_values()
        .collect();
    assert_eq!(stored, vec![10, 20, 30, 40], "the first replacement stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multipart_object_is_stored_on_the_same_condition() {
    let client = client_to(endpoint()).await;
    let b = bucket(&client).await;
    // Three records of 3 MiB: objects of 9 MiB, uploaded in two parts.
    let sink = S3Sink::<Vec<u8>>::raw(client.clone(), &b, "raw").multipart_above(0);
    let big = |tag: u8| move |n: u128| vec![tag ^ n as u8; 3 * 1024 * 1024];
    let refused = race(
        &sink,
        records(2, 1..=3, big(b'n')),
        records(1, 1..=3, big(b's')),
    )
    .await;
    assert!(refused.is_fenced(), "refused as fenced: {refused}");
    let stored = keys(&client, &b).await;
    assert_eq!(stored.len(), 1);
    let object = client
        .get_object()
        .bucket(&b)
        .key(&stored[0])
        .send()
        .await
        .expect("get");
    let bytes = object.body.collect().await.expect("body").into_bytes();
    assert_eq!(bytes.len(), 9 * 1024 * 1024);
    assert_eq!(bytes[0], b'n' ^ 1, "the first store's object stays");
}

/// A loopback proxy to `upstream` that lets the first PUT request through and then closes the
/// connection instead of passing its reply on: the object is stored, and its writer never
/// hears so. Counts the PUT requests it sees.
async fn reply_losing_proxy(upstream: String) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = format!("http://{}", listener.local_addr().expect("address"));
    let upstream = upstream.trim_start_matches("http://").to_owned();
    let puts = Arc::new(AtomicUsize::new(0));
    let armed = Arc::new(AtomicBool::new(true));
    let seen = Arc::clone(&puts);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = TcpStream::connect(&upstream).await.expect("upstream");
            let (puts, armed) = (Arc::clone(&seen), Arc::clone(&armed));
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let lose = Arc::new(AtomicBool::new(false));
                let lose_reply = Arc::clone(&lose);
                let requests = tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match client_read.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        // The client sends a request only after the previous reply arrived,
                        // so a read that starts with a method starts a request.
                        if buf[..n].starts_with(b"PUT ") {
                            puts.fetch_add(1, Ordering::SeqCst);
                            if armed.swap(false, Ordering::SeqCst) {
                                lose.store(true, Ordering::SeqCst);
                            }
                        }
                        if server_write.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match server_read.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if lose_reply.load(Ordering::SeqCst) {
                        break;
                    }
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                requests.abort();
            });
        }
    });
    (address, puts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_lost_reply_accepts_the_writers_own_object() {
    let direct = client_to(endpoint()).await;
    let b = bucket(&direct).await;
    let (proxy, puts) = reply_losing_proxy(endpoint()).await;
    let sink = S3Sink::<u64>::json_lines(client_to(proxy).await, &b, "out");
    let mut writer = sink.open(&cx("w")).await.expect("open");
    writer
        .write(records(1, 1..=3, |n| n as u64))
        .await
        .expect("write");
    writer
        .end_shard(&shard())
        .await
        .expect("the writer's own earlier try is not a fence");
    assert!(
        puts.load(Ordering::SeqCst) >= 2,
        "the PUT was tried again after its reply was lost"
    );
    let stored: Vec<u64> = sink
        .committed()
        .await
        .expect("read")
        .into_values()
        .collect();
    assert_eq!(stored, vec![1, 2, 3]);
    assert_eq!(keys(&direct, &b).await.len(), 1);
}
