//! Verifying job tokens on the receiving side (resource servers).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::time::Instant;

use super::jwt::{self, Rules};
use crate::health::{Feed, RevocationFeed};
use crate::watcher::{EndSink, Subscription};
use crate::{Client, JobTokenClient, proto};

/// Least time between two JWKS fetches triggered by unknown key ids, so garbage tokens
/// cannot make the verifier hammer the service.
pub const DEFAULT_REFETCH_INTERVAL: Duration = Duration::from_secs(10);

/// The verified claims of a job token, put in request extensions by
/// [`crate::VerifyLayer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The user on whose behalf the job acts.
    pub subject: String,
    /// The user's tenant.
    pub tenant: String,
    /// Granted permissions.
    pub permissions: Vec<String>,
    /// The job.
    pub job_id: String,
    /// Its lease.
    pub lease_id: String,
    /// Expiry, Unix seconds (rounded down).
    pub exp: i64,
    /// The module running the job.
    pub actor: String,
}

impl Claims {
    /// Whether the token carries every one of `permissions`.
    pub fn has_all<S: AsRef<str>>(&self, permissions: &[S]) -> bool {
        permissions
            .iter()
            .all(|p| self.permissions.iter().any(|g| g == p.as_ref()))
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// No token, or not a well-formed JWT.
    #[error("no valid bearer token")]
    Malformed,
    /// Signed by a key the service does not publish.
    #[error("token signed by an unknown key")]
    UnknownKey,
    /// Bad signature, issuer, audience, or outside its validity.
    #[error("token rejected: {0}")]
    Invalid(String),
    /// Its lease has ended (revoked, released, expired).
    #[error("the token's lease has ended")]
    Revoked,
    /// It lacks a required permission.
    #[error("missing permission {0}")]
    MissingPermission(String),
    /// Online verification could not reach the service.
    #[error("cannot reach the token service")]
    Unavailable,
}

/// Longest a revoked lease is remembered past now: no token the service signs lives this
/// long, so a `tokens_valid_until` beyond it is clamped (and cannot overflow).
const MAX_REMEMBER: Duration = Duration::from_secs(24 * 3600);

/// Ended leases whose tokens may still be accepted (inside `exp` plus leeway), by
/// tenant, then lease id.
#[derive(Default)]
struct Revoked {
    leases: Mutex<HashMap<(String, String), SystemTime>>,
    leeway: Duration,
    /// The tenants the stream carries ends of, from its last heartbeat: `None` until
    /// one arrives, an empty set for every tenant.
    covered: ArcSwap<Option<HashSet<String>>>,
}

/// Until when to remember an ended lease whose tokens are valid until `valid_until`
/// (as the service says, possibly absurd), at `now`. Never panics, never before `now`
/// plus the leeway if the time is unreadable (the lease is remembered rather than lost).
fn remember_until(
    valid_until: Option<prost_types::Timestamp>,
    leeway: Duration,
    now: SystemTime,
) -> SystemTime {
    let latest = now + MAX_REMEMBER;
    let until = valid_until
        .and_then(|t| SystemTime::try_from(t).ok())
        .unwrap_or(latest)
        .min(latest);
    until.checked_add(leeway).unwrap_or(latest)
}

impl EndSink for Revoked {
    fn on_heartbeat(&self, event: &proto::WatchRevocationsResponse) {
        let covered: HashSet<String> = event.tenants.iter().cloned().collect();
        if self.covered.load().as_ref().as_ref() != Some(&covered) {
            self.covered.store(Arc::new(Some(covered)));
        }
    }

    fn on_end(&self, event: &proto::WatchRevocationsResponse) {
        let now = crate::clock::wall_now();
        // Tokens pass until `exp` plus the leeway, so remember the lease that long.
        let until = remember_until(event.tokens_valid_until, self.leeway, now);
        let mut set = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        // Forget leases none of whose tokens can be valid any more.
        set.retain(|_, valid_until| *valid_until > now);
        if until > now {
            set.insert((event.tenant.clone(), event.lease_id.clone()), until);
        }
    }
}

impl Revoked {
    /// Whether the stream carries `tenant`'s ends (unknown before the first heartbeat:
    /// then the feed is blind, and `max_blind` decides).
    fn covers(&self, tenant: &str) -> bool {
        match self.covered.load().as_ref() {
            Some(covered) => covered.is_empty() || covered.contains(tenant),
            None => true,
        }
    }

