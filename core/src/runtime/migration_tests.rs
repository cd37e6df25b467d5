//! The lease manager against tables written before stream-qualified keys, and tables holding an
//! earlier creation of the stream or other streams (`protocol::lease_keys`).

use std::sync::Arc;
use std::time::Duration;

use crate::clock::WallClock;
use crate::lease::{
    CheckpointPosition, Lease, LeaseStore, LeaseUpdate, MemoryLeaseStore, ShardCheckpoint,
};
use crate::position::{RecordPosition, SequenceNumber, ShardId, ShardInfo};
use crate::protocol::lease_keys::{is_tombstone, StreamScope};
use crate::protocol::shard_sync::{leases_to_create, processable};

use super::leases::{LeaseManager, Tidied};

const LEASE: Duration = Duration::from_secs(10);

fn shard(id: &str, parents: &[&str]) -> ShardInfo {
    ShardInfo {
        id: ShardId::new(id),
        parents: parents.iter().map(|p| ShardId::new(*p)).collect(),
        hash_key_range: (0, u128::MAX),
        closed: false,
    }
}

fn at(sequence: u128) -> ShardCheckpoint {
    let position = CheckpointPosition::At(RecordPosition::new(SequenceNumber::from_u128(sequence)));
    ShardCheckpoint {
        committed: position.clone(),
        rebuild_from: position,
        ..ShardCheckpoint::initial()
    }
}

/// Worker `me` of stream `s` created at 7 s, on `table`.
fn me(table: &Arc<MemoryLeaseStore>) -> LeaseManager {
    let store: Arc<dyn LeaseStore> = Arc::clone(table) as Arc<dyn LeaseStore>;
    let me = LeaseManager::new(store, ("me", "1"), LEASE, WallClock::following_runtime(0));
    me.enter_scope(StreamScope::new("s", 7));
    me
}

/// A lease as an older shardflow left it: keyed by shard id, progress `checkpoint`, `owner`.
async fn legacy(
    table: &MemoryLeaseStore,
    shard: &str,
    parents: &[&str],
    checkpoint: ShardCheckpoint,
    owner: Option<&str>,
) {
    let parents = parents.iter().map(|p| (*p).to_owned()).collect();
    table
        .create_if_absent(&Lease::new(shard, parents))
        .await
        .unwrap();
    let checkpointer = "old#1".to_owned();
    let take = LeaseUpdate::Take {
        owner: checkpointer.clone(),
    };
    table.update(shard, 0, &take).await.unwrap();
    let save = LeaseUpdate::Checkpoint {
        owner: checkpointer.clone(),
        checkpoint,
    };
    table.update(shard, 1, &save).await.unwrap();
    if owner.is_none() {
        let release = LeaseUpdate::Release {
            owner: checkpointer,
        };
        table.update(shard, 2, &release).await.unwrap();
    }
}

fn keys(leases: &[Lease]) -> Vec<&str> {
    leases.iter().map(|l| l.key.as_str()).collect()
}

