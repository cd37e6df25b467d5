//! Lease balancing, as a pure decision: which leases a worker takes (free or expired) and which
//! it steals from busier workers, so that leases spread evenly when workers join and no stealing
//! storm happens (a bounded number per round, and only when it strictly evens the spread).

use std::collections::BTreeMap;

use crate::lease::Lease;

/// A lease as one worker sees it.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    /// The lease.
    pub lease: &'a Lease,
    /// Whether its counter has not moved for a lease duration by this worker's clock (so its
    /// owner is presumed dead).
    pub expired: bool,
}

/// What a worker should do this round.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Free or expired leases to take, by key.
    pub take: Vec<String>,
    /// Leases to steal from live, busier workers, by key.
    pub steal: Vec<String>,
}

/// Decides a round for worker `me` over the leases it may process (finished shards and children
/// whose parents are not done are left out by the caller).
///
/// Live workers are `me` and the owners of unexpired leases. The target is the lease count over
/// the live workers, rounded up. Below it, `me` takes free and expired leases first (in key
/// order), then steals at most `max_steal` leases from the busiest worker, and only while that
/// worker holds at least two more than `me` would: each steal strictly evens the spread, so
/// rounds converge and never swap leases back and forth.
pub fn plan(me: &str, leases: &[Observed<'_>], max_steal: usize) -> Plan {
    let mut load: BTreeMap<&str, usize> = BTreeMap::new();
    load.insert(me, 0);
    let mut free = Vec::new();
    for o in leases {
        match o.lease.owner.as_deref() {
            Some(owner) if owner == me => *load.entry(me).or_default() += 1,
            Some(owner) if !o.expired => *load.entry(owner).or_default() += 1,
            _ => free.push(o.lease.key.as_str()),
        }
    }
    let workers = load.len();
    let target = leases.len().div_ceil(workers);
    let mut mine = load[me];
    let mut result = Plan::default();
    free.sort_unstable();
    for key in free {
        if mine >= target {
            break;
        }
        result.take.push(key.to_owned());
        mine += 1;
    }
    let mut stolen = 0;
    while mine < target && stolen < max_steal {
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
        // The victim's lease with the greatest key: deterministic, and spread over victims.
        let Some(key) = leases
            .iter()
            .filter(|o| !o.expired && o.lease.owner.as_deref() == Some(victim))
            .map(|o| o.lease.key.as_str())
            .filter(|k| !result.steal.iter().any(|s| s == k))
            .max()
        else {
            break;
        };
        result.steal.push(key.to_owned());
        *load.get_mut(victim).expect("victim is a worker") -= 1;
        mine += 1;
        stolen += 1;
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
        assert!(p.steal.is_empty());
    }

    #[test]
    fn a_joining_worker_steals_one_at_a_time_up_to_its_share() {
        let l = leases(&[Some("a"); 8]);
        let p = plan("b", &observe(&l, &[]), 1);
        assert!(p.take.is_empty());
        assert_eq!(p.steal.len(), 1, "a bounded number per round");
    }

    #[test]
    fn expired_leases_are_taken_before_anything_is_stolen() {
        let l = leases(&[Some("dead"), Some("dead"), Some("a"), Some("a")]);
        let p = plan("b", &observe(&l, &["dead"]), 1);
        assert_eq!(p.take, ["shard-0", "shard-1"]);
        assert!(p.steal.is_empty(), "b has its share (2 of 4 over a and b)");
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
        assert_eq!(p.steal.len(), 1, "2 more than c would have: steal");
    }
}
