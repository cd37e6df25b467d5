//! The tool's commands against Kinesis and DynamoDB (features `kinesis` and `dynamodb`).

use std::io::{BufRead as _, IsTerminal as _};
use std::path::PathBuf;

use anyhow::Context as _;
use shardflow::core::position::ShardId;
use shardflow::dynamodb::DynamoLeaseStore;
use shardflow::kinesis::{KinesisProducer, KinesisSource, ProducerConfig, StreamAdmin};
use shardflow::AwsConfig;

use super::{Backend, Command, LeaseAction, StreamAction};

/// Runs `command` against AWS (`backend` is `Backend::Aws`).
pub(super) async fn execute(backend: &Backend, command: Command) -> anyhow::Result<()> {
    let Backend::Aws {
        region,
        kinesis_endpoint,
        dynamodb_endpoint,
    } = backend
    else {
        unreachable!("called for the AWS backend only")
    };
    let config = Clients {
        region,
        kinesis_endpoint,
        dynamodb_endpoint,
    };
    match command {
        Command::Stream { action } => stream(&config, action).await,
        Command::Put {
            stream,
            file,
            key,
            aggregate,
        } => put(&config, &stream, file, key, aggregate).await,
        Command::Tail {
            stream,
            from,
            limit,
            follow,
        } => {
            let source = KinesisSource::new(config.kinesis_client().await, stream);
            super::tail(&source, &from, limit, follow).await
        }
        Command::Leases { action } => {
            let (LeaseAction::List { table, .. } | LeaseAction::Reset { table, .. }) = &action;
            let store = DynamoLeaseStore::open(config.dynamodb_client().await, table.clone())
                .await
                .with_context(|| format!("opening lease table {table}"))?;
            match action {
                LeaseAction::List { stream, .. } => {
                    let kinesis = config.kinesis_client().await;
                    super::list_leases(&store, async |lease| match &stream {
                        Some(stream) => lag_ms(&kinesis, stream, lease).await,
                        None => None,
                    })
                    .await
                }
                LeaseAction::Reset { to, dry_run, .. } => super::reset(&store, *to, dry_run).await,
            }
        }
        Command::Cost { .. } => unreachable!("answered without a backend"),
    }
}

/// Clients for the region and endpoints given.
struct Clients<'a> {
    region: &'a Option<String>,
    kinesis_endpoint: &'a Option<String>,
    dynamodb_endpoint: &'a Option<String>,
}

impl Clients<'_> {
    fn config(&self, endpoint: Option<&String>) -> AwsConfig {
        let mut config = AwsConfig::new();
        if let Some(region) = self.region {
            config = config.region(region.clone());
        }
        if let Some(endpoint) = endpoint {
            config = config.endpoint(endpoint.clone());
        }
        config
    }

    async fn kinesis_client(&self) -> aws_sdk_kinesis::Client {
        self.config(self.kinesis_endpoint.as_ref())
            .kinesis_client()
            .await
    }

    async fn dynamodb_client(&self) -> aws_sdk_dynamodb::Client {
        self.config(self.dynamodb_endpoint.as_ref())
            .dynamodb_client()
            .await
    }
}

