//! Lease balancing, as a pure decision: which leases a worker takes (free, expired, or handed
//! over to it) and which it asks busier workers to hand over, so that leases spread evenly when
//! workers join and no stealing storm happens (a bounded number per round, and only when it
//! strictly evens the spread). A live owner's lease is never taken outright: it is asked for
//! (`LeaseUpdate::RequestHandoff`), and the owner finishes what it has in flight, checkpoints
//! and releases it to the requester (the KCL 3.x model).

use std::collections::BTreeMap;

use crate::lease::Lease;

/// A lease as one worker sees it.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    /// The lease.
    pub lease: &'a Lease,
    /// Whether its counter has not moved for a lease duration by this worker's clock (so its
    /// owner, or the worker it was handed to, is presumed dead).
    pub expired: bool,
}

/// What a worker should do this round.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Leases to take, by key: handed over to this worker, free, or expired.
    pub take: Vec<String>,
    /// Leases of live, busier workers to ask for (graceful handoff), by key.
    pub request: Vec<String>,
}

/// Where a lease is going, for counting loads: its live owner, or the worker a handoff of it
/// was asked for (it is on its way there); `None` for a free or expired lease.
fn bound_for<'a>(o: &Observed<'a>) -> Option<&'a str> {
    if o.expired {
        return None;
    }
    o.lease.handoff_to.as_deref().or(o.lease.owner.as_deref())
}

