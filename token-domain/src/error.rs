//! The domain's one error type. The gRPC layer maps it to a `Status` in exactly one place
//! (`grpc::status`); every variant has a stable machine reason.

use crate::lease::EndReason;
use crate::ports::StoreError;

/// Everything a lease operation can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is missing, malformed or out of range.
    #[error("invalid {field}: {problem}")]
    InvalidArgument {
        /// The offending field.
        field: &'static str,
        /// What is wrong, for a person.
        problem: String,
    },
    /// No valid module credential (mTLS certificate or module key) came with the call.
    #[error("module credential missing or not recognised")]
    ModuleUnauthenticated,
    /// No valid admin key came with the call.
    #[error("admin credential missing or not recognised")]
    AdminUnauthenticated,
    /// The subject token is not a well-formed, correctly signed JWT.
    #[error("subject token is invalid: {0}")]
    SubjectTokenInvalid(String),
    /// The subject token's `exp` (plus leeway) has passed.
    #[error("subject token has expired")]
    SubjectTokenExpired,
    /// The subject token's `nbf` (minus leeway) is still ahead.
    #[error("subject token is not valid yet")]
    SubjectTokenNotYetValid,
    /// The subject token's `aud` does not name this platform.
    #[error("subject token audience is not accepted")]
    SubjectTokenAudience,
    /// The subject token's issuer is not configured as trusted.
    #[error("subject token issuer {0:?} is not trusted")]
    UntrustedIssuer(String),
    /// The user does not hold some requested permissions.
    #[error("the user does not hold: {}", .0.join(", "))]
    PermissionNotHeld(Vec<String>),
    /// The module may not delegate some requested permissions.
    #[error("this module may not delegate: {}", .0.join(", "))]
    PermissionNotDelegable(Vec<String>),
    /// Nothing the user holds may be delegated by this module.
    #[error("none of the user's permissions may be delegated by this module")]
    NoPermissionsGranted,
    /// The requested lifetime is above the module's cap and config says refuse.
    #[error("requested lifetime {requested_secs}s exceeds the cap of {cap_secs}s")]
    LifetimeExceedsCap {
        /// What was asked, in seconds.
        requested_secs: u64,
        /// The cap, in seconds.
        cap_secs: u64,
    },
    /// No lease with that id (or job) exists.
    #[error("lease not found")]
    LeaseNotFound,
    /// The module already holds an active lease for this job.
    #[error("an active lease for job {0:?} already exists; resume it instead")]
    LeaseAlreadyExists(String),
    /// The lease belongs to another module.
    #[error("the lease is held by another module")]
    ActorMismatch,
    /// The lease has ended and cannot renew: why, and the end's detail (the holder's
    /// outcome, an administrator's reason), which the holder may read.
    #[error("the lease has ended: {}", .0.describe())]
    LeaseEnded(EndReason, String),
    /// The refresh token is not one this lease issued (wrong, or superseded by a resume).
    #[error("refresh token is not valid for this lease")]
    RefreshTokenInvalid,
    /// An old refresh token was presented again; the lease has been revoked.
    #[error("refresh token was already used; the lease is revoked as a precaution")]
    RefreshTokenReused,
    /// The module does not serve the tenant of the token, lease or request.
    #[error("this module does not serve tenant {0:?}")]
    TenantNotServed(String),
    /// The module may not mint tokens for this audience.
    #[error("this module may not request audience {0:?}")]
    AudienceNotAllowed(String),
    /// The grant asked for a logout policy the module may not ask for, or one the user's
    /// issuer cannot honour (it sends no back-channel logouts here).
    #[error("logout policy refused: {0}")]
    LogoutPolicyNotAllowed(String),
    /// A back-channel logout token did not verify (answered with HTTP 400).
    #[error("logout token refused: {0}")]
    LogoutTokenInvalid(String),
    /// The module called too often; retry after the delay.
    #[error("too many {what} from this module; retry in {} ms", .retry_after.as_millis())]
    RateLimited {
        /// Which kind of call (`grants`, `renewals`, `introspections`).
        what: &'static str,
        /// When a retry may pass.
        retry_after: std::time::Duration,
    },
    /// The module already holds as many revocation streams as it may.
    #[error("this module already holds {limit} revocation streams; close one first")]
    TooManyStreams {
        /// The limit.
        limit: usize,
    },
    /// The platform's permission service for the user's issuer did not answer usably
    /// (down, slow, or an answer that is not the configured shape); retrying may succeed.
    /// The details are logged where they happen.
    #[error(
        "the permission source of issuer {0:?} is unavailable; the user's permissions \
         could not be read, retry shortly"
    )]
    PermissionSourceUnavailable(String),
    /// The keys of the user token's issuer could not be fetched and none are cached (or
    /// the cached ones are too old); retrying may succeed.
    #[error("the keys of issuer {0:?} could not be fetched; retry shortly")]
    IssuerUnavailable(String),
    /// The store is unreachable or busy; retrying may succeed.
    #[error("storage is unavailable")]
    Unavailable(#[source] StoreError),
    /// A bug or broken invariant; details stay in the server log.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl Error {
    /// Stable machine reason, sent in `google.rpc.ErrorInfo.reason`.
    pub fn reason(&self) -> &'static str {
        use jobtoken_wire::reason as r;
        match self {
            Error::InvalidArgument { .. } => r::INVALID_ARGUMENT,
            Error::ModuleUnauthenticated => r::MODULE_UNAUTHENTICATED,
            Error::AdminUnauthenticated => r::ADMIN_UNAUTHENTICATED,
            Error::SubjectTokenInvalid(_) => r::SUBJECT_TOKEN_INVALID,
            Error::SubjectTokenExpired => r::SUBJECT_TOKEN_EXPIRED,
            Error::SubjectTokenNotYetValid => r::SUBJECT_TOKEN_NOT_YET_VALID,
            Error::SubjectTokenAudience => r::SUBJECT_TOKEN_AUDIENCE,
            Error::UntrustedIssuer(_) => r::UNTRUSTED_ISSUER,
            Error::PermissionNotHeld(_) => r::PERMISSION_NOT_HELD,
            Error::PermissionNotDelegable(_) => r::PERMISSION_NOT_DELEGABLE,
            Error::NoPermissionsGranted => r::NO_PERMISSIONS_GRANTED,
            Error::LifetimeExceedsCap { .. } => r::LIFETIME_EXCEEDS_CAP,
            Error::LeaseNotFound => r::LEASE_NOT_FOUND,
            Error::LeaseAlreadyExists(_) => r::LEASE_ALREADY_EXISTS,
            Error::ActorMismatch => r::ACTOR_MISMATCH,
            Error::LeaseEnded(reason, _) => reason.error_reason(),
            Error::RefreshTokenInvalid => r::REFRESH_TOKEN_INVALID,
            Error::RefreshTokenReused => r::REFRESH_TOKEN_REUSED,
            Error::TenantNotServed(_) => r::TENANT_NOT_SERVED,
            Error::AudienceNotAllowed(_) => r::AUDIENCE_NOT_ALLOWED,
            Error::LogoutPolicyNotAllowed(_) => r::LOGOUT_POLICY_NOT_ALLOWED,
            Error::LogoutTokenInvalid(_) => r::LOGOUT_TOKEN_INVALID,
            Error::RateLimited { .. } => r::RATE_LIMITED,
            Error::TooManyStreams { .. } => r::TOO_MANY_STREAMS,
            Error::PermissionSourceUnavailable(_) => r::PERMISSION_SOURCE_UNAVAILABLE,
            Error::IssuerUnavailable(_) => r::ISSUER_UNAVAILABLE,
            Error::Unavailable(_) => r::UNAVAILABLE,
            Error::Internal(_) => r::INTERNAL,
        }
    }

    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(field: &'static str, problem: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field,
            problem: problem.into(),
        }
    }

    /// Wraps an unexpected failure.
    pub fn internal(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::Internal(Box::new(e))
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => Error::Unavailable(e),
            other => Error::internal(other),
        }
    }
}

/// Result of a domain operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;
