//! The crate's error, and reading the machine-readable details of a refused call.

use std::time::Duration;

use jobtoken_proto::wire;
use tonic::Status;
use tonic_types::StatusExt;

/// Errors of building a client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A key or header name is not valid gRPC metadata (printable ASCII; header names
    /// lower-case letters, digits, `-` and `_`).
    #[error("a key or header name is not valid gRPC metadata")]
    InvalidKey,
    /// The endpoint URI is malformed or the connection failed.
    #[error("cannot connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The service refused the call; [`error_reason`] gives its machine reason.
    #[error("the service refused: {}: {}", error_reason(.0).unwrap_or_default(), .0.message())]
    Rejected(Status),
}

/// The stable machine reason of a failed call (`google.rpc.ErrorInfo.reason`), such as
/// `LEASE_REVOKED` or `REFRESH_TOKEN_REUSED` (see [`jobtoken_proto::wire::reason`]).
pub fn error_reason(status: &Status) -> Option<String> {
    status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
}

/// The request field a failed call names (`google.rpc.ErrorInfo.metadata["field"]`), for
/// `INVALID_ARGUMENT`.
pub(crate) fn error_field(status: &Status) -> Option<String> {
    status
        .get_error_details()
        .error_info()
        .and_then(|info| info.metadata.get(wire::FIELD_METADATA).cloned())
}

/// Whether a failed call is worth retrying: the service was unreachable, overloaded or
/// interrupted, so the same request (with the same refresh token: the service's grace
/// window makes a retried renewal converge) may well succeed. Anything else is an
/// answer, such as a revoked lease, that no retry changes.
pub fn is_transient(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::ResourceExhausted
            | tonic::Code::Aborted
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::Cancelled
    )
}

/// Longest `RetryInfo` delay believed; the service's word is clamped like its lifetimes.
pub(crate) const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// The wait a `RESOURCE_EXHAUSTED` answer asks for (`google.rpc.RetryInfo`), clamped to
/// [`MAX_RETRY_DELAY`].
pub(crate) fn retry_delay(status: &Status) -> Option<Duration> {
    if status.code() != tonic::Code::ResourceExhausted {
        return None;
    }
    status
        .get_error_details()
        .retry_info()
        .and_then(|info| info.retry_delay)
        .map(|d| d.min(MAX_RETRY_DELAY))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_reason_reads_error_info() {
        let status = Status::with_error_details(
            tonic::Code::FailedPrecondition,
            "ended",
            tonic_types::ErrorDetails::with_error_info(
                wire::reason::LEASE_REVOKED,
                wire::ERROR_DOMAIN,
                std::collections::HashMap::new(),
            ),
        );
        assert_eq!(
            error_reason(&status).as_deref(),
            Some(wire::reason::LEASE_REVOKED)
        );
        assert_eq!(error_reason(&Status::internal("x")), None);
    }
}
