//! The permission-source port: the user's permissions held by the platform, for issuers
//! whose tokens do not carry them (FOLIO Eureka, FOLIO Okapi). The HTTP adapter is the
//! service crate's `platform` module.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::settings::OnWithdrawn;

/// Whose permissions to read. Holds the user's token: `Debug` redacts it.
pub struct PermissionQuery<'a> {
    /// The trusted-issuer entry whose source to ask ([`crate::ports::Subject::permission_source`]).
    pub source: &'a str,
    /// The user's tenant.
    pub tenant: &'a str,
    /// The user (the issuer's `subject_claim`): `{user_id}`.
    pub user_id: &'a str,
    /// The token's `sub`: `{sub}`.
    pub sub: Option<&'a str>,
    /// The user's own token, sent to the source. Secret.
    pub token: &'a str,
}

impl fmt::Debug for PermissionQuery<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PermissionQuery")
            .field("source", &self.source)
            .field("tenant", &self.tenant)
            .field("user_id", &self.user_id)
            .field("sub", &self.sub)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// Whose standing to re-check at a renewal. No user token is at hand: the source is
/// asked with the service's own credential.
#[derive(Debug, Clone, Copy)]
pub struct RecheckQuery<'a> {
    /// The trusted-issuer entry whose source to ask.
    pub source: &'a str,
    /// The user's tenant.
    pub tenant: &'a str,
    /// The user (`{user_id}`).
    pub user_id: &'a str,
    /// The token's `sub` at grant (`{sub}`).
    pub sub: Option<&'a str>,
}

/// What a re-check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recheck {
    /// The user holds these permissions now.
    Holds(BTreeSet<String>),
    /// The platform says the user no longer exists or is disabled.
    Gone(&'static str),
    /// The source could not be asked, or its answer could not be read.
    Unanswered(String),
}

/// How an issuer's leases follow their users' permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecheckPolicy {
    /// Re-check at a renewal when the last check is older than this.
    pub interval: Duration,
    /// What a withdrawn permission does.
    pub on_withdrawn: OnWithdrawn,
    /// End a lease whose permissions went unconfirmed longer than this.
    pub max_unverified: Option<Duration>,
}

/// The port: the user's permissions held by the platform.
#[async_trait::async_trait]
pub trait PermissionSource: Send + Sync + 'static {
    /// The permissions the user holds, by the source named in `query`.
    async fn permissions(&self, query: &PermissionQuery<'_>) -> Result<BTreeSet<String>>;

    /// How leases of users of `source` are re-checked; `None`: they are not.
    fn recheck_policy(&self, _source: &str) -> Option<RecheckPolicy> {
        None
    }

    /// The user's standing now, asked with the service's own credential.
    async fn recheck(&self, query: &RecheckQuery<'_>) -> Recheck {
        Recheck::Unanswered(format!("no permission source {:?}", query.source))
    }
}

/// The source of a service with no `http` permission source configured: asking it is a
/// bug (no verified subject names a source then).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPermissionSource;

#[async_trait::async_trait]
impl PermissionSource for NoPermissionSource {
    async fn permissions(&self, query: &PermissionQuery<'_>) -> Result<BTreeSet<String>> {
        Err(Error::internal(std::io::Error::other(format!(
            "no permission source for issuer {:?}",
            query.source
        ))))
    }
}
