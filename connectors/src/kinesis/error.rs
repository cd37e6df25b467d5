//! Kinesis errors, classified by what the caller does next (retry or not), never by text.

use aws_sdk_kinesis::config::http::HttpResponse;
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use shardflow_core::error::{BoxError, SourceError};

/// A Kinesis call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KinesisError {
    /// The service or the network failed; `retryable` says whether trying again may help.
    #[error("Kinesis {operation} on stream {stream:?} failed ({code}): {source}")]
    Call {
        /// The API operation.
        operation: &'static str,
        /// The stream.
        stream: String,
        /// The service's error code, or the transport failure's kind.
        code: String,
        /// Whether trying again may help (throttling, 5xx, timeouts, connection errors).
        retryable: bool,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// The stream did not reach the wanted state in time.
    #[error("stream {stream:?} did not become {wanted} within {waited_secs} s")]
    NotReady {
        /// The stream.
        stream: String,
        /// The status waited for.
        wanted: &'static str,
        /// How long it waited.
        waited_secs: u64,
    },
    /// A value the service returned cannot be interpreted.
    #[error("Kinesis returned an unusable {what} for stream {stream:?}: {value:?}")]
    BadResponse {
        /// The stream.
        stream: String,
        /// What was wrong.
        what: &'static str,
        /// The value.
        value: String,
    },
}

/// Service error codes that mean "slow down and try again".
const THROTTLING_CODES: [&str; 4] = [
    "ProvisionedThroughputExceededException",
    "LimitExceededException",
    "ThrottlingException",
    "KMSThrottlingException",
];

impl KinesisError {
    /// Classifies an SDK error of `operation` on `stream`.
    pub(crate) fn from_sdk<E>(
        operation: &'static str,
        stream: &str,
        err: SdkError<E, HttpResponse>,
    ) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let (code, retryable) = match &err {
            SdkError::ServiceError(service) => {
                let code = service.err().code().unwrap_or("Unknown").to_owned();
                let status = service.raw().status().as_u16();
                let retryable = THROTTLING_CODES.contains(&code.as_str())
                    || code == "InternalFailure"
                    || code == "ServiceUnavailable"
                    || status >= 500;
                (code, retryable)
            }
            SdkError::TimeoutError(_) => ("Timeout".to_owned(), true),
            SdkError::DispatchFailure(_) => ("DispatchFailure".to_owned(), true),
            SdkError::ResponseError(_) => ("ResponseError".to_owned(), true),
            _ => ("ConstructionFailure".to_owned(), false),
        };
        Self::Call {
            operation,
            stream: stream.to_owned(),
            code,
            retryable,
            source: Box::new(err),
        }
    }

    /// Classifies a GetRecords error by its modelled variant (a response's error code may be
    /// absent; the variant never is).
    pub(crate) fn from_get_records(
        stream: &str,
        err: SdkError<aws_sdk_kinesis::operation::get_records::GetRecordsError, HttpResponse>,
    ) -> Self {
        let variant = err.as_service_error().and_then(|e| {
            if e.is_expired_iterator_exception() {
                Some("ExpiredIteratorException")
            } else if e.is_provisioned_throughput_exceeded_exception() {
                Some("ProvisionedThroughputExceededException")
            } else if e.is_kms_throttling_exception() {
                Some("KMSThrottlingException")
            } else {
                None
            }
        });
        // An expired iterator is renewed, not retried as it is.
        Self::from_sdk("GetRecords", stream, err)
            .with_variant(variant, |name| name != "ExpiredIteratorException")
    }

    /// Classifies a PutRecords error by its modelled variant.
    pub(crate) fn from_put_records(
        stream: &str,
        err: SdkError<aws_sdk_kinesis::operation::put_records::PutRecordsError, HttpResponse>,
    ) -> Self {
        let variant = err.as_service_error().and_then(|e| {
            if e.is_provisioned_throughput_exceeded_exception() {
                Some("ProvisionedThroughputExceededException")
            } else if e.is_kms_throttling_exception() {
                Some("KMSThrottlingException")
            } else if e.is_internal_failure_exception() {
                Some("InternalFailure")
            } else {
                None
            }
        });
        Self::from_sdk("PutRecords", stream, err).with_variant(variant, |_| true)
    }

    /// Names the error after the modelled variant, when known, with its retryability.
    fn with_variant(
        mut self,
        variant: Option<&'static str>,
        retryable_if: impl Fn(&str) -> bool,
    ) -> Self {
        if let (
            Some(name),
            Self::Call {
                code, retryable, ..
            },
        ) = (variant, &mut self)
        {
            *code = name.to_owned();
            *retryable = retryable_if(name);
        }
        self
    }

    /// Whether this is an expired shard iterator (renew it, do not retry the same call).
    pub fn is_expired_iterator(&self) -> bool {
        self.code() == Some("ExpiredIteratorException")
    }

    /// Whether trying again may help.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Call {
                retryable: true,
                ..
            }
        )
    }

    /// The service error code, for calls the service rejected.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Call { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether this is throttling (ProvisionedThroughputExceeded and kin).
    pub fn is_throttling(&self) -> bool {
        self.code().is_some_and(|c| THROTTLING_CODES.contains(&c))
    }
}

impl From<KinesisError> for SourceError {
    fn from(e: KinesisError) -> Self {
        let retryable = e.is_retryable();
        let what = match &e {
            KinesisError::Call {
                operation, stream, ..
            } => format!("{operation} on {stream}"),
            KinesisError::NotReady { stream, .. } | KinesisError::BadResponse { stream, .. } => {
                stream.clone()
            }
        };
        SourceError::Other {
            what,
            retryable,
            source: Box::new(e),
        }
    }
}
