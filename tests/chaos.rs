//! Chaos at process level, against kinesis-local, dynalite and moto's S3 behind a fault proxy
//! (started by scripts/test.sh): one bad record or one slow service never stops a fleet.
//!
//! Three workers share an 8-shard stream. Every call they make to Kinesis, DynamoDB and S3
//! goes through a proxy of this test's own that answers calls with the service's throttling
//! error (`ProvisionedThroughputExceededException`, `SlowDown`): 30 % of calls in "storms",
//! and every call to one service in "blackouts" that last longer than any writer's retries
//! (the workers' SDK retries are off, so shardflow's own retry layers meet every fault; the S3
//! blackout is 12 s, past the S3 sink's retries). Meanwhile workers are killed
//! (`kill -9`) and paused past their lease (SIGSTOP, SIGCONT), and 1 % of the input is bad:
//! undecodable, with a user function that panics on it, with an extreme event time, a corrupt
//! KPL aggregate, or a key whose window result is too large for DynamoDB.
//!
//! At the end (the workers stopped gracefully and a bounded run drained the rest): every good
//! record is in S3 exactly once, every window count in DynamoDB is right, every bad record is
//! in the dead-letter table exactly once at its position (and a keyed dead letter stands for
//! each result DynamoDB refused), no
//! worker's run failed, no worker log holds a payload or a key, and every worker's peak RSS
//! stayed under 512 MiB. The figures are printed (`docs/reliability.md` quotes them).
//!
//! The test binary is also the worker (`chaos worker`, configured by environment).

use std::process::ExitCode;
use std::time::Duration;

use serde::{Deserialize, Serialize};

const TOPOLOGY: &str = "chaos";
const WINDOW: Duration = Duration::from_secs(10);
const LEASE: Duration = Duration::from_secs(2);
const KEYS: u64 = 40;
const EVENTS: u64 = 4_000;
/// How long S3 answers every call with `SlowDown`: longer than the S3 sink's retries (eight
/// attempts with backoff; the workers' SDK retries are off), so that shards back off.
const S3_BLACKOUT_MS: u64 = 12_000;
/// The most a worker's resident set may reach.
const MAX_RSS_KIB: u64 = 512 * 1024;
/// Bytes of a huge key: its window result (key and count) is over DynamoDB's 400 KB item.
const HUGE_KEY_BYTES: usize = 420 * 1024;
/// The magic bytes of a KPL aggregate.
const KPL_MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Event {
    id: u64,
    key: String,
    ts: i64,
}

/// What is wrong with an input record, if anything: one in a hundred is bad, the kinds in
/// turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Good,
    Undecodable,
    Panics,
    ExtremeTime,
    CorruptAggregate,
    HugeKey,
}

fn kind(id: u64) -> Kind {
    if id % 100 != 50 {
        return Kind::Good;
    }
    match (id / 100) % 5 {
        0 => Kind::Undecodable,
        1 => Kind::Panics,
        2 => Kind::ExtremeTime,
        3 => Kind::CorruptAggregate,
        _ => Kind::HugeKey,
    }
}

fn event(id: u64) -> Event {
    let key = match kind(id) {
        Kind::Panics => format!("panic-{id}"),
        Kind::HugeKey => format!("{}{id}", "h".repeat(HUGE_KEY_BYTES)),
        _ => format!("k{}", id % KEYS),
    };
    let ts = match kind(id) {
        Kind::ExtremeTime => i64::MAX,
        // 100 events per second of event time: a window closes every 1 000 events.
        _ => i64::try_from(id).unwrap() * 10,
    };
    Event { id, key, ts }
}

/// The record written for `id`: its partition key and data.
fn record(id: u64) -> (String, Vec<u8>) {
    let e = event(id);
    let json = serde_json::to_vec(&e).unwrap();
    let pk = format!("p{}", id % 97);
    match kind(id) {
        Kind::Undecodable => (pk, format!("not json {id}").into_bytes()),
        Kind::CorruptAggregate => {
            // The magic, a body, and a digest that does not match it.
            let mut data = KPL_MAGIC.to_vec();
            data.extend_from_slice(&json);
            data.extend_from_slice(&[0u8; 16]);
            (pk, data)
        }
        _ => (pk, json),
    }
}

