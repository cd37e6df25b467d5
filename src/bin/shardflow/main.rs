//! The `shardflow` operations tool: stream administration, `put` and `tail` (like kcat for
//! Kafka), lease inspection and reset, and a cost estimate, against the embedded local backend
//! (`--local-dir`, the directory a worker's `--local-dir` names) or against Kinesis and
//! DynamoDB (features `kinesis` and `dynamodb`; credentials from the default chain,
//! `--kinesis-endpoint` and `--dynamodb-endpoint` for emulators or VPC endpoints).

#[cfg(all(feature = "kinesis", feature = "dynamodb"))]
mod aws;
mod local;

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use shardflow::core::lease::{LeaseStore, ShardCheckpoint};
use shardflow::core::position::{ShardId, StartPosition};
use shardflow::core::source::{ReadLimits, ShardStatus, Source};

#[derive(Parser)]
#[command(
    name = "shardflow",
    about = "Operate Kinesis streams and shardflow workers, or their local equivalents"
)]
struct Cli {
    /// Use the embedded local backend in this directory (a worker's `--local-dir`): streams
    /// under `stream/`, lease stores under `leases/<topology>`. Without it, AWS.
    #[arg(long, global = true, env = "SHARDFLOW_LOCAL_DIR")]
    local_dir: Option<PathBuf>,
    /// AWS region (default: the AWS default chain).
    #[arg(long, global = true, env = "SHARDFLOW_REGION")]
    region: Option<String>,
    /// Kinesis endpoint override (an emulator, a VPC endpoint).
    #[arg(long, global = true, env = "SHARDFLOW_KINESIS_ENDPOINT")]
    kinesis_endpoint: Option<String>,
    /// DynamoDB endpoint override.
    #[arg(long, global = true, env = "SHARDFLOW_DYNAMODB_ENDPOINT")]
    dynamodb_endpoint: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create, describe and reshape streams.
    Stream {
        #[command(subcommand)]
        action: StreamAction,
    },
    /// Put lines (from stdin or a file) as records.
    Put {
        /// The stream.
        stream: String,
        /// Read lines from this file instead of stdin.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Partition key of every record (default: the line number, spreading over shards).
        #[arg(long)]
        key: Option<String>,
        /// Pack records into KPL aggregated records (fewer, fuller PUT payload units).
        #[arg(long)]
        aggregate: bool,
    },
    /// Print records of every shard from a start position, de-aggregating KPL records.
    Tail {
        /// The stream.
        stream: String,
        /// trim-horizon, latest, or a time (RFC 3339, e.g. 2026-11-26T08:00:00Z).
        #[arg(long, default_value = "trim-horizon")]
        from: String,
        /// Stop after this many records.
        #[arg(long)]
        limit: Option<usize>,
        /// Keep waiting for new records instead of stopping at the tip.
        #[arg(long)]
        follow: bool,
    },
    /// Inspect a topology's lease table (on the local backend: its lease store, named by the
    /// topology).
    Leases {
        #[command(subcommand)]
        action: LeaseAction,
    },
    /// Estimate shards and PUT payload units for an event rate and size.
    Cost {
        /// Events per second.
        #[arg(long)]
        events_per_second: f64,
        /// Bytes per event (payload plus partition key).
        #[arg(long)]
        event_bytes: f64,
    },
}

#[derive(Subcommand)]
enum StreamAction {
    /// Create a stream.
    Create {
        /// The stream.
        stream: String,
        /// Shards.
        #[arg(long, default_value_t = 1)]
        shards: i32,
    },
    /// Status, open shards, retention and the shard list.
    Describe {
        /// The stream.
        stream: String,
    },
    /// Split a shard (at the middle of its hash key range by default).
    Split {
        /// The stream.
        stream: String,
        /// The shard.
        shard: String,
        /// Starting hash key of the new upper child.
        #[arg(long)]
        at: Option<u128>,
    },
    /// Merge two adjacent shards.
    Merge {
        /// The stream.
        stream: String,
        /// One shard.
        shard: String,
        /// The adjacent shard.
        adjacent: String,
    },
    /// Reshard uniformly to a number of open shards.
    Scale {
        /// The stream.
        stream: String,
        /// Open shards wanted.
        shards: i32,
    },
    /// Set the retention period.
    Retention {
        /// The stream.
        stream: String,
        /// Hours (24 to 8760).
        hours: i32,
    },
}

