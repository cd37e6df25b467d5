//! Benchmark: the full runtime from an in-memory generating source to a counting sink, against
//! a plain single-threaded FxHashMap loop over the same events, in the same process.
//!
//! `cargo run --release --example bench_window -- --events 20000000 --keys 100000 --events-per-ms 1 --window-ms 1000 --workers 2`
//! (`--window-ms 0` runs a running keyed count with no window). Prints one `RESULT` line per
//! system and run (`--runs`, default 5, alternating), then the medians and their ratio.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use async_trait::async_trait;
use clap::Parser;
use rustc_hash::FxHashMap;
use shardflow::core::error::{DecodeError, SinkError, SourceError};
use shardflow::core::position::{
    RecordPosition, SequenceNumber, ShardId, ShardInfo, StartPosition,
};
use shardflow::core::record::RawBatch;
use shardflow::core::sink::{OutputBatch, SinkContext, SinkWriter};
use shardflow::core::source::{ReadBatch, ReadLimits, ShardReader, ShardStatus, Source};
use shardflow::operators::KeyedValue;
use shardflow::prelude::*;
use shardflow::{MemoryLeaseStore, Sink};

#[derive(Parser, Clone)]
struct Args {
    #[arg(long, default_value_t = 20_000_000)]
    events: u64,
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    #[arg(long, default_value_t = 1)]
    events_per_ms: u64,
    #[arg(long, default_value_t = 1000)]
    window_ms: i64,
    #[arg(long, default_value_t = 2)]
    workers: usize,
    #[arg(long, default_value_t = 2)]
    shards: usize,
    /// Runs of each system, alternating; the medians are compared.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Records per read (an epoch).
    #[arg(long, default_value_t = 10_000)]
    batch: usize,
    /// Also runs shardflow with keyed state snapshotted this often into a local directory
    /// (`StatePolicy::Snapshot`), alternating with the other two, and compares it with the
    /// run without snapshots.
    #[arg(long)]
    snapshot_every_ms: Option<u64>,
    /// Measures recovery instead of throughput: after a run over every event, how long a
    /// restart takes to be back at the tip, rebuilding state by replay or from a snapshot
    /// (taken every `--snapshot-every-ms`, default 1000).
    #[arg(long)]
    recovery: bool,
}

/// Where a run's keyed state goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Replay,
    Snapshot { every_ms: u64 },
}

/// A directory for snapshot parts, removed when dropped.
struct StateDir(std::path::PathBuf);

impl StateDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "shardflow-bench-state-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        Self(dir)
    }

    /// Bytes of every part under it.
    fn bytes(&self) -> u64 {
        let mut total = 0;
        let mut stack = vec![self.0.clone()];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    total += entry.metadata().map_or(0, |m| m.len());
                }
            }
        }
        total
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

/// The i-th event of a shard: a pseudo-random key (splitmix64) and an increasing event time.
fn event(shard: u64, i: u64, keys: u64, per_ms: u64) -> (u64, i64) {
    let mut z = (shard << 48 ^ i).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z % keys, (i / per_ms) as i64)
}

#[derive(Clone)]
struct Generator {
    args: Args,
}

#[async_trait]
impl Source for Generator {
    fn stream_name(&self) -> &str {
        "generated"
    }
    async fn list_shards(&self) -> Result<Vec<ShardInfo>, SourceError> {
        Ok((0..self.args.shards)
            .map(|i| ShardInfo {
                id: ShardId::new(format!("shard-{i}")),
                parents: vec![],
                hash_key_range: (0, u128::MAX),
                closed: false,
            })
            .collect())
    }
    async fn open_shard(
        &self,
        shard: &ShardInfo,
        start: StartPosition,
        limits: ReadLimits,
    ) -> Result<Box<dyn ShardReader>, SourceError> {
        let index = shard_index(&shard.id) as u64;
        let next = match start {
            StartPosition::After(p) => p.sequence.as_u128().expect("small") as u64,
            _ => 0,
        };
        let per_shard = self.args.events / self.args.shards as u64
            + u64::from(index < self.args.events % self.args.shards as u64);
        Ok(Box::new(GenReader {
            args: self.args.clone(),
            index,
            next,
            end: per_shard,
            limits,
        }))
    }
}

