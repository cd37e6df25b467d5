//! Shard sync as pure decisions: which shards need a lease, and which finished parents' leases
//! can go, given the stream's shard list and the lease table.
//!
//! A parent's lease is deleted once it reached shard end and every child has started (been
//! taken at least once), as in the KCL. A shard whose descendant holds a lease is never given a
//! new one: its records were processed (or it was cleaned up) before that descendant began.
//! A child is processed only once every parent reached its end, which keeps per-key order
//! across resharding; each round a worker starts the leases `balance::plan` gives it and its
//! own leases from an earlier run.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use crate::lease::Lease;
use crate::position::{ShardId, ShardInfo};
use crate::protocol::balance::Plan;

/// Shards that need a new lease: no lease of their own and no descendant with a lease.
pub fn leases_to_create<'a>(shards: &'a [ShardInfo], leases: &[Lease]) -> Vec<&'a ShardInfo> {
    let leased: HashSet<&str> = leases.iter().map(|l| l.key.as_str()).collect();
    let children = children_of(shards);
    shards
        .iter()
        .filter(|s| !leased.contains(s.id.as_str()))
        .filter(|s| !has_leased_descendant(s.id.as_str(), &children, &leased))
        .collect()
}

/// Leases of shards that reached their end and whose every child (as the shard list says)
/// has a lease that was taken at least once. A shard with no listed children keeps its lease.
pub fn leases_to_clean<'a>(shards: &[ShardInfo], leases: &'a [Lease]) -> Vec<&'a Lease> {
    let by_key: HashMap<&str, &Lease> = leases.iter().map(|l| (l.key.as_str(), l)).collect();
    let children = children_of(shards);
    leases
        .iter()
        .filter(|l| l.checkpoint.is_shard_end())
        .filter(|l| {
            children.get(l.key.as_str()).is_some_and(|kids| {
                kids.iter()
                    .all(|k| by_key.get(k).is_some_and(|child| child.counter > 0))
            })
        })
        .collect()
}

/// Leases a worker may process: not finished, and every parent reached its end (or left no
/// lease), so per-key order holds across resharding.
pub fn processable(leases: &[Lease]) -> Vec<&Lease> {
    if cfg!(shardflow_mutation = "children_first") {
        // A mutation check: children start whatever their parents did.
        return leases
            .iter()
            .filter(|l| !l.checkpoint.is_shard_end())
            .collect();
    }
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

/// The leases worker `me` starts this round, in key order: those the plan takes, and its own
/// (a restart with the same worker id) unless it was asked to hand them over, among
/// `candidates` (the processable leases), of shards the stream lists, and not `busy` (running,
/// finishing, or done in this run: starting one again would replace progress whose last
/// reports are still in flight).
pub fn leases_to_start<'a>(
    me: &str,
    plan: &Plan,
    candidates: &[&'a Lease],
    shards: &[ShardInfo],
    busy: &BTreeSet<ShardId>,
) -> Vec<&'a Lease> {
    let mut keys: Vec<&str> = plan.take.iter().map(String::as_str).collect();
    keys.extend(
        candidates
            .iter()
            .filter(|l| l.owner.as_deref() == Some(me) && l.handoff_to.is_none())
            .map(|l| l.key.as_str()),
    );
    keys.sort_unstable();
    keys.dedup();
    keys.into_iter()
        .filter(|key| {
            shards
                .iter()
                .any(|s| s.id.as_str() == *key && !busy.contains(&s.id))
        })
        .filter_map(|key| candidates.iter().copied().find(|l| l.key == key))
        .collect()
}

/// Whether a shard sync that found no stream waits for it (tried again after a backoff) instead
/// of failing the run: only a continuous run that never listed the stream (a worker deployed
/// before its stream was created). A bounded run (a backfill) has nothing to wait for, and a
/// stream that vanished after it was listed is an error to see, not to sit out.
pub fn waits_for_missing_stream(listed_before: bool, bounded: bool) -> bool {
    !listed_before && !bounded
}

/// The wait before the `failures`-th retry of a failed shard sync: 250 ms doubling, at most
/// the sync interval.
pub fn retry_after(failures: u32, interval: Duration) -> Duration {
    Duration::from_millis(250)
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(interval)
}

