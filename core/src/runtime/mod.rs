//! The runtime: runs a topology over the shards this worker holds leases for, checkpoints after
//! sinks commit, and ends on shutdown (or, in a bounded run, when every shard is caught up).

mod control;
mod decisions;
mod health;
mod identity;
#[cfg(test)]
mod lease_model;
mod leases;
#[cfg(test)]
mod migration_tests;
mod scoped_store;
mod shard_task;

/// The metrics at the path they had before they moved below `topology/`.
pub use crate::metrics;

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::clock::WallClock;
use crate::error::{BuildError, Error};
use crate::lease::LeaseStore;
use crate::metrics::Metrics;
use crate::position::ShardId;
pub use crate::protocol::sink_failure::SinkBackoff;
use crate::random::Random;
use crate::source::ReadLimits;
use crate::topology::{Topology, WorkerCx};
use crate::tracker::Tracker;
use control::{ControlLoop, RunParts};
pub use decisions::DecisionLog;
pub use health::Health;
use leases::LeaseManager;

/// Whether a run ends by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMode {
    /// Run until the shutdown signal.
    Continuous,
    /// End when every shard is read to its tip (or end): open windows are emitted as they are
    /// (and kept in the checkpoint, so a later run refines them). For examples, backfills, tests.
    UntilCaughtUp,
}

/// How a worker runs. Defaults follow the KCL where it has one.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// This worker's identity in the lease table. The default is unique per process (host
    /// name, process id and a random suffix). Whatever the id, each run is a new incarnation
    /// (`<id>#<incarnation>` in the leases): a restarted process takes its old leases once
    /// they are released (a graceful stop releases them) or expired (after a crash, a lease
    /// duration), never while the old process may still write. Two live processes configured
    /// with one id are detected (an error log and `shardflow_worker_id_conflicts_total`) and
    /// wait for expiry instead of taking each other's leases.
    pub worker_id: String,
    /// Keyed workers per keyed branch (default: the number of cores).
    pub parallelism: usize,
    /// Epochs in flight per keyed worker: bounds memory, and a slow sink slows the readers.
    pub channel_capacity: usize,
    /// Records and bytes per read.
    pub read_limits: ReadLimits,
    /// Wait after an empty read at the tip of a shard.
    pub idle_wait: Duration,
    /// How long a keyed worker may gather epochs before it commits its sinks: running
    /// aggregates emit one result per key per commit, and sinks see fewer, larger commits.
    /// Outputs and checkpoints trail the input by up to this much more.
    pub commit_interval: Duration,
    /// How often checkpoints are written.
    pub checkpoint_interval: Duration,
    /// A lease not renewed for this long may be taken by another worker (KCL: 10 s).
    pub lease_duration: Duration,
    /// How often the shard list is re-read and leases rebalanced (children of resharded shards,
    /// expired leases, workers that joined).
    pub shard_sync_interval: Duration,
    /// Leases asked of a busier worker per round at most (KCL: 1), so that a joining worker
    /// does not cause a storm. They are handed over gracefully, never stolen from a live owner
    /// (the name is the KCL's).
    pub max_leases_to_steal: usize,
    /// Whether the run ends by itself.
    pub mode: RunMode,
    /// What a shard does when a sink (or the dead-letter sink) still fails after the sink's
    /// own retries: it backs off and starts again from its checkpoint, and after a number of
    /// failures in a row it is let go for another worker (`protocol::sink_failure`). The run
    /// goes on with its other shards.
    pub sink_backoff: SinkBackoff,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            worker_id: identity::default_worker_id(),
            parallelism: std::thread::available_parallelism().map_or(2, usize::from),
            channel_capacity: 4,
            read_limits: ReadLimits::default(),
            idle_wait: Duration::from_millis(200),
            commit_interval: Duration::from_millis(100),
            checkpoint_interval: Duration::from_secs(1),
            lease_duration: Duration::from_secs(10),
            shard_sync_interval: Duration::from_secs(10),
            max_leases_to_steal: 1,
            mode: RunMode::Continuous,
            sink_backoff: SinkBackoff::default(),
        }
    }
}

impl RuntimeConfig {
    /// Checks every value, naming the first bad field.
    pub fn validate(&self) -> Result<(), BuildError> {
        let bad = |field, reason: &str| {
            Err(BuildError::InvalidConfig {
                field,
                reason: reason.into(),
            })
        };
        if self.worker_id.is_empty() {
            return bad("worker_id", "must not be empty");
        }
        if self.parallelism == 0 || self.parallelism > 1024 {
            return bad("parallelism", "must be between 1 and 1024");
        }
        if self.channel_capacity == 0 {
            return bad("channel_capacity", "must be at least 1");
        }
        if self.read_limits.max_records == 0 || self.read_limits.max_records > 10_000 {
            return bad(
                "read_limits.max_records",
                "must be between 1 and 10000 (the GetRecords limit)",
            );
        }
        if self.read_limits.max_bytes == 0 {
            return bad("read_limits.max_bytes", "must be at least 1");
        }
        if self.checkpoint_interval.is_zero() {
            return bad("checkpoint_interval", "must be positive");
        }
        if self.sink_backoff.first_pause.is_zero()
            || self.sink_backoff.max_pause < self.sink_backoff.first_pause
        {
            return bad(
                "sink_backoff",
                "first_pause must be positive and max_pause at least first_pause",
            );
        }
        // Leases are renewed on checkpoint ticks once a third of the lease duration passed;
        // the next tick must come well before the lease runs out by this worker's own clock.
        if self.lease_duration < self.checkpoint_interval * 2 {
            return bad(
                "lease_duration",
                "must be at least twice the checkpoint interval",
            );
        }
        Ok(())
    }
}

