//! Hostile input on the embedded backend: one bad record or one odd key costs that record,
//! never the run (issue 14).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shardflow::core::memory::MemoryStream;
use shardflow::core::payload_store::MemoryPayloadStore;
use shardflow::core::sink::InspectSink;
use shardflow::local::LocalDirSink;
use shardflow::operators::Sum;
use shardflow::operators::WindowResult;
use shardflow::prelude::*;
use shardflow::{MemoryLeaseStore, MemorySink};

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

/// A dead-letter sink with a limit, as `DynamoSink` has one: it refuses letters whose payload
/// is over `max` bytes, or every letter.
#[derive(Clone)]
struct Limited {
    inner: MemorySink<DeadLetterRecord>,
    max: Option<usize>,
}

#[async_trait::async_trait]
impl shardflow::Sink<DeadLetterRecord> for Limited {
    fn name(&self) -> &str {
        "limited"
    }
    async fn open(
        &self,
        cx: &shardflow::core::sink::SinkContext,
    ) -> Result<
        Box<dyn shardflow::core::sink::SinkWriter<DeadLetterRecord>>,
        shardflow::core::error::SinkError,
    > {
        self.inner.open(cx).await
    }
    fn check(&self, letter: &DeadLetterRecord) -> Result<(), String> {
        match self.max {
            Some(max) if letter.data.len() <= max => Ok(()),
            Some(max) => Err(format!("over {max} bytes")),
            None => Err("refuses every letter".into()),
        }
    }
}

fn two_shards_with_a_bad_record() -> MemoryStream {
    let stream = MemoryStream::new("bad", 2);
    for shard in 0..2 {
        push(&stream, shard, "a", 1);
    }
    stream.push(0, 2, b"pk", &stream_payload_of_bad_record());
    for shard in 0..2 {
        push(&stream, shard, "a", 3);
    }
    stream
}

/// A record whose `ts` is a string holding the canary: the value the decoder refuses.
fn stream_payload_of_bad_record() -> Vec<u8> {
    format!(
        "{{\"user\": \"u\", \"ts\": \"{CANARY}{}\"}}",
        "x".repeat(1000)
    )
    .into_bytes()
}

