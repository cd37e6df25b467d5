//! Effectively-once under `kill -9`, against dynalite, moto's S3 (which enforces the S3 sink's
//! conditional writes) and kinesis-local (started by scripts/test.sh).
//!
//! A topology reads events with unique ids and writes the raw events to S3 (`S3Sink`) and
//! per-key tumbling-window counts to DynamoDB (`DynamoSink`). Its worker process is killed with
//! `kill -9` at random points, at least ten times, and restarted; a last run drains the input.
//! Then every input id is in S3 exactly once, every window count in DynamoDB equals the count
//! computed from the input, and the sinks absorbed duplicate deliveries (the replay path ran).
//! Twice: on the embedded backend with 1 M events written up front, and on kinesis-local with a
//! few thousand events produced while the worker is being killed.
//!
//! A third run is a fleet on kinesis-local: 8 shards shared by workers that join (leases handed
//! over), leave gracefully (SIGTERM), are killed (`kill -9`), are paused past their lease
//! (SIGSTOP, then SIGCONT), and one that starts with an id already in use; the same checks
//! hold, no worker's run fails, and the handoff and failover times read off the lease table
//! are printed.
//!
//! The test binary is also the worker (`effectively_once worker`, configured by environment).
//! Every output delivered to a sink is logged (identity per line), which is how duplicate
//! deliveries are counted.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

const TOPOLOGY: &str = "once";
const WINDOW: Duration = Duration::from_secs(10);
const KILLS: usize = 10;
/// The workers' lease duration: a restarted worker waits about this long (plus a shard sync)
/// before the killed one's leases are its own.
const LEASE: Duration = Duration::from_secs(1);
const KEYS: u64 = 50;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Event {
    id: u64,
    key: String,
    ts: i64,
}

fn event(id: u64) -> Event {
    Event {
        id,
        key: format!("k{}", id % KEYS),
        // 100 events per second of event time: a window closes every 1 000 events.
        ts: i64::try_from(id).unwrap() * 10,
    }
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("worker") {
        return worker::main();
    }
    // Behave like a libtest binary towards `cargo test [FILTER] [-- --list]`: run only when
    // no filter is given or one matches this test's name.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("effectively_once: test");
        return ExitCode::SUCCESS;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if !filters.is_empty()
        && !filters
            .iter()
            .any(|f| "effectively_once".contains(f.as_str()))
    {
        println!("effectively_once: filtered out");
        return ExitCode::SUCCESS;
    }
    scenario::main()
}

mod worker {
    //! The topology under test.

    use std::io::Write as _;
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::time::Duration;

    use anyhow::Context as _;
    use async_trait::async_trait;
    use shardflow::core::error::SinkError;
    use shardflow::core::sink::{Held, OutputBatch, SinkContext, SinkWriter};
    use shardflow::dynamodb::{DynamoLeaseStore, DynamoSink};
    use shardflow::kinesis::{KinesisSource, SpoutConfig};
    use shardflow::local::{LocalSource, LocalStream};
    use shardflow::prelude::*;
    use shardflow::s3::S3Sink;
    use shardflow::{AwsConfig, ShardId, Sink};

    use super::{Event, LEASE, TOPOLOGY, WINDOW};

