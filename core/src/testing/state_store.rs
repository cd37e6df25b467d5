//! The state store conformance suite: puts replace and are read back whole, deletes are
//! idempotent, lists see exactly one shard's prefix.

use crate::lease::LeaseEpoch;
use crate::state_store::{part_name, shard_prefix, StateStore};

/// Runs every check against stores made by `make` (a fresh, empty store per check).
///
/// # Panics
/// On the first check the store fails, naming it.
pub async fn state_store_conformance<S, F, Fut>(make: F)
where
    S: StateStore,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = S>,
{
    let prefix = shard_prefix("conformance", "events:1764547200:shardId-000000000000");
    let other = shard_prefix("conformance", "events:1764547200:shardId-000000000001");
    let life = LeaseEpoch::new(1_764_547_200_000, 3);
    let name = |epoch, worker| part_name(&prefix, life, epoch, "count", worker);

    // Absent objects read as None and delete without error.
    let store = make().await;
    assert_eq!(
        store.get(&name(1, 0)).await.expect("get"),
        None,
        "absent object"
    );
    store
        .delete(&name(1, 0))
        .await
        .expect("delete of an absent object");
    assert!(store.list(&prefix).await.expect("list").is_empty());

    // A put is read back byte for byte, binary and empty ones too; a second put replaces it.
    let store = make().await;
    let bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    store.put(&name(1, 0), &bytes).await.expect("put");
    assert_eq!(store.get(&name(1, 0)).await.expect("get"), Some(bytes));
    store.put(&name(1, 0), b"second").await.expect("put again");
    assert_eq!(
        store.get(&name(1, 0)).await.expect("get"),
        Some(b"second".to_vec()),
        "a put replaces the object"
    );
    store.put(&name(1, 1), b"").await.expect("put empty");
    assert_eq!(store.get(&name(1, 1)).await.expect("get"), Some(Vec::new()));

    // A list sees the objects under its prefix only, sorted; a delete removes one.
    let store = make().await;
    store.put(&name(2, 1), b"b").await.expect("put");
    store.put(&name(2, 0), b"a").await.expect("put");
    let elsewhere = part_name(&other, life, 2, "count", 0);
    store.put(&elsewhere, b"c").await.expect("put");
    assert_eq!(
        store.list(&prefix).await.expect("list"),
        vec![name(2, 0), name(2, 1)],
        "a list holds exactly the prefix's objects, sorted"
    );
    store.delete(&name(2, 0)).await.expect("delete");
    assert_eq!(store.get(&name(2, 0)).await.expect("get"), None, "deleted");
    assert_eq!(store.list(&prefix).await.expect("list"), vec![name(2, 1)]);
    assert_eq!(
        store.get(&elsewhere).await.expect("get"),
        Some(b"c".to_vec()),
        "another shard's object is untouched"
    );
}
