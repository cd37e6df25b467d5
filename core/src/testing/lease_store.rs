//! The lease store conformance suite: the semantics the lease protocol relies on.

use std::sync::Arc;

use crate::error::LeaseError;
use crate::lease::{
    CheckpointPosition, Lease, LeaseStore, LeaseUpdate, ShardCheckpoint, WatermarkAdvance,
};
use crate::position::{RecordPosition, SequenceNumber};

/// Runs every check against stores made by `make` (a fresh, empty store per check).
///
/// # Panics
/// On the first check the store fails, naming it.
pub async fn lease_store_conformance<S, F, Fut>(make: F)
where
    S: LeaseStore,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = S>,
{
    create_is_idempotent_and_keeps_the_first(make().await).await;
    take_requires_the_counter_it_read(make().await).await;
    owner_updates_fail_with_lease_lost_after_a_steal(make().await).await;
    checkpoints_are_read_back_exactly(make().await).await;
    release_leaves_the_lease_unowned(make().await).await;
    a_handoff_request_is_stored_kept_by_the_owner_and_cleared_by_a_take(make().await).await;
    delete_is_conditional_on_the_counter(make().await).await;
    missing_leases_are_not_found(make().await).await;
    concurrent_takes_have_exactly_one_winner(Arc::new(make().await)).await;
    list_returns_every_lease_in_key_order(make().await).await;
    every_lease_carries_the_tables_generation(make().await).await;
}

/// Epochs are (table generation, counter): a store that forgot the generation on one path
/// would hand out epochs a recreated table's outputs fence.
async fn every_lease_carries_the_tables_generation(store: impl LeaseStore) {
    store
        .create_if_absent(&Lease::new("g", vec![]))
        .await
        .unwrap();
    let taken = store
        .update("g", 0, &LeaseUpdate::Take { owner: "w1".into() })
        .await
        .unwrap();
    let generation = taken.generation;
    assert!(
        generation > 0,
        "a table has a generation above 0 (the one of outputs written before generations)"
    );
    assert_eq!(taken.epoch(), crate::lease::LeaseEpoch::new(generation, 1));
    let read = store.get("g").await.unwrap().expect("lease");
    let listed = store.list().await.unwrap();
    assert_eq!(
        (
            read.generation,
            listed.iter().map(|l| l.generation).collect::<Vec<_>>()
        ),
        (generation, vec![generation]),
        "get and list read the generation the take saw"
    );
}

async fn a_handoff_request_is_stored_kept_by_the_owner_and_cleared_by_a_take(
    store: impl LeaseStore,
) {
    store
        .create_if_absent(&Lease::new("s", vec![]))
        .await
        .unwrap();
    let owner = "w1".to_owned();
    store
        .update(
            "s",
            0,
            &LeaseUpdate::Take {
                owner: owner.clone(),
            },
        )
        .await
        .unwrap();
    let ask = LeaseUpdate::RequestHandoff {
        requester: "w2".into(),
    };
    store.update("s", 1, &ask).await.unwrap();
    let read = store.get("s").await.unwrap().expect("lease");
    assert_eq!(
        (
            read.owner.as_deref(),
            read.handoff_to.as_deref(),
            read.counter
        ),
        (Some("w1"), Some("w2"), 2),
        "a request is stored and leaves the owner"
    );
    let renewed = store
        .update(
            "s",
            2,
            &LeaseUpdate::Renew {
                owner: owner.clone(),
            },
        )
        .await
        .unwrap();
    assert_eq!(renewed.handoff_to.as_deref(), Some("w2"));
    store
        .update("s", 3, &LeaseUpdate::Release { owner })
        .await
        .unwrap();
    let released = store.get("s").await.unwrap().expect("lease");
    assert_eq!(
        (released.owner, released.handoff_to.as_deref()),
        (None, Some("w2")),
        "a release leaves the lease to the requester"
    );
    let taken = store
        .update("s", 4, &LeaseUpdate::Take { owner: "w2".into() })
        .await
        .unwrap();
    assert_eq!(taken.handoff_to, None);
    assert_eq!(
        store.get("s").await.unwrap().expect("lease").handoff_to,
        None
    );
}

