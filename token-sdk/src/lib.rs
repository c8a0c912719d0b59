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
//!
//! The lease follows the user's standing: the service re-checks the user at renewal.
//! Depending on the module's policy, a user who lost a permission the lease carried
//! either ends it ([`EndReason::PermissionsWithdrawn`]) or narrows it: the renewal
//! carries fewer permissions, and [`Lease::permissions`] and
//! [`Lease::permission_changes`] tell the job, so it can checkpoint the work it can no
//! longer do. A user disabled at the identity platform ends the lease
//! ([`EndReason::SubjectDisabled`]), as does a user's logout for a lease granted with
//! [`OnLogout::End`] ([`EndReason::SubjectLoggedOut`]; see [`LeaseRequest::on_logout`]),
//! and permissions the service cannot confirm for too long
//! ([`EndReason::PermissionsUnverifiable`]).

mod api;
mod client;
mod clock;
mod end;
mod error;
mod health;
mod incoming;
mod lease;
mod outgoing;
mod schedule;
mod transport;
mod watcher;

pub use client::{Client, ClientBuilder, LeaseRequest};
pub use end::{EndReason, LeaseEnd};
pub use error::{Error, error_reason, is_transient};
pub use health::{RenewalStats, RevocationFeed};
pub use incoming::layer::{VerifyLayer, VerifyService};
pub use incoming::verifier::{
    Claims, DEFAULT_REFETCH_INTERVAL, Verifier, VerifierBuilder, VerifyError, WhenBlind,
};
pub use lease::{AccessToken, Lease, LeaseInfo, LeaseState, OnLogout, Outcome};
pub use outgoing::auth_layer::{AuthLayer, AuthService};
pub use outgoing::interceptor::BearerInterceptor;
pub use schedule::{
    FLOOR, Phase, RenewalConfig, URGENT_RETRIES, backoff, phase, reconnect_in, refresh_in,
};
pub use transport::{
    ADMIN_KEY_HEADER, AdminClient, JobTokenClient, KeyInterceptor, MODULE_KEY_HEADER, connect,
    connect_admin,
};

/// The generated `jobtoken.v1` types and clients.
pub use jobtoken_proto::jobtoken::v1 as proto;