async fn stream(config: &Clients<'_>, action: StreamAction) -> anyhow::Result<()> {
    let admin = StreamAdmin::new(config.kinesis_client().await);
    match action {
        StreamAction::Create { stream, shards } => {
            admin.create_stream(&stream, shards).await?;
            println!("created {stream} with {shards} shards");
        }
        StreamAction::Describe { stream } => {
            let summary = admin.describe(&stream).await?;
            println!(
                "{stream}: {}, {} open shards, retention {} h",
                summary.status, summary.open_shards, summary.retention_hours
            );
            for shard in admin.list_shards(&stream).await? {
                super::print_shard(&shard);
            }
        }
        StreamAction::Split { stream, shard, at } => {
            let shards = admin.list_shards(&stream).await?;
            let (id, at) = super::split_point(&shards, &stream, &shard, at)?;
            admin.split_shard(&stream, &id, at).await?;
            println!("split {shard} at {at:#x}");
        }
        StreamAction::Merge {
            stream,
            shard,
            adjacent,
        } => {
            admin
                .merge_shards(&stream, &ShardId::new(&shard), &ShardId::new(&adjacent))
                .await?;
            println!("merged {shard} and {adjacent}");
        }
        StreamAction::Scale { stream, shards } => {
            admin.update_shard_count(&stream, shards).await?;
            println!("scaled {stream} to {shards} shards");
        }
        StreamAction::Retention { stream, hours } => {
            admin.set_retention(&stream, hours).await?;
            println!("retention of {stream} set to {hours} h");
        }
    }
    Ok(())
}

async fn put(
    config: &Clients<'_>,
    stream: &str,
    file: Option<PathBuf>,
    key: Option<String>,
    aggregate: bool,
) -> anyhow::Result<()> {
    let producer_config = ProducerConfig {
        aggregate_max_bytes: aggregate.then_some(50 * 1024),
        ..ProducerConfig::default()
    };
    let producer = KinesisProducer::new(config.kinesis_client().await, stream, producer_config)
        .await
        .context("starting the producer")?;
    let (reader, total): (Box<dyn std::io::BufRead>, Option<u64>) = match &file {
        Some(path) => {
            let f =
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            let len = f.metadata().map(|m| m.len()).ok();
            (Box::new(std::io::BufReader::new(f)), len)
        }
        None => (Box::new(std::io::stdin().lock()), None),
    };
    // A progress bar for a file, on a terminal only.
    let progress = match total {
        Some(len) if std::io::stderr().is_terminal() => indicatif::ProgressBar::new(len),
        _ => indicatif::ProgressBar::hidden(),
    };
    let mut tickets = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line.context("reading input")?;
        progress.inc(line.len() as u64 + 1);
        let partition_key = key.clone().unwrap_or_else(|| n.to_string());
        tickets.push(producer.send(&partition_key, line.into_bytes()).await?);
    }
    producer.flush().await?;
    let count = tickets.len();
    for ticket in tickets {
        ticket.outcome().await.context("a record was not written")?;
    }
    progress.finish_and_clear();
    eprintln!("put {count} records to {stream}");
    Ok(())
}

/// How far behind the shard's tip the checkpoint is (MillisBehindLatest of a read right after
/// it), if the shard is open and readable.
async fn lag_ms(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    lease: &shardflow::core::lease::Lease,
) -> Option<i64> {
    use aws_sdk_kinesis::types::ShardIteratorType;
    let request = client
        .get_shard_iterator()
        .stream_name(stream)
        .shard_id(shardflow::core::protocol::lease_keys::shard_id(&lease.key));
    let request = match &lease.checkpoint.committed {
        // The topology's initial position is not in the table: TRIM_HORIZON is the upper bound.
        shardflow::core::lease::CheckpointPosition::Initial
        | shardflow::core::lease::CheckpointPosition::TrimHorizon => {
            request.shard_iterator_type(ShardIteratorType::TrimHorizon)
        }
        shardflow::core::lease::CheckpointPosition::AtTimestamp(ms) => request
            .shard_iterator_type(ShardIteratorType::AtTimestamp)
            .timestamp(aws_sdk_kinesis::primitives::DateTime::from_millis(*ms)),
        shardflow::core::lease::CheckpointPosition::At(p) => request
            .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
            .starting_sequence_number(p.sequence.to_string()),
        shardflow::core::lease::CheckpointPosition::ShardEnd => return Some(0),
    };
    let iterator = request.send().await.ok()?.shard_iterator?;
    let out = client
        .get_records()
        .shard_iterator(iterator)
        .limit(1)
        .send()
        .await
        .ok()?;
    out.millis_behind_latest
}
