//! The job lease domain: what a lease is, the rules it lives by, and the service that
//! grants, renews, ends and answers for leases.
//!
//! Rules are pure functions of their inputs and an injected clock ([`lease`],
//! [`grant`], [`recheck`], [`ident`]); [`service::LeaseService`] applies
//! them, reaching the world only through [`ports`]: the store, the identity provider's
//! tokens, the platform's permissions and an observer. This crate depends on no gRPC,
//! SQL, HTTP or metrics library, so the compiler keeps it that way; `token-service`
//! holds the adapters and the transport.
//!
//! | behaviour | where |
//! |---|---|
//! | what a lease is, how it renews (rotate, grace retry, reuse) and ends | [`lease`] |
//! | grant: permission intersection, lifetime, logout policy | [`grant`], `service/grant.rs` |
//! | renew and resume, following the user's standing | [`recheck`], `service/renew.rs` |
//! | release, revoke, expiry and idle sweep, purge | `service/end.rs` |
//! | back-channel logout | [`replay`], `service/logout.rs` |
//! | reads: get, list, introspect | `service/query.rs` |
//! | the revocation stream: start, tenants, caught up | `service/revocations.rs` |
//! | refresh tokens, signing keys and their rotation | [`crypto`] |
//! | input limits | [`limits`] |
//! | the audit trail | `audit.rs` |

mod audit;
pub mod clock;
pub mod crypto;
pub mod error;
pub mod grant;
pub mod ident;
pub mod lease;
pub mod limits;
pub mod module;
pub mod ports;
pub mod recheck;
pub mod replay;
pub mod service;
pub mod settings;
