//! Clickstream: per-campaign, per-minute impressions, clicks, conversions and click-through
//! rate, on the embedded local backend (no AWS account needed).
//!
//! `cargo run --release --example clickstream` generates an AdRoll-like stream (a few hundred
//! campaigns, partition key = campaign) into a local stream of 4 shards under `out/`, runs the
//! topology to the end of the input, and upserts one row per campaign and minute into the
//! SQLite database `out/clickstream.sqlite` (table `campaign_minutes`), then prints the busiest
//! campaign-minutes and the query that found them, to paste into `sqlite3`. With `--output dir`
//! it writes one JSON file per campaign and minute to `out/clickstream-output/` instead.
//!
//! Against Kinesis (an emulator, or AWS with the default credential chain when `--endpoint` is
//! left out): `cargo run --release --features kinesis --example clickstream -- --backend kinesis
//! --endpoint http://127.0.0.1:4567`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use shardflow::local::{
    FileLeaseStore, LocalDirSink, LocalProducer, LocalSource, LocalStream, LocalStreamConfig,
};
use shardflow::prelude::*;
use shardflow::sqlite::{rusqlite, SqliteSink};

#[derive(Parser)]
struct Args {
    /// Events to generate.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Campaigns (partition keys).
    #[arg(long, default_value_t = 300)]
    campaigns: u32,
    /// Working directory (stream, leases, output); emptied first.
    #[arg(long, default_value = "out")]
    dir: std::path::PathBuf,
    /// Where the stream lives: `local` (embedded, file-backed) or `kinesis` (needs
    /// `--features kinesis` and `--endpoint` or AWS credentials).
    #[arg(long, value_enum, default_value_t = Backend::Local)]
    backend: Backend,
    /// Kinesis endpoint (an emulator such as kinesis-local); without it, AWS's default chain.
    #[arg(long)]
    endpoint: Option<String>,
    /// Kinesis stream to create and use.
    #[arg(long, default_value = "clickstream")]
    stream: String,
    /// Where results go: `sqlite` (one database file) or `dir` (one JSON file per result).
    #[arg(long, value_enum, default_value_t = Output::Sqlite)]
    output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Sqlite,
    Dir,
}

/// The busiest campaign-minutes by clicks: the query the example runs and prints.
const TOP_MINUTES: &str =
    "SELECT key AS campaign, datetime(window_start / 1000, 'unixepoch') AS minute, \
     json_extract(value, '$.clicks') AS clicks, \
     round(json_extract(value, '$.click_through_rate'), 4) AS ctr \
     FROM campaign_minutes ORDER BY clicks DESC, campaign LIMIT 5";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Backend {
    Local,
    Kinesis,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Impression,
    Click,
    Conversion,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct AdEvent {
    campaign: String,
    kind: Kind,
    ts_ms: i64,
}

/// Impressions, clicks and conversions of a campaign in a window.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Funnel {
    impressions: u64,
    clicks: u64,
    conversions: u64,
}

/// Counts the three kinds in one pass: a user aggregator.
#[derive(Clone)]
struct CountFunnel;

impl Aggregator<AdEvent> for CountFunnel {
    type Acc = Funnel;
    type Out = Funnel;
    fn init(&self, _first: &AdEvent) -> Funnel {
        Funnel::default()
    }
    fn add(&self, acc: &mut Funnel, e: &AdEvent) {
        match e.kind {
            Kind::Impression => acc.impressions += 1,
            Kind::Click => acc.clicks += 1,
            Kind::Conversion => acc.conversions += 1,
        }
    }
    fn merge(&self, acc: &mut Funnel, o: Funnel) {
        acc.impressions += o.impressions;
        acc.clicks += o.clicks;
        acc.conversions += o.conversions;
    }
    fn result(&self, acc: &Funnel) -> Funnel {
        *acc
    }
}