    pub(super) fn main() -> std::process::ExitCode {
        // The worker's log (stderr, a file per worker) with times, for a failure's story.
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .init();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        match runtime.block_on(serve()) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("worker failed: {error:#}");
                std::process::ExitCode::FAILURE
            }
        }
    }

    fn var(name: &str) -> anyhow::Result<String> {
        std::env::var(name).with_context(|| format!("{name} is not set"))
    }

    async fn serve() -> anyhow::Result<()> {
        let dynamo = AwsConfig::emulator(var("SHARDFLOW_DYNAMODB_ENDPOINT")?)
            .dynamodb_client()
            .await;
        let s3 = AwsConfig::emulator(var("SHARDFLOW_S3_ENDPOINT")?)
            .static_credentials("S3RVER", "S3RVER")
            .s3_client()
            .await;
        let leases = DynamoLeaseStore::open(dynamo.clone(), var("LEASE_TABLE")?).await?;
        let counts =
            DynamoSink::<WindowResult<String, u64>>::open(dynamo, var("COUNTS_TABLE")?).await?;
        let raw = S3Sink::<Event>::json_lines(s3, var("BUCKET")?, "raw")
            .records_per_object(2_000)
            .max_latency(Duration::from_millis(500));
        let log: PathBuf = var("DELIVERY_LOG")?.into();
        let builder = Topology::builder(TOPOLOGY);
        let events = match var("BACKEND")?.as_str() {
            "local" => {
                let stream = LocalStream::open(var("STREAM_DIR")?, &var("STREAM")?)?;
                builder.source(LocalSource::new(&stream).json::<Event>())
            }
            "kinesis" => {
                let client = AwsConfig::emulator(var("SHARDFLOW_KINESIS_ENDPOINT")?)
                    .kinesis_client()
                    .await;
                let spout = SpoutConfig {
                    idle_min: Duration::from_millis(50),
                    idle_max: Duration::from_millis(200),
                    ..SpoutConfig::default()
                };
                builder.source(
                    KinesisSource::new(client, var("STREAM")?)
                        .with_config(spout)
                        .json::<Event>(),
                )
            }
            other => anyhow::bail!("BACKEND must be local or kinesis, not {other:?}"),
        };
        let events = events.event_time(|e: &Event| e.ts);
        events.clone().sink(Logged {
            inner: raw,
            log: log.clone(),
        });
        let topology = events
            .key_by(|e: &Event| e.key.clone())
            .window(TumblingWindow::of(WINDOW))
            .aggregate(Count)
            .sink(Logged { inner: counts, log })
            .build()?;
        let mode = if var("MODE")? == "drain" {
            RunMode::UntilCaughtUp
        } else {
            RunMode::Continuous
        };
        let config = RuntimeConfig {
            // The same worker id after every restart, as a supervisor gives it: each run is a
            // new incarnation, which takes the killed one's leases once they expired.
            worker_id: std::env::var("WORKER_ID").unwrap_or_else(|_| "once-worker".into()),
            parallelism: 2,
            checkpoint_interval: Duration::from_millis(100),
            lease_duration: LEASE,
            shard_sync_interval: Duration::from_millis(500),
            idle_wait: Duration::from_millis(50),
            mode,
            ..RuntimeConfig::default()
        };
        // SIGTERM stops gracefully: epochs drained, checkpoints written, leases released.
        Runtime::new(topology, Arc::new(leases))
            .with_config(config)
            .with_shutdown(shardflow::ops::shutdown_on_signals()?)
            .run()
            .await?;
        Ok(())
    }

    /// Appends the identity of every output delivered to `inner` (one line each) to `log`.
    struct Logged<S> {
        inner: S,
        log: PathBuf,
    }

    struct LoggedWriter<T> {
        inner: Box<dyn SinkWriter<T>>,
        log: PathBuf,
        name: String,
    }

    #[async_trait]
    impl<T: Send + 'static, S: Sink<T>> Sink<T> for Logged<S> {
        fn name(&self) -> &str {
            self.inner.name()
        }

        fn check(&self, value: &T) -> Result<(), String> {
            self.inner.check(value)
        }

        fn holds_record_outputs(&self) -> bool {
            self.inner.holds_record_outputs()
        }

        async fn open(&self, cx: &SinkContext) -> Result<Box<dyn SinkWriter<T>>, SinkError> {
            Ok(Box::new(LoggedWriter {
                inner: self.inner.open(cx).await?,
                log: self.log.clone(),
                name: self.inner.name().to_owned(),
            }))
        }
    }

    #[async_trait]
    impl<T: Send + 'static> SinkWriter<T> for LoggedWriter<T> {
        async fn write(&mut self, batch: OutputBatch<T>) -> Result<(), SinkError> {
            let mut lines = String::new();
            for output in &batch.outputs {
                lines.push_str(&format!(
                    "{} {} {}\n",
                    self.name,
                    batch.shard.as_str(),
                    output.id.to_path()
                ));
            }
            let appended = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .and_then(|mut f| f.write_all(lines.as_bytes()));
            if let Err(e) = appended {
                return Err(SinkError {
                    sink: self.name.clone(),
                    operation: "log",
                    retryable: true,
                    source: Box::new(e),
                });
            }
            self.inner.write(batch).await
        }

        async fn commit(&mut self) -> Result<(), SinkError> {
            self.inner.commit().await
        }

        fn held(&self) -> Vec<(ShardId, Held)> {
            self.inner.held()
        }

        async fn end_shard(&mut self, shard: &ShardId) -> Result<(), SinkError> {
            self.inner.end_shard(shard).await
        }

        fn release_shard(&mut self, shard: &ShardId) {
            self.inner.release_shard(shard);
        }

        fn bytes_written(&self) -> u64 {
            self.inner.bytes_written()
        }
    }
}