fn children_of(shards: &[ShardInfo]) -> HashMap<&str, Vec<&str>> {
    let mut children: HashMap<&str, Vec<&str>> = HashMap::new();
    for shard in shards {
        for parent in &shard.parents {
            children
                .entry(parent.as_str())
                .or_default()
                .push(shard.id.as_str());
        }
    }
    children
}

fn has_leased_descendant(
    shard: &str,
    children: &HashMap<&str, Vec<&str>>,
    leased: &HashSet<&str>,
) -> bool {
    let mut stack: Vec<&str> = children.get(shard).cloned().unwrap_or_default();
    let mut seen = HashSet::new();
    while let Some(next) = stack.pop() {
        if !seen.insert(next) {
            continue;
        }
        if leased.contains(next) {
            return true;
        }
        stack.extend(children.get(next).into_iter().flatten());
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::ShardCheckpoint;
    use crate::position::ShardId;

    fn shard(id: &str, parents: &[&str]) -> ShardInfo {
        ShardInfo {
            id: ShardId::new(id),
            parents: parents.iter().map(|p| ShardId::new(*p)).collect(),
            hash_key_range: (0, u128::MAX),
            closed: false,
        }
    }

    fn lease(key: &str, counter: u64, ended: bool) -> Lease {
        let mut lease = Lease::new(key, vec![]);
        lease.counter = counter;
        if ended {
            lease.checkpoint = ShardCheckpoint::shard_end();
        }
        lease
    }

    fn keys<'a>(it: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
        let mut v: Vec<&str> = it.into_iter().collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn every_shard_gets_a_lease_on_a_fresh_table() {
        let shards = [shard("p", &[]), shard("a", &["p"]), shard("b", &["p"])];
        let create = leases_to_create(&shards, &[]);
        assert_eq!(keys(create.iter().map(|s| s.id.as_str())), ["a", "b", "p"]);
    }

    #[test]
    fn a_parent_is_cleaned_only_after_it_ended_and_every_child_started() {
        let shards = [shard("p", &[]), shard("a", &["p"]), shard("b", &["p"])];
        let not_ended = [
            lease("p", 5, false),
            lease("a", 1, false),
            lease("b", 1, false),
        ];
        assert!(leases_to_clean(&shards, &not_ended).is_empty());
        let one_child_waiting = [
            lease("p", 5, true),
            lease("a", 1, false),
            lease("b", 0, false),
        ];
        assert!(leases_to_clean(&shards, &one_child_waiting).is_empty());
        let child_missing = [lease("p", 5, true), lease("a", 1, false)];
        assert!(leases_to_clean(&shards, &child_missing).is_empty());
        let started = [
            lease("p", 5, true),
            lease("a", 1, false),
            lease("b", 3, false),
        ];
        let clean = leases_to_clean(&shards, &started);
        assert_eq!(keys(clean.iter().map(|l| l.key.as_str())), ["p"]);
    }

    #[test]
    fn an_ended_shard_without_listed_children_keeps_its_lease() {
        let shards = [shard("p", &[])];
        assert!(leases_to_clean(&shards, &[lease("p", 5, true)]).is_empty());
    }

    #[test]
    fn a_merge_parent_waits_for_the_child_that_waits_for_the_other_parent() {
        let shards = [shard("p", &[]), shard("q", &[]), shard("m", &["p", "q"])];
        let leases = [
            lease("p", 4, true),
            lease("q", 2, false),
            lease("m", 0, false),
        ];
        assert!(leases_to_clean(&shards, &leases).is_empty());
    }

    #[test]
    fn a_cleaned_parent_is_not_leased_again_even_after_its_children_were_cleaned() {
        // p split into a, b; a split into c, d. p and a were cleaned; b, c, d hold leases.
        let shards = [
            shard("p", &[]),
            shard("a", &["p"]),
            shard("b", &["p"]),
            shard("c", &["a"]),
            shard("d", &["a"]),
            shard("new", &["b"]),
        ];
        let leases = [
            lease("b", 2, true),
            lease("c", 1, false),
            lease("d", 1, false),
        ];
        let create = leases_to_create(&shards, &leases);
        assert_eq!(
            keys(create.iter().map(|s| s.id.as_str())),
            ["new"],
            "only the new child of b"
        );
    }
}
