//! Topologies over Kinesis, end to end against the emulators (started by scripts/test.sh):
//! every record processed once across a split and a merge, parents before children, and a
//! restart that resumes from the lease checkpoint.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shardflow::kinesis::{
    KinesisProducer, KinesisSource, ProducerConfig, SpoutConfig, StreamAdmin,
};
use shardflow::prelude::*;
use shardflow::AwsConfig;
use shardflow::{LeaseStore, MemoryLeaseStore, MemorySink};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Event {
    key: String,
    n: u64,
}

const EMULATORS: [(&str, &str); 2] = [
    ("kinesis-local", "SHARDFLOW_KINESIS_ENDPOINT"),
    ("kinesalite", "SHARDFLOW_KINESALITE_ENDPOINT"),
];

async fn clients() -> Vec<(&'static str, aws_sdk_kinesis::Client)> {
    let mut out = Vec::new();
    for (name, var) in EMULATORS {
        let endpoint = std::env::var(var).unwrap_or_else(|_| {
            panic!("{var} is not set: run scripts/test.sh, which starts the emulators")
        });
        out.push((name, AwsConfig::emulator(endpoint).kinesis_client().await));
    }
    out
}

fn stream_name(test: &str) -> String {
    format!("{test}-{}-{}", std::process::id(), rand::random::<u32>())
}

async fn produce(producer: &KinesisProducer, range: std::ops::Range<u64>) {
    let mut tickets = Vec::new();
    for n in range {
        let event = Event {
            key: format!("key-{}", n % 20),
            n,
        };
        let data = serde_json::to_vec(&event).unwrap();
        tickets.push(producer.send(&event.key, data).await.expect("send"));
    }
    producer.flush().await.expect("flush");
    for t in tickets {
        t.outcome().await.expect("written");
    }
}

fn bounded() -> RuntimeConfig {
    RuntimeConfig {
        worker_id: "kinesis-test".into(),
        parallelism: 2,
        mode: RunMode::UntilCaughtUp,
        checkpoint_interval: Duration::from_millis(50),
        shard_sync_interval: Duration::from_millis(100),
        ..RuntimeConfig::default()
    }
}

