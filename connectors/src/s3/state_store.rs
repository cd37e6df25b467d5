//! `S3StateStore`: snapshot parts of keyed state as S3 objects, which every worker of a fleet
//! reaches (the store to use with leases in DynamoDB: a shard may move to another machine).

use async_trait::async_trait;
use aws_sdk_s3::Client;
use shardflow_core::error::SinkError;
use shardflow_core::state_store::StateStore;

use super::objects::{delete, get_if_exists, list, put_whatever_is_there, RequestError};
use super::S3SinkError;

/// Stores each part as the object `<prefix>/<name>` in a bucket. A put replaces the object
/// (S3 writes are atomic per object, so a part is whole or absent); requests are retried with
/// backoff, and an error left after the retries leaves that snapshot incomplete (a put) or
/// backs the shard off (a restore).
#[derive(Clone, Debug)]
pub struct S3StateStore {
    client: Client,
    bucket: String,
    prefix: String,
    name: String,
}

impl S3StateStore {
    /// Parts in `bucket` under `prefix` (empty for the bucket's root).
    pub fn new(client: Client, bucket: impl Into<String>, prefix: impl Into<String>) -> Self {
        let bucket = bucket.into();
        let prefix = prefix.into().trim_matches('/').to_owned();
        Self {
            client,
            name: format!("s3:{bucket}"),
            bucket,
            prefix,
        }
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}/{name}", self.prefix)
        }
    }

    fn error(&self, operation: &'static str, e: RequestError) -> SinkError {
        SinkError {
            sink: self.name.clone(),
            operation,
            retryable: e.retryable,
            source: Box::new(S3SinkError::Request {
                operation: e.operation,
                source: e.source,
            }),
        }
    }
}

#[async_trait]
impl StateStore for S3StateStore {
    fn name(&self) -> &str {
        &self.name
    }

    async fn put(&self, name: &str, bytes: &[u8]) -> Result<(), SinkError> {
        put_whatever_is_there(&self.client, &self.bucket, &self.key(name), bytes)
            .await
            .map_err(|e| self.error("store a snapshot part", e))
    }

    async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, SinkError> {
        get_if_exists(&self.client, &self.bucket, &self.key(name))
            .await
            .map_err(|e| self.error("read a snapshot part", e))
    }

    async fn delete(&self, name: &str) -> Result<(), SinkError> {
        delete(&self.client, &self.bucket, &self.key(name))
            .await
            .map_err(|e| self.error("delete a snapshot part", e))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, SinkError> {
        let keys = list(&self.client, &self.bucket, &self.key(prefix))
            .await
            .map_err(|e| self.error("list snapshot parts", e))?;
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let mut names: Vec<String> = keys
            .into_iter()
            .filter_map(|k| k.get(strip..).map(str::to_owned))
            .collect();
        names.sort();
        Ok(names)
    }
}
