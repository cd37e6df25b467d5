//! The worker's view of the lease table: create leases for new shards, take free or expired
//! ones, ask live owners to hand theirs over, renew, checkpoint and release what it holds, and
//! notice when another worker asks for one of its own. Expiry is judged by this worker's own
//! monotonic clock (a lease whose counter did not move for a lease duration), as in the KCL.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::clock::WallClock;
use crate::error::LeaseError;
use crate::lease::{holder, worker_of, Lease, LeaseStore, LeaseUpdate, ShardCheckpoint};
use crate::lease_guard::{LeaseGuard, Moment};
use crate::position::ShardInfo;
use crate::protocol::balance::{plan, Observed, Plan};
use crate::protocol::lease_keys::{
    inherited_counter, is_tombstone, migration_step, parse, shard_id, Foreigner, KeyKind,
    MigrationStep, StreamScope, MOVED_OWNER,
};
use crate::protocol::lease_rules::{handoff_asked, judge_unclear, UnclearWrite};
use crate::protocol::shard_sync::{leases_to_clean, leases_to_create};
use crate::runtime::scoped_store::ScopedStore;

/// Tries of a handoff request against an owner whose writes keep moving the counter.
const REQUEST_ATTEMPTS: usize = 3;

pub(crate) struct LeaseManager {
    /// The lease table as stored.
    table: Arc<dyn LeaseStore>,
    /// The table seen through the stream's scope, once the stream was described
    /// ([`enter_scope`](Self::enter_scope)); until then the table itself.
    scoped: OnceLock<Arc<ScopedStore>>,
    /// This process's owner name: its worker id and incarnation (`lease::holder`).
    owner: String,
    worker_id: String,
    lease_duration: Duration,
    clock: WallClock,
    /// Each lease this worker holds: the counter it last wrote, and how long it may act on it.
    held: Mutex<BTreeMap<String, Held>>,
    /// Counter of other workers' leases and when this worker first saw it.
    observed: Mutex<BTreeMap<String, (u64, Instant)>>,
    /// Leases this worker asked their owners for, with when it asked, until it takes them or
    /// they go elsewhere.
    requested: Mutex<BTreeMap<String, Instant>>,
    /// Leases seen renewed by another live process with this worker id, not yet reported.
    id_conflicts: Mutex<BTreeSet<String>>,
}

/// What a sync round did with the table's legacy and stale leases (`lease_keys`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tidied {
    /// Legacy leases moved to their stream-qualified keys.
    pub(crate) moved: usize,
    /// Legacy leftovers left tombstones, and stale leases deleted.
    pub(crate) deleted: usize,
    /// Legacy leases that wait for their owner or a parent.
    pub(crate) waiting: usize,
    /// The creation time of a later creation of the stream whose leases are in the table: the
    /// stream was created again during this run.
    pub(crate) newer: Option<i64>,
}

/// A new lease of `shard` whose counter starts at `counter`.
fn new_lease(shard: &ShardInfo, counter: u64) -> Lease {
    let parents = shard
        .parents
        .iter()
        .map(|p| p.as_str().to_owned())
        .collect();
    Lease {
        counter,
        ..Lease::new(shard.id.as_str(), parents)
    }
}

struct Held {
    counter: u64,
    guard: LeaseGuard,
    /// When the first of this worker's writes whose outcome is still unclear began (a
    /// retryable error that may hide a write that lands later): a write judged landed then
    /// extends the guard from here, since other workers' expiry clocks may have started when
    /// that earlier write landed.
    unconfirmed_since: Option<Moment>,
    /// The worker that asked for this lease (graceful handoff), once this worker saw it.
    handoff_to: Option<String>,
}

impl LeaseManager {
    /// The view of `store` of worker `worker_id` in its run `incarnation`; `clock` is the wall
    /// clock its lease guards also run on (it counts time the machine was suspended).
    pub(crate) fn new(
        store: Arc<dyn LeaseStore>,
        (worker_id, incarnation): (&str, &str),
        lease_duration: Duration,
        clock: WallClock,
    ) -> Self {
        Self {
            table: store,
            scoped: OnceLock::new(),
            owner: holder(worker_id, incarnation),
            worker_id: worker_id.to_owned(),
            lease_duration,
            clock,
            held: Mutex::new(BTreeMap::new()),
            observed: Mutex::new(BTreeMap::new()),
            requested: Mutex::new(BTreeMap::new()),
            id_conflicts: Mutex::new(BTreeSet::new()),
        }
    }

    /// The owner name this process writes into leases.
    pub(crate) fn owner(&self) -> &str {
        &self.owner
    }

    /// Leases another live process with this worker id renewed since the last call: a
    /// configuration error (two processes given one id), which this one reports and waits out
    /// instead of taking the leases back and forth.
    pub(crate) async fn take_id_conflicts(&self) -> Vec<String> {
        std::mem::take(&mut *self.id_conflicts.lock().await)
            .into_iter()
            .collect()
    }

    /// The table as this worker reads and writes it.
    fn store(&self) -> &dyn LeaseStore {
        match self.scoped.get() {
            Some(scoped) => scoped.as_ref(),
            None => self.table.as_ref(),
        }
    }

    /// The scope this worker works in, once entered.
    pub(crate) fn scope(&self) -> Option<&StreamScope> {
        self.scoped.get().map(|s| s.scope())
    }

