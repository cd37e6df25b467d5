//! No payload, key or secret in logs, metrics or errors (issue 14): a canary string is planted
//! in payloads, keys, partition keys, credentials, an endpoint's user info and an `[app]`
//! table; failing pipelines run on the embedded backend and against the emulators (kinesis-local
//! and dynalite, started by scripts/test.sh) with every log at TRACE, the AWS SDK's included,
//! and the tool runs with the canary in its environment. The canary must appear nowhere: not
//! in a log line, a metric, an error, or a dead letter's reason.

use base64::Engine as _;
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shardflow::core::memory::MemoryStream;
use shardflow::dynamodb::{DynamoLeaseStore, DynamoSink};
use shardflow::kinesis::{KinesisSource, SpoutConfig, StreamAdmin};
use shardflow::prelude::*;
use shardflow::{AwsConfig, MemoryLeaseStore, MemorySink, Metrics};

const CANARY: &str = "cnry-5e8f1d";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Click {
    user: String,
    ts: i64,
}

/// Every log line of the process, at TRACE.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn endpoint(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run scripts/test.sh"))
}

/// Payloads the pipelines refuse in several ways, each holding the canary.
fn hostile_records(stream: &MemoryStream) {
    let key = format!("{CANARY}-partition-key");
    // Undecodable: the canary is the value serde refuses.
    stream.push(
        0,
        1,
        key.as_bytes(),
        format!("{{\"user\":\"u\",\"ts\":\"{CANARY}\"}}").as_bytes(),
    );
    // Not JSON at all.
    stream.push(0, 2, key.as_bytes(), format!("{CANARY} garbage").as_bytes());
    // A good record whose key (the user) holds the canary, long enough to be shortened.
    let user = format!("{CANARY}{}", "u".repeat(200));
    let good = serde_json::to_vec(&Click { user, ts: 3 }).unwrap();
    stream.push(1, 3, key.as_bytes(), &good);
    // A record whose user function fails with a message of its own (not the payload).
    let flaky = serde_json::to_vec(&Click {
        user: "fail".into(),
        ts: 4,
    })
    .unwrap();
    stream.push(1, 4, key.as_bytes(), &flaky);
}

async fn embedded_pipelines(registry: &prometheus::Registry) -> Vec<String> {
    let mut errors = Vec::new();
    // With a dead-letter sink: every bad record becomes a letter.
    let stream = MemoryStream::new("canary", 2);
    hostile_records(&stream);
    let dead = MemorySink::new("dead");
    let out = MemorySink::new("out");
    let topology = Topology::builder("canary-dlq")
        .dead_letter(DeadLetter::to(dead.clone()))
        .source(stream.clone().json::<Click>())
        .event_time(|c: &Click| c.ts)
        .try_map("check", |c: &Click| {
            if c.user == "fail" {
                Err("the user is refused".to_owned())
            } else {
                Ok(c.clone())
            }
        })
        .key_by(|c: &Click| c.user.clone())
        .window(TumblingWindow::of(Duration::from_secs(1)))
        .aggregate(Count)
        .sink(out.clone())
        .build()
        .unwrap();
    Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
        .with_config(config())
        .with_metrics(Metrics::new(registry))
        .run()
        .await
        .expect("bad records cost themselves only");
    let letters: Vec<DeadLetterRecord> = dead.contents().into_values().collect();
    assert_eq!(letters.len(), 3, "{letters:?}");
    errors.extend(letters.iter().map(|l| l.error.clone()));
    errors.extend(letters.iter().map(|l| l.stage.clone()));

    // Without one: the shard stops, and the run's error says where.
    let stream = MemoryStream::new("canary", 2);
    hostile_records(&stream);
    let topology = Topology::builder("canary-stop")
        .source(stream.clone().json::<Click>())
        .sink(MemorySink::new("out"))
        .build()
        .unwrap();
    let health = shardflow::Health::default();
    let error = Runtime::new(topology, Arc::new(MemoryLeaseStore::new()))
        .with_config(config())
        .with_metrics(Metrics::new(registry))
        .with_health(health.clone())
        .run()
        .await
        .expect_err("a stopped shard is reported");
    errors.push(error.to_string());
    errors.push(format!("{error:?}"));
    errors.push(format!("{health:?}"));
    errors
}

fn config() -> RuntimeConfig {
    RuntimeConfig {
        worker_id: "canary".into(),
        parallelism: 2,
        mode: RunMode::UntilCaughtUp,
        checkpoint_interval: Duration::from_millis(20),
        shard_sync_interval: Duration::from_millis(100),
        ..RuntimeConfig::default()
    }
}

/// The records put to Kinesis: one undecodable, one whose key holds the canary.
fn planted_payloads() -> Vec<Vec<u8>> {
    vec![
        format!("{{\"user\":\"u\",\"ts\":\"{CANARY}\"}}").into_bytes(),
        serde_json::to_vec(&Click {
            user: format!("{CANARY}-user"),
            ts: 5,
        })
        .unwrap(),
    ]
}