    fn contains(&self, tenant: &str, lease_id: &str) -> bool {
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&(tenant.to_owned(), lease_id.to_owned()))
    }
}

/// What a verifier does while its revocation feed has been blind longer than a bound
/// (see [`VerifierBuilder::max_blind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WhenBlind {
    /// Refuse every token ([`VerifyError::Unavailable`]).
    Refuse,
    /// Ask the service (`IntrospectToken`) about each token; refuse if it cannot answer.
    Introspect,
}

struct Inner {
    grpc: JobTokenClient,
    rules: Rules,
    keys: ArcSwap<HashMap<String, DecodingKey>>,
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    refetch_interval: Duration,
    revoked: Arc<Revoked>,
    online: bool,
    /// Whether the revocation stream is followed (its coverage then applies).
    watches: bool,
    max_blind: Option<(Duration, WhenBlind)>,
    feed: Arc<Feed>,
    /// Keeps the revocation stream running for as long as the verifier lives.
    _revocations: Option<Subscription>,
}

/// Verifies job tokens: offline against the service's published keys (cached, refetched
/// on an unknown `kid` at most every [`DEFAULT_REFETCH_INTERVAL`]), with a revocation set
/// fed by the service's revocation stream; optionally online by introspection.
/// Cheap to clone.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.inner.keys.load().len())
            .field("online", &self.inner.online)
            .finish_non_exhaustive()
    }
}

// The `iss` the service signs with unless configured otherwise.
use jobtoken_proto::wire::DEFAULT_ISSUER;

/// Configures a [`Verifier`].
#[derive(Debug, Clone)]
pub struct VerifierBuilder {
    client: Client,
    issuer: String,
    audience: Option<String>,
    leeway: Duration,
    refetch_interval: Duration,
    online: bool,
    watch_revocations: bool,
    max_blind: Option<(Duration, WhenBlind)>,
}

impl VerifierBuilder {
    /// While the revocation feed has been blind (the stream down, say during a service
    /// outage) for longer than `bound`, `refuse` or `introspect` each token instead of
    /// trusting the revocation set, which may miss ends recorded meanwhile. Default:
    /// trust it, and keep accepting valid tokens through outages
    /// ([`Verifier::revocation_feed`] says how stale it is).
    pub fn max_blind(mut self, bound: Duration, then: WhenBlind) -> Self {
        self.max_blind = Some((bound, then));
        self
    }

    /// Expected `iss`. Default `jobtoken`.
    pub fn issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = issuer.into();
        self
    }

    /// Required `aud`: tokens without it, or whose `aud` is not a string or an array of
    /// strings, are refused. Default: not checked.
    pub fn audience(mut self, audience: impl Into<String>) -> Self {
        self.audience = Some(audience.into());
        self
    }

    /// Leeway on `exp`/`nbf`. Default 5 s.
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self
    }

    /// Least time between key refetches. Default [`DEFAULT_REFETCH_INTERVAL`].
    pub fn refetch_interval(mut self, interval: Duration) -> Self {
        self.refetch_interval = interval;
        self
    }

    /// Also ask the service (`IntrospectToken`) on every verification. Default false.
    pub fn online(mut self, online: bool) -> Self {
        self.online = online;
        self
    }

    /// Follow the revocation stream to refuse tokens of ended leases. Default true.
    pub fn watch_revocations(mut self, watch: bool) -> Self {
        self.watch_revocations = watch;
        self
    }

    /// Fetches the keys and starts following revocations.
    pub async fn build(self) -> Result<Verifier, tonic::Status> {
        let rules = Rules {
            issuer: self.issuer,
            audience: self.audience,
            leeway: self.leeway,
        };
        let grpc = self.client.grpc();
        let revoked = Arc::new(Revoked {
            leeway: self.leeway,
            ..Revoked::default()
        });
        let feed = Arc::new(Feed::new(self.watch_revocations));
        let revocations = self.watch_revocations.then(|| {
            // Replay ends whose tokens may still be valid: a verifier that starts after a
            // revoke must still refuse that lease's tokens.
            Subscription::start(
                Arc::new(self.client.watch_grpc()),
                revoked.clone(),
                true,
                self.client.renewal_config().clone(),
                Arc::clone(&feed),
            )
        });
        if let Some(subscription) = &revocations {
            subscription.wait_ready(Duration::from_secs(2)).await;
        }
        let verifier = Verifier {
            inner: Arc::new(Inner {
                keys: ArcSwap::from_pointee(fetch_keys(&grpc).await?),
                grpc: grpc.clone(),
                rules,
                last_fetch: tokio::sync::Mutex::new(Some(crate::clock::now())),
                refetch_interval: self.refetch_interval,
                revoked,
                online: self.online,
                watches: self.watch_revocations,
                max_blind: self.max_blind,
                feed,
                _revocations: revocations,
            }),
        };
        Ok(verifier)
    }
}