/// Planted in payloads: it must never reach an error message or a dead letter's reason.
const CANARY: &str = "canary-7f3a9c";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_for_its_sink_is_truncated_and_the_shard_goes_on() {
    let stream = two_shards_with_a_bad_record();
    let dead = Limited {
        inner: MemorySink::new("dead"),
        max: Some(100),
    };
    let out = MemorySink::new("out");
    let topology = Topology::builder("truncated")
        .dead_letter(DeadLetter::to(dead.clone()))
        .source(stream.clone().json::<Click>())
        .sink(out.clone())
        .build()
        .unwrap();
    Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
        .with_config(bounded())
        .run()
        .await
        .expect("the run goes on");
    assert_eq!(out.contents().len(), 4);
    let letters: Vec<DeadLetterRecord> = dead.inner.contents().into_values().collect();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert!(letter.truncated && letter.data.len() == 100, "{letter:?}");
    let payload = stream_payload_of_bad_record();
    assert_eq!(letter.size as usize, payload.len());
    assert!(payload.starts_with(&letter.data));
    assert_eq!(letter.position.sequence.to_string(), "2");
    assert!(
        letter
            .error
            .starts_with("cannot decode record as json: invalid type"),
        "{}",
        letter.error
    );
    assert!(!letter.error.contains(CANARY), "{}", letter.error);
    assert!(letter.error.contains("expected i64"), "{}", letter.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_its_sink_refuses_whole_stops_only_its_shard() {
    let stream = two_shards_with_a_bad_record();
    let dead = Limited {
        inner: MemorySink::new("dead"),
        max: None,
    };
    let out = MemorySink::new("out");
    let topology = Topology::builder("refused")
        .dead_letter(DeadLetter::to(dead.clone()))
        .source(stream.clone().json::<Click>())
        .sink(out.clone())
        .build()
        .unwrap();
    let leases = Arc::new(MemoryLeaseStore::new());
    let error = Runtime::new(topology, leases.clone())
        .with_config(bounded())
        .run()
        .await
        .expect_err("a stopped shard is reported");
    let shown = error.to_string();
    assert!(
        shown.contains("shard-0") && shown.contains("limited refuses"),
        "{shown}"
    );
    assert!(!shown.contains(CANARY), "{shown}");
    // Shard 1 went on to its end; shard 0 stopped at the bad record.
    let outputs = out.contents();
    assert_eq!(
        outputs
            .keys()
            .filter(|(s, _)| s.as_str() == "shard-1")
            .count(),
        2
    );
    let lease = shardflow::LeaseStore::get(&*leases, &lease_key("bad", "shard-0"))
        .await
        .unwrap()
        .unwrap();
    assert!(
        !matches!(lease.checkpoint.committed, shardflow::core::lease::CheckpointPosition::At(ref p) if p.sequence >= shardflow::core::position::SequenceNumber::from_u128(2)),
        "the checkpoint never passes the bad record: {:?}",
        lease.checkpoint
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_user_function_dead_letters_its_record_and_the_shard_goes_on() {
    // Each of these users makes one user function panic: before, the run failed, and every
    // restart replayed the record into the same panic.
    let stream = MemoryStream::new("panics", 2);
    for (i, user) in ["a", "map", "a", "time", "key", "try", "a"]
        .iter()
        .enumerate()
    {
        push(&stream, i % 2, user, i as i64 * 10);
    }
    let dead = MemorySink::new("dead");
    let counts = MemorySink::new("counts");
    let topology = Topology::builder("panics")
        .dead_letter(DeadLetter::to(dead.clone()))
        .source(stream.clone().json::<Click>())
        .event_time(|c: &Click| {
            assert!(c.user != "time", "no time for {}", c.user);
            c.ts
        })
        .map(|c: Click| {
            assert!(c.user != "map", "cannot map {}", c.user);
            c
        })
        .try_map("enrich", |c: &Click| {
            assert!(c.user != "try", "cannot try {}", c.user);
            Ok::<_, String>(c.clone())
        })
        .key_by(|c: &Click| {
            assert!(c.user != "key", "no key for {}", c.user);
            c.user.clone()
        })
        .window(TumblingWindow::of(Duration::from_secs(1)))
        .aggregate(Count)
        .sink(counts.clone())
        .build()
        .unwrap();
    Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
        .with_config(bounded())
        .run()
        .await
        .expect("panics cost their records, not the run");
    let total: u64 = counts.contents().values().map(|r| r.value).sum();
    assert_eq!(total, 3, "the three good records are counted");
    let mut stages: Vec<(String, String)> = dead
        .contents()
        .into_values()
        .map(|l: DeadLetterRecord| {
            assert!(l.error.contains("panicked"), "{}", l.error);
            let click: Click = serde_json::from_slice(&l.data).unwrap();
            (click.user, l.stage)
        })
        .collect();
    stages.sort();
    assert_eq!(
        stages,
        [
            ("key".to_owned(), "key_by".to_owned()),
            ("map".to_owned(), "map".to_owned()),
            ("time".to_owned(), "event_time".to_owned()),
            ("try".to_owned(), "enrich".to_owned()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_an_aggregator_dead_letters_its_record_and_leaves_the_key_as_before() {
    // Key `a` has ten records per shard; the aggregator panics on one of them, after it has
    // folded in others of the same key and window.
    let stream = MemoryStream::new("keyed-panics", 2);
    for i in 0..40 {
        let user = if i % 2 == 0 { "a" } else { "b" };
        push(&stream, i % 2, user, i as i64 * 10);
    }
    let dead = MemorySink::new("dead");
    let sums = MemorySink::new("sums");
    let topology = Topology::builder("keyed-panics")
        .dead_letter(DeadLetter::to(dead.clone()))
        .source(stream.clone().json::<Click>())
        .event_time(|c: &Click| c.ts)
        .key_by(|c: &Click| c.user.clone())
        .window(TumblingWindow::of(Duration::from_secs(1)))
        .aggregate(Sum::of(|c: &Click| {
            assert!(c.ts != 120, "cannot add {}", c.user);
            1u64
        }))
        .sink(sums.clone())
        .build()
        .unwrap();
    Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
        .with_config(bounded())
        .run()
        .await
        .expect("a panicking aggregator costs its record, not the run");
    let got: Vec<(String, String, u64)> = sums
        .contents()
        .into_iter()
        .map(|((shard, _), r)| (shard.as_str().to_owned(), r.key, r.value))
        .collect();
    assert_eq!(
        got,
        [
            ("shard-0".to_owned(), "a".to_owned(), 19),
            ("shard-1".to_owned(), "b".to_owned(), 20),
        ],
        "every record but the one the aggregator panicked on, each once"
    );
    let letters: Vec<DeadLetterRecord> = dead.contents().into_values().collect();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let click: Click = serde_json::from_slice(&letters[0].data).unwrap();
    assert_eq!(click.ts, 120);
    assert_eq!(letters[0].shard.as_str(), "shard-0");
    assert!(
        letters[0].stage.starts_with("window"),
        "{}",
        letters[0].stage
    );
    assert!(
        letters[0].error.contains("panicked"),
        "{}",
        letters[0].error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_rule_of_the_runtime_still_fails_the_run_instead_of_dead_lettering() {
    // A panic raised by the collector's own rule (a second output from an operator declared
    // to make at most one) is a topology bug, not a bad record: caught as a user function's
    // panic, every record would be dead-lettered.
    let stream = MemoryStream::new("rule", 1);
    push(&stream, 0, "a", 1);
    let dead = MemorySink::new("dead");
    let out = MemorySink::new("out");
    let topology = Topology::builder("rule")
        .dead_letter(DeadLetter::to(dead.clone()))
        .source(stream.clone().json::<Click>())
        .stateless("twice", || {
            |cx: &shardflow::core::topology::RecordCx,
             c: Click,
             out: &mut shardflow::core::topology::Collector<'_, Click>| {
                out.emit(cx, c.clone());
                out.emit(cx, c);
            }
        })
        .sink(out.clone())
        .build()
        .unwrap();
    let error = Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
        .with_config(bounded())
        .run()
        .await
        .expect_err("a broken rule fails the run");
    assert!(error.to_string().contains("panicked"), "{error}");
    assert!(dead.contents().is_empty(), "nothing dead-lettered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_panics_only_when_replayed_stops_its_shard_instead_of_vanishing() {
    // The first run counted the record; a later run's aggregator panics on it while rebuilding
    // (a new deploy, or a panic that depends on more than the record). Without a dead-letter
    // sink nothing stands for the record: skipping it as "replayed" would shrink the total the
    // second run emits, unseen. The shard stops instead, and the total stays as committed.
    static PANICS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let stream = MemoryStream::new("replay-panics", 1);
    for i in 0..10 {
        push(&stream, 0, "a", i * 10);
    }
    let totals = MemorySink::new("totals");
    let leases = Arc::new(MemoryLeaseStore::new());
    let topology = || {
        Topology::builder("replay-panics")
            .source(stream.clone().json::<Click>())
            .key_by(|c: &Click| c.user.clone())
            .aggregate(Sum::of(|c: &Click| {
                let panics = PANICS.load(std::sync::atomic::Ordering::SeqCst);
                assert!(!(panics && c.ts == 30), "cannot add {}", c.user);
                1u64
            }))
            .sink(totals.clone())
            .build()
            .unwrap()
    };
    Runtime::new(topology(), leases.clone())
        .with_config(bounded())
        .run()
        .await
        .expect("the first run counts every record");
    let total = |sink: &MemorySink<shardflow::operators::KeyedValue<String, u64>>| {
        sink.contents().into_values().map(|v| v.value).sum::<u64>()
    };
    assert_eq!(total(&totals), 10);
    PANICS.store(true, std::sync::atomic::Ordering::SeqCst);
    push(&stream, 0, "a", 200);
    let error = Runtime::new(topology(), leases.clone())
        .with_config(bounded())
        .run()
        .await
        .expect_err("the shard stops at the record it can no longer rebuild");
    assert!(error.to_string().contains("panicked"), "{error}");
    assert_eq!(
        total(&totals),
        10,
        "the committed total is not overwritten by a smaller one"
    );
}

/// The lease key of `shard` of the memory stream `stream` (created at time 0).
fn lease_key(stream: &str, shard: &str) -> String {
    shardflow::core::protocol::lease_keys::StreamScope::new(stream, 0).key(shard)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_too_large_for_the_dead_letter_sink_is_stored_whole_in_the_overflow_store() {
    let stream = two_shards_with_a_bad_record();
    let dead = Limited {
        inner: MemorySink::new("dead"),
        max: Some(100),
    };
    let overflow = Arc::new(MemoryPayloadStore::new());
    let out = MemorySink::new("out");
    let topology = Topology::builder("overflowed")
        .dead_letter(DeadLetter::to_with_overflow(
            dead.clone(),
            Arc::clone(&overflow),
        ))
        .source(stream.clone().json::<Click>())
        .sink(out.clone())
        .build()
        .unwrap();
    Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
        .with_config(bounded())
        .run()
        .await
        .expect("the run goes on");
    assert_eq!(out.contents().len(), 4);
    let letters: Vec<DeadLetterRecord> = dead.inner.contents().into_values().collect();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    let payload = stream_payload_of_bad_record();
    assert!(
        letter.truncated && payload.starts_with(&letter.data),
        "{letter:?}"
    );
    assert_eq!(
        letter.stored_at.as_deref(),
        Some("memory:overflowed/bad/0/shard-0/2-0"),
        "the letter says where the whole payload is"
    );
    let stored = overflow.objects();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored["overflowed/bad/0/shard-0/2-0"], payload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_overflow_store_backs_its_shard_off_and_loses_nothing() {
    let stream = two_shards_with_a_bad_record();
    let dead = Limited {
        inner: MemorySink::new("dead"),
        max: Some(100),
    };
    let overflow = Arc::new(MemoryPayloadStore::new());
    overflow.set_failing(true);
    let out = MemorySink::new("out");
    let topology = Topology::builder("overflowed")
        .dead_letter(DeadLetter::to_with_overflow(
            dead.clone(),
            Arc::clone(&overflow),
        ))
        .source(stream.clone().json::<Click>())
        .sink(out.clone())
        .build()
        .unwrap();
    let config = RuntimeConfig {
        sink_backoff: shardflow::core::runtime::SinkBackoff {
            first_pause: Duration::from_millis(20),
            max_pause: Duration::from_millis(100),
            attempts: 1_000,
            cool_down: Duration::from_millis(300),
        },
        ..bounded()
    };
    let run = tokio::spawn(
        Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
            .with_config(config)
            .run(),
    );
    // The other shard goes on, and the bad record's is tried again after pauses.
    let shard_1 = || {
        out.contents()
            .keys()
            .filter(|(s, _)| s.as_str() == "shard-1")
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while (shard_1() < 2 || overflow.puts() < 3) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(shard_1(), 2, "the other shard went on");
    assert!(overflow.puts() >= 3, "tried again: {}", overflow.puts());
    assert!(
        dead.inner.contents().is_empty(),
        "no letter without its payload"
    );
    assert!(
        out.contents().len() < 4,
        "shard 0 waits at its bad record: nothing after it is written"
    );
    overflow.set_failing(false);
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the run ends once the store answers")
        .unwrap()
        .expect("a store that failed for a while never fails the run");
    assert_eq!(out.contents().len(), 4);
    assert_eq!(dead.inner.contents().len(), 1, "one letter, once");
    assert_eq!(overflow.objects().len(), 1);
}

/// Counts, and panics computing the result of a count of seven (a bug in user code that
/// only shows when a window closes).
#[derive(Clone)]
struct SevenPanics;

impl shardflow::operators::Aggregator<Click> for SevenPanics {
    type Acc = u64;
    type Out = u64;
    fn init(&self, _first: &Click) -> u64 {
        0
    }
    fn add(&self, acc: &mut u64, _value: &Click) {
        *acc += 1;
    }
    fn merge(&self, acc: &mut u64, other: u64) {
        *acc += other;
    }
    fn result(&self, acc: &u64) -> u64 {
        assert!(*acc != 7, "no result for seven");
        *acc
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_closing_a_window_stops_only_its_shard() {
    // No input record stands behind a window's result: a panic computing it (or closing the
    // window) cannot be dead-lettered, and the run failed with it. Now its shard stops,
    // visibly, and the other shard goes on.
    let stream = MemoryStream::new("result-panics", 2);
    for i in 0..10 {
        push(&stream, 0, "a", i);
    }
    for i in 0..7 {
        push(&stream, 1, "b", i);
    }
    // A second window on shard 1 closes the first while records are read, not at the end.
    push(&stream, 1, "b", 5_000);
    let counts = MemorySink::new("counts");
    let dead = MemorySink::<DeadLetterRecord>::new("dead");
    let topology = Topology::builder("result-panics")
        .dead_letter(DeadLetter::to(dead.clone()))
        .source(stream.clone().json::<Click>())
        .event_time(|c: &Click| c.ts)
        .key_by(|c: &Click| c.user.clone())
        .window(TumblingWindow::of(Duration::from_secs(1)))
        .aggregate(SevenPanics)
        .sink(counts.clone())
        .build()
        .unwrap();
    let error = Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
        .with_config(bounded())
        .run()
        .await
        .expect_err("the stopped shard is reported");
    let shown = error.to_string();
    assert!(
        shown.contains("shard-1") && shown.contains("panicked outside any record"),
        "{shown}"
    );
    assert!(!shown.contains("shard-0"), "{shown}");
    let got: Vec<(String, String, u64)> = counts
        .contents()
        .into_iter()
        .map(|((shard, _), r): (_, WindowResult<String, u64>)| {
            (shard.as_str().to_owned(), r.key, r.value)
        })
        .collect();
    assert_eq!(
        got,
        [("shard-0".to_owned(), "a".to_owned(), 10)],
        "the other shard went on"
    );
    assert!(dead.contents().is_empty(), "nothing to dead-letter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_rule_after_key_by_still_fails_the_run_instead_of_stopping_a_shard() {
    // Closing a window runs the operators after it: a rule they break (a second output from
    // a one-output operator) is a bug in the topology, which fails the run, not a panic of one
    // shard's state to stop that shard for.
    let stream = MemoryStream::new("keyed-rule", 2);
    push(&stream, 0, "a", 1);
    push(&stream, 1, "b", 2);
    let out = MemorySink::new("out");
    let topology = Topology::builder("keyed-rule")
        .dead_letter(DeadLetter::to(MemorySink::<DeadLetterRecord>::new("dead")))
        .source(stream.clone().json::<Click>())
        .event_time(|c: &Click| c.ts)
        .key_by(|c: &Click| c.user.clone())
        .window(TumblingWindow::of(Duration::from_secs(1)))
        .aggregate(Count)
        .stateless("twice", || {
            |cx: &shardflow::core::topology::RecordCx,
             r: WindowResult<String, u64>,
             out: &mut shardflow::core::topology::Collector<'_, WindowResult<String, u64>>| {
                out.emit(cx, r.clone());
                out.emit(cx, r);
            }
        })
        .sink(out.clone())
        .build()
        .unwrap();
    let error = Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
        .with_config(bounded())
        .run()
        .await
        .expect_err("a broken rule fails the run");
    assert!(
        !matches!(error, shardflow::core::error::Error::ShardStopped(_)),
        "not charged to a shard: {error}"
    );
    assert!(out.contents().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_panic_that_reads_like_a_broken_rule_still_costs_only_its_record() {
    // A user function whose panic message is made from the input: a record crafted to start
    // it like the runtime's own rule panic must not fail the run (and every restart).
    let stream = MemoryStream::new("fake-rule", 1);
    push(
        &stream,
        0,
        "shardflow: the topology broke a rule of the runtime: ",
        1,
    );
    push(&stream, 0, "a", 2);
    let dead = MemorySink::<DeadLetterRecord>::new("dead");
    let out = MemorySink::new("out");
    let topology = Topology::builder("fake-rule")
        .dead_letter(DeadLetter::to(dead.clone()))
        .source(stream.clone().json::<Click>())
        .map(|c: Click| {
            assert!(c.user == "a", "{}", c.user);
            c
        })
        .sink(out.clone())
        .build()
        .unwrap();
    Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
        .with_config(bounded())
        .run()
        .await
        .expect("a user's panic costs its record");
    assert_eq!(dead.contents().len(), 1);
    assert_eq!(out.contents().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_fail_after_key_by_is_a_broken_rule_that_fails_the_run() {
    let stream = MemoryStream::new("fail-after-key-by", 1);
    push(&stream, 0, "a", 1);
    let out = MemorySink::new("out");
    let topology = Topology::builder("fail-after-key-by")
        .dead_letter(DeadLetter::to(MemorySink::<DeadLetterRecord>::new("dead")))
        .source(stream.clone().json::<Click>())
        .event_time(|c: &Click| c.ts)
        .key_by(|c: &Click| c.user.clone())
        .window(TumblingWindow::of(Duration::from_secs(1)))
        .aggregate(Count)
        .stateless("fails", || {
            |cx: &shardflow::core::topology::RecordCx,
             _r: WindowResult<String, u64>,
             out: &mut shardflow::core::topology::Collector<'_, WindowResult<String, u64>>| {
                out.fail(cx, "fails", "no record to blame");
            }
        })
        .sink(out.clone())
        .build()
        .unwrap();
    let error = Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
        .with_config(bounded())
        .run()
        .await
        .expect_err("a broken rule fails the run");
    assert!(
        !matches!(error, shardflow::core::error::Error::ShardStopped(_)),
        "not charged to a shard: {error}"
    );
}
