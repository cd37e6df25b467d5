//! `DynamoSink` against dynalite (started by scripts/test.sh): the sink and fencing conformance
//! suites in both write modes, oversized items refused with a clear error; and, with scripted
//! SDK responses, throttled puts retried and unprocessed batch items re-sent.

use std::time::Duration;

use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::operation::batch_write_item::BatchWriteItemOutput;
use aws_sdk_dynamodb::operation::describe_table::DescribeTableOutput;
use aws_sdk_dynamodb::operation::put_item::{PutItemError, PutItemOutput};
use aws_sdk_dynamodb::types::error::ProvisionedThroughputExceededException;
use aws_sdk_dynamodb::types::{
    AttributeValue, PutRequest, TableDescription, TableStatus, WriteRequest,
};
use aws_sdk_dynamodb::Client;
use aws_smithy_mocks::{mock, mock_client, RuleMode};
use serde::{Deserialize, Serialize};
use shardflow_connectors::dynamodb::{DynamoSink, DynamoSinkError, DynamoWriteMode};
use shardflow_connectors::AwsConfig;
use shardflow_core::lease::LeaseEpoch;
use shardflow_core::position::ShardId;
use shardflow_core::sink::{Output, OutputBatch, OutputId, Sink, SinkContext, Window};
use shardflow_core::testing::{fencing_sink_conformance, sink_conformance};

async fn client() -> Client {
    let var = "SHARDFLOW_DYNAMODB_ENDPOINT";
    let endpoint =
        std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run scripts/test.sh"));
    AwsConfig::emulator(endpoint).dynamodb_client().await
}

fn table(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), rand::random::<u32>())
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Stats {
    campaign: String,
    clicks: u64,
    ctr: f64,
    tags: Vec<String>,
}

fn stats(i: u64) -> Stats {
    Stats {
        campaign: format!("c-{i}"),
        clicks: i,
        ctr: i as f64 / 8.0,
        tags: vec!["a".into(), format!("t{i}")],
    }
}