#[derive(Subcommand)]
enum LeaseAction {
    /// Owner, counter, checkpoint and lag (milliseconds behind the tip) per shard.
    List {
        /// The lease table.
        table: String,
        /// The stream, to measure each shard's lag behind its tip.
        #[arg(long)]
        stream: Option<String>,
    },
    /// Move every checkpoint to TRIM_HORIZON (the topology replays what the stream retains) or
    /// to a time (it replays what arrived since). Workers must be stopped: an owned lease is
    /// refused.
    Reset {
        /// The lease table.
        table: String,
        /// Where to: trim-horizon, or a time (RFC 3339, e.g. 2026-11-26T08:00:00Z).
        #[arg(long, value_parser = reset_point)]
        to: Box<ShardCheckpoint>,
        /// Show the change without making it.
        #[arg(long)]
        dry_run: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(execute(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("shardflow: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Where the commands go.
enum Backend {
    /// The embedded backend in a directory.
    Local(PathBuf),
    /// Kinesis and DynamoDB, with these settings (read only by builds with the AWS SDK).
    #[cfg_attr(not(all(feature = "kinesis", feature = "dynamodb")), allow(dead_code))]
    Aws {
        region: Option<String>,
        kinesis_endpoint: Option<String>,
        dynamodb_endpoint: Option<String>,
    },
}

#[cfg(not(all(feature = "kinesis", feature = "dynamodb")))]
mod aws {
    //! This build has no AWS SDK: every AWS command says how to get one.
    use super::Backend;

    fn missing() -> anyhow::Error {
        anyhow::anyhow!(
            "this build of shardflow has no AWS support: pass --local-dir for the local \
             backend, or build with --features cli,kinesis,dynamodb"
        )
    }

    pub(super) async fn execute(_: &Backend, _: super::Command) -> anyhow::Result<()> {
        Err(missing())
    }
}

async fn execute(cli: Cli) -> anyhow::Result<()> {
    if let Command::Cost {
        events_per_second,
        event_bytes,
    } = cli.command
    {
        print!("{}", cost(events_per_second, event_bytes)?);
        return Ok(());
    }
    let backend = match cli.local_dir {
        Some(dir) => Backend::Local(dir),
        None => Backend::Aws {
            region: cli.region,
            kinesis_endpoint: cli.kinesis_endpoint,
            dynamodb_endpoint: cli.dynamodb_endpoint,
        },
    };
    match &backend {
        Backend::Local(dir) => local::execute(dir, cli.command).await,
        Backend::Aws { .. } => aws::execute(&backend, cli.command).await,
    }
}

/// Where `stream split` splits `shard` of `stream` (listed as `shards`): at `at`, or at the
/// middle of its hash key range.
fn split_point(
    shards: &[shardflow::core::position::ShardInfo],
    stream: &str,
    shard: &str,
    at: Option<u128>,
) -> anyhow::Result<(ShardId, u128)> {
    let info = shards
        .iter()
        .find(|s| s.id.as_str() == shard)
        .with_context(|| format!("no shard {shard} in {stream}"))?;
    let middle = info.hash_key_range.0 / 2 + info.hash_key_range.1 / 2 + 1;
    Ok((info.id.clone(), at.unwrap_or(middle)))
}

/// One line per shard of `stream describe`.
fn print_shard(shard: &shardflow::core::position::ShardInfo) {
    let parents: Vec<&str> = shard.parents.iter().map(ShardId::as_str).collect();
    println!(
        "  {} {} hash {:#x}..{:#x}{}",
        shard.id.as_str(),
        if shard.closed { "closed" } else { "open" },
        shard.hash_key_range.0,
        shard.hash_key_range.1,
        if parents.is_empty() {
            String::new()
        } else {
            format!(" parents {}", parents.join(","))
        }
    );
}

/// Milliseconds since the epoch of an RFC 3339 time.
fn epoch_ms(time: &str) -> Option<i64> {
    let at = humantime::parse_rfc3339_weak(time).ok()?;
    let ms = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis();
    i64::try_from(ms).ok()
}

/// `leases reset --to`: trim-horizon or an RFC 3339 time.
fn reset_point(to: &str) -> Result<Box<ShardCheckpoint>, String> {
    match to {
        "trim-horizon" => Ok(Box::new(ShardCheckpoint::trim_horizon())),
        time => epoch_ms(time)
            .map(|ms| Box::new(ShardCheckpoint::at_timestamp(ms)))
            .ok_or_else(|| {
                format!("takes trim-horizon or an RFC 3339 time after 1970, not {time:?}")
            }),
    }
}

fn start_position(from: &str) -> anyhow::Result<StartPosition> {
    Ok(match from {
        "trim-horizon" => StartPosition::TrimHorizon,
        "latest" => StartPosition::Latest,
        time => StartPosition::AtTimestamp(epoch_ms(time).with_context(|| {
            format!("--from takes trim-horizon, latest or an RFC 3339 time, not {time:?}")
        })?),
    })
}

/// Prints the records of every shard of `source` from `from` (`tail`).
async fn tail(
    source: &dyn Source,
    from: &str,
    limit: Option<usize>,
    follow: bool,
) -> anyhow::Result<()> {
    let start = start_position(from)?;
    let shards = source.list_shards().await?;
    let mut readers = Vec::new();
    for shard in &shards {
        readers.push((
            shard.id.clone(),
            source
                .open_shard(shard, start.clone(), ReadLimits::default())
                .await?,
            false,
        ));
    }
    let mut printed = 0;
    let stdout = std::io::stdout();
    // Records sent to a file or a pipe (a replay, a dump) get a progress line on the terminal.
    let progress = if !stdout.is_terminal() && std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new_spinner()
    } else {
        indicatif::ProgressBar::hidden()
    };
    progress.set_style(
        indicatif::ProgressStyle::with_template("{spinner} tail {elapsed}: {pos} records {msg}")
            .expect("a valid template"),
    );
    let mut behind: std::collections::HashMap<ShardId, i64> = std::collections::HashMap::new();
    let result = loop {
        let mut all_done = true;
        for (id, reader, done) in &mut readers {
            if *done {
                continue;
            }
            let batch = reader.read().await?;
            progress.inc(batch.records.len() as u64);
            if let Some(ms) = batch.millis_behind_latest {
                behind.insert(id.clone(), i64::try_from(ms).unwrap_or(i64::MAX));
                let slowest = behind.values().max().copied().unwrap_or(0);
                progress.set_message(format!("({}s behind the tip)", slowest / 1000));
            }
            let mut out = stdout.lock();
            for record in batch.records.iter() {
                writeln!(
                    out,
                    "{}\t{}/{}\t{}",
                    id.as_str(),
                    record.position.sequence,
                    record.position.sub_sequence,
                    String::from_utf8_lossy(record.data)
                )?;
                printed += 1;
                if limit.is_some_and(|l| printed >= l) {
                    break;
                }
            }
            if limit.is_some_and(|l| printed >= l) {
                all_done = true;
                break;
            }
            match batch.status {
                ShardStatus::Ended => *done = true,
                ShardStatus::CaughtUp if !follow => *done = true,
                _ => all_done = false,
            }
        }
        if all_done {
            break Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    progress.finish_and_clear();
    result
}

/// Prints every lease of `store`, with the lag `lag` measures where it can (`leases list`).
async fn list_leases(
    store: &dyn LeaseStore,
    lag: impl AsyncFn(&shardflow::core::lease::Lease) -> Option<i64>,
) -> anyhow::Result<()> {
    println!("lease\towner\tcounter\tcheckpoint\tlag_ms");
    for lease in store.list().await? {
        let checkpoint = describe(&lease.checkpoint.committed);
        let lag = lag(&lease).await;
        println!(
            "{}\t{}\t{}\t{}\t{}",
            lease.key,
            lease.owner.as_deref().unwrap_or("-"),
            lease.counter,
            checkpoint,
            lag.map_or_else(|| "-".to_owned(), |l| l.to_string())
        );
    }
    Ok(())
}

fn describe(position: &shardflow::core::lease::CheckpointPosition) -> String {
    use shardflow::core::lease::CheckpointPosition;
    match position {
        CheckpointPosition::Initial => "INITIAL".to_owned(),
        CheckpointPosition::TrimHorizon => "TRIM_HORIZON".to_owned(),
        CheckpointPosition::AtTimestamp(ms) => {
            let at = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(*ms).unwrap_or(0));
            format!("AT_TIMESTAMP {}", humantime::format_rfc3339_millis(at))
        }
        CheckpointPosition::ShardEnd => "SHARD_END".to_owned(),
        CheckpointPosition::At(p) => format!("{}/{}", p.sequence, p.sub_sequence),
    }
}

/// Moves every checkpoint of `store` to `target` (`leases reset`): refused while a worker owns
/// a lease.
async fn reset(
    store: &dyn LeaseStore,
    target: ShardCheckpoint,
    dry_run: bool,
) -> anyhow::Result<()> {
    use shardflow::core::lease::LeaseUpdate;
    use shardflow::core::protocol::lease_keys::is_tombstone;
    // Tombstones of moved shard-id leases stay finished: resetting one would hand its shard
    // back to a worker of the old form.
    let leases: Vec<_> = store
        .list()
        .await?
        .into_iter()
        .filter(|l| !is_tombstone(l))
        .collect();
    let owned: Vec<String> = leases
        .iter()
        .filter_map(|l| {
            l.owner
                .as_ref()
                .map(|o| format!("{} (owned by {o})", l.key))
        })
        .collect();
    anyhow::ensure!(
        owned.is_empty(),
        "stop the workers first; these leases are owned: {}",
        owned.join(", ")
    );
    for lease in &leases {
        println!(
            "{}	{} -> {}{}",
            lease.key,
            describe(&lease.checkpoint.committed),
            describe(&target.committed),
            if dry_run { "	(dry run)" } else { "" }
        );
        if !dry_run {
            let update = LeaseUpdate::Reset {
                checkpoint: target.clone(),
            };
            store
                .update(&lease.key, lease.counter, &update)
                .await
                .with_context(|| format!("resetting {}", lease.key))?;
        }
    }
    Ok(())
}

/// Shards and PUT payload units (25 KB each) per second, with and without aggregation.
fn cost(events_per_second: f64, event_bytes: f64) -> anyhow::Result<String> {
    anyhow::ensure!(
        events_per_second > 0.0 && event_bytes > 0.0,
        "--events-per-second and --event-bytes must be positive"
    );
    anyhow::ensure!(
        event_bytes <= 1024.0 * 1024.0,
        "--event-bytes must be at most 1 MiB (the record limit)"
    );
    const SHARD_RECORDS: f64 = 1000.0;
    const SHARD_BYTES: f64 = 1024.0 * 1024.0;
    const UNIT: f64 = 25.0 * 1024.0;
    const AGGREGATE: f64 = 50.0 * 1024.0;
    let bytes = events_per_second * event_bytes;
    let plain_shards = (events_per_second / SHARD_RECORDS)
        .max(bytes / SHARD_BYTES)
        .ceil()
        .max(1.0);
    let plain_units = events_per_second * (event_bytes / UNIT).ceil();
    // Aggregated: events packed into ~50 KB records (a few bytes of framing each).
    let per_record = (AGGREGATE / (event_bytes + 8.0)).floor().max(1.0);
    let records = events_per_second / per_record;
    let aggregated_shards = (records / SHARD_RECORDS)
        .max(bytes / SHARD_BYTES)
        .ceil()
        .max(1.0);
    let aggregated_units = records * (per_record * (event_bytes + 8.0) / UNIT).ceil();
    Ok(format!(
        "{events_per_second} events/s of {event_bytes} B = {:.2} MiB/s\n\
         without aggregation: {plain_shards} shards, {plain_units:.0} PUT payload units/s\n\
         with aggregation ({per_record} events per record): {aggregated_shards} shards, \
         {aggregated_units:.0} PUT payload units/s\n",
        bytes / SHARD_BYTES
    ))
}

#[cfg(test)]
mod tests {
    use super::cost;

    #[test]
    fn cost_counts_shards_by_records_and_bytes_and_units_by_25_kb() {
        let small = cost(10_000.0, 100.0).unwrap();
        assert!(
            small.contains("without aggregation: 10 shards, 10000 PUT"),
            "{small}"
        );
        assert!(
            small.contains("with aggregation (474 events per record): 1 shards"),
            "{small}"
        );
        let big = cost(100.0, 30_000.0).unwrap();
        assert!(
            big.contains("without aggregation: 3 shards, 200 PUT"),
            "{big}"
        );
        assert!(cost(0.0, 1.0).is_err());
    }
}
