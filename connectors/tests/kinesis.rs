//! The Kinesis spout and stream administration against real emulators on loopback:
//! kinesis-local (the kinesis-mock engine) and kinesalite, started by `scripts/test.sh`.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use aws_sdk_kinesis::Client;
use shardflow_connectors::kinesis::aggregation::{AggregateBuilder, UserRecord};
use shardflow_connectors::kinesis::{KinesisSource, SpoutConfig, StreamAdmin};
use shardflow_connectors::AwsConfig;
use shardflow_core::position::{RecordPosition, ShardInfo, StartPosition};
use shardflow_core::source::{ReadLimits, ShardStatus, Source};

/// The emulators to run each test against: (name, endpoint variable).
const EMULATORS: [(&str, &str); 2] = [
    ("kinesis-local", "SHARDFLOW_KINESIS_ENDPOINT"),
    ("kinesalite", "SHARDFLOW_KINESALITE_ENDPOINT"),
];

async fn clients() -> Vec<(&'static str, Client)> {
    let mut out = Vec::new();
    for (name, var) in EMULATORS {
        let endpoint = std::env::var(var).unwrap_or_else(|_| {
            panic!("{var} is not set: run scripts/test.sh, which starts the emulators")
        });
        out.push((name, AwsConfig::emulator(endpoint).kinesis_client().await));
    }
    out
}

/// A stream name unique to this test run and emulator.
fn stream_name(test: &str) -> String {
    format!("{test}-{}-{}", std::process::id(), rand::random::<u32>())
}

async fn put(client: &Client, stream: &str, records: &[(String, Vec<u8>)]) {
    for chunk in records.chunks(500) {
        let entries = chunk
            .iter()
            .map(|(key, data)| {
                PutRecordsRequestEntry::builder()
                    .partition_key(key)
                    .data(Blob::new(data.clone()))
                    .build()
                    .expect("entry")
            })
            .collect();
        let out = client
            .put_records()
            .stream_name(stream)
            .set_records(Some(entries))
            .send()
            .await
            .expect("put records");
        assert_eq!(out.failed_record_count(), Some(0));
    }
}

fn fast() -> SpoutConfig {
    SpoutConfig {
        idle_min: Duration::from_millis(20),
        idle_max: Duration::from_millis(50),
        ..SpoutConfig::default()
    }
}

