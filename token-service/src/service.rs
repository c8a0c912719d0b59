//! The lease domain: grant, renew, resume, release, revoke, introspect. Transport-free:
//! takes domain types, returns [`crate::error::Error`].

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use tokio::sync::watch;

use crate::auth::Module;
use crate::clock::{Clock, from_millis, to_millis, to_unix_secs};
use crate::config::{Config, OverCap};
use crate::error::{Error, Result};
use crate::keys::{AccessClaims, Actor, KeyRing};
use crate::lease::{EndReason, EventKind, Lease, LeaseEvent, OnLogout, Standing};
use crate::metrics::Metrics;
use crate::permissions;
use crate::platform::{
    NoPermissionSource, PermissionQuery, PermissionSource, Recheck, RecheckPolicy, RecheckQuery,
};
use crate::recheck::{self, Verdict};
use crate::replay::{Refused, ReplayGuard};
use crate::secrets::{IssuedRefreshToken, MasterKey, RefreshToken, random_bytes};
use crate::store::{LeaseFilter, Logout, Store, StoreError};
use crate::subject::SubjectVerifier;

/// Largest request message accepted; field limits are far below it.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Longest job id, lease id, audience.
pub const MAX_ID_LEN: usize = 200;
/// Longest free-text reason or detail.
pub const MAX_DETAIL_LEN: usize = 1000;
/// Longest access or refresh token accepted for checking.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Longest lease lifetime anyone may ask for; beyond is surely a mistake.
pub const ABSURD_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);
/// How often a compare-and-set is retried under contention before giving up.
const CAS_ATTEMPTS: usize = 32;
/// Largest page of ListLeases.
pub const MAX_PAGE_SIZE: usize = 500;
/// Page size of ListLeases when none is asked for.
pub const DEFAULT_PAGE_SIZE: usize = 50;

/// The settings the domain needs, taken from [`Config`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// `iss` of access tokens.
    pub issuer: String,
    /// `aud` when a request names none.
    pub default_audience: String,
    /// Access-token lifetime.
    pub access_token_ttl: Duration,
    /// Idle timeout of leases.
    pub idle_timeout: Duration,
    /// Grace window of the previous refresh token.
    pub refresh_grace: Duration,
    /// Over-cap lifetime policy.
    pub over_cap: OverCap,
}

impl Settings {
    /// From the service config.
    pub fn from_config(c: &Config) -> Self {
        Self {
            issuer: c.issuer.clone(),
            default_audience: c.default_audience.clone(),
            access_token_ttl: c.access_token_ttl,
            idle_timeout: c.idle_timeout,
            refresh_grace: c.refresh_grace,
            over_cap: c.lifetime_over_cap,
        }
    }
}

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
    subjects: ArcSwap<SubjectVerifier>,
    /// The platform's permissions, for issuers whose tokens do not carry them; swapped
    /// with the issuers by a config reload.
    permission_source: ArcSwap<Arc<dyn PermissionSource>>,
    clock: Arc<dyn Clock>,
    settings: Settings,
    /// Bumped whenever this process ends a lease, so revocation streams wake at once.
    ends: watch::Sender<u64>,
    /// Ids of the logout tokens taken, so none is taken twice.
    logouts: ReplayGuard,
    metrics: Arc<Metrics>,
}

impl fmt::Debug for LeaseService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseService")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Whether a renewal goes on after following the user's standing.
enum AfterStanding {
    /// It renews; a narrowing withdrew what this says, if anything.
    Renews(Option<String>),
    /// Ending the lease lost a race with another write: read it again.
    LostRace,
}