/// The id a bad record's payload was made from.
fn id_of_payload(data: &[u8]) -> Option<u64> {
    if let Some(rest) = data.strip_prefix(b"not json ") {
        return std::str::from_utf8(rest).ok()?.parse().ok();
    }
    let json = match data.strip_prefix(&KPL_MAGIC[..]) {
        Some(rest) => rest.get(..rest.len().checked_sub(16)?)?,
        None => data,
    };
    serde_json::from_slice::<Event>(json).ok().map(|e| e.id)
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("worker") {
        return worker::main();
    }
    // Behave like a libtest binary towards `cargo test [FILTER] [-- --list]`.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("chaos: test");
        return ExitCode::SUCCESS;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if !filters.is_empty() && !filters.iter().any(|f| "chaos".contains(f.as_str())) {
        println!("chaos: filtered out");
        return ExitCode::SUCCESS;
    }
    scenario::main()
}

mod worker {
    //! The topology under test.

    use std::sync::Arc;
    use std::time::Duration;

    use anyhow::Context as _;
    use shardflow::core::runtime::SinkBackoff;
    use shardflow::dynamodb::{DynamoLeaseStore, DynamoSink};
    use shardflow::kinesis::{KinesisSource, SpoutConfig};
    use shardflow::prelude::*;
    use shardflow::s3::S3Sink;
    use shardflow::{AwsConfig, DeadLetterRecord};

    use super::{Event, LEASE, TOPOLOGY, WINDOW};

    pub(super) fn main() -> std::process::ExitCode {
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
        // Every client goes through the fault proxy, with the SDK's own retries off: the
        // faults meet shardflow's retry layers (the sinks', the spout's, the lease manager's)
        // rather than being absorbed below them, and a blackout of seconds outlasts them.
        let dynamo = AwsConfig::emulator(var("DYNAMODB")?)
            .dynamodb_client()
            .await;
        let dynamo = aws_sdk_dynamodb::Client::from_conf(
            dynamo
                .config()
                .to_builder()
                .retry_config(aws_sdk_dynamodb::config::retry::RetryConfig::disabled())
                .build(),
        );
        let s3 = AwsConfig::emulator(var("S3")?)
            .static_credentials("S3RVER", "S3RVER")
            .s3_client()
            .await;
        let s3 = aws_sdk_s3::Client::from_conf(
            s3.config()
                .to_builder()
                .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
                .build(),
        );
        let kinesis = AwsConfig::emulator(var("KINESIS")?).kinesis_client().await;
        let kinesis = aws_sdk_kinesis::Client::from_conf(
            kinesis
                .config()
                .to_builder()
                .retry_config(aws_sdk_kinesis::config::retry::RetryConfig::disabled())
                .build(),
        );
        let leases = DynamoLeaseStore::open(dynamo.clone(), var("LEASE_TABLE")?).await?;
        let counts =
            DynamoSink::<WindowResult<String, u64>>::open(dynamo.clone(), var("COUNTS_TABLE")?)
                .await?;
        let dead = DynamoSink::<DeadLetterRecord>::open(dynamo, var("DEAD_TABLE")?).await?;
        let raw = S3Sink::<Event>::json_lines(s3, var("BUCKET")?, "raw")
            .records_per_object(500)
            .max_latency(Duration::from_millis(500));
        let spout = SpoutConfig {
            idle_min: Duration::from_millis(50),
            idle_max: Duration::from_millis(200),
            ..SpoutConfig::default()
        };
        let events = Topology::builder(TOPOLOGY)
            .dead_letter(DeadLetter::to(dead))
            .source(
                KinesisSource::new(kinesis, var("STREAM")?)
                    .with_config(spout)
                    .json::<Event>(),
            )
            .event_time(|e: &Event| e.ts)
            .map(|e: Event| {
                // A bug in user code that only some records show.
                assert!(!e.key.starts_with("panic"), "cannot handle record {}", e.id);
                e
            });
        events.clone().sink(raw);
        let topology = events
            .key_by(|e: &Event| e.key.clone())
            .window(TumblingWindow::of(WINDOW))
            .aggregate(Count)
            .sink(counts)
            .build()?;
        let mode = if var("MODE")? == "drain" {
            RunMode::UntilCaughtUp
        } else {
            RunMode::Continuous
        };
        let config = RuntimeConfig {
            worker_id: var("WORKER_ID")?,
            parallelism: 2,
            checkpoint_interval: Duration::from_millis(100),
            lease_duration: LEASE,
            shard_sync_interval: Duration::from_millis(500),
            idle_wait: Duration::from_millis(50),
            mode,
            // Short pauses, so that the schedule sees shards back off, let go and come back.
            sink_backoff: SinkBackoff {
                first_pause: Duration::from_millis(200),
                max_pause: Duration::from_secs(1),
                attempts: 6,
                cool_down: Duration::from_secs(2),
            },
            ..RuntimeConfig::default()
        };
        Runtime::new(topology, Arc::new(leases))
            .with_config(config)
            .with_shutdown(shardflow::ops::shutdown_on_signals()?)
            .run()
            .await?;
        Ok(())
    }
}

