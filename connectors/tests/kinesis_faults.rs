//! Faults the emulators cannot produce, injected with scripted SDK responses
//! (aws-smithy-mocks): read throttling, 5xx, expired iterators, partial PutRecords failures.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_kinesis::config::retry::RetryConfig;
use aws_sdk_kinesis::operation::get_records::{GetRecordsError, GetRecordsOutput};
use aws_sdk_kinesis::operation::get_shard_iterator::GetShardIteratorOutput;
use aws_sdk_kinesis::operation::put_records::PutRecordsOutput;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::error::{
    ExpiredIteratorException, ProvisionedThroughputExceededException,
};
use aws_sdk_kinesis::types::{PutRecordsResultEntry, Record, ShardIteratorType};
use aws_sdk_kinesis::Client;
use aws_smithy_mocks::{mock, mock_client, RuleMode};
use shardflow_connectors::kinesis::{
    KinesisProducer, KinesisSource, ProducerConfig, SpoutConfig, SpoutMetrics,
};
use shardflow_core::position::{ShardId, ShardInfo, StartPosition};
use shardflow_core::source::{ReadLimits, ShardStatus, Source};

fn record(seq: &str, data: &str) -> Record {
    Record::builder()
        .sequence_number(seq)
        .partition_key("k")
        .data(Blob::new(data.as_bytes().to_vec()))
        .build()
        .expect("record")
}

fn shard() -> ShardInfo {
    ShardInfo {
        id: ShardId::new("shardId-000000000000"),
        parents: vec![],
        hash_key_range: (0, u128::MAX),
        closed: false,
    }
}

fn fast() -> SpoutConfig {
    SpoutConfig {
        idle_min: Duration::from_millis(1),
        idle_max: Duration::from_millis(2),
        backoff_max: Duration::from_millis(20),
        ..SpoutConfig::default()
    }
}

#[tokio::test]
async fn throttling_5xx_and_an_expired_iterator_lose_and_repeat_nothing() {
    let first_iterator = mock!(Client::get_shard_iterator)
        .match_requests(|r| r.shard_iterator_type() == Some(&ShardIteratorType::TrimHorizon))
        .then_output(|| {
            GetShardIteratorOutput::builder()
                .shard_iterator("it-1")
                .build()
        });
    // The renewal must continue after the last record delivered, not from the start.
    let renewed_iterator = mock!(Client::get_shard_iterator)
        .match_requests(|r| {
            r.shard_iterator_type() == Some(&ShardIteratorType::AfterSequenceNumber)
                && r.starting_sequence_number() == Some("2")
        })
        .then_output(|| {
            GetShardIteratorOutput::builder()
                .shard_iterator("it-3")
                .build()
        });
    let get_records = mock!(Client::get_records)
        .sequence()
        .error(|| {
            GetRecordsError::ProvisionedThroughputExceededException(
                ProvisionedThroughputExceededException::builder()
                    .message("slow down")
                    .build(),
            )
        })
        .times(2)
        .http_status(500, None)
        .output(|| {
            GetRecordsOutput::builder()
                .records(record("1", "one"))
                .records(record("2", "two"))
                .next_shard_iterator("it-2")
                .millis_behind_latest(10)
                .build()
                .expect("output")
        })
        .error(|| {
            GetRecordsError::ExpiredIteratorException(
                ExpiredIteratorException::builder()
                    .message("expired")
                    .build(),
            )
        })
        .output(|| {
            GetRecordsOutput::builder()
                .records(record("3", "three"))
                .build()
                .expect("output")
        })
        .build();
    let client = mock_client!(
        aws_sdk_kinesis,
        RuleMode::MatchAny,
        &[&first_iterator, &renewed_iterator, &get_records],
        |b| b.retry_config(RetryConfig::disabled())
    );
    let metrics = SpoutMetrics::unregistered();
    let source = KinesisSource::new(client, "faults")
        .with_config(fast())
        .with_metrics(metrics.clone());
    let mut reader = source
        .open_shard(&shard(), StartPosition::TrimHorizon, ReadLimits::default())
        .await
        .expect("open");
    let mut data = Vec::new();
    loop {
        let batch = reader.read().await.expect("read");
        data.extend(
            batch
                .records
                .iter()
                .map(|r| String::from_utf8_lossy(r.data).into_owned()),
        );
        if batch.status == ShardStatus::Ended {
            break;
        }
    }
    assert_eq!(data, ["one", "two", "three"], "nothing lost, nothing twice");
    assert_eq!(metrics.throttle_count("faults", "shardId-000000000000"), 2);
    assert_eq!(metrics.expired_count("faults", "shardId-000000000000"), 1);
    assert_eq!(
        renewed_iterator.num_calls(),
        1,
        "renewed once, after sequence 2"
    );
}