struct GenReader {
    args: Args,
    index: u64,
    next: u64,
    end: u64,
    limits: ReadLimits,
}

#[async_trait]
impl ShardReader for GenReader {
    async fn read(&mut self) -> Result<ReadBatch, SourceError> {
        let n = (self.end - self.next).min(self.limits.max_records as u64);
        let mut batch = RawBatch::with_capacity(n as usize, n as usize * 16);
        for i in self.next..self.next + n {
            let (key, ts) = event(self.index, i, self.args.keys, self.args.events_per_ms);
            let mut data = [0u8; 16];
            data[..8].copy_from_slice(&key.to_le_bytes());
            data[8..].copy_from_slice(&ts.to_le_bytes());
            batch.push(
                RecordPosition::new(SequenceNumber::from_u128(u128::from(i) + 1)),
                ts,
                b"",
                &data,
            );
        }
        self.next += n;
        let status = if self.next < self.end {
            ShardStatus::More
        } else {
            ShardStatus::CaughtUp
        };
        Ok(ReadBatch {
            records: batch,
            millis_behind_latest: None,
            status,
        })
    }
}

/// Sums window counts; keeps the latest running count per shard and key (what an idempotent
/// sink keeps: a table indexed by shard and key, keys being below `--keys`), so that the
/// checksum is the sum of final values.
#[derive(Clone)]
struct Counter {
    outputs: Arc<AtomicU64>,
    window_sum: Arc<AtomicU64>,
    latest: Arc<Mutex<Vec<Vec<Option<u64>>>>>,
}

impl Counter {
    fn new(args: &Args) -> Self {
        let keys = usize::try_from(args.keys).expect("--keys fits in memory");
        Self {
            outputs: Arc::default(),
            window_sum: Arc::default(),
            latest: Arc::new(Mutex::new(vec![vec![None; keys]; args.shards])),
        }
    }
}

/// The index of a generated shard (`shard-N`).
fn shard_index(shard: &ShardId) -> usize {
    shard
        .as_str()
        .trim_start_matches("shard-")
        .parse()
        .expect("shard-N")
}

/// What the counter reads from an output: the value, and the key for running results (whose
/// later values replace earlier ones) or `None` for window results (each emitted once here).
type ReadOutput<T> = fn(&T) -> (Option<u64>, u64);

struct CounterWriter<T> {
    counter: Counter,
    value: ReadOutput<T>,
}

#[async_trait]
impl<T: Send + Sync + 'static> SinkWriter<T> for CounterWriter<T> {
    async fn write(&mut self, batch: OutputBatch<T>) -> Result<(), SinkError> {
        self.counter
            .outputs
            .fetch_add(batch.outputs.len() as u64, Ordering::Relaxed);
        let mut sum = 0;
        let mut latest = self.counter.latest.lock().expect("not poisoned");
        let shard = &mut latest[shard_index(&batch.shard)];
        for o in batch.outputs {
            match (self.value)(&o.value) {
                (None, v) => sum += v,
                (Some(key), v) => shard[key as usize] = Some(v),
            }
        }
        drop(latest);
        self.counter.window_sum.fetch_add(sum, Ordering::Relaxed);
        Ok(())
    }
    async fn commit(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

struct CounterSink<T> {
    counter: Counter,
    value: ReadOutput<T>,
}

#[async_trait]
impl<T: Send + Sync + 'static> Sink<T> for CounterSink<T> {
    fn name(&self) -> &str {
        "counter"
    }
    async fn open(&self, _cx: &SinkContext) -> Result<Box<dyn SinkWriter<T>>, SinkError> {
        Ok(Box::new(CounterWriter {
            counter: self.counter.clone(),
            value: self.value,
        }))
    }
}

fn decode(record: shardflow::core::record::RawRecord<'_>) -> Result<(u64, i64), DecodeError> {
    let d = record.data;
    if d.len() != 16 {
        return Err(DecodeError {
            format: "bench",
            message: format!("{} bytes, want 16", d.len()),
        });
    }
    let mut key = [0u8; 8];
    let mut ts = [0u8; 8];
    key.copy_from_slice(&d[..8]);
    ts.copy_from_slice(&d[8..]);
    Ok((u64::from_le_bytes(key), i64::from_le_bytes(ts)))
}