#[tokio::test(start_paused = true)]
async fn free_legacy_leases_move_with_their_progress_parents_first() {
    let table = Arc::new(MemoryLeaseStore::new());
    legacy(&table, "shard-0", &[], ShardCheckpoint::shard_end(), None).await;
    legacy(&table, "shard-1", &["shard-0"], at(42), None).await;
    let me = me(&table);
    let shards = [shard("shard-0", &[]), shard("shard-1", &["shard-0"])];

    // The parent moves; its child waits a round, and nothing new is created meanwhile.
    let first = me.sync(&shards).await.unwrap();
    assert_eq!(
        first,
        Tidied {
            moved: 1,
            deleted: 0,
            waiting: 1,
            newer: None,
        }
    );
    assert_eq!(
        keys(&table.list().await.unwrap()),
        ["s:7:shard-0", "shard-0", "shard-1"]
    );
    let second = me.sync(&shards).await.unwrap();
    assert_eq!(second.moved, 1);
    assert_eq!(second.waiting, 0);

    let all = table.list().await.unwrap();
    assert_eq!(
        keys(&all),
        ["s:7:shard-0", "s:7:shard-1", "shard-0", "shard-1"]
    );
    // The shard-id leases stay as tombstones: an old worker still running reads them as
    // finished shards with leases, so it neither processes them nor makes fresh leases.
    assert!(all[2..].iter().all(is_tombstone), "{all:?}");
    assert!(leases_to_create(&shards, &all).is_empty());
    assert!(processable(&all)
        .iter()
        .all(|l| !shards.iter().any(|s| s.id.as_str() == l.key)));
    let stored = &all[..2];
    // Tombstones are left alone from then on (not buried again each round).
    let third = me.sync(&shards).await.unwrap();
    assert_eq!((third.moved, third.deleted, third.waiting), (0, 0, 0));
    assert_eq!(table.list().await.unwrap(), all);
    assert!(stored[0].checkpoint.is_shard_end());
    assert_eq!(
        stored[1].checkpoint,
        at(42),
        "progress moves with the lease"
    );
    assert_eq!(
        stored[1].parents,
        ["s:7:shard-0"],
        "parents name scoped keys"
    );
    assert!(
        stored.iter().all(|l| l.owner.is_none()),
        "moved leases are free"
    );
    // Counters carry over (3 writes of the old worker, then the move's take): the next owner's
    // epoch is above every epoch a fencing sink stored for this shard.
    assert!(stored.iter().all(|l| l.counter == 4), "{stored:?}");
    // The runtime sees them by shard id.
    let seen = me.list().await.unwrap();
    assert_eq!(keys(&seen), ["shard-0", "shard-1"]);
    assert_eq!(seen[1].parents, ["shard-0"]);
}

#[tokio::test(start_paused = true)]
async fn a_legacy_lease_a_live_worker_holds_is_waited_out_and_no_fresh_lease_is_made() {
    let table = Arc::new(MemoryLeaseStore::new());
    legacy(&table, "shard-0", &[], at(42), Some("old#1")).await;
    let me = me(&table);
    let shards = [shard("shard-0", &[]), shard("shard-9", &[])];
    let renew = LeaseUpdate::Renew {
        owner: "old#1".into(),
    };
    for round in 0..3 {
        let tidied = me.sync(&shards).await.unwrap();
        assert_eq!(tidied.waiting, 1, "round {round}");
        assert_eq!(
            keys(&table.list().await.unwrap()),
            ["shard-0"],
            "round {round}"
        );
        // The old worker renews within every lease duration.
        let counter = table.get("shard-0").await.unwrap().unwrap().counter;
        table.update("shard-0", counter, &renew).await.unwrap();
        tokio::time::advance(LEASE / 2).await;
    }
    // It stops renewing (killed): once its lease expired by this worker's clock, it moves.
    me.sync(&shards).await.unwrap();
    tokio::time::advance(LEASE).await;
    let tidied = me.sync(&shards).await.unwrap();
    assert_eq!((tidied.moved, tidied.waiting), (1, 0));
    let stored = table.list().await.unwrap();
    assert_eq!(keys(&stored), ["s:7:shard-0", "s:7:shard-9", "shard-0"]);
    assert!(is_tombstone(&stored[2]));
    assert_eq!(stored[0].checkpoint, at(42));
    assert_eq!(stored[1].checkpoint, ShardCheckpoint::initial());
}

#[tokio::test(start_paused = true)]
async fn a_move_cut_short_is_finished_and_the_copy_is_never_overwritten() {
    let table = Arc::new(MemoryLeaseStore::new());
    legacy(&table, "shard-0", &[], at(42), None).await;
    // An earlier run took it and copied it, then crashed before the delete; the copy then
    // moved on (checkpointed further by whoever took it).
    let crashed = LeaseUpdate::Take {
        owner: "me#0".into(),
    };
    let counter = table.get("shard-0").await.unwrap().unwrap().counter;
    table.update("shard-0", counter, &crashed).await.unwrap();
    let copy = Lease {
        checkpoint: at(50),
        ..Lease::new("s:7:shard-0", vec![])
    };
    table.create_if_absent(&copy).await.unwrap();
    let me = me(&table);
    let shards = [shard("shard-0", &[])];
    // Held by the crashed process: waited out, then buried (never copied over the newer copy).
    assert_eq!(me.sync(&shards).await.unwrap().waiting, 1);
    tokio::time::advance(LEASE).await;
    let tidied = me.sync(&shards).await.unwrap();
    assert_eq!((tidied.moved, tidied.deleted, tidied.waiting), (0, 1, 0));
    let stored = table.list().await.unwrap();
    assert_eq!(keys(&stored), ["s:7:shard-0", "shard-0"]);
    assert!(is_tombstone(&stored[1]));
    assert_eq!(stored[0].checkpoint, at(50));
}

