//! S3 requests the sink needs, with retries: read an object's shardflow metadata (HEAD), put an
//! object (multipart above a threshold), list and get for reading back.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;

use shardflow_core::error::BoxError;

/// Attempts per request before an error is final.
const ATTEMPTS: u32 = 8;
const BACKOFF_BASE: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Multipart parts: S3 needs at least 5 MiB for every part but the last.
pub(crate) const PART_BYTES: usize = 8 * 1024 * 1024;

/// A failed request: whether trying again may help, and why.
#[derive(Debug)]
pub(crate) struct RequestError {
    pub(crate) operation: &'static str,
    pub(crate) retryable: bool,
    pub(crate) source: BoxError,
}

fn classify<E>(
    operation: &'static str,
    e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> RequestError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let retryable = match &e {
        SdkError::ServiceError(s) => {
            let status = s.raw().status().as_u16();
            status >= 500
                || status == 429
                || matches!(
                    s.err().code(),
                    Some("SlowDown" | "InternalError" | "RequestTimeout" | "ServiceUnavailable")
                )
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        _ => false,
    };
    RequestError {
        operation,
        retryable,
        source: e.into(),
    }
}

/// Runs `op` until it succeeds, fails for good, or attempts run out; full-jitter backoff.
async fn retried<R, F, Fut>(mut op: F) -> Result<R, RequestError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<R, RequestError>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Ok(r) => return Ok(r),
            Err(e) if e.retryable && attempt + 1 < ATTEMPTS => {
                attempt += 1;
                let cap = BACKOFF_BASE
                    .saturating_mul(1 << attempt.min(16))
                    .min(BACKOFF_MAX);
                tokio::time::sleep(cap.mul_f64(rand::random::<f64>())).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The user metadata of `key`, or `None` if there is no such object.
pub(crate) async fn head(
    client: &Client,
    bucket: &str,
    key: &str,
) -> Result<Option<HashMap<String, String>>, RequestError> {
    retried(|| async {
        match client.head_object().bucket(bucket).key(key).send().await {
            Ok(out) => Ok(Some(out.metadata().cloned().unwrap_or_default())),
            Err(e)
                if e.as_service_error().is_some_and(|s| s.is_not_found())
                    || e.raw_response().is_some_and(|r| r.status().as_u16() == 404) =>
            {
                Ok(None)
            }
            Err(e) => Err(classify("HeadObject", e)),
        }
    })
    .await
}

/// An object to store.
pub(crate) struct NewObject<'a> {
    pub(crate) body: &'a [u8],
    pub(crate) metadata: &'a HashMap<String, String>,
    pub(crate) content_type: &'a str,
    pub(crate) content_encoding: Option<&'a str>,
}

/// Writes `object` to `key`: one PutObject, or a multipart upload when the body is larger
/// than `multipart_above`.
pub(crate) async fn put(
    client: &Client,
    bucket: &str,
    key: &str,
    object: NewObject<'_>,
    multipart_above: usize,
) -> Result<(), RequestError> {
    let NewObject {
        body,
        metadata,
        content_type,
        content_encoding,
    } = object;
    if body.len() <= multipart_above {
        return retried(|| async {
            client
                .put_object()
                .bucket(bucket)
                .key(key)
                .body(ByteStream::from(body.to_vec()))
                .set_metadata(Some(metadata.clone()))
                .content_type(content_type)
                .set_content_encoding(content_encoding.map(str::to_owned))
                .send()
                .await
                .map(drop)
                .map_err(|e| classify("PutObject", e))
        })
        .await;
    }
    let upload = retried(|| async {
        client
            .create_multipart_upload()
            .bucket(bucket)
            .key(key)
            .set_metadata(Some(metadata.clone()))
            .content_type(content_type)
            .set_content_encoding(content_encoding.map(str::to_owned))
            .send()
            .await
            .map_err(|e| classify("CreateMultipartUpload", e))
    })
    .await?;
    let upload_id = upload.upload_id().unwrap_or_default().to_owned();
    let mut parts = Vec::new();
    for (i, chunk) in body.chunks(PART_BYTES).enumerate() {
        let number = i32::try_from(i + 1).unwrap_or(i32::MAX);
        let part = retried(|| async {
            client
                .upload_part()
                .bucket(bucket)
                .key(key)
                .upload_id(&upload_id)
                .part_number(number)
                .body(ByteStream::from(chunk.to_vec()))
                .send()
                .await
                .map_err(|e| classify("UploadPart", e))
        })
        .await;
        match part {
            Ok(out) => parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(out.e_tag().map(str::to_owned))
                    .build(),
            ),
            Err(e) => {
                // Best effort: an abandoned upload costs storage until a lifecycle rule ends it.
                let _ = client
                    .abort_multipart_upload()
                    .bucket(bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .send()
                    .await;
                return Err(e);
            }
        }
    }
    let completed = CompletedMultipartUpload::builder()
        .set_parts(Some(parts))
        .build();
    retried(|| async {
        client
            .complete_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(&upload_id)
            .multipart_upload(completed.clone())
            .send()
            .await
            .map(drop)
            .map_err(|e| classify("CompleteMultipartUpload", e))
    })
    .await
}

/// Every key under `prefix`.
pub(crate) async fn list(
    client: &Client,
    bucket: &str,
    prefix: &str,
) -> Result<Vec<String>, RequestError> {
    let mut keys = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = retried(|| async {
            client
                .list_objects_v2()
                .bucket(bucket)
                .prefix(prefix)
                .set_continuation_token(token.clone())
                .send()
                .await
                .map_err(|e| classify("ListObjectsV2", e))
        })
        .await?;
        keys.extend(
            page.contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_owned)),
        );
        match page.next_continuation_token() {
            Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
            _ => break,
        }
    }
    Ok(keys)
}

/// An object's bytes and user metadata.
pub(crate) async fn get(
    client: &Client,
    bucket: &str,
    key: &str,
) -> Result<(Vec<u8>, HashMap<String, String>), RequestError> {
    retried(|| async {
        let out = client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| classify("GetObject", e))?;
        let metadata = out.metadata().cloned().unwrap_or_default();
        let body = out.body.collect().await.map_err(|e| RequestError {
            operation: "GetObject",
            retryable: true,
            source: e.into(),
        })?;
        Ok((body.into_bytes().to_vec(), metadata))
    })
    .await
}
