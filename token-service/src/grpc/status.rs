//! The one place where domain errors become gRPC statuses.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::Error;

/// `google.rpc.ErrorInfo.domain` of every error this service returns.
pub const ERROR_DOMAIN: &str = "jobtoken.v1";

/// The gRPC code of a domain error.
pub fn code(e: &Error) -> Code {
    match e {
        Error::InvalidArgument { .. } | Error::LifetimeExceedsCap { .. } => Code::InvalidArgument,
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
        | Error::ActorMismatch => Code::PermissionDenied,
        Error::LeaseNotFound => Code::NotFound,
        Error::LeaseAlreadyExists(_) => Code::AlreadyExists,
        Error::LeaseEnded(_) => Code::FailedPrecondition,
        Error::Unavailable(_) => Code::Unavailable,
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
            metadata.insert("field".to_owned(), (*field).to_owned());
        }
        Error::LeaseEnded(reason) => {
            metadata.insert("end_reason".to_owned(), reason.as_str().to_owned());
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
    Status::with_error_details(
        code(e),
        message,
        ErrorDetails::with_error_info(e.reason(), ERROR_DOMAIN, metadata),
    )
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
            Error::Unavailable(StoreError::Unavailable("db down at 10.0.0.5".into())),
            Error::internal(std::io::Error::other("secret detail")),
        ];
        all.extend(EndReason::ALL.into_iter().map(Error::LeaseEnded));
        all
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
            (Code::Unavailable, "UNAVAILABLE"),
            (Code::Internal, "INTERNAL"),
            (Code::FailedPrecondition, "LEASE_RELEASED"),
            (Code::FailedPrecondition, "LEASE_EXPIRED"),
            (Code::FailedPrecondition, "LEASE_IDLE_TIMEOUT"),
            (Code::FailedPrecondition, "LEASE_REVOKED"),
            (Code::FailedPrecondition, "REFRESH_TOKEN_REUSED"),
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
}
