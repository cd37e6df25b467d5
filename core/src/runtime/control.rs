//! The worker's control loop as a state struct: it syncs shards and leases, starts a task per
//! leased shard, renews leases and writes checkpoints on a tick, and winds shards down when
//! their tasks end. Every decision it takes comes from `protocol/`; this module executes them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tokio::task::JoinSet;
use tokio::time::{Instant, Interval};
use tokio_util::sync::CancellationToken;

use crate::clock::WallClock;
use crate::error::{Error, LeaseError, ShardStopped, SourceError};
use crate::lease::{worker_of, CheckpointPosition, LeaseEpoch, ShardCheckpoint};
use crate::metrics::Metrics;
use crate::position::{ShardId, ShardInfo};
use crate::protocol::checkpoint::Epoch;
use crate::protocol::lease_keys::StreamScope;
use crate::protocol::lease_rules::{renewal_due, request_poll_interval};
use crate::protocol::outcome::{after_task, finished, run_over, AfterTask, Finished, TaskEnd};
use crate::protocol::shard_sync::{
    leases_to_start, processable, retry_after, waits_for_missing_stream,
};
use crate::protocol::sink_failure::{after_sink_failure, AfterSinkFailure, FailureStreak};
use crate::protocol::vanished::VanishedShards;
use crate::random::Random;
use crate::source::StreamFacts;
use crate::state_store::{part_life, shard_prefix};
use crate::topology::{Exchanges, Quarantined, Topology};
use crate::tracker::{DropReason, DroppedLife, Tracker};

use super::decisions::DecisionLog;
use super::health::Health;
use super::leases::{LeaseManager, Tidied};
use super::shard_task::{ShardOutcome, ShardTask};
use super::{RunMode, RunReport, RuntimeConfig};

/// A shard whose task runs.
struct RunningShard {
    lease_key: String,
    /// The life the task processes.
    lease_epoch: LeaseEpoch,
    /// Stops the task (shutdown, a lost lease, the run failing).
    cancel: CancellationToken,
    /// The worker learned that the lease moved: the task's end writes nothing more.
    lost: bool,
    /// Another worker asked for the lease: the task stops in an orderly way, and once its last
    /// epochs are committed and checkpointed the lease is released to it.
    handing_off: bool,
    /// Why a keyed path dropped this life, if one did for a reason that decides how the task's
    /// end is taken: a sink failure backs off, a refused result stops the shard.
    dropped_for: Option<DropReason>,
}

/// A shard whose task ended and whose last epochs the keyed workers may still be committing.
struct Finishing {
    shard: ShardId,
    lease_key: String,
    lease_epoch: LeaseEpoch,
    /// Every path must have committed this epoch before the final checkpoint is written.
    last_epoch: Epoch,
    shard_end: bool,
    /// Released after its final checkpoint, to the worker that asked for it.
    handoff: bool,
    /// Final checkpoint writes that failed retryably so far.
    attempts: u32,
    /// The tick of the last failed write: not tried again before the next tick, since the
    /// loop wakes on every report and attempts counted per wake-up would give up within
    /// milliseconds.
    failed_at_tick: Option<u64>,
}

/// Retryable failures of a final checkpoint a run that is ending waits through.
const FINAL_CHECKPOINT_ATTEMPTS: u32 = 10;

/// How often the stream's facts are read again to notice a stream created again (one
/// `DescribeStreamSummary` per worker, well under the account's 20 per second).
const FACTS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// When the next shard sync is due.
struct SyncSchedule {
    /// The next periodic round.
    next: Instant,
    /// Rounds failed in a row with a retryable error (the next waits `retry_after`).
    failures: u32,
    /// A round is owed now: at the start, after a shard ended (its children may start), after
    /// a fence, and after a failed round (a bounded run does not end before one succeeds).
    owed: bool,
    /// Leases an earlier run of this worker id (a crashed process) still holds: they are taken
    /// once expired, and a bounded run does not end before (it would skip their shards).
    former_self: bool,
}

/// What a run is made of, fixed for its whole life.
pub(crate) struct RunParts {
    pub(crate) topology: Arc<Topology>,
    pub(crate) config: Arc<RuntimeConfig>,
    pub(crate) leases: Arc<LeaseManager>,
    pub(crate) tracker: Tracker,
    pub(crate) metrics: Metrics,
    pub(crate) health: Health,
    pub(crate) shutdown: CancellationToken,
    /// The keyed branches' exchanges, handed to every shard task.
    pub(crate) exchanges: Exchanges,
    pub(crate) random: Random,
    pub(crate) decisions: DecisionLog,
    pub(crate) clock: WallClock,
}

/// The state of one `Runtime::run`.
pub(crate) struct ControlLoop {
    pub(crate) topology: Arc<Topology>,
    pub(crate) config: Arc<RuntimeConfig>,
    pub(crate) leases: Arc<LeaseManager>,
    pub(crate) tracker: Tracker,
    pub(crate) metrics: Metrics,
    pub(crate) health: Health,
    pub(crate) shutdown: CancellationToken,
    /// The keyed branches' exchanges, handed to every shard task.
    pub(crate) exchanges: Exchanges,
    /// Paths from a shard to its sinks (the tracker waits for each).
    pub(crate) paths: usize,
    /// One task per shard being read; each ends with its shard's outcome.
    shard_tasks: JoinSet<(ShardId, Result<ShardOutcome, Error>)>,
    /// Shards whose task runs.
    running: BTreeMap<ShardId, RunningShard>,
    /// Shards waiting for their last epochs to be committed before their final checkpoint.
    finishing: Vec<Finishing>,
    /// Shards done in this run (finished, caught up or stopped): never started again by it.
    completed: BTreeSet<ShardId>,
    /// The checkpoint last written (or resumed) per shard: an unchanged one is not written.
    written: BTreeMap<ShardId, ShardCheckpoint>,
    /// Shards the dead-letter policy stopped, reported when the run ends.
    stopped: Vec<ShardStopped>,
    /// Shards backing off after a sink failure, not taken again before their time.
    cooling: BTreeMap<ShardId, Instant>,
    /// Sink failures in a row per shard (`protocol::sink_failure`).
    streaks: BTreeMap<ShardId, FailureStreak>,
    /// Per shard, the records a keyed operator panicked on in this run: its next lives
    /// dead-letter them before `key_by`.
    quarantined: BTreeMap<ShardId, Quarantined>,
    report: RunReport,
    /// When this worker last renewed its leases.
    last_renew: Instant,
    /// Checkpoint ticks so far.
    ticks: u64,
    sync: SyncSchedule,
    /// The error that ends the run, once there is one: no new shard starts after it.
    failure: Option<Error>,
    random: Random,
    decisions: DecisionLog,
    clock: WallClock,
    /// Leases whose shard the stream stopped listing, across rounds, timed on the monotonic
    /// clock from `started` (a wall clock set back could delete a lease early).
    vanished: VanishedShards,
    started: Instant,
    /// Whether a shard sync of this run listed the stream: until then a missing stream is
    /// waited for (`waits_for_missing_stream`).
    stream_listed: bool,
    /// When the stream's facts were last read: at the start, then while a leased shard is
    /// missing or every `FACTS_INTERVAL`, so that a stream created again is noticed.
    facts_read_at: Option<Instant>,
}

