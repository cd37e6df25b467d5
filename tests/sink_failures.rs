//! Failure isolation: a sink that fails after its own retries backs its shards off and starts
//! them again from their checkpoints; it never fails the run (issue 14).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shardflow::core::error::SinkError;
use shardflow::core::memory::MemoryStream;
use shardflow::core::runtime::SinkBackoff;
use shardflow::core::sink::{OutputBatch, SinkContext, SinkWriter};
use shardflow::operators::WindowResult;
use shardflow::prelude::*;
use shardflow::{LeaseStore, MemoryLeaseStore, MemorySink, Metrics, ShardId, Sink};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Click {
    user: String,
    ts: i64,
}

fn stream_of(records: usize, shards: usize) -> MemoryStream {
    users_by(records, shards, |i| i % 3)
}

/// `records` clicks round-robin over `shards`, the i-th by user `["a", "b", "c"][user(i)]`.
fn users_by(records: usize, shards: usize, user: impl Fn(usize) -> usize) -> MemoryStream {
    let stream = MemoryStream::new("clicks", shards);
    for i in 0..records {
        let user = ["a", "b", "c"][user(i)];
        let json = serde_json::to_vec(&Click {
            user: user.into(),
            ts: i as i64 * 10,
        })
        .unwrap();
        stream.push(i % shards, i as i64 * 10, user.as_bytes(), &json);
    }
    stream
}

/// A sink whose commits fail (as a throttled table does once the writer's own retries are
/// spent) while `failures` lasts: every writer's, or with `one_writer` only the first opened
/// (one keyed worker fails while the others commit).
struct Flaky<T> {
    inner: MemorySink<T>,
    failures: Arc<AtomicU32>,
    one_writer: bool,
    claimed: Arc<std::sync::atomic::AtomicBool>,
}

impl<T: Clone + Send + Sync + 'static> Flaky<T> {
    fn new(name: &str, failures: u32, one_writer: bool) -> Self {
        Self {
            inner: MemorySink::new(name),
            failures: Arc::new(AtomicU32::new(failures)),
            one_writer,
            claimed: Arc::default(),
        }
    }
}

impl<T> Clone for Flaky<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            failures: Arc::clone(&self.failures),
            one_writer: self.one_writer,
            claimed: Arc::clone(&self.claimed),
        }
    }
}

struct FlakyWriter<T> {
    inner: Box<dyn SinkWriter<T>>,
    failures: Option<Arc<AtomicU32>>,
}

#[async_trait::async_trait]
impl<T: Clone + Send + Sync + 'static> Sink<T> for Flaky<T> {
    fn name(&self) -> &str {
        "flaky"
    }
    async fn open(&self, cx: &SinkContext) -> Result<Box<dyn SinkWriter<T>>, SinkError> {
        let fails = !self.one_writer || !self.claimed.swap(true, Ordering::SeqCst);
        Ok(Box::new(FlakyWriter {
            inner: self.inner.open(cx).await?,
            failures: fails.then(|| Arc::clone(&self.failures)),
        }))
    }
}

#[async_trait::async_trait]
impl<T: Send + 'static> SinkWriter<T> for FlakyWriter<T> {
    async fn write(&mut self, batch: OutputBatch<T>) -> Result<(), SinkError> {
        self.inner.write(batch).await
    }
    async fn commit(&mut self) -> Result<(), SinkError> {
        let failing = self.failures.as_ref().is_some_and(|f| {
            f.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        });
        if failing {
            return Err(SinkError {
                sink: "flaky".into(),
                operation: "commit",
                retryable: true,
                source: "throttled (retries spent)".into(),
            });
        }
        self.inner.commit().await
    }
    fn release_shard(&mut self, shard: &ShardId) {
        self.inner.release_shard(shard);
    }
}

fn config(backoff: SinkBackoff) -> RuntimeConfig {
    RuntimeConfig {
        worker_id: "test-worker".into(),
        parallelism: 2,
        mode: RunMode::UntilCaughtUp,
        checkpoint_interval: Duration::from_millis(20),
        lease_duration: Duration::from_millis(400),
        sink_backoff: backoff,
        ..RuntimeConfig::default()
    }
}

