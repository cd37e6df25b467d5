//! Lease keys that name the stream and its creation, `<stream>:<creation epoch seconds>:<shard
//! id>` (the KCL's multi-stream form without the account), and what a worker does with the other
//! items of its table, as pure decisions.
//!
//! Kinesis reuses shard ids when a stream is deleted and created again under its name. A lease
//! keyed by shard id alone would then carry the old stream's checkpoint (a sequence number the
//! new shard never had: every read fails) or its `SHARD_END` (the new shard is never read).
//! With the creation time in the key, the new stream's shards get leases of their own, and one
//! table can hold several streams' leases.
//!
//! A worker reads and writes only the leases of its stream's current creation ([`StreamScope`]).
//! The other items it may find are classified by [`StreamScope::classify`]:
//! - **legacy** leases, keyed by shard id alone (written before stream-qualified keys) or under
//!   creation 0 (by a worker whose source could not tell the creation): each is moved to its
//!   scoped key, progress and counter included, once no live worker holds it
//!   ([`migration_step`]); until every one is moved, no new lease is created, so a shard never
//!   gets a fresh lease beside the legacy one that holds its progress;
//! - **stale** leases of an earlier creation of the same stream: their records went with the
//!   old stream, so they are deleted once no live worker holds them and the new stream's lease
//!   of the same shard id exists (it starts above their counters, see [`inherited_counter`]);
//!   a shard id the new stream never reuses keeps its stale lease, a small item;
//! - leases of a **newer** creation: the stream was created again during this run;
//! - leases of **other streams**, and items of other forms: left alone.
//!
//! A new lease starts at the highest counter any earlier lease of its shard id had in the
//! table, so that its first take's epoch is above every epoch a fencing sink stored for the
//! old shard's outputs (the same output identities: a running aggregate's, say).

use crate::lease::Lease;

/// The part of a lease table that belongs to one creation of one stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamScope {
    stream: String,
    created_secs: i64,
    prefix: String,
}

/// What a lease table item is to the worker of a [`StreamScope`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind<'a> {
    /// A lease of this scope, for this shard id.
    Scoped(&'a str),
    /// A lease of this stream whose creation was not known when it was written: keyed by shard
    /// id alone (before stream-qualified keys), or under creation 0 by a worker whose source
    /// could not tell it. Its progress is this shard's, moved to the scoped key.
    Legacy(&'a str),
    /// A lease of an earlier creation of this stream, for this shard id.
    Stale(&'a str),
    /// A lease of a later creation of this stream: it was created again since this worker
    /// entered its scope.
    Newer(i64),
    /// A lease of another stream, or an item of another form with a `:` in its key (a KCL
    /// multi-stream lease): not this worker's to touch.
    Foreign,
}

impl StreamScope {
    /// The scope of `stream` as created at `created_secs` (seconds since the Unix epoch; 0 for a
    /// source that cannot tell, which then cannot tell a recreated stream either).
    pub fn new(stream: &str, created_secs: i64) -> Self {
        Self {
            stream: stream.to_owned(),
            created_secs,
            prefix: format!("{stream}:{created_secs}:"),
        }
    }

    /// The stream's creation time this scope stands for.
    pub const fn created_secs(&self) -> i64 {
        self.created_secs
    }

    /// The lease key of `shard` in this scope.
    pub fn key(&self, shard: &str) -> String {
        format!("{}{shard}", self.prefix)
    }

    /// The shard id of a key of this scope, or `None` for any other key.
    pub fn shard_of<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(&self.prefix)
    }

    /// What `key` is to this scope (see the module documentation).
    pub fn classify<'a>(&self, key: &'a str) -> KeyKind<'a> {
        if let Some(shard) = self.shard_of(key) {
            return KeyKind::Scoped(shard);
        }
        if !key.contains(':') {
            return KeyKind::Legacy(key);
        }
        match parse(key) {
            Some((stream, created, shard)) if stream == self.stream => {
                if created == 0 {
                    KeyKind::Legacy(shard)
                } else if created < self.created_secs {
                    KeyKind::Stale(shard)
                } else if self.created_secs == 0 {
                    // This worker's source cannot tell the creation; another's could.
                    KeyKind::Foreign
                } else {
                    KeyKind::Newer(created)
                }
            }
            _ => KeyKind::Foreign,
        }
    }
}