mod scenario {
    //! The driver.

    use super::*;

    use std::collections::BTreeMap;

    use shardflow::dynamodb::DynamoLeaseStore;
    use shardflow::kinesis::{KinesisProducer, ProducerConfig, StreamAdmin};
    use shardflow::local::{LocalProducer, LocalStream, LocalStreamConfig};
    use shardflow::AwsConfig;

    pub(super) fn main() -> ExitCode {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        // `SHARDFLOW_ONCE_RUNS=fleet` (a comma-separated list of local, kinesis, fleet) runs
        // only some of the three, when working on one.
        let runs =
            std::env::var("SHARDFLOW_ONCE_RUNS").unwrap_or_else(|_| "local,kinesis,fleet".into());
        let runs: Vec<&str> = runs.split(',').collect();
        runtime.block_on(async {
            if runs.contains(&"local") {
                local_backend().await;
            }
            if runs.contains(&"kinesis") {
                kinesis_backend().await;
            }
            if runs.contains(&"fleet") {
                fleet().await;
            }
        });
        println!("effectively_once: ok");
        ExitCode::SUCCESS
    }

    fn endpoint(var: &str) -> String {
        std::env::var(var).unwrap_or_else(|_| {
            panic!("{var} is not set: run scripts/test.sh, which starts the emulators")
        })
    }

    struct Setup {
        env: Vec<(&'static str, String)>,
        lease_table: String,
        dir: tempfile::TempDir,
        bucket: String,
        counts_table: String,
        s3: aws_sdk_s3::Client,
        dynamo: aws_sdk_dynamodb::Client,
    }

    async fn setup(backend: &str, stream: &str) -> Setup {
        let suffix = format!("{}-{}", std::process::id(), rand::random::<u32>());
        let dynamo = AwsConfig::emulator(endpoint("SHARDFLOW_DYNAMODB_ENDPOINT"))
            .dynamodb_client()
            .await;
        let s3 = AwsConfig::emulator(endpoint("SHARDFLOW_MOTO_S3_ENDPOINT"))
            .static_credentials("S3RVER", "S3RVER")
            .s3_client()
            .await;
        let bucket = format!("once-{suffix}");
        s3.create_bucket().bucket(&bucket).send().await.unwrap();
        let lease_table = format!("once-leases-{suffix}");
        let counts_table = format!("once-counts-{suffix}");
        // Created here once, so that a worker killed while creating one leaves no half-state.
        DynamoLeaseStore::open(dynamo.clone(), &lease_table)
            .await
            .unwrap();
        shardflow::dynamodb::DynamoSink::<u64>::open(dynamo.clone(), &counts_table) // creates the table
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let env = vec![
            ("BACKEND", backend.to_owned()),
            ("STREAM", stream.to_owned()),
            (
                "STREAM_DIR",
                dir.path().join("stream").display().to_string(),
            ),
            ("LEASE_TABLE", lease_table.clone()),
            ("COUNTS_TABLE", counts_table.clone()),
            ("BUCKET", bucket.clone()),
            (
                "DELIVERY_LOG",
                dir.path().join("deliveries.log").display().to_string(),
            ),
            (
                "SHARDFLOW_DYNAMODB_ENDPOINT",
                endpoint("SHARDFLOW_DYNAMODB_ENDPOINT"),
            ),
            // The worker's S3 is moto's: it refuses a store whose condition broke.
            (
                "SHARDFLOW_S3_ENDPOINT",
                endpoint("SHARDFLOW_MOTO_S3_ENDPOINT"),
            ),
            (
                "SHARDFLOW_KINESIS_ENDPOINT",
                endpoint("SHARDFLOW_KINESIS_ENDPOINT"),
            ),
        ];
        Setup {
            env,
            lease_table,
            dir,
            bucket,
            counts_table,
            s3,
            dynamo,
        }
    }

    fn worker(setup: &Setup, mode: &str, log: &Path) -> std::process::Child {
        worker_as(setup, "once-worker", mode, log)
    }

