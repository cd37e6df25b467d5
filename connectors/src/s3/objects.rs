//! S3 requests the sink needs, with retries: read an object's ETag and shardflow metadata
//! (HEAD), put an object on a condition (multipart above a threshold), list and get for
//! reading back.

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
    /// S3 refused a conditional write (412 `PreconditionFailed`): the object is no longer
    /// what the writer read, or one exists where none did.
    pub(crate) precondition_failed: bool,
    pub(crate) source: BoxError,
}

/// What a write requires of the object already at its key; S3 refuses the write otherwise, so
/// two writers that read the same state cannot both write (real S3 has enforced both since
/// 2024, on PutObject and CompleteMultipartUpload alike).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Precondition {
    /// There is no object (`If-None-Match: *`).
    Absent,
    /// The object is the one with this ETag, as read (`If-Match`).
    Unchanged(String),
}

impl Precondition {
    fn if_match(&self) -> Option<String> {
        match self {
            Self::Absent => None,
            Self::Unchanged(etag) => Some(etag.clone()),
        }
    }

    fn if_none_match(&self) -> Option<String> {
        match self {
            Self::Absent => Some("*".to_owned()),
            Self::Unchanged(_) => None,
        }
    }
}

/// An object as HEAD shows it.
#[derive(Clone, Debug)]
pub(crate) struct Stored {
    /// The condition under which a write replaces exactly this object.
    pub(crate) etag: String,
    pub(crate) metadata: HashMap<String, String>,
}

fn classify<E>(
    operation: &'static str,
    e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> RequestError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let precondition_failed = matches!(&e, SdkError::ServiceError(s)
        if s.raw().status().as_u16() == 412 || s.err().code() == Some("PreconditionFailed"));
    let retryable = match &e {
        SdkError::ServiceError(s) => {
            let status = s.raw().status().as_u16();
            status >= 500
                || status == 429
                // Two conditional writes of one key at once: S3 asks to try again, and the
                // second try is judged on the object the first one left.
                || matches!(
                    s.err().code(),
                    Some(
                        "SlowDown"
                            | "InternalError"
                            | "RequestTimeout"
                            | "ServiceUnavailable"
                            | "ConditionalRequestConflict"
                    )
                )
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        _ => false,
    };
    RequestError {
        operation,
        retryable: retryable && !precondition_failed,
        precondition_failed,
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

/// The ETag and user metadata of `key`, or `None` if there is no such object.
pub(crate) async fn head(
    client: &Client,
    bucket: &str,
    key: &str,
) -> Result<Option<Stored>, RequestError> {
    retried(|| async {
        match client.head_object().bucket(bucket).key(key).send().await {
            Ok(out) => match out.e_tag() {
                Some(etag) => Ok(Some(Stored {
                    etag: etag.to_owned(),
                    metadata: out.metadata().cloned().unwrap_or_default(),
                })),
                None => Err(RequestError {
                    operation: "HeadObject",
                    retryable: false,
                    precondition_failed: false,
                    source: "the reply carries no ETag, so no write can be made conditional on it"
                        .into(),
                }),
            },
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

/// Writes `body` to `key` whatever is there: for objects whose name fixes their content, so
/// that writing one again changes nothing.
pub(crate) async fn put_whatever_is_there(
    client: &Client,
    bucket: &str,
    key: &str,
    body: &[u8],
) -> Result<(), RequestError> {
    retried(|| async {
        client
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(ByteStream::from(body.to_vec()))
            .content_type("application/octet-stream")
            .send()
            .await
            .map(drop)
            .map_err(|e| classify("PutObject", e))
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

/// Writes `object` to `key` if `condition` holds: one PutObject, or a multipart upload (the
/// condition on its completion) when the body is larger than `multipart_above`. A retry of a
/// write whose reply was lost finds the condition broken by its own first try: the caller
/// tells the two apart (see `super::conditional`).
pub(crate) async fn put(
    client: &Client,
    bucket: &str,
    key: &str,
    object: NewObject<'_>,
    condition: &Precondition,
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
                .set_if_match(condition.if_match())
                .set_if_none_match(condition.if_none_match())
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
                abort(client, bucket, key, &upload_id).await;
                return Err(e);
            }
        }
    }
    let completed = CompletedMultipartUpload::builder()
        .set_parts(Some(parts))
        .build();
    let done = retried(|| async {
        client
            .complete_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(&upload_id)
            .multipart_upload(completed.clone())
            .set_if_match(condition.if_match())
            .set_if_none_match(condition.if_none_match())
            .send()
            .await
            .map(drop)
            .map_err(|e| classify("CompleteMultipartUpload", e))
    })
    .await;
    if done.as_ref().is_err_and(|e| e.precondition_failed) {
        abort(client, bucket, key, &upload_id).await;
    }
    done
}

/// Best effort: an abandoned upload costs storage until a lifecycle rule ends it.
async fn abort(client: &Client, bucket: &str, key: &str, upload_id: &str) {
    let _ = client
        .abort_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
        .send()
        .await;
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

/// An object's bytes, or `None` if there is no such object.
pub(crate) async fn get_if_exists(
    client: &Client,
    bucket: &str,
    key: &str,
) -> Result<Option<Vec<u8>>, RequestError> {
    retried(|| async {
        let out = match client.get_object().bucket(bucket).key(key).send().await {
            Ok(out) => out,
            Err(SdkError::ServiceError(s)) if s.err().is_no_such_key() => return Ok(None),
            Err(e) => return Err(classify("GetObject", e)),
        };
        let body = out.body.collect().await.map_err(|e| RequestError {
            operation: "GetObject",
            retryable: true,
            precondition_failed: false,
            source: e.into(),
        })?;
        Ok(Some(body.into_bytes().to_vec()))
    })
    .await
}

/// Deletes `key` (S3 answers a delete of an absent key with success too).
pub(crate) async fn delete(client: &Client, bucket: &str, key: &str) -> Result<(), RequestError> {
    retried(|| async {
        client
            .delete_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map(drop)
            .map_err(|e| classify("DeleteObject", e))
    })
    .await
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
            precondition_failed: false,
            source: e.into(),
        })?;
        Ok((body.into_bytes().to_vec(), metadata))
    })
    .await
}