impl ControlLoop {
    pub(crate) fn new(parts: RunParts) -> Self {
        let RunParts {
            topology,
            config,
            leases,
            tracker,
            metrics,
            health,
            shutdown,
            exchanges,
            random,
            decisions,
            clock,
        } = parts;
        let paths = topology.paths(config.parallelism);
        let now = Instant::now();
        Self {
            topology,
            config,
            leases,
            tracker,
            metrics,
            health,
            shutdown,
            exchanges,
            paths,
            shard_tasks: JoinSet::new(),
            running: BTreeMap::new(),
            finishing: Vec::new(),
            completed: BTreeSet::new(),
            written: BTreeMap::new(),
            stopped: Vec::new(),
            cooling: BTreeMap::new(),
            streaks: BTreeMap::new(),
            quarantined: BTreeMap::new(),
            report: RunReport::default(),
            last_renew: now,
            ticks: 0,
            sync: SyncSchedule {
                next: now,
                failures: 0,
                owed: true,
                former_self: false,
            },
            failure: None,
            random,
            decisions,
            clock,
            vanished: VanishedShards::new(),
            started: now,
            stream_listed: false,
            facts_read_at: None,
        }
    }

    fn name(&self) -> &str {
        &self.topology.name
    }

    /// Runs until the run is over; `workers` are the keyed workers, whose end fails the run.
    pub(crate) async fn run(
        mut self,
        workers: &mut JoinSet<Result<(), Error>>,
    ) -> Result<RunReport, Error> {
        let mut ticker: Interval = tokio::time::interval(self.config.checkpoint_interval);
        // Leases this worker asked for are read more often than the tick, so that a released
        // one is taken soon after its owner let it go: the handoff's last wait. One read per
        // pending request (a round asks for at most `max_leases_to_steal`).
        let mut requests: Interval =
            tokio::time::interval(request_poll_interval(self.config.checkpoint_interval));
        requests.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.sync_due() {
                self.sync_round().await;
            }
            let bounded = self.config.mode == RunMode::UntilCaughtUp;
            // A bounded run waits for its pausing shards; a stopping or failed run does not
            // (nothing starts them again, and a cool-down outlasts a stop's grace period).
            let awaits_cooling = bounded
                && !self.cooling.is_empty()
                && !self.shutdown.is_cancelled()
                && self.failure.is_none();
            let idle = self.running.is_empty() && self.finishing.is_empty() && !awaits_cooling;
            if run_over(
                idle,
                bounded,
                self.sync.owed || self.sync.former_self,
                self.shutdown.is_cancelled(),
                self.failure.is_some(),
            ) {
                break;
            }
            let stop_readers =
                !self.running.is_empty() && self.running.values().all(|r| !r.cancel.is_cancelled());
            let awaiting_handoffs = self.leases.awaits_handoffs().await;
            tokio::select! {
                biased;
                () = self.shutdown.cancelled(), if stop_readers => {
                    tracing::info!(topology = %self.name(), "shutting down: stopping readers");
                    // Renewed first: a lease another worker took since the last renewal is
                    // then known lost, and its shard ends without emitting (`Release`)
                    // instead of writing what the new owner now writes. No renewal starts after
                    // a third of the lease (one under way finishes), so that a slow table
                    // delays a stop by little more than one slow write.
                    let deadline = Instant::now() + self.config.lease_duration / 3;
                    self.renew_until(Some(deadline)).await;
                    self.running.values().for_each(|r| r.cancel.cancel());
                }
                Some(joined) = workers.join_next() => {
                    let error = match joined {
                        Ok(Ok(())) => Error::Task("keyed worker ended early".into()),
                        Ok(Err(e)) => e,
                        Err(e) => Error::Task(task_failure("keyed worker", &e)),
                    };
                    tracing::error!(topology = %self.name(), %error, "keyed worker failed");
                    self.decisions
                        .record(|| format!("keyed worker failed: {error}"));
                    self.running.values().for_each(|r| r.cancel.cancel());
                    self.failure.get_or_insert(error);
                    // The other shards cannot make progress; stop waiting for them.
                    self.finishing.clear();
                    break;
                }
                Some(joined) = self.shard_tasks.join_next() => {
                    let (id, outcome) = joined.map_err(|e| Error::Task(task_failure("shard task", &e)))?;
                    self.on_task_end(id, outcome).await;
                }
                () = self.tracker.dropped() => self.on_dropped_lives().await,
                _ = ticker.tick() => {
                    self.on_tick().await;
                    self.handoffs().await;
                }
                _ = requests.tick(), if awaiting_handoffs => self.poll_requests().await,
                () = sleep_until_first(&self.cooling), if !self.cooling.is_empty() => {
                    self.end_cool_downs();
                }
                () = self.tracker.reported(), if !self.finishing.is_empty() => {}
            }
            self.finish_committed().await;
        }
        self.wind_down(workers).await
    }

    /// Whether a shard sync round runs now: owed (and not backing off after a failure) or
    /// due, and the run neither stopping nor failed.
    fn sync_due(&self) -> bool {
        let due = Instant::now() >= self.sync.next;
        let retrying = self.sync.failures > 0;
        ((self.sync.owed && !retrying) || due)
            && !self.shutdown.is_cancelled()
            && self.failure.is_none()
    }

    /// One shard sync: leases for new shards, this round's takes and steals, and the cleanup
    /// of finished parents; retryable failures are retried after a backoff.
    async fn sync_round(&mut self) {
        self.sync.owed = false;
        match self.sync_and_start().await {
            Ok(()) => {
                self.sync.failures = 0;
                self.sync.next = Instant::now() + self.config.shard_sync_interval;
                self.health.lease_round_ok();
                let held = self.leases.held_count().await;
                self.metrics.leases(self.name(), held);
            }
            Err(Error::Source(SourceError::StreamNotFound { stream }))
                if waits_for_missing_stream(
                    self.stream_listed,
                    self.config.mode == RunMode::UntilCaughtUp,
                ) =>
            {
                match self.leases.any_of_stream(&stream).await {
                    // Leases of its shards: the stream existed (a restart after it vanished,
                    // say). That is an error to see, not to sit out.
                    Ok(true) => {
                        let error = Error::Source(SourceError::StreamNotFound { stream });
                        self.decisions.record(|| format!("sync failed: {error}"));
                        tracing::error!(topology = %self.name(), %error, "the stream is gone, but its leases are in the table");
                        self.running.values().for_each(|r| r.cancel.cancel());
                        self.failure.get_or_insert(error);
                        return;
                    }
                    // Alive while it waits (/healthz), not ready (/readyz names the stream).
                    Ok(false) => {
                        self.health.lease_round_ok();
                        self.health.set_waiting_for(Some(&stream));
                    }
                    Err(_) => {}
                }
                self.sync.failures += 1;
                self.sync.owed = true;
                let backoff = retry_after(self.sync.failures, self.config.shard_sync_interval);
                self.sync.next = Instant::now() + backoff;
                self.decisions
                    .record(|| format!("stream {stream} missing, waiting"));
                tracing::warn!(topology = %self.name(), %stream, ?backoff, "the stream does not exist yet: waiting for it to be created");
            }
            Err(error) if error.is_retryable() => {
                self.decisions
                    .record(|| format!("sync failed, retryable: {error}"));
                // A throttled or unavailable stream or lease table: the shards already running
                // go on; the round is tried again after a backoff (/healthz fails only if
                // renewals fail too).
                self.sync.failures += 1;
                self.sync.owed = true;
                let backoff = retry_after(self.sync.failures, self.config.shard_sync_interval);
                tracing::warn!(topology = %self.name(), %error, ?backoff, "shard sync failed, retrying");
                self.sync.next = Instant::now() + backoff;
            }
            Err(error) => {
                self.decisions.record(|| format!("sync failed: {error}"));
                tracing::error!(topology = %self.name(), %error, "shard sync failed");
                self.running.values().for_each(|r| r.cancel.cancel());
                self.failure.get_or_insert(error);
                self.sync.next = Instant::now() + self.config.shard_sync_interval;
            }
        }
    }

    async fn sync_and_start(&mut self) -> Result<(), Error> {
        let shards = self.topology.source.list_shards().await?;
        self.stream_listed = true;
        self.health.set_waiting_for(None);
        let entered = self.enter_scope().await?;
        let tidied = self.leases.sync(&shards).await?;
        self.report_tidied(tidied);
        if let Some(now_secs) = tidied.newer {
            return Err(Error::Source(SourceError::StreamRecreated {
                stream: self.topology.source.stream_name().to_owned(),
                was_secs: self.leases.scope().map_or(0, StreamScope::created_secs),
                now_secs,
            }));
        }
        let lease_list = self.leases.list().await?;
        let facts = match entered {
            Some(facts) => facts,
            None => self.recheck_facts(&shards, &lease_list).await?,
        };
        self.metrics
            .lease_items_skipped(self.name(), self.leases.skipped_items());
        self.leases.note_requests(&lease_list).await;
        for key in self.leases.take_id_conflicts().await {
            tracing::error!(topology = %self.name(), lease = %key, worker = %self.config.worker_id, "another live process uses this worker id: give every process its own id (this one waits for the lease to expire)");
            self.decisions
                .record(|| format!("worker id used by another live process: {key}"));
            self.metrics.worker_id_conflict(self.name());
        }
        let busy: BTreeSet<ShardId> = self
            .running
            .keys()
            .chain(self.finishing.iter().map(|f| &f.shard))
            .chain(&self.completed)
            .chain(self.cooling.keys())
            .cloned()
            .collect();
        let candidates = processable(&lease_list);
        let plan = self
            .leases
            .plan(&candidates, self.config.max_leases_to_steal)
            .await;
        self.sync.former_self = candidates.iter().any(|l| {
            let owner = l.owner.as_deref().unwrap_or_default();
            owner != self.leases.owner()
                && worker_of(owner) == self.config.worker_id
                && !plan.take.contains(&l.key)
                && shards.iter().any(|s| s.id.as_str() == l.key)
        });
        // A bounded run takes what is free but never asks for a lease: it may end before the
        // owner hands it over, and the lease would wait for a requester that is gone.
        let requests = if self.config.mode == RunMode::UntilCaughtUp {
            &[][..]
        } else {
            &plan.request[..]
        };
        for key in requests {
            let lease = candidates
                .iter()
                .find(|l| &l.key == key)
                .expect("planned from the candidates");
            if self.leases.request_handoff(lease).await? {
                self.decisions
                    .record(|| format!("request handoff of {key} from {:?}", lease.owner));
                tracing::info!(topology = %self.name(), lease = %key, owner = ?lease.owner, "asked for a lease (graceful handoff)");
                self.metrics.lease_handoff(self.name(), "requested");
            }
        }
        let start = leases_to_start(self.leases.owner(), &plan, &candidates, &shards, &busy);
        for lease in start {
            let shard = shards
                .iter()
                .find(|s| s.id.as_str() == lease.key)
                .expect("started leases are of listed shards")
                .clone();
            let Some(taken) = self.leases.take(lease).await? else {
                self.decisions
                    .record(|| format!("take {} lost the race", lease.key));
                continue;
            };
            self.decisions.record(|| {
                format!(
                    "take {} epoch {} resume {:?}",
                    taken.key,
                    taken.epoch(),
                    taken.checkpoint
                )
            });
            self.metrics.lease_taken(self.name());
            let cancel = CancellationToken::new();
            let lease_guard = self.leases.guard(&taken.key).await.expect("just taken");
            self.tracker.start_shard(
                &shard.id,
                taken.epoch(),
                lease_guard.clone(),
                taken.checkpoint.clone(),
                self.paths,
                self.topology.state.snapshots().is_some() && !self.topology.keyed.is_empty(),
            );
            self.clean_older_lives(&taken.key, taken.epoch(), &taken.checkpoint);
            let task = ShardTask {
                shard: shard.clone(),
                resume: taken.checkpoint.clone(),
                lease_epoch: taken.epoch(),
                lease_guard,
                topology: Arc::clone(&self.topology),
                config: Arc::clone(&self.config),
                tracker: self.tracker.clone(),
                metrics: self.metrics.clone(),
                exchanges: Arc::clone(&self.exchanges),
                cancel: cancel.clone(),
                random: self.random.clone(),
                clock: self.clock.clone(),
                leases: Arc::clone(&self.leases),
                lease_key: taken.key.clone(),
                decisions: self.decisions.clone(),
                quarantined: self.quarantined.get(&shard.id).cloned().unwrap_or_default(),
            };
            self.written
                .insert(shard.id.clone(), taken.checkpoint.clone());
            self.running.insert(
                shard.id.clone(),
                RunningShard {
                    lease_key: taken.key.clone(),
                    lease_epoch: taken.epoch(),
                    cancel,
                    lost: false,
                    handing_off: false,
                    dropped_for: None,
                },
            );
            let id = shard.id.clone();
            tracing::info!(topology = %self.name(), shard = %id, "processing shard");
            self.shard_tasks
                .spawn(async move { (id, task.run().await) });
        }
        // After the takes, so that children started in this round free their parents.
        self.leases.clean_finished_parents(&shards).await?;
        self.clean_vanished(&shards, &lease_list, facts).await?;
        Ok(())
    }

    /// On the first round, reads the stream's facts and enters the scope of its creation
    /// (`lease_keys`); a failure to describe the stream fails the round, so nothing is read or
    /// written under the wrong keys. Returns the facts if it entered the scope this round.
    async fn enter_scope(&mut self) -> Result<Option<Option<StreamFacts>>, Error> {
        if self.leases.scope().is_some() {
            return Ok(None);
        }
        let source = &self.topology.source;
        let facts = source.facts().await?;
        self.facts_read_at = Some(Instant::now());
        let created_secs = facts.map_or(0, |f| f.created_ms.div_euclid(1000));
        let scope = StreamScope::new(source.stream_name(), created_secs);
        self.decisions
            .record(|| format!("lease keys {}", scope.key("<shard>")));
        self.leases.enter_scope(scope);
        Ok(Some(facts))
    }

    /// Reads the stream's facts again while a leased shard is missing from `shards` (for
    /// `clean_vanished`) and every `FACTS_INTERVAL`, and fails the run if the stream was created
    /// again: this run's leases are the old stream's (a restart works under the new creation).
    async fn recheck_facts(
        &mut self,
        shards: &[ShardInfo],
        leases: &[crate::lease::Lease],
    ) -> Result<Option<StreamFacts>, Error> {
        let missing = leases
            .iter()
            .any(|l| !shards.iter().any(|s| s.id.as_str() == l.key));
        let due = self
            .facts_read_at
            .is_none_or(|at| at.elapsed() >= FACTS_INTERVAL);
        if !missing && !due {
            return Ok(None);
        }
        let source = &self.topology.source;
        let facts = match source.facts().await {
            Ok(facts) => facts,
            Err(error) => {
                // Without the facts nothing is deleted this round (`clean_vanished`).
                tracing::warn!(topology = %self.name(), %error, "could not describe the stream; leases of shards it no longer lists are kept");
                return Ok(None);
            }
        };
        self.facts_read_at = Some(Instant::now());
        let was_secs = self.leases.scope().map_or(0, StreamScope::created_secs);
        match facts {
            // A scope of an unknown creation (0) stays for the run; a restart moves its leases.
            Some(f) if was_secs != 0 && f.created_ms.div_euclid(1000) != was_secs => {
                Err(Error::Source(SourceError::StreamRecreated {
                    stream: source.stream_name().to_owned(),
                    was_secs,
                    now_secs: f.created_ms.div_euclid(1000),
                }))
            }
            facts => Ok(facts),
        }
    }

    /// Logs what this round did with legacy and stale leases.
    fn report_tidied(&self, tidied: Tidied) {
        if tidied.moved + tidied.deleted > 0 {
            self.decisions.record(|| {
                format!(
                    "moved {} legacy leases, deleted {} legacy or stale",
                    tidied.moved, tidied.deleted
                )
            });
            tracing::info!(topology = %self.name(), moved = tidied.moved, deleted = tidied.deleted, "moved leases to stream-qualified keys, deleted leftovers and leases of an earlier creation of the stream");
        }
        if tidied.waiting > 0 {
            self.decisions
                .record(|| format!("{} legacy leases wait", tidied.waiting));
            tracing::warn!(topology = %self.name(), waiting = tidied.waiting, "leases keyed by shard id alone are still held (by an older shardflow?): stop old workers; no new shard starts until they are moved");
        }
        self.metrics
            .legacy_leases_waiting(self.name(), tidied.waiting);
    }

    /// Deletes the leases of shards the stream stopped listing once their records are
    /// provably gone (`protocol::vanished`), so that the children they block start. `shards`
    /// is this round's complete listing.
    async fn clean_vanished(
        &mut self,
        shards: &[ShardInfo],
        leases: &[crate::lease::Lease],
        facts: Option<StreamFacts>,
    ) -> Result<(), Error> {
        let now = i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX);
        for key in self.vanished.observe(shards, leases, now, facts) {
            let lease = leases
                .iter()
                .find(|l| l.key == key)
                .expect("decided from these leases");
            if self.running.keys().any(|s| s.as_str() == key) {
                // This worker still reads it: its reads end it (or fail) first.
                continue;
            }
            let since = self.vanished.missing_since(&key);
            if self.leases.delete_vanished(lease).await? {
                self.decisions
                    .record(|| format!("deleted the lease of vanished shard {key}"));
                tracing::warn!(topology = %self.name(), lease = %key, missing_since_ms = ?since, checkpoint = ?lease.checkpoint.committed, "deleted the lease of a shard the stream no longer lists (its records expired, or the stream was created again)");
                self.metrics.vanished_lease_deleted(self.name());
            }
        }
        Ok(())
    }

    /// A shard task ended: decide what happens to its shard (`protocol::outcome`).
    async fn on_task_end(&mut self, id: ShardId, outcome: Result<ShardOutcome, Error>) {
        let shard = self
            .running
            .remove(&id)
            .expect("a finished task was running");
        let (end, error) = match outcome {
            Ok(ShardOutcome::Finished {
                last_epoch,
                shard_end,
            }) => (
                TaskEnd::Finished {
                    last_epoch,
                    shard_end,
                },
                None,
            ),
            Ok(ShardOutcome::Cancelled {
                last_epoch,
                released,
            }) => (
                TaskEnd::Cancelled {
                    last_epoch,
                    released,
                },
                None,
            ),
            Ok(ShardOutcome::Fenced) => (TaskEnd::Fenced, None),
            Ok(ShardOutcome::SinkFailed(error)) => (TaskEnd::SinkFailed, Some(Error::Sink(error))),
            Err(Error::ShardStopped(stop)) => (TaskEnd::Stopped, Some(Error::ShardStopped(stop))),
            Err(error) => (TaskEnd::Failed, Some(error)),
        };
        // A keyed path dropped the life for a sink failure or a refused result: however the
        // task ended after it (cancelled, or fenced on the way), the shard backs off or stops.
        let (end, error) = match (end, &shard.dropped_for) {
            (
                TaskEnd::Finished { .. } | TaskEnd::Cancelled { .. } | TaskEnd::Fenced,
                Some(DropReason::SinkFailed),
            ) => (TaskEnd::SinkFailed, error),
            (
                TaskEnd::Finished { .. } | TaskEnd::Cancelled { .. } | TaskEnd::Fenced,
                Some(DropReason::Stop { reason }),
            ) => (
                TaskEnd::Stopped,
                Some(Error::ShardStopped(ShardStopped::KeyedPath {
                    shard: id.clone(),
                    reason: reason.clone(),
                })),
            ),
            (end, _) => (end, error),
        };
        if let Some(error) = &error {
            self.decisions
                .record(|| format!("shard {id} failed: {error}"));
        }
        let decision = after_task(end, shard.lost);
        self.decisions
            .record(|| format!("shard {id} ended {end:?}: {decision:?}"));
        match decision {
            AfterTask::Finish {
                last_epoch,
                shard_end,
            } => self.finishing.push(Finishing {
                shard: id,
                lease_key: shard.lease_key,
                lease_epoch: shard.lease_epoch,
                handoff: shard.handing_off,
                last_epoch,
                shard_end,
                attempts: 0,
                failed_at_tick: None,
            }),
            AfterTask::Forget { resync, count_lost } => {
                if count_lost {
                    self.metrics.lease_lost(self.name());
                }
                self.forget(&id).await;
                self.leases.forget(&shard.lease_key).await;
                // Look at the lease table again: the newer owner keeps the shard, or, if the
                // lease is still this worker's, it resumes from the checkpoint.
                self.sync.owed |= resync;
            }
            AfterTask::Stop => {
                let stop = match error {
                    Some(Error::ShardStopped(stop)) => Some(stop),
                    _ => None,
                };
                self.stop_shard(id, stop).await;
            }
            AfterTask::BackOff => self.back_off(id, shard.lease_key, error).await,
            AfterTask::FailRun => {
                let error = error.expect("a failed task has its error");
                tracing::error!(topology = %self.name(), shard = %id, %error, "shard failed");
                self.forget(&id).await;
                self.running.values().for_each(|r| r.cancel.cancel());
                self.failure.get_or_insert(error);
            }
        }
    }

    /// Graceful handoffs on a tick: stops the shards other workers asked for (their leases
    /// are released after the final checkpoint) and releases asked-for leases nothing runs on.
    async fn handoffs(&mut self) {
        for (key, requester) in self.leases.handoffs_asked().await {
            if let Some(r) = self.running.values_mut().find(|r| r.lease_key == key) {
                if !r.lost && !r.handing_off {
                    r.handing_off = true;
                    r.cancel.cancel();
                    self.decisions
                        .record(|| format!("handing off {key} to {requester}"));
                    tracing::info!(topology = %self.topology.name, lease = %key, %requester, "handing the lease over: finishing its epochs first");
                }
            } else if let Some(f) = self.finishing.iter_mut().find(|f| f.lease_key == key) {
                f.handoff = true;
            } else if self
                .stopped
                .iter()
                .any(|s| s.held_shard().is_some_and(|shard| shard.as_str() == key))
            {
                // Stopped at a bad record by policy: the lease stays held (and reported in
                // /readyz) until an operator acts, whoever asks; handing it over would move
                // the alert and the unreadiness to a worker that just joined. The request
                // stays pending, so balancing counts the lease as the requester's.
            } else {
                // Done in this run: nothing to finish first.
                self.decisions
                    .record(|| format!("handing off idle {key} to {requester}"));
                self.leases.release(&key).await;
                self.metrics.lease_handoff(self.name(), "handed_over");
            }
        }
    }

    /// Reads the leases this worker asked for; a released one owes a shard sync at once,
    /// which takes it.
    async fn poll_requests(&mut self) {
        match self.leases.handed_over().await {
            Ok(true) => self.sync.owed = true,
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(topology = %self.name(), %error, "could not read a lease asked for");
            }
        }
    }

    /// Keyed workers dropped these lives (a sink fenced them, or their guard expired with
    /// outputs still to write): a path lost the state, so the rest of the life cannot be
    /// processed right. It ends like a lost lease, and the table is looked at again: if the
    /// lease is still this worker's, the shard resumes from its checkpoint in a new life.
    async fn on_dropped_lives(&mut self) {
        for DroppedLife {
            shard,
            lease_epoch,
            reason,
        } in self.tracker.take_dropped()
        {
            if let DropReason::Panicked { at, stage } = &reason {
                self.decisions
                    .record(|| format!("{stage} panicked on {shard} at {at}: quarantined"));
                let records = self.quarantined.entry(shard.clone()).or_default();
                Arc::make_mut(records).insert(at.clone(), Arc::clone(stage));
            }
            let sink_failed = reason == DropReason::SinkFailed;
            // Taken on the task's end (or at once, for a finishing shard) instead of resyncing.
            let decided_at_end = sink_failed || matches!(reason, DropReason::Stop { .. });
            let running = self
                .running
                .get_mut(&shard)
                .filter(|r| r.lease_epoch == lease_epoch && !r.lost);
            let key = if let Some(r) = running {
                r.lost = true;
                if decided_at_end {
                    r.dropped_for = Some(reason.clone());
                }
                r.cancel.cancel();
                r.lease_key.clone()
            } else if let Some(i) = self
                .finishing
                .iter()
                .position(|f| f.shard == shard && f.lease_epoch == lease_epoch)
            {
                // Its final checkpoint would wait for the dropping path forever.
                let f = self.finishing.swap_remove(i);
                if sink_failed {
                    tracing::warn!(topology = %self.name(), %shard, lease = %f.lease_key, "a keyed path's sink failed with the shard's last outputs; backing off");
                    self.back_off(f.shard, f.lease_key, None).await;
                    continue;
                }
                if let DropReason::Stop { reason } = reason {
                    let stop = ShardStopped::KeyedPath {
                        shard: f.shard.clone(),
                        reason,
                    };
                    self.stop_shard(f.shard, Some(stop)).await;
                    continue;
                }
                self.forget(&f.shard).await;
                self.leases.forget(&f.lease_key).await;
                f.lease_key
            } else {
                // An ended life, or one already known lost.
                continue;
            };
            self.decisions
                .record(|| format!("keyed path dropped {shard} epoch {lease_epoch}: {reason:?}"));
            tracing::warn!(topology = %self.name(), %shard, lease = %key, ?reason, "a keyed path dropped the shard; ending it like a lost lease");
            if matches!(reason, DropReason::Fenced | DropReason::GuardExpired) {
                self.metrics.lease_lost(self.name());
            }
            // The task then ends with `Release`: nothing more of the life is emitted.
            if let Some(guard) = self.leases.guard(&key).await {
                guard.revoke();
            }
            // After a sink failure or a refused result the task's end decides instead.
            self.sync.owed |= !decided_at_end;
        }
    }

    /// A sink failed with outputs of this shard after the sink's retries: its life is over
    /// (the task ended, its state is dropped). Unless this is the streak's last failure, the
    /// lease stays held and the shard is taken again (a new life) from its checkpoint after a
    /// doubling pause; at the last, the lease is no longer renewed (another worker takes it
    /// once it expired) and this worker leaves the shard alone for a cool-down. A bounded run
    /// has no other worker to leave it to: it fails (and releases its leases as it ends).
    async fn back_off(&mut self, id: ShardId, lease_key: String, error: Option<Error>) {
        self.forget(&id).await;
        let committed = self
            .written
            .get(&id)
            .map_or(CheckpointPosition::Initial, |cp| cp.committed.clone());
        let (decision, streak) =
            after_sink_failure(&self.config.sink_backoff, self.streaks.get(&id), &committed);
        match &streak {
            Some(streak) => self.streaks.insert(id.clone(), streak.clone()),
            None => self.streaks.remove(&id),
        };
        self.metrics.sink_failure(self.name(), id.as_str());
        self.decisions
            .record(|| format!("shard {id} sink failed at {committed:?}: {decision:?}"));
        let until = match decision {
            AfterSinkFailure::Retry { pause } => {
                // The lease stays held (renewed) through the pause; the take that starts the
                // shard again begins a new life.
                let pause = self.random.equal_jitter(pause);
                let failures = streak.map_or(0, |s| s.failures);
                tracing::warn!(topology = %self.name(), shard = %id, failures, ?pause, "a sink failed after its retries; the shard starts again from its checkpoint after a pause");
                Instant::now() + pause
            }
            AfterSinkFailure::LetGo { cool_down } => {
                if self.config.mode == RunMode::UntilCaughtUp {
                    // The sink's own error where the shard's path saw it; a keyed path's was
                    // logged by its worker.
                    let error = error.unwrap_or_else(|| {
                        Error::Task(format!(
                            "shard {id}: a keyed path's sink kept failing through {} pauses",
                            self.config.sink_backoff.attempts
                        ))
                    });
                    tracing::error!(topology = %self.name(), shard = %id, "a sink kept failing; the bounded run fails");
                    self.running.values().for_each(|r| r.cancel.cancel());
                    self.failure.get_or_insert(error);
                    return;
                }
                // Not released: a keyed path may still have a commit of the life under way,
                // which the lease's expiry (by the guard's margin) orders before any new
                // owner's writes, as after a crash.
                self.leases.forget(&lease_key).await;
                tracing::error!(topology = %self.name(), shard = %id, ?cool_down, "a sink kept failing: the shard's lease is no longer renewed, so another worker takes it once it expires; this one leaves it alone for a cool-down");
                self.metrics.shard_let_go(self.name());
                Instant::now() + cool_down
            }
        };
        self.cooling.insert(id, until);
        self.metrics
            .shards_backing_off(self.name(), self.cooling.len());
    }

    /// Stops a shard for this run (a bad record or a refused result, by policy): it is not
    /// started again, and it is visible at once while the run goes on with the other shards.
    /// Its lease stays held, so no other worker reads past the record either.
    async fn stop_shard(&mut self, id: ShardId, stop: Option<ShardStopped>) {
        self.forget(&id).await;
        self.completed.insert(id);
        if let Some(stop) = stop {
            self.health.shard_stopped(&stop);
            self.stopped.push(stop);
            self.metrics.shards_stopped(self.name(), self.stopped.len());
        }
    }

    /// Ends the pauses that are over: their shards may be taken again, at a sync now.
    fn end_cool_downs(&mut self) {
        let now = Instant::now();
        let before = self.cooling.len();
        self.cooling.retain(|_, until| *until > now);
        if self.cooling.len() != before {
            self.sync.owed = true;
            self.metrics
                .shards_backing_off(self.name(), self.cooling.len());
        }
    }

    /// A shard this worker stopped by policy is no longer its own (its lease was lost, say after
    /// a pause past it): it leaves the stopped list, the gauge and /readyz (the new owner reports
    /// it when it stops there too), and this run may take it again.
    fn let_go_of_stopped(&mut self, key: &str) {
        let before = self.stopped.len();
        self.stopped
            .retain(|s| s.held_shard().is_none_or(|shard| shard.as_str() != key));
        if self.stopped.len() == before {
            return;
        }
        self.decisions
            .record(|| format!("stopped shard {key} let go"));
        self.health.stopped_shard_let_go(key);
        self.metrics.shards_stopped(self.name(), self.stopped.len());
        self.completed.retain(|id| id.as_str() != key);
    }

    /// Drops the shard's progress and per-shard metrics.
    async fn forget(&self, id: &ShardId) {
        let unnamed = self.tracker.stop_shard(id);
        self.delete_parts(id, unnamed);
        self.metrics.forget_shard(self.name(), id.as_str());
    }

    /// The checkpoint tick: renew leases when due, then write every running shard's checkpoint.
    async fn on_tick(&mut self) {
        self.ticks += 1;
        if renewal_due(self.last_renew.elapsed(), self.config.lease_duration) {
            self.renew().await;
        }
        let ids: Vec<ShardId> = self
            .running
            .iter()
            .filter(|(_, r)| !r.lost)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            let key = self.running[&id].lease_key.clone();
            match self.write_checkpoint(&id, &key).await {
                Ok(()) => {}
                Err(error) if error.is_retryable() => {
                    // The next tick writes it; the lease guard keeps the shard from acting
                    // past its lease meanwhile.
                    tracing::warn!(topology = %self.name(), shard = %id, %error, "checkpoint failed, retrying");
                }
                Err(error) => {
                    self.decisions
                        .record(|| format!("checkpoint of {id} rejected: {error}"));
                    // Lost (stolen, or taken after expiry) or refused: the same message as a
                    // lost renewal, so one search finds both.
                    self.metrics.lease_lost(self.name());
                    tracing::warn!(topology = %self.name(), lease = %key, %error, "lease lost (checkpoint rejected)");
                    if let Some(r) = self.running.get_mut(&id) {
                        r.lost = true;
                        r.cancel.cancel();
                    }
                }
            }
        }
    }

    /// Renews every held lease; stops the shards whose lease was lost.
    async fn renew(&mut self) {
        self.renew_until(None).await;
    }

    /// Renews held leases, starting none after `deadline`; marks the shards of lost ones.
    async fn renew_until(&mut self, deadline: Option<Instant>) {
        self.last_renew = Instant::now();
        let (lost, failed) = self.leases.renew_all_until(deadline).await;
        if failed == 0 {
            self.health.lease_round_ok();
        }
        for key in lost {
            self.let_go_of_stopped(&key);
            self.decisions.record(|| format!("renewal lost {key}"));
            self.metrics.lease_lost(self.name());
            let name = self.topology.name.clone();
            for r in self.running.values_mut().filter(|r| r.lease_key == key) {
                tracing::warn!(topology = %name, lease = %key, "lease lost");
                r.lost = true;
                r.cancel.cancel();
            }
        }
    }

    /// Shards whose last epoch every path committed: final checkpoint, then free them.
    async fn finish_committed(&mut self) {
        let mut still = Vec::new();
        for f in std::mem::take(&mut self.finishing) {
            let waiting = f.failed_at_tick.is_some_and(|t| self.ticks <= t);
            if waiting || self.tracker.committed_epoch(&f.shard) < f.last_epoch {
                still.push(f);
                continue;
            }
            self.decisions
                .record(|| format!("final checkpoint of {}", f.shard));
            let mut recorded = true;
            match self.write_checkpoint(&f.shard, &f.lease_key).await {
                Ok(()) => {}
                Err(error) if error.is_retryable() && !self.give_up(&f) => {
                    // A throttled table: tried again at the next tick. Dropping it would leave
                    // a closed shard unfinished (its children waiting) until a restart.
                    tracing::warn!(topology = %self.name(), shard = %f.shard, %error, "final checkpoint failed, retrying");
                    still.push(Finishing {
                        attempts: f.attempts + 1,
                        failed_at_tick: Some(self.ticks),
                        ..f
                    });
                    continue;
                }
                Err(error) => {
                    tracing::warn!(topology = %self.name(), shard = %f.shard, %error, "final checkpoint rejected");
                    // The lease moved: its end is not recorded and the shard is not done. Any
                    // other refusal would only repeat if the shard were taken again.
                    recorded = !matches!(
                        error,
                        LeaseError::LeaseLost { .. } | LeaseError::NotFound { .. }
                    );
                }
            }
            self.forget(&f.shard).await;
            if f.handoff && !f.shard_end && recorded {
                // Checkpointed after every path committed: the requester resumes exactly here.
                self.leases.release(&f.lease_key).await;
                self.decisions
                    .record(|| format!("handed off {}", f.lease_key));
                tracing::info!(topology = %self.name(), lease = %f.lease_key, "lease handed over");
                self.metrics.lease_handoff(self.name(), "handed_over");
                continue;
            }
            let bounded = self.config.mode == RunMode::UntilCaughtUp;
            match finished(recorded, f.shard_end, bounded, self.shutdown.is_cancelled()) {
                Finished::NotRecorded => {
                    self.decisions
                        .record(|| format!("final checkpoint of {} not recorded", f.shard));
                    self.leases.forget(&f.lease_key).await;
                    self.sync.owed = true;
                    continue;
                }
                Finished::Ended => {
                    self.report.shards_ended.push(f.shard.clone());
                    self.sync.owed = true;
                }
                Finished::CaughtUp => self.report.shards_caught_up.push(f.shard.clone()),
                Finished::Released => {}
            }
            self.completed.insert(f.shard);
        }
        self.finishing = still;
    }

    /// Whether to stop retrying a final checkpoint: only a run that is ending does, after a
    /// few ticks (the lease then expires and the next owner replays from the last checkpoint).
    fn give_up(&self, f: &Finishing) -> bool {
        (self.shutdown.is_cancelled() || self.failure.is_some())
            && f.attempts >= FINAL_CHECKPOINT_ATTEMPTS
    }

    /// Deletes, in the background, the snapshot parts of `id` that no checkpoint names since
    /// the one just written (`ShardProgress::take_garbage`). A failed delete leaves an object
    /// behind, never a checkpoint without its snapshot.
    fn collect_garbage(&self, id: &ShardId) {
        let names = self.tracker.take_garbage(id);
        self.delete_parts(id, names);
    }

    /// Deletes, in the background, the snapshot parts earlier lives of a shard just taken
    /// under `life` left behind (a crashed owner's newest snapshots, never named), except the
    /// snapshot the resumed checkpoint names. Only the owner writes checkpoints, and this life
    /// names only its own parts or the resumed snapshot, so none of them is named again.
    fn clean_older_lives(&self, key: &str, life: LeaseEpoch, resumed: &ShardCheckpoint) {
        let Some((store, _)) = self.topology.state.snapshots() else {
            return;
        };
        let store = Arc::clone(store);
        let prefix = shard_prefix(&self.topology.name, key);
        let named: Vec<String> = resumed
            .snapshot
            .iter()
            .flat_map(|s| s.parts.iter().map(|p| p.name.clone()))
            .collect();
        let key = key.to_owned();
        tokio::spawn(async move {
            let names = match store.list(&prefix).await {
                Ok(names) => names,
                Err(error) => {
                    tracing::warn!(lease = %key, %error, "snapshot parts of earlier owners could not be listed");
                    return;
                }
            };
            for name in names {
                let older = part_life(&prefix, &name).is_some_and(|(l, _)| l < life);
                if older && !named.contains(&name) {
                    if let Err(error) = store.delete(&name).await {
                        tracing::warn!(lease = %key, part = %name, %error, "an old snapshot part could not be deleted");
                    }
                }
            }
        });
    }

    /// Deletes snapshot parts of `id` in the background (a failure leaves an object behind).
    fn delete_parts(&self, id: &ShardId, names: Vec<String>) {
        let Some((store, _)) = self.topology.state.snapshots() else {
            return;
        };
        if names.is_empty() {
            return;
        }
        let store = Arc::clone(store);
        let shard = id.clone();
        tokio::spawn(async move {
            for name in names {
                if let Err(error) = store.delete(&name).await {
                    tracing::warn!(%shard, part = %name, %error, "an old snapshot part could not be deleted");
                }
            }
        });
    }

    /// Writes `id`'s checkpoint if the tracker moved it, and updates the lag gauge.
    async fn write_checkpoint(&mut self, id: &ShardId, key: &str) -> Result<(), LeaseError> {
        let (tracker, last) = (&self.tracker, self.written.get(id));
        let decide = || tracker.checkpoint(id).filter(|cp| Some(cp) != last);
        if let Some(cp) = self.leases.checkpoint_with(key, decide).await? {
            self.decisions
                .record(|| format!("checkpoint {id} {:?} {:?}", cp.committed, cp.rebuild_from));
            self.metrics.checkpointed(self.name(), id.as_str());
            self.written.insert(id.clone(), cp);
            self.collect_garbage(id);
        }
        // Until this run writes one, nothing it read is covered.
        let covered = self
            .written
            .get(id)
            .map_or(&CheckpointPosition::Initial, |cp| &cp.committed);
        self.metrics
            .checkpoint_lag(self.name(), id.as_str(), self.tracker.lag(id, covered));
        Ok(())
    }

    /// Ends the run: stops the shard tasks, releases the leases (a failed run's once its keyed
    /// workers ended, since nothing writes after that), waits for the keyed workers, and
    /// reports.
    async fn wind_down(
        mut self,
        workers: &mut JoinSet<Result<(), Error>>,
    ) -> Result<RunReport, Error> {
        self.shard_tasks.shutdown().await;
        let released = self.failure.is_none();
        if released {
            self.leases.release_all().await;
        }
        // The workers end when every sender of their channels is gone.
        drop(self.exchanges);
        drop(self.shard_tasks);
        while let Some(joined) = workers.join_next().await {
            if let Ok(Err(e)) = joined {
                self.failure.get_or_insert(e);
            }
        }
        if !released {
            // A failed run: nothing writes any more, so the leases are released (their
            // checkpoints stay as written) and other workers need not wait for them to expire.
            self.leases.release_all().await;
        }
        if let Some(error) = self.failure {
            return Err(error);
        }
        if let Some(stop) = self.stopped.into_iter().next() {
            return Err(Error::ShardStopped(stop));
        }
        Ok(self.report)
    }
}

/// How a task ended abnormally, without a panic's message: it may quote the value a user
/// function failed on (the panic hook printed it to stderr).
fn task_failure(task: &str, error: &tokio::task::JoinError) -> String {
    if error.is_panic() {
        format!("{task} panicked (its message is on stderr)")
    } else {
        format!("{task} was cancelled")
    }
}

/// Sleeps until the first pause in `cooling` is over.
async fn sleep_until_first(cooling: &BTreeMap<ShardId, Instant>) {
    match cooling.values().min() {
        Some(until) => tokio::time::sleep_until(*until).await,
        None => std::future::pending().await,
    }
}