#[tokio::test(start_paused = true)]
async fn leases_of_an_earlier_creation_give_their_counter_and_go_and_other_streams_stay() {
    let table = Arc::new(MemoryLeaseStore::new());
    for key in ["s:3:shard-0", "t:7:shard-0", "1234:s:7:shard-0"] {
        table
            .create_if_absent(&Lease::new(key, vec![]))
            .await
            .unwrap();
    }
    // The old creation's shard-0 was taken and released a few times: counter 4.
    for counter in [0, 2] {
        let take = LeaseUpdate::Take {
            owner: "w#0".into(),
        };
        table.update("s:3:shard-0", counter, &take).await.unwrap();
        let release = LeaseUpdate::Release {
            owner: "w#0".into(),
        };
        table
            .update("s:3:shard-0", counter + 1, &release)
            .await
            .unwrap();
    }
    // Its shard-1 (gone from the new stream) is held by a live worker of the old creation.
    table
        .create_if_absent(&Lease::new("s:5:shard-1", vec![]))
        .await
        .unwrap();
    let held = LeaseUpdate::Take {
        owner: "w#1".into(),
    };
    table.update("s:5:shard-1", 0, &held).await.unwrap();
    let me = me(&table);
    let shards = [shard("shard-0", &[])];
    me.sync(&shards).await.unwrap();
    // The new shard-0 starts fresh, above the old one's counter, so that a fencing sink takes
    // its outputs; the old lease stays until then, and goes the round after.
    let seen = me.list().await.unwrap();
    assert_eq!(keys(&seen), ["shard-0"]);
    assert_eq!(seen[0].checkpoint, ShardCheckpoint::initial());
    assert_eq!(seen[0].counter, 4);
    let tidied = me.sync(&shards).await.unwrap();
    assert_eq!((tidied.deleted, tidied.waiting), (1, 0));
    assert_eq!(
        keys(&table.list().await.unwrap()),
        [
            "1234:s:7:shard-0",
            "s:5:shard-1",
            "s:7:shard-0",
            "t:7:shard-0"
        ]
    );
    // The held one of a shard id the new stream does not have (yet) stays, holder or not: a
    // later shard-1 of the new stream starts above its counter. Other streams' items stay.
    tokio::time::advance(LEASE).await;
    me.sync(&shards).await.unwrap();
    assert_eq!(
        keys(&table.list().await.unwrap()),
        [
            "1234:s:7:shard-0",
            "s:5:shard-1",
            "s:7:shard-0",
            "t:7:shard-0"
        ]
    );
    let resharded = [shard("shard-0", &[]), shard("shard-1", &[])];
    me.sync(&resharded).await.unwrap();
    let seen = me.list().await.unwrap();
    assert_eq!(seen[1].counter, 1, "above the old shard-1's take");
    me.sync(&resharded).await.unwrap();
    assert_eq!(
        keys(&table.list().await.unwrap()),
        [
            "1234:s:7:shard-0",
            "s:7:shard-0",
            "s:7:shard-1",
            "t:7:shard-0"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_lease_of_a_later_creation_says_the_stream_was_created_again() {
    let table = Arc::new(MemoryLeaseStore::new());
    table
        .create_if_absent(&Lease::new("s:9:shard-0", vec![]))
        .await
        .unwrap();
    let me = me(&table);
    let tidied = me.sync(&[shard("shard-0", &[])]).await.unwrap();
    assert_eq!(tidied.newer, Some(9));
    assert_eq!(
        keys(&table.list().await.unwrap()),
        ["s:9:shard-0"],
        "nothing made under the old creation's keys"
    );
}
