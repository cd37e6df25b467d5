//! Runs one seed: a random topology, random input and a random schedule of faults on a
//! single-threaded runtime with paused time (one worker, and a second that joins and leaves),
//! then compares every sink with the oracle.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use shardflow_core::clock::WallClock;
use shardflow_core::error::Error;
use shardflow_core::lease::{CheckpointPosition, Lease, LeaseStore, MemoryLeaseStore};
use shardflow_core::memory::MemoryStream;
use shardflow_core::protocol::lease_keys;
use shardflow_core::random::Random;
use shardflow_core::runtime::{
    DecisionLog, RunMode, RunReport, Runtime, RuntimeConfig, SinkBackoff,
};
use shardflow_core::source::{ReadLimits, Source as _};
use shardflow_core::testing::{ScriptedLeaseStore, WriteAttempt};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::model::{encode, Event};
use super::oracle::{expected, Advances, Input};
use super::spec::{topology, DeadSink, SimSink, Sinks, Spec};

/// A fault the schedule can inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// The worker is killed at once (its task dropped): nothing more is written.
    Abort,
    /// The worker is stopped gracefully and started again.
    Stop,
    /// The worker is restarted with another number of keyed workers.
    Rescale,
    Split,
    Merge,
    /// A sink fails its next writes or commits.
    SinkFails,
    /// A sink's commits stall for a while.
    SinkStalls,
    /// A keyed branch's sink is slow for the rest of the run.
    SlowSink,
    /// Nothing arrives for a long while (idle shards advance their watermarks on the clock).
    Quiet,
    /// The lease table fails its next updates (throttled): renewals, checkpoints and idle
    /// advances are retried; or it makes them and loses their replies (a timeout, or the
    /// client's own retry refused), and the worker judges them from the lease.
    LeasesFail,
    /// A second worker joins: it asks for its share of the leases, which are handed over.
    Join,
    /// The lease table is dropped and created again while the workers are stopped (their
    /// checkpoints go with it): every shard is read again from its start under a new table
    /// generation, and nothing may be fenced by the old table's outputs. Only in seeds without
    /// idleness, whose replay decides nothing on the clock.
    Recreate,
    /// A closed shard read to its end stops being listed, as Kinesis drops a closed shard once
    /// its records expired (the stream keeps them a second here): its lease is cleaned up as a
    /// vanished shard's, and nothing of it or its children may change.
    Vanish,
    /// A second process configured with the main worker's id joins (a misconfiguration): each
    /// is another incarnation to the other, and waits for expiry instead of taking leases back
    /// and forth. It leaves as the second worker does.
    Twin,
    /// The second worker leaves: gracefully (its leases released) or killed (they expire).
    Leave,
    /// The main worker alone cannot write to the lease table for longer than a lease
    /// duration (a partition): its guards expire, and its shards may move to the other worker.
    CutOff,
}

pub const FAULTS: [Fault; 16] = [
    Fault::Abort,
    Fault::Stop,
    Fault::Rescale,
    Fault::Split,
    Fault::Merge,
    Fault::SinkFails,
    Fault::SinkStalls,
    Fault::SlowSink,
    Fault::Quiet,
    Fault::LeasesFail,
    Fault::Join,
    Fault::Twin,
    Fault::Vanish,
    Fault::Recreate,
    Fault::Leave,
    Fault::CutOff,
];

/// The worker ids: the one that always runs, and the one that joins and leaves.
const MAIN: &str = "sim";
const GUEST: &str = "sim-guest";

/// What a seed did and found.
#[derive(Debug, Default)]
pub struct SeedReport {
    pub seed: u64,
    pub spec: String,
    /// Everything that did not hold; empty when the seed passed.
    pub failures: Vec<String>,
    pub faults: BTreeMap<Fault, u32>,
    pub kinds: Vec<&'static str>,
    pub decisions: Vec<String>,
    /// Every sink's final contents, rendered, for determinism checks.
    pub contents: String,
    pub records: usize,
    /// Writes the fencing sinks refused (an older lease epoch after a newer one).
    pub refused: u64,
    /// Checkpoints written that named a snapshot of keyed state, and takes that resumed from
    /// one (the checker's evidence that snapshots were restored, not only taken).
    pub snapshots_named: usize,
    pub snapshot_resumes: usize,
    /// Whether the seed's topology keeps snapshots.
    pub spec_snapshots: bool,
    /// Snapshot parts left in the state store once every shard ended (those of lives that
    /// crashed before their garbage was deleted).
    pub parts_left: usize,
}