async fn create_is_idempotent_and_keeps_the_first(store: impl LeaseStore) {
    let first = Lease::new("shard-1", vec!["shard-0".into()]);
    assert!(
        store.create_if_absent(&first).await.unwrap(),
        "create of a new lease"
    );
    let second = Lease::new("shard-1", vec![]);
    assert!(
        !store.create_if_absent(&second).await.unwrap(),
        "create of an existing lease"
    );
    let got = store
        .get("shard-1")
        .await
        .unwrap()
        .expect("created lease is readable");
    // The generation is the table's, not the lease's.
    let first = Lease {
        generation: got.generation,
        ..first
    };
    assert_eq!(got, first, "an existing lease is not overwritten by create");
}

async fn take_requires_the_counter_it_read(store: impl LeaseStore) {
    store
        .create_if_absent(&Lease::new("s", vec![]))
        .await
        .unwrap();
    let taken = store
        .update("s", 0, &LeaseUpdate::Take { owner: "w1".into() })
        .await
        .unwrap();
    assert_eq!(taken.owner.as_deref(), Some("w1"));
    assert_eq!(taken.counter, 1);
    let stale = store
        .update("s", 0, &LeaseUpdate::Take { owner: "w2".into() })
        .await;
    assert!(
        matches!(stale, Err(LeaseError::ConditionFailed { .. })),
        "take with a stale counter must fail with ConditionFailed, got {stale:?}"
    );
    let stolen = store
        .update("s", 1, &LeaseUpdate::Take { owner: "w2".into() })
        .await
        .unwrap();
    assert_eq!(stolen.owner.as_deref(), Some("w2"));
    assert_eq!(stolen.owner_switches_since_checkpoint, 2);
}

async fn owner_updates_fail_with_lease_lost_after_a_steal(store: impl LeaseStore) {
    store
        .create_if_absent(&Lease::new("s", vec![]))
        .await
        .unwrap();
    store
        .update("s", 0, &LeaseUpdate::Take { owner: "w1".into() })
        .await
        .unwrap();
    store
        .update("s", 1, &LeaseUpdate::Take { owner: "w2".into() })
        .await
        .unwrap();
    for update in [
        LeaseUpdate::Renew { owner: "w1".into() },
        LeaseUpdate::Checkpoint {
            owner: "w1".into(),
            checkpoint: ShardCheckpoint::shard_end(),
        },
        LeaseUpdate::Release { owner: "w1".into() },
    ] {
        for counter in [1, 2] {
            let got = store.update("s", counter, &update).await;
            assert!(
                matches!(got, Err(LeaseError::LeaseLost { .. })),
                "{} by a former owner (counter {counter}) must be LeaseLost, got {got:?}",
                update.name()
            );
        }
    }
    let renewed = store
        .update("s", 2, &LeaseUpdate::Renew { owner: "w2".into() })
        .await
        .unwrap();
    assert_eq!(renewed.counter, 3);
    let stale = store
        .update("s", 2, &LeaseUpdate::Renew { owner: "w2".into() })
        .await;
    assert!(
        matches!(stale, Err(LeaseError::LeaseLost { .. })),
        "stale counter: {stale:?}"
    );
}

async fn checkpoints_are_read_back_exactly(store: impl LeaseStore) {
    store
        .create_if_absent(&Lease::new("s", vec![]))
        .await
        .unwrap();
    store
        .update("s", 0, &LeaseUpdate::Take { owner: "w".into() })
        .await
        .unwrap();
    let big =
        SequenceNumber::parse("49590338271490256608559692538361571095921575989136588898").unwrap();
    let checkpoint = ShardCheckpoint {
        committed: CheckpointPosition::At(RecordPosition::with_sub_sequence(big.clone(), 7)),
        committed_watermark: Some(-5),
        rebuild_from: CheckpointPosition::At(RecordPosition::new(SequenceNumber::from_u128(3))),
        rebuild_watermark: Some(i64::MIN),
        sinks: [
            (
                "s3://bucket/raw".to_owned(),
                CheckpointPosition::At(RecordPosition::with_sub_sequence(big.clone(), 3)),
            ),
            ("s3://bucket/other".to_owned(), CheckpointPosition::Initial),
        ]
        .into(),
        advances: vec![WatermarkAdvance {
            after: CheckpointPosition::At(RecordPosition::new(SequenceNumber::from_u128(5))),
            watermark: -3,
        }],
        // Every store keeps the snapshot a checkpoint names: a restart restores it.
        snapshot: Some(crate::lease::SnapshotRef {
            lease_epoch: crate::lease::LeaseEpoch::new(1_764_547_200_000, 2),
            epoch: 17,
            position: CheckpointPosition::At(RecordPosition::new(SequenceNumber::from_u128(3))),
            watermark: Some(i64::MIN),
            parts: vec![crate::lease::SnapshotPart {
                operator: "count per minute".into(),
                worker: 1,
                name: "t/events:1:shardId-0/1764547200000-2-17/count%20per%20minute/1".into(),
                keys: 12,
                bytes: 345,
            }],
        }),
    };
    let update = LeaseUpdate::Checkpoint {
        owner: "w".into(),
        checkpoint: checkpoint.clone(),
    };
    let written = store.update("s", 1, &update).await.unwrap();
    assert_eq!(written.checkpoint, checkpoint);
    assert_eq!(written.owner_switches_since_checkpoint, 0);
    let read = store.get("s").await.unwrap().unwrap();
    assert_eq!(read, written, "a checkpoint reads back exactly as written");

    // An operator's resets, once the worker let go: to a time, then to the trim horizon.
    store
        .update("s", 2, &LeaseUpdate::Release { owner: "w".into() })
        .await
        .unwrap();
    for (counter, reset) in (3..).zip([
        ShardCheckpoint::at_timestamp(1_764_000_000_123),
        ShardCheckpoint::trim_horizon(),
        ShardCheckpoint::initial(),
    ]) {
        let update = LeaseUpdate::Reset {
            checkpoint: reset.clone(),
        };
        let written = store.update("s", counter, &update).await.unwrap();
        assert_eq!(written.checkpoint, reset);
        let read = store.get("s").await.unwrap().unwrap();
        assert_eq!(read, written, "a reset checkpoint reads back exactly");
    }
}

