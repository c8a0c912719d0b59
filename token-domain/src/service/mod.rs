//! The lease domain: grant, renew, resume, release, revoke, introspect. Transport-free:
//! takes domain types, returns [`crate::error::Error`]. One file per behaviour:
//! granting (`grant.rs`, applying [`crate::grant`]), renewal and resume with the user's standing (`renew.rs`),
//! every way a lease ends (`end.rs`), back-channel logout (`logout.rs`), reads
//! (`query.rs`) and the revocation stream ([`revocations`]); this file holds the
//! service and what its behaviours share.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use tokio::sync::watch;

use crate::clock::{Clock, from_millis, to_millis, to_unix_secs};
use crate::crypto::keys::{AccessClaims, Actor, KeyError, KeyRing};
use crate::crypto::secrets::{IssuedRefreshToken, MasterKey, RefreshToken, random_bytes};
use crate::error::{Error, Result};
use crate::lease::{EndReason, EventKind, Lease, LeaseEvent, OnLogout, Renewal, Standing};
use crate::limits::{
    DEFAULT_PAGE_SIZE, MAX_DETAIL_LEN, MAX_ID_LEN, MAX_PAGE_SIZE, MAX_STREAM_TENANTS, MAX_TOKEN_LEN,
};
use crate::module::Module;
use crate::ports::Observer;
use crate::ports::{LeaseFilter, Logout, Store, StoreError, Subjects};
use crate::ports::{
    NoPermissionSource, PermissionQuery, PermissionSource, Recheck, RecheckPolicy, RecheckQuery,
};
use crate::recheck::{self, Verdict};
use crate::replay::{Refused, ReplayGuard};
use crate::settings::Settings;

/// How often a compare-and-set is retried under contention before giving up.
const CAS_ATTEMPTS: usize = 32;

/// A grant request.
#[derive(Clone)]
pub struct IssueRequest {
    /// The user's token. Secret.
    pub subject_token: String,
    /// The module's job id.
    pub job_id: String,
    /// Requested permissions; empty means all delegable ones the user holds.
    pub permissions: Vec<String>,
    /// Requested lifetime; `None` means the module's default.
    pub max_lifetime: Option<Duration>,
    /// Token audience; `None` means the default.
    pub audience: Option<String>,
    /// What a logout of the user does to the lease; `None` means the module's default.
    pub on_logout: Option<OnLogout>,
}

impl fmt::Debug for IssueRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssueRequest")
            .field("subject_token", &"<redacted>")
            .field("job_id", &self.job_id)
            .field("permissions", &self.permissions)
            .field("max_lifetime", &self.max_lifetime)
            .field("audience", &self.audience)
            .field("on_logout", &self.on_logout)
            .finish()
    }
}

/// An access token and the refresh token for the next renewal.
#[derive(Clone)]
pub struct TokenPair {
    /// Signed JWT. Secret.
    pub access_token: String,
    /// Its `exp`.
    pub expires_at: SystemTime,
    /// Its remaining life when minted.
    pub expires_in: Duration,
    /// The refresh token. Secret.
    pub refresh_token: IssuedRefreshToken,
}

impl fmt::Debug for TokenPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenPair")
            .field("access_token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .field("expires_in", &self.expires_in)
            .field("refresh_token", &self.refresh_token)
            .finish()
    }
}

/// The result of a grant.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The new lease.
    pub lease: Lease,
    /// Its first tokens.
    pub tokens: TokenPair,
    /// Hard expiry minus creation.
    pub granted_lifetime: Duration,
    /// Whether the lifetime was clamped to the cap.
    pub clamped: bool,
}

/// One page of leases.
#[derive(Debug, Clone)]
pub struct LeasePage {
    /// The leases.
    pub leases: Vec<Lease>,
    /// Token of the next page; `None` on the last.
    pub next_page_token: Option<String>,
}

/// The lease domain service.
pub struct LeaseService {
    store: Arc<dyn Store>,
    keys: Arc<KeyRing>,
    master: MasterKey,
    /// Swapped by a config reload.
    subjects: ArcSwap<Arc<dyn Subjects>>,
    /// The platform's permissions, for issuers whose tokens do not carry them; swapped
    /// with the issuers by a config reload.
    permission_source: ArcSwap<Arc<dyn PermissionSource>>,
    clock: Arc<dyn Clock>,
    settings: Settings,
    /// Bumped whenever this process ends a lease, so revocation streams wake at once.
    ends: watch::Sender<u64>,
    /// Ids of the logout tokens taken, so none is taken twice.
    logouts: ReplayGuard,
    metrics: Arc<dyn Observer>,
}

impl fmt::Debug for LeaseService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseService")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Runs `$attempt`, an async block that reads a lease, decides and writes with
/// compare-and-set, ending in a [`Cas`], until it is done or has lost [`CAS_ATTEMPTS`]
/// races to other writers of the lease. A macro because a function taking an async
/// closure would make the RPC's future not `Send`.
macro_rules! with_cas {
    ($service:expr, |$now:ident| $attempt:block) => {{
        let mut outcome = Err(contention());
        for _ in 0..CAS_ATTEMPTS {
            let $now = $service.clock.now();
            let attempt: Result<Cas<_>> = async $attempt.await;
            if let Cas::Done(done) = attempt? {
                outcome = Ok(done);
                break;
            }
        }
        outcome
    }};
}

fn contention() -> Error {
    Error::Unavailable(StoreError::Unavailable(
        "too much contention on one lease".into(),
    ))
}