mod proxy {
    //! A fault proxy: forwards HTTP calls to an emulator, or answers them with the service's
    //! throttling error, as the schedule says.

    use std::convert::Infallible;
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
    use std::sync::Arc;

    use http_body_util::{BodyExt as _, Either, Full};
    use hyper::body::{Bytes, Incoming};
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper::{Request, Response};
    use hyper_util::client::legacy::{connect::HttpConnector, Client};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    #[derive(Clone, Copy, Debug)]
    pub enum Service {
        Kinesis,
        DynamoDb,
        S3,
    }

    /// What the proxy of one service does now, and what it did.
    #[derive(Default)]
    pub struct Faults {
        /// Per cent of calls answered with a throttling error.
        pub throttle_pct: AtomicU32,
        pub throttled: AtomicU64,
        pub forwarded: AtomicU64,
        /// Which calls are throttled: the n-th call's draw is a hash of this and n.
        pub seed: u64,
        calls: AtomicU64,
    }

    impl Faults {
        pub fn seeded(seed: u64) -> Self {
            Self {
                seed,
                ..Self::default()
            }
        }

        /// Whether the next call is throttled (splitmix64 of the seed and the call's number).
        fn throttle_next(&self, pct: u32) -> bool {
            let n = self.calls.fetch_add(1, Ordering::Relaxed);
            let mut z = self
                .seed
                .wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            z % 100 < u64::from(pct)
        }
    }

    type Body = Either<Incoming, Full<Bytes>>;

    /// Starts a proxy to `upstream` (`http://host:port`); returns its endpoint.
    pub async fn start(upstream: &str, service: Service, faults: Arc<Faults>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let upstream = upstream.trim_end_matches('/').to_owned();
        let client: Client<HttpConnector, Incoming> =
            Client::builder(TokioExecutor::new()).build_http();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (client, faults, upstream) =
                    (client.clone(), Arc::clone(&faults), upstream.clone());
                tokio::spawn(async move {
                    let call = service_fn(move |req| {
                        let (client, faults, upstream) =
                            (client.clone(), Arc::clone(&faults), upstream.clone());
                        async move {
                            Ok::<_, Infallible>(
                                handle(req, &client, &upstream, service, &faults).await,
                            )
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), call)
                        .await;
                });
            }
        });
        endpoint
    }

    async fn handle(
        req: Request<Incoming>,
        client: &Client<HttpConnector, Incoming>,
        upstream: &str,
        service: Service,
        faults: &Faults,
    ) -> Response<Body> {
        let pct = faults.throttle_pct.load(Ordering::Relaxed);
        if pct > 0 && faults.throttle_next(pct) {
            faults.throttled.fetch_add(1, Ordering::Relaxed);
            // Read to its end, so that the connection stays usable.
            let _ = req.into_body().collect().await;
            return throttled(service).map(Either::Right);
        }
        faults.forwarded.fetch_add(1, Ordering::Relaxed);
        let (mut parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", hyper::http::uri::PathAndQuery::as_str);
        parts.uri = format!("{upstream}{path}").parse().unwrap();
        match client.request(Request::from_parts(parts, body)).await {
            Ok(response) => response.map(Either::Left),
            Err(_) => Response::builder()
                .status(502)
                .body(Either::Right(Full::from("upstream unreachable")))
                .unwrap(),
        }
    }

    /// The error the service answers a throttled call with.
    fn throttled(service: Service) -> Response<Full<Bytes>> {
        let (status, content_type, error_type, body) = match service {
            Service::DynamoDb => (
                400,
                "application/x-amz-json-1.0",
                "ProvisionedThroughputExceededException",
                r#"{"__type":"com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException","message":"The level of configured provisioned throughput for the table was exceeded."}"#,
            ),
            Service::Kinesis => (
                400,
                "application/x-amz-json-1.1",
                "ProvisionedThroughputExceededException",
                r#"{"__type":"ProvisionedThroughputExceededException","message":"Rate exceeded for shard."}"#,
            ),
            Service::S3 => (
                503,
                "application/xml",
                "SlowDown",
                r#"<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message><RequestId>chaos</RequestId></Error>"#,
            ),
        };
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .header("x-amzn-errortype", error_type)
            .body(Full::from(body))
            .unwrap()
    }
}

