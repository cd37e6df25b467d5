//! The tool's commands against the embedded local backend: streams under `<dir>/stream`, a
//! topology's lease store under `<dir>/leases/<topology>`, as a worker run with `--local-dir
//! <dir>` lays them out.

use std::io::BufRead as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use shardflow::core::position::ShardId;
use shardflow::local::{
    FileLeaseStore, LocalProducer, LocalSource, LocalStream, LocalStreamConfig,
};

use super::{Command, LeaseAction, StreamAction};

/// Records per append when putting lines.
const PUT_BATCH: usize = 500;

/// Runs `command` on the local backend in `dir`.
pub(super) async fn execute(dir: &Path, command: Command) -> anyhow::Result<()> {
    let streams = dir.join("stream");
    let open = |name: &str| open_stream(&streams, name);
    match command {
        Command::Stream { action } => stream(&streams, action),
        Command::Put {
            stream,
            file,
            key,
            aggregate,
        } => {
            anyhow::ensure!(
                !aggregate,
                "--aggregate packs KPL records for Kinesis; the local backend stores each line"
            );
            let stream = open(&stream)?;
            let reader: Box<dyn std::io::BufRead> = match &file {
                Some(path) => Box::new(std::io::BufReader::new(
                    std::fs::File::open(path)
                        .with_context(|| format!("opening {}", path.display()))?,
                )),
                None => Box::new(std::io::stdin().lock()),
            };
            let producer = LocalProducer::new(stream.clone());
            let mut batch = Vec::with_capacity(PUT_BATCH);
            let mut count = 0;
            for (n, line) in reader.lines().enumerate() {
                let line = line.context("reading input")?;
                batch.push((
                    key.clone().unwrap_or_else(|| n.to_string()),
                    line.into_bytes(),
                ));
                if batch.len() == PUT_BATCH {
                    count += batch.len();
                    producer.put_batch(&batch).await?;
                    batch.clear();
                }
            }
            count += batch.len();
            producer.put_batch(&batch).await?;
            eprintln!("put {count} records to {}", stream.name());
            Ok(())
        }
        Command::Tail {
            stream,
            from,
            limit,
            follow,
        } => super::tail(&LocalSource::new(&open(&stream)?), &from, limit, follow).await,
        Command::Leases { action } => {
            let (LeaseAction::List { table, .. } | LeaseAction::Reset { table, .. }) = &action;
            let leases = dir.join("leases").join(table);
            anyhow::ensure!(
                leases.is_dir(),
                "no lease store for topology {table} in {}",
                dir.join("leases").display()
            );
            let store = FileLeaseStore::new(&leases);
            match action {
                LeaseAction::List { stream, .. } => {
                    anyhow::ensure!(
                        stream.is_none(),
                        "--stream measures lag on Kinesis; the local backend has no lag to show"
                    );
                    super::list_leases(&store, async |_| None).await
                }
                LeaseAction::Reset { to, dry_run, .. } => super::reset(&store, *to, dry_run).await,
            }
        }
        Command::Cost { .. } => unreachable!("answered without a backend"),
    }
}

fn open_stream(streams: &Path, name: &str) -> anyhow::Result<LocalStream> {
    LocalStream::open(streams, name)
        .with_context(|| format!("opening local stream {name} in {}", streams.display()))
}

fn stream(streams: &Path, action: StreamAction) -> anyhow::Result<()> {
    let open = |name: &str| open_stream(streams, name);
    match action {
        StreamAction::Create { stream, shards } => {
            let count = u32::try_from(shards).context("--shards must be positive")?;
            LocalStream::create(streams, &stream, count, LocalStreamConfig::new())?;
            println!(
                "created {stream} with {shards} shards in {}",
                streams.display()
            );
        }
        StreamAction::Describe { stream } => {
            let local = open(&stream)?;
            let shards = local.shards()?;
            let open_shards = shards.iter().filter(|s| !s.closed).count();
            let retention = local.retention()?;
            println!(
                "{stream}: local, {open_shards} open shards, retention {} h",
                retention.as_secs() / 3600
            );
            for shard in shards {
                super::print_shard(&shard);
            }
        }
        StreamAction::Split { stream, shard, at } => {
            let local = open(&stream)?;
            let (id, at) = super::split_point(&local.shards()?, &stream, &shard, at)?;
            local.split_shard(&id, at)?;
            println!("split {shard} at {at:#x}");
        }
        StreamAction::Merge {
            stream,
            shard,
            adjacent,
        } => {
            open(&stream)?.merge_shards(&ShardId::new(&shard), &ShardId::new(&adjacent))?;
            println!("merged {shard} and {adjacent}");
        }
        StreamAction::Scale { .. } => anyhow::bail!(
            "the local backend reshards by split and merge only: use `stream split` or \
             `stream merge`"
        ),
        StreamAction::Retention { stream, hours } => {
            let hours = u64::try_from(hours).context("hours must be positive")?;
            open(&stream)?.set_retention(Duration::from_secs(hours * 3600))?;
            println!("retention of {stream} set to {hours} h");
        }
    }
    Ok(())
}
