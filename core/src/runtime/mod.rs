//! The runtime: runs a topology over the shards this worker holds leases for, checkpoints after
//! sinks commit, and ends on shutdown (or, in a bounded run, when every shard is caught up).

mod health;
mod lease_guard;
#[cfg(test)]
mod lease_model;
mod leases;
mod shard_task;

/// The metrics at the path they had before they moved below `topology/`.
pub use crate::metrics;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::{BuildError, Error, ShardStopped};
use crate::lease::{CheckpointPosition, Lease, LeaseStore, ShardCheckpoint};
use crate::metrics::Metrics;
use crate::position::ShardId;
use crate::protocol::checkpoint::Epoch;
use crate::source::ReadLimits;
use crate::topology::{Topology, WorkerCx};
use crate::tracker::Tracker;
pub use health::Health;
use leases::LeaseManager;
use shard_task::{ShardOutcome, ShardTask};

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
    /// This worker's identity in the lease table; a restarted worker with the same id takes its
    /// leases back at once.
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
    /// Leases stolen from a busier worker per round at most (KCL: 1), so that a joining worker
    /// does not cause a stealing storm.
    pub max_leases_to_steal: usize,
    /// Whether the run ends by itself.
    pub mode: RunMode,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            worker_id: format!("worker-{}", std::process::id()),
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
}

