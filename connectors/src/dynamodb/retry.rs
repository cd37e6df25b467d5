//! Which DynamoDB errors are worth another try: shared by the lease store and the sink.

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};

/// Throttling, server errors and transport failures are worth another try: by the modelled
/// error variant (`modelled`), the error code, or the HTTP status. DynamoDB throttles with
/// HTTP 400 (`ProvisionedThroughputExceededException`, `ThrottlingException`,
/// `RequestLimitExceeded`): the status alone calls a throttle final.
pub(crate) fn retryable<E: ProvideErrorMetadata>(
    e: &SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>,
    modelled: impl Fn(&E) -> bool,
) -> bool {
    match e {
        SdkError::ServiceError(s) => {
            let status = s.raw().status().as_u16();
            status >= 500
                || status == 429
                || modelled(s.err())
                || matches!(
                    s.err().code(),
                    Some(
                        "ProvisionedThroughputExceededException"
                            | "ThrottlingException"
                            | "RequestLimitExceeded"
                            | "InternalServerError"
                    )
                )
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        _ => false,
    }
}
