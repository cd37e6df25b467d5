//! `DynamoLeaseStore` passes the lease store conformance suite against dynalite (started by
//! scripts/test.sh), each check on a table of its own.

use shardflow_connectors::dynamodb::DynamoLeaseStore;
use shardflow_connectors::AwsConfig;
use shardflow_core::testing::lease_store_conformance;

async fn client() -> aws_sdk_dynamodb::Client {
    let var = "SHARDFLOW_DYNAMODB_ENDPOINT";
    let endpoint =
        std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run scripts/test.sh"));
    AwsConfig::emulator(endpoint).dynamodb_client().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dynamodb_lease_store_passes_the_conformance_suite() {
    let client = client().await;
    lease_store_conformance(|| {
        let client = client.clone();
        async move {
            let table = format!("leases-{}-{}", std::process::id(), rand::random::<u32>());
            DynamoLeaseStore::open(client, table).await.expect("table")
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_an_existing_table_keeps_its_leases() {
    use shardflow_core::lease::{Lease, LeaseStore};
    let client = client().await;
    let table = format!("reopen-{}-{}", std::process::id(), rand::random::<u32>());
    let store = DynamoLeaseStore::open(client.clone(), &table)
        .await
        .expect("create");
    store
        .create_if_absent(&Lease::new("shard-a", vec!["p2".into(), "p1".into()]))
        .await
        .unwrap();
    let again = DynamoLeaseStore::open(client, &table).await.expect("open");
    let lease = again.get("shard-a").await.unwrap().expect("kept");
    assert_eq!(lease.parents, ["p1", "p2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_sentinels_keep_their_meaning_across_versions() {
    use aws_sdk_dynamodb::types::AttributeValue;
    use shardflow_core::lease::{Lease, LeaseStore, LeaseUpdate, ShardCheckpoint};
    let client = client().await;
    let table = format!("sentinels-{}-{}", std::process::id(), rand::random::<u32>());
    let store = DynamoLeaseStore::open(client.clone(), &table)
        .await
        .expect("create");
    let raw = |key: &'static str| {
        let client = client.clone();
        let table = table.clone();
        async move {
            let item = client
                .get_item()
                .table_name(table)
                .key("leaseKey", AttributeValue::S(key.into()))
                .send()
                .await
                .unwrap()
                .item
                .unwrap();
            item["checkpoint"].as_s().unwrap().clone()
        }
    };
    // A new lease is written as earlier versions (and the KCL) wrote it, and such an item
    // means "the topology's start", not an operator's reset.
    store
        .create_if_absent(&Lease::new("s", vec![]))
        .await
        .unwrap();
    assert_eq!(raw("s").await, "TRIM_HORIZON");
    let lease = store.get("s").await.unwrap().unwrap();
    assert_eq!(lease.checkpoint, ShardCheckpoint::initial());
    // An operator's resets have sentinels of their own.
    let reset = LeaseUpdate::Reset {
        checkpoint: ShardCheckpoint::trim_horizon(),
    };
    store.update("s", 0, &reset).await.unwrap();
    assert_eq!(raw("s").await, "TRIM_HORIZON_RESET");
    let reset = LeaseUpdate::Reset {
        checkpoint: ShardCheckpoint::at_timestamp(1_795_680_000_250),
    };
    store.update("s", 1, &reset).await.unwrap();
    assert_eq!(raw("s").await, "AT_TIMESTAMP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_table_has_a_later_generation_that_running_stores_see_at_their_next_list() {
    use shardflow_core::lease::{Lease, LeaseStore, LeaseUpdate};
    let client = client().await;
    let table = format!(
        "generation-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    );
    let store = DynamoLeaseStore::open(client.clone(), &table)
        .await
        .expect("create");
    let take = |owner: &str| LeaseUpdate::Take {
        owner: owner.into(),
    };
    store
        .create_if_absent(&Lease::new("s", vec![]))
        .await
        .unwrap();
    let before = store.update("s", 0, &take("w1")).await.unwrap();
    assert!(before.generation > 0, "a table has a generation");
    let again = DynamoLeaseStore::open(client.clone(), &table)
        .await
        .expect("open");
    assert_eq!(
        again.list().await.unwrap()[0].generation,
        before.generation,
        "every worker on one table reads one generation"
    );

    // Dropped and created again (DynamoDB's clock stamps the new table later).
    client
        .delete_table()
        .table_name(&table)
        .send()
        .await
        .unwrap();
    while client
        .describe_table()
        .table_name(&table)
        .send()
        .await
        .is_ok()
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let recreated = DynamoLeaseStore::open(client.clone(), &table)
        .await
        .expect("recreate");
    recreated
        .create_if_absent(&Lease::new("s", vec![]))
        .await
        .unwrap();
    let after = recreated.update("s", 0, &take("w2")).await.unwrap();
    assert!(
        after.epoch() > before.epoch(),
        "the new table's first epoch {} is after the old table's {}",
        after.epoch(),
        before.epoch()
    );
    // A store opened on the old table learns the new generation from its next listing.
    let listed = store.list().await.unwrap();
    assert_eq!(listed.len(), 1, "the generation item is not a lease");
    assert_eq!(listed[0].generation, after.generation);
    assert_eq!(
        store.get("s").await.unwrap().unwrap().epoch(),
        after.epoch()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_item_older_than_its_table_is_raised_for_every_worker() {
    use aws_sdk_dynamodb::types::AttributeValue;
    use shardflow_core::lease::{Lease, LeaseStore};
    let client = client().await;
    let table = format!("restored-{}-{}", std::process::id(), rand::random::<u32>());
    let first = DynamoLeaseStore::open(client.clone(), &table)
        .await
        .expect("create");
    first
        .create_if_absent(&Lease::new("s", vec![]))
        .await
        .unwrap();
    let created = first.list().await.unwrap()[0].generation;
    // A table restored from a backup: the item carries the old table's generation.
    client
        .put_item()
        .table_name(&table)
        .item("leaseKey", AttributeValue::S("#tableGeneration".into()))
        .item("tableGeneration", AttributeValue::N("5".into()))
        .send()
        .await
        .unwrap();
    let second = DynamoLeaseStore::open(client.clone(), &table)
        .await
        .expect("open");
    assert_eq!(
        second.list().await.unwrap()[0].generation,
        created,
        "never below the table's own creation time"
    );
    assert_eq!(
        first.list().await.unwrap()[0].generation,
        created,
        "a worker that opened the table earlier never goes below what it saw"
    );
}

/// A shared table: another tool's items and a damaged lease used to fail every worker's shard
/// sync, and every update replaced the whole item, dropping attributes shardflow does not know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_in_the_table_are_skipped_and_updates_keep_attributes_shardflow_does_not_write() {
    use aws_sdk_dynamodb::types::AttributeValue;
    use shardflow_core::lease::{Lease, LeaseStore, LeaseUpdate};
    let client = client().await;
    let table = format!("strangers-{}-{}", std::process::id(), rand::random::<u32>());
    let store = DynamoLeaseStore::open(client.clone(), &table)
        .await
        .expect("create");
    store
        .create_if_absent(&Lease::new("shard-a", vec![]))
        .await
        .unwrap();
    let put = |item: Vec<(&'static str, AttributeValue)>| {
        let client = client.clone();
        let table = table.clone();
        async move {
            client
                .put_item()
                .table_name(table)
                .set_item(Some(
                    item.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
                ))
                .send()
                .await
                .unwrap();
        }
    };
    // Another tool's item, and a lease whose counter is not a number.
    put(vec![
        ("leaseKey", AttributeValue::S("other-tool:config".into())),
        ("settings", AttributeValue::S("{}".into())),
    ])
    .await;
    put(vec![
        ("leaseKey", AttributeValue::S("shard-damaged".into())),
        ("leaseCounter", AttributeValue::S("seven".into())),
    ])
    .await;
    let leases = store
        .list()
        .await
        .expect("strangers do not fail the listing");
    let keys: Vec<&str> = leases.iter().map(|l| l.key.as_str()).collect();
    assert_eq!(keys, ["shard-a"]);
    assert_eq!(store.skipped_items(), 2);

    // An operator's note on a lease survives a take, a checkpoint and a release.
    client
        .update_item()
        .table_name(&table)
        .key("leaseKey", AttributeValue::S("shard-a".into()))
        .update_expression("SET operatorNote = :note")
        .expression_attribute_values(":note", AttributeValue::S("migrated 2026-11".into()))
        .send()
        .await
        .unwrap();
    let owner = "worker-1#1".to_owned();
    let lease = store.get("shard-a").await.unwrap().unwrap();
    let lease = store
        .update(
            "shard-a",
            lease.counter,
            &LeaseUpdate::Take {
                owner: owner.clone(),
            },
        )
        .await
        .unwrap();
    let lease = store
        .update("shard-a", lease.counter, &LeaseUpdate::Release { owner })
        .await
        .unwrap();
    assert_eq!(lease.owner, None);
    let item = client
        .get_item()
        .table_name(&table)
        .key("leaseKey", AttributeValue::S("shard-a".into()))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item
        .unwrap();
    assert_eq!(
        item.get("operatorNote")
            .and_then(|v| v.as_s().ok())
            .map(String::as_str),
        Some("migrated 2026-11")
    );
    assert!(
        !item.contains_key("leaseOwner"),
        "a released lease has no owner: {item:?}"
    );
}

#[tokio::test]
async fn a_throttled_lease_table_is_worth_another_try() {
    // DynamoDB throttles with HTTP 400: read by status, a throttled scan was final, and a
    // worker's run failed at the first throttled shard sync (found by tests/chaos.rs).
    use aws_sdk_dynamodb::config::retry::RetryConfig;
    use aws_sdk_dynamodb::operation::describe_table::DescribeTableOutput;
    use aws_sdk_dynamodb::operation::get_item::GetItemOutput;
    use aws_sdk_dynamodb::operation::put_item::PutItemOutput;
    use aws_sdk_dynamodb::operation::scan::ScanError;
    use aws_sdk_dynamodb::primitives::DateTime;
    use aws_sdk_dynamodb::types::error::ProvisionedThroughputExceededException;
    use aws_sdk_dynamodb::types::{TableDescription, TableStatus};
    use aws_sdk_dynamodb::Client;
    use aws_smithy_mocks::{mock, mock_client, RuleMode};
    use shardflow_core::lease::LeaseStore as _;

    let describe = mock!(Client::describe_table).then_output(|| {
        DescribeTableOutput::builder()
            .table(
                TableDescription::builder()
                    .table_status(TableStatus::Active)
                    .creation_date_time(DateTime::from_secs(1_700_000_000))
                    .build(),
            )
            .build()
    });
    let get = mock!(Client::get_item).then_output(|| GetItemOutput::builder().build());
    let put = mock!(Client::put_item).then_output(|| PutItemOutput::builder().build());
    let scan = mock!(Client::scan).then_error(|| {
        // As the SDK reads DynamoDB's answer: HTTP 400 with the error's code.
        ScanError::ProvisionedThroughputExceededException(
            ProvisionedThroughputExceededException::builder()
                .message("slow down")
                .meta(
                    aws_sdk_dynamodb::error::ErrorMetadata::builder()
                        .code("ProvisionedThroughputExceededException")
                        .build(),
                )
                .build(),
        )
    });
    let client = mock_client!(
        aws_sdk_dynamodb,
        RuleMode::MatchAny,
        &[&describe, &get, &put, &scan],
        |b| b.retry_config(RetryConfig::disabled())
    );
    let store = DynamoLeaseStore::open(client, "mocked").await.unwrap();
    let error = store.list().await.expect_err("throttled");
    assert!(error.is_retryable(), "{error}");
    assert_eq!(scan.num_calls(), 1);
}