struct RunningShard {
    lease_key: String,
    cancel: CancellationToken,
    lost: bool,
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
        };
        let exchanges: Vec<_> = topology
            .keyed
            .iter()
            .enumerate()
            .map(|(b, branch)| branch.spawn(n, 1 + b * n, &worker_cx, &mut workers))
            .collect();
        let exchanges = Arc::new(exchanges);
        let paths = topology.paths(n);
        let leases = LeaseManager::new(
            Arc::clone(&self.leases),
            config.worker_id.clone(),
            config.lease_duration,
        );

        let mut shard_tasks: JoinSet<(ShardId, Result<ShardOutcome, Error>)> = JoinSet::new();
        let mut running: HashMap<ShardId, RunningShard> = HashMap::new();
        let mut finishing: Vec<(ShardId, String, Epoch, bool)> = Vec::new();
        let mut completed: HashSet<ShardId> = HashSet::new();
        let mut written: HashMap<ShardId, ShardCheckpoint> = HashMap::new();
        let mut stopped: Vec<ShardStopped> = Vec::new();
        let mut report = RunReport::default();
        let mut ticker = tokio::time::interval(config.checkpoint_interval);
        let mut last_renew = tokio::time::Instant::now();
        let mut next_sync = tokio::time::Instant::now();
        let mut failed_syncs: u32 = 0;
        let mut need_sync = true;
        let name = topology.name.clone();
        let mut failure: Option<Error> = None;

        loop {
            let sync_due = tokio::time::Instant::now() >= next_sync;
            let retrying = failed_syncs > 0;
            // No new shards once the run failed: it is winding down.
            if ((need_sync && !retrying) || sync_due)
                && !self.shutdown.is_cancelled()
                && failure.is_none()
            {
                need_sync = false;
                let round: Result<(), Error> = async {
                    let shards = topology.source.list_shards().await?;
                    leases.sync(&shards).await?;
                    let lease_list = leases.list().await?;
                    // A shard still finishing (waiting for its last commits) is busy too: starting it
                    // again would replace its progress while its last reports are in flight.
                    let busy: HashSet<ShardId> = running
                        .keys()
                        .chain(finishing.iter().map(|f| &f.0))
                        .chain(&completed)
                        .cloned()
                        .collect();
                    let candidates = processable(&lease_list);
                    let plan = leases.plan(&candidates, config.max_leases_to_steal).await;
                    // Planned takes and steals, and this worker's own leases from an earlier run.
                    let mut keys: Vec<&str> = plan
                        .take
                        .iter()
                        .chain(&plan.steal)
                        .map(String::as_str)
                        .collect();
                    keys.extend(
                        candidates
                            .iter()
                            .filter(|l| leases.owns(l))
                            .map(|l| l.key.as_str()),
                    );
                    keys.sort_unstable();
                    keys.dedup();
                    for key in keys {
                        let Some(shard) = shards.iter().find(|s| s.id.as_str() == key) else {
                            continue;
                        };
                        if busy.contains(&shard.id) {
                            continue;
                        }
                        let lease = candidates
                            .iter()
                            .find(|l| l.key == key)
                            .expect("planned from candidates");
                        let Some(taken) = leases.take(lease).await? else {
                            continue;
                        };
                        self.metrics.lease_taken(&name);
                        let cancel = CancellationToken::new();
                        let lease_guard = leases.guard(&taken.key).await.expect("just taken");
                        tracker.start_shard(&shard.id, taken.checkpoint.clone(), paths);
                        let task = ShardTask {
                            shard: shard.clone(),
                            resume: taken.checkpoint.clone(),
                            lease_epoch: taken.epoch(),
                            lease_guard,
                            topology: Arc::clone(&topology),
                            config: Arc::clone(&config),
                            tracker: tracker.clone(),
                            metrics: self.metrics.clone(),
                            exchanges: Arc::clone(&exchanges),
                            cancel: cancel.clone(),
                        };
                        written.insert(shard.id.clone(), taken.checkpoint.clone());
                        running.insert(
                            shard.id.clone(),
                            RunningShard {
                                lease_key: taken.key.clone(),
                                cancel,
                                lost: false,
                            },
                        );
                        let id = shard.id.clone();
                        tracing::info!(topology = %name, shard = %id, "processing shard");
                        shard_tasks.spawn(async move { (id, task.run().await) });
                    }
                    // After the takes, so that children started in this round free their parents.
                    leases.clean_finished_parents(&shards).await?;
                    Ok(())
                }
                .await;
                match round {
                    Ok(()) => {
                        failed_syncs = 0;
                        next_sync = tokio::time::Instant::now() + config.shard_sync_interval;
                        self.health.lease_round_ok();
                        self.metrics.leases(&name, leases.held_count().await);
                    }
                    Err(error) if error.is_retryable() => {
                        // A throttled or unavailable stream or lease table: the shards already
                        // running go on; the round is tried again after a backoff (/healthz
                        // fails only if renewals fail too).
                        failed_syncs += 1;
                        // Still owed: a bounded run does not end before a round succeeds.
                        need_sync = true;
                        let backoff = sync_backoff(failed_syncs, config.shard_sync_interval);
                        tracing::warn!(topology = %name, %error, ?backoff, "shard sync failed, retrying");
                        next_sync = tokio::time::Instant::now() + backoff;
                    }
                    Err(error) => {
                        tracing::error!(topology = %name, %error, "shard sync failed");
                        running.values().for_each(|r| r.cancel.cancel());
                        failure.get_or_insert(error);
                        next_sync = tokio::time::Instant::now() + config.shard_sync_interval;
                    }
                }
            }
            if running.is_empty() && finishing.is_empty() {
                let bounded_done = config.mode == RunMode::UntilCaughtUp && !need_sync;
                if bounded_done || self.shutdown.is_cancelled() || failure.is_some() {
                    break;
                }
            }
            tokio::select! {
                () = self.shutdown.cancelled(), if !running.is_empty() && running.values().all(|r| !r.cancel.is_cancelled()) => {
                    tracing::info!(topology = %name, "shutting down: stopping readers");
                    running.values().for_each(|r| r.cancel.cancel());
                }
                Some(joined) = workers.join_next() => {
                    let error = match joined {
                        Ok(Ok(())) => Error::Task("keyed worker ended early".into()),
                        Ok(Err(e)) => e,
                        Err(e) => Error::Task(e.to_string()),
                    };
                    tracing::error!(topology = %name, %error, "keyed worker failed");
                    running.values().for_each(|r| r.cancel.cancel());
                    failure.get_or_insert(error);
                    // The other shards cannot make progress; stop waiting for them.
                    finishing.clear();
                    break;
                }
                Some(joined) = shard_tasks.join_next() => {
                    let (id, outcome) = joined.map_err(|e| Error::Task(e.to_string()))?;
                    let shard = running.remove(&id).expect("a finished task was running");
                    match outcome {
                        Ok(ShardOutcome::Finished { last_epoch, shard_end }) => {
                            finishing.push((id, shard.lease_key, last_epoch, shard_end));
                        }
                        Ok(ShardOutcome::Cancelled { last_epoch }) if !shard.lost => {
                            finishing.push((id, shard.lease_key, last_epoch, false));
                        }
                        Ok(ShardOutcome::Cancelled { .. }) => {
                            tracker.stop_shard(&id);
                            self.metrics.forget_shard(&name, id.as_str());
                            leases.forget(&shard.lease_key).await;
                        }
                        Ok(ShardOutcome::Fenced) => {
                            self.metrics.lease_lost(&name);
                            tracker.stop_shard(&id);
                            self.metrics.forget_shard(&name, id.as_str());
                            leases.forget(&shard.lease_key).await;
                            // Look at the lease table again: the newer owner keeps the shard,
                            // or, if the lease is still this worker's, it resumes from the
                            // checkpoint.
                            need_sync = true;
                        }
                        Err(Error::ShardStopped(stop)) => {
                            tracker.stop_shard(&id);
                            self.metrics.forget_shard(&name, id.as_str());
                            completed.insert(id);
                            stopped.push(stop);
                        }
                        Err(error) => {
                            tracing::error!(topology = %name, shard = %id, %error, "shard failed");
                            tracker.stop_shard(&id);
                            self.metrics.forget_shard(&name, id.as_str());
                            running.values().for_each(|r| r.cancel.cancel());
                            failure.get_or_insert(error);
                        }
                    }
                }
                _ = ticker.tick() => {
                    if last_renew.elapsed() >= config.lease_duration / 3 {
                        last_renew = tokio::time::Instant::now();
                        let (lost, failed) = leases.renew_all().await;
                        if failed == 0 {
                            self.health.lease_round_ok();
                        }
                        for key in lost {
                            self.metrics.lease_lost(&name);
                            for r in running.values_mut().filter(|r| r.lease_key == key) {
                                tracing::warn!(topology = %name, lease = %key, "lease lost");
                                r.lost = true;
                                r.cancel.cancel();
                            }
                        }
                    }
                    for (id, r) in running.iter_mut().filter(|(_, r)| !r.lost) {
                        match write_checkpoint(&leases, &tracker, &self.metrics, &name, id, &r.lease_key, &mut written).await {
                            Ok(()) => {}
                            Err(error) if error.is_retryable() => {
                                // The next tick writes it; the lease guard keeps the shard
                                // from acting past its lease meanwhile.
                                tracing::warn!(topology = %name, shard = %id, %error, "checkpoint failed, retrying");
                            }
                            Err(error) => {
                                // Lost (stolen, or taken after expiry) or refused: the same
                                // message as a lost renewal, so one search finds both.
                                self.metrics.lease_lost(&name);
                                tracing::warn!(topology = %name, lease = %r.lease_key, %error, "lease lost (checkpoint rejected)");
                                r.lost = true;
                                r.cancel.cancel();
                            }
                        }
                    }
                }
                () = tracker.reported(), if !finishing.is_empty() => {}
            }
            // Shards whose last epoch every path committed: final checkpoint, then children.
            let mut still = Vec::new();
            for (id, key, last_epoch, shard_end) in finishing.drain(..) {
                if tracker.committed_epoch(&id) < last_epoch {
                    still.push((id, key, last_epoch, shard_end));
                    continue;
                }
                if let Err(error) = write_checkpoint(
                    &leases,
                    &tracker,
                    &self.metrics,
                    &name,
                    &id,
                    &key,
                    &mut written,
                )
                .await
                {
                    tracing::warn!(topology = %name, shard = %id, %error, "final checkpoint rejected");
                }
                tracker.stop_shard(&id);
                self.metrics.forget_shard(&name, id.as_str());
                if shard_end {
                    report.shards_ended.push(id.clone());
                    need_sync = true;
                } else if config.mode == RunMode::UntilCaughtUp && !self.shutdown.is_cancelled() {
                    report.shards_caught_up.push(id.clone());
                }
                completed.insert(id);
            }
            finishing = still;
        }

        shard_tasks.shutdown().await;
        if failure.is_none() {
            leases.release_all().await;
        }
        drop(exchanges);
        drop(shard_tasks);
        while let Some(joined) = workers.join_next().await {
            if let Ok(Err(e)) = joined {
                failure.get_or_insert(e);
            }
        }
        if let Some(error) = failure {
            return Err(error);
        }
        if let Some(stop) = stopped.into_iter().next() {
            return Err(Error::ShardStopped(stop));
        }
        Ok(report)
    }
}

