//! The one place where domain errors become gRPC statuses.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::Error;

/// Retry delay sent with `TOO_MANY_STREAMS`.
pub const STREAM_CAP_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

pub use jobtoken_proto::wire::ERROR_DOMAIN;
use jobtoken_proto::wire::{END_DETAIL_METADATA, END_REASON_METADATA, FIELD_METADATA};

/// Longest `end_detail` an ended-lease error carries, in bytes.
const MAX_END_DETAIL: usize = 256;

/// `text` cut to at most `max` bytes on a character boundary, marked with `…` if cut.
fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The gRPC code of a domain error.
pub fn code(e: &Error) -> Code {
    match e {
        Error::InvalidArgument { .. }
        | Error::LifetimeExceedsCap { .. }
        | Error::LogoutTokenInvalid(_) => Code::InvalidArgument,
        Error::ModuleUnauthenticated
        | Error::AdminUnauthenticated
        | Error::SubjectTokenInvalid(_)
        | Error::SubjectTokenExpired
        | Error::SubjectTokenNotYetValid
        | Error::SubjectTokenAudience
        | Error::UntrustedIssuer(_)
        | Error::RefreshTokenInvalid
        | Error::RefreshTokenReused => Code::Unauthenticated,
        Error::PermissionNotHeld(_)
        | Error::PermissionNotDelegable(_)
        | Error::NoPermissionsGranted
        | Error::ActorMismatch
        | Error::TenantNotServed(_)
        | Error::AudienceNotAllowed(_)
        | Error::LogoutPolicyNotAllowed(_) => Code::PermissionDenied,
        Error::RateLimited { .. } | Error::TooManyStreams { .. } => Code::ResourceExhausted,
        Error::LeaseNotFound => Code::NotFound,
        Error::LeaseAlreadyExists(_) => Code::AlreadyExists,
        Error::LeaseEnded(..) => Code::FailedPrecondition,
        Error::Unavailable(_)
        | Error::PermissionSourceUnavailable(_)
        | Error::IssuerUnavailable(_) => Code::Unavailable,
        Error::Internal(_) => Code::Internal,
    }
}

/// Converts a domain error into a `Status` carrying `google.rpc.ErrorInfo` with the
/// stable reason. Internal errors are logged here with their cause and reach the caller
/// without details.
pub fn to_status(e: &Error) -> Status {
    let mut metadata = HashMap::new();
    match e {
        Error::PermissionNotHeld(names) | Error::PermissionNotDelegable(names) => {
            metadata.insert("permissions".to_owned(), names.join(","));
        }
        Error::InvalidArgument { field, .. } => {
            metadata.insert(FIELD_METADATA.to_owned(), (*field).to_owned());
        }
        Error::LeaseEnded(reason, detail) => {
            metadata.insert(END_REASON_METADATA.to_owned(), reason.as_str().to_owned());
            if !detail.is_empty() {
                metadata.insert(
                    END_DETAIL_METADATA.to_owned(),
                    bounded(detail, MAX_END_DETAIL),
                );
            }
        }
        Error::Internal(source) => {
            tracing::error!(error = %source, cause = ?source.source(), "internal error");
        }
        Error::Unavailable(source) => {
            tracing::warn!(error = %source, "store unavailable");
        }
        _ => {}
    }
    let message = match e {
        Error::Unavailable(_) => "storage is unavailable; retry shortly".to_owned(),
        other => other.to_string(),
    };
    let mut details = ErrorDetails::with_error_info(e.reason(), ERROR_DOMAIN, metadata);
    match e {
        Error::RateLimited { retry_after, .. } => {
            details.set_retry_info(Some(*retry_after));
        }
        // A slot frees only when another stream closes: ask for a patient retry.
        Error::TooManyStreams { .. } => {
            details.set_retry_info(Some(STREAM_CAP_RETRY));
        }
        _ => {}
    }
    Status::with_error_details(code(e), message, details)
}

/// A request message above the size limit. tonic refuses it before any handler runs,
/// with `OUT_OF_RANGE` and no details; [`too_large_layer`] turns that into this.
pub fn message_too_large() -> Status {
    let mut metadata = HashMap::new();
    metadata.insert(
        "limit_bytes".to_owned(),
        crate::limits::MAX_MESSAGE_BYTES.to_string(),
    );
    Status::with_error_details(
        Code::ResourceExhausted,
        format!(
            "the request message is larger than {} bytes",
            crate::limits::MAX_MESSAGE_BYTES
        ),
        ErrorDetails::with_error_info(
            jobtoken_proto::wire::reason::MESSAGE_TOO_LARGE,
            ERROR_DOMAIN,
            metadata,
        ),
    )
}

