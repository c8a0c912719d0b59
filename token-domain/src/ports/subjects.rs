//! The subject port: who the user behind a token is, as the trusted issuers vouch. The
//! adapter (JWT verification, issuer keys fetched over HTTP) is the service crate's
//! `subject` module.

use std::collections::BTreeSet;
use std::time::SystemTime;

use crate::error::Result;

/// Verifies the tokens the identity provider issues: subject tokens at a grant, logout
/// tokens at a back-channel logout.
#[async_trait::async_trait]
pub trait Subjects: Send + Sync + 'static {
    /// The user `token` vouches for at `now`, fetching the issuer's keys when needed.
    async fn verify(&self, token: &str, now: SystemTime) -> Result<Subject>;

    /// Whom the logout token `token` logs out, at `now`.
    async fn verify_logout(&self, token: &str, now: SystemTime) -> Result<LogoutClaims>;
}

/// The verified user behind a subject token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// The issuer that vouched for the user (for a token without `iss`, its entry's
    /// name).
    pub issuer: String,
    /// The user: the issuer's `subject_claim` (default `sub`).
    pub subject: String,
    /// The token's `sub`, when it has one (a placeholder of the permission source, and
    /// how logout tokens name the user).
    pub sub: Option<String>,
    /// The user's session at the issuer (`sid`), when the token names one.
    pub session_id: Option<String>,
    /// Whether the issuer's back-channel logouts are received (so `on_logout = end` can
    /// be honoured).
    pub logout_received: bool,
    /// The user's tenant.
    pub tenant: String,
    /// The user's permissions, from the token; empty when `permission_source` is set.
    pub permissions: BTreeSet<String>,
    /// The trusted-issuer entry whose permission source holds the user's permissions;
    /// `None` when they came from the token.
    pub permission_source: Option<String>,
}

/// What a verified logout token says: whom the issuer logged out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutClaims {
    /// The issuer (`iss`).
    pub issuer: String,
    /// The session logged out (`sid`), if named.
    pub session_id: Option<String>,
    /// The user logged out (`sub`), if named.
    pub sub: Option<String>,
    /// The token's id, refused if seen again.
    pub jti: String,
    /// When the issuer made the token (`iat`): leases granted later are not its concern.
    pub issued_at: SystemTime,
    /// Until when the `jti` must be remembered: after it, the token is too old anyway.
    pub remember_until: SystemTime,
}