/// Decides a round for worker `me` over the leases it may process (finished shards and children
/// whose parents are not done are left out by the caller).
///
/// Live workers are `me` and the workers unexpired leases are bound for (their owners, or the
/// requesters of pending handoffs). The target is the lease count over the live workers,
/// rounded up. `me` first takes the leases handed over to it; below the target, free and
/// expired leases (in key order); then it asks for at most `max_request` leases of the busiest
/// worker, and only while that worker holds at least two more than `me` would: each request
/// strictly evens the spread, so rounds converge and never swap leases back and forth. A lease
/// asked for counts for its requester at once, so a request is never repeated.
pub fn plan(me: &str, leases: &[Observed<'_>], max_request: usize) -> Plan {
    let mut load: BTreeMap<&str, usize> = BTreeMap::new();
    load.insert(me, 0);
    let mut free = Vec::new();
    let mut handed = Vec::new();
    for o in leases {
        let handed_to_me = o.lease.owner.is_none() && o.lease.handoff_to.as_deref() == Some(me);
        match bound_for(o) {
            _ if handed_to_me => handed.push(o.lease.key.as_str()),
            Some(worker) => *load.entry(worker).or_default() += 1,
            None => free.push(o.lease.key.as_str()),
        }
    }
    let workers = load.len();
    let target = leases.len().div_ceil(workers);
    let mut mine = load[me];
    let mut result = Plan::default();
    for key in handed {
        result.take.push(key.to_owned());
        mine += 1;
    }
    free.sort_unstable();
    for key in free {
        if mine >= target {
            break;
        }
        result.take.push(key.to_owned());
        mine += 1;
    }
    let mut requested = 0;
    while mine < target && requested < max_request {
        let Some((&victim, &count)) = load
            .iter()
            .filter(|(w, _)| **w != me)
            .max_by_key(|(w, c)| (**c, std::cmp::Reverse(**w)))
        else {
            break;
        };
        if count < mine + 2 {
            break;
        }
        // The victim's lease with the greatest key that no handoff is pending for:
        // deterministic, and spread over victims.
        let Some(key) = leases
            .iter()
            .filter(|o| !o.expired && o.lease.handoff_to.is_none())
            .filter(|o| o.lease.owner.as_deref() == Some(victim))
            .map(|o| o.lease.key.as_str())
            .filter(|k| !result.request.iter().any(|s| s == k))
            .max()
        else {
            break;
        };
        if cfg!(shardflow_mutation = "steal") {
            // A mutation check: the lease is taken from its live owner outright.
            result.take.push(key.to_owned());
        } else {
            result.request.push(key.to_owned());
        }
        *load.get_mut(victim).expect("victim is a worker") -= 1;
        mine += 1;
        requested += 1;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leases(owners: &[Option<&str>]) -> Vec<Lease> {
        owners
            .iter()
            .enumerate()
            .map(|(i, owner)| {
                let mut l = Lease::new(format!("shard-{i}"), vec![]);
                l.owner = owner.map(str::to_owned);
                l
            })
            .collect()
    }

    fn observe<'a>(leases: &'a [Lease], expired: &[&str]) -> Vec<Observed<'a>> {
        leases
            .iter()
            .map(|l| Observed {
                lease: l,
                expired: l.owner.as_deref().is_some_and(|o| expired.contains(&o)),
            })
            .collect()
    }

    #[test]
    fn a_lone_worker_takes_every_free_lease() {
        let l = leases(&[None, None, None]);
        let p = plan("a", &observe(&l, &[]), 1);
        assert_eq!(p.take, ["shard-0", "shard-1", "shard-2"]);
        assert!(p.request.is_empty());
    }

    #[test]
    fn a_joining_worker_asks_for_one_at_a_time_up_to_its_share() {
        let l = leases(&[Some("a"); 8]);
        let p = plan("b", &observe(&l, &[]), 1);
        assert!(p.take.is_empty());
        assert_eq!(p.request.len(), 1, "a bounded number per round");
    }

    #[test]
    fn expired_leases_are_taken_before_anything_is_asked_for() {
        let l = leases(&[Some("dead"), Some("dead"), Some("a"), Some("a")]);
        let p = plan("b", &observe(&l, &["dead"]), 1);
        assert_eq!(p.take, ["shard-0", "shard-1"]);
        assert!(
            p.request.is_empty(),
            "b has its share (2 of 4 over a and b)"
        );
    }

    #[test]
    fn a_lease_asked_for_counts_for_its_requester_and_is_taken_once_released() {
        let mut l = leases(&[Some("a"), Some("a"), Some("a"), Some("a")]);
        l[3].handoff_to = Some("b".into());
        // b asked for one already: it asks for one more (2 of 4), never for the same again.
        let p = plan("b", &observe(&l, &[]), 5);
        assert_eq!(p.request, ["shard-2"]);
        assert!(p.take.is_empty(), "a live owner's lease is never taken");
        // a sees shard-3 on its way to b: nothing for a to do.
        assert_eq!(plan("a", &observe(&l, &[]), 5), Plan::default());
        // a released it: b takes it; c waits (it is b's until it expires).
        l[3].owner = None;
        assert_eq!(plan("b", &observe(&l, &[]), 0).take, ["shard-3"]);
        let c = plan("c", &observe(&l, &[]), 0);
        assert!(!c.take.contains(&"shard-3".to_owned()), "{c:?}");
        // b never took it (b died): once the lease expired, anyone takes it.
        let expired: Vec<Observed<'_>> = l
            .iter()
            .map(|lease| Observed {
                lease,
                expired: lease.owner.is_none(),
            })
            .collect();
        assert_eq!(plan("c", &expired, 0).take, ["shard-3"]);
    }

    #[test]
    fn a_spread_within_one_is_left_alone() {
        let l = leases(&[
            Some("a"),
            Some("a"),
            Some("a"),
            Some("b"),
            Some("b"),
            Some("b"),
            Some("c"),
            Some("c"),
        ]);
        for me in ["a", "b", "c"] {
            assert_eq!(plan(me, &observe(&l, &[]), 5), Plan::default(), "{me}");
        }
    }

    #[test]
    fn three_three_one_evens_out_to_within_one() {
        let l = leases(&[
            Some("a"),
            Some("a"),
            Some("a"),
            Some("b"),
            Some("b"),
            Some("b"),
            Some("c"),
        ]);
        let p = plan("c", &observe(&l, &[]), 1);
        assert_eq!(p.request.len(), 1, "2 more than c would have: ask");
    }
}