async fn fetch_keys(grpc: &JobTokenClient) -> Result<HashMap<String, DecodingKey>, tonic::Status> {
    let jwks = grpc
        .clone()
        .get_jwks(proto::GetJwksRequest {})
        .await?
        .into_inner();
    Ok(jwks
        .keys
        .into_iter()
        .filter(|k| k.kty == "OKP" && k.crv == "Ed25519")
        .filter_map(|k| Some((k.kid, DecodingKey::from_ed_components(&k.x).ok()?)))
        .collect())
}

impl Client {
    /// A verifier for job tokens, using this client's connection and credentials.
    pub fn verifier(&self) -> VerifierBuilder {
        VerifierBuilder {
            client: self.clone(),
            issuer: DEFAULT_ISSUER.into(),
            audience: None,
            leeway: Duration::from_secs(5),
            refetch_interval: DEFAULT_REFETCH_INTERVAL,
            online: false,
            watch_revocations: true,
            max_blind: None,
        }
    }
}

impl Verifier {
    /// Verifies `token` and returns its claims: its structure and JSON types, its
    /// signature by a published key, issuer, audience (required when configured), `exp`
    /// and `nbf` against this process's clock with the leeway, its lease not ended, and,
    /// when configured, the service's word.
    pub async fn verify(&self, token: &str) -> Result<Claims, VerifyError> {
        let parsed = jwt::parse(token)?;
        match self.check_signature(&parsed) {
            Some(checked) => checked?,
            None => {
                self.refetch_keys().await;
                self.check_signature(&parsed)
                    .ok_or(VerifyError::UnknownKey)??
            }
        }
        parsed.check(&self.inner.rules, crate::clock::wall_now())?;
        let claims = parsed.claims;
        if self
            .inner
            .revoked
            .contains(&claims.tenant, &claims.lease_id)
        {
            return Err(VerifyError::Revoked);
        }
        // The revocation set can only vouch for tenants whose ends reach it: a token of a
        // tenant this module does not serve is refused, never waved through.
        if self.inner.watches && !self.inner.revoked.covers(&claims.tenant) {
            return Err(VerifyError::Invalid(format!(
                "tenant {:?} is not served by this module, so its revocations do not reach \
                 this verifier",
                claims.tenant
            )));
        }
        let blind_too_long = self.inner.max_blind.and_then(|(bound, then)| {
            let blind = self.inner.feed.get().blind_for(crate::clock::now())?;
            (blind > bound).then_some(then)
        });
        if blind_too_long == Some(WhenBlind::Refuse) {
            return Err(VerifyError::Unavailable);
        }
        if self.inner.online || blind_too_long == Some(WhenBlind::Introspect) {
            let answer = self
                .inner
                .grpc
                .clone()
                .introspect_token(proto::IntrospectTokenRequest {
                    token: token.to_owned(),
                })
                .await
                .map_err(|_| VerifyError::Unavailable)?;
            if !answer.into_inner().active {
                return Err(VerifyError::Revoked);
            }
        }
        Ok(claims)
    }