fn cx() -> SinkContext {
    SinkContext {
        topology: "t".into(),
        instance: "w".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dynamodb_sink_passes_the_sink_and_fencing_suites_in_both_modes() {
    let client = client().await;
    for mode in [DynamoWriteMode::default(), DynamoWriteMode::Batch] {
        let make = || {
            let client = client.clone();
            async move {
                DynamoSink::<Stats>::open(client, table("sink"))
                    .await
                    .expect("table")
                    .mode(mode)
            }
        };
        sink_conformance(make, stats).await;
    }
    fencing_sink_conformance(
        || {
            let client = client.clone();
            async move {
                DynamoSink::<Stats>::open(client, table("fenced"))
                    .await
                    .expect("table")
            }
        },
        stats,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_results_are_items_a_user_can_query_by_key_and_window() {
    let client = client().await;
    let name = table("layout");
    let sink = DynamoSink::<Stats>::open(client.clone(), &name)
        .await
        .expect("table");
    let mut writer = sink.open(&cx()).await.unwrap();
    writer
        .write(OutputBatch {
            shard: ShardId::new("shardId-000000000003"),
            lease_epoch: LeaseEpoch::new(1, 7),
            outputs: vec![Output {
                id: OutputId::Keyed {
                    key: "c-1".into(),
                    window: Some(Window::new(60_000, 120_000)),
                    index: 0,
                },
                value: stats(3),
            }],
        })
        .await
        .unwrap();
    writer.commit().await.unwrap();
    let bytes = writer.bytes_written();
    assert!(
        (100..1_000).contains(&bytes),
        "one item of a few hundred bytes counted: {bytes}"
    );
    let item = client
        .get_item()
        .table_name(&name)
        .key(
            "id",
            AttributeValue::S(
                "t/shardId-000000000003/w/00000000000000060000-00000000000000120000/c-1".into(),
            ),
        )
        .send()
        .await
        .unwrap()
        .item
        .expect("the item, under its identity");
    let n = |k: &str| item[k].as_n().unwrap().clone();
    assert_eq!(item["key"].as_s().unwrap(), "c-1");
    assert_eq!(n("windowStart"), "60000");
    assert_eq!(n("windowEnd"), "120000");
    assert_eq!(n("leaseEpoch"), "7");
    let value = item["value"].as_m().unwrap();
    assert_eq!(value["clicks"].as_n().unwrap(), "3");
    assert_eq!(value["campaign"].as_s().unwrap(), "c-3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_over_400_kb_is_refused_at_write_with_a_clear_error() {
    let sink = DynamoSink::<String>::open(client().await, table("big"))
        .await
        .expect("table");
    let mut writer = sink.open(&cx()).await.unwrap();
    let err = writer
        .write(OutputBatch {
            shard: ShardId::new("s"),
            lease_epoch: LeaseEpoch::new(1, 1),
            outputs: vec![Output {
                id: OutputId::Keyed {
                    key: "k".into(),
                    window: None,
                    index: 0,
                },
                value: "x".repeat(410 * 1024),
            }],
        })
        .await
        .expect_err("too large");
    assert!(!err.retryable);
    assert!(
        matches!(
            err.source.downcast_ref::<DynamoSinkError>(),
            Some(DynamoSinkError::ItemTooLarge { .. })
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("t/s/k/<key: 1 bytes>"),
        "names the item, not its key: {err}"
    );
    writer.commit().await.expect("nothing was buffered");
    use shardflow_core::sink::InspectSink;
    assert!(sink.committed().await.unwrap().is_empty());
}

fn active_table() -> DescribeTableOutput {
    DescribeTableOutput::builder()
        .table(
            TableDescription::builder()
                .table_status(TableStatus::Active)
                .build(),
        )
        .build()
}

fn one_output(key: &str) -> OutputBatch<u64> {
    OutputBatch {
        shard: ShardId::new("s"),
        lease_epoch: LeaseEpoch::new(1, 1),
        outputs: vec![Output {
            id: OutputId::Keyed {
                key: key.into(),
                window: None,
                index: 0,
            },
            value: 1,
        }],
    }
}

#[tokio::test]
async fn throttled_puts_are_retried_with_backoff() {
    let describe = mock!(Client::describe_table).then_output(active_table);
    let put = mock!(Client::put_item)
        .sequence()
        .error(|| {
            PutItemError::ProvisionedThroughputExceededException(
                ProvisionedThroughputExceededException::builder()
                    .message("slow down")
                    .build(),
            )
        })
        .times(2)
        .output(|| PutItemOutput::builder().build())
        .build();
    let client = mock_client!(
        aws_sdk_dynamodb,
        RuleMode::MatchAny,
        &[&describe, &put],
        |b| b.retry_config(RetryConfig::disabled())
    );
    let sink = DynamoSink::<u64>::open(client, "mocked").await.unwrap();
    let mut writer = sink.open(&cx()).await.unwrap();
    writer.write(one_output("k")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), writer.commit())
        .await
        .expect("bounded")
        .expect("written after two throttles");
    assert_eq!(put.num_calls(), 3);
}

#[tokio::test]
async fn unprocessed_batch_items_are_re_sent_and_only_they() {
    let describe = mock!(Client::describe_table).then_output(active_table);
    let sent: std::sync::Arc<std::sync::Mutex<Vec<usize>>> = Default::default();
    let seen = sent.clone();
    let batch = mock!(Client::batch_write_item)
        .match_requests(move |r| {
            let n = r.request_items().map_or(0, |m| m["mocked"].len());
            seen.lock().unwrap().push(n);
            true
        })
        .sequence()
        .output(|| {
            let left = WriteRequest::builder()
                .put_request(
                    PutRequest::builder()
                        .item("id", AttributeValue::S("t/s/k/b".into()))
                        .build()
                        .unwrap(),
                )
                .build();
            BatchWriteItemOutput::builder()
                .unprocessed_items("mocked", vec![left])
                .build()
        })
        .output(|| BatchWriteItemOutput::builder().build())
        .build();
    let client = mock_client!(
        aws_sdk_dynamodb,
        RuleMode::MatchAny,
        &[&describe, &batch],
        |b| b.retry_config(RetryConfig::disabled())
    );
    let sink = DynamoSink::<u64>::open(client, "mocked")
        .await
        .unwrap()
        .mode(DynamoWriteMode::Batch);
    let mut writer = sink.open(&cx()).await.unwrap();
    for key in ["a", "b", "c"] {
        writer.write(one_output(key)).await.unwrap();
    }
    writer.commit().await.expect("all written in the end");
    assert_eq!(
        *sent.lock().unwrap(),
        [3, 1],
        "then only the unprocessed one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_too_large_for_an_item_sends_its_record_to_the_dead_letter_sink() {
    use shardflow_core::dead_letter::{DeadLetter, DeadLetterRecord};
    use shardflow_core::decode::SourceExt;
    use shardflow_core::lease::MemoryLeaseStore;
    use shardflow_core::memory::MemoryStream;
    use shardflow_core::runtime::{RunMode, Runtime, RuntimeConfig};
    use shardflow_core::sink::{InspectSink, MemorySink};
    use shardflow_core::topology::Topology;

    let stream = MemoryStream::new("big", 1);
    for size in [10, 500 * 1024, 20] {
        stream.push(0, 0, b"k", &serde_json::to_vec(&"x".repeat(size)).unwrap());
    }
    let sink = DynamoSink::<String>::open(client().await, table("dead"))
        .await
        .expect("table");
    let dead = MemorySink::<DeadLetterRecord>::new("dead");
    let topology = Topology::builder("big")
        .dead_letter(DeadLetter::to(dead.clone()))
        .source(stream.json::<String>())
        .sink(sink.clone())
        .build()
        .unwrap();
    Runtime::new(topology, std::sync::Arc::new(MemoryLeaseStore::new()))
        .with_config(RuntimeConfig {
            mode: RunMode::UntilCaughtUp,
            ..RuntimeConfig::default()
        })
        .run()
        .await
        .expect("the run goes on past the oversized output");
    let written: Vec<usize> = sink
        .committed()
        .await
        .unwrap()
        .into_values()
        .map(|v| v.len())
        .collect();
    assert_eq!(written, [10, 20], "the other records were written");
    let letters: Vec<DeadLetterRecord> = dead.contents().into_values().collect();
    assert_eq!(letters.len(), 1);
    assert!(
        letters[0].stage.contains("dynamodb"),
        "{}",
        letters[0].stage
    );
    assert!(
        letters[0].error.contains("item limit"),
        "{}",
        letters[0].error
    );
    assert_eq!(letters[0].data.len(), 500 * 1024 + 2, "the record's bytes");
}

/// A large undecodable record with `DynamoSink` as the dead-letter sink: its letter was a JSON
/// array of numbers (three to four item bytes per payload byte), over the item limit from
/// about 100 KB, and the failed write failed the run on every restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_too_large_for_an_item_are_truncated_with_size_and_digest() {
    use shardflow_core::dead_letter::{DeadLetter, DeadLetterRecord};
    use shardflow_core::decode::SourceExt;
    use shardflow_core::lease::MemoryLeaseStore;
    use shardflow_core::memory::MemoryStream;
    use shardflow_core::runtime::{RunMode, Runtime, RuntimeConfig};
    use shardflow_core::sink::{InspectSink, MemorySink};
    use shardflow_core::topology::Topology;

    let stream = MemoryStream::new("undecodable", 1);
    let small: Vec<u8> = (0..150 * 1024u32).map(|i| (i % 251) as u8).collect();
    let large: Vec<u8> = (0..900 * 1024u32).map(|i| (i % 241) as u8).collect();
    stream.push(0, 0, b"k", &small);
    stream.push(0, 0, b"k", b"\"fine\"");
    stream.push(0, 0, b"k", &large);
    let dead = DynamoSink::<DeadLetterRecord>::open(client().await, table("letters"))
        .await
        .expect("table");
    let out = MemorySink::<String>::new("out");
    let topology = Topology::builder("letters")
        .dead_letter(DeadLetter::to(dead.clone()))
        .source(stream.json::<String>())
        .sink(out.clone())
        .build()
        .unwrap();
    Runtime::new(topology, std::sync::Arc::new(MemoryLeaseStore::new()))
        .with_config(RuntimeConfig {
            mode: RunMode::UntilCaughtUp,
            ..RuntimeConfig::default()
        })
        .run()
        .await
        .expect("large dead letters do not fail the run");
    assert_eq!(out.contents().len(), 1);
    let letters: Vec<DeadLetterRecord> = dead.committed().await.unwrap().into_values().collect();
    assert_eq!(letters.len(), 2, "one letter per bad record");
    let whole = letters
        .iter()
        .find(|l| l.size == small.len() as u64)
        .unwrap();
    assert!(!whole.truncated);
    assert_eq!(whole.data, small, "a 150 KB payload fits an item as base64");
    let cut = letters
        .iter()
        .find(|l| l.size == large.len() as u64)
        .unwrap();
    assert!(cut.truncated);
    assert!(
        cut.data.len() > 250 * 1024 && large.starts_with(&cut.data),
        "the longest start that fits: {} bytes",
        cut.data.len()
    );
    assert_eq!(cut.digest.len(), 64);
    assert_ne!(cut.digest, whole.digest);
    assert_eq!(cut.position.sequence.to_string(), "3");
}