/// Against the emulators, with the canary as the secret key: Kinesis records holding it, leases
/// and dead letters in DynamoDB.
async fn aws_pipeline(registry: &prometheus::Registry) -> Vec<String> {
    let aws = |var: &str| {
        AwsConfig::emulator(endpoint(var))
            .static_credentials("AKIDCANARY", format!("secret-{CANARY}"))
    };
    let kinesis = aws("SHARDFLOW_KINESIS_ENDPOINT").kinesis_client().await;
    let dynamodb = aws("SHARDFLOW_DYNAMODB_ENDPOINT").dynamodb_client().await;
    let name = format!("canary-{}-{}", std::process::id(), rand::random::<u32>());
    let admin = StreamAdmin::new(kinesis.clone());
    admin.create_stream(&name, 1).await.expect("create");
    for data in planted_payloads() {
        kinesis
            .put_record()
            .stream_name(&name)
            .partition_key(format!("{CANARY}-pk"))
            .data(aws_sdk_kinesis::primitives::Blob::new(data))
            .send()
            .await
            .expect("put");
    }
    let leases = DynamoLeaseStore::open(dynamodb.clone(), format!("{name}-leases"))
        .await
        .expect("lease table");
    let dead = DynamoSink::<DeadLetterRecord>::open(dynamodb.clone(), format!("{name}-dead"))
        .await
        .expect("dead-letter table");
    let source = KinesisSource::new(kinesis, &name).with_config(SpoutConfig {
        idle_min: Duration::from_millis(20),
        idle_max: Duration::from_millis(50),
        ..SpoutConfig::default()
    });
    let topology = Topology::builder("canary-aws")
        .dead_letter(DeadLetter::to(dead.clone()))
        .source(source.json::<Click>())
        .key_by(|c: &Click| c.user.clone())
        .aggregate(Count)
        .sink(MemorySink::new("out"))
        .build()
        .unwrap();
    Runtime::new(topology, Arc::new(leases))
        .with_config(config())
        .with_metrics(Metrics::new(registry))
        .run()
        .await
        .expect("the run goes on past the bad record");
    let letters = shardflow::core::sink::InspectSink::committed(&dead)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    let mut shown: Vec<String> = letters.values().map(|l| l.error.clone()).collect();
    shown.push(format!("{:?}", aws("SHARDFLOW_KINESIS_ENDPOINT")));
    shown
}

/// The tool, with the canary in its environment, its credentials and a failing command.
fn tool_output() -> String {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardflow"))
            .args(args)
            .env(
                "SHARDFLOW_KINESIS_ENDPOINT",
                endpoint("SHARDFLOW_KINESIS_ENDPOINT"),
            )
            .env(
                "SHARDFLOW_DYNAMODB_ENDPOINT",
                endpoint("SHARDFLOW_DYNAMODB_ENDPOINT"),
            )
            .env("SHARDFLOW_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "AKIDCANARY")
            .env("AWS_SECRET_ACCESS_KEY", format!("secret-{CANARY}"))
            .env("AWS_SESSION_TOKEN", format!("token-{CANARY}"))
            .env("RUST_LOG", "trace")
            .output()
            .expect("the shardflow binary");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let missing = format!("missing-{}", rand::random::<u32>());
    let mut text = run(&["stream", "describe", &missing]);
    text.push_str(&run(&["leases", "list", "--lease-table", &missing]));
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canary_appears_in_no_log_line_metric_error_or_dead_letter_reason() {
    use tracing_subscriber::prelude::*;
    let captured = Captured::default();
    let writer = captured.clone();
    // The worker's own filter at `RUST_LOG=trace`, as an operator debugging would set it, even
    // with the SDK's wire-level targets named (they stay capped).
    let directives = "trace,aws_smithy_runtime::client::orchestrator::http=trace,aws_sigv4=trace";
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .with_filter(shardflow::run::log_filter(directives, false)),
        )
        .init();
    tracing::info!("capture started");
    let registry = prometheus::Registry::new();

    let mut shown = embedded_pipelines(&registry).await;
    shown.extend(aws_pipeline(&registry).await);
    shown.push(tool_output());
    shown.push(
        prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap(),
    );
    let logs = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    // The stopped shard's error line quotes the decoder's (redacted) message.
    assert!(
        logs.contains("capture started") && logs.contains("stopping shard"),
        "logs were captured: {} lines, the first: {:?}",
        logs.lines().count(),
        logs.lines().take(3).collect::<Vec<_>>()
    );
    // The canary as it is, and the planted payloads as the SDK would print them (base64 in
    // JSON bodies, hex in a `Blob`'s Debug).
    let mut needles = vec![CANARY.to_owned()];
    for payload in planted_payloads() {
        needles.push(base64::engine::general_purpose::STANDARD.encode(&payload));
        needles.push(payload.iter().map(|b| format!("{b:02x}")).collect());
    }
    let leaks: Vec<&str> = logs
        .lines()
        .chain(shown.iter().flat_map(|s| s.lines()))
        .filter(|line| needles.iter().any(|n| line.contains(n.as_str())))
        .collect();
    assert!(
        leaks.is_empty(),
        "the canary leaked in {} lines:\n{}",
        leaks.len(),
        leaks
            .iter()
            .map(|l| &l[..l.len().min(400)])
            .collect::<Vec<_>>()
            .join("\n")
    );
    let _ = std::io::stdout().flush();
}