/// What a run did.
#[derive(Debug, Default)]
pub struct RunReport {
    /// Shards read to their end (closed shards) in this run.
    pub shards_ended: Vec<ShardId>,
    /// Shards read to their tip in a bounded run.
    pub shards_caught_up: Vec<ShardId>,
}

/// Runs a topology.
pub struct Runtime {
    topology: Arc<Topology>,
    leases: Arc<dyn LeaseStore>,
    config: RuntimeConfig,
    metrics: Metrics,
    shutdown: CancellationToken,
    health: Health,
    random: Random,
    decisions: DecisionLog,
    clock: WallClock,
}

impl Runtime {
    /// A runtime for `topology` coordinating through `leases`.
    pub fn new(topology: Topology, leases: Arc<dyn LeaseStore>) -> Self {
        Self {
            topology: Arc::new(topology),
            leases,
            config: RuntimeConfig::default(),
            metrics: Metrics::unregistered(),
            shutdown: CancellationToken::new(),
            health: Health::new(),
            random: Random::from_entropy(),
            decisions: DecisionLog::default(),
            clock: WallClock::system(),
        }
    }

    /// Reports whether the lease table is reachable into `health` (for a `/healthz`).
    pub fn with_health(mut self, health: Health) -> Self {
        self.health = health;
        self
    }

    /// Sets the configuration.
    pub fn with_config(mut self, config: RuntimeConfig) -> Self {
        self.config = config;
        self
    }

    /// Reports into these metrics.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Stops gracefully when `shutdown` is cancelled: reading stops, in-flight records reach
    /// the sinks, checkpoints are written and leases released.
    pub fn with_shutdown(mut self, shutdown: CancellationToken) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Draws backoff jitter from `random` (a seeded one makes a simulated run repeatable).
    pub fn with_random(mut self, random: Random) -> Self {
        self.random = random;
        self
    }

    /// Reads the wall clock from `clock` (idle watermark advances, event-time lag, and the
    /// lease guards, which must count time the machine was suspended): a simulation runs it
    /// on paused time.
    pub fn with_wall_clock(mut self, clock: WallClock) -> Self {
        self.clock = clock;
        self
    }

    /// Records the runtime's decisions in `log`.
    pub fn with_decisions(mut self, log: DecisionLog) -> Self {
        self.decisions = log;
        self
    }

    /// Runs until shutdown (or, in a bounded run, until every shard is caught up).
    ///
    /// # Errors
    /// A bad configuration; a source, sink or lease store failure that retries did not fix; a
    /// shard stopped by the `StopShard` dead-letter policy (reported when the run ends).
    pub async fn run(self) -> Result<RunReport, Error> {
        self.config.validate()?;
        self.health.set_lease_duration(self.config.lease_duration);
        let config = Arc::new(self.config.clone());
        let topology = Arc::clone(&self.topology);
        let tracker = Tracker::default();
        let n = config.parallelism;
        let mut workers = JoinSet::new();
        let worker_cx = WorkerCx {
            topology: topology.name.clone(),
            tracker: tracker.clone(),
            metrics: self.metrics.clone(),
            capacity: config.channel_capacity,
            commit_interval: config.commit_interval,
            random: self.random.clone(),
            fanout_bits: topology.fanout_bits,
            dead_letter: topology.dead_letter.clone(),
            stream: topology.source.stream_name().to_owned(),
            state_store: topology
                .state
                .snapshots()
                .map(|(store, _)| Arc::clone(store)),
        };
        let exchanges: Vec<_> = topology
            .keyed
            .iter()
            .enumerate()
            .map(|(b, branch)| branch.spawn(n, 1 + b * n, &worker_cx, &mut workers))
            .collect();
        // A random suffix per run: another process with this worker id (a restart, or a twin
        // configured alike) is another owner (`lease::holder`). From the injected randomness,
        // so that a simulation replays it.
        let incarnation = format!(
            "{:08x}",
            (self.random.fraction() * f64::from(u32::MAX)) as u32
        );
        let leases = Arc::new(LeaseManager::new(
            Arc::clone(&self.leases),
            (&config.worker_id, &incarnation),
            config.lease_duration,
            self.clock.clone(),
        ));
        ControlLoop::new(RunParts {
            topology,
            config,
            leases,
            tracker,
            metrics: self.metrics,
            health: self.health,
            shutdown: self.shutdown,
            exchanges: Arc::new(exchanges),
            random: self.random,
            decisions: self.decisions,
            clock: self.clock,
        })
        .run(&mut workers)
        .await
    }
}

#[cfg(test)]
mod config_tests {
    use super::*;

    fn field_of(config: &RuntimeConfig) -> Option<&'static str> {
        match config.validate() {
            Ok(()) => None,
            Err(BuildError::InvalidConfig { field, .. }) => Some(field),
            Err(other) => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid_and_each_bad_value_names_its_field() {
        let ok = RuntimeConfig::default();
        assert_eq!(field_of(&ok), None);
        let cases: [(RuntimeConfig, &str); 5] = [
            (
                RuntimeConfig {
                    worker_id: String::new(),
                    ..ok.clone()
                },
                "worker_id",
            ),
            (
                RuntimeConfig {
                    parallelism: 0,
                    ..ok.clone()
                },
                "parallelism",
            ),
            (
                RuntimeConfig {
                    channel_capacity: 0,
                    ..ok.clone()
                },
                "channel_capacity",
            ),
            (
                RuntimeConfig {
                    checkpoint_interval: Duration::ZERO,
                    ..ok.clone()
                },
                "checkpoint_interval",
            ),
            (
                RuntimeConfig {
                    lease_duration: Duration::from_millis(1_500),
                    ..ok
                },
                "lease_duration",
            ),
        ];
        for (config, field) in cases {
            assert_eq!(field_of(&config), Some(field));
        }
    }
}