/// The stream, creation time and shard id of a stream-qualified key; `None` for a key of
/// another form (a legacy one: Kinesis shard ids and stream names never hold `:`).
pub fn parse(key: &str) -> Option<(&str, i64, &str)> {
    let (stream, rest) = key.split_once(':')?;
    let (created, shard) = rest.split_once(':')?;
    let created = created.parse().ok()?;
    (!stream.is_empty() && !shard.is_empty()).then_some((stream, created, shard))
}

/// The shard id in a lease key of either form (for tools that show or look up shards).
pub fn shard_id(key: &str) -> &str {
    parse(key).map_or(key, |(_, _, shard)| shard)
}

/// The counter a new lease of `shard` starts at: the highest any legacy or stale lease of
/// the same shard id in `table` has (0 if none), under `scope`.
pub fn inherited_counter(scope: &StreamScope, table: &[Lease], shard: &str) -> u64 {
    table
        .iter()
        .filter(|l| match scope.classify(&l.key) {
            KeyKind::Legacy(s) | KeyKind::Stale(s) | KeyKind::Scoped(s) => s == shard,
            KeyKind::Newer(_) | KeyKind::Foreign => false,
        })
        .map(|l| l.counter)
        .max()
        .unwrap_or(0)
}

/// What this worker knows of a legacy or stale lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Foreigner<'a> {
    /// The lease as read.
    pub lease: &'a Lease,
    /// Whether its shard's scoped lease exists already (a move got that far, or the new
    /// stream's lease of the same shard id was made, inheriting its counter).
    pub moved: bool,
    /// Whether a parent of its shard still waits as a legacy lease (a legacy lease only).
    pub parent_waits: bool,
    /// Whether another worker's hold on it expired by this worker's clock.
    pub expired: bool,
    /// Whether this process holds it (it took it to move it, and the burial did not land), or
    /// a burial began ([`MOVED_OWNER`] without `SHARD_END`).
    pub mine: bool,
}

/// The owner of a legacy lease whose progress moved to its scoped key: at `SHARD_END` it is a
/// tombstone. A shardflow of the old form that still runs reads it as a finished shard with a
/// lease, so it neither processes the shard nor makes it a fresh lease, as it would if the
/// lease were gone. Tombstones stay (one small item per shard that moved).
pub const MOVED_OWNER: &str = "shardflow-moved";

/// Whether `lease` is the tombstone of a moved legacy lease ([`MOVED_OWNER`]).
pub fn is_tombstone(lease: &Lease) -> bool {
    lease.owner.as_deref() == Some(MOVED_OWNER) && lease.checkpoint.is_shard_end()
}

/// What to do with a legacy or stale lease this round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationStep {
    /// Take it (fencing any writer of the old form), copy it to its scoped key, and leave it
    /// a tombstone.
    Move,
    /// Leave it a tombstone: its progress lives on under the scoped key (a move that did not
    /// finish).
    Bury,
    /// Delete it: it is of an earlier creation of the stream.
    Delete,
    /// Leave it this round: a live worker holds it (an older shardflow still running), or a
    /// parent must move first so that children never start before their parents end.
    Wait,
}

