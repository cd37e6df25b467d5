//! Leases of shards the stream no longer lists, as a pure decision: which of them may be
//! deleted, so that the children they block start (the KCL cleans up such leases too).
//!
//! Kinesis lists a closed shard until its records expired (the retention period after it
//! closed), and a deleted stream's shards are gone with it. So a lease whose shard is missing
//! from a listing is either of a shard whose records are all gone, or the listing is wrong
//! (partial, or from a misconfigured source). Deleting it is safe only in the first case, and
//! two facts prove that case: the shard stayed missing from complete listings for at least the
//! stream's retention period (every record it could still hold expired meanwhile), or the
//! stream's creation time changed while it was missing (the stream was deleted and created
//! again: the old stream's records are gone). Without the stream's facts nothing is deleted.
//!
//! The absence clock is this worker's: a restart starts it again, which only delays a cleanup.

use std::collections::{BTreeMap, BTreeSet};

use crate::lease::Lease;
use crate::position::ShardInfo;
use crate::source::StreamFacts;

/// What this worker saw of each missing shard's lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Missing {
    /// When a complete listing first missed it (ms on the worker's monotonic clock).
    since_ms: i64,
    /// Whether the stream was created again since then.
    stream_recreated: bool,
}

/// The memory of missing shards across shard-sync rounds.
#[derive(Clone, Debug, Default)]
pub struct VanishedShards {
    missing: BTreeMap<String, Missing>,
    stream_created_ms: Option<i64>,
}

impl VanishedShards {
    /// Nothing seen yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes in one round's facts: `shards`, a complete and successful listing (never a
    /// partial one: an error is no listing), `leases` as read after it, `now_ms` on the
    /// worker's monotonic clock, and the stream's `facts` if the source could tell them. Returns the
    /// keys of the leases that may be deleted now, in key order.
    pub fn observe(
        &mut self,
        shards: &[ShardInfo],
        leases: &[Lease],
        now_ms: i64,
        facts: Option<StreamFacts>,
    ) -> Vec<String> {
        let listed: BTreeSet<&str> = shards.iter().map(|s| s.id.as_str()).collect();
        let missing_now: BTreeSet<&str> = leases
            .iter()
            .map(|l| l.key.as_str())
            .filter(|key| !listed.contains(key))
            .collect();
        // Listed again, or no lease any more: forgotten.
        self.missing
            .retain(|key, _| missing_now.contains(key.as_str()));
        let recreated = match (self.stream_created_ms, facts) {
            (Some(before), Some(now)) => before != now.created_ms,
            _ => false,
        };
        if let Some(facts) = facts {
            self.stream_created_ms = Some(facts.created_ms);
        }
        for key in &missing_now {
            let seen = self.missing.entry((*key).to_owned()).or_insert(Missing {
                since_ms: now_ms,
                stream_recreated: false,
            });
            seen.stream_recreated |= recreated;
        }
        let Some(facts) = facts else {
            return Vec::new();
        };
        let retention_ms = i64::try_from(facts.retention.as_millis()).unwrap_or(i64::MAX);
        self.missing
            .iter()
            .filter(|(_, m)| {
                m.stream_recreated || now_ms.saturating_sub(m.since_ms) >= retention_ms
            })
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Since when (ms) the shard of lease `key` has been missing, if it is.
    pub fn missing_since(&self, key: &str) -> Option<i64> {
        self.missing.get(key).map(|m| m.since_ms)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::position::ShardId;

    const HOUR: i64 = 3_600_000;

    fn shard(id: &str, parents: &[&str]) -> ShardInfo {
        ShardInfo {
            id: ShardId::new(id),
            parents: parents.iter().map(|p| ShardId::new(*p)).collect(),
            hash_key_range: (0, u128::MAX),
            closed: false,
        }
    }

    fn facts(created_ms: i64) -> Option<StreamFacts> {
        Some(StreamFacts {
            created_ms,
            retention: Duration::from_secs(24 * 3600),
        })
    }

    /// A parent whose lease never reached its end, and whose shard expired: its child is
    /// listed, the parent is not.
    fn leases() -> Vec<Lease> {
        vec![
            Lease::new("parent", vec![]),
            Lease::new("child", vec!["parent".into()]),
        ]
    }

    #[test]
    fn a_missing_shard_goes_after_the_retention_period_not_before() {
        let listing = [shard("child", &["parent"])];
        let mut vanished = VanishedShards::new();
        assert!(vanished
            .observe(&listing, &leases(), 0, facts(1))
            .is_empty());
        assert!(vanished
            .observe(&listing, &leases(), 24 * HOUR - 1, facts(1))
            .is_empty());
        assert_eq!(
            vanished.observe(&listing, &leases(), 24 * HOUR, facts(1)),
            ["parent"]
        );
    }

    #[test]
    fn a_shard_listed_again_starts_its_clock_again() {
        let without = [shard("child", &["parent"])];
        let with = [shard("parent", &[]), shard("child", &["parent"])];
        let mut vanished = VanishedShards::new();
        vanished.observe(&without, &leases(), 0, facts(1));
        // A listing that had it again: the earlier miss was a partial listing, not an expiry.
        vanished.observe(&with, &leases(), HOUR, facts(1));
        assert!(vanished
            .observe(&without, &leases(), 24 * HOUR, facts(1))
            .is_empty());
        assert_eq!(vanished.missing_since("parent"), Some(24 * HOUR));
    }

    #[test]
    fn a_recreated_stream_frees_its_missing_shards_at_once() {
        let listing = [shard("child", &["parent"])];
        let mut vanished = VanishedShards::new();
        vanished.observe(&listing, &leases(), 0, facts(1));
        assert_eq!(
            vanished.observe(&listing, &leases(), HOUR, facts(2)),
            ["parent"]
        );
        // Remembered in the rounds after, until the lease is gone.
        assert_eq!(
            vanished.observe(&listing, &leases(), HOUR + 1, facts(2)),
            ["parent"]
        );
        let after_delete = vec![Lease::new("child", vec!["parent".into()])];
        assert!(vanished
            .observe(&listing, &after_delete, HOUR + 2, facts(2))
            .is_empty());
        assert_eq!(vanished.missing_since("parent"), None);
    }

    #[test]
    fn without_the_streams_facts_nothing_is_deleted() {
        let listing = [shard("child", &["parent"])];
        let mut vanished = VanishedShards::new();
        vanished.observe(&listing, &leases(), 0, None);
        assert!(vanished
            .observe(&listing, &leases(), 1_000 * HOUR, None)
            .is_empty());
    }
}
