//! Creating a table on first use: on-demand billing, one string hash key, then waiting until it
//! is ACTIVE. Shared by the lease store and the sink.

use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType, TableStatus,
};
use aws_sdk_dynamodb::Client;

use shardflow_core::error::BoxError;

/// Longest wait for a created table to become ACTIVE.
const TABLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a table could not be made ready.
#[derive(Debug)]
pub(crate) struct TableError {
    pub(crate) operation: &'static str,
    pub(crate) retryable: bool,
    pub(crate) source: BoxError,
}

/// Creates `table` with string hash key `hash_key` if it does not exist (another process
/// creating it at the same time is fine) and waits until it is ACTIVE.
pub(crate) async fn ensure_table(
    client: &Client,
    table: &str,
    hash_key: &str,
) -> Result<(), TableError> {
    let fail = |operation, retryable, source: BoxError| TableError {
        operation,
        retryable,
        source,
    };
    let exists = match client.describe_table().table_name(table).send().await {
        Ok(_) => true,
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_resource_not_found_exception()) =>
        {
            false
        }
        Err(e) => return Err(fail("describe table", true, e.into())),
    };
    if !exists {
        let attribute = AttributeDefinition::builder()
            .attribute_name(hash_key)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(|e| fail("create table", false, e.into()))?;
        let key = KeySchemaElement::builder()
            .attribute_name(hash_key)
            .key_type(KeyType::Hash)
            .build()
            .map_err(|e| fail("create table", false, e.into()))?;
        let created = client
            .create_table()
            .table_name(table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attribute)
            .key_schema(key)
            .send()
            .await;
        match created {
            Ok(_) => {}
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_in_use_exception()) => {}
            Err(e) => return Err(fail("create table", false, e.into())),
        }
    }
    let deadline = tokio::time::Instant::now() + TABLE_TIMEOUT;
    loop {
        let out = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| fail("describe table", true, e.into()))?;
        if out.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(fail(
                "create table",
                true,
                format!("table {table} not ACTIVE after {TABLE_TIMEOUT:?}").into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