mod scenario {
    //! The driver.

    use super::*;

    use std::collections::BTreeMap;
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Instant;

    use shardflow::core::position::RecordPosition;
    use shardflow::core::sink::InspectSink as _;
    use shardflow::core::sink::{OutputId, Window};
    use shardflow::dynamodb::{DynamoLeaseStore, DynamoSink};
    use shardflow::kinesis::{KinesisProducer, ProducerConfig, StreamAdmin};
    use shardflow::prelude::WindowResult;
    use shardflow::{AwsConfig, DeadLetterRecord, ShardId};

    use super::proxy::{Faults, Service};

    pub(super) fn main() -> ExitCode {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        runtime.block_on(chaos());
        println!("chaos: ok");
        ExitCode::SUCCESS
    }

    fn endpoint(var: &str) -> String {
        std::env::var(var).unwrap_or_else(|_| {
            panic!("{var} is not set: run scripts/test.sh, which starts the emulators")
        })
    }

    /// The fault proxies, one per service.
    struct Proxies {
        kinesis: Arc<Faults>,
        dynamodb: Arc<Faults>,
        s3: Arc<Faults>,
    }

    impl Proxies {
        fn set(&self, kinesis: u32, dynamodb: u32, s3: u32) {
            self.kinesis.throttle_pct.store(kinesis, Ordering::Relaxed);
            self.dynamodb
                .throttle_pct
                .store(dynamodb, Ordering::Relaxed);
            self.s3.throttle_pct.store(s3, Ordering::Relaxed);
        }

        fn figures(&self) -> String {
            let one = |name: &str, f: &Faults| {
                let throttled = f.throttled.load(Ordering::Relaxed);
                let all = throttled + f.forwarded.load(Ordering::Relaxed);
                format!("{name} {throttled} of {all} calls")
            };
            format!(
                "{}, {}, {}",
                one("Kinesis", &self.kinesis),
                one("DynamoDB", &self.dynamodb),
                one("S3", &self.s3)
            )
        }
    }

    struct Setup {
        env: Vec<(&'static str, String)>,
        dir: tempfile::TempDir,
        bucket: String,
        counts: DynamoSink<WindowResult<String, u64>>,
        dead: DynamoSink<DeadLetterRecord>,
        s3: aws_sdk_s3::Client,
    }

    /// A worker process and the peak of its resident set, read while it lived. Killed when
    /// dropped, so that a failed check leaves no worker running.
    struct Worker {
        name: String,
        child: Child,
        peak_kib: u64,
    }

    impl Drop for Worker {
        fn drop(&mut self) {
            if let Ok(None) = self.child.try_wait() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }

    impl Worker {
        fn start(setup: &Setup, name: &str, id: &str, mode: &str) -> Self {
            let log = setup.dir.path().join(format!("{name}.log"));
            let child = Command::new(std::env::current_exe().unwrap())
                .arg("worker")
                .envs(setup.env.iter().map(|(k, v)| (*k, v.as_str())))
                .env("MODE", mode)
                .env("WORKER_ID", id)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("spawn worker");
            Self {
                name: name.to_owned(),
                child,
                peak_kib: 0,
            }
        }

        fn log(&self, setup: &Setup) -> String {
            let text = std::fs::read_to_string(setup.dir.path().join(format!("{}.log", self.name)))
                .unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(80).collect();
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        }

        /// Reads the peak resident set (`VmHWM`) while the process lives.
        fn sample(&mut self) {
            let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
                .unwrap_or_default();
            if let Some(kib) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                self.peak_kib = self.peak_kib.max(kib);
            }
        }

        /// Asserts the worker still runs: its run never failed.
        fn alive(&mut self, setup: &Setup) {
            self.sample();
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "worker {} exited by itself ({status}):\n{}",
                    self.name,
                    self.log(setup)
                );
            }
        }

        fn signal(&self, signal: rustix::process::Signal) {
            let pid = rustix::process::Pid::from_raw(i32::try_from(self.child.id()).unwrap())
                .expect("a child's pid is positive");
            rustix::process::kill_process(pid, signal).expect("signal a live child");
        }

        fn kill(mut self, setup: &Setup) -> u64 {
            self.alive(setup);
            self.child.kill().expect("kill -9");
            self.child.wait().unwrap();
            self.peak_kib
        }