/// What the example writes per campaign and minute.
#[derive(Clone, Debug, Serialize)]
struct CampaignMinute {
    campaign: String,
    minute_start_ms: i64,
    impressions: u64,
    clicks: u64,
    conversions: u64,
    click_through_rate: f64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir).context("creating the working directory")?;

    let started = Instant::now();
    let events = generate(&args)?;
    let builder = Topology::builder("clickstream").dead_letter(DeadLetter::to(LocalDirSink::new(
        args.dir.join("dead-letters"),
    )));
    let clicks = match args.backend {
        Backend::Local => {
            let stream = LocalStream::create(&args.dir, "clickstream", 4, LocalStreamConfig::new())
                .context("creating the local stream")?;
            let producer = LocalProducer::new(stream.clone());
            for chunk in events.chunks(10_000) {
                producer.put_batch(chunk).await?;
            }
            builder.source(LocalSource::new(&stream).json::<AdEvent>())
        }
        Backend::Kinesis => kinesis::source(builder, &args, &events).await?,
    };
    println!(
        "generated {} events into 4 shards in {:.1?}",
        args.events,
        started.elapsed()
    );

    let database = args.dir.join("clickstream.sqlite");
    let out = args.dir.join("clickstream-output");
    let seen = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&seen);
    let topology = clicks
        .event_time(|e: &AdEvent| e.ts_ms)
        .max_out_of_orderness(Duration::from_secs(2))
        .inspect(move |_| {
            let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
            if n % 250_000 == 0 {
                println!("processed {n} events");
            }
        })
        .key_by(|e: &AdEvent| e.campaign.clone())
        .window(TumblingWindow::of(Duration::from_secs(60)))
        .aggregate(CountFunnel)
        .map(|r: WindowResult<String, Funnel>| CampaignMinute {
            campaign: r.key,
            minute_start_ms: r.window.start,
            impressions: r.value.impressions,
            clicks: r.value.clicks,
            conversions: r.value.conversions,
            click_through_rate: if r.value.impressions == 0 {
                0.0
            } else {
                r.value.clicks as f64 / r.value.impressions as f64
            },
        });
    let topology = match args.output {
        Output::Sqlite => topology.sink(SqliteSink::new(&database, "campaign_minutes")?),
        Output::Dir => topology.sink(LocalDirSink::new(&out)),
    }
    .build()?;
    let leases = Arc::new(FileLeaseStore::new(args.dir.join("leases")));
    let config = RuntimeConfig {
        worker_id: "clickstream-example".into(),
        mode: RunMode::UntilCaughtUp,
        ..RuntimeConfig::default()
    };
    let run_started = Instant::now();
    let report = Runtime::new(topology, leases)
        .with_config(config)
        .run()
        .await?;
    let took = run_started.elapsed();

    let (results, place) = match args.output {
        Output::Sqlite => (count_rows(&database)?, database.display().to_string()),
        Output::Dir => (walk(&out)?, out.display().to_string()),
    };
    println!(
        "processed {} events from {} shards in {:.1?} ({:.0} events/s); wrote {} campaign-minute results to {}",
        seen.load(Ordering::Relaxed),
        report.shards_caught_up.len(),
        took,
        seen.load(Ordering::Relaxed) as f64 / took.as_secs_f64(),
        results,
        place
    );
    if args.output == Output::Sqlite {
        print_top_minutes(&database)?;
    }
    Ok(())
}

fn count_rows(database: &std::path::Path) -> Result<usize> {
    let conn = rusqlite::Connection::open(database)?;
    let n: i64 = conn.query_row("SELECT count(*) FROM campaign_minutes", [], |r| r.get(0))?;
    Ok(usize::try_from(n)?)
}