    fn worker_as(setup: &Setup, id: &str, mode: &str, log: &Path) -> std::process::Child {
        Command::new(std::env::current_exe().unwrap())
            .arg("worker")
            .envs(setup.env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("MODE", mode)
            .env("WORKER_ID", id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .unwrap(),
            )
            .spawn()
            .expect("spawn worker")
    }

    /// How often each id appears across every S3 object.
    async fn ids_in_s3(setup: &Setup, expected: usize) -> Vec<u32> {
        let mut seen = vec![0u32; expected];
        let mut token = None;
        loop {
            let page = setup
                .s3
                .list_objects_v2()
                .bucket(&setup.bucket)
                .set_continuation_token(token.take())
                .send()
                .await
                .unwrap();
            for object in page.contents() {
                let body = setup
                    .s3
                    .get_object()
                    .bucket(&setup.bucket)
                    .key(object.key().unwrap())
                    .send()
                    .await
                    .unwrap()
                    .body
                    .collect()
                    .await
                    .unwrap()
                    .into_bytes();
                for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                    #[derive(Deserialize)]
                    struct Line {
                        value: Event,
                    }
                    let line: Line = serde_json::from_slice(line).unwrap();
                    seen[usize::try_from(line.value.id).unwrap()] += 1;
                }
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => break,
            }
        }
        seen
    }

    /// Prints, for a failed check, the id ranges missing or repeated, every object's key,
    /// metadata and id range (the first page of the listing; ids are positions in the input),
    /// and the worker log's last lines.
    async fn describe_s3(setup: &Setup, seen: &[u32]) {
        let mut ranges: Vec<(usize, usize, u32)> = Vec::new();
        for (id, count) in seen.iter().enumerate() {
            if *count == 1 {
                continue;
            }
            match ranges.last_mut() {
                Some((_, end, c)) if *end + 1 == id && *c == *count => *end = id,
                _ => ranges.push((id, id, *count)),
            }
        }
        eprintln!("ids not seen exactly once (first..=last: times seen):");
        for (first, last, count) in ranges.iter().take(40) {
            eprintln!("  {first}..={last}: {count}");
        }
        if ranges.len() > 40 {
            eprintln!("  ... {} more ranges", ranges.len() - 40);
        }
        let page = setup
            .s3
            .list_objects_v2()
            .bucket(&setup.bucket)
            .send()
            .await
            .unwrap();
        eprintln!("objects:");
        for object in page.contents() {
            let key = object.key().unwrap();
            let got = setup
                .s3
                .get_object()
                .bucket(&setup.bucket)
                .key(key)
                .send()
                .await
                .unwrap();
            let metadata = got.metadata().cloned().unwrap_or_default();
            let body = got.body.collect().await.unwrap().into_bytes();
            let lines: Vec<&[u8]> = body
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .collect();
            // An object cut short (s3rver keeps a killed PUT's part) shows as unparsed lines.
            let ids: Vec<u64> = lines
                .iter()
                .filter_map(|l| serde_json::from_slice::<serde_json::Value>(l).ok())
                .filter_map(|v| v["value"]["id"].as_u64())
                .collect();
            eprintln!(
                "  {key} {:?} ids {:?}..={:?} ({} lines, {} unparsed)",
                metadata.iter().collect::<BTreeMap<_, _>>(),
                ids.iter().min(),
                ids.iter().max(),
                lines.len(),
                lines.len() - ids.len()
            );
        }
        let kept = setup.dir.path().to_path_buf();
        let log = std::fs::read_to_string(kept.join("worker.log")).unwrap_or_default();
        eprintln!("worker log (last 60 lines):");
        for line in log
            .lines()
            .rev()
            .take(60)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            eprintln!("  {line}");
        }
    }