/// The base of arrival times: the simulation's clock starts here (2024-01-01).
const EPOCH_MS: i64 = 1_704_067_200_000;
/// How long a graceful stop may take (it waits for commits and a final checkpoint).
const STOP_TIMEOUT: Duration = Duration::from_secs(120);
/// The most epochs the checkpoint tracker may keep for one shard (its bound, 512, plus the
/// epochs registered before a thinning).
const MAX_TRACKED_EPOCHS: usize = 513;

struct World {
    random: Random,
    spec: Spec,
    stream: MemoryStream,
    leases: ScriptedLeaseStore<MemoryLeaseStore>,
    clock: WallClock,
    sinks: Sinks,
    decisions: DecisionLog,
    inputs: BTreeMap<String, Vec<Input>>,
    uid: u64,
    /// The main worker's own view of the lease table (faults that only it sees).
    main_view: ScriptedLeaseStore<ScriptedLeaseStore<MemoryLeaseStore>>,
    worker: Option<Worker>,
    /// A second worker sharing the leases, between a `Join` and a `Leave`.
    guest: Option<Worker>,
    parallelism: usize,
    /// The checkpoint interval (and a tenth of the lease duration) every worker of the seed
    /// uses, as a deployment configures them alike.
    checkpoint_ms: u64,
    failures: Vec<String>,
}

struct Worker {
    handle: JoinHandle<Result<RunReport, Error>>,
    shutdown: CancellationToken,
}

fn below(random: &Random, n: usize) -> usize {
    (random.fraction() * n as f64) as usize % n.max(1)
}

impl World {
    fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Every watermark advance the runtime recorded in the lease table, per shard.
    fn advances(&self) -> Advances {
        let mut out = Advances::new();
        for lease in self.leases.log() {
            for a in &lease.checkpoint.advances {
                let after = match &a.after {
                    CheckpointPosition::At(p) => p.sequence.as_u128().expect("small numbers"),
                    _ => 0,
                };
                let w = out
                    .entry(lease_keys::shard_id(&lease.key).to_owned())
                    .or_default()
                    .entry(after)
                    .or_insert(a.watermark);
                *w = (*w).max(a.watermark);
            }
        }
        out
    }

    fn config(&self, worker_id: &str) -> RuntimeConfig {
        let r = &self.random;
        let checkpoint_ms = self.checkpoint_ms;
        RuntimeConfig {
            worker_id: worker_id.into(),
            parallelism: self.parallelism,
            channel_capacity: 1 + below(r, 4),
            read_limits: ReadLimits {
                max_records: 1 + below(r, 40),
                max_bytes: 1 << 20,
            },
            idle_wait: Duration::from_millis(50),
            commit_interval: Duration::from_millis([5, 50, 300][below(r, 3)]),
            checkpoint_interval: Duration::from_millis(checkpoint_ms),
            lease_duration: Duration::from_millis(checkpoint_ms * 10),
            shard_sync_interval: Duration::from_millis(500),
            max_leases_to_steal: 1,
            mode: RunMode::Continuous,
            // Short pauses, few attempts: shards are let go (and their leases released) too.
            sink_backoff: SinkBackoff {
                first_pause: Duration::from_millis(10 + below(r, 200) as u64),
                max_pause: Duration::from_millis(400),
                attempts: 1 + below(r, 3) as u32,
                cool_down: Duration::from_millis(200 + below(r, 2_000) as u64),
            },
        }
    }

    /// Starts a worker with `worker_id`; the main worker (`main`) sees the lease table through
    /// its own view, which the faults that only it sees script.
    fn spawn(&self, worker_id: &str, main: bool) -> Worker {
        let shutdown = CancellationToken::new();
        let leases: Arc<dyn LeaseStore> = if main {
            Arc::new(self.main_view.clone())
        } else {
            Arc::new(self.leases.clone())
        };
        let runtime = Runtime::new(topology(&self.spec, &self.stream, &self.sinks), leases)
            .with_config(self.config(worker_id))
            .with_wall_clock(self.clock.clone())
            .with_random(self.random.clone())
            .with_decisions(self.decisions.of_worker(worker_id))
            .with_shutdown(shutdown.clone());
        Worker {
            handle: tokio::spawn(runtime.run()),
            shutdown,
        }
    }

    fn start(&mut self) {
        self.worker = Some(self.spawn(MAIN, true));
    }

    /// Starts the second worker, unless one runs already: with its own id, or (`twin`) with
    /// the main worker's.
    fn join(&mut self, twin: bool) -> bool {
        if self.guest.is_some() {
            return false;
        }
        self.guest = Some(self.spawn(if twin { MAIN } else { GUEST }, false));
        true
    }