    /// Whether the revocation stream feeds this verifier, or how long it has been blind.
    pub fn revocation_feed(&self) -> RevocationFeed {
        self.inner.feed.get()
    }

    /// Verifies `token` and checks it carries every one of `permissions`.
    pub async fn verify_with<S: AsRef<str>>(
        &self,
        token: &str,
        permissions: &[S],
    ) -> Result<Claims, VerifyError> {
        let claims = self.verify(token).await?;
        if let Some(missing) = permissions
            .iter()
            .find(|p| !claims.permissions.iter().any(|g| g == p.as_ref()))
        {
            return Err(VerifyError::MissingPermission(missing.as_ref().to_owned()));
        }
        Ok(claims)
    }

    /// The hot path: no I/O, one lock-free load of the key map. `None` if the key is
    /// not known.
    fn check_signature(&self, parsed: &jwt::Parsed<'_>) -> Option<Result<(), VerifyError>> {
        let keys = self.inner.keys.load();
        let key = keys.get(&parsed.kid)?;
        let verified = jsonwebtoken::crypto::verify(
            parsed.signature,
            parsed.message.as_bytes(),
            key,
            Algorithm::EdDSA,
        );
        Some(match verified {
            Ok(true) => Ok(()),
            Ok(false) => Err(VerifyError::Invalid("bad signature".into())),
            Err(_) => Err(VerifyError::Malformed),
        })
    }

    /// Refetches the keys unless that happened within the refetch interval. Concurrent
    /// callers wait for one fetch.
    async fn refetch_keys(&self) {
        let mut last = self.inner.last_fetch.lock().await;
        let now = crate::clock::now();
        if last.is_some_and(|at| now.duration_since(at) < self.inner.refetch_interval) {
            return;
        }
        *last = Some(now);
        match fetch_keys(&self.inner.grpc).await {
            Ok(keys) => self.inner.keys.store(Arc::new(keys)),
            Err(status) => {
                tracing::warn!(code = ?status.code(), "fetching the service's keys failed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(
        tenant: &str,
        lease: &str,
        seconds: i64,
        nanos: i32,
    ) -> proto::WatchRevocationsResponse {
        proto::WatchRevocationsResponse {
            tenant: tenant.into(),
            lease_id: lease.into(),
            tokens_valid_until: Some(prost_types::Timestamp { seconds, nanos }),
            ..Default::default()
        }
    }

    #[test]
    fn absurd_times_from_the_service_are_clamped_not_panicked_on() {
        // A far-future `tokens_valid_until` once overflowed `SystemTime + leeway`, killed
        // the watcher and left revoked leases accepted: it must be remembered instead.
        let revoked = Revoked {
            leeway: Duration::from_secs(5),
            ..Revoked::default()
        };
        revoked.on_end(&event("acme", "far", i64::MAX, 999_999_999));
        revoked.on_end(&event("acme", "negative", i64::MIN, -5));
        revoked.on_end(&event("acme", "long-past", 1000, 0));
        revoked.on_end(&proto::WatchRevocationsResponse {
            tenant: "acme".into(),
            lease_id: "none".into(),
            ..Default::default()
        });
        assert!(revoked.contains("acme", "far"));
        // Missing or unreadable times: remembered for the longest a token may live.
        assert!(revoked.contains("acme", "none"));
        assert!(revoked.contains("acme", "negative"));
        // A time long past: nothing of that lease can still be valid.
        assert!(!revoked.contains("acme", "long-past"));
        // Keyed by tenant first.
        assert!(!revoked.contains("other", "far"));
        let now = crate::clock::wall_now();
        let until = remember_until(
            Some(prost_types::Timestamp {
                seconds: i64::MAX,
                nanos: 0,
            }),
            Duration::MAX,
            now,
        );
        assert!(until <= now + MAX_REMEMBER);
    }
}