fn quick(attempts: u32) -> SinkBackoff {
    SinkBackoff {
        first_pause: Duration::from_millis(20),
        max_pause: Duration::from_millis(100),
        attempts,
        cool_down: Duration::from_millis(300),
    }
}

fn failures_of(registry: &prometheus::Registry) -> f64 {
    counter_sum(registry, "shardflow_shard_sink_failures_total")
}

/// The sum of a counter over all its labels.
fn counter_sum(registry: &prometheus::Registry, name: &str) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter().map(|m| m.get_counter().get_value()))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_sink_on_the_shard_path_backs_its_shard_off_and_every_record_lands_once() {
    let stream = stream_of(60, 2);
    let failing = Flaky::new("out", 3, false);
    let topology = Topology::builder("shard-path")
        .source(stream.clone().json::<Click>())
        .map(|c: Click| c.ts)
        .sink(failing.clone())
        .build()
        .unwrap();
    let registry = prometheus::Registry::new();
    Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
        .with_config(config(quick(5)))
        .with_metrics(Metrics::new(&registry))
        .run()
        .await
        .expect("a sink failing for a while does not fail the run");
    let mut got: Vec<i64> = failing.inner.contents().into_values().collect();
    got.sort_unstable();
    let want: Vec<i64> = (0..60).map(|i| i * 10).collect();
    assert_eq!(got, want, "every record once");
    assert_eq!(failing.failures.load(Ordering::SeqCst), 0);
    assert_eq!(
        failures_of(&registry),
        3.0,
        "each failure backed a shard off"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_sink_on_a_keyed_path_backs_off_the_shards_it_held_and_counts_stay_right() {
    let stream = stream_of(90, 3);
    // One keyed worker fails; the other commits the same shards' results and keeps their
    // state, which the shards' next lives must not build on.
    let failing = Flaky::new("counts", 2, true);
    let topology = Topology::builder("keyed-path")
        .source(stream.clone().json::<Click>())
        .event_time(|c: &Click| c.ts)
        .key_by(|c: &Click| c.user.clone())
        .window(TumblingWindow::of(Duration::from_millis(300)))
        .aggregate(Count)
        .sink(failing.clone())
        .build()
        .unwrap();
    let registry = prometheus::Registry::new();
    Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
        .with_config(config(quick(6)))
        .with_metrics(Metrics::new(&registry))
        .run()
        .await
        .expect("a keyed sink failing for a while does not fail the run");
    let got = failing.inner.contents();
    // Per shard (i % 3) each user has one record in 3 of a window's 30 ms slots... count it.
    let mut want = std::collections::BTreeMap::new();
    for i in 0..90usize {
        let shard = format!("shard-{}", i % 3);
        let user = ["a", "b", "c"][i % 3];
        let start = (i as i64 * 10) / 300 * 300;
        *want.entry((shard, user.to_owned(), start)).or_insert(0u64) += 1;
    }
    let got: std::collections::BTreeMap<_, u64> = got
        .iter()
        .map(|((shard, _), r)| {
            (
                (shard.as_str().to_owned(), r.key.clone(), r.window.start),
                r.value,
            )
        })
        .collect();
    assert_eq!(got, want);
    // A writer that failed is replaced by a new one, which does not fail.
    assert_eq!(failing.failures.load(Ordering::SeqCst), 1);
    assert!(failures_of(&registry) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_keeps_failing_fails_a_bounded_run_after_its_pauses_and_the_leases_are_released(
) {
    let stream = stream_of(20, 2);
    let failing = Flaky::new("out", u32::MAX, false);
    let topology = Topology::builder("hopeless")
        .source(stream.clone().json::<Click>())
        .map(|c: Click| c.ts)
        .sink(failing.clone())
        .build()
        .unwrap();
    let leases = Arc::new(MemoryLeaseStore::new());
    let error = Runtime::new(topology, leases.clone())
        .with_config(config(quick(2)))
        .run()
        .await
        .expect_err("nothing can be written");
    assert!(
        error.to_string().contains("throttled"),
        "the sink's own error: {error}"
    );
    for lease in leases.list().await.unwrap() {
        assert_eq!(
            lease.owner, None,
            "a failed run releases its leases: {lease:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shards_next_life_never_builds_on_state_an_earlier_life_left_in_a_keyed_worker() {
    // Running totals: state a keyed worker keeps after the input ends. One worker's commit
    // fails at the end of the input, after its shards finished; the other worker committed,
    // and still holds their totals when the shards start again from their checkpoints.
    for _ in 0..3 {
        // Every shard has every user, so both workers hold state of every shard.
        let stream = users_by(90, 3, |i| (i / 3) % 3);
        let failing = Flaky::new("totals", 1, true);
        let topology = Topology::builder("running")
            .source(stream.clone().json::<Click>())
            .key_by(|c: &Click| c.user.clone())
            .aggregate(Count)
            .sink(failing.clone())
            .build()
            .unwrap();
        let registry = prometheus::Registry::new();
        Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
            .with_config(config(quick(6)))
            .with_metrics(Metrics::new(&registry))
            .run()
            .await
            .expect("the run goes on");
        assert!(failures_of(&registry) >= 1.0);
        // Running results are per source shard: each shard holds ten clicks of each user.
        let got: Vec<(String, String, u64)> = failing
            .inner
            .contents()
            .into_iter()
            .map(|((shard, _), r)| (shard.as_str().to_owned(), r.key, r.value))
            .collect();
        let want: Vec<(String, String, u64)> = (0..3)
            .flat_map(|s| ["a", "b", "c"].map(|u| (format!("shard-{s}"), u.to_owned(), 10)))
            .collect();
        assert_eq!(got, want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuous_run_lets_a_hopeless_shard_go_and_stops_without_waiting_out_its_cool_down() {
    let stream = stream_of(20, 1);
    let failing = Flaky::new("out", u32::MAX, false);
    let topology = Topology::builder("let-go")
        .source(stream.clone().json::<Click>())
        .map(|c: Click| c.ts)
        .sink(failing.clone())
        .build()
        .unwrap();
    let registry = prometheus::Registry::new();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let leases = Arc::new(MemoryLeaseStore::new());
    let backoff = SinkBackoff {
        cool_down: Duration::from_secs(600),
        ..quick(1)
    };
    let run = tokio::spawn(
        Runtime::new(topology, leases.clone())
            .with_config(RuntimeConfig {
                mode: RunMode::Continuous,
                ..config(backoff)
            })
            .with_metrics(Metrics::new(&registry))
            .with_shutdown(shutdown.clone())
            .run(),
    );
    let let_go = || {
        registry
            .gather()
            .iter()
            .filter(|f| f.name() == "shardflow_shards_let_go_total")
            .flat_map(|f| f.get_metric().iter().map(|m| m.get_counter().get_value()))
            .sum::<f64>()
    };
    while let_go() < 1.0 {
        assert!(
            !run.is_finished(),
            "a failing sink does not end a continuous run"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let go: the lease is no longer renewed, so another worker takes it once it expired.
    let before = leases
        .get(&lease_key("clicks", "shard-0"))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = leases
        .get(&lease_key("clicks", "shard-0"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.counter, before.counter, "not renewed: {after:?}");
    assert!(
        after
            .owner
            .as_deref()
            .is_some_and(|o| o.starts_with("test-worker")),
        "not released either (a keyed commit of the life may be under way): {after:?}"
    );
    assert!(!run.is_finished());
    shutdown.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the stop does not wait out a ten-minute cool-down")
        .unwrap();
    ended.expect("a stopped run with a shard let go is not a failure");
}

/// A sink whose items have a size limit, as DynamoDB's do: `check` refuses results with keys
/// over 100 bytes, and a write of one fails (every time: retrying cannot help).
#[derive(Clone)]
struct KeyLimited {
    inner: MemorySink<WindowResult<String, u64>>,
}

struct KeyLimitedWriter {
    inner: Box<dyn SinkWriter<WindowResult<String, u64>>>,
}

#[async_trait::async_trait]
impl Sink<WindowResult<String, u64>> for KeyLimited {
    fn name(&self) -> &str {
        "key-limited"
    }
    async fn open(
        &self,
        cx: &SinkContext,
    ) -> Result<Box<dyn SinkWriter<WindowResult<String, u64>>>, SinkError> {
        Ok(Box::new(KeyLimitedWriter {
            inner: self.inner.open(cx).await?,
        }))
    }
    fn check(&self, result: &WindowResult<String, u64>) -> Result<(), String> {
        if result.key.len() > 100 {
            return Err(format!(
                "item of {} key bytes is over the limit",
                result.key.len()
            ));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl SinkWriter<WindowResult<String, u64>> for KeyLimitedWriter {
    async fn write(
        &mut self,
        batch: OutputBatch<WindowResult<String, u64>>,
    ) -> Result<(), SinkError> {
        if batch.outputs.iter().any(|o| o.value.key.len() > 100) {
            return Err(SinkError {
                sink: "key-limited".into(),
                operation: "write",
                retryable: false,
                source: "item too large".into(),
            });
        }
        self.inner.write(batch).await
    }
    async fn commit(&mut self) -> Result<(), SinkError> {
        self.inner.commit().await
    }
    fn release_shard(&mut self, shard: &ShardId) {
        self.inner.release_shard(shard);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_result_its_sink_refuses_stops_only_its_shard() {
    // One keyed worker serves both shards, so one commit holds both shards' results. Before,
    // the refused result failed every write of the commit: both shards backed off again and
    // again, the healthy one too, and the run failed.
    let stream = MemoryStream::new("clicks", 2);
    let long = "x".repeat(300);
    for i in 0..20usize {
        let user = if i == 4 { long.as_str() } else { "a" };
        let json = serde_json::to_vec(&Click {
            user: user.into(),
            ts: i as i64 * 10,
        })
        .unwrap();
        stream.push(i % 2, i as i64 * 10, b"pk", &json);
    }
    let sink = KeyLimited {
        inner: MemorySink::new("counts"),
    };
    let topology = Topology::builder("refused")
        .source(stream.clone().json::<Click>())
        .event_time(|c: &Click| c.ts)
        .key_by(|c: &Click| c.user.clone())
        .window(TumblingWindow::of(Duration::from_secs(1)))
        .aggregate(Count)
        .sink(sink.clone())
        .build()
        .unwrap();
    let leases = Arc::new(MemoryLeaseStore::new());
    let error = Runtime::new(topology, leases.clone())
        .with_config(RuntimeConfig {
            parallelism: 1,
            ..config(quick(3))
        })
        .run()
        .await
        .expect_err("the stopped shard is reported");
    let shown = error.to_string();
    assert!(
        shown.contains("shard-0") && shown.contains("refused a keyed result"),
        "{shown}"
    );
    assert!(!shown.contains(&long), "the key is not quoted");
    let got: Vec<(String, String, u64)> = sink
        .inner
        .contents()
        .into_iter()
        .map(|((shard, _), r)| (shard.as_str().to_owned(), r.key, r.value))
        .collect();
    assert_eq!(
        got,
        [("shard-1".to_owned(), "a".to_owned(), 10)],
        "the healthy shard went on"
    );
    let lease = leases
        .get(&lease_key("clicks", "shard-0"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        lease.checkpoint.committed,
        shardflow::core::lease::CheckpointPosition::Initial,
        "the stopped shard's checkpoint stays before the result"
    );
}

/// The lease key of `shard` of the memory stream `stream` (created at time 0).
fn lease_key(stream: &str, shard: &str) -> String {
    shardflow::core::protocol::lease_keys::StreamScope::new(stream, 0).key(shard)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_result_its_sink_refuses_is_a_keyed_dead_letter_and_the_run_goes_on() {
    // As above, with a dead-letter sink: the refused result becomes a keyed dead letter
    // (topology, sink, key, window, size) and its shard goes on to the end of its input.
    let stream = MemoryStream::new("clicks", 2);
    let long = "x".repeat(300);
    let mut last_of_shard_0 = 0;
    for i in 0..20usize {
        let user = if i == 4 { long.as_str() } else { "a" };
        let json = serde_json::to_vec(&Click {
            user: user.into(),
            ts: i as i64 * 10,
        })
        .unwrap();
        let seq = stream.push(i % 2, i as i64 * 10, b"pk", &json);
        if i % 2 == 0 {
            last_of_shard_0 = seq;
        }
    }
    let sink = KeyLimited {
        inner: MemorySink::new("counts"),
    };
    let dead = MemorySink::<shardflow::DeadLetterRecord>::new("dead");
    let registry = prometheus::Registry::new();
    let topology = || {
        Topology::builder("refused")
            .dead_letter(DeadLetter::to(dead.clone()))
            .source(stream.clone().json::<Click>())
            .event_time(|c: &Click| c.ts)
            .key_by(|c: &Click| c.user.clone())
            .window(TumblingWindow::of(Duration::from_secs(1)))
            .aggregate(Count)
            .sink(sink.clone())
            .build()
            .unwrap()
    };
    let leases = Arc::new(MemoryLeaseStore::new());
    for run in 0..2 {
        Runtime::new(topology(), leases.clone())
            .with_config(RuntimeConfig {
                parallelism: 1,
                ..config(quick(3))
            })
            .with_metrics(Metrics::new(&registry))
            .run()
            .await
            .unwrap_or_else(|e| panic!("run {run}: a refused result costs itself: {e}"));
    }
    let got: Vec<(String, String, u64)> = sink
        .inner
        .contents()
        .into_iter()
        .map(|((shard, _), r)| (shard.as_str().to_owned(), r.key, r.value))
        .collect();
    assert_eq!(
        got,
        [
            ("shard-0".to_owned(), "a".to_owned(), 9),
            ("shard-1".to_owned(), "a".to_owned(), 10)
        ],
        "both shards went on"
    );
    let letters: Vec<shardflow::DeadLetterRecord> = dead.contents().into_values().collect();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    let result = letter.result.as_ref().expect("a keyed dead letter");
    assert_eq!(letter.shard.as_str(), "shard-0");
    assert_eq!(letter.stream, "clicks");
    assert_eq!(letter.stage, "sink key-limited");
    assert!(letter.data.is_empty() && letter.size == 0);
    assert!(letter.error.contains("300 key bytes"), "{}", letter.error);
    assert!(
        !letter.error.contains(&long),
        "the reason does not quote the key"
    );
    assert_eq!(
        (result.topology.as_str(), result.sink.as_str()),
        ("refused", "key-limited")
    );
    assert_eq!(result.key, long);
    assert_eq!(result.window.map(|w| (w.start, w.end)), Some((0, 1000)));
    let identity = shardflow::core::sink::OutputId::keyed(
        long.as_str().into(),
        Some(shardflow::core::sink::Window::new(0, 1000)),
    );
    assert_eq!(result.identity, identity.to_path());
    assert!(
        result.identity.len() < 200,
        "a long key's identity is shortened"
    );
    // The last record of shard-0 read before the window closed.
    assert_eq!(letter.position.sequence.as_u128(), Some(last_of_shard_0));
    // The second run emits the still-open window again at the end of its input, and its
    // letter with it: under the same identity, so one letter stands.
    assert_eq!(
        dead.writes() - dead.replaced(),
        1,
        "one letter over both runs"
    );
    let lease = leases
        .get(&lease_key("clicks", "shard-0"))
        .await
        .unwrap()
        .unwrap();
    assert_ne!(
        lease.checkpoint.committed,
        shardflow::core::lease::CheckpointPosition::Initial,
        "the shard's checkpoint passed the dead-lettered result"
    );
    let lettered = counter_sum(&registry, "shardflow_dead_letters_total");
    assert_eq!(lettered, 1.0);
}