    /// Ends the second worker, if it runs: gracefully or killed.
    async fn leave(&mut self, graceful: bool) -> bool {
        let Some(guest) = self.guest.take() else {
            return false;
        };
        if graceful {
            self.end_gracefully(guest).await;
        } else {
            guest.handle.abort();
            let _ = guest.handle.await;
        }
        true
    }

    /// Notes a run that ended by itself; the main worker is started again (as a supervisor
    /// would), the second one is not.
    async fn check_worker(&mut self) {
        if self.guest.as_ref().is_some_and(|w| w.handle.is_finished()) {
            let guest = self.guest.take().expect("finished implies present");
            self.ended_by_itself(guest).await;
        }
        let finished = self.worker.as_ref().is_some_and(|w| w.handle.is_finished());
        if !finished {
            return;
        }
        let worker = self.worker.take().expect("finished implies present");
        self.ended_by_itself(worker).await;
        self.start();
    }

    async fn ended_by_itself(&mut self, worker: Worker) {
        match worker.handle.await {
            Ok(Ok(_)) => self
                .failures
                .push("a continuous run ended by itself".into()),
            // A sink failing beyond its retries backs its shards off; it never ends a run.
            Ok(Err(error)) if injected(&error) => self
                .failures
                .push(format!("a sink failure failed the run: {error}")),
            Ok(Err(error)) => self.failures.push(format!("the run failed: {error}")),
            Err(join) => self.failures.push(format!("the run panicked: {join}")),
        }
    }

    async fn abort(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.handle.abort();
            let _ = worker.handle.await;
        }
    }

    async fn stop(&mut self) {
        if let Some(worker) = self.worker.take() {
            self.end_gracefully(worker).await;
        }
    }

    async fn end_gracefully(&mut self, mut worker: Worker) {
        worker.shutdown.cancel();
        let ended = tokio::time::timeout(STOP_TIMEOUT, &mut worker.handle).await;
        let Ok(ended) = ended else {
            self.failures.push(format!(
                "a graceful stop did not end within {STOP_TIMEOUT:?}"
            ));
            worker.handle.abort();
            return;
        };
        match ended {
            Ok(Ok(_)) => {}
            // A sink failing beyond its retries backs its shards off; it never ends a run.
            Ok(Err(error)) if injected(&error) => self
                .failures
                .push(format!("a sink failure failed the run: {error}")),
            Ok(Err(error)) => self
                .failures
                .push(format!("a graceful stop failed: {error}")),
            Err(join) => self.failures.push(format!("the run panicked: {join}")),
        }
    }

    /// Stops listing one closed shard whose lease reached its end (or is gone), if there is one.
    /// Only a shard whose parents are no longer listed: a shard closes after its parents, so
    /// its records expire after theirs (a listing with an ancestor but without its descendant
    /// would make the ancestor look new, and Kinesis never gives one).
    async fn vanish(&mut self) -> bool {
        let Ok(leases) = self.leases.list().await else {
            return false;
        };
        let listed = self.stream.list_shards().await.unwrap_or_default();
        let is_listed = |id: &shardflow_core::position::ShardId| listed.iter().any(|l| &l.id == id);
        let finished: Vec<usize> = self
            .stream
            .shards()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.closed && is_listed(&s.id))
            .filter(|(_, s)| !s.parents.iter().any(&is_listed))
            .filter(|(_, s)| {
                leases
                    .iter()
                    .find(|l| lease_keys::shard_id(&l.key) == s.id.as_str())
                    .is_none_or(|l| l.checkpoint.is_shard_end())
            })
            .map(|(i, _)| i)
            .collect();
        if finished.is_empty() {
            return false;
        }
        self.stream
            .unlist(finished[below(&self.random, finished.len())]);
        true
    }

    fn open_shards(&self) -> Vec<usize> {
        self.stream
            .shards()
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.closed)
            .map(|(i, _)| i)
            .collect()
    }

    fn produce(&mut self, n: usize) {
        let open = self.open_shards();
        let disorder = self.spec.out_of_orderness.max(100);
        for _ in 0..n {
            let r = &self.random;
            let shard = open[below(r, open.len())];
            let arrival = self.now_ms();
            let roll = r.fraction();
            let ts = if self.spec.extremes && roll < 0.01 {
                if r.fraction() < 0.5 {
                    i64::MIN
                } else {
                    i64::MAX
                }
            } else if roll < 0.02 {
                // A producer with a clock ten years ahead.
                arrival + 10 * 365 * 86_400_000
            } else if roll < 0.03 {
                // A clock two minutes ahead: beyond a skew of a minute, within an hour.
                arrival + 120_000
            } else if roll < 0.08 {
                // Late beyond any bound.
                arrival - 5_000 - below(r, 5_000) as i64
            } else {
                arrival - below(r, 2 * disorder as usize) as i64
            };
            self.uid += 1;
            let event = Event {
                uid: self.uid,
                key: below(r, 20) as u32,
                ts,
                value: below(r, 1_000) as i64 - 100,
            };
            let data = if r.fraction() < 0.02 {
                b"not an event".to_vec()
            } else {
                encode(&event)
            };
            let key = event.key.to_string();
            let seq = self.stream.push(shard, arrival, key.as_bytes(), &data);
            let id = self.stream.shards()[shard].id.to_string();
            self.inputs
                .entry(id)
                .or_default()
                .push(Input { seq, arrival, data });
        }
    }

    /// Commits the fencing sinks refused so far.
    fn refused(&self) -> u64 {
        let mut refused = 0;
        for s in &self.sinks.branches {
            refused += match s {
                SimSink::Records(s) => s.inner().refused(),
                SimSink::Results(s) => s.inner().refused(),
                SimSink::Holding(_) => 0,
            };
        }
        refused += self
            .sinks
            .late
            .values()
            .map(|s| s.inner().refused())
            .sum::<u64>();
        if let DeadSink::Plain(s) = &self.sinks.dead {
            refused += s.inner().refused();
        }
        refused
    }

    fn sink_scripts(&self) -> Vec<&dyn Script> {
        let mut out: Vec<&dyn Script> = Vec::new();
        for s in &self.sinks.branches {
            match s {
                SimSink::Records(s) => out.push(s),
                SimSink::Holding(s) => out.push(s),
                SimSink::Results(s) => out.push(s),
            }
        }
        out.extend(self.sinks.late.values().map(|s| s as &dyn Script));
        match &self.sinks.dead {
            DeadSink::Plain(s) => out.push(s),
            DeadSink::Holding(s) => out.push(s),
        }
        out
    }

    /// Whether every shard was read to its end (its lease at SHARD_END, or cleaned up).
    async fn all_ended(&self) -> bool {
        let Ok(leases) = self.leases.list().await else {
            return false;
        };
        let shards = self.stream.shards();
        let leaves_leased = shards
            .iter()
            .filter(|s| !shards.iter().any(|c| c.parents.contains(&s.id)))
            .all(|s| {
                leases
                    .iter()
                    .any(|l| lease_keys::shard_id(&l.key) == s.id.as_str())
            });
        leaves_leased && leases.iter().all(|l| l.checkpoint.is_shard_end())
    }
}