/// Runs `TOP_MINUTES` and prints its rows, and the command that runs it again.
fn print_top_minutes(database: &std::path::Path) -> Result<()> {
    let conn = rusqlite::Connection::open(database)?;
    let mut stmt = conn.prepare(TOP_MINUTES)?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, f64>(3)?,
        ))
    })?;
    println!("busiest campaign-minutes by clicks:");
    for row in rows {
        let (campaign, minute, clicks, ctr) = row?;
        println!("  {campaign}  {minute}  {clicks:>4} clicks  ctr {ctr}");
    }
    println!(
        "query it yourself:\n  sqlite3 {} \"{TOP_MINUTES}\"",
        database.display()
    );
    Ok(())
}

/// An AdRoll-like hour of traffic: (partition key = campaign, JSON event) pairs.
fn generate(args: &Args) -> Result<Vec<(String, Vec<u8>)>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2026);
    let span_ms = 3_600_000i64;
    let mut events = Vec::with_capacity(usize::try_from(args.events).unwrap_or(0));
    for i in 0..args.events {
        let campaign = format!("campaign-{:03}", rng.gen_range(0..args.campaigns));
        let kind = match rng.gen_range(0..1000) {
            0..=9 => Kind::Conversion,
            10..=59 => Kind::Click,
            _ => Kind::Impression,
        };
        let ts_ms =
            1_767_225_600_000 + (i as i64 * span_ms) / args.events as i64 - rng.gen_range(0..2_000);
        let event = AdEvent {
            campaign: campaign.clone(),
            kind,
            ts_ms,
        };
        events.push((campaign, serde_json::to_vec(&event)?));
    }
    Ok(events)
}

#[cfg(feature = "kinesis")]
mod kinesis {
    //! The Kinesis backend of the example: a stream of 4 shards, written with the aggregating
    //! producer and read with the spout.
    use super::*;
    use shardflow::core::topology::{Sourced, TopologyBuilder};
    use shardflow::kinesis::{KinesisProducer, KinesisSource, ProducerConfig, StreamAdmin};
    use shardflow::AwsConfig;

    pub async fn source(
        builder: TopologyBuilder,
        args: &Args,
        events: &[(String, Vec<u8>)],
    ) -> Result<shardflow::Stream<AdEvent, Sourced>> {
        let config = match &args.endpoint {
            Some(endpoint) => AwsConfig::emulator(endpoint.clone()),
            None => AwsConfig::new(),
        };
        let client = config.kinesis_client().await;
        let admin = StreamAdmin::new(client.clone());
        let _ = admin.delete_stream(&args.stream).await; // a fresh stream each run
        while admin.describe(&args.stream).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        admin
            .create_stream(&args.stream, 4)
            .await
            .context("creating the Kinesis stream")?;
        let producer = KinesisProducer::new(
            client.clone(),
            &args.stream,
            ProducerConfig {
                aggregate_max_bytes: Some(1024 * 1024 - 512),
                ..ProducerConfig::default()
            },
        )
        .await?;
        for (key, data) in events {
            let _ticket = producer.send(key, data.clone()).await?;
        }
        producer.flush().await?;
        println!(
            "wrote {} events in {} Kinesis records (aggregated)",
            producer.metrics().user_records(),
            producer.metrics().kinesis_records()
        );
        Ok(builder.source(KinesisSource::new(client, &args.stream).json::<AdEvent>()))
    }
}

#[cfg(not(feature = "kinesis"))]
mod kinesis {
    //! Without the `kinesis` feature the example runs on the local backend only.
    use super::*;
    use shardflow::core::topology::{Sourced, TopologyBuilder};

    pub async fn source(
        _builder: TopologyBuilder,
        _args: &Args,
        _events: &[(String, Vec<u8>)],
    ) -> Result<shardflow::Stream<AdEvent, Sourced>> {
        anyhow::bail!("--backend kinesis needs the kinesis feature: cargo run --release --features kinesis --example clickstream -- --backend kinesis --endpoint URL")
    }
}

fn walk(dir: &std::path::Path) -> Result<usize> {
    let mut n = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        n += if path.is_dir() { walk(&path)? } else { 1 };
    }
    Ok(n)
}