async fn run_shardflow(args: &Args) -> Result<(u64, u64, Duration)> {
    let leases: Arc<dyn shardflow::LeaseStore> = Arc::new(MemoryLeaseStore::new());
    run_with(args, State::Replay, None, leases).await
}

/// One bounded run with `state` (parts under `dir`) against `leases`.
async fn run_with(
    args: &Args,
    state: State,
    dir: Option<&StateDir>,
    leases: Arc<dyn shardflow::LeaseStore>,
) -> Result<(u64, u64, Duration)> {
    let counter = Counter::new(args);
    let source = Generator { args: args.clone() }.decode_fn(decode);
    let policy = match (state, dir) {
        (State::Snapshot { every_ms }, Some(dir)) => StatePolicy::snapshot(
            shardflow::local::LocalStateStore::new(&dir.0),
            Duration::from_millis(every_ms),
        ),
        _ => StatePolicy::Replay,
    };
    let stream = Topology::builder("bench")
        .state(policy)
        .source(source)
        .event_time(|e: &(u64, i64)| e.1);
    let topology = if args.window_ms > 0 {
        stream
            .key_by(|e: &(u64, i64)| e.0)
            .window(TumblingWindow::of(Duration::from_millis(
                args.window_ms as u64,
            )))
            .aggregate(Count)
            .sink(CounterSink {
                counter: counter.clone(),
                value: |r: &WindowResult<u64, u64>| (None, r.value),
            })
            .build()?
    } else {
        stream
            .key_by(|e: &(u64, i64)| e.0)
            .aggregate(Count)
            .sink(CounterSink {
                counter: counter.clone(),
                value: |r: &KeyedValue<u64, u64>| (Some(r.key), r.value),
            })
            .build()?
    };
    let config = RuntimeConfig {
        worker_id: "bench".into(),
        parallelism: args.workers,
        mode: RunMode::UntilCaughtUp,
        read_limits: ReadLimits {
            max_records: args.batch,
            max_bytes: 4 << 20,
        },
        channel_capacity: 8,
        ..RuntimeConfig::default()
    };
    let started = Instant::now();
    Runtime::new(topology, leases)
        .with_config(config)
        .run()
        .await?;
    let took = started.elapsed();
    let latest: u64 = counter
        .latest
        .lock()
        .expect("not poisoned")
        .iter()
        .flatten()
        .flatten()
        .sum();
    let checksum = counter.window_sum.load(Ordering::Relaxed) + latest;
    let outputs = if args.window_ms > 0 {
        counter.outputs.load(Ordering::Relaxed)
    } else {
        counter
            .latest
            .lock()
            .expect("not poisoned")
            .iter()
            .flatten()
            .filter(|v| v.is_some())
            .count() as u64
    };
    Ok((outputs, checksum, took))
}