#[tokio::test]
async fn a_non_retryable_read_error_reaches_the_pipeline() {
    let iterator = mock!(Client::get_shard_iterator).then_output(|| {
        GetShardIteratorOutput::builder()
            .shard_iterator("it-1")
            .build()
    });
    let get_records = mock!(Client::get_records)
        .sequence()
        .http_status(400, None)
        .build();
    let client = mock_client!(
        aws_sdk_kinesis,
        RuleMode::MatchAny,
        &[&iterator, &get_records],
        |b| b.retry_config(RetryConfig::disabled())
    );
    let source = KinesisSource::new(client, "faults").with_config(fast());
    let mut reader = source
        .open_shard(&shard(), StartPosition::TrimHorizon, ReadLimits::default())
        .await
        .expect("open");
    let err = reader
        .read()
        .await
        .expect_err("a 400 is not retried forever");
    assert!(!err.is_retryable(), "{err}");
}

#[tokio::test]
async fn only_failed_entries_are_sent_again_and_each_record_is_written_once() {
    // First request: 5 entries, entries 1 and 3 throttled. Second request must carry exactly
    // those two, in order.
    let calls = Arc::new(AtomicUsize::new(0));
    let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (c, s) = (Arc::clone(&calls), Arc::clone(&sizes));
    let put = mock!(Client::put_records)
        .match_requests(move |r| {
            s.lock().unwrap().push(
                r.records()
                    .iter()
                    .map(|e| String::from_utf8_lossy(e.data().as_ref()).into_owned())
                    .collect::<Vec<_>>(),
            );
            true
        })
        .then_compute_output(move |r| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            let entries = r
                .records()
                .iter()
                .enumerate()
                .map(|(i, _)| {
                    if n == 0 && (i == 1 || i == 3) {
                        PutRecordsResultEntry::builder()
                            .error_code("ProvisionedThroughputExceededException")
                            .error_message("slow down")
                            .build()
                    } else {
                        PutRecordsResultEntry::builder()
                            .sequence_number(format!("{}", 100 * (n + 1) + i))
                            .shard_id("shardId-000000000000")
                            .build()
                    }
                })
                .collect::<Vec<_>>();
            let failed = entries.iter().filter(|e| e.error_code().is_some()).count();
            PutRecordsOutput::builder()
                .set_records(Some(entries))
                .failed_record_count(i32::try_from(failed).unwrap())
                .build()
                .expect("output")
        });
    let client = mock_client!(aws_sdk_kinesis, RuleMode::MatchAny, &[&put], |b| b
        .retry_config(RetryConfig::disabled()));
    let config = ProducerConfig {
        ordered: true,
        linger: Duration::from_millis(5),
        backoff_base: Duration::from_millis(1),
        backoff_max: Duration::from_millis(5),
        ..ProducerConfig::default()
    };
    let producer = KinesisProducer::new(client, "faults", config)
        .await
        .expect("producer");
    let mut tickets = Vec::new();
    for i in 0..5 {
        tickets.push(
            producer
                .send(&format!("k{i}"), format!("r{i}").into_bytes())
                .await
                .expect("send"),
        );
    }
    producer.flush().await.expect("flush");
    let mut positions = Vec::new();
    for t in tickets {
        positions.push(
            t.outcome()
                .await
                .expect("every record written")
                .position
                .sequence
                .to_string(),
        );
    }
    let sizes = sizes.lock().unwrap().clone();
    assert_eq!(
        sizes,
        vec![vec!["r0", "r1", "r2", "r3", "r4"], vec!["r1", "r3"]],
        "only failed entries re-sent"
    );
    assert_eq!(positions, ["100", "200", "102", "201", "104"]);
    assert_eq!(producer.metrics().retries(), 2);
    assert_eq!(producer.metrics().user_records(), 5);
}