/// A lease read from the store, at the time of a call.
enum Liveness {
    /// It may renew.
    Active,
    /// It has ended (maybe just now, its time having run out): why, and the detail.
    Ended(EndReason, String),
    /// Its time ran out, but another writer changed it first: read it again.
    LostRace,
}

/// What one compare-and-set attempt came to.
enum Cas<T> {
    /// Decided (and written, if it wrote).
    Done(T),
    /// Another writer changed the lease first: read it again and decide again.
    Retry,
}

/// Whether a renewal goes on after following the user's standing.
enum AfterStanding {
    /// It renews; a narrowing withdrew these permissions, if any.
    Renews(Option<Vec<String>>),
    /// Ending the lease lost a race with another write: read it again.
    LostRace,
}

/// The lease must be `module`'s, in a tenant it (still) serves.
fn check_holder(module: &Module, lease: &Lease) -> Result<()> {
    if lease.actor != module.id {
        return Err(Error::ActorMismatch);
    }
    if !module.serves(&lease.tenant) {
        return Err(Error::TenantNotServed(lease.tenant.clone()));
    }
    Ok(())
}

fn check_id(field: &'static str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    crate::ident::check(value, MAX_ID_LEN).map_err(|p| Error::invalid(field, p.to_string()))
}

fn check_text(field: &'static str, value: &str, max: usize) -> Result<()> {
    crate::ident::check_text(value, max).map_err(|p| Error::invalid(field, p.to_string()))
}

/// A new lease id: a UUIDv7 stamped with the injected clock's `now`.
fn lease_id(now: SystemTime) -> String {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let ts = uuid::Timestamp::from_unix(uuid::NoContext, since.as_secs(), since.subsec_nanos());
    uuid::Uuid::new_v7(ts).to_string()
}

impl LeaseService {
    /// Assembles the service.
    pub fn new(
        store: Arc<dyn Store>,
        keys: Arc<KeyRing>,
        master: MasterKey,
        subjects: Arc<dyn Subjects>,
        clock: Arc<dyn Clock>,
        settings: Settings,
        metrics: Arc<dyn Observer>,
    ) -> Self {
        Self {
            store,
            keys,
            master,
            subjects: ArcSwap::from_pointee(subjects),
            permission_source: ArcSwap::from_pointee(
                Arc::new(NoPermissionSource) as Arc<dyn PermissionSource>
            ),
            clock,
            settings,
            ends: watch::channel(0).0,
            logouts: ReplayGuard::default(),
            metrics,
        }
    }

    /// Reads the permissions of users whose issuer has a permission source from
    /// `source` (by default none is configured).
    pub fn with_permission_source(self, source: Arc<dyn PermissionSource>) -> Self {
        self.permission_source.store(Arc::new(source));
        self
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Replaces the trusted issuers and their permission sources (a config reload);
    /// grants in flight finish with the issuers they started with.
    pub fn set_issuers(&self, subjects: Arc<dyn Subjects>, permissions: Arc<dyn PermissionSource>) {
        self.subjects.store(Arc::new(subjects));
        self.permission_source.store(Arc::new(permissions));
    }

    /// The signing keys.
    pub fn keys(&self) -> &KeyRing {
        &self.keys
    }

    /// The current time, by the injected clock.
    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }

    fn mint(&self, lease: &Lease, now: SystemTime) -> Result<TokenPair> {
        // `exp` is in whole seconds: round the TTL up (a 1 s token never lives less than
        // 1 s) but the hard expiry down (no token outlives its lease).
        let ttl_end = to_millis(now + self.settings.access_token_ttl);
        let exp = (ttl_end + 999)
            .div_euclid(1000)
            .min(to_unix_secs(lease.expires_at));
        let claims = AccessClaims {
            iss: self.settings.issuer.clone(),
            sub: lease.subject.clone(),
            aud: lease.audience.clone(),
            exp,
            iat: to_unix_secs(now),
            nbf: to_unix_secs(now),
            jti: uuid::Uuid::new_v4().to_string(),
            tenant: lease.tenant.clone(),
            permissions: lease.permissions.clone(),
            job_id: lease.job_id.clone(),
            lease_id: lease.id.clone(),
            act: Actor {
                sub: lease.actor.clone(),
            },
        };
        let access_token = self.keys.sign(&claims, now).map_err(Error::internal)?;
        // Report exactly the `exp` in the token (whole seconds), so holders schedule from it.
        let expires_at = UNIX_EPOCH + Duration::from_secs(exp.max(0).unsigned_abs());
        Ok(TokenPair {
            access_token,
            expires_at,
            expires_in: expires_at.duration_since(now).unwrap_or_default(),
            refresh_token: self
                .master
                .refresh_token(&lease.id, &lease.seed, lease.generation),
        })
    }

    /// Rotates the signing key. Returns `(new kid, retired kid, signing starts at)`.
    pub async fn rotate_signing_key(&self) -> Result<(String, String, SystemTime)> {
        let (new, old, starts) = self
            .keys
            .rotate(self.clock.now())
            .await
            .map_err(|e| match e {
                KeyError::Store(s) => Error::from(s),
                other => Error::internal(other),
            })?;
        let starts_in = starts.duration_since(self.clock.now()).unwrap_or_default();
        crate::audit::keys_rotated(&new, &old, starts_in);
        Ok((new, old, starts))
    }
}

// After `with_cas!`, which they use (macros are in scope from their definition on).
mod end;
mod grant;
mod logout;
mod query;
mod renew;
pub mod revocations;