/// Reads a shard from `start` until the spout reports caught up or shard end.
async fn drain(
    source: &KinesisSource,
    shard: &ShardInfo,
    start: StartPosition,
) -> (Vec<(RecordPosition, Vec<u8>)>, ShardStatus) {
    let mut reader = source
        .open_shard(shard, start, ReadLimits::default())
        .await
        .expect("open");
    let mut out = Vec::new();
    for _ in 0..500 {
        let batch = reader.read().await.expect("read");
        for r in batch.records.iter() {
            out.push((r.position.clone(), r.data.to_vec()));
        }
        if batch.status != ShardStatus::More {
            return (out, batch.status);
        }
    }
    panic!("shard {} never caught up", shard.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spout_reads_every_record_in_order_per_shard() {
    for (emulator, client) in clients().await {
        let stream = stream_name("order");
        let admin = StreamAdmin::new(client.clone());
        admin.create_stream(&stream, 2).await.expect("create");
        let records: Vec<(String, Vec<u8>)> = (0..120)
            .map(|i| (format!("key-{}", i % 7), format!("{i}").into_bytes()))
            .collect();
        put(&client, &stream, &records).await;

        let source = KinesisSource::new(client.clone(), &stream).with_config(fast());
        let shards = source.list_shards().await.expect("shards");
        assert_eq!(shards.len(), 2, "{emulator}");
        let mut seen = Vec::new();
        for shard in &shards {
            let (read, status) = drain(&source, shard, StartPosition::TrimHorizon).await;
            assert_eq!(status, ShardStatus::CaughtUp, "{emulator}");
            let positions: Vec<_> = read.iter().map(|(p, _)| p.clone()).collect();
            let mut sorted = positions.clone();
            sorted.sort();
            assert_eq!(positions, sorted, "{emulator}: in sequence order");
            // Within a shard, each key's records keep the order they were put in.
            let mut by_key: BTreeMap<String, Vec<u32>> = BTreeMap::new();
            for (_, data) in &read {
                let i: u32 = String::from_utf8_lossy(data).parse().expect("number");
                by_key.entry(format!("key-{}", i % 7)).or_default().push(i);
            }
            for (key, values) in by_key {
                let mut sorted = values.clone();
                sorted.sort_unstable();
                assert_eq!(values, sorted, "{emulator}: per-key order of {key}");
            }
            seen.extend(read.into_iter().map(|(_, d)| d));
        }
        seen.sort();
        let mut expected: Vec<Vec<u8>> = records.into_iter().map(|(_, d)| d).collect();
        expected.sort();
        assert_eq!(seen, expected, "{emulator}: every record exactly once");
        admin.delete_stream(&stream).await.expect("delete");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregated_records_are_split_and_resume_at_a_sub_sequence() {
    for (emulator, client) in clients().await {
        let stream = stream_name("agg");
        let admin = StreamAdmin::new(client.clone());
        admin.create_stream(&stream, 1).await.expect("create");
        let mut builder = AggregateBuilder::new();
        for i in 0..50 {
            builder.add(UserRecord {
                partition_key: format!("user-{i}"),
                explicit_hash_key: None,
                data: format!("u{i}").into_bytes(),
            });
        }
        let aggregate = builder.finish();
        let records = vec![
            ("plain".to_owned(), b"before".to_vec()),
            ("agg".to_owned(), aggregate),
            ("plain".to_owned(), b"after".to_vec()),
        ];
        put(&client, &stream, &records).await;

        let source = KinesisSource::new(client.clone(), &stream).with_config(fast());
        let shard = source.list_shards().await.expect("shards").remove(0);
        let (read, _) = drain(&source, &shard, StartPosition::TrimHorizon).await;
        assert_eq!(read.len(), 52, "{emulator}: 1 + 50 + 1 user records");
        let subs: Vec<u32> = read[1..51].iter().map(|(p, _)| p.sub_sequence).collect();
        assert_eq!(subs, (0..50).collect::<Vec<_>>(), "{emulator}");
        assert_eq!(read[25].1, b"u24");

        // Resume after user record 24 of the aggregate: 25..49 and the plain record follow.
        let checkpoint = read[25].0.clone();
        let (resumed, _) = drain(&source, &shard, StartPosition::After(checkpoint)).await;
        let data: Vec<Vec<u8>> = resumed.into_iter().map(|(_, d)| d).collect();
        let mut expected: Vec<Vec<u8>> = (25..50).map(|i| format!("u{i}").into_bytes()).collect();
        expected.push(b"after".to_vec());
        assert_eq!(data, expected, "{emulator}");
        admin.delete_stream(&stream).await.expect("delete");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_aggregate_is_delivered_as_a_fault_not_dropped() {
    for (emulator, client) in clients().await {
        let stream = stream_name("corrupt");
        let admin = StreamAdmin::new(client.clone());
        admin.create_stream(&stream, 1).await.expect("create");
        let mut builder = AggregateBuilder::new();
        builder.add(UserRecord {
            partition_key: "k".into(),
            explicit_hash_key: None,
            data: b"x".to_vec(),
        });
        let mut corrupt = builder.finish();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xFF; // break the digest
        put(&client, &stream, &[("k".to_owned(), corrupt.clone())]).await;

        let source = KinesisSource::new(client.clone(), &stream).with_config(fast());
        let shard = source.list_shards().await.expect("shards").remove(0);
        let mut reader = source
            .open_shard(&shard, StartPosition::TrimHorizon, ReadLimits::default())
            .await
            .unwrap();
        let mut found = None;
        for _ in 0..100 {
            let batch = reader.read().await.expect("read");
            if !batch.records.is_empty() {
                found = Some((
                    batch.records.fault(0).map(str::to_owned),
                    batch.records.get(0).data.to_vec(),
                ));
                break;
            }
        }
        let (fault, data) = found.expect("the record is delivered");
        assert!(
            fault.expect("marked as a fault").contains("MD5"),
            "{emulator}"
        );
        assert_eq!(
            data, corrupt,
            "{emulator}: the original bytes, for the dead letter"
        );
        admin.delete_stream(&stream).await.expect("delete");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_split_the_parent_ends_and_its_children_name_it() {
    for (emulator, client) in clients().await {
        let stream = stream_name("split");
        let admin = StreamAdmin::new(client.clone());
        admin.create_stream(&stream, 1).await.expect("create");
        put(
            &client,
            &stream,
            &(0..20)
                .map(|i| (format!("k{i}"), vec![i as u8]))
                .collect::<Vec<_>>(),
        )
        .await;
        let parent = admin.list_shards(&stream).await.expect("shards").remove(0);
        admin
            .split_shard(&stream, &parent.id, 1u128 << 127)
            .await
            .expect("split");
        put(
            &client,
            &stream,
            &(20..40)
                .map(|i| (format!("k{i}"), vec![i as u8]))
                .collect::<Vec<_>>(),
        )
        .await;

        let shards = admin.list_shards(&stream).await.expect("shards");
        assert_eq!(shards.len(), 3, "{emulator}: parent and two children");
        let children: Vec<_> = shards
            .iter()
            .filter(|s| s.parents.contains(&parent.id))
            .collect();
        assert_eq!(children.len(), 2, "{emulator}");
        let closed_parent = shards
            .iter()
            .find(|s| s.id == parent.id)
            .expect("parent listed");
        assert!(closed_parent.closed, "{emulator}: the parent is closed");

        let source = KinesisSource::new(client.clone(), &stream).with_config(fast());
        let (parent_records, status) =
            drain(&source, closed_parent, StartPosition::TrimHorizon).await;
        assert_eq!(
            status,
            ShardStatus::Ended,
            "{emulator}: the parent's reader reaches its end"
        );
        assert_eq!(parent_records.len(), 20, "{emulator}");
        let mut child_records = 0;
        for child in children {
            child_records += drain(&source, child, StartPosition::TrimHorizon)
                .await
                .0
                .len();
        }
        assert_eq!(child_records, 20, "{emulator}");
        admin.delete_stream(&stream).await.expect("delete");
    }
}

mod producer {
    use super::*;
    use shardflow_connectors::kinesis::{KinesisProducer, ProducerConfig, ProducerError};

    async fn read_all(client: &Client, stream: &str) -> Vec<(String, Vec<u8>, RecordPosition)> {
        let source = KinesisSource::new(client.clone(), stream).with_config(fast());
        let mut out = Vec::new();
        for shard in source.list_shards().await.expect("shards") {
            let mut reader = source
                .open_shard(&shard, StartPosition::TrimHorizon, ReadLimits::default())
                .await
                .expect("open");
            for _ in 0..500 {
                let batch = reader.read().await.expect("read");
                for r in batch.records.iter() {
                    out.push((
                        String::from_utf8_lossy(r.partition_key).into_owned(),
                        r.data.to_vec(),
                        r.position.clone(),
                    ));
                }
                if batch.status != ShardStatus::More {
                    break;
                }
            }
        }
        out
    }

    /// Produces `n` records over 10 keys; returns what was sent, in order.
    async fn produce(producer: &KinesisProducer, n: usize) -> Vec<(String, Vec<u8>)> {
        let mut sent = Vec::new();
        let mut tickets = Vec::new();
        for i in 0..n {
            let key = format!("key-{}", i % 10);
            let data = format!("{key}:{i}").into_bytes();
            tickets.push(producer.send(&key, data.clone()).await.expect("send"));
            sent.push((key, data));
        }
        producer.flush().await.expect("flush");
        for t in tickets {
            t.outcome().await.expect("written");
        }
        sent
    }

    fn assert_read_back(
        emulator: &str,
        sent: &[(String, Vec<u8>)],
        read: &[(String, Vec<u8>, RecordPosition)],
    ) {
        let mut got: Vec<Vec<u8>> = read.iter().map(|(_, d, _)| d.clone()).collect();
        got.sort();
        let mut want: Vec<Vec<u8>> = sent.iter().map(|(_, d)| d.clone()).collect();
        want.sort();
        assert_eq!(got, want, "{emulator}: every record exactly once");
        // Per key, records come back in the order they were sent.
        let mut by_key: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for (key, data, _) in read {
            let i: u64 = String::from_utf8_lossy(data)
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            by_key.entry(key.as_str()).or_default().push(i);
        }
        for (key, values) in by_key {
            let mut sorted = values.clone();
            sorted.sort_unstable();
            assert_eq!(values, sorted, "{emulator}: order of {key}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plain_records_are_all_written_in_order_per_key() {
        for (emulator, client) in clients().await {
            let stream = stream_name("produce");
            let admin = StreamAdmin::new(client.clone());
            admin.create_stream(&stream, 2).await.expect("create");
            let config = ProducerConfig {
                ordered: true,
                linger: Duration::from_millis(20),
                ..ProducerConfig::default()
            };
            let producer = KinesisProducer::new(client.clone(), &stream, config)
                .await
                .expect("producer");
            let sent = produce(&producer, 600).await;
            let read = read_all(&client, &stream).await;
            assert_read_back(emulator, &sent, &read);
            assert!(
                read.iter().all(|(_, _, p)| p.sub_sequence == 0),
                "{emulator}: not aggregated"
            );
            assert_eq!(producer.metrics().user_records(), 600);
            admin.delete_stream(&stream).await.expect("delete");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn aggregated_records_are_read_back_as_their_user_records() {
        for (emulator, client) in clients().await {
            let stream = stream_name("aggregate");
            let admin = StreamAdmin::new(client.clone());
            admin.create_stream(&stream, 2).await.expect("create");
            let config = ProducerConfig {
                ordered: true,
                linger: Duration::from_millis(50),
                aggregate_max_bytes: Some(4096),
                ..ProducerConfig::default()
            };
            let producer = KinesisProducer::new(client.clone(), &stream, config)
                .await
                .expect("producer");
            let sent = produce(&producer, 2000).await;
            let read = read_all(&client, &stream).await;
            assert_read_back(emulator, &sent, &read);
            let kinesis_records = producer.metrics().kinesis_records();
            assert!(
                kinesis_records < 100,
                "{emulator}: 2000 small records in few aggregates, got {kinesis_records}"
            );
            assert!(
                read.iter().any(|(_, _, p)| p.sub_sequence > 0),
                "{emulator}: aggregated"
            );
            let fill = producer.metrics().mean_fill_ratio();
            assert!(
                fill > 0.5,
                "{emulator}: aggregates mostly full, fill {fill}"
            );
            admin.delete_stream(&stream).await.expect("delete");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_records_are_rejected_before_any_request() {
        let (_, client) = clients().await.remove(0);
        let stream = stream_name("reject");
        let admin = StreamAdmin::new(client.clone());
        admin.create_stream(&stream, 1).await.expect("create");
        let producer = KinesisProducer::new(client.clone(), &stream, ProducerConfig::default())
            .await
            .expect("producer");
        let too_big = vec![0u8; 1024 * 1024];
        assert!(matches!(
            producer.send("k", too_big).await,
            Err(ProducerError::RecordTooLarge {
                size: 1_048_577,
                limit: 1_048_576
            })
        ));
        assert!(matches!(
            producer.send("", b"x".to_vec()).await,
            Err(ProducerError::InvalidPartitionKey { chars: 0 })
        ));
        let long_key = "k".repeat(257);
        assert!(matches!(
            producer.send(&long_key, b"x".to_vec()).await,
            Err(ProducerError::InvalidPartitionKey { chars: 257 })
        ));
        producer.flush().await.expect("flush");
        assert_eq!(producer.metrics().kinesis_records(), 0);
        assert!(
            read_all(&client, &stream).await.is_empty(),
            "nothing was written"
        );
        admin.delete_stream(&stream).await.expect("delete");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_record_hashed_outside_its_shard_is_delivered_and_counted() {
    use shardflow_connectors::kinesis::SpoutMetrics;
    for (emulator, client) in clients().await {
        let stream = stream_name("ehk");
        let admin = StreamAdmin::new(client.clone());
        admin.create_stream(&stream, 2).await.expect("create");
        let shards = admin.list_shards(&stream).await.expect("shards");
        let (low, high) = (&shards[0], &shards[1]);
        let mut builder = AggregateBuilder::new();
        builder.add(UserRecord {
            partition_key: "in".into(),
            explicit_hash_key: Some(low.hash_key_range.0.to_string()),
            data: b"in".to_vec(),
        });
        builder.add(UserRecord {
            partition_key: "out".into(),
            explicit_hash_key: Some(high.hash_key_range.1.to_string()),
            data: b"out".to_vec(),
        });
        client
            .put_record()
            .stream_name(&stream)
            .partition_key("agg")
            .explicit_hash_key(low.hash_key_range.0.to_string())
            .data(Blob::new(builder.finish()))
            .send()
            .await
            .expect("put");
        let metrics = SpoutMetrics::unregistered();
        let source = KinesisSource::new(client.clone(), &stream)
            .with_config(fast())
            .with_metrics(metrics.clone());
        let (read, _) = drain(&source, low, StartPosition::TrimHorizon).await;
        let data: Vec<Vec<u8>> = read.into_iter().map(|(_, d)| d).collect();
        assert_eq!(
            data,
            [b"in".to_vec(), b"out".to_vec()],
            "{emulator}: both delivered"
        );
        assert_eq!(
            metrics.outside_range_count(&stream, low.id.as_str()),
            1,
            "{emulator}"
        );
        admin.delete_stream(&stream).await.expect("delete");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_and_timestamp_start_positions_skip_older_records() {
    for (emulator, client) in clients().await {
        let stream = stream_name("positions");
        let admin = StreamAdmin::new(client.clone());
        admin.create_stream(&stream, 1).await.expect("create");
        put(&client, &stream, &[("k".to_owned(), b"old".to_vec())]).await;
        let source = KinesisSource::new(client.clone(), &stream).with_config(fast());
        let shard = source.list_shards().await.expect("shards").remove(0);
        let (all, _) = drain(&source, &shard, StartPosition::TrimHorizon).await;
        assert_eq!(all.len(), 1, "{emulator}");
        // The old record's arrival by the emulator's own clock: a cut taken from the host's
        // clock may lie ahead of the emulator's ("Timestamp cannot be in the future").
        let mut reader = source
            .open_shard(&shard, StartPosition::TrimHorizon, ReadLimits::default())
            .await
            .expect("open");
        let mut old_arrival = None;
        for _ in 0..100 {
            let batch = reader.read().await.expect("read");
            old_arrival = batch.records.iter().next().map(|r| r.arrival_ms);
            if old_arrival.is_some() {
                break;
            }
        }
        let old_arrival = old_arrival.expect("the old record is read back");
        // LATEST: only what arrives after the reader starts.
        let mut latest = source
            .open_shard(&shard, StartPosition::Latest, ReadLimits::default())
            .await
            .unwrap();
        let first = latest.read().await.expect("read");
        assert!(
            first.records.is_empty(),
            "{emulator}: nothing old from LATEST"
        );
        // Arrival timestamps have second precision on some emulators: leave a clear gap, and
        // cut a second after the old record's arrival (in the emulator's past by then).
        tokio::time::sleep(Duration::from_millis(2200)).await;
        let cut = old_arrival + 1000;
        put(&client, &stream, &[("k".to_owned(), b"new".to_vec())]).await;
        let mut got = Vec::new();
        for _ in 0..100 {
            let batch = latest.read().await.expect("read");
            got.extend(batch.records.iter().map(|r| r.data.to_vec()));
            if !got.is_empty() {
                break;
            }
        }
        assert_eq!(
            got,
            [b"new".to_vec()],
            "{emulator}: LATEST sees the new record"
        );
        let (since, _) = drain(&source, &shard, StartPosition::AtTimestamp(cut)).await;
        let since: Vec<Vec<u8>> = since.into_iter().map(|(_, d)| d).collect();
        assert_eq!(
            since,
            [b"new".to_vec()],
            "{emulator}: AT_TIMESTAMP skips the old record"
        );
        admin.delete_stream(&stream).await.expect("delete");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_and_retention_changes_take_effect() {
    let (emulator, client) = clients().await.remove(0);
    let stream = stream_name("scale");
    let admin = StreamAdmin::new(client.clone());
    admin.create_stream(&stream, 2).await.expect("create");
    admin
        .update_shard_count(&stream, 4)
        .await
        .expect("scale up");
    assert_eq!(
        admin.describe(&stream).await.unwrap().open_shards,
        4,
        "{emulator}"
    );
    admin
        .set_retention(&stream, 48)
        .await
        .expect("increase retention");
    assert_eq!(
        admin.describe(&stream).await.unwrap().retention_hours,
        48,
        "{emulator}"
    );
    admin
        .set_retention(&stream, 24)
        .await
        .expect("decrease retention");
    assert_eq!(
        admin.describe(&stream).await.unwrap().retention_hours,
        24,
        "{emulator}"
    );
    admin.delete_stream(&stream).await.expect("delete");
}

/// Against kinesis-local with its clock 100 times faster (libfaketime), so that a shard iterator
/// expires after 3 s instead of 5 minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iterator_that_expires_while_the_pipeline_is_slow_is_renewed_without_loss() {
    use shardflow_connectors::kinesis::SpoutMetrics;
    let var = "SHARDFLOW_KINESIS_FAST_CLOCK_ENDPOINT";
    let endpoint =
        std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run scripts/test.sh"));
    let client = AwsConfig::emulator(endpoint).kinesis_client().await;
    let stream = stream_name("expiry");
    let admin = StreamAdmin::new(client.clone());
    admin.create_stream(&stream, 1).await.expect("create");
    let records: Vec<(String, Vec<u8>)> = (0..30u8).map(|i| ("k".to_owned(), vec![i])).collect();
    put(&client, &stream, &records).await;

    // Five records per call and a one-batch queue: the prefetch task holds its next iterator
    // while the pipeline does not read.
    let metrics = SpoutMetrics::unregistered();
    let config = SpoutConfig {
        queue_batches: 1,
        ..fast()
    };
    let source = KinesisSource::new(client.clone(), &stream)
        .with_config(config)
        .with_metrics(metrics.clone());
    let shard = source.list_shards().await.expect("shards").remove(0);
    let limits = ReadLimits {
        max_records: 5,
        max_bytes: 1 << 20,
    };
    let mut reader = source
        .open_shard(&shard, StartPosition::TrimHorizon, limits)
        .await
        .expect("open");
    let mut got: Vec<u8> = reader
        .read()
        .await
        .expect("read")
        .records
        .iter()
        .map(|r| r.data[0])
        .collect();
    // A slow pipeline: 5 s here is over 8 minutes on the emulator's clock, past the 5-minute expiry.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for _ in 0..100 {
        let batch = reader.read().await.expect("read");
        got.extend(batch.records.iter().map(|r| r.data[0]));
        if batch.status != ShardStatus::More {
            break;
        }
    }
    assert_eq!(
        got,
        (0..30).collect::<Vec<u8>>(),
        "every record once, in order"
    );
    assert!(
        metrics.expired_count(&stream, shard.id.as_str()) >= 1,
        "the iterator expired and was renewed"
    );
    admin.delete_stream(&stream).await.expect("delete");
}

/// Issue 13: listing a stream that does not exist yet is `StreamNotFound` (the runtime waits
/// for a stream it never listed), on kinesis-local and kinesalite alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_a_stream_not_created_yet_is_stream_not_found() {
    for (emulator, client) in clients().await {
        let source = KinesisSource::new(client, stream_name("never-created"));
        let error = source.list_shards().await.expect_err("no such stream");
        assert!(
            matches!(
                error,
                shardflow_core::error::SourceError::StreamNotFound { .. }
            ),
            "{emulator}: {error:?}"
        );
    }
}