    /// From now on reads and writes the leases of `scope` only (`protocol::lease_keys`). The
    /// first scope entered stays: a later call with another one changes nothing (the caller
    /// compares with [`scope`](Self::scope)).
    pub(crate) fn enter_scope(&self, scope: StreamScope) {
        let _ = self
            .scoped
            .set(Arc::new(ScopedStore::new(Arc::clone(&self.table), scope)));
    }

    /// Creates a lease for every new shard (see `shard_sync`), after moving the table's legacy
    /// leases to their scoped keys and deleting stale ones (`lease_keys`). While a legacy lease
    /// waits for its owner, no lease is created: the new shard might be one whose progress that
    /// lease holds. A new lease starts at the counter its shard id's earlier leases reached
    /// (`inherited_counter`), so that fencing sinks take the new owner's outputs.
    pub(crate) async fn sync(&self, shards: &[ShardInfo]) -> Result<Tidied, LeaseError> {
        let Some(scoped) = self.scoped.get() else {
            let existing = self.table.list().await?;
            for shard in leases_to_create(shards, &existing) {
                self.table.create_if_absent(&new_lease(shard, 0)).await?;
            }
            return Ok(Tidied::default());
        };
        let (tidied, read) = self.tidy(scoped).await?;
        if tidied.waiting > 0 || tidied.newer.is_some() {
            return Ok(tidied);
        }
        // The listing `tidy` read is still the table unless it moved or deleted something.
        let table = if tidied.moved + tidied.deleted == 0 {
            read
        } else {
            self.table.list().await?
        };
        let existing: Vec<Lease> = table
            .iter()
            .filter_map(|l| scoped.seen(l.clone()))
            .collect();
        for shard in leases_to_create(shards, &existing) {
            let counter = inherited_counter(scoped.scope(), &table, shard.id.as_str());
            scoped.create_if_absent(&new_lease(shard, counter)).await?;
        }
        Ok(tidied)
    }

    /// Moves legacy leases to `scoped`'s keys and deletes stale ones, as
    /// `lease_keys::migration_step` decides for each.
    /// Returns what it did and the table as it read it.
    async fn tidy(&self, scoped: &ScopedStore) -> Result<(Tidied, Vec<Lease>), LeaseError> {
        let all = self.table.list().await?;
        let scope = scoped.scope();
        let mut legacy = BTreeSet::new();
        let mut moved = BTreeSet::new();
        let mut tidied = Tidied::default();
        for lease in all.iter().filter(|l| !is_tombstone(l)) {
            match scope.classify(&lease.key) {
                KeyKind::Legacy(shard) => {
                    legacy.insert(shard);
                }
                KeyKind::Scoped(shard) => {
                    moved.insert(shard);
                }
                KeyKind::Newer(created) => tidied.newer = Some(created),
                KeyKind::Stale(_) | KeyKind::Foreign => {}
            }
        }
        if tidied.newer.is_some() {
            return Ok((tidied, all));
        }
        for lease in all.iter().filter(|l| !is_tombstone(l)) {
            let (shard, stale) = match scope.classify(&lease.key) {
                KeyKind::Legacy(shard) => (shard, false),
                KeyKind::Stale(shard) => (shard, true),
                KeyKind::Scoped(_) | KeyKind::Newer(_) | KeyKind::Foreign => continue,
            };
            let item = Foreigner {
                lease,
                moved: moved.contains(shard),
                parent_waits: !stale
                    && lease.parents.iter().any(|p| {
                        let parent = shard_id(p);
                        legacy.contains(parent) && !moved.contains(parent)
                    }),
                // Observed under the stored key, apart from the scoped lease of the same shard.
                expired: self
                    .expired_as(&format!("table:{}", lease.key), lease)
                    .await,
                mine: lease.owner.as_deref() == Some(self.owner.as_str())
                    || lease.owner.as_deref() == Some(MOVED_OWNER),
            };
            match migration_step(&item, stale) {
                MigrationStep::Wait => tidied.waiting += usize::from(!stale),
                MigrationStep::Delete => match self.table.delete(&lease.key, lease.counter).await {
                    Ok(()) => tidied.deleted += 1,
                    Err(LeaseError::NotFound { .. }) => {}
                    Err(LeaseError::ConditionFailed { .. }) => {
                        tidied.waiting += usize::from(!stale);
                    }
                    Err(e) => return Err(e),
                },
                MigrationStep::Bury => {
                    if self.bury(&lease.key, lease.counter).await? {
                        tidied.deleted += 1;
                    } else {
                        tidied.waiting += 1;
                    }
                }
                MigrationStep::Move => {
                    if self.move_legacy(scoped, shard, lease).await? {
                        tidied.moved += 1;
                    } else {
                        tidied.waiting += 1;
                    }
                }
            }
        }
        Ok((tidied, all))
    }

    /// Moves the legacy lease `lease` (as read) of `shard` to its scoped key: takes it first,
    /// so that a worker of the old form still writing it is fenced, then copies its progress
    /// and counter (epochs only grow, so fencing sinks take the next owner's outputs), then
    /// leaves it a tombstone. A crash between the steps leaves it taken by this (gone) process,
    /// or copied; a later round finishes the move. Returns `false` if it changed since it was
    /// read, or its shard has a scoped lease already (the next round buries it then).
    async fn move_legacy(
        &self,
        scoped: &ScopedStore,
        shard: &str,
        lease: &Lease,
    ) -> Result<bool, LeaseError> {
        let take = LeaseUpdate::Take {
            owner: self.owner.clone(),
        };
        let taken = match self.table.update(&lease.key, lease.counter, &take).await {
            Ok(taken) => taken,
            Err(LeaseError::ConditionFailed { .. } | LeaseError::NotFound { .. }) => {
                return Ok(false)
            }
            Err(e) => return Err(e),
        };
        let copy = Lease {
            key: shard.to_owned(),
            owner: None,
            handoff_to: None,
            parents: taken
                .parents
                .iter()
                .map(|p| shard_id(p).to_owned())
                .collect(),
            ..taken.clone()
        };
        if !scoped.create_if_absent(&copy).await? {
            return Ok(false);
        }
        // If someone wrote it since this take, the next round buries it once nobody holds it.
        self.bury(&lease.key, taken.counter).await?;
        tracing::info!(lease = %lease.key, to = %scoped.stored(&copy).key, checkpoint = ?copy.checkpoint.committed, "moved a lease to its stream-qualified key");
        Ok(true)
    }