        /// Waits for the worker to exit (after SIGTERM, or a bounded run's end) and asserts
        /// its run succeeded.
        async fn finish(mut self, setup: &Setup, within: Duration) -> u64 {
            let started = Instant::now();
            loop {
                self.sample();
                if let Some(status) = self.child.try_wait().unwrap() {
                    assert!(
                        status.success(),
                        "worker {}'s run failed ({status}):\n{}",
                        self.name,
                        self.log(setup)
                    );
                    return self.peak_kib;
                }
                if started.elapsed() > within {
                    let _ = self.child.kill();
                    panic!(
                        "worker {} did not finish within {within:?}:\n{}",
                        self.name,
                        self.log(setup)
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        async fn stop(self, setup: &Setup) -> u64 {
            self.signal(rustix::process::Signal::TERM);
            self.finish(setup, Duration::from_secs(120)).await
        }
    }

    async fn setup(stream: &str, proxies: &Proxies) -> Setup {
        let suffix = format!("{}-{}", std::process::id(), rand::random::<u32>());
        let (dynamodb, s3, kinesis) = (
            endpoint("SHARDFLOW_DYNAMODB_ENDPOINT"),
            endpoint("SHARDFLOW_MOTO_S3_ENDPOINT"),
            endpoint("SHARDFLOW_KINESIS_ENDPOINT"),
        );
        let dynamo = AwsConfig::emulator(&dynamodb).dynamodb_client().await;
        let s3_client = AwsConfig::emulator(&s3)
            .static_credentials("S3RVER", "S3RVER")
            .s3_client()
            .await;
        let bucket = format!("chaos-{suffix}");
        s3_client
            .create_bucket()
            .bucket(&bucket)
            .send()
            .await
            .unwrap();
        let lease_table = format!("chaos-leases-{suffix}");
        let counts_table = format!("chaos-counts-{suffix}");
        let dead_table = format!("chaos-dead-{suffix}");
        // Created here, without faults: the workers find them.
        DynamoLeaseStore::open(dynamo.clone(), &lease_table)
            .await
            .unwrap();
        let counts = DynamoSink::open(dynamo.clone(), &counts_table)
            .await
            .unwrap();
        let dead = DynamoSink::open(dynamo, &dead_table).await.unwrap();
        let env = vec![
            ("STREAM", stream.to_owned()),
            ("LEASE_TABLE", lease_table),
            ("COUNTS_TABLE", counts_table),
            ("DEAD_TABLE", dead_table),
            ("BUCKET", bucket.clone()),
            (
                "KINESIS",
                proxy::start(&kinesis, Service::Kinesis, Arc::clone(&proxies.kinesis)).await,
            ),
            (
                "DYNAMODB",
                proxy::start(&dynamodb, Service::DynamoDb, Arc::clone(&proxies.dynamodb)).await,
            ),
            (
                "S3",
                proxy::start(&s3, Service::S3, Arc::clone(&proxies.s3)).await,
            ),
        ];
        Setup {
            env,
            dir: tempfile::tempdir().unwrap(),
            bucket,
            counts,
            dead,
            s3: s3_client,
        }
    }

    /// Writes every record, in id order (event time grows with the id), through the producer
    /// straight to kinesis-local (the input is not what is under test); returns where each
    /// landed.
    fn spawn_producer(
        client: aws_sdk_kinesis::Client,
        stream: String,
    ) -> tokio::task::JoinHandle<BTreeMap<u64, (ShardId, RecordPosition)>> {
        tokio::spawn(async move {
            let config = ProducerConfig {
                linger: Duration::from_millis(20),
                // Each record its own: a corrupt aggregate must arrive as one.
                aggregate_max_bytes: None,
                ordered: true,
                ..ProducerConfig::default()
            };
            let producer = KinesisProducer::new(client, &stream, config).await.unwrap();
            let mut tickets = Vec::new();
            for id in 0..EVENTS {
                let (pk, data) = record(id);
                tickets.push((id, producer.send(&pk, data).await.unwrap()));
                if id % 50 == 49 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            producer.flush().await.unwrap();
            let mut landed = BTreeMap::new();
            for (id, ticket) in tickets {
                let put = ticket.outcome().await.expect("written");
                landed.insert(id, (put.shard, put.position));
            }
            landed
        })
    }

    /// How often each id appears across every S3 object.
    async fn ids_in_s3(setup: &Setup) -> BTreeMap<u64, u32> {
        let mut seen = BTreeMap::new();
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
                    *seen.entry(line.value.id).or_insert(0) += 1;
                }
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => break,
            }
        }
        seen
    }

    async fn chaos() {
        let started = Instant::now();
        let stream = format!("chaos-{}-{}", std::process::id(), rand::random::<u32>());
        // The throttling draws repeat with the seed (the workers' timing does not).
        let seed = std::env::var("SHARDFLOW_CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random::<u64>);
        println!("chaos: seed {seed} (SHARDFLOW_CHAOS_SEED={seed} draws the same throttling)");
        let proxies = Proxies {
            kinesis: Arc::new(Faults::seeded(seed)),
            dynamodb: Arc::new(Faults::seeded(seed ^ 1)),
            s3: Arc::new(Faults::seeded(seed ^ 2)),
        };
        let setup = setup(&stream, &proxies).await;
        let client = AwsConfig::emulator(endpoint("SHARDFLOW_KINESIS_ENDPOINT"))
            .kinesis_client()
            .await;
        StreamAdmin::new(client.clone())
            .create_stream(&stream, 8)
            .await
            .unwrap();
        let producer = spawn_producer(client, stream);
        let pause = |d: u64| tokio::time::sleep(Duration::from_millis(d));
        let mut peaks: BTreeMap<String, u64> = BTreeMap::new();
        let mut a = Worker::start(&setup, "a", "chaos-a", "continuous");
        let b = Worker::start(&setup, "b", "chaos-b", "continuous");
        let c = Worker::start(&setup, "c", "chaos-c", "continuous");
        pause(3_000).await;
        // A storm: 30 % of every service's calls throttled.
        proxies.set(30, 30, 30);
        pause(3_000).await;
        // C is killed during it.
        peaks.insert("c".into(), c.kill(&setup));
        pause(1_000).await;
        // DynamoDB answers nothing for longer than any writer retries: the lease table, the
        // counts and the dead letters.
        proxies.set(0, 100, 0);
        pause(4_000).await;
        proxies.set(0, 0, 0);
        // C comes back (a new incarnation) while A is paused past its lease.
        let mut c = Worker::start(&setup, "c2", "chaos-c", "continuous");
        a.alive(&setup);
        a.signal(rustix::process::Signal::STOP);
        pause(LEASE.as_millis() as u64 * 2).await;
        a.signal(rustix::process::Signal::CONT);
        // S3 answers nothing for a while, then Kinesis, with a storm between.
        proxies.set(0, 0, 100);
        pause(S3_BLACKOUT_MS).await;
        proxies.set(30, 30, 30);
        pause(3_000).await;
        // B is killed in the storm and comes back after it.
        peaks.insert("b".into(), b.kill(&setup));
        proxies.set(100, 0, 0);
        pause(4_000).await;
        proxies.set(0, 0, 0);
        let mut b = Worker::start(&setup, "b2", "chaos-b", "continuous");
        let landed = producer.await.expect("producer");
        pause(3_000).await;
        let throttles = proxies.figures();
        for w in [&mut a, &mut b, &mut c] {
            w.alive(&setup);
        }
        for w in [a, b, c] {
            let name = w.name.clone();
            peaks.insert(name, w.stop(&setup).await);
        }
        // The rest, drained by a bounded run.
        let drain = Worker::start(&setup, "drain", "chaos-drain", "drain");
        peaks.insert(
            "drain".into(),
            drain.finish(&setup, Duration::from_secs(300)).await,
        );
        verify(&setup, &landed, &peaks).await;
        // What the workers went through, from their logs.
        let logs: String = ["a", "b", "c", "b2", "c2", "drain"]
            .iter()
            .map(|w| {
                std::fs::read_to_string(setup.dir.path().join(format!("{w}.log")))
                    .unwrap_or_default()
            })
            .collect();
        let backed_off = logs.matches("a sink failed after its retries").count();
        let syncs_retried = logs.matches("shard sync failed, retrying").count();
        let leases_lost = logs.matches("lease lost").count();
        // Logs name positions, sizes and kinds: no payload (the undecodable ones' text, a
        // huge key) and no key.
        for leak in ["not json", &"h".repeat(64), "panic-", "\"k1\""] {
            assert!(!logs.contains(leak), "a worker log holds {leak:?}");
        }
        assert!(leases_lost > 0, "the blackout and the pause cost leases");
        if backed_off == 0 {
            // What the workers warned of instead, by the start of the message.
            let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
            for l in logs
                .lines()
                .filter(|l| l.contains(" WARN ") || l.contains("ERROR"))
            {
                let words: Vec<&str> = l.split_whitespace().skip(3).take(6).collect();
                *kinds.entry(words.join(" ")).or_default() += 1;
            }
            for (kind, n) in kinds {
                eprintln!("{n:5} {kind}");
            }
        }
        assert!(
            backed_off > 0,
            "the blackouts outlasted the sinks' retries: some shard backed off"
        );
        println!(
            "chaos: {EVENTS} records ({} bad) on 8 shards, 3 workers, 2 kill -9s, 1 SIGSTOP \
             past the lease, {:.1?}; throttled: {throttles}; {backed_off} sink back-offs, \
             {syncs_retried} shard syncs retried, {leases_lost} leases lost; peak RSS per \
             worker (MiB): {}",
            (0..EVENTS).filter(|id| kind(*id) != Kind::Good).count(),
            started.elapsed(),
            peaks
                .iter()
                .map(|(w, kib)| format!("{w} {}", kib / 1024))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    async fn verify(
        setup: &Setup,
        landed: &BTreeMap<u64, (ShardId, RecordPosition)>,
        peaks: &BTreeMap<String, u64>,
    ) {
        let seen = ids_in_s3(setup).await;
        let counts = setup.counts.committed().await.unwrap();
        let dead = setup.dead.committed().await.unwrap();
        // S3: every record that decodes and passes the map, exactly once.
        let in_s3 = |k: Kind| matches!(k, Kind::Good | Kind::HugeKey);
        let wrong: Vec<(u64, u32)> = (0..EVENTS)
            .map(|id| (id, seen.get(&id).copied().unwrap_or(0)))
            .filter(|(id, n)| *n != u32::from(in_s3(kind(*id))))
            .collect();
        assert!(
            wrong.is_empty(),
            "every good record in S3 exactly once; (id, times) wrong: {:?}",
            &wrong[..wrong.len().min(20)]
        );
        // DynamoDB: every window count as computed from the input's good records.
        let window_ms = i64::try_from(WINDOW.as_millis()).unwrap();
        let mut expected: BTreeMap<(String, i64), u64> = BTreeMap::new();
        for id in (0..EVENTS).filter(|id| kind(*id) == Kind::Good) {
            let e = event(id);
            *expected
                .entry((e.key, e.ts.div_euclid(window_ms) * window_ms))
                .or_insert(0) += 1;
        }
        let mut got: BTreeMap<(String, i64), u64> = BTreeMap::new();
        for r in counts.values() {
            *got.entry((r.key.clone(), r.window.start)).or_insert(0) += r.value;
        }
        assert_eq!(got, expected, "every window count right");
        // The dead-letter table: every bad record once, at its position.
        let mut letters: BTreeMap<u64, Vec<&DeadLetterRecord>> = BTreeMap::new();
        let mut keyed = Vec::new();
        for letter in dead.values() {
            match &letter.result {
                Some(_) => keyed.push(letter),
                None => {
                    let id = id_of_payload(&letter.data).expect("a letter's payload is an input");
                    letters.entry(id).or_default().push(letter);
                }
            }
        }
        let lettered = |k: Kind| {
            matches!(
                k,
                Kind::Undecodable | Kind::Panics | Kind::ExtremeTime | Kind::CorruptAggregate
            )
        };
        for id in 0..EVENTS {
            let got = letters.get(&id).map_or(0, Vec::len);
            assert_eq!(
                got,
                usize::from(lettered(kind(id))),
                "record {id} ({:?}) dead-lettered {got} times",
                kind(id)
            );
            if let Some([letter]) = letters.get(&id).map(Vec::as_slice) {
                let (shard, position) = &landed[&id];
                assert_eq!(
                    (&letter.shard, &letter.position),
                    (shard, position),
                    "record {id}"
                );
                let stage = match kind(id) {
                    Kind::Undecodable => "decode",
                    Kind::Panics => "map",
                    Kind::ExtremeTime => "event_time",
                    _ => "source",
                };
                assert!(
                    letter.stage.contains(stage),
                    "record {id}: {}",
                    letter.stage
                );
            }
        }
        // A keyed dead letter for each huge key's window result, which DynamoDB refused: under
        // the result's identity, from the huge record's shard, after the huge record.
        let window_of = |e: &Event| {
            let start = e.ts.div_euclid(window_ms) * window_ms;
            Window::new(start, start + window_ms)
        };
        let huge: BTreeMap<String, u64> = (0..EVENTS)
            .filter(|id| kind(*id) == Kind::HugeKey)
            .map(|id| {
                let e = event(id);
                let identity = OutputId::keyed(e.key.as_str().into(), Some(window_of(&e)));
                (identity.to_path(), id)
            })
            .collect();
        assert_eq!(
            keyed.len(),
            huge.len(),
            "one keyed dead letter per huge key"
        );
        for letter in &keyed {
            let result = letter.result.as_ref().unwrap();
            let id = huge
                .get(&result.identity)
                .unwrap_or_else(|| panic!("a keyed letter of no huge key: {}", result.identity));
            let (shard, position) = &landed[id];
            assert_eq!(&letter.shard, shard, "record {id}'s result");
            assert!(
                letter.position.sequence >= position.sequence,
                "record {id}'s result: made after the record"
            );
            assert_eq!(result.sink, setup.counts_name());
            assert_eq!(result.window, Some(window_of(&event(*id))));
            assert!(result.key.len() <= 1024 && event(*id).key.starts_with(&result.key));
            assert!(
                result.size.is_some_and(|n| n > 400 * 1024),
                "{:?}",
                result.size
            );
        }
        for (worker, kib) in peaks {
            assert!(
                *kib > 0 && *kib <= MAX_RSS_KIB,
                "worker {worker}'s peak RSS {kib} KiB (at most {MAX_RSS_KIB})"
            );
        }
    }

    impl Setup {
        fn counts_name(&self) -> &str {
            use shardflow::Sink as _;
            self.counts.name()
        }
    }
}
