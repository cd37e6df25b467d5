//! `S3PayloadStore`: dead letters' payloads too large for their sink, as S3 objects named by
//! the record's position (`DeadLetter::to_with_overflow`).

use async_trait::async_trait;
use aws_sdk_s3::Client;
use shardflow_core::error::SinkError;
use shardflow_core::payload_store::PayloadStore;

use super::objects::put_whatever_is_there;
use super::S3SinkError;

/// Stores payloads as objects `<prefix>/<topology>/<stream>/<shard>/<sequence>-<sub-sequence>`
/// in a bucket. A replay writes the same bytes to the same key again. Requests are retried
/// with backoff; an error left after the retries backs the shard off like any sink failure.
#[derive(Clone, Debug)]
pub struct S3PayloadStore {
    client: Client,
    bucket: String,
    prefix: String,
    name: String,
}

impl S3PayloadStore {
    /// Payloads in `bucket` under `prefix` (empty for the bucket's root).
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
}

#[async_trait]
impl PayloadStore for S3PayloadStore {
    fn name(&self) -> &str {
        &self.name
    }

    fn location(&self, name: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.key(name))
    }

    async fn put(&self, name: &str, bytes: &[u8]) -> Result<(), SinkError> {
        put_whatever_is_there(&self.client, &self.bucket, &self.key(name), bytes)
            .await
            .map_err(|e| SinkError {
                sink: self.name.clone(),
                operation: "store a dead letter's payload",
                retryable: e.retryable,
                source: Box::new(S3SinkError::Request {
                    operation: e.operation,
                    source: e.source,
                }),
            })
    }
}