/// Whether a run failed because a sink failed as the script told it to.
fn injected(error: &Error) -> bool {
    error
        .to_string()
        .contains("failure injected by the test script")
}

/// The part of a scripted sink the schedule drives, whatever its output type.
trait Script {
    fn attempts(&self) -> Vec<WriteAttempt>;
    fn fail_writes(&self, n: u32);
    fn fail_commits(&self, n: u32);
    fn stall_until(&self, until: Instant);
    fn delay_commits(&self, delay: Duration);
}

impl<S> Script for shardflow_core::testing::ScriptedSink<S> {
    fn attempts(&self) -> Vec<WriteAttempt> {
        Self::attempts(self)
    }
    fn fail_writes(&self, n: u32) {
        Self::fail_writes(self, n);
    }
    fn fail_commits(&self, n: u32) {
        Self::fail_commits(self, n);
    }
    fn stall_until(&self, until: Instant) {
        Self::stall_until(self, until);
    }
    fn delay_commits(&self, delay: Duration) {
        Self::delay_commits(self, delay);
    }
}

/// Runs seed `seed` to the end and checks it.
pub fn run_seed(seed: u64) -> SeedReport {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    runtime.block_on(simulate(seed))
}

async fn simulate(seed: u64) -> SeedReport {
    let random = Random::seeded(seed);
    let spec = Spec::random(&random)
        .with_dead_letters_from(&Random::seeded(!seed))
        .with_refusals_from(&Random::seeded(seed ^ 0x005e_ed0f_ae15))
        .with_snapshots_from(&Random::seeded(seed ^ 0x05a9_5407_57a7));
    let stream = MemoryStream::new("sim", spec.shards);
    stream.set_facts(Some(shardflow_core::source::StreamFacts {
        created_ms: 0,
        retention: Duration::from_secs(1),
    }));
    let sinks = Sinks::new(&spec);
    let leases = ScriptedLeaseStore::new(MemoryLeaseStore::new());
    let started = Instant::now();
    let mut world = World {
        main_view: ScriptedLeaseStore::new(leases.clone()),
        leases,
        parallelism: 1 + below(&random, 3),
        checkpoint_ms: [20, 50, 200][below(&random, 3)],
        guest: None,
        random,
        stream,
        clock: WallClock::following_runtime(EPOCH_MS),
        sinks,
        decisions: DecisionLog::recording(),
        inputs: BTreeMap::new(),
        uid: 0,
        worker: None,
        failures: Vec::new(),
        spec,
    };
    let mut report = SeedReport {
        seed,
        spec: format!("{:?}", world.spec),
        kinds: world.spec.kinds(),
        spec_snapshots: world.spec.snapshot_every.is_some(),
        ..SeedReport::default()
    };
    world.start();
    let steps = 10 + below(&world.random, 30);
    for _ in 0..steps {
        let r = world.random.clone();
        let roll = below(&r, 100);
        let fault = match roll {
            0..=39 => {
                let n = 1 + below(&r, 60);
                world.produce(n);
                None
            }
            40..=41 => None,
            42 => Some(Fault::Recreate),
            43 => Some(Fault::Vanish),
            44..=45 => Some(Fault::Join),
            46 => Some(Fault::Twin),
            47..=49 => Some(Fault::Leave),
            50..=54 => Some(Fault::Quiet),
            55..=62 => Some(Fault::Abort),
            63..=68 => Some(Fault::Stop),
            69..=73 => Some(Fault::Rescale),
            74..=79 => Some(Fault::Split),
            80..=84 => Some(Fault::Merge),
            85..=87 => Some(Fault::SinkFails),
            88..=89 => Some(Fault::LeasesFail),
            90..=94 => Some(Fault::SinkStalls),
            95..=96 => Some(Fault::SlowSink),
            _ => Some(Fault::CutOff),
        };
        let applied = match fault {
            None => true,
            Some(Fault::Quiet) => {
                tokio::time::sleep(Duration::from_millis(2_000 + below(&r, 6_000) as u64)).await;
                true
            }
            Some(Fault::Abort) => {
                world.abort().await;
                world.start();
                true
            }
            Some(Fault::Join) => world.join(false),
            Some(Fault::Twin) => world.join(true),
            Some(Fault::Vanish) => world.vanish().await,
            Some(Fault::Recreate) => {
                if world.spec.idleness.is_none() {
                    world.leave(true).await;
                    world.stop().await;
                    world.leases.inner().recreate();
                    world.start();
                    true
                } else {
                    false
                }
            }
            Some(Fault::CutOff) => {
                let lease_ms = world.checkpoint_ms * 10;
                let cut = lease_ms * 3 / 2 + below(&r, 2 * lease_ms as usize) as u64;
                world
                    .main_view
                    .throttle_updates_for(Duration::from_millis(cut));
                if r.fraction() < 0.5 {
                    // A sink that stalls through the cut too: whatever the worker had under
                    // way when its guard ran out must not reach the next sink.
                    let scripts = world.sink_scripts();
                    let s = scripts[below(&r, scripts.len())];
                    s.stall_until(Instant::now() + Duration::from_millis(cut / 2 + lease_ms));
                }
                true
            }
            Some(Fault::Leave) => world.leave(r.fraction() < 0.5).await,
            Some(Fault::Stop) => {
                world.stop().await;
                world.start();
                true
            }
            Some(Fault::Rescale) => {
                world.abort().await;
                world.parallelism = 1 + below(&r, 4);
                world.start();
                true
            }
            Some(Fault::Split) => {
                let open = world.open_shards();
                if open.len() < 6 {
                    world.stream.split(open[below(&r, open.len())]);
                    true
                } else {
                    false
                }
            }
            Some(Fault::Merge) => {
                let open = world.open_shards();
                if open.len() >= 2 {
                    let a = below(&r, open.len());
                    let b = (a + 1 + below(&r, open.len() - 1)) % open.len();
                    world.stream.merge(open[a], open[b]);
                    true
                } else {
                    false
                }
            }
            Some(Fault::SinkFails) => {
                let scripts = world.sink_scripts();
                let s = scripts[below(&r, scripts.len())];
                if r.fraction() < 0.5 {
                    s.fail_writes(1 + below(&r, 2) as u32);
                } else {
                    s.fail_commits(1 + below(&r, 2) as u32);
                }
                if world.spec.flaky_state {
                    // The state store fails for a while too: parts are not stored (snapshots
                    // stay incomplete) and restores back off. Its own clock, not the seed's
                    // draws, ends it, so earlier seeds keep their faults.
                    // First every call fails (restores back off), then one put in two (some
                    // workers' parts of a snapshot are stored, others not).
                    let state = Arc::clone(&world.sinks.state);
                    state.set_failing(true);
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        state.set_failing(false);
                        state.fail_puts_every(2);
                        tokio::time::sleep(Duration::from_millis(700)).await;
                        state.fail_puts_every(0);
                    });
                }
                true
            }
            Some(Fault::LeasesFail) => {
                let n = 1 + below(&r, 5) as u32;
                if r.fraction() < 0.5 {
                    world.leases.fail_updates(n);
                } else {
                    world.leases.lose_replies(n, r.fraction() < 0.5);
                }
                true
            }
            Some(Fault::SinkStalls) => {
                let scripts = world.sink_scripts();
                let s = scripts[below(&r, scripts.len())];
                s.stall_until(
                    Instant::now() + Duration::from_millis(200 + below(&r, 3_000) as u64),
                );
                true
            }
            Some(Fault::SlowSink) => {
                let scripts = world.sink_scripts();
                let s = scripts[below(&r, scripts.len())];
                s.delay_commits(Duration::from_millis(1 + below(&r, 50) as u64));
                true
            }
        };
        if let (Some(f), true) = (fault, applied) {
            *report.faults.entry(f).or_default() += 1;
        }
        tokio::time::sleep(Duration::from_millis(below(&r, 1_500) as u64)).await;
        if std::env::var_os("SHARDFLOW_SIM_DUMP").is_some() {
            eprintln!(
                "step at {} ms: {:?}, {} lease updates",
                world.now_ms() - EPOCH_MS,
                fault,
                world.leases.log().len()
            );
        }
        world.check_worker().await;
    }
    // The end: every shard closes; the worker reads them all to their end.
    for i in world.open_shards() {
        world.stream.close(i);
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        world.check_worker().await;
        if world.all_ended().await {
            break;
        }
        if Instant::now() >= deadline {
            let leases = world.leases.list().await.unwrap_or_default();
            let stuck: Vec<String> = leases
                .iter()
                .filter(|l| !l.checkpoint.is_shard_end())
                .map(|l| format!("{} at {:?}", l.key, l.checkpoint.committed))
                .collect();
            world
                .failures
                .push(format!("shards never reached their end: {stuck:?}"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    world.leave(true).await;
    world.stop().await;
    let expected = expected(&world.spec, &world.inputs, &world.advances());
    let peak = world.decisions.peak_tracked_epochs();
    if peak > MAX_TRACKED_EPOCHS {
        world.failures.push(format!(
            "the checkpoint tracker kept {peak} epochs of one shard (bound {MAX_TRACKED_EPOCHS})"
        ));
    }
    report.records = world.inputs.values().map(Vec::len).sum();
    // Background deletes of the last checkpoints finish first.
    tokio::time::sleep(Duration::from_millis(100)).await;
    report.parts_left = world.sinks.state.objects().len();
    for lease in world.leases.log() {
        if lease.checkpoint.snapshot.is_some() {
            if lease.owner_switches_since_checkpoint > 0 {
                report.snapshot_resumes += 1;
            } else {
                report.snapshots_named += 1;
            }
        }
    }
    report.refused = world.refused();
    let stalled = report.faults.contains_key(&Fault::SinkStalls);
    if report.refused > 0 && !stalled {
        // Fencing sinks refuse a write of an older lease epoch after a newer one wrote the same
        // identity: two owners wrote one shard at once. Handoffs, the lease guard on every path
        // and expiry-based takes exclude it. Only a commit already under way when its writer's
        // guard ran out can still do it, which a stalled sink models (seed 21184: a failed run's
        // keyed commit stalled past its lease while the next incarnation took over); there the
        // fence is the protection, and the contents are still compared.
        world.failures.push(format!(
            "fencing sinks refused {} writes: an older owner wrote after a newer one",
            report.refused
        ));
    }
    if std::env::var_os("SHARDFLOW_SIM_DUMP").is_some() {
        // A debugging aid for a failing seed: its input and the recorded advances.
        for (shard, records) in &world.inputs {
            for r in records {
                let event = super::model::decode_bytes(&r.data);
                println!("input {shard} {} arrival {} {event:?}", r.seq, r.arrival);
            }
        }
        println!("advances {:?}", world.advances());
    }
    compare(&world, &expected, &mut report);
    report.failures.splice(0..0, world.failures.drain(..));
    report.decisions = world.decisions.entries();
    check_parents_first(&world.stream, &world.leases.log(), &mut report.failures);
    let attempts: Vec<WriteAttempt> = world
        .sink_scripts()
        .iter()
        .flat_map(|s| s.attempts())
        .collect();
    check_guarded_writes(
        started,
        &attempts,
        &world.leases.timed_log(),
        Duration::from_millis(world.checkpoint_ms * 10),
        &mut report.failures,
    );
    report
}

/// The checker's own evidence that no sink call was made after its writer's lease guard ran
/// out, from the lease table's timed log rather than from the guard it checks: a call for a
/// shard under epoch E at time t is late if, before t, the lease left the owner whose take
/// made E (another take, or a release), or if that owner's last write of the lease is a lease
/// duration old (its guard counted from when that write started, earlier still).
fn check_guarded_writes(
    started: Instant,
    attempts: &[WriteAttempt],
    log: &[(Instant, Lease)],
    lease_duration: Duration,
    failures: &mut Vec<String>,
) {
    let mut by_key: BTreeMap<&str, Vec<&(Instant, Lease)>> = BTreeMap::new();
    for entry in log {
        by_key
            .entry(lease_keys::shard_id(&entry.1.key))
            .or_default()
            .push(entry);
    }
    let mut late = Vec::new();
    for attempt in attempts {
        // Every epoch a sink sees was made by a logged take: one that was not is a store
        // handing out epochs it never wrote, which is a failure too.
        let take = by_key.get(attempt.shard.as_str()).and_then(|entries| {
            entries
                .iter()
                .position(|(_, l)| l.epoch() == attempt.epoch)
                .map(|take| (entries, take))
        });
        let Some((entries, take)) = take else {
            late.push(format!(
                "{} to {} of {} epoch {}: no take made that epoch",
                attempt.call, attempt.sink, attempt.shard, attempt.epoch
            ));
            continue;
        };
        let owner = &entries[take].1.owner;
        let mut last_write = entries[take].0;
        // A lease write at the very instant of the call may have come first (a renewal that
        // let a waiting shard go on): it counts for the owner. Another owner's at that instant
        // may have come after the call: only the owner's own last write judges it then.
        let mut left = None;
        for (at, lease) in entries[take + 1..]
            .iter()
            .take_while(|(at, _)| *at <= attempt.at)
        {
            if &lease.owner != owner {
                if *at < attempt.at {
                    left = Some(*at);
                }
                break;
            }
            last_write = *at;
        }
        let why = match left {
            Some(at) => Some(format!(
                "{} ms after the lease left its owner",
                (attempt.at - at).as_millis()
            )),
            None if attempt.at >= last_write + lease_duration => Some(format!(
                "{} ms after its owner's last lease write",
                (attempt.at - last_write).as_millis()
            )),
            None => None,
        };
        if let Some(why) = why {
            late.push(format!(
                "{} to {} of {} epoch {} at {} ms, {why}",
                attempt.call,
                attempt.sink,
                attempt.shard,
                attempt.epoch,
                (attempt.at - started).as_millis()
            ));
        }
    }
    if !late.is_empty() {
        failures.push(format!(
            "{} sink calls were made after their writer's lease guard ran out: {:?}",
            late.len(),
            &late[..late.len().min(3)]
        ));
    }
}

/// Every child shard was taken only after each of its parents was checkpointed at its end, by
/// the lease table's own log of the updates it made (not by what the runtime believes it wrote:
/// a write whose reply was lost is in the table whatever the worker concluded).
fn check_parents_first(stream: &MemoryStream, log: &[Lease], failures: &mut Vec<String>) {
    let first = |found: &dyn Fn(&Lease) -> bool| log.iter().position(found);
    for shard in stream.shards() {
        let child = shard.id.as_str();
        let Some(taken) =
            first(&|l: &Lease| lease_keys::shard_id(&l.key) == child && l.owner.is_some())
        else {
            continue;
        };
        for parent in &shard.parents {
            let parent_key = parent.as_str();
            let ended = first(&|l: &Lease| {
                lease_keys::shard_id(&l.key) == parent_key
                    && l.checkpoint.committed == CheckpointPosition::ShardEnd
            });
            match ended {
                Some(ended) if ended < taken => {}
                _ => failures.push(format!(
                    "child {} started before its parent {parent} ended",
                    shard.id
                )),
            }
        }
    }
}

fn diff<V: PartialEq + std::fmt::Debug>(
    what: &str,
    want: &BTreeMap<(String, String), V>,
    got: &BTreeMap<(String, String), V>,
    failures: &mut Vec<String>,
) {
    let missing: Vec<_> = want
        .keys()
        .filter(|k| !got.contains_key(*k))
        .take(3)
        .collect();
    let extra: Vec<_> = got
        .keys()
        .filter(|k| !want.contains_key(*k))
        .take(3)
        .collect();
    let wrong: Vec<_> = want
        .iter()
        .filter_map(|(k, v)| got.get(k).filter(|g| *g != v).map(|g| (k, v, g)))
        .take(3)
        .collect();
    let (n_missing, n_extra) = (
        want.keys().filter(|k| !got.contains_key(*k)).count(),
        got.keys().filter(|k| !want.contains_key(*k)).count(),
    );
    let n_wrong = want
        .iter()
        .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
        .count();
    if n_missing + n_extra + n_wrong > 0 {
        failures.push(format!(
            "{what}: {n_missing} missing {missing:?}, {n_extra} unexpected {extra:?}, \
             {n_wrong} wrong (identity, want, got) {wrong:?}"
        ));
    }
}

fn keyed<V: Clone>(
    m: BTreeMap<(shardflow_core::position::ShardId, String), V>,
) -> BTreeMap<(String, String), V> {
    m.into_iter()
        .map(|((s, p), v)| ((s.to_string(), p), v))
        .collect()
}

fn compare(world: &World, expected: &super::oracle::Expected, report: &mut SeedReport) {
    let mut rendered = String::new();
    for (i, sink) in world.sinks.branches.iter().enumerate() {
        match sink {
            SimSink::Records(s) => {
                let got = keyed(s.inner().contents());
                diff(
                    &format!("branch {i} records"),
                    &expected.records[&i],
                    &got,
                    &mut report.failures,
                );
                rendered.push_str(&format!("{got:?}\n"));
            }
            SimSink::Holding(s) => {
                let (got, duplicates) = s.inner().contents_and_duplicates();
                if !duplicates.is_empty() {
                    report.failures.push(format!(
                        "branch {i} holding sink stored {} outputs twice: {:?}",
                        duplicates.len(),
                        &duplicates[..duplicates.len().min(3)]
                    ));
                }
                let got = keyed(got);
                diff(
                    &format!("branch {i} held records"),
                    &expected.records[&i],
                    &got,
                    &mut report.failures,
                );
                rendered.push_str(&format!("{got:?}\n"));
            }
            SimSink::Results(s) => {
                let mut got = keyed(s.inner().contents());
                rendered.push_str(&format!("{got:?}\n"));
                // An earlier emission a filter let through, where the final one is filtered out.
                let earlier = &expected.earlier[&i];
                got.retain(|k, v| !earlier.get(k).is_some_and(|vs| vs.contains(v)));
                diff(
                    &format!("branch {i} results"),
                    &expected.results[&i],
                    &got,
                    &mut report.failures,
                );
            }
        }
    }
    for (i, s) in &world.sinks.late {
        let got = keyed(s.inner().contents());
        diff(
            &format!("branch {i} late records"),
            &expected.late[i],
            &got,
            &mut report.failures,
        );
        rendered.push_str(&format!("{got:?}\n"));
    }
    let dead = match &world.sinks.dead {
        DeadSink::Plain(s) => s.inner().contents(),
        DeadSink::Holding(s) => {
            let (got, duplicates) = s.inner().contents_and_duplicates();
            if !duplicates.is_empty() {
                report.failures.push(format!(
                    "the holding dead-letter sink stored {} letters twice: {:?}",
                    duplicates.len(),
                    &duplicates[..duplicates.len().min(3)]
                ));
            }
            got
        }
    };
    let (keyed_letters, dead): (BTreeMap<_, _>, BTreeMap<_, _>) = keyed(dead)
        .into_iter()
        .partition(|(_, d)| d.result.is_some());
    let dead: BTreeMap<(String, String), String> =
        dead.into_iter().map(|(k, d)| (k, d.stage)).collect();
    diff("dead letters", &expected.dead, &dead, &mut report.failures);
    // Keyed dead letters: one for every result whose final value a sink refused; one may
    // stand for an earlier value refused (emitted or not, as commits fell).
    let missing: Vec<_> = expected
        .keyed_letters
        .iter()
        .filter(|(k, (must, _))| *must && !keyed_letters.contains_key(*k))
        .map(|(k, _)| k)
        .collect();
    let unexpected: Vec<_> = keyed_letters
        .iter()
        .filter(|(k, d)| {
            // A letter no refusal explains, or one that names another result or sink.
            expected.keyed_letters.get(*k).is_none_or(|(_, identity)| {
                d.result.as_ref().is_none_or(|r| {
                    r.identity != *identity
                        || d.stage != format!("sink {}", r.sink)
                        || d.shard.as_str() != k.0
                })
            })
        })
        .map(|(k, _)| k)
        .collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        report.failures.push(format!(
            "keyed dead letters: {} missing {:?}, {} unexpected {:?}",
            missing.len(),
            &missing[..missing.len().min(3)],
            unexpected.len(),
            &unexpected[..unexpected.len().min(3)]
        ));
    }
    rendered.push_str(&format!("{:?}\n", keyed_letters.keys().collect::<Vec<_>>()));
    rendered.push_str(&format!("{dead:?}\n"));
    report.contents = rendered;
}
