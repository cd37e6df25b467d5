//! Benchmark against a Kinesis emulator: producer user records/s and aggregate fill ratio, and
//! user records/s through the spout against a raw SDK GetRecords loop over the same data, in one
//! run (alternating, medians of `--runs`).
//!
//! Start the emulators (`scripts/emulators.sh start /tmp/emu && source /tmp/emu/env`), then:
//! `cargo run --release --features kinesis --example bench_kinesis -- --records 50000`

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aws_sdk_kinesis::types::ShardIteratorType;
use clap::Parser;
use shardflow::core::position::StartPosition;
use shardflow::core::source::{ReadLimits, ShardStatus, Source};
use shardflow::kinesis::aggregation::deaggregate;
use shardflow::kinesis::{KinesisProducer, KinesisSource, ProducerConfig, StreamAdmin};
use shardflow::AwsConfig;

#[derive(Parser)]
struct Args {
    /// Kinesis endpoint (default: $SHARDFLOW_KINESIS_ENDPOINT).
    #[arg(long)]
    endpoint: Option<String>,
    /// User records to produce.
    #[arg(long, default_value_t = 50_000)]
    records: u64,
    /// Bytes per user record.
    #[arg(long, default_value_t = 100)]
    record_bytes: usize,
    /// Aggregate size limit in bytes.
    #[arg(long, default_value_t = 1024 * 1024 - 512)]
    aggregate_bytes: usize,
    /// Shards.
    #[arg(long, default_value_t = 2)]
    shards: i32,
    /// Read runs of each reader, alternating.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// The GetRecords rate limit both readers obey (5 calls per second per shard).
const CALL_INTERVAL: Duration = Duration::from_millis(200);

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let endpoint = match args.endpoint.clone() {
        Some(e) => e,
        None => std::env::var("SHARDFLOW_KINESIS_ENDPOINT")
            .context("give --endpoint or set SHARDFLOW_KINESIS_ENDPOINT")?,
    };
    let client = AwsConfig::emulator(endpoint).kinesis_client().await;
    let stream = format!("bench-{}", std::process::id());
    let admin = StreamAdmin::new(client.clone());
    admin.create_stream(&stream, args.shards).await?;

    // Produce, aggregated, with a steady input.
    let config = ProducerConfig {
        aggregate_max_bytes: Some(args.aggregate_bytes),
        linger: Duration::from_secs(1),
        ..ProducerConfig::default()
    };
    let producer = KinesisProducer::new(client.clone(), &stream, config).await?;
    let payload = vec![b'x'; args.record_bytes];
    let started = Instant::now();
    for i in 0..args.records {
        let _ticket = producer
            .send(&format!("key-{}", i % 1000), payload.clone())
            .await?;
    }
    producer.flush().await?;
    let took = started.elapsed().as_secs_f64();
    let m = producer.metrics();
    println!(
        "RESULT system=producer records={} kinesis_records={} secs={took:.3} user_records_per_s={:.0} fill_ratio_full={:.3} fill_ratio_all={:.3}",
        m.user_records(),
        m.kinesis_records(),
        m.user_records() as f64 / took,
        m.mean_full_fill_ratio(),
        m.mean_fill_ratio()
    );
    anyhow::ensure!(m.user_records() == args.records, "every record written");

    let source = KinesisSource::new(client.clone(), &stream);
    let shards = source.list_shards().await?;
    let (mut raw_rates, mut spout_rates) = (Vec::new(), Vec::new());
    for _ in 0..args.runs {
        // A raw SDK loop: iterator, GetRecords until caught up, de-aggregating.
        let started = Instant::now();
        let mut raw = 0u64;
        for shard in &shards {
            let mut iterator = client
                .get_shard_iterator()
                .stream_name(&stream)
                .shard_id(shard.id.as_str())
                .shard_iterator_type(ShardIteratorType::TrimHorizon)
                .send()
                .await?
                .shard_iterator()
                .context("iterator")?
                .to_owned();
            loop {
                let call = Instant::now();
                let out = client
                    .get_records()
                    .shard_iterator(&iterator)
                    .limit(10_000)
                    .send()
                    .await?;
                for r in out.records() {
                    raw += deaggregate(r.data().as_ref())?.map_or(1, |u| u.len() as u64);
                }
                if out.records().is_empty() && out.millis_behind_latest().unwrap_or(0) == 0 {
                    break;
                }
                iterator = out.next_shard_iterator().context("open shard")?.to_owned();
                tokio::time::sleep_until((call + CALL_INTERVAL).into()).await;
            }
        }
        raw_rates.push(raw as f64 / started.elapsed().as_secs_f64());
        anyhow::ensure!(raw == args.records, "raw loop read {raw}");

        // The spout, same data, same stopping rule.
        let started = Instant::now();
        let mut read = 0u64;
        for shard in &shards {
            let mut reader = source
                .open_shard(
                    shard,
                    StartPosition::TrimHorizon,
                    ReadLimits {
                        max_records: 10_000,
                        max_bytes: 64 << 20,
                    },
                )
                .await?;
            loop {
                let batch = reader.read().await?;
                read += batch.records.len() as u64;
                if batch.status != ShardStatus::More {
                    break;
                }
            }
        }
        spout_rates.push(read as f64 / started.elapsed().as_secs_f64());
        anyhow::ensure!(read == args.records, "spout read {read}");
    }
    let (raw, spout) = (median(&mut raw_rates), median(&mut spout_rates));
    println!(
        "RESULT system=raw_get_records records={} runs={} user_records_per_s={raw:.0}",
        args.records, args.runs
    );
    println!(
        "RESULT system=spout records={} runs={} user_records_per_s={spout:.0}",
        args.records, args.runs
    );
    println!("RATIO spout/raw={:.3}", spout / raw);
    admin.delete_stream(&stream).await?;
    Ok(())
}
