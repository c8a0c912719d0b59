//! Client side of the job token service: hold a job lease, keep its token fresh for as
//! long as the job runs, and put the token on outgoing calls.
//!
//! ```no_run
//! # async fn import(records: Vec<String>, user_token: String) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use token_sdk::{Client, Outcome};
//!
//! let client = Client::builder("http://127.0.0.1:50051")
//!     .module_key(std::env::var("MODULE_KEY")?)
//!     .connect()
//!     .await?;
//! let lease = client
//!     .lease("import-2024-05-01", user_token)
//!     .permissions(["inventory.write"])
//!     .max_lifetime(Duration::from_secs(6 * 3600))
//!     .start()
//!     .await?;
//! for record in records {
//!     if let token_sdk::LeaseState::Ended(end) = lease.state() {
//!         println!("lease ended ({:?}): checkpoint and stop", end.reason);
//!         break;
//!     }
//!     let token = lease.access_token(); // lock-free, always fresh
//!     // ... send `record` with `Authorization: Bearer {token.secret()}` ...
//! #   let _ = (record, token);
//! }
//! lease.release(Outcome::Succeeded).await?;
//! # Ok(()) }
//! ```
//!
//! Renewal runs in one background task per lease, scheduled from the durations the
//! service returns (see [`RenewalConfig`]); transient failures retry with the same
//! refresh token on the schedule of [`backoff`]: politely while the token is healthy,
//! about every second once it nears expiry or has expired, and at once when the service
//! is seen back, so a job holds a fresh token well within a second of an outage's end.
//! Terminal failures end the lease and [`Lease::ended`] says why. Revocations reach the
//! lease within a second through the service's revocation stream, which runs on a
//! connection of its own and reports whether it is live ([`RevocationFeed`]).

mod api;
mod auth_layer;
mod client;
mod clock;
mod health;
mod interceptor;
mod jwt;
mod layer;
mod lease;
mod schedule;
mod verifier;
mod watcher;

pub use auth_layer::{AuthLayer, AuthService};
pub use client::{Client, ClientBuilder, LeaseRequest};
pub use health::{RenewalStats, RevocationFeed};
pub use interceptor::BearerInterceptor;
pub use layer::{VerifyLayer, VerifyService};
pub use lease::{AccessToken, EndReason, Lease, LeaseEnd, LeaseInfo, LeaseState, Outcome};
pub use schedule::{
    FLOOR, Phase, RenewalConfig, URGENT_RETRIES, backoff, phase, reconnect_in, refresh_in,
};
pub use verifier::{
    Claims, DEFAULT_REFETCH_INTERVAL, Verifier, VerifierBuilder, VerifyError, WhenBlind,
};

use std::fmt;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};
use tonic_types::StatusExt;

/// The generated `jobtoken.v1` types and clients.
pub use jobtoken_proto::jobtoken::v1 as proto;

/// Metadata key the service reads a module key from.
pub const MODULE_KEY_HEADER: &str = "x-module-key";
/// Metadata key the admin service reads the admin key from.
pub const ADMIN_KEY_HEADER: &str = "x-admin-key";

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

/// Adds a credential header to every request. The value is marked sensitive, so it is
/// redacted from tonic's and this type's `Debug` output.
#[derive(Clone)]
pub struct KeyInterceptor {
    header: &'static str,
    value: Option<MetadataValue<Ascii>>,
}

impl fmt::Debug for KeyInterceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyInterceptor")
            .field("header", &self.header)
            .field("value", &"<redacted>")
            .finish()
    }
}

impl KeyInterceptor {
    /// Sends `key` as the module key.
    pub fn module_key(key: &str) -> Result<Self, Error> {
        Self::new(MODULE_KEY_HEADER, key)
    }

    /// Sends `key` as the admin key.
    pub fn admin_key(key: &str) -> Result<Self, Error> {
        Self::new(ADMIN_KEY_HEADER, key)
    }

    /// Sends no key (the module authenticates by mTLS certificate).
    pub fn none() -> Self {
        Self {
            header: MODULE_KEY_HEADER,
            value: None,
        }
    }

    fn new(header: &'static str, key: &str) -> Result<Self, Error> {
        let mut value: MetadataValue<Ascii> = key.parse().map_err(|_| Error::InvalidKey)?;
        value.set_sensitive(true);
        Ok(Self {
            header,
            value: Some(value),
        })
    }
}

impl Interceptor for KeyInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.value {
            request.metadata_mut().insert(self.header, value.clone());
        }
        Ok(request)
    }
}

/// A `JobTokenService` client that authenticates as a module.
pub type JobTokenClient = proto::job_token_service_client::JobTokenServiceClient<
    InterceptedService<Channel, KeyInterceptor>,
>;

/// An `AdminService` client that authenticates with the admin key.
pub type AdminClient =
    proto::admin_service_client::AdminServiceClient<InterceptedService<Channel, KeyInterceptor>>;

/// Connects to the service at `endpoint` (e.g. `http://127.0.0.1:50051`) as the module
/// whose key is `module_key`.
pub async fn connect(endpoint: &str, module_key: &str) -> Result<JobTokenClient, Error> {
    let interceptor = KeyInterceptor::module_key(module_key)?;
    let channel = Endpoint::from_shared(endpoint.to_owned())?
        .connect()
        .await?;
    Ok(
        proto::job_token_service_client::JobTokenServiceClient::with_interceptor(
            channel,
            interceptor,
        ),
    )
}

/// Connects to the admin service at `endpoint` with the admin key.
pub async fn connect_admin(endpoint: &str, admin_key: &str) -> Result<AdminClient, Error> {
    let interceptor = KeyInterceptor::admin_key(admin_key)?;
    let channel = Endpoint::from_shared(endpoint.to_owned())?
        .connect()
        .await?;
    Ok(proto::admin_service_client::AdminServiceClient::with_interceptor(channel, interceptor))
}

/// The stable machine reason of a failed call (`google.rpc.ErrorInfo.reason`), such as
/// `LEASE_REVOKED` or `REFRESH_TOKEN_REUSED`.
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
        .and_then(|info| info.metadata.get("field").cloned())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interceptor_sets_the_header_and_hides_the_key() {
        let mut i = KeyInterceptor::module_key("mk_secret").unwrap();
        let req = i.call(Request::new(())).unwrap();
        assert_eq!(req.metadata().get(MODULE_KEY_HEADER).unwrap(), "mk_secret");
        assert!(!format!("{i:?}").contains("mk_secret"));
        assert!(!format!("{:?}", req.metadata()).contains("mk_secret"));
        assert!(matches!(
            KeyInterceptor::module_key("bad\nkey"),
            Err(Error::InvalidKey)
        ));
    }

    #[test]
    fn error_reason_reads_error_info() {
        let status = Status::with_error_details(
            tonic::Code::FailedPrecondition,
            "ended",
            tonic_types::ErrorDetails::with_error_info(
                "LEASE_REVOKED",
                "jobtoken.v1",
                std::collections::HashMap::new(),
            ),
        );
        assert_eq!(error_reason(&status).as_deref(), Some("LEASE_REVOKED"));
        assert_eq!(error_reason(&Status::internal("x")), None);
    }
}