    /// Window counts in DynamoDB, summed over shards, by (key, window start).
    async fn counts_in_dynamodb(setup: &Setup) -> BTreeMap<(String, i64), u64> {
        let mut out = BTreeMap::new();
        let mut start = None;
        loop {
            let page = setup
                .dynamo
                .scan()
                .table_name(&setup.counts_table)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .unwrap();
            for item in page.items() {
                let key = item["key"].as_s().unwrap().clone();
                let window: i64 = item["windowStart"].as_n().unwrap().parse().unwrap();
                let count: u64 = item["value"].as_m().unwrap()["value"]
                    .as_n()
                    .unwrap()
                    .parse()
                    .unwrap();
                *out.entry((key, window)).or_insert(0) += count;
            }
            match page.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => break,
            }
        }
        out
    }

    fn expected_counts(n: u64) -> BTreeMap<(String, i64), u64> {
        let window_ms = i64::try_from(WINDOW.as_millis()).unwrap();
        let mut out = BTreeMap::new();
        for id in 0..n {
            let e = event(id);
            *out.entry((e.key, e.ts.div_euclid(window_ms) * window_ms))
                .or_insert(0) += 1;
        }
        out
    }

    /// Deliveries per sink in all, and how many repeated an identity delivered before.
    fn duplicate_deliveries(setup: &Setup) -> (usize, usize) {
        let text =
            std::fs::read_to_string(setup.dir.path().join("deliveries.log")).unwrap_or_default();
        let mut seen: HashMap<&str, u32> = HashMap::new();
        let mut total = 0;
        // A line torn by a kill is skipped: its delivery is counted by the replay anyway.
        for line in text.lines().filter(|l| l.split(' ').count() == 3) {
            total += 1;
            *seen.entry(line).or_default() += 1;
        }
        let duplicates = seen.values().map(|n| (n - 1) as usize).sum();
        (total, duplicates)
    }

    async fn verify(setup: &Setup, backend: &str, n: u64, kills: usize, took: Duration) {
        let seen = ids_in_s3(setup, usize::try_from(n).unwrap()).await;
        let missing = seen.iter().filter(|c| **c == 0).count();
        let repeated = seen.iter().filter(|c| **c > 1).count();
        if (missing, repeated) != (0, 0) {
            describe_s3(setup, &seen).await;
        }
        assert_eq!(
            (missing, repeated),
            (0, 0),
            "{backend}: every id in S3 exactly once"
        );
        assert_eq!(
            counts_in_dynamodb(setup).await,
            expected_counts(n),
            "{backend}: every window count equals the count from the input"
        );
        let (total, duplicates) = duplicate_deliveries(setup);
        assert!(
            duplicates > 0,
            "{backend}: replays delivered outputs again, which the sinks absorbed"
        );
        println!(
            "effectively_once[{backend}]: {n} events, {kills} kill -9s, {took:.1?}: every id once \
             in S3, every window count right; sinks absorbed {duplicates} duplicate deliveries \
             of {total}"
        );
    }

    async fn local_backend() {
        const EVENTS: u64 = 1_000_000;
        let setup = setup("local", "events").await;
        let stream = LocalStream::create(
            setup.dir.path().join("stream"),
            "events",
            4,
            LocalStreamConfig::new(),
        )
        .unwrap();
        let producer = LocalProducer::new(stream);
        let ids: Vec<u64> = (0..EVENTS).collect();
        for chunk in ids.chunks(10_000) {
            let records: Vec<(String, Vec<u8>)> = chunk
                .iter()
                .map(|id| {
                    let e = event(*id);
                    (e.key.clone(), serde_json::to_vec(&e).unwrap())
                })
                .collect();
            producer.put_batch(&records).await.unwrap();
        }
        let started = Instant::now();
        let kills = kill_and_drain(&setup, 400, 1_500, None).await;
        verify(&setup, "local", EVENTS, kills, started.elapsed()).await;
    }

    async fn kinesis_backend() {
        const EVENTS: u64 = 3_000;
        let stream = format!("once-{}-{}", std::process::id(), rand::random::<u32>());
        let setup = setup("kinesis", &stream).await;
        let client = AwsConfig::emulator(endpoint("SHARDFLOW_KINESIS_ENDPOINT"))
            .kinesis_client()
            .await;
        let admin = StreamAdmin::new(client.clone());
        admin.create_stream(&stream, 2).await.unwrap();
        // Produced while the worker is being killed, so each run finds new records.
        let producer = spawn_producer(client, stream, EVENTS, Duration::from_millis(150));
        let started = Instant::now();
        // The producer needs about 4.5 s; ten kills at 300-800 ms span about as long.
        let kills = kill_and_drain(&setup, 300, 800, Some(producer)).await;
        verify(&setup, "kinesis", EVENTS, kills, started.elapsed()).await;
    }

    /// Writes events `0..events` to `stream` through the KPL-aggregating producer, in per-shard
    /// order (event time grows with the id), pausing `every_100` after each hundred.
    fn spawn_producer(
        client: aws_sdk_kinesis::Client,
        stream: String,
        events: u64,
        every_100: Duration,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let config = ProducerConfig {
                linger: Duration::from_millis(20),
                aggregate_max_bytes: Some(4096),
                // A window allows no out-of-orderness here.
                ordered: true,
                ..ProducerConfig::default()
            };
            let producer = KinesisProducer::new(client, &stream, config).await.unwrap();
            let mut tickets = Vec::new();
            for id in 0..events {
                let e = event(id);
                let data = serde_json::to_vec(&e).unwrap();
                tickets.push(producer.send(&e.key, data).await.unwrap());
                // In small steps, so that every shard has new records most of the time.
                if id % 25 == 24 {
                    tokio::time::sleep(every_100 / 4).await;
                }
            }
            producer.flush().await.unwrap();
            for t in tickets {
                t.outcome().await.expect("written");
            }
        })
    }

    /// Drains the input with a bounded run as worker `id` and asserts it succeeded.
    async fn drain(setup: &Setup, id: &str, log: &Path) {
        let started = Instant::now();
        let mut child = worker_as(setup, id, "drain", log);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "the draining run failed:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
                return;
            }
            if started.elapsed() > Duration::from_secs(300) {
                let _ = child.kill();
                panic!("the draining run did not finish within 5 minutes");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills a continuously running worker `KILLS` times, each a random `min_ms..max_ms`
    /// after it could take the killed one's leases (a lease duration and a shard sync after
    /// its start), restarting it each time; then (once `producer` finished) drains the input
    /// with a bounded run. Returns the number of kills.
    async fn kill_and_drain(
        setup: &Setup,
        min_ms: u64,
        max_ms: u64,
        producer: Option<tokio::task::JoinHandle<()>>,
    ) -> usize {
        let log = setup.dir.path().join("worker.log");
        let mut kills = 0;
        while kills < KILLS {
            let mut child = worker(setup, "continuous", &log);
            let takeover = LEASE + Duration::from_millis(500);
            let wait = takeover
                + Duration::from_millis(min_ms + rand::random::<u64>() % (max_ms - min_ms));
            tokio::time::sleep(wait).await;
            assert!(
                child.try_wait().unwrap().is_none(),
                "a continuous worker exited by itself:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            child.kill().expect("kill -9");
            child.wait().unwrap();
            kills += 1;
        }
        if let Some(producer) = producer {
            producer.await.expect("producer");
        }
        drain(setup, "once-worker", &log).await;
        kills
    }

    /// The lease table as the test process saw it, every 25 ms: its own evidence of who held
    /// which lease and when each checkpoint moved.
    type Snapshots = Vec<(Instant, Vec<shardflow::core::lease::Lease>)>;

    fn watch_leases(
        store: DynamoLeaseStore,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> tokio::task::JoinHandle<Snapshots> {
        use shardflow::LeaseStore as _;
        tokio::spawn(async move {
            let mut out = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(leases) = store.list().await {
                    out.push((Instant::now(), leases));
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            out
        })
    }

    /// The lease `key` in a snapshot.
    fn lease<'a>(
        leases: &'a [shardflow::core::lease::Lease],
        key: &str,
    ) -> Option<&'a shardflow::core::lease::Lease> {
        leases.iter().find(|l| l.key == key)
    }

    /// After `from`, when a worker other than `gone` first moved the checkpoint of `key` past
    /// where it was at `from`: the new owner's first commit.
    fn first_commit_after(
        snapshots: &Snapshots,
        key: &str,
        from: Instant,
        gone: &str,
    ) -> Option<Instant> {
        let mut before = None;
        for (at, leases) in snapshots {
            let Some(l) = lease(leases, key) else {
                continue;
            };
            if *at <= from {
                before = Some(l.checkpoint.committed.clone());
                continue;
            }
            let owner = l.owner.as_deref().unwrap_or_default();
            if !owner.is_empty()
                && owner != gone
                && before
                    .as_ref()
                    .is_some_and(|b| *b != l.checkpoint.committed)
            {
                return Some(*at);
            }
        }
        None
    }

    /// Handoff times: from a request first seen on a lease to the requester's take of it, and
    /// to the requester's first commit.
    fn handoff_times(snapshots: &Snapshots) -> Vec<(Duration, Duration)> {
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for (at, leases) in snapshots {
            for l in leases {
                let (Some(owner), Some(requester)) = (&l.owner, &l.handoff_to) else {
                    continue;
                };
                if owner == requester || !seen.insert((l.key.clone(), requester.clone())) {
                    continue;
                }
                let taken = snapshots.iter().find(|(t, ls)| {
                    t > at && lease(ls, &l.key).and_then(|x| x.owner.as_ref()) == Some(requester)
                });
                if let Some((taken_at, _)) = taken {
                    if let Some(done) = first_commit_after(snapshots, &l.key, *taken_at, owner) {
                        out.push((*taken_at - *at, done - *at));
                    }
                }
            }
        }
        out
    }

    /// Failover times: for each lease `worker` held at `at` (when it was killed or paused), from
    /// then to another worker's first commit of it.
    fn failover_times(snapshots: &Snapshots, worker: &str, at: Instant) -> Vec<Duration> {
        let Some((_, leases)) = snapshots.iter().rev().find(|(t, _)| *t <= at) else {
            return Vec::new();
        };
        leases
            .iter()
            .filter_map(|l| l.owner.as_deref().map(|o| (l, o)))
            .filter(|(_, o)| shardflow::core::lease::worker_of(o) == worker)
            .filter_map(|(l, o)| first_commit_after(snapshots, &l.key, at, o))
            .map(|done| done - at)
            .collect()
    }

    fn median_and_max(times: &mut [Duration]) -> (Duration, Duration) {
        times.sort();
        (
            times.get(times.len() / 2).copied().unwrap_or_default(),
            times.last().copied().unwrap_or_default(),
        )
    }

    fn signal(child: &std::process::Child, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap())
            .expect("a child's pid is positive");
        rustix::process::kill_process(pid, signal).expect("signal a live child");
    }

    /// Ends a worker with SIGTERM (drain, checkpoint, release) and asserts its run succeeded.
    fn stop_gracefully(mut child: std::process::Child, name: &str, log: &Path) {
        signal(&child, rustix::process::Signal::TERM);
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "worker {name}'s run failed:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "worker {name} did not stop within a minute"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn alive(child: &mut std::process::Child, name: &str, log: &Path) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "worker {name} exited by itself:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }

    async fn fleet() {
        const EVENTS: u64 = 6_000;
        let stream = format!("fleet-{}-{}", std::process::id(), rand::random::<u32>());
        let setup = setup("kinesis", &stream).await;
        let client = AwsConfig::emulator(endpoint("SHARDFLOW_KINESIS_ENDPOINT"))
            .kinesis_client()
            .await;
        StreamAdmin::new(client.clone())
            .create_stream(&stream, 8)
            .await
            .unwrap();
        // Produced through the whole schedule, so every shard has new records to commit.
        let producer = spawn_producer(client, stream, EVENTS, Duration::from_millis(400));
        let stop_watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let dynamo = AwsConfig::emulator(endpoint("SHARDFLOW_DYNAMODB_ENDPOINT"))
            .dynamodb_client()
            .await;
        let watcher = watch_leases(
            DynamoLeaseStore::open(dynamo, &setup.lease_table)
                .await
                .unwrap(),
            std::sync::Arc::clone(&stop_watching),
        );
        let started = Instant::now();
        let log = |name: &str| setup.dir.path().join(format!("{name}.log"));
        let pause = |d: Duration| tokio::time::sleep(d);
        let mut a = worker_as(&setup, "fleet-a", "continuous", &log("a"));
        let b = worker_as(&setup, "fleet-b", "continuous", &log("b"));
        pause(Duration::from_secs(3)).await;
        // C joins: its share is handed over by A and B.
        let mut c = worker_as(&setup, "fleet-c", "continuous", &log("c"));
        pause(Duration::from_secs(4)).await;
        // B leaves gracefully: its leases are released.
        stop_gracefully(b, "b", &log("b"));
        pause(Duration::from_secs(2)).await;
        // C is killed: its leases expire and the others take them.
        alive(&mut c, "c", &log("c"));
        let killed_at = Instant::now();
        c.kill().expect("kill -9");
        c.wait().unwrap();
        pause(LEASE * 3).await;
        // B comes back (a new incarnation of its id, asking A for its share).
        let mut b = worker_as(&setup, "fleet-b", "continuous", &log("b2"));
        pause(Duration::from_secs(3)).await;
        // A is paused past its lease, then resumed: its guard ran out, nothing of it lands,
        // and B takes its leases once they expired.
        alive(&mut a, "a", &log("a"));
        let paused_at = Instant::now();
        signal(&a, rustix::process::Signal::STOP);
        pause(LEASE * 5 / 2).await;
        signal(&a, rustix::process::Signal::CONT);
        // D starts with A's id while A lives: another incarnation, which waits out expiries.
        let mut d = worker_as(&setup, "fleet-a", "continuous", &log("d"));
        pause(Duration::from_secs(3)).await;
        producer.await.expect("producer");
        pause(Duration::from_secs(2)).await;
        // D reports the id in use once it sees A renew a lease (A may first have to get one
        // back from B by handoff): waited for, not assumed from the schedule.
        let conflict = "another live process uses this worker id";
        let waited = Instant::now();
        while !std::fs::read_to_string(log("d"))
            .unwrap_or_default()
            .contains(conflict)
        {
            if waited.elapsed() > Duration::from_secs(60) {
                for name in ["a", "d", "b2"] {
                    let text = std::fs::read_to_string(log(name)).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(60).collect();
                    eprintln!(
                        "==== {name}\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
                panic!("the worker started with an id in use never reported it");
            }
            pause(Duration::from_millis(200)).await;
        }
        alive(&mut a, "a", &log("a"));
        alive(&mut b, "b2", &log("b2"));
        alive(&mut d, "d", &log("d"));
        stop_gracefully(d, "d", &log("d"));
        stop_gracefully(b, "b2", &log("b2"));
        stop_gracefully(a, "a", &log("a"));
        // The rest, drained by a bounded run.
        drain(&setup, "fleet-drain", &log("drain")).await;
        stop_watching.store(true, std::sync::atomic::Ordering::Relaxed);
        let snapshots = watcher.await.unwrap();
        // Worker logs, for verify's report of a failure.
        let all: String = ["a", "b", "c", "b2", "d", "drain"]
            .iter()
            .map(|w| std::fs::read_to_string(log(w)).unwrap_or_default())
            .collect();
        std::fs::write(setup.dir.path().join("worker.log"), &all).unwrap();
        verify(&setup, "fleet", EVENTS, 1, started.elapsed()).await;
        let fences = all.matches("fenced").count();
        let handoffs = handoff_times(&snapshots);
        let mut killed = failover_times(&snapshots, "fleet-c", killed_at);
        let mut paused = failover_times(&snapshots, "fleet-a", paused_at);
        assert!(!handoffs.is_empty(), "C's join was served by handoffs");
        assert!(!killed.is_empty(), "the killed worker's shards moved");
        assert!(!paused.is_empty(), "the paused worker's shards moved");
        let mut taken: Vec<Duration> = handoffs.iter().map(|h| h.0).collect();
        let mut handoffs: Vec<Duration> = handoffs.iter().map(|h| h.1).collect();
        let (taken_median, taken_max) = median_and_max(&mut taken);
        let (handoff_median, handoff_max) = median_and_max(&mut handoffs);
        let (killed_median, killed_max) = median_and_max(&mut killed);
        let (paused_median, paused_max) = median_and_max(&mut paused);
        // A handoff that waited for the lease to expire would take at least the lease.
        assert!(
            handoff_median < LEASE,
            "a handoff takes far less than waiting for an expiry would: median {handoff_median:?}"
        );
        println!(
            "effectively_once[fleet]: handoff (request to the new owner's first commit) median \
             {handoff_median:.0?} max {handoff_max:.0?} over {} handoffs (request to the take \
             median {taken_median:.0?} max {taken_max:.0?}); failover after kill -9 \
             median {killed_median:.0?} max {killed_max:.0?} over {} leases; after SIGSTOP past \
             the lease median {paused_median:.0?} max {paused_max:.0?} over {} leases; lease \
             {LEASE:?}, checkpoint interval 100ms, shard sync 500ms; {fences} fence warnings \
             in the logs",
            handoffs.len(),
            killed.len(),
            paused.len()
        );
    }
}