#[tokio::test]
async fn a_record_that_keeps_failing_is_reported_failed_at_its_deadline() {
    let put = mock!(Client::put_records).then_compute_output(|r| {
        let entries = r
            .records()
            .iter()
            .map(|_| {
                PutRecordsResultEntry::builder()
                    .error_code("InternalFailure")
                    .error_message("boom")
                    .build()
            })
            .collect::<Vec<_>>();
        PutRecordsOutput::builder()
            .set_records(Some(entries))
            .failed_record_count(1)
            .build()
            .expect("output")
    });
    let client = mock_client!(aws_sdk_kinesis, RuleMode::MatchAny, &[&put], |b| b
        .retry_config(RetryConfig::disabled()));
    let config = ProducerConfig {
        linger: Duration::from_millis(1),
        record_ttl: Duration::from_millis(200),
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        ..ProducerConfig::default()
    };
    let producer = KinesisProducer::new(client, "faults", config)
        .await
        .expect("producer");
    let ticket = producer.send("k", b"doomed".to_vec()).await.expect("send");
    let err = tokio::time::timeout(Duration::from_secs(10), ticket.outcome())
        .await
        .expect("bounded")
        .expect_err("failed");
    assert!(err.to_string().contains("InternalFailure"), "{err}");
    assert!(put.num_calls() >= 2, "it was retried before giving up");
}

#[tokio::test]
async fn a_throttled_or_failed_request_is_sent_again_whole_and_written_once() {
    use aws_sdk_kinesis::operation::put_records::PutRecordsError;
    let put = mock!(Client::put_records)
        .sequence()
        .error(|| {
            PutRecordsError::ProvisionedThroughputExceededException(
                ProvisionedThroughputExceededException::builder()
                    .message("slow down")
                    .build(),
            )
        })
        .http_status(503, None)
        .output(|| {
            PutRecordsOutput::builder()
                .records(
                    PutRecordsResultEntry::builder()
                        .sequence_number("7")
                        .shard_id("shardId-000000000000")
                        .build(),
                )
                .records(
                    PutRecordsResultEntry::builder()
                        .sequence_number("8")
                        .shard_id("shardId-000000000000")
                        .build(),
                )
                .failed_record_count(0)
                .build()
                .expect("output")
        })
        .build();
    let client = mock_client!(aws_sdk_kinesis, RuleMode::Sequential, &[&put], |b| b
        .retry_config(RetryConfig::disabled()));
    let config = ProducerConfig {
        linger: Duration::from_millis(1),
        backoff_base: Duration::from_millis(1),
        backoff_max: Duration::from_millis(5),
        ..ProducerConfig::default()
    };
    let producer = KinesisProducer::new(client, "faults", config)
        .await
        .expect("producer");
    let a = producer.send("a", b"1".to_vec()).await.expect("send");
    let b = producer.send("b", b"2".to_vec()).await.expect("send");
    producer.flush().await.expect("flush");
    assert_eq!(
        a.outcome()
            .await
            .expect("written")
            .position
            .sequence
            .to_string(),
        "7"
    );
    assert_eq!(
        b.outcome()
            .await
            .expect("written")
            .position
            .sequence
            .to_string(),
        "8"
    );
    assert_eq!(put.num_calls(), 3, "throttled, 503, then written");
    assert_eq!(
        producer.metrics().user_records(),
        2,
        "each record written once"
    );
}

#[tokio::test]
async fn send_waits_while_the_buffer_is_full() {
    // Every attempt fails, so the first record holds its bytes until its deadline.
    let put = mock!(Client::put_records).then_compute_output(|r| {
        let entries = r
            .records()
            .iter()
            .map(|_| {
                PutRecordsResultEntry::builder()
                    .error_code("InternalFailure")
                    .error_message("boom")
                    .build()
            })
            .collect::<Vec<_>>();
        PutRecordsOutput::builder()
            .set_records(Some(entries))
            .failed_record_count(1)
            .build()
            .expect("output")
    });
    let client = mock_client!(aws_sdk_kinesis, RuleMode::MatchAny, &[&put], |b| b
        .retry_config(RetryConfig::disabled()));
    let config = ProducerConfig {
        max_buffered_bytes: 1024 * 1024, // room for one of the records below, not two
        linger: Duration::from_millis(1),
        record_ttl: Duration::from_millis(1500),
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        ..ProducerConfig::default()
    };
    let producer = KinesisProducer::new(client, "faults", config)
        .await
        .expect("producer");
    let big = vec![0u8; 600 * 1024];
    let first = producer.send("a", big.clone()).await.expect("first fits");
    let blocked =
        tokio::time::timeout(Duration::from_millis(300), producer.send("b", big.clone())).await;
    assert!(blocked.is_err(), "the second send waits for buffer space");
    assert!(
        first.outcome().await.is_err(),
        "the first expires, freeing its bytes"
    );
    let second = tokio::time::timeout(Duration::from_secs(5), producer.send("b", big)).await;
    assert!(second.expect("space again").is_ok());
}