/// One audit event about a lease that stays active (renewed, retried, resumed).
fn audit_lease(event: &'static str, lease: &Lease) {
    tracing::info!(
        target: "audit",
        event,
        lease_id = %lease.id,
        job_id = %lease.job_id,
        tenant = %lease.tenant,
        actor = %lease.actor,
        generation = lease.generation,
        refresh_count = lease.refresh_count,
        resume_count = lease.resume_count,
    );
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

fn encode_page_token(lease: &Lease) -> String {
    B64.encode(format!("{}:{}", to_millis(lease.created_at), lease.id))
}

fn decode_page_token(token: &str) -> Result<(SystemTime, String)> {
    let bad = || Error::invalid("page_token", "is not a token from a previous page");
    let text = String::from_utf8(B64.decode(token).map_err(|_| bad())?).map_err(|_| bad())?;
    let (ms, id) = text.split_once(':').ok_or_else(bad)?;
    Ok((from_millis(ms.parse().map_err(|_| bad())?), id.to_owned()))
}

impl LeaseService {
    /// Assembles the service.
    pub fn new(
        store: Arc<dyn Store>,
        keys: Arc<KeyRing>,
        master: MasterKey,
        subjects: SubjectVerifier,
        clock: Arc<dyn Clock>,
        settings: Settings,
        metrics: Arc<Metrics>,
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
    pub fn set_issuers(&self, subjects: SubjectVerifier, permissions: Arc<dyn PermissionSource>) {
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

    fn contention() -> Error {
        Error::Unavailable(StoreError::Unavailable(
            "too much contention on one lease".into(),
        ))
    }

    /// Ends `lease` if its time has run out; returns the reason it is (now) ended, if so.
    /// `Ok(None)`: it is active. `Err` only on store failure; a lost race returns the
    /// sentinel `Some(None)` handled by the callers' retry loops.
    async fn end_if_due(
        &self,
        lease: &Lease,
        now: SystemTime,
    ) -> Result<Option<Option<(EndReason, String)>>> {
        if let Some(end) = &lease.end {
            return Ok(Some(Some((end.reason, end.detail.clone()))));
        }
        let Some(reason) = lease.due_end(now) else {
            return Ok(None);
        };
        let mut ended = lease.clone();
        let at = now.min(lease.deadline());
        ended.finish(reason, at, "system", reason.describe());
        if self.write_end(&ended).await? {
            Ok(Some(Some((reason, reason.describe().to_owned()))))
        } else {
            Ok(Some(None))
        }
    }

    /// Writes an ended lease with its event; `false` if someone else wrote first.
    async fn write_end(&self, ended: &Lease) -> Result<bool> {
        let event = LeaseEvent::ended(
            ended,
            self.settings.access_token_ttl,
            self.settings.refresh_grace,
        );
        let written = self
            .store
            .update_lease(ended, event.as_ref())
            .await?
            .is_some();
        if written {
            if let Some(end) = &ended.end {
                self.metrics.lease_ended(end.reason.as_str());
                tracing::info!(
                    target: "audit",
                    event = "lease.ended",
                    lease_id = %ended.id,
                    job_id = %ended.job_id,
                    tenant = %ended.tenant,
                    actor = %ended.actor,
                    subject = %ended.subject,
                    reason = end.reason.as_str(),
                    by = %end.by,
                    detail = %end.detail,
                );
            }
            self.ends.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(written)
    }

    /// Asks the platform for the user's standing when a re-check of `lease` is due.
    async fn recheck_if_due(
        &self,
        lease: &Lease,
        now: SystemTime,
    ) -> Option<(RecheckPolicy, Recheck)> {
        let source = lease.standing.permission_source.as_deref()?;
        let sources = self.permission_source.load_full();
        let policy = sources.recheck_policy(source)?;
        if !recheck::due(lease, &policy, now) {
            return None;
        }
        let found = sources
            .recheck(&RecheckQuery {
                source,
                tenant: &lease.tenant,
                user_id: &lease.subject,
                sub: lease.standing.sub.as_deref(),
            })
            .await;
        Some((policy, found))
    }

    /// Follows the user's standing before `lease` renews or resumes at `now`: asks the
    /// platform when a re-check is due (once per call: `found` keeps the answer across
    /// compare-and-set retries) and applies the answer. Ends the lease, and returns
    /// [`Error::LeaseEnded`], when the answer says so.
    async fn before_renewal(
        &self,
        lease: &mut Lease,
        found: &mut Option<Option<(RecheckPolicy, Recheck)>>,
        now: SystemTime,
    ) -> Result<AfterStanding> {
        if found.is_none() {
            *found = Some(self.recheck_if_due(lease, now).await);
        }
        let Some(Some((policy, answer))) = found.as_ref() else {
            return Ok(AfterStanding::Renews(None));
        };
        match self.follow_standing(lease, policy, answer, now) {
            Ok(narrowed) => Ok(AfterStanding::Renews(narrowed)),
            Err((reason, detail)) => {
                lease.finish(reason, now, "system", &detail);
                if !self.write_end(lease).await? {
                    return Ok(AfterStanding::LostRace);
                }
                Err(Error::LeaseEnded(reason, detail))
            }
        }
    }

    /// Applies what a re-check found to `lease`: `Ok` with what a narrowing withdrew, if
    /// anything; `Err` with the reason the lease must end.
    fn follow_standing(
        &self,
        lease: &mut Lease,
        policy: &RecheckPolicy,
        answer: &Recheck,
        now: SystemTime,
    ) -> std::result::Result<Option<String>, (EndReason, String)> {
        let verdict = recheck::decide(lease, answer, policy, now);
        let source = lease.standing.permission_source.clone().unwrap_or_default();
        let unverified = match &verdict {
            Verdict::Unverified { unverified_for, .. } => Some(*unverified_for),
            _ => None,
        };
        self.metrics.recheck(&source, verdict.label(), unverified);
        match verdict {
            Verdict::Confirmed => {
                lease.standing.permissions_checked_at = Some(now);
                Ok(None)
            }
            Verdict::Narrow {
                remaining,
                withdrawn,
            } => {
                lease.permissions = remaining;
                lease.standing.permissions_checked_at = Some(now);
                let detail = format!("permissions withdrawn: {}", withdrawn.join(", "));
                tracing::info!(
                    target: "audit",
                    event = "lease.narrowed",
                    lease_id = %lease.id,
                    tenant = %lease.tenant,
                    actor = %lease.actor,
                    subject = %lease.subject,
                    withdrawn = %withdrawn.join(","),
                );
                Ok(Some(detail))
            }
            Verdict::End(reason, detail) => Err((reason, detail)),
            Verdict::Unverified {
                unverified_for,
                problem,
            } => {
                tracing::warn!(
                    lease_id = %lease.id,
                    tenant = %lease.tenant,
                    issuer = %source,
                    unverified_secs = unverified_for.as_secs(),
                    error = %problem,
                    "permission re-check failed: the lease renews with what it holds"
                );
                Ok(None)
            }
        }
    }

    /// OpenID Connect back-channel logout: verifies `logout_token` and ends every active
    /// lease with policy `end` it reaches (granted from the session it names, or of the
    /// user it names, before the logout). Returns how many it ended.
    pub async fn backchannel_logout(&self, logout_token: &str) -> Result<usize> {
        let outcome = self.log_out(logout_token).await;
        let result = match &outcome {
            Ok(_) => "accepted",
            Err(Error::LogoutTokenInvalid(problem)) => {
                tracing::warn!(error = %problem, "back-channel logout refused");
                "invalid"
            }
            Err(e) => {
                tracing::warn!(error = %e, "back-channel logout could not be carried out");
                "unavailable"
            }
        };
        self.metrics.logout(result);
        outcome
    }

    async fn log_out(&self, logout_token: &str) -> Result<usize> {
        const PAGE: usize = 500;
        if logout_token.is_empty() {
            return Err(Error::LogoutTokenInvalid("logout_token is required".into()));
        }
        let now = self.clock.now();
        let subjects = self.subjects.load_full();
        let claims = subjects.verify_logout(logout_token, now).await?;
        match self
            .logouts
            .take(&claims.issuer, &claims.jti, claims.remember_until, now)
        {
            Ok(()) => {}
            Err(Refused::Replayed) => {
                return Err(Error::LogoutTokenInvalid(
                    "the logout token was already received (jti)".into(),
                ));
            }
            // Refusing would leave the user's leases running. A replay is harmless (ending
            // is idempotent and later leases are untouched), so carry it out unremembered.
            Err(Refused::Full) => tracing::warn!(
                limit = crate::replay::MAX_REMEMBERED,
                "logout token ids not remembered: too many logouts within max_age"
            ),
        }
        let logout = Logout {
            issuer: claims.issuer.clone(),
            session_id: claims.session_id.clone(),
            sub: claims.sub.clone(),
        };
        // `iat` is in whole seconds: a lease granted within its second predates it.
        let logged_out_at = claims.issued_at + Duration::from_secs(1);
        let detail = "the user's session was logged out at the identity provider";
        let mut ended = 0;
        let outcome: Result<()> = async {
            loop {
                let page = self.store.leases_to_log_out(&logout, PAGE).await?;
                let mut ended_now = 0;
                for lease in page.iter().filter(|l| l.created_at < logged_out_at) {
                    let (_, by_this_call) = self
                        .end_lease(
                            &lease.id,
                            EndReason::SubjectLoggedOut,
                            "system",
                            detail,
                            |_| Ok(()),
                        )
                        .await?;
                    ended_now += usize::from(by_this_call);
                }
                ended += ended_now;
                // Leases granted after the logout stay in the answer: stop once a page
                // ends nothing or is the last.
                if page.len() < PAGE || ended_now == 0 {
                    return Ok(());
                }
            }
        }
        .await;
        if let Err(e) = outcome {
            // Not carried out in full: let the issuer send it again.
            self.logouts.forget(&claims.issuer, &claims.jti);
            return Err(e);
        }
        tracing::info!(
            target: "audit",
            event = "subject.logged_out",
            issuer = %claims.issuer,
            by_session = claims.session_id.is_some(),
            leases_ended = ended,
        );
        Ok(ended)
    }

    /// Grants a lease to `module` from the user's token.
    pub async fn issue(&self, module: &Module, req: IssueRequest) -> Result<Issued> {
        check_id("job_id", &req.job_id)?;
        let audience = match req.audience {
            Some(aud) => {
                check_id("audience", &aud)?;
                aud
            }
            None => self.settings.default_audience.clone(),
        };
        if !module.may_address(&audience) {
            return Err(Error::AudienceNotAllowed(audience));
        }
        let on_logout = module.logout_policy(req.on_logout).ok_or_else(|| {
            Error::LogoutPolicyNotAllowed(format!(
                "module {:?} may not ask for on_logout = {}",
                module.id,
                req.on_logout.unwrap_or_default().as_str()
            ))
        })?;
        let now = self.clock.now();
        // A snapshot: a reload during this grant does not change its issuer midway.
        let subjects = self.subjects.load_full();
        let subject = subjects.verify_fetching(&req.subject_token, now).await?;
        if !module.serves(&subject.tenant) {
            return Err(Error::TenantNotServed(subject.tenant));
        }
        if on_logout == OnLogout::End {
            // A policy that could never take effect is refused, not silently kept.
            if !subject.logout_received {
                return Err(Error::LogoutPolicyNotAllowed(format!(
                    "issuer {:?} sends no back-channel logouts to this service",
                    subject.issuer
                )));
            }
            if subject.sub.is_none() && subject.session_id.is_none() {
                return Err(Error::LogoutPolicyNotAllowed(
                    "the user's token names no sid or sub that a logout could match".into(),
                ));
            }
        }
        let held = match &subject.permission_source {
            None => None,
            Some(source) => Some(
                self.permission_source
                    .load_full()
                    .permissions(&PermissionQuery {
                        source,
                        tenant: &subject.tenant,
                        user_id: &subject.subject,
                        sub: subject.sub.as_deref(),
                        token: &req.subject_token,
                    })
                    .await?,
            ),
        };
        let held = held.as_ref().unwrap_or(&subject.permissions);
        let granted = permissions::grant(&req.permissions, held, &module.delegable)?;
        let (lifetime, clamped) = match req.max_lifetime {
            None => (module.default_lifetime, false),
            // A lease shorter than one access token would mint tokens born expired.
            Some(d) if d < self.settings.access_token_ttl => {
                return Err(Error::invalid(
                    "max_lifetime",
                    format!(
                        "must be at least the access-token lifetime, {}s",
                        self.settings.access_token_ttl.as_secs_f64()
                    ),
                ));
            }
            Some(d) if d > ABSURD_LIFETIME => {
                return Err(Error::invalid("max_lifetime", "must be at most 366 days"));
            }
            Some(d) if d > module.max_lifetime => match self.settings.over_cap {
                OverCap::Clamp => (module.max_lifetime, true),
                OverCap::Refuse => {
                    return Err(Error::LifetimeExceedsCap {
                        requested_secs: d.as_secs(),
                        cap_secs: module.max_lifetime.as_secs(),
                    });
                }
            },
            Some(d) => (d, false),
        };
        let standing = Standing {
            issuer: subject.issuer.clone(),
            sub: subject.sub.clone(),
            session_id: subject.session_id.clone(),
            on_logout,
            permission_source: subject.permission_source.clone(),
            permissions_checked_at: subject.permission_source.is_some().then_some(now),
        };
        let lease = Lease {
            // Time-ordered (v7), so new leases append to the id index instead of
            // dirtying a random page of it on every grant.
            id: lease_id(now),
            tenant: subject.tenant,
            subject: subject.subject,
            actor: module.id.clone(),
            job_id: req.job_id,
            permissions: granted,
            audience,
            created_at: now,
            expires_at: now + lifetime,
            idle_timeout: self.settings.idle_timeout,
            last_active_at: now,
            end: None,
            generation: 0,
            seed: random_bytes::<32>().to_vec(),
            rotated_at: now,
            refresh_count: 0,
            last_refreshed_at: None,
            resume_count: 0,
            standing,
            version: 0,
        };
        let event = LeaseEvent::new(&lease, EventKind::Issued, now, &module.principal(), "");
        match self.store.insert_lease(&lease, &event).await {
            Err(StoreError::Conflict) => return Err(Error::LeaseAlreadyExists(lease.job_id)),
            other => other?,
        }
        let tokens = self.mint(&lease, now)?;
        tracing::info!(
            target: "audit",
            event = "lease.issued",
            lease_id = %lease.id,
            job_id = %lease.job_id,
            tenant = %lease.tenant,
            actor = %lease.actor,
            subject = %lease.subject,
            issuer = %subject.issuer,
            permissions = ?lease.permissions,
            lifetime_secs = lifetime.as_secs(),
            clamped,
        );
        Ok(Issued {
            lease,
            tokens,
            granted_lifetime: lifetime,
            clamped,
        })
    }

    /// Renews a lease: rotates the refresh token and mints a new access token.
    pub async fn refresh(
        &self,
        module: &Module,
        lease_id: &str,
        refresh_token: &str,
    ) -> Result<(Lease, TokenPair)> {
        check_id("lease_id", lease_id)?;
        if refresh_token.is_empty() {
            return Err(Error::invalid("refresh_token", "is required"));
        }
        if refresh_token.len() > MAX_ID_LEN {
            return Err(Error::RefreshTokenInvalid);
        }
        let presented = RefreshToken::parse(refresh_token).ok_or(Error::RefreshTokenInvalid)?;
        // The user's standing, asked once however often the write below is retried.
        let mut found = None;
        for _ in 0..CAS_ATTEMPTS {
            let now = self.clock.now();
            let mut lease = self
                .store
                .get_lease(lease_id)
                .await?
                .ok_or(Error::LeaseNotFound)?;
            check_holder(module, &lease)?;
            // A module whose `audiences` no longer include the lease's mints no more of
            // its tokens (it may still release the lease).
            if !module.may_address(&lease.audience) {
                return Err(Error::AudienceNotAllowed(lease.audience));
            }
            match self.end_if_due(&lease, now).await? {
                None => {}
                Some(Some((reason, detail))) => return Err(Error::LeaseEnded(reason, detail)),
                Some(None) => continue,
            }
            if !self
                .master
                .verify_refresh_token(&lease.id, &lease.seed, &presented)
            {
                return Err(Error::RefreshTokenInvalid);
            }
            let current = lease.generation;
            if presented.generation == current {
                let AfterStanding::Renews(narrowed) =
                    self.before_renewal(&mut lease, &mut found, now).await?
                else {
                    continue;
                };
                let event = narrowed.map(|detail| {
                    LeaseEvent::new(&lease, EventKind::Narrowed, now, "system", &detail)
                });
                lease.generation += 1;
                lease.rotated_at = now;
                lease.last_active_at = now;
                lease.refresh_count += 1;
                lease.last_refreshed_at = Some(now);
                match self.store.update_lease(&lease, event.as_ref()).await? {
                    Some(version) => lease.version = version,
                    None => continue,
                }
                audit_lease("lease.refreshed", &lease);
                let tokens = self.mint(&lease, now)?;
                return Ok((lease, tokens));
            }
            let in_grace = now < lease.rotated_at + self.settings.refresh_grace;
            if presented.generation + 1 == current && in_grace {
                // A retry of the previous token (lost response, racing callers): answer
                // with the same successor so both converge.
                audit_lease("lease.refresh_retry", &lease);
                let tokens = self.mint(&lease, now)?;
                return Ok((lease, tokens));
            }
            // The MAC covers the generation, so a genuine token is never from the future:
            // this one is genuine but superseded, from before `current - 1` or outside
            // the grace window.
            // A genuine but superseded token: someone replays a stolen token, or the
            // holder was cloned. Either way the lease can no longer be trusted.
            lease.finish(
                EndReason::RefreshTokenReused,
                now,
                "system",
                &format!(
                    "refresh token generation {} presented after generation {} was issued",
                    presented.generation, current
                ),
            );
            if !self.write_end(&lease).await? {
                continue;
            }
            tracing::warn!(
                target: "audit",
                event = "lease.reuse_detected",
                lease_id = %lease.id,
                job_id = %lease.job_id,
                tenant = %lease.tenant,
                actor = %lease.actor,
                presented_generation = presented.generation,
                current_generation = current,
            );
            return Err(Error::RefreshTokenReused);
        }
        Err(Self::contention())
    }

    /// Re-attaches `module` to its active lease for `job_id` in `tenant`; earlier refresh
    /// tokens die. `tenant` may be left out only by a module that serves one tenant.
    pub async fn resume(
        &self,
        module: &Module,
        tenant: Option<&str>,
        job_id: &str,
    ) -> Result<(Lease, TokenPair)> {
        check_id("job_id", job_id)?;
        let tenant = match tenant {
            Some(t) => {
                check_id("tenant", t)?;
                t
            }
            None => module.only_tenant().ok_or_else(|| {
                Error::invalid(
                    "tenant",
                    "is required: a lease is identified by tenant, module and job",
                )
            })?,
        };
        if !module.serves(tenant) {
            return Err(Error::TenantNotServed(tenant.to_owned()));
        }
        let mut found = None;
        for _ in 0..CAS_ATTEMPTS {
            let now = self.clock.now();
            let mut lease = self
                .store
                .find_active_lease(tenant, &module.id, job_id)
                .await?
                .ok_or(Error::LeaseNotFound)?;
            if !module.may_address(&lease.audience) {
                return Err(Error::AudienceNotAllowed(lease.audience));
            }
            match self.end_if_due(&lease, now).await? {
                None => {}
                Some(Some((reason, detail))) => return Err(Error::LeaseEnded(reason, detail)),
                Some(None) => continue,
            }
            let AfterStanding::Renews(narrowed) =
                self.before_renewal(&mut lease, &mut found, now).await?
            else {
                continue;
            };
            // A new seed invalidates every refresh token issued before.
            lease.seed = random_bytes::<32>().to_vec();
            lease.generation += 1;
            lease.rotated_at = now;
            lease.last_active_at = now;
            lease.resume_count += 1;
            // One event per write: a narrowing found at resume is told in its detail.
            let detail = narrowed.unwrap_or_default();
            let event = LeaseEvent::new(
                &lease,
                EventKind::Resumed,
                now,
                &module.principal(),
                &detail,
            );
            match self.store.update_lease(&lease, Some(&event)).await? {
                Some(version) => lease.version = version,
                None => continue,
            }
            audit_lease("lease.resumed", &lease);
            let tokens = self.mint(&lease, now)?;
            return Ok((lease, tokens));
        }
        Err(Self::contention())
    }

    /// Ends a lease; idempotent. `check` refuses before writing (e.g. wrong actor).
    /// Returns the lease as it stands and whether this call ended it.
    async fn end_lease(
        &self,
        lease_id: &str,
        reason: EndReason,
        by: &str,
        detail: &str,
        check: impl Fn(&Lease) -> Result<()>,
    ) -> Result<(Lease, bool)> {
        // Callers check `detail` against their own field's limit.
        check_id("lease_id", lease_id)?;
        for _ in 0..CAS_ATTEMPTS {
            let now = self.clock.now();
            let mut lease = self
                .store
                .get_lease(lease_id)
                .await?
                .ok_or(Error::LeaseNotFound)?;
            check(&lease)?;
            match self.end_if_due(&lease, now).await? {
                None => {}
                Some(Some(_)) => {
                    let lease = self.store.get_lease(lease_id).await?;
                    return Ok((lease.ok_or(Error::LeaseNotFound)?, false));
                }
                Some(None) => continue,
            }
            lease.finish(reason, now, by, detail);
            if self.write_end(&lease).await? {
                lease.version += 1;
                return Ok((lease, true));
            }
        }
        Err(Self::contention())
    }

    /// The holder ends its lease (job done, failed, cancelled).
    pub async fn release(
        &self,
        module: &Module,
        lease_id: &str,
        outcome: &str,
        detail: &str,
    ) -> Result<Lease> {
        check_text("detail", detail, MAX_DETAIL_LEN)?;
        let text = if detail.is_empty() {
            format!("outcome: {outcome}")
        } else {
            format!("outcome: {outcome}; {detail}")
        };
        let (lease, _) = self
            .end_lease(
                lease_id,
                EndReason::Released,
                &module.principal(),
                &text,
                |l| check_holder(module, l),
            )
            .await?;
        Ok(lease)
    }

    /// An administrator ends one lease.
    pub async fn admin_revoke_lease(&self, lease_id: &str, reason: &str) -> Result<Lease> {
        check_text("reason", reason, MAX_DETAIL_LEN)?;
        let (lease, _) = self
            .end_lease(lease_id, EndReason::Revoked, "admin", reason, |_| Ok(()))
            .await?;
        Ok(lease)
    }

    /// An administrator ends every active lease matching `filter`; returns how many.
    pub async fn admin_revoke_matching(&self, filter: LeaseFilter, reason: &str) -> Result<u32> {
        check_text("reason", reason, MAX_DETAIL_LEN)?;
        let requested = filter.clone();
        let mut filter = LeaseFilter {
            active: Some(true),
            ..filter
        };
        let mut count = 0u32;
        loop {
            let page = self.store.list_leases(&filter, MAX_PAGE_SIZE).await?;
            let Some(last) = page.last() else { break };
            filter.after = Some((last.created_at, last.id.clone()));
            for lease in &page {
                let (_, by_this_call) = self
                    .end_lease(&lease.id, EndReason::Revoked, "admin", reason, |_| Ok(()))
                    .await?;
                if by_this_call {
                    count = count.saturating_add(1);
                }
            }
        }
        tracing::info!(
            target: "audit",
            event = "admin.revoke_matching",
            tenant = requested.tenant.as_deref(),
            subject = requested.subject.as_deref(),
            actor = requested.actor.as_deref(),
            job_id = requested.job_id.as_deref(),
            count,
            reason,
        );
        Ok(count)
    }

    /// RFC 7662 introspection for `module`: the claims if the token is valid now, its
    /// lease active and its tenant one the module serves (others look inactive, so a
    /// module learns nothing about tenants it does not serve).
    pub async fn introspect(&self, module: &Module, token: &str) -> Result<Option<AccessClaims>> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(Error::invalid(
                "token",
                format!("is longer than {MAX_TOKEN_LEN} bytes"),
            ));
        }
        let now = self.clock.now();
        let Some(claims) = self
            .keys
            .verify(token, &self.settings.issuer, now, Duration::ZERO)
        else {
            return Ok(None);
        };
        if !module.serves(&claims.tenant) {
            return Ok(None);
        }
        let lease = self.store.get_lease(&claims.lease_id).await?;
        // A token minted before a narrowing carries permissions the lease no longer has:
        // inactive from the narrowing on, though its signature still verifies.
        let active = lease.is_some_and(|l| {
            l.tenant == claims.tenant
                && l.is_active()
                && l.due_end(now).is_none()
                && claims.permissions.iter().all(|p| l.permissions.contains(p))
        });
        Ok(active.then_some(claims))
    }

    /// One lease and its events.
    pub async fn get_lease(&self, lease_id: &str) -> Result<(Lease, Vec<LeaseEvent>)> {
        check_id("lease_id", lease_id)?;
        let lease = self
            .store
            .get_lease(lease_id)
            .await?
            .ok_or(Error::LeaseNotFound)?;
        let events = self.store.lease_events(lease_id).await?;
        Ok((lease, events))
    }

    /// A page of leases matching `filter` (its `after` is taken from `page_token`).
    pub async fn list_leases(
        &self,
        mut filter: LeaseFilter,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<LeasePage> {
        for (field, value) in [
            ("tenant", &filter.tenant),
            ("subject", &filter.subject),
            ("actor", &filter.actor),
            ("job_id", &filter.job_id),
        ] {
            if let Some(v) = value {
                check_text(field, v, MAX_ID_LEN)?;
            }
        }
        let size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        filter.after = page_token.map(decode_page_token).transpose()?;
        let mut leases = self.store.list_leases(&filter, size + 1).await?;
        let next_page_token = if leases.len() > size {
            leases.truncate(size);
            leases.last().map(encode_page_token)
        } else {
            None
        };
        Ok(LeasePage {
            leases,
            next_page_token,
        })
    }

    /// Rotates the signing key. Returns `(new kid, retired kid, signing starts at)`.
    pub async fn rotate_signing_key(&self) -> Result<(String, String, SystemTime)> {
        let (new, old, starts) = self
            .keys
            .rotate(self.clock.now())
            .await
            .map_err(|e| match e {
                crate::keys::KeyError::Store(s) => Error::from(s),
                other => Error::internal(other),
            })?;
        tracing::info!(
            target: "audit",
            event = "keys.rotated",
            new_kid = %new,
            retired_kid = %old,
            signing_starts_in_secs = starts.duration_since(self.clock.now()).unwrap_or_default().as_secs(),
        );
        Ok((new, old, starts))
    }

    /// Ends every lease whose deadline has passed; returns how many it ended.
    pub async fn sweep(&self) -> Result<usize> {
        let now = self.clock.now();
        let mut ended = 0;
        for lease in self.store.leases_due(now, 1000).await? {
            if let Some(Some(_)) = self.end_if_due(&lease, now).await? {
                ended += 1;
            }
        }
        Ok(ended)
    }

    /// Counts the active leases and publishes the number as a metric.
    pub async fn count_active_leases(&self) -> Result<u64> {
        let n = self.store.count_active_leases().await?;
        self.metrics.set_active_leases(n);
        Ok(n)
    }

    /// Lease ends after `cursor`, oldest first.
    pub async fn ends_after(&self, cursor: u64, limit: usize) -> Result<Vec<LeaseEvent>> {
        Ok(self.store.end_events_after(cursor, limit).await?)
    }

    /// Where a watcher that wants every end whose tokens may still be valid begins.
    pub async fn live_ends_cursor(&self) -> Result<u64> {
        match self.store.earliest_live_end(self.clock.now()).await? {
            Some(seq) => Ok(seq.saturating_sub(1)),
            None => self.last_sequence().await,
        }
    }

    /// The newest event sequence, where a watcher starting "from now" begins.
    pub async fn last_sequence(&self) -> Result<u64> {
        Ok(self.store.last_event_sequence().await?)
    }

    /// Changes whenever a lease ends (here, or on another replica once told).
    pub fn subscribe_ends(&self) -> watch::Receiver<u64> {
        self.ends.subscribe()
    }

    /// Wakes revocation streams: another replica recorded a lease end.
    pub fn notify_ends(&self) {
        self.ends.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Deletes leases that ended more than `retention` ago, in batches; returns how many.
    pub async fn purge_ended(&self, retention: Duration) -> Result<usize> {
        const BATCH: usize = 1000;
        let before = self.clock.now() - retention;
        let mut total = 0;
        loop {
            let n = self.store.purge_ended(before, BATCH).await?;
            total += n;
            if n < BATCH {
                return Ok(total);
            }
        }
    }
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