/// The same workload as a plain single-threaded loop: per shard, a map per open window.
fn run_plain(args: &Args) -> (u64, u64, Duration) {
    let started = Instant::now();
    let (mut outputs, mut checksum) = (0u64, 0u64);
    for shard in 0..args.shards as u64 {
        let n =
            args.events / args.shards as u64 + u64::from(shard < args.events % args.shards as u64);
        let mut counts: FxHashMap<u64, u64> = FxHashMap::default();
        let mut window = i64::MIN;
        for i in 0..n {
            let (key, ts) = event(shard, i, args.keys, args.events_per_ms);
            if args.window_ms > 0 {
                let start = ts - ts.rem_euclid(args.window_ms);
                if start != window {
                    outputs += counts.len() as u64;
                    checksum += counts.drain().map(|(_, c)| c).sum::<u64>();
                    window = start;
                }
            }
            *counts.entry(key).or_insert(0) += 1;
        }
        outputs += counts.len() as u64;
        checksum += counts.values().sum::<u64>();
    }
    (outputs, checksum, started.elapsed())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let workload = format!(
        "{}:keys={},events_per_ms={},window_ms={},shards={}",
        if args.window_ms > 0 {
            "tumbling_count"
        } else {
            "running_count"
        },
        args.keys,
        args.events_per_ms,
        args.window_ms,
        args.shards
    );
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    anyhow::ensure!(
        args.batch > 0 && args.batch <= 10_000,
        "--batch must be 1 to 10000"
    );
    if args.recovery {
        return recovery(&args, &workload).await;
    }
    let (mut plain_rates, mut rates, mut snap_rates) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.runs {
        // Alternating runs in one process see the same machine conditions.
        let (po, pc, pt) = run_plain(&args);
        let plain_rate = args.events as f64 / pt.as_secs_f64();
        println!(
            "RESULT system=plain_fxhashmap workload={workload} workers=1 events={} outputs={po} checksum={pc} secs={:.3} events_per_s={:.0}",
            args.events,
            pt.as_secs_f64(),
            plain_rate
        );
        anyhow::ensure!(
            pc == args.events,
            "plain checksum {pc} != events {}",
            args.events
        );
        let (so, sc, st) = run_shardflow(&args).await?;
        let rate = args.events as f64 / st.as_secs_f64();
        println!(
            "RESULT system=shardflow workload={workload} workers={} events={} outputs={so} checksum={sc} secs={:.3} events_per_s={:.0}",
            args.workers,
            args.events,
            st.as_secs_f64(),
            rate
        );
        anyhow::ensure!(sc == args.events, "checksum {sc} != events {}", args.events);
        plain_rates.push(plain_rate);
        rates.push(rate);
        if let Some(every_ms) = args.snapshot_every_ms {
            let dir = StateDir::new();
            let leases: Arc<dyn shardflow::LeaseStore> = Arc::new(MemoryLeaseStore::new());
            let (so, sc, st) =
                run_with(&args, State::Snapshot { every_ms }, Some(&dir), leases).await?;
            let rate = args.events as f64 / st.as_secs_f64();
            println!(
                "RESULT system=shardflow_snapshots workload={workload} snapshot_every_ms={every_ms} workers={} events={} outputs={so} checksum={sc} secs={:.3} events_per_s={:.0} state_bytes_left={}",
                args.workers,
                args.events,
                st.as_secs_f64(),
                rate,
                dir.bytes()
            );
            anyhow::ensure!(sc == args.events, "checksum {sc} != events {}", args.events);
            snap_rates.push(rate);
        }
    }
    let (plain, ours) = (median(&mut plain_rates), median(&mut rates));
    println!(
        "MEDIAN runs={} plain_events_per_s={plain:.0} shardflow_events_per_s={ours:.0} ratio={:.3}",
        args.runs,
        ours / plain
    );
    if !snap_rates.is_empty() {
        let snap = median(&mut snap_rates);
        println!(
            "MEDIAN runs={} shardflow_snapshots_events_per_s={snap:.0} ratio_to_shardflow={:.3}",
            args.runs,
            snap / ours
        );
    }
    Ok(())
}

/// Recovery: per run and policy, a first run over every event (untimed), then a restart
/// against the same lease table, timed until it is back at the tip.
async fn recovery(args: &Args, workload: &str) -> Result<()> {
    let every_ms = args.snapshot_every_ms.unwrap_or(1000);
    let (mut replay, mut snapshot) = (Vec::new(), Vec::new());
    for _ in 0..args.runs {
        for state in [State::Replay, State::Snapshot { every_ms }] {
            let dir = StateDir::new();
            let leases: Arc<dyn shardflow::LeaseStore> = Arc::new(MemoryLeaseStore::new());
            let (_, checksum, first) =
                run_with(args, state, Some(&dir), Arc::clone(&leases)).await?;
            anyhow::ensure!(checksum == args.events, "checksum {checksum} != events");
            let bytes = dir.bytes();
            let (_, _, took) = run_with(args, state, Some(&dir), leases).await?;
            let name = match state {
                State::Replay => "recovery_replay",
                State::Snapshot { .. } => "recovery_snapshot",
            };
            println!(
                "RESULT system={name} workload={workload} workers={} events={} first_run_secs={:.3} recovery_secs={:.3} state_bytes={bytes}",
                args.workers,
                args.events,
                first.as_secs_f64(),
                took.as_secs_f64()
            );
            match state {
                State::Replay => replay.push(took.as_secs_f64()),
                State::Snapshot { .. } => snapshot.push(took.as_secs_f64()),
            }
        }
    }
    let (r, s) = (median(&mut replay), median(&mut snapshot));
    println!(
        "MEDIAN runs={} recovery_replay_secs={r:.3} recovery_snapshot_secs={s:.3} ratio={:.3}",
        args.runs,
        s / r
    );
    Ok(())
}