/// Rewrites tonic's `OUT_OF_RANGE` answer to an oversize request into
/// [`message_too_large`]. Nothing of ours answers `OUT_OF_RANGE`, so the code alone
/// identifies it.
pub fn too_large_layer() -> tower::util::MapResponseLayer<
    fn(http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body>,
> {
    tower::util::MapResponseLayer::new(rewrite_too_large)
}

fn rewrite_too_large(
    response: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    let out_of_range = (Code::OutOfRange as i32).to_string();
    let is_too_large = response
        .headers()
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == out_of_range.as_bytes());
    if !is_too_large {
        return response;
    }
    message_too_large().into_http()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::EndReason;
    use crate::store::StoreError;

    fn every_variant() -> Vec<Error> {
        let mut all = vec![
            Error::invalid("job_id", "is required"),
            Error::ModuleUnauthenticated,
            Error::AdminUnauthenticated,
            Error::SubjectTokenInvalid("bad".into()),
            Error::SubjectTokenExpired,
            Error::SubjectTokenNotYetValid,
            Error::SubjectTokenAudience,
            Error::UntrustedIssuer("https://evil".into()),
            Error::PermissionNotHeld(vec!["a.write".into(), "b".into()]),
            Error::PermissionNotDelegable(vec!["c".into()]),
            Error::NoPermissionsGranted,
            Error::LifetimeExceedsCap {
                requested_secs: 10,
                cap_secs: 5,
            },
            Error::LeaseNotFound,
            Error::LeaseAlreadyExists("job-1".into()),
            Error::ActorMismatch,
            Error::RefreshTokenInvalid,
            Error::RefreshTokenReused,
            Error::TenantNotServed("diku".into()),
            Error::AudienceNotAllowed("admin-console".into()),
            Error::LogoutPolicyNotAllowed("end".into()),
            Error::LogoutTokenInvalid("no jti".into()),
            Error::RateLimited {
                what: "renewals",
                retry_after: std::time::Duration::from_millis(250),
            },
            Error::TooManyStreams { limit: 4 },
            Error::Unavailable(StoreError::Unavailable("db down at 10.0.0.5".into())),
            Error::PermissionSourceUnavailable("https://kc/realms/{tenant}".into()),
            Error::IssuerUnavailable("https://kc/realms/diku".into()),
            Error::internal(std::io::Error::other("secret detail")),
        ];
        all.extend(
            EndReason::ALL
                .into_iter()
                .map(|r| Error::LeaseEnded(r, "user asked".into())),
        );
        all
    }

    #[test]
    fn an_ended_lease_carries_its_end_detail_bounded() {
        let status = to_status(&Error::LeaseEnded(EndReason::Revoked, "user asked".into()));
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.metadata["end_reason"], "revoked");
        assert_eq!(info.metadata["end_detail"], "user asked");
        let long = "é".repeat(300);
        let status = to_status(&Error::LeaseEnded(EndReason::Revoked, long));
        let detail = &status.get_details_error_info().unwrap().metadata["end_detail"];
        assert!(
            detail.len() <= MAX_END_DETAIL && detail.ends_with('…'),
            "{detail}"
        );
        let status = to_status(&Error::LeaseEnded(EndReason::Expired, String::new()));
        assert!(
            !status
                .get_details_error_info()
                .unwrap()
                .metadata
                .contains_key("end_detail")
        );
    }

    #[test]
    fn every_variant_maps_to_its_code_and_reason() {
        let expected = [
            (Code::InvalidArgument, "INVALID_ARGUMENT"),
            (Code::Unauthenticated, "MODULE_UNAUTHENTICATED"),
            (Code::Unauthenticated, "ADMIN_UNAUTHENTICATED"),
            (Code::Unauthenticated, "SUBJECT_TOKEN_INVALID"),
            (Code::Unauthenticated, "SUBJECT_TOKEN_EXPIRED"),
            (Code::Unauthenticated, "SUBJECT_TOKEN_NOT_YET_VALID"),
            (Code::Unauthenticated, "SUBJECT_TOKEN_AUDIENCE"),
            (Code::Unauthenticated, "UNTRUSTED_ISSUER"),
            (Code::PermissionDenied, "PERMISSION_NOT_HELD"),
            (Code::PermissionDenied, "PERMISSION_NOT_DELEGABLE"),
            (Code::PermissionDenied, "NO_PERMISSIONS_GRANTED"),
            (Code::InvalidArgument, "LIFETIME_EXCEEDS_CAP"),
            (Code::NotFound, "LEASE_NOT_FOUND"),
            (Code::AlreadyExists, "LEASE_ALREADY_EXISTS"),
            (Code::PermissionDenied, "ACTOR_MISMATCH"),
            (Code::Unauthenticated, "REFRESH_TOKEN_INVALID"),
            (Code::Unauthenticated, "REFRESH_TOKEN_REUSED"),
            (Code::PermissionDenied, "TENANT_NOT_SERVED"),
            (Code::PermissionDenied, "AUDIENCE_NOT_ALLOWED"),
            (Code::PermissionDenied, "LOGOUT_POLICY_NOT_ALLOWED"),
            (Code::InvalidArgument, "LOGOUT_TOKEN_INVALID"),
            (Code::ResourceExhausted, "RATE_LIMITED"),
            (Code::ResourceExhausted, "TOO_MANY_STREAMS"),
            (Code::Unavailable, "UNAVAILABLE"),
            (Code::Unavailable, "PERMISSION_SOURCE_UNAVAILABLE"),
            (Code::Unavailable, "ISSUER_UNAVAILABLE"),
            (Code::Internal, "INTERNAL"),
            (Code::FailedPrecondition, "LEASE_RELEASED"),
            (Code::FailedPrecondition, "LEASE_EXPIRED"),
            (Code::FailedPrecondition, "LEASE_IDLE_TIMEOUT"),
            (Code::FailedPrecondition, "LEASE_REVOKED"),
            (Code::FailedPrecondition, "REFRESH_TOKEN_REUSED"),
            (Code::FailedPrecondition, "PERMISSIONS_WITHDRAWN"),
            (Code::FailedPrecondition, "SUBJECT_DISABLED"),
            (Code::FailedPrecondition, "SUBJECT_LOGGED_OUT"),
            (Code::FailedPrecondition, "PERMISSIONS_UNVERIFIABLE"),
        ];
        let all = every_variant();
        assert_eq!(all.len(), expected.len());
        for (e, (code, reason)) in all.iter().zip(expected) {
            let status = to_status(e);
            assert_eq!(status.code(), code, "{e:?}");
            let info = status
                .get_error_details()
                .error_info()
                .cloned()
                .expect("ErrorInfo");
            assert_eq!(info.reason, reason, "{e:?}");
            assert_eq!(info.domain, ERROR_DOMAIN);
            assert!(!status.message().is_empty());
        }
    }

    #[test]
    fn refused_permissions_are_named_and_internal_details_stay_inside() {
        let status = to_status(&Error::PermissionNotHeld(vec!["a.write".into()]));
        assert!(status.message().contains("a.write"));
        let info = status.get_error_details().error_info().cloned().unwrap();
        assert_eq!(info.metadata["permissions"], "a.write");

        let status = to_status(&Error::internal(std::io::Error::other("secret detail")));
        assert_eq!(status.message(), "internal error");
        let status = to_status(&Error::Unavailable(StoreError::Unavailable(
            "10.0.0.5".into(),
        )));
        assert!(!status.message().contains("10.0.0.5"));
    }

    #[test]
    fn rate_limits_carry_a_retry_delay() {
        let status = to_status(&Error::RateLimited {
            what: "grants",
            retry_after: std::time::Duration::from_millis(1500),
        });
        let details = status.get_error_details();
        let retry = details.retry_info().cloned().expect("RetryInfo");
        assert_eq!(
            retry.retry_delay,
            Some(std::time::Duration::from_millis(1500))
        );
        assert_eq!(details.error_info().unwrap().reason, "RATE_LIMITED");
        let status = to_status(&Error::TooManyStreams { limit: 2 });
        let retry = status.get_error_details().retry_info().cloned().unwrap();
        assert_eq!(retry.retry_delay, Some(STREAM_CAP_RETRY));
    }

    #[test]
    fn only_out_of_range_answers_are_rewritten_as_too_large() {
        let too_large: http::Response<tonic::body::Body> =
            Status::out_of_range("Error, decoded message length too large").into_http();
        let rewritten = rewrite_too_large(too_large);
        let status = Status::from_header_map(rewritten.headers()).unwrap();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.get_error_details().error_info().unwrap().reason,
            "MESSAGE_TOO_LARGE"
        );
        let other: http::Response<tonic::body::Body> = to_status(&Error::LeaseNotFound).into_http();
        let kept = rewrite_too_large(other);
        let status = Status::from_header_map(kept.headers()).unwrap();
        assert_eq!(status.code(), Code::NotFound);
    }
}