async fn release_leaves_the_lease_unowned(store: impl LeaseStore) {
    store
        .create_if_absent(&Lease::new("s", vec![]))
        .await
        .unwrap();
    store
        .update("s", 0, &LeaseUpdate::Take { owner: "w".into() })
        .await
        .unwrap();
    let released = store
        .update("s", 1, &LeaseUpdate::Release { owner: "w".into() })
        .await
        .unwrap();
    assert_eq!(released.owner, None);
    assert_eq!(store.get("s").await.unwrap().unwrap().owner, None);
    let retaken = store
        .update("s", 2, &LeaseUpdate::Take { owner: "x".into() })
        .await
        .unwrap();
    assert_eq!(retaken.owner.as_deref(), Some("x"));
}

async fn delete_is_conditional_on_the_counter(store: impl LeaseStore) {
    store
        .create_if_absent(&Lease::new("s", vec![]))
        .await
        .unwrap();
    store
        .update("s", 0, &LeaseUpdate::Take { owner: "w".into() })
        .await
        .unwrap();
    let stale = store.delete("s", 0).await;
    assert!(
        matches!(stale, Err(LeaseError::ConditionFailed { .. })),
        "got {stale:?}"
    );
    store.delete("s", 1).await.unwrap();
    assert_eq!(store.get("s").await.unwrap(), None);
}

async fn missing_leases_are_not_found(store: impl LeaseStore) {
    assert_eq!(store.get("nope").await.unwrap(), None);
    let got = store
        .update("nope", 0, &LeaseUpdate::Take { owner: "w".into() })
        .await;
    assert!(
        matches!(got, Err(LeaseError::NotFound { .. })),
        "got {got:?}"
    );
    let got = store.delete("nope", 0).await;
    assert!(
        matches!(got, Err(LeaseError::NotFound { .. })),
        "got {got:?}"
    );
}

async fn concurrent_takes_have_exactly_one_winner<S: LeaseStore>(store: Arc<S>) {
    store
        .create_if_absent(&Lease::new("contended", vec![]))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let take = LeaseUpdate::Take {
                owner: format!("w{i}"),
            };
            store.update("contended", 0, &take).await
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.expect("take task") {
            Ok(lease) => winners.push(lease.owner),
            Err(LeaseError::ConditionFailed { .. }) => {}
            Err(other) => panic!("unexpected error from a contended take: {other:?}"),
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "exactly one of 8 concurrent takes wins, got {winners:?}"
    );
    let lease = store.get("contended").await.unwrap().unwrap();
    assert_eq!(lease.owner, winners[0]);
    assert_eq!(lease.counter, 1);
}

async fn list_returns_every_lease_in_key_order(store: impl LeaseStore) {
    for key in ["c", "a", "b"] {
        store
            .create_if_absent(&Lease::new(key, vec![]))
            .await
            .unwrap();
    }
    let keys: Vec<String> = store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.key)
        .collect();
    assert_eq!(keys, ["a", "b", "c"]);
}