fn source(client: &aws_sdk_kinesis::Client, stream: &str) -> KinesisSource {
    let spout = SpoutConfig {
        idle_min: Duration::from_millis(20),
        idle_max: Duration::from_millis(50),
        ..SpoutConfig::default()
    };
    KinesisSource::new(client.clone(), stream).with_config(spout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_is_processed_once_across_a_split_and_a_merge_parents_first() {
    for (emulator, client) in clients().await {
        let stream = stream_name("reshard");
        let admin = StreamAdmin::new(client.clone());
        admin.create_stream(&stream, 2).await.expect("create");
        let config = ProducerConfig {
            ordered: true,
            linger: Duration::from_millis(20),
            aggregate_max_bytes: Some(2048),
            ..ProducerConfig::default()
        };
        let producer = KinesisProducer::new(client.clone(), &stream, config.clone())
            .await
            .expect("producer");
        produce(&producer, 0..200).await;
        let first = admin.list_shards(&stream).await.unwrap().remove(0);
        let mid = first.hash_key_range.0 / 2 + first.hash_key_range.1 / 2;
        admin
            .split_shard(&stream, &first.id, mid)
            .await
            .expect("split");
        // A new producer sees the new shard map (the old one would learn it on its own).
        let producer = KinesisProducer::new(client.clone(), &stream, config.clone())
            .await
            .expect("producer");
        produce(&producer, 200..400).await;
        let children: Vec<_> = admin
            .list_shards(&stream)
            .await
            .unwrap()
            .into_iter()
            .filter(|s| s.parents.contains(&first.id))
            .collect();
        admin
            .merge_shards(&stream, &children[0].id, &children[1].id)
            .await
            .expect("merge");
        let producer = KinesisProducer::new(client.clone(), &stream, config)
            .await
            .expect("producer");
        produce(&producer, 400..600).await;

        let order = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&order);
        let out = MemorySink::new("out");
        let topology = Topology::builder("reshard")
            .source(source(&client, &stream).json::<Event>())
            .inspect(move |e: &Event| seen.lock().unwrap().push((e.key.clone(), e.n)))
            .map(|e: Event| e.n)
            .sink(out.clone())
            .build()
            .unwrap();
        let leases = Arc::new(MemoryLeaseStore::new());
        let report = Runtime::new(topology, leases.clone())
            .with_config(bounded())
            .run()
            .await
            .expect("run");
        assert_eq!(
            report.shards_ended.len(),
            3,
            "{emulator}: the split parent and both merge parents ended"
        );
        assert!(
            leases.get(first.id.as_str()).await.unwrap().is_none(),
            "{emulator}: the split parent's lease is cleaned up once its children started"
        );

        let mut values: Vec<u64> = out.contents().into_values().collect();
        values.sort_unstable();
        assert_eq!(
            values,
            (0..600).collect::<Vec<_>>(),
            "{emulator}: every record exactly once"
        );
        // Per key, processing order is production order: a child never ran before its parent.
        let mut by_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for (key, n) in order.lock().unwrap().iter() {
            by_key.entry(key.clone()).or_default().push(*n);
        }
        for (key, ns) in by_key {
            let mut sorted = ns.clone();
            sorted.sort_unstable();
            assert_eq!(
                ns, sorted,
                "{emulator}: {key} processed in order across the reshards"
            );
        }

        // A second run cleans the merge parents' leases, leases no finished shard again and
        // repeats nothing.
        let again = MemorySink::new("again");
        let topology = Topology::builder("reshard")
            .source(source(&client, &stream).json::<Event>())
            .map(|e: Event| e.n)
            .sink(again.clone())
            .build()
            .unwrap();
        Runtime::new(topology, leases.clone())
            .with_config(bounded())
            .run()
            .await
            .expect("second run");
        assert!(again.contents().is_empty(), "{emulator}: nothing repeated");
        let mut left: Vec<String> = leases
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|l| shardflow::core::protocol::lease_keys::shard_id(&l.key).to_owned())
            .collect();
        left.sort();
        let mut open: Vec<String> = admin
            .list_shards(&stream)
            .await
            .unwrap()
            .into_iter()
            .filter(|s| !s.closed)
            .map(|s| s.id.as_str().to_owned())
            .collect();
        open.sort();
        assert_eq!(left, open, "{emulator}: only the open shards keep leases");
        admin.delete_stream(&stream).await.expect("delete");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_after_the_checkpoint_and_repeats_nothing() {
    for (emulator, client) in clients().await {
        let stream = stream_name("resume");
        let admin = StreamAdmin::new(client.clone());
        admin.create_stream(&stream, 2).await.expect("create");
        let config = ProducerConfig {
            linger: Duration::from_millis(20),
            aggregate_max_bytes: Some(1024),
            ..ProducerConfig::default()
        };
        let producer = KinesisProducer::new(client.clone(), &stream, config)
            .await
            .expect("producer");
        let leases = Arc::new(MemoryLeaseStore::new());
        let out = MemorySink::new("out");
        let run = |sink: MemorySink<u64>| {
            let topology = Topology::builder("resume")
                .source(source(&client, &stream).json::<Event>())
                .map(|e: Event| e.n)
                .sink(sink)
                .build()
                .unwrap();
            Runtime::new(topology, leases.clone())
                .with_config(bounded())
                .run()
        };
        produce(&producer, 0..150).await;
        run(out.clone()).await.expect("first run");
        assert_eq!(out.writes(), 150, "{emulator}");
        produce(&producer, 150..300).await;
        run(out.clone()).await.expect("second run");
        assert_eq!(
            out.writes(),
            300,
            "{emulator}: the second run wrote only the new records"
        );
        assert_eq!(out.replaced(), 0, "{emulator}: nothing written twice");
        assert_eq!(out.contents().len(), 300);
        admin.delete_stream(&stream).await.expect("delete");
    }
}