/// The step for a legacy lease (`stale` false, not a tombstone) or a stale one (`stale` true).
/// A lease is free when nobody owns it and nobody asked for it; a worker of the old form that
/// still renews it is waited out (stop old workers before starting new ones; see
/// `docs/design.md`).
pub fn migration_step(item: &Foreigner<'_>, stale: bool) -> MigrationStep {
    let free = item.lease.owner.is_none() && item.lease.handoff_to.is_none();
    let unheld = free || item.expired || item.mine;
    match (stale, item.moved, item.parent_waits) {
        _ if !unheld => MigrationStep::Wait,
        (true, true, _) => MigrationStep::Delete,
        (false, true, _) => MigrationStep::Bury,
        (true, false, _) | (false, false, true) => MigrationStep::Wait,
        (false, false, false) => MigrationStep::Move,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_stream_its_creation_and_the_shard() {
        let scope = StreamScope::new("clicks", 1_700_000_000);
        let key = scope.key("shardId-000000000003");
        assert_eq!(key, "clicks:1700000000:shardId-000000000003");
        assert_eq!(scope.shard_of(&key), Some("shardId-000000000003"));
        assert_eq!(shard_id(&key), "shardId-000000000003");
        assert_eq!(shard_id("shardId-000000000003"), "shardId-000000000003");
        assert_eq!(
            scope.classify(&key),
            KeyKind::Scoped("shardId-000000000003")
        );
        assert_eq!(scope.classify("shard-0"), KeyKind::Legacy("shard-0"));
        assert_eq!(
            scope.classify("clicks:0:shard-0"),
            KeyKind::Legacy("shard-0")
        );
        assert_eq!(
            scope.classify("clicks:1600000000:shard-0"),
            KeyKind::Stale("shard-0")
        );
        assert_eq!(
            scope.classify("clicks:1800000000:shard-0"),
            KeyKind::Newer(1_800_000_000)
        );
        // Other streams are not ours, nor a KCL multi-stream key (account:stream:epoch:shard).
        assert_eq!(scope.classify("views:1700000000:shard-0"), KeyKind::Foreign);
        assert_eq!(
            scope.classify("123456789012:clicks:1700000000:shard-0"),
            KeyKind::Foreign
        );
        // A worker whose source cannot tell the creation sees other creations as foreign.
        let unknown = StreamScope::new("clicks", 0);
        assert_eq!(unknown.classify(&key), KeyKind::Foreign);
        assert_eq!(unknown.classify("shard-0"), KeyKind::Legacy("shard-0"));
        // A stream whose name is a prefix of another's owns none of its keys.
        assert_eq!(
            StreamScope::new("click", 1_700_000_000).classify(&key),
            KeyKind::Foreign
        );
    }

    fn item(lease: &Lease) -> Foreigner<'_> {
        Foreigner {
            lease,
            moved: false,
            parent_waits: false,
            expired: false,
            mine: false,
        }
    }

    #[test]
    fn a_free_legacy_lease_moves_and_a_held_one_waits_for_its_owner() {
        let free = Lease::new("shard-0", vec![]);
        assert_eq!(migration_step(&item(&free), false), MigrationStep::Move);
        let held = Lease {
            owner: Some("old#1".into()),
            ..free.clone()
        };
        assert_eq!(migration_step(&item(&held), false), MigrationStep::Wait);
        let expired = Foreigner {
            expired: true,
            ..item(&held)
        };
        assert_eq!(migration_step(&expired, false), MigrationStep::Move);
        let asked = Lease {
            handoff_to: Some("old#2".into()),
            ..free
        };
        assert_eq!(migration_step(&item(&asked), false), MigrationStep::Wait);
    }

    #[test]
    fn children_wait_for_their_parents_and_a_half_done_move_is_finished() {
        let child = Lease::new("shard-2", vec!["shard-0".into()]);
        let waits = Foreigner {
            parent_waits: true,
            ..item(&child)
        };
        assert_eq!(migration_step(&waits, false), MigrationStep::Wait);
        let mine = Lease {
            owner: Some("me#1".into()),
            ..child.clone()
        };
        let half_done = Foreigner {
            moved: true,
            mine: true,
            ..item(&mine)
        };
        assert_eq!(migration_step(&half_done, false), MigrationStep::Bury);
        // Moved, but an old worker holds the legacy lease again: wait it out.
        let retaken = Foreigner {
            moved: true,
            ..item(&mine)
        };
        assert_eq!(migration_step(&retaken, false), MigrationStep::Wait);
    }

    #[test]
    fn stale_leases_are_deleted_once_nobody_holds_them_and_the_new_lease_exists() {
        let stale = Lease::new("clicks:1:shard-0", vec![]);
        let replaced = Foreigner {
            moved: true,
            ..item(&stale)
        };
        assert_eq!(migration_step(&replaced, true), MigrationStep::Delete);
        // Its counter is needed until the new lease exists (`inherited_counter`).
        assert_eq!(migration_step(&item(&stale), true), MigrationStep::Wait);
        let held = Lease {
            owner: Some("w#1".into()),
            ..stale.clone()
        };
        let held = Foreigner {
            moved: true,
            ..item(&held)
        };
        assert_eq!(migration_step(&held, true), MigrationStep::Wait);
    }

    #[test]
    fn new_leases_start_above_every_earlier_lease_of_their_shard_id() {
        let scope = StreamScope::new("clicks", 20);
        let lease = |key: &str, counter: u64| Lease {
            counter,
            ..Lease::new(key, vec![])
        };
        let table = [
            lease("shard-0", 7),
            lease("clicks:10:shard-0", 900),
            lease("clicks:10:shard-1", 5_000),
            lease("views:10:shard-0", 9_999),
        ];
        assert_eq!(inherited_counter(&scope, &table, "shard-0"), 900);
        assert_eq!(inherited_counter(&scope, &table, "shard-2"), 0);
    }
}