/// The wait before the `failures`-th retry of a failed shard sync: 250 ms doubling, at most
/// the sync interval.
fn sync_backoff(failures: u32, interval: Duration) -> Duration {
    Duration::from_millis(250)
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(interval)
}

async fn write_checkpoint(
    leases: &LeaseManager,
    tracker: &Tracker,
    metrics: &Metrics,
    topology: &str,
    id: &ShardId,
    key: &str,
    written: &mut HashMap<ShardId, ShardCheckpoint>,
) -> Result<(), crate::error::LeaseError> {
    if let Some(cp) = tracker.checkpoint(id) {
        if written.get(id) != Some(&cp) {
            leases.checkpoint(key, cp.clone()).await?;
            metrics.checkpointed(topology, id.as_str());
            written.insert(id.clone(), cp);
        }
    }
    // Until this run writes one, nothing it read is covered.
    let covered = written
        .get(id)
        .map_or(&CheckpointPosition::Initial, |cp| &cp.committed);
    metrics.checkpoint_lag(topology, id.as_str(), tracker.lag(id, covered));
    Ok(())
}

/// Leases this worker may process: not finished, and every parent reached its end (or left no
/// lease), so per-key order holds across resharding.
fn processable(leases: &[Lease]) -> Vec<&Lease> {
    let by_key: HashMap<&str, &Lease> = leases.iter().map(|l| (l.key.as_str(), l)).collect();
    leases
        .iter()
        .filter(|l| !l.checkpoint.is_shard_end())
        .filter(|l| {
            l.parents.iter().all(|p| {
                by_key
                    .get(p.as_str())
                    .is_none_or(|p| p.checkpoint.is_shard_end())
            })
        })
        .collect()
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