    /// Leaves the legacy lease `key` (at `counter`) a tombstone (`lease_keys::MOVED_OWNER`):
    /// taken by that owner, then checkpointed at `SHARD_END`. Returns `false` if it changed
    /// since it was read; a burial cut short between the two writes is finished by a later round.
    async fn bury(&self, key: &str, counter: u64) -> Result<bool, LeaseError> {
        let owner = MOVED_OWNER.to_owned();
        let mut counter = counter;
        let current = self.table.get(key).await?;
        if current
            .as_ref()
            .is_none_or(|l| l.owner.as_deref() != Some(MOVED_OWNER))
        {
            let take = LeaseUpdate::Take {
                owner: owner.clone(),
            };
            match self.table.update(key, counter, &take).await {
                Ok(taken) => counter = taken.counter,
                Err(LeaseError::ConditionFailed { .. } | LeaseError::NotFound { .. }) => {
                    return Ok(false)
                }
                Err(e) => return Err(e),
            }
        }
        let end = LeaseUpdate::Checkpoint {
            owner,
            checkpoint: ShardCheckpoint::shard_end(),
        };
        match self.table.update(key, counter, &end).await {
            Ok(_) => Ok(true),
            Err(LeaseError::ConditionFailed { .. } | LeaseError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes the leases of finished parents whose children all started (see `shard_sync`).
    pub(crate) async fn clean_finished_parents(
        &self,
        shards: &[ShardInfo],
    ) -> Result<(), LeaseError> {
        let existing = self.store().list().await?;
        for lease in leases_to_clean(shards, &existing) {
            // Conditional on the counter read: a lease someone changed since is left for a
            // later round. Another worker deleting it first is just as good.
            match self.store().delete(&lease.key, lease.counter).await {
                Ok(()) => tracing::info!(lease = %lease.key, "finished parent's lease deleted"),
                Err(LeaseError::ConditionFailed { .. } | LeaseError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Deletes the lease `lease` (as read) of a shard the stream stopped listing (see
    /// `protocol::vanished`). Returns whether it was deleted; `false` if it changed since it
    /// was read (left for a later round) or is gone already.
    pub(crate) async fn delete_vanished(&self, lease: &Lease) -> Result<bool, LeaseError> {
        match self.store().delete(&lease.key, lease.counter).await {
            Ok(()) => Ok(true),
            Err(LeaseError::ConditionFailed { .. } | LeaseError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether the table holds a lease of `stream` (of any creation, or keyed by shard id
    /// alone), before or after a scope was entered.
    pub(crate) async fn any_of_stream(&self, stream: &str) -> Result<bool, LeaseError> {
        let all = self.table.list().await?;
        Ok(all
            .iter()
            .any(|l| parse(&l.key).is_none_or(|(s, _, _)| s == stream)))
    }

    pub(crate) async fn list(&self) -> Result<Vec<Lease>, LeaseError> {
        self.store().list().await
    }

    /// This round's plan over `candidates` (the leases this worker may process): leases to
    /// take (handed over, free, expired) and leases to ask for toward an even spread (see
    /// `balance::plan`).
    pub(crate) async fn plan(&self, candidates: &[&Lease], max_request: usize) -> Plan {
        let mut observed = Vec::with_capacity(candidates.len());
        for lease in candidates {
            // Another worker's, or bound for one (a handoff it asked for; if this worker's
            // earlier life owned it and nobody renews it, the requester may be gone too).
            let others = match (lease.owner.as_deref(), lease.handoff_to.as_deref()) {
                (Some(owner), _) if owner != self.owner => true,
                (_, Some(requester)) => requester != self.owner,
                _ => false,
            };
            let expired = others && self.expired(lease).await;
            observed.push(Observed { lease, expired });
        }
        let mut plan = plan(&self.owner, &observed, max_request);
        // An earlier incarnation of this worker id is most likely a crashed process (or a
        // misconfigured twin): its leases are taken on expiry, never asked for (a request
        // would restart every expiry clock).
        plan.request.retain(|key| {
            !candidates.iter().any(|l| {
                &l.key == key
                    && l.owner
                        .as_deref()
                        .is_some_and(|o| worker_of(o) == self.worker_id)
            })
        });
        plan
    }

    /// Asks the owner of `lease` (as read) to hand it over. Returns whether the request was
    /// written; `false` if the lease went to another owner or was asked for by another worker
    /// meanwhile. A busy owner moves the counter at every checkpoint, so a refused request is
    /// tried again (a few times) at the counter read just before it.
    pub(crate) async fn request_handoff(&self, lease: &Lease) -> Result<bool, LeaseError> {
        let ask = LeaseUpdate::RequestHandoff {
            requester: self.owner.clone(),
        };
        let mut counter = lease.counter;
        for _ in 0..REQUEST_ATTEMPTS {
            let written = match self.store().update(&lease.key, counter, &ask).await {
                Ok(_) => Ok(()),
                Err(e) => match self.judge(&lease.key, counter, &ask, &e).await {
                    Some((UnclearWrite::Landed, _)) => Ok(()),
                    _ => Err(e),
                },
            };
            match written {
                Ok(()) => {
                    self.requested
                        .lock()
                        .await
                        .insert(lease.key.clone(), Instant::now());
                    return Ok(true);
                }
                Err(LeaseError::ConditionFailed { .. }) => {
                    let Some(now) = self.store().get(&lease.key).await? else {
                        return Ok(false);
                    };
                    if now.owner != lease.owner || now.handoff_to.is_some() {
                        return Ok(false);
                    }
                    counter = now.counter;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// Whether a handoff this worker asked for within a lease duration is still pending: an
    /// owner hands a lease over within about that long, or keeps it (a shard stopped at a bad
    /// record); older requests are left to the shard syncs, which take what was released.
    pub(crate) async fn awaits_handoffs(&self) -> bool {
        self.requested
            .lock()
            .await
            .values()
            .any(|at| at.elapsed() < self.lease_duration)
    }

    /// Whether a lease this worker asked for was released to it (a shard sync then takes it);
    /// forgets requests whose lease went elsewhere. One read per pending request.
    pub(crate) async fn handed_over(&self) -> Result<bool, LeaseError> {
        let keys: Vec<String> = self
            .requested
            .lock()
            .await
            .iter()
            .filter(|(_, at)| at.elapsed() < self.lease_duration)
            .map(|(key, _)| key.clone())
            .collect();
        let mut released = false;
        let mut failed = None;
        for key in keys {
            // One failed read leaves the others to be read.
            let lease = match self.store().get(&key).await {
                Ok(lease) => lease,
                Err(e) => {
                    failed = Some(e);
                    continue;
                }
            };
            // Still asked of its owner: not taken by another, not cleared, and not a shard its
            // owner read to the end meanwhile (nothing left to hand over).
            let asked = lease.as_ref().is_some_and(|l| {
                l.handoff_to.as_deref() == Some(self.owner.as_str()) && !l.checkpoint.is_shard_end()
            });
            if !asked {
                self.requested.lock().await.remove(&key);
            } else if lease.is_some_and(|l| l.owner.is_none()) {
                released = true;
            }
        }
        match failed {
            Some(e) if !released => Err(e),
            _ => Ok(released),
        }
    }

    /// Notes the handoff requests the table shows for leases this worker holds (read by a
    /// shard sync): it adopts the counter the request left, as a refused write would.
    pub(crate) async fn note_requests(&self, leases: &[Lease]) {
        // Requests whose lease is no longer asked for by this worker are over.
        self.requested.lock().await.retain(|key, _| {
            leases
                .iter()
                .any(|l| &l.key == key && l.handoff_to.as_deref() == Some(self.owner.as_str()))
        });
        let mut held = self.held.lock().await;
        for lease in leases {
            if let Some(entry) = held.get_mut(&lease.key) {
                if entry.handoff_to.is_none() && handoff_asked(&self.owner, entry.counter, lease) {
                    entry.counter = lease.counter;
                    entry.handoff_to.clone_from(&lease.handoff_to);
                }
            }
        }
    }

    /// Held leases another worker asked for, with the requester.
    pub(crate) async fn handoffs_asked(&self) -> Vec<(String, String)> {
        self.held
            .lock()
            .await
            .iter()
            .filter_map(|(key, h)| Some((key.clone(), h.handoff_to.clone()?)))
            .collect()
    }

    /// Takes `lease` (free, expired, stolen, or ours from an earlier run) if its counter is
    /// still the one read. Returns the lease as taken, or `None` if another worker won the race.
    pub(crate) async fn take(&self, lease: &Lease) -> Result<Option<Lease>, LeaseError> {
        let take = LeaseUpdate::Take {
            owner: self.owner.clone(),
        };
        let started = Moment::now(&self.clock);
        let written = match self.store().update(&lease.key, lease.counter, &take).await {
            Ok(taken) => Ok(taken),
            Err(e) => match self.judge(&lease.key, lease.counter, &take, &e).await {
                Some((UnclearWrite::Landed, Some(taken))) => Ok(taken),
                Some((UnclearWrite::Lost, _)) => Err(LeaseError::ConditionFailed {
                    lease_key: lease.key.clone(),
                    reason: "another worker took the lease first",
                }),
                _ => Err(e),
            },
        };
        match written {
            Ok(taken) => {
                self.requested.lock().await.remove(&taken.key);
                let held = Held {
                    counter: taken.counter,
                    guard: LeaseGuard::new(started, self.lease_duration, self.clock.clone()),
                    unconfirmed_since: None,
                    handoff_to: None,
                };
                if let Some(old) = self.held.lock().await.insert(taken.key.clone(), held) {
                    old.guard.revoke();
                }
                Ok(Some(taken))
            }
            Err(LeaseError::ConditionFailed { .. } | LeaseError::LeaseLost { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether this worker is the recorded owner of `lease`.
    #[cfg(test)]
    pub(crate) fn owns(&self, lease: &Lease) -> bool {
        lease.owner.as_deref() == Some(self.owner.as_str())
    }

    async fn expired(&self, lease: &Lease) -> bool {
        self.expired_as(&lease.key, lease).await
    }

    /// Whether `lease`'s counter stayed still for a lease duration, observed under `key`.
    async fn expired_as(&self, key: &str, lease: &Lease) -> bool {
        let mut observed = self.observed.lock().await;
        let now = Instant::now();
        let entry = observed
            .entry(key.to_owned())
            .or_insert((lease.counter, now));
        if entry.0 != lease.counter {
            *entry = (lease.counter, now);
            // Written since this worker first saw it, by another incarnation of its own id (a
            // request for it moves the counter too: not a sign of life).
            let same_id = lease.handoff_to.is_none()
                && lease
                    .owner
                    .as_deref()
                    .is_some_and(|o| o != self.owner && worker_of(o) == self.worker_id);
            if same_id {
                self.id_conflicts.lock().await.insert(lease.key.clone());
            }
        }
        now.duration_since(entry.1) >= self.lease_duration
    }

    /// Items the store's last listing skipped (not leases it can read).
    pub(crate) fn skipped_items(&self) -> usize {
        self.store().skipped_items()
    }

    pub(crate) async fn held_count(&self) -> usize {
        self.held.lock().await.len()
    }

    async fn apply(&self, key: &str, update: LeaseUpdate) -> Result<Lease, LeaseError> {
        let applied = self.apply_with(key, || Some(update)).await?;
        Ok(applied.expect("an update was given"))
    }

    /// Applies the update `decide` returns (nothing if `None`) to held lease `key`.
    async fn apply_with(
        &self,
        key: &str,
        decide: impl FnOnce() -> Option<LeaseUpdate>,
    ) -> Result<Option<Lease>, LeaseError> {
        let mut held = self.held.lock().await;
        let entry = held.get_mut(key).ok_or_else(|| LeaseError::LeaseLost {
            lease_key: key.to_owned(),
        })?;
        let Some(update) = decide() else {
            return Ok(None);
        };
        let mut started = Moment::now(&self.clock);
        let mut result = self.store().update(key, entry.counter, &update).await;
        // A refusal because another worker asked for the lease meanwhile: it is still this
        // worker's; adopt the counter the request left and write again (once: a second
        // request would need a second requester's write in between, and is seen next time).
        // A retryable error is judged too: the request may have moved the counter whether or
        // not this write landed.
        // The judgement of the first failure, kept unless the write is made again.
        let mut judged = None;
        if let Err(e) = &result {
            let first = self.judge(key, entry.counter, &update, e).await;
            match &first {
                Some((_, Some(now))) if handoff_asked(&self.owner, entry.counter, now) => {
                    tracing::info!(lease = %key, requester = ?now.handoff_to, "handoff asked for");
                    entry.counter = now.counter;
                    entry.handoff_to.clone_from(&now.handoff_to);
                    started = Moment::now(&self.clock);
                    result = self.store().update(key, entry.counter, &update).await;
                }
                _ => judged = Some(first),
            }
        }
        let (written, judged_landed) = match result {
            // A write at the counter this worker last knew succeeded: no earlier write of it,
            // conditional on that counter, can land any more.
            Ok(lease) => (Ok(lease), false),
            Err(e) => {
                let judged = match judged {
                    Some(first) => first,
                    None => self.judge(key, entry.counter, &update, &e).await,
                };
                match judged {
                    Some((UnclearWrite::Landed, Some(lease))) => (Ok(lease), true),
                    Some((UnclearWrite::Lost, _)) => (
                        Err(LeaseError::LeaseLost {
                            lease_key: key.to_owned(),
                        }),
                        false,
                    ),
                    _ => {
                        if e.is_retryable() {
                            entry.unconfirmed_since.get_or_insert(started);
                        }
                        (Err(e), false)
                    }
                }
            }
        };
        match written {
            Ok(lease) => {
                if matches!(update, LeaseUpdate::Release { .. }) {
                    entry.guard.revoke();
                    held.remove(key);
                } else {
                    // Any write bumps the counter, which restarts other workers' expiry clocks:
                    // the one judged landed may be an earlier write, begun at the first
                    // unconfirmed one.
                    let since = entry.unconfirmed_since.take();
                    let from = match since {
                        Some(first) if judged_landed => first.min(started),
                        _ => started,
                    };
                    entry.counter = lease.counter;
                    entry.guard.extend(from, self.lease_duration);
                }
                Ok(Some(lease))
            }
            Err(e) => {
                if matches!(
                    e,
                    LeaseError::LeaseLost { .. } | LeaseError::NotFound { .. }
                ) {
                    entry.guard.revoke();
                    held.remove(key);
                }
                Err(e)
            }
        }
    }

    /// After a write of `update` at `expected` failed with `error`: if its outcome is unclear,
    /// the lease as read now and what the write did (`judge_unclear`); `None` if the outcome is
    /// clear or the lease cannot be read (soon) either. A retryable error may hide a write that
    /// landed; a refused condition may be the client's own retry of a write that landed, or an
    /// earlier write of this worker's that landed late. (It may also be another live process
    /// with this worker's id, whose take leaves the same owner name: the docs forbid sharing
    /// an id, and the default one is unique per process.)
    async fn judge(
        &self,
        key: &str,
        expected: u64,
        update: &LeaseUpdate,
        error: &LeaseError,
    ) -> Option<(UnclearWrite, Option<Lease>)> {
        let refused = matches!(
            error,
            LeaseError::LeaseLost { .. } | LeaseError::ConditionFailed { .. }
        );
        if !(error.is_retryable() || refused) {
            return None;
        }
        // Bounded: this runs under the lock of every lease write, when the table is slow.
        let read = tokio::time::timeout(self.lease_duration / 10, self.store().get(key));
        let now = read.await.ok()?.ok()?;
        let judged = judge_unclear(expected, &self.owner, update, now.as_ref());
        if judged != UnclearWrite::NotLanded {
            tracing::info!(lease = %key, outcome = ?judged, %error, "lease write with an unclear outcome, judged from the lease");
        }
        Some((judged, now))
    }

    /// Writes the checkpoint `decide` returns, if any, and returns it. `decide` runs under the
    /// lock every write to this worker's leases takes, so that of two writers (the checkpoint
    /// tick, a shard recording an idle advance) the one that decided last writes last: an
    /// older decision never overwrites a newer one.
    pub(crate) async fn checkpoint_with(
        &self,
        key: &str,
        decide: impl FnOnce() -> Option<ShardCheckpoint>,
    ) -> Result<Option<ShardCheckpoint>, LeaseError> {
        let mut written = None;
        self.apply_with(key, || {
            let checkpoint = decide()?;
            written = Some(checkpoint.clone());
            Some(LeaseUpdate::Checkpoint {
                owner: self.owner.clone(),
                checkpoint,
            })
        })
        .await?;
        Ok(written)
    }

    /// Renews every held lease, starting no renewal after `deadline` (one under way runs to
    /// its end, so that the counter it wrote is known); returns the keys that were lost and
    /// how many renewals failed for other reasons (the store unreachable, say) or were not
    /// started.
    pub(crate) async fn renew_all_until(&self, deadline: Option<Instant>) -> (Vec<String>, usize) {
        let keys: Vec<String> = self.held.lock().await.keys().cloned().collect();
        let mut lost = Vec::new();
        let mut failed = 0;
        for (i, key) in keys.iter().enumerate() {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                failed += keys.len() - i;
                tracing::warn!(
                    leases = keys.len() - i,
                    "lease renewals out of time; skipped"
                );
                break;
            }
            match self
                .apply(
                    key,
                    LeaseUpdate::Renew {
                        owner: self.owner.clone(),
                    },
                )
                .await
            {
                Ok(_) => {}
                Err(LeaseError::LeaseLost { .. } | LeaseError::NotFound { .. }) => {
                    lost.push(key.clone());
                }
                Err(error) => {
                    failed += 1;
                    tracing::warn!(lease = %key, %error, "lease renewal failed");
                }
            }
        }
        (lost, failed)
    }

    pub(crate) async fn release(&self, key: &str) {
        if let Err(error) = self
            .apply(
                key,
                LeaseUpdate::Release {
                    owner: self.owner.clone(),
                },
            )
            .await
        {
            tracing::warn!(lease = %key, %error, "lease release failed; it will expire");
        }
    }

    pub(crate) async fn release_all(&self) {
        let keys: Vec<String> = self.held.lock().await.keys().cloned().collect();
        for key in keys {
            self.release(&key).await;
        }
    }

    /// The counter this worker last wrote for `key`, if it holds the lease (for model tests).
    #[cfg(test)]
    pub(crate) async fn held_counter(&self, key: &str) -> Option<u64> {
        self.held.lock().await.get(key).map(|h| h.counter)
    }

    /// How long this worker may act on `key`, while it holds it.
    pub(crate) async fn guard(&self, key: &str) -> Option<LeaseGuard> {
        self.held.lock().await.get(key).map(|h| h.guard.clone())
    }

    /// Forgets a lease without writing (it is lost anyway).
    pub(crate) async fn forget(&self, key: &str) {
        if let Some(held) = self.held.lock().await.remove(key) {
            held.guard.revoke();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::MemoryLeaseStore;
    use crate::testing::ScriptedLeaseStore;

    /// A scripted in-memory table with a free lease per key, and worker `me` on it (10 s
    /// leases).
    async fn scripted(
        keys: &[&str],
    ) -> (
        ScriptedLeaseStore<MemoryLeaseStore>,
        Arc<dyn LeaseStore>,
        LeaseManager,
    ) {
        let scripted = ScriptedLeaseStore::new(MemoryLeaseStore::new());
        let store: Arc<dyn LeaseStore> = Arc::new(scripted.clone());
        for key in keys {
            store
                .create_if_absent(&Lease::new(*key, vec![]))
                .await
                .unwrap();
        }
        let me = LeaseManager::new(
            Arc::clone(&store),
            ("me", "1"),
            Duration::from_secs(10),
            WallClock::following_runtime(0),
        );
        (scripted, store, me)
    }

    /// `me` takes the free lease `key`.
    async fn take_free(me: &LeaseManager, store: &Arc<dyn LeaseStore>, key: &str) {
        let free = store.get(key).await.unwrap().unwrap();
        me.take(&free).await.unwrap().expect("a free lease");
    }

    async fn owned_by_other(store: &Arc<dyn LeaseStore>) -> Lease {
        store
            .create_if_absent(&Lease::new("s", vec![]))
            .await
            .unwrap();
        let take = LeaseUpdate::Take {
            owner: "other".into(),
        };
        store.update("s", 0, &take).await.unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn another_workers_lease_is_taken_only_after_a_lease_duration_without_renewal() {
        let store: Arc<dyn LeaseStore> = Arc::new(MemoryLeaseStore::new());
        let lease = owned_by_other(&store).await;
        let me = LeaseManager::new(
            Arc::clone(&store),
            ("me", "1"),
            Duration::from_secs(10),
            WallClock::following_runtime(0),
        );
        // The other worker holds its one lease: nothing to take or steal while it is alive.
        assert_eq!(
            me.plan(&[&lease], 1).await,
            Plan::default(),
            "first sight starts the clock"
        );
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(
            me.plan(&[&lease], 1).await,
            Plan::default(),
            "not expired after 9 s"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            me.plan(&[&lease], 1).await.take,
            ["s"],
            "expired after 10 s"
        );
        let taken = me.take(&lease).await.unwrap().expect("taken");
        assert_eq!(taken.owner.as_deref(), Some("me#1"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_restarts_the_expiry_clock() {
        let store: Arc<dyn LeaseStore> = Arc::new(MemoryLeaseStore::new());
        let lease = owned_by_other(&store).await;
        let me = LeaseManager::new(
            Arc::clone(&store),
            ("me", "1"),
            Duration::from_secs(10),
            WallClock::following_runtime(0),
        );
        assert_eq!(me.plan(&[&lease], 1).await, Plan::default());
        tokio::time::advance(Duration::from_secs(8)).await;
        let renew = LeaseUpdate::Renew {
            owner: "other".into(),
        };
        let renewed = store.update("s", lease.counter, &renew).await.unwrap();
        assert_eq!(
            me.plan(&[&renewed], 1).await,
            Plan::default(),
            "a new counter: clock restarts"
        );
        tokio::time::advance(Duration::from_secs(8)).await;
        assert_eq!(
            me.plan(&[&renewed], 1).await,
            Plan::default(),
            "8 s since the renewal"
        );
    }

    /// Found in review: a renewal that failed retryably while a handoff request was pending
    /// was judged a loss (the request had moved the counter), so the shard stopped without a
    /// final checkpoint and the requester waited for expiry.
    #[tokio::test(start_paused = true)]
    async fn a_renewal_failing_while_a_handoff_is_asked_is_not_a_loss() {
        let (scripted, store, me) = scripted(&["s"]).await;
        take_free(&me, &store, "s").await;
        let lease = store.get("s").await.unwrap().unwrap();
        let ask = LeaseUpdate::RequestHandoff {
            requester: "other".into(),
        };
        store.update("s", lease.counter, &ask).await.unwrap();
        scripted.fail_updates(1);
        let (lost, failed) = me.renew_all_until(None).await;
        assert!(lost.is_empty(), "still this worker's lease");
        assert_eq!(failed, 0, "written again at the counter the request left");
        assert_eq!(
            me.handoffs_asked().await,
            [("s".to_owned(), "other".to_owned())]
        );
        assert!(me.guard("s").await.unwrap().is_valid());
    }

    /// Issue 12: a restarted worker took "its own" leases back at once, and two live processes
    /// given one worker id took them from each other every round. A new incarnation is another
    /// owner: it waits for the lease to be released or to expire, and reports a same-id
    /// process it sees renewing.
    #[tokio::test(start_paused = true)]
    async fn a_new_incarnation_of_a_worker_id_waits_for_its_former_leases_to_expire() {
        let store: Arc<dyn LeaseStore> = Arc::new(MemoryLeaseStore::new());
        store
            .create_if_absent(&Lease::new("s", vec![]))
            .await
            .unwrap();
        let clock = WallClock::following_runtime(0);
        let first = LeaseManager::new(
            Arc::clone(&store),
            ("me", "1"),
            Duration::from_secs(10),
            clock.clone(),
        );
        let free = store.get("s").await.unwrap().unwrap();
        assert_eq!(first.plan(&[&free], 1).await.take, ["s"]);
        let taken = first.take(&free).await.unwrap().expect("a free lease");
        assert!(first.owns(&taken));
        let second = LeaseManager::new(
            Arc::clone(&store),
            ("me", "2"),
            Duration::from_secs(10),
            clock,
        );
        assert!(!second.owns(&taken), "another incarnation is another owner");
        assert_eq!(
            second.plan(&[&taken], 1).await,
            Plan::default(),
            "not taken while the first may still write"
        );
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(first.renew_all_until(None).await, (vec![], 0));
        let renewed = store.get("s").await.unwrap().unwrap();
        assert_eq!(second.plan(&[&renewed], 1).await, Plan::default());
        assert_eq!(
            second.take_id_conflicts().await,
            ["s"],
            "a live process with the same worker id is reported"
        );
        assert!(second.take_id_conflicts().await.is_empty(), "once");
        // The first dies: a lease duration after its last renewal the second takes the lease.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(second.plan(&[&renewed], 1).await.take, ["s"]);
        assert!(second.take(&renewed).await.unwrap().is_some());
        // The first one's counter is stale now: its checkpoint is rejected.
        let err = first
            .checkpoint_with("s", || Some(ShardCheckpoint::shard_end()))
            .await
            .unwrap_err();
        assert!(matches!(err, LeaseError::LeaseLost { .. }), "{err:?}");
        assert_eq!(first.held_count().await, 0, "a lost lease is forgotten");
    }

    /// Issue 12: a write whose reply was lost (a timeout) left a stale counter, so the next
    /// write was refused: a spurious `LeaseLost`, and a lost take cost a lease duration. The
    /// lease is re-read and the write judged from it, as the KCL does.
    #[tokio::test(start_paused = true)]
    async fn a_write_whose_reply_was_lost_is_judged_from_the_lease_read_after_it() {
        for retried in [false, true] {
            let (scripted, store, me) = scripted(&["s"]).await;
            let free = store.get("s").await.unwrap().unwrap();
            scripted.lose_replies(1, retried);
            assert!(me.take(&free).await.unwrap().is_some(), "the take landed");
            scripted.lose_replies(1, retried);
            let (lost, _) = me.renew_all_until(None).await;
            assert!(lost.is_empty(), "the renewal landed");
            scripted.lose_replies(1, retried);
            let written = me
                .checkpoint_with("s", || Some(ShardCheckpoint::shard_end()))
                .await;
            assert!(written.is_ok(), "{written:?}");
            // And the counter is known: the next write goes through.
            let (lost, failed) = me.renew_all_until(None).await;
            assert_eq!((lost.len(), failed), (0, 0));
            assert_eq!(me.held_count().await, 1);

            // A write that did not land is tried again later; a real loss is still one.
            scripted.fail_updates(1);
            let (lost, failed) = me.renew_all_until(None).await;
            assert_eq!((lost.len(), failed), (0, 1));
            let mine = store.get("s").await.unwrap().unwrap();
            let thief = LeaseUpdate::Take {
                owner: "thief".into(),
            };
            store.update("s", mine.counter, &thief).await.unwrap();
            scripted.lose_replies(1, retried);
            let (lost, _) = me.renew_all_until(None).await;
            assert_eq!(lost, ["s"], "stolen");
            assert_eq!(me.held_count().await, 0);
        }
    }

    /// Found in review of the above: a write judged landed may be an earlier one that landed
    /// late, so the guard runs from the first unclear write's start, when other workers'
    /// expiry clocks may have started, not from the write that found it.
    #[tokio::test(start_paused = true)]
    async fn a_write_that_landed_late_extends_the_guard_from_its_own_start() {
        let (scripted, store, me) = scripted(&["s"]).await;
        take_free(&me, &store, "s").await;
        let renew = LeaseUpdate::Renew {
            owner: me.owner().into(),
        };

        // A renewal fails retryably at 0 s and lands late (the table applied it after the
        // worker read the lease): the next renewal, at 5 s, is refused and judged landed.
        let counter = store.get("s").await.unwrap().unwrap().counter;
        scripted.fail_updates(1);
        let (_, failed) = me.renew_all_until(None).await;
        assert_eq!(failed, 1);
        store.update("s", counter, &renew).await.unwrap();
        tokio::time::advance(Duration::from_secs(5)).await;
        let (lost, failed) = me.renew_all_until(None).await;
        assert_eq!(
            (lost.len(), failed),
            (0, 0),
            "the late write was this worker's"
        );
        let guard = me.guard("s").await.expect("held");
        tokio::time::advance(Duration::from_millis(5_100)).await;
        assert!(
            !guard.is_valid(),
            "the guard runs from the unclear write at 0 s, not 5 s"
        );
        let (lost, failed) = me.renew_all_until(None).await;
        assert_eq!((lost.len(), failed), (0, 0));
        assert!(guard.is_valid(), "renewed");

        // The refused retry of a take that landed: the take is this worker's.
        me.forget("s").await;
        let taken = store.get("s").await.unwrap().unwrap();
        scripted.lose_replies(1, true);
        assert!(me.take(&taken).await.unwrap().is_some(), "the take landed");
    }

    /// Found in review: the renewal a stop makes first went through every lease however slow
    /// the table, delaying the stop without bound.
    #[tokio::test(start_paused = true)]
    async fn renewals_start_no_later_than_their_deadline() {
        let keys: Vec<String> = (0..10).map(|i| format!("s{i}")).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let (scripted, store, me) = scripted(&keys).await;
        for key in &keys {
            take_free(&me, &store, key).await;
        }
        scripted.delay_updates(Duration::from_millis(100));
        let started = Instant::now();
        let (lost, failed) = me
            .renew_all_until(Some(started + Duration::from_millis(250)))
            .await;
        // Renewals start at 0, 100 and 200 ms; the third ends at 300 ms.
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        assert_eq!((lost.len(), failed), (0, 7));
        let (lost, failed) = me.renew_all_until(None).await;
        assert_eq!((lost.len(), failed), (0, 0));
        assert_eq!(started.elapsed(), Duration::from_millis(1_300));
    }

    #[tokio::test(start_paused = true)]
    async fn a_checkpoint_is_decided_only_once_the_write_before_it_is_done() {
        use std::sync::atomic::{AtomicBool, Ordering};

        let (scripted, store, me) = scripted(&["s"]).await;
        take_free(&me, &store, "s").await;
        let me = Arc::new(me);
        // A renewal waits on a table out of reach; a checkpoint is asked for meanwhile.
        scripted.block_updates(true);
        let renewing = tokio::spawn({
            let me = Arc::clone(&me);
            async move { me.renew_all_until(None).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let decided = Arc::new(AtomicBool::new(false));
        let checkpointing = tokio::spawn({
            let (me, decided) = (Arc::clone(&me), Arc::clone(&decided));
            async move {
                me.checkpoint_with("s", || {
                    decided.store(true, Ordering::SeqCst);
                    Some(ShardCheckpoint::shard_end())
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !decided.load(Ordering::SeqCst),
            "decided while an earlier write was under way"
        );
        scripted.block_updates(false);
        renewing.await.unwrap();
        let written = checkpointing.await.unwrap().unwrap();
        assert!(decided.load(Ordering::SeqCst));
        assert_eq!(written, Some(ShardCheckpoint::shard_end()));
        let lease = store.get("s").await.unwrap().unwrap();
        assert_eq!(lease.checkpoint, ShardCheckpoint::shard_end());
    }
}
