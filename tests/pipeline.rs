//! End-to-end pipelines on the in-memory stream: windows, fan-out, dead letters, lateness.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shardflow::core::memory::MemoryStream;
use shardflow::prelude::*;
use shardflow::{LeaseStore, MemoryLeaseStore, MemorySink};

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
    stream.push(shard, ts, user.as_bytes(), &json);
}

fn bounded(parallelism: usize) -> RuntimeConfig {
    RuntimeConfig {
        worker_id: "test-worker".into(),
        parallelism,
        mode: RunMode::UntilCaughtUp,
        checkpoint_interval: Duration::from_millis(20),
        ..RuntimeConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tumbling_counts_per_key_and_window() {
    let stream = MemoryStream::new("clicks", 2);
    for i in 0..100 {
        push(
            &stream,
            i % 2,
            if i % 3 == 0 { "a" } else { "b" },
            i as i64 * 100,
        );
    }
    let counts = MemorySink::new("counts");
    let topology = Topology::builder("tumbling")
        .source(stream.clone().json::<Click>())
        .event_time(|c: &Click| c.ts)
        .key_by(|c: &Click| c.user.clone())
        .window(TumblingWindow::of(Duration::from_secs(1)))
        .aggregate(Count)
        .sink(counts.clone())
        .build()
        .unwrap();
    Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
        .with_config(bounded(2))
        .run()
        .await
        .unwrap();
    let got = counts.contents();
    let total: u64 = got.values().map(|r| r.value).sum();
    assert_eq!(total, 100, "every click counted once: {got:?}");
    // Shard 0 has even i: window [0,1000) holds i = 0,2,4,6,8 -> a: 0,6 ; b: 2,4,8
    let a0 = got
        .iter()
        .find(|((shard, _), r)| shard.as_str() == "shard-0" && r.key == "a" && r.window.start == 0)
        .map(|(_, r)| r.value);
    assert_eq!(a0, Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_records_land_in_the_dead_letter_sink_with_their_position() {
    let stream = MemoryStream::new("mixed", 1);
    push(&stream, 0, "a", 1);
    stream.push(0, 2, b"k", b"{not json");
    push(&stream, 0, "a", 3);
    let dead = MemorySink::new("dead");
    let out = MemorySink::new("out");
    let topology = Topology::builder("dlq")
        .dead_letter(DeadLetter::to(dead.clone()))
        .source(stream.clone().json::<Click>())
        .sink(out.clone())
        .build()
        .unwrap();
    let leases = Arc::new(MemoryLeaseStore::new());
    Runtime::new(topology, leases.clone())
        .with_config(bounded(1))
        .run()
        .await
        .unwrap();
    assert_eq!(out.contents().len(), 2);
    let letters: Vec<DeadLetterRecord> = dead.contents().into_values().collect();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].position.sequence.to_string(), "2");
    assert_eq!(letters[0].shard.as_str(), "shard-0");
    assert_eq!(letters[0].data, b"{not json");
    assert_eq!(letters[0].stage, "decode");
    let lease = shardflow::LeaseStore::get(&*leases, &lease_key("mixed", "shard-0"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        lease.checkpoint.committed,
        shardflow::core::lease::CheckpointPosition::At(
            shardflow::core::position::RecordPosition::new(
                shardflow::core::position::SequenceNumber::from_u128(3)
            )
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_shard_keeps_the_checkpoint_before_the_bad_record() {
    let stream = MemoryStream::new("bad", 1);
    push(&stream, 0, "a", 1);
    stream.push(0, 2, b"k", b"garbage");
    let out = MemorySink::new("out");
    let topology = Topology::builder("stop")
        .source(stream.clone().json::<Click>())
        .sink(out.clone())
        .build()
        .unwrap();
    let leases = Arc::new(MemoryLeaseStore::new());
    let err = Runtime::new(topology, leases.clone())
        .with_config(bounded(1))
        .run()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("shard-0"), "{err}");
    let lease = shardflow::LeaseStore::get(&*leases, &lease_key("bad", "shard-0"))
        .await
        .unwrap()
        .unwrap();
    assert!(
        !matches!(lease.checkpoint.committed, shardflow::core::lease::CheckpointPosition::At(ref p) if p.sequence.to_string() == "2"),
        "checkpoint never passes the bad record: {:?}",
        lease.checkpoint
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_user_function_is_retried_then_dead_lettered() {
    let stream = MemoryStream::new("fail", 1);
    push(&stream, 0, "ok", 1);
    push(&stream, 0, "boom", 2);
    let dead = MemorySink::new("dead");
    let out = MemorySink::new("out");
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let c = calls.clone();
    let topology = Topology::builder("retry")
        .dead_letter(DeadLetter::retry(
            2,
            Duration::from_millis(1),
            DeadLetter::to(dead.clone()),
        ))
        .source(stream.clone().json::<Click>())
        .try_map("lookup", move |c: &Click| {
            if c.user == "boom" {
                calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Err("lookup failed")
            } else {
                Ok(c.user.clone())
            }
        })
        .sink(out.clone())
        .build()
        .unwrap();
    Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
        .with_config(bounded(1))
        .run()
        .await
        .unwrap();
    assert_eq!(
        c.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "first try plus two retries"
    );
    assert_eq!(out.contents().len(), 1);
    let letters: Vec<DeadLetterRecord> = dead.contents().into_values().collect();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].stage, "lookup");
    assert_eq!(letters[0].error, "lookup failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_records_go_to_the_side_output_and_lateness_refines() {
    let stream = MemoryStream::new("late", 1);
    // Window [0,1000): 100, 200; then watermark jumps to 2500 (window fired); a record at 900
    // is within 2 s lateness (refines), then watermark 5000 closes it; 950 is then too late.
    for ts in [100, 200, 2500, 900, 5000, 950] {
        push(&stream, 0, "a", ts);
    }
    let counts = MemorySink::new("counts");
    let late = MemorySink::new("late");
    let late2 = late.clone();
    let topology = Topology::builder("lateness")
        .source(stream.clone().json::<Click>())
        .event_time(|c: &Click| c.ts)
        .key_by(|c: &Click| c.user.clone())
        .window(TumblingWindow::of(Duration::from_secs(1)))
        .allowed_lateness(Duration::from_secs(2))
        .late_records(move |s| {
            s.sink(late2);
        })
        .aggregate(Count)
        .sink(counts.clone())
        .build()
        .unwrap();
    let config = RuntimeConfig {
        read_limits: shardflow::core::source::ReadLimits {
            max_records: 1,
            max_bytes: 1 << 20,
        },
        ..bounded(1)
    };
    Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
        .with_config(config)
        .run()
        .await
        .unwrap();
    let first = counts
        .contents()
        .into_values()
        .find(|r| r.window.start == 0)
        .unwrap();
    assert_eq!(first.value, 3, "100, 200 and the refinement 900");
    let late: Vec<Click> = late.contents().into_values().collect();
    assert_eq!(
        late,
        vec![Click {
            user: "a".into(),
            ts: 950
        }]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stream_fans_out_to_two_branches() {
    let stream = MemoryStream::new("fan", 2);
    for i in 0..40 {
        push(&stream, i % 2, "u", i as i64);
    }
    let raw = MemorySink::new("raw");
    let counts = MemorySink::new("counts");
    let clicks = Topology::builder("fanout").source(stream.clone().json::<Click>());
    clicks.clone().map(|c: Click| c.ts).sink(raw.clone());
    let topology = clicks
        .key_by(|c: &Click| c.user.clone())
        .aggregate(Count)
        .sink(counts.clone())
        .build()
        .unwrap();
    Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
        .with_config(bounded(2))
        .run()
        .await
        .unwrap();
    assert_eq!(raw.contents().len(), 40);
    let per_shard: Vec<u64> = counts.contents().into_values().map(|v| v.value).collect();
    assert_eq!(per_shard, vec![20, 20]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_and_flat_map_give_each_output_its_own_identity() {
    let stream = MemoryStream::new("words", 1);
    for (i, user) in ["a b", "", "c"].iter().enumerate() {
        push(&stream, 0, user, i as i64);
    }
    let out = MemorySink::new("words");
    let topology = Topology::builder("words")
        .source(stream.clone().json::<Click>())
        .filter(|c: &Click| !c.user.is_empty())
        .flat_map(|c: Click| c.user.split(' ').map(str::to_owned).collect::<Vec<_>>())
        .sink(out.clone())
        .build()
        .unwrap();
    Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
        .with_config(bounded(1))
        .run()
        .await
        .unwrap();
    let got: Vec<(String, String)> = out
        .contents()
        .into_iter()
        .map(|((_, id), word)| (id, word))
        .collect();
    assert_eq!(
        got,
        [
            ("r/1-0-0".to_owned(), "a".to_owned()),
            ("r/1-0-1".to_owned(), "b".to_owned()),
            ("r/3-0-0".to_owned(), "c".to_owned())
        ]
    );
}

/// A sink whose commits take a while, so shards sit finishing while the runtime works on.
struct SlowCommits<T>(MemorySink<T>);

struct SlowWriter<T>(Box<dyn shardflow::core::sink::SinkWriter<T>>);

#[async_trait::async_trait]
impl<T: Clone + Send + Sync + 'static> shardflow::Sink<T> for SlowCommits<T> {
    fn name(&self) -> &str {
        "slow"
    }
    async fn open(
        &self,
        cx: &shardflow::core::sink::SinkContext,
    ) -> Result<Box<dyn shardflow::core::sink::SinkWriter<T>>, shardflow::core::error::SinkError>
    {
        Ok(Box::new(SlowWriter(self.0.open(cx).await?)))
    }
}

#[async_trait::async_trait]
impl<T: Send + 'static> shardflow::core::sink::SinkWriter<T> for SlowWriter<T> {
    async fn write(
        &mut self,
        batch: shardflow::core::sink::OutputBatch<T>,
    ) -> Result<(), shardflow::core::error::SinkError> {
        self.0.write(batch).await
    }
    async fn commit(&mut self) -> Result<(), shardflow::core::error::SinkError> {
        tokio::time::sleep(Duration::from_millis(30)).await;
        self.0.commit().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_sync_never_restarts_a_shard_that_is_still_finishing() {
    let stream = MemoryStream::new("finishing", 2);
    for i in 0..20 {
        push(&stream, i % 2, "u", i as i64);
    }
    let counts = MemorySink::new("counts");
    let topology = Topology::builder("finishing")
        .source(stream.clone().json::<Click>())
        .key_by(|c: &Click| c.user.clone())
        .aggregate(Count)
        .sink(SlowCommits(counts.clone()))
        .build()
        .unwrap();
    let config = RuntimeConfig {
        // Re-read the shard list at every turn of the run loop.
        shard_sync_interval: Duration::ZERO,
        read_limits: shardflow::core::source::ReadLimits {
            max_records: 3,
            max_bytes: 1 << 20,
        },
        ..bounded(2)
    };
    Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
        .with_config(config)
        .run()
        .await
        .unwrap();
    let per_shard: Vec<u64> = counts.contents().into_values().map(|v| v.value).collect();
    assert_eq!(per_shard, vec![10, 10], "each shard processed exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_checkpoints_and_releases_leases() {
    let stream = MemoryStream::new("live", 2);
    for i in 0..50 {
        push(&stream, i % 2, "u", i as i64);
    }
    let out = MemorySink::new("out");
    let topology = Topology::builder("live")
        .source(stream.clone().json::<Click>())
        .sink(out.clone())
        .build()
        .unwrap();
    let leases = Arc::new(MemoryLeaseStore::new());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let config = RuntimeConfig {
        mode: RunMode::Continuous,
        idle_wait: Duration::from_millis(5),
        ..bounded(1)
    };
    let run = tokio::spawn(
        Runtime::new(topology, leases.clone())
            .with_config(config)
            .with_shutdown(shutdown.clone())
            .run(),
    );
    // A continuous run keeps going at the tip; wait (polling, bounded) for every output.
    for _ in 0..1_000 {
        if out.contents().len() == 50 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(out.contents().len(), 50);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("shutdown ends the run")
        .unwrap()
        .unwrap();
    for lease in shardflow::LeaseStore::list(&*leases).await.unwrap() {
        assert_eq!(lease.owner, None, "{} released", lease.key);
        // 25 records per shard, sequence numbers from 1.
        assert_eq!(
            lease.checkpoint.committed,
            shardflow::core::lease::CheckpointPosition::At(
                shardflow::core::position::RecordPosition::new(
                    shardflow::core::position::SequenceNumber::from_u128(25)
                )
            ),
            "{} checkpointed at its last record",
            lease.key
        );
    }
}

/// A dead-letter sink whose commits fail.
struct FailingCommits;

struct FailingWriter;

#[async_trait::async_trait]
impl shardflow::Sink<DeadLetterRecord> for FailingCommits {
    fn name(&self) -> &str {
        "failing-dead-letters"
    }
    async fn open(
        &self,
        _cx: &shardflow::core::sink::SinkContext,
    ) -> Result<
        Box<dyn shardflow::core::sink::SinkWriter<DeadLetterRecord>>,
        shardflow::core::error::SinkError,
    > {
        Ok(Box::new(FailingWriter))
    }
}

#[async_trait::async_trait]
impl shardflow::core::sink::SinkWriter<DeadLetterRecord> for FailingWriter {
    async fn write(
        &mut self,
        _batch: shardflow::core::sink::OutputBatch<DeadLetterRecord>,
    ) -> Result<(), shardflow::core::error::SinkError> {
        Ok(())
    }
    async fn commit(&mut self) -> Result<(), shardflow::core::error::SinkError> {
        Err(shardflow::core::error::SinkError {
            sink: "failing-dead-letters".into(),
            operation: "commit",
            retryable: false,
            source: "disk full".into(),
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_never_passes_a_record_whose_dead_letter_was_not_committed() {
    let stream = MemoryStream::new("dlq-fails", 1);
    push(&stream, 0, "a", 1);
    push(&stream, 0, "a", 2);
    stream.push(0, 3, b"k", b"not json");
    push(&stream, 0, "a", 4);
    let out = MemorySink::new("out");
    let topology = Topology::builder("dlq-fails")
        .dead_letter(DeadLetter::to(FailingCommits))
        .source(stream.clone().json::<Click>())
        .sink(out.clone())
        .build()
        .unwrap();
    let leases = Arc::new(MemoryLeaseStore::new());
    // One record per epoch, so the good records before the bad one are checkpointable; the
    // shard backs off twice, then the bounded run fails with the sink's error.
    let config = RuntimeConfig {
        read_limits: shardflow::core::source::ReadLimits {
            max_records: 1,
            max_bytes: 1 << 20,
        },
        sink_backoff: shardflow::core::runtime::SinkBackoff {
            first_pause: Duration::from_millis(10),
            max_pause: Duration::from_millis(20),
            attempts: 2,
            ..Default::default()
        },
        ..bounded(1)
    };
    let err = Runtime::new(topology, leases.clone())
        .with_config(config)
        .run()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("disk full"), "{err}");
    let lease = shardflow::LeaseStore::get(&*leases, &lease_key("dlq-fails", "shard-0"))
        .await
        .unwrap()
        .unwrap();
    match &lease.checkpoint.committed {
        shardflow::core::lease::CheckpointPosition::At(p) => {
            assert!(
                p.sequence.as_u128().unwrap() < 3,
                "checkpoint passed the bad record: {p}"
            );
        }
        shardflow::core::lease::CheckpointPosition::Initial => {}
        other => panic!("unexpected checkpoint {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_the_source_cannot_interpret_are_dead_lettered() {
    let stream = MemoryStream::new("corrupt", 1);
    push(&stream, 0, "a", 1);
    stream.push_corrupt(
        0,
        2,
        b"\xF3\x89\x9A\xC2garbage",
        "aggregate digest mismatch",
    );
    push(&stream, 0, "a", 3);
    let dead = MemorySink::new("dead");
    let out = MemorySink::new("out");
    let topology = Topology::builder("corrupt")
        .dead_letter(DeadLetter::to(dead.clone()))
        .source(stream.clone().raw())
        .sink(out.clone())
        .build()
        .unwrap();
    Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
        .with_config(bounded(1))
        .run()
        .await
        .unwrap();
    assert_eq!(
        out.contents().len(),
        2,
        "a raw decoder would have passed it on"
    );
    let letters: Vec<DeadLetterRecord> = dead.contents().into_values().collect();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].stage, "source");
    assert_eq!(letters[0].error, "aggregate digest mismatch");
    assert_eq!(letters[0].position.sequence.to_string(), "2");
}

/// Records the lease epoch of every batch written through it.
struct EpochRecorder<T> {
    inner: MemorySink<T>,
    seen: Arc<std::sync::Mutex<Vec<(String, u64)>>>,
}

struct EpochRecorderWriter<T> {
    inner: Box<dyn shardflow::core::sink::SinkWriter<T>>,
    seen: Arc<std::sync::Mutex<Vec<(String, u64)>>>,
}

#[async_trait::async_trait]
impl<T: Clone + Send + Sync + 'static> shardflow::Sink<T> for EpochRecorder<T> {
    fn name(&self) -> &str {
        "epochs"
    }
    async fn open(
        &self,
        cx: &shardflow::core::sink::SinkContext,
    ) -> Result<Box<dyn shardflow::core::sink::SinkWriter<T>>, shardflow::core::error::SinkError>
    {
        Ok(Box::new(EpochRecorderWriter {
            inner: self.inner.open(cx).await?,
            seen: Arc::clone(&self.seen),
        }))
    }
}

#[async_trait::async_trait]
impl<T: Send + 'static> shardflow::core::sink::SinkWriter<T> for EpochRecorderWriter<T> {
    async fn write(
        &mut self,
        batch: shardflow::core::sink::OutputBatch<T>,
    ) -> Result<(), shardflow::core::error::SinkError> {
        self.seen
            .lock()
            .unwrap()
            .push((batch.shard.as_str().to_owned(), batch.lease_epoch.counter));
        self.inner.write(batch).await
    }
    async fn commit(&mut self) -> Result<(), shardflow::core::error::SinkError> {
        self.inner.commit().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sinks_receive_the_lease_epoch_and_a_later_owner_has_a_larger_one() {
    let stream = MemoryStream::new("epochs", 2);
    let leases = Arc::new(MemoryLeaseStore::new());
    let mut epochs_by_run = Vec::new();
    for (run, worker) in ["first", "second"].into_iter().enumerate() {
        for i in 0..10 {
            push(&stream, i % 2, "u", (run * 10 + i) as i64);
        }
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let records = EpochRecorder {
            inner: MemorySink::new("records"),
            seen: Arc::clone(&seen),
        };
        let counts = EpochRecorder {
            inner: MemorySink::new("counts"),
            seen: Arc::clone(&seen),
        };
        let clicks = Topology::builder("epochs").source(stream.clone().json::<Click>());
        clicks.clone().sink(records);
        let topology = clicks
            .key_by(|c: &Click| c.user.clone())
            .aggregate(Count)
            .sink(counts)
            .build()
            .unwrap();
        let config = RuntimeConfig {
            worker_id: worker.into(),
            ..bounded(2)
        };
        let store: Arc<dyn shardflow::LeaseStore> = leases.clone();
        Runtime::new(topology, Arc::clone(&store))
            .with_config(config)
            .run()
            .await
            .unwrap();
        let seen = seen.lock().unwrap().clone();
        assert!(!seen.is_empty(), "run {run} wrote outputs");
        // The epoch is the counter the worker's take left on the lease: the one the next
        // owner's take starts from.
        for (shard, epoch) in &seen {
            let lease = store
                .get(&lease_key("epochs", shard.as_str()))
                .await
                .unwrap()
                .unwrap();
            assert!(
                *epoch > 0 && *epoch < lease.counter,
                "run {run}: epoch {epoch} of {shard} is the take's counter, below the final {}",
                lease.counter
            );
        }
        epochs_by_run.push(seen);
    }
    let first_max = epochs_by_run[0].iter().map(|e| e.1).max().unwrap();
    let second_min = epochs_by_run[1].iter().map(|e| e.1).min().unwrap();
    assert!(
        second_min > first_max,
        "the later owner fences the earlier one: {second_min} > {first_max}"
    );
}

/// A memory lease store with the faults a worker meets against DynamoDB: writes that hang while
/// `blocked` is set (an outage or a partition, so the worker cannot renew), and listings that
/// fail `list_failures` times, retryably (throttling) or not (a table it may not read).
#[derive(Default)]
struct FaultyLeaseStore {
    inner: MemoryLeaseStore,
    blocked: std::sync::atomic::AtomicBool,
    list_failures: std::sync::atomic::AtomicU32,
    retryable: bool,
}

#[async_trait::async_trait]
impl shardflow::LeaseStore for FaultyLeaseStore {
    async fn list(
        &self,
    ) -> Result<Vec<shardflow::core::lease::Lease>, shardflow::core::error::LeaseError> {
        use std::sync::atomic::Ordering;
        if self
            .list_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(shardflow::core::error::LeaseError::Store {
                operation: "list",
                retryable: self.retryable,
                source: "ProvisionedThroughputExceededException".into(),
            });
        }
        self.inner.list().await
    }
    async fn get(
        &self,
        key: &str,
    ) -> Result<Option<shardflow::core::lease::Lease>, shardflow::core::error::LeaseError> {
        self.inner.get(key).await
    }
    async fn create_if_absent(
        &self,
        lease: &shardflow::core::lease::Lease,
    ) -> Result<bool, shardflow::core::error::LeaseError> {
        self.inner.create_if_absent(lease).await
    }
    async fn update(
        &self,
        key: &str,
        expected_counter: u64,
        update: &shardflow::core::lease::LeaseUpdate,
    ) -> Result<shardflow::core::lease::Lease, shardflow::core::error::LeaseError> {
        while self.blocked.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.inner.update(key, expected_counter, update).await
    }
    async fn delete(
        &self,
        key: &str,
        expected_counter: u64,
    ) -> Result<(), shardflow::core::error::LeaseError> {
        self.inner.delete(key, expected_counter).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_cannot_renew_sends_nothing_more_to_its_sinks_once_its_lease_may_have_moved()
{
    let stream = MemoryStream::new("stalled", 1);
    let out = MemorySink::new("out");
    let topology = Topology::builder("stalled")
        .source(stream.clone().json::<Click>())
        .sink(out.clone())
        .build()
        .unwrap();
    let store = Arc::new(FaultyLeaseStore::default());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let config = RuntimeConfig {
        worker_id: "a".into(),
        mode: RunMode::Continuous,
        idle_wait: Duration::from_millis(10),
        checkpoint_interval: Duration::from_millis(100),
        lease_duration: Duration::from_secs(1),
        shard_sync_interval: Duration::from_millis(100),
        ..bounded(1)
    };
    let run = tokio::spawn(
        Runtime::new(topology, store.clone())
            .with_config(config)
            .with_shutdown(shutdown.clone())
            .run(),
    );
    let wait_for = |n: usize| {
        let out = out.clone();
        async move {
            for _ in 0..1_000 {
                if out.contents().len() >= n {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    for i in 0..10 {
        push(&stream, 0, "u", i);
    }
    wait_for(10).await;
    assert_eq!(out.contents().len(), 10);

    // The store stalls; past the lease duration, another worker may own the shard.
    store
        .blocked
        .store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for i in 10..20 {
        push(&stream, 0, "u", i);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        out.contents().len(),
        10,
        "records read after the lease may have moved wait for a renewal"
    );

    // It did move: worker b stole it. When the store answers again, a's renewal fails and
    // the shard stops there, before records 10..20 reach the sink.
    let lease = store
        .inner
        .get(&lease_key("stalled", "shard-0"))
        .await
        .unwrap()
        .unwrap();
    let steal = shardflow::core::lease::LeaseUpdate::Take { owner: "b".into() };
    store
        .inner
        .update(&lease_key("stalled", "shard-0"), lease.counter, &steal)
        .await
        .unwrap();
    store
        .blocked
        .store(false, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(out.contents().len(), 10, "a never wrote past its lease");
    // b never renews (it is no real worker): a lease duration later a takes the shard back
    // with a new epoch and processes the rest from the checkpoint.
    wait_for(20).await;
    assert_eq!(out.contents().len(), 20);
    let lease = store
        .inner
        .get(&lease_key("stalled", "shard-0"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        lease
            .owner
            .as_deref()
            .map(shardflow::core::lease::worker_of),
        Some("a")
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("shutdown ends the run")
        .unwrap()
        .unwrap();
}

/// Refuses its first commit as fenced (a newer lease epoch wrote), then behaves.
struct FencedOnce {
    inner: MemorySink<Click>,
    refused: Arc<std::sync::atomic::AtomicUsize>,
}

struct FencedOnceWriter {
    inner: Box<dyn shardflow::core::sink::SinkWriter<Click>>,
    refused: Arc<std::sync::atomic::AtomicUsize>,
    epoch: shardflow::core::lease::LeaseEpoch,
}

#[async_trait::async_trait]
impl shardflow::Sink<Click> for FencedOnce {
    fn name(&self) -> &str {
        "fenced-once"
    }
    async fn open(
        &self,
        cx: &shardflow::core::sink::SinkContext,
    ) -> Result<Box<dyn shardflow::core::sink::SinkWriter<Click>>, shardflow::core::error::SinkError>
    {
        Ok(Box::new(FencedOnceWriter {
            inner: self.inner.open(cx).await?,
            refused: Arc::clone(&self.refused),
            epoch: shardflow::core::lease::LeaseEpoch::default(),
        }))
    }
}

#[async_trait::async_trait]
impl shardflow::core::sink::SinkWriter<Click> for FencedOnceWriter {
    async fn write(
        &mut self,
        batch: shardflow::core::sink::OutputBatch<Click>,
    ) -> Result<(), shardflow::core::error::SinkError> {
        self.epoch = batch.lease_epoch;
        self.inner.write(batch).await
    }
    async fn commit(&mut self) -> Result<(), shardflow::core::error::SinkError> {
        if self
            .refused
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            == 0
        {
            return Err(shardflow::core::error::SinkError {
                sink: "fenced-once".into(),
                operation: "commit",
                retryable: false,
                source: Box::new(shardflow::core::error::Fenced {
                    shard: shardflow::ShardId::new("shard-0"),
                    output: "r/1-0-0".into(),
                    epoch: self.epoch,
                }),
            });
        }
        self.inner.commit().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_write_stops_the_shard_not_the_run_and_the_shard_is_replayed() {
    let stream = MemoryStream::new("fenced", 1);
    for i in 0..10 {
        push(&stream, 0, "u", i);
    }
    let out = MemorySink::new("out");
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let topology = Topology::builder("fenced")
        .source(stream.clone().json::<Click>())
        .sink(FencedOnce {
            inner: out.clone(),
            refused: Arc::clone(&refused),
        })
        .build()
        .unwrap();
    let config = RuntimeConfig {
        shard_sync_interval: Duration::from_millis(10),
        ..bounded(1)
    };
    Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
        .with_config(config)
        .run()
        .await
        .expect("a fenced shard does not fail the run");
    assert!(refused.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    assert_eq!(
        out.contents().len(),
        10,
        "the shard was taken again and replayed from its checkpoint"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_reset_replays_from_a_time_or_the_trim_horizon() {
    use shardflow::core::lease::{CheckpointPosition, LeaseUpdate, ShardCheckpoint};
    let stream = MemoryStream::new("resettable", 1);
    for i in 0..10 {
        push(&stream, 0, "u", i * 100);
    }
    let leases = Arc::new(MemoryLeaseStore::new());
    // A topology that starts new shards at LATEST: only a reset makes it read old records.
    let run = |sink: MemorySink<Click>| {
        let topology = Topology::builder("reset")
            .start_at(shardflow::core::position::StartPosition::Latest)
            .source(stream.clone().json::<Click>())
            .sink(sink)
            .build()
            .unwrap();
        Runtime::new(topology, Arc::clone(&leases) as Arc<dyn LeaseStore>).with_config(bounded(1))
    };
    let first = MemorySink::new("first");
    run(first.clone()).run().await.unwrap();
    assert!(first.contents().is_empty(), "LATEST skips what was there");

    let reset = |checkpoint: ShardCheckpoint| {
        let leases = Arc::clone(&leases);
        async move {
            let lease = leases
                .get(&lease_key("resettable", "shard-0"))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(lease.owner, None, "the run released its lease");
            leases
                .update(
                    &lease_key("resettable", "shard-0"),
                    lease.counter,
                    &LeaseUpdate::Reset { checkpoint },
                )
                .await
                .unwrap();
        }
    };
    let times = |sink: &MemorySink<Click>| -> Vec<i64> {
        let mut ts: Vec<i64> = sink.contents().values().map(|c| c.ts).collect();
        ts.sort_unstable();
        ts
    };

    reset(ShardCheckpoint::at_timestamp(500)).await;
    let since = MemorySink::new("since");
    run(since.clone()).run().await.unwrap();
    assert_eq!(
        times(&since),
        vec![500, 600, 700, 800, 900],
        "what arrived from 500 ms on"
    );
    let lease = leases
        .get(&lease_key("resettable", "shard-0"))
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(lease.checkpoint.committed, CheckpointPosition::At(_)),
        "the replay checkpoints as it goes: {:?}",
        lease.checkpoint
    );

    reset(ShardCheckpoint::trim_horizon()).await;
    let all = MemorySink::new("all");
    run(all.clone()).run().await.unwrap();
    assert_eq!(times(&all), (0..10).map(|i| i * 100).collect::<Vec<_>>());
}

/// The samples of `metric` in `registry`, as (labels, value).
fn samples(registry: &prometheus::Registry, metric: &str) -> Vec<(Vec<(String, String)>, f64)> {
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    scrape
        .samples
        .into_iter()
        .filter(|s| s.metric == metric)
        .map(|s| {
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            };
            let mut labels: Vec<(String, String)> = s
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            labels.sort();
            (labels, value)
        })
        .collect()
}

/// The sum of `metric` over the samples whose `label` is `value`.
fn sum_where(registry: &prometheus::Registry, metric: &str, label: &str, value: &str) -> f64 {
    samples(registry, metric)
        .iter()
        .filter(|(labels, _)| labels.iter().any(|(k, v)| k == label && v == value))
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_records_per_operator_and_shard_and_bytes_per_sink() {
    let stream = MemoryStream::new("metered", 2);
    for i in 0..100 {
        push(
            &stream,
            i % 2,
            if i % 4 < 2 { "a" } else { "b" },
            i as i64 * 10,
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let files = shardflow::local::LocalDirSink::new(dir.path());
    let topology = Topology::builder("metered")
        .source(stream.clone().json::<Click>())
        .event_time(|c: &Click| c.ts)
        .map(|c: Click| c)
        .filter(|c: &Click| c.ts % 20 == 0)
        .map(|c: Click| c)
        .filter(|c: &Click| c.ts >= 0)
        .name("non-negative")
        .key_by(|c: &Click| c.user.clone())
        .window(TumblingWindow::of(Duration::from_millis(100)))
        .aggregate(Count)
        .sink(shardflow::core::sink::Named::new("per-user", files.clone()))
        .build()
        .unwrap();
    let registry = prometheus::Registry::new();
    Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
        .with_config(bounded(2))
        .with_metrics(shardflow::Metrics::new(&registry))
        .run()
        .await
        .unwrap();
    let io = |operator: &str| {
        (
            sum_where(
                &registry,
                "shardflow_operator_records_in_total",
                "operator",
                operator,
            ),
            sum_where(
                &registry,
                "shardflow_operator_records_out_total",
                "operator",
                operator,
            ),
        )
    };
    // Operators are labelled by what they are, a second one of a kind with a suffix, or by
    // the name `.name(..)` gave them.
    assert_eq!(io("map"), (100.0, 100.0));
    assert_eq!(
        io("filter"),
        (100.0, 50.0),
        "even shard numbers' every other record"
    );
    assert_eq!(io("map-2"), (50.0, 50.0));
    assert_eq!(io("non-negative"), (50.0, 50.0));
    let stored = files
        .read_topology::<WindowResult<String, u64>>("metered")
        .await
        .unwrap();
    assert_eq!(io("window-tumbling-100ms"), (50.0, stored.len() as f64));
    assert_eq!(
        sum_where(
            &registry,
            "shardflow_records_written_total",
            "sink",
            "per-user"
        ),
        stored.len() as f64,
        "the sink is labelled by the name it was given"
    );
    for shard in ["shard-0", "shard-1"] {
        let written = sum_where(&registry, "shardflow_records_written_total", "shard", shard);
        let in_dir = stored.keys().filter(|(s, _)| s.as_str() == shard).count();
        assert_eq!(written, in_dir as f64, "{shard}: outputs written");
    }
    let on_disk: u64 = walk(dir.path())
        .iter()
        .map(|f| f.metadata().unwrap().len())
        .sum();
    assert!(on_disk > 0);
    assert_eq!(
        sum_where(
            &registry,
            "shardflow_bytes_written_total",
            "topology",
            "metered"
        ),
        on_disk as f64,
        "bytes as stored"
    );
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// A sink whose commits wait until the test opens its gate.
#[derive(Clone)]
struct GatedSink {
    gate: Arc<tokio::sync::Semaphore>,
}

struct GatedWriter {
    gate: Arc<tokio::sync::Semaphore>,
}

#[async_trait::async_trait]
impl shardflow::Sink<Click> for GatedSink {
    fn name(&self) -> &str {
        "gated"
    }
    async fn open(
        &self,
        _cx: &shardflow::core::sink::SinkContext,
    ) -> Result<Box<dyn shardflow::core::sink::SinkWriter<Click>>, shardflow::core::error::SinkError>
    {
        Ok(Box::new(GatedWriter {
            gate: Arc::clone(&self.gate),
        }))
    }
}

#[async_trait::async_trait]
impl shardflow::core::sink::SinkWriter<Click> for GatedWriter {
    async fn write(
        &mut self,
        _batch: shardflow::core::sink::OutputBatch<Click>,
    ) -> Result<(), shardflow::core::error::SinkError> {
        Ok(())
    }
    async fn commit(&mut self) -> Result<(), shardflow::core::error::SinkError> {
        let _open = self.gate.acquire().await.expect("the gate is never closed");
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_lag_counts_records_read_but_not_yet_checkpointed() {
    let stream = MemoryStream::new("lagging", 1);
    for i in 0..10 {
        push(&stream, 0, "u", i);
    }
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let topology = Topology::builder("lagging")
        .source(stream.clone().json::<Click>())
        .sink(GatedSink {
            gate: Arc::clone(&gate),
        })
        .build()
        .unwrap();
    let registry = prometheus::Registry::new();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let config = RuntimeConfig {
        mode: RunMode::Continuous,
        ..bounded(1)
    };
    let run = tokio::spawn(
        Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
            .with_config(config)
            .with_metrics(shardflow::Metrics::new(&registry))
            .with_shutdown(shutdown.clone())
            .run(),
    );
    let lag = || {
        sum_where(
            &registry,
            "shardflow_checkpoint_lag_records",
            "shard",
            "shard-0",
        )
    };
    let wait_for = |want: f64| async move {
        for _ in 0..500 {
            if lag() == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("checkpoint lag stayed at {} instead of {want}", lag());
    };
    wait_for(10.0).await;
    gate.add_permits(1_000_000);
    wait_for(0.0).await;
    for i in 10..15 {
        push(&stream, 0, "u", i);
    }
    // Event time is the arrival time here (ms 0..=14): the watermark is the largest of it. The
    // lag is 0 before the new records are read as well as after, so wait for the watermark.
    let watermark = || sum_where(&registry, "shardflow_watermark_ms", "shard", "shard-0");
    for _ in 0..500 {
        if watermark() == 14.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(watermark(), 14.0);
    wait_for(0.0).await;
    let lag = sum_where(&registry, "shardflow_event_time_lag_ms", "shard", "shard-0");
    assert!(
        lag > 1.7e12,
        "the 1970 watermark trails the wall clock by decades: {lag}"
    );
    shutdown.cancel();
    run.await.unwrap().unwrap();
    for gauge in [
        "shardflow_checkpoint_lag_records",
        "shardflow_watermark_ms",
        "shardflow_event_time_lag_ms",
    ] {
        assert!(
            samples(&registry, gauge).is_empty(),
            "a released shard's {gauge} is dropped"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_shard_sync_that_fails_transiently_is_retried_and_a_lasting_failure_ends_the_run() {
    let stream = MemoryStream::new("flaky", 2);
    for i in 0..20 {
        push(&stream, i % 2, "u", i as i64);
    }
    let run = |retryable: bool, failures: u32| {
        let out = MemorySink::new("out");
        let topology = Topology::builder("flaky")
            .source(stream.clone().json::<Click>())
            .sink(out.clone())
            .build()
            .unwrap();
        let store = Arc::new(FaultyLeaseStore {
            list_failures: failures.into(),
            retryable,
            ..FaultyLeaseStore::default()
        });
        let run = Runtime::new(topology, store).with_config(bounded(1)).run();
        async move { (run.await, out) }
    };
    let (result, out) = run(true, 3).await;
    result.expect("three throttled listings are retried");
    assert_eq!(
        out.contents().len(),
        20,
        "every record processed after the retries"
    );

    let (result, out) = run(false, 1).await;
    let error = result.expect_err("a failure that retrying will not mend ends the run");
    assert!(!error.is_retryable(), "{error}");
    assert!(out.contents().is_empty());
}

/// GETs `path` from the ops endpoint at `addr`: (status, body).
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned());
    (status, body)
}

/// Issue 12: a shard the `StopShard` policy stopped kept its lease renewed for ever, invisible
/// to metrics and the ops endpoint. Now a gauge counts it and `/readyz` names it with its
/// position and reason, while `/healthz` (liveness) stays 200 so that a supervisor does not
/// restart the worker straight back into the bad record; the other shards go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_stopped_at_a_bad_record_shows_in_readyz_and_a_gauge_not_in_healthz() {
    let stream = MemoryStream::new("stopping", 2);
    push(&stream, 0, "u", 1);
    stream.push(0, 2, b"u", b"{not json");
    push(&stream, 0, "u", 3);
    push(&stream, 1, "v", 1);
    let sink = MemorySink::new("clicks");
    let topology = Topology::builder("stopping")
        .source(stream.clone().json::<Click>())
        .sink(sink.clone())
        .build()
        .unwrap();
    let registry = prometheus::Registry::new();
    let health = shardflow::core::runtime::Health::new();
    let ops = shardflow::ops::serve(
        "127.0.0.1:0".parse().unwrap(),
        registry.clone(),
        health.clone(),
    )
    .await
    .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(
        Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
            .with_config(RuntimeConfig {
                mode: RunMode::Continuous,
                ..bounded(1)
            })
            .with_metrics(shardflow::Metrics::new(&registry))
            .with_health(health)
            .with_shutdown(shutdown.clone())
            .run(),
    );
    let mut readyz = (0, String::new());
    for _ in 0..500 {
        readyz = get(ops.local_addr(), "/readyz").await;
        if readyz.0 == 503 && readyz.1.contains("shard-0") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(readyz.0, 503, "{}", readyz.1);
    assert!(
        readyz
            .1
            .contains("shard shard-0 stopped at record 2/0 in decode")
            && !readyz.1.contains("shard-1"),
        "{}",
        readyz.1
    );
    assert_eq!(get(ops.local_addr(), "/healthz").await.0, 200);
    assert_eq!(
        sum_where(
            &registry,
            "shardflow_shards_stopped",
            "topology",
            "stopping"
        ),
        1.0
    );
    // The other shard goes on.
    push(&stream, 1, "v", 2);
    let of_shard_1 = || {
        sink.contents()
            .keys()
            .filter(|(shard, _)| shard.as_str() == "shard-1")
            .count()
    };
    for _ in 0..500 {
        if of_shard_1() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(of_shard_1(), 2, "{:?}", sink.contents());
    shutdown.cancel();
    let error = run
        .await
        .unwrap()
        .expect_err("the run reports the stopped shard");
    assert!(error.to_string().contains("shard-0"), "{error}");
}

/// Issue 13: two operators given one name would share their metrics; `build()` refuses them,
/// and a name that follows no operator.
#[test]
fn two_operators_of_one_name_and_a_name_after_the_source_are_refused() {
    let stream = MemoryStream::new("named", 1);
    let twice = Topology::builder("named")
        .source(stream.clone().json::<Click>())
        .map(|c: Click| c)
        .name("clean")
        .filter(|c: &Click| c.ts >= 0)
        .name("clean")
        .sink(MemorySink::new("out"))
        .build();
    assert!(
        matches!(twice, Err(shardflow::core::error::BuildError::NameTwice { ref name, .. }) if name == "clean"),
        "{:?}",
        twice.err()
    );
    let mapped = Topology::builder("named")
        .source(stream.clone().json::<Click>())
        .map(|c: Click| c);
    let twice_one = mapped.clone().name("a");
    let named_twice = mapped.name("b").sink(MemorySink::new("out")).build();
    drop(twice_one);
    assert!(
        matches!(
            named_twice,
            Err(shardflow::core::error::BuildError::NamedTwice { .. })
        ),
        "one operator named through two clones: {:?}",
        named_twice.err()
    );
    let first = Topology::builder("named")
        .source(stream.json::<Click>())
        .name("source")
        .sink(MemorySink::new("out"))
        .build();
    assert!(
        matches!(
            first,
            Err(shardflow::core::error::BuildError::NameWithoutOperator { .. })
        ),
        "{:?}",
        first.err()
    );
}

/// The lease key of `shard` of the memory stream `stream` (created at time 0).
fn lease_key(stream: &str, shard: &str) -> String {
    shardflow::core::protocol::lease_keys::StreamScope::new(stream, 0).key(shard)
}
