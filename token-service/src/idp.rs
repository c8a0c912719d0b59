//! Identity providers on the network: issuer patterns (one entry for every Keycloak realm)
//! and keys fetched from a `jwks_uri` or through OIDC discovery, cached per issuer.
//!
//! The cache follows the provider: it keeps keys as long as `Cache-Control: max-age` says,
//! within the entry's bounds; refreshes them in the background once 80% of that time has
//! passed; refetches at once, at most every `jwks_refetch_interval`, when a token names a
//! key id it has not seen (a rotation); and keeps verifying with the last good keys while
//! the provider is unreachable, for at most `jwks_max_stale`. Each change of a realm's
//! state is logged once. No URL is ever taken from a token: the issuer is trusted only
//! when configured (or when it matches the configured pattern, whose tenant part is a
//! plain path segment), and `jku`/`x5u` headers are ignored.
//!
//! Why not a crate: jwt-authorizer and jwtk each bring their own token validation (which
//! would be a second parser of the token, against "parse once"), and neither
//! jsonwebtoken-jwks-cache nor they know issuer patterns, bounded realm caches or an
//! injected clock. Fetching and caching is small; the HTTP client (reqwest, rustls) is
//! the maintained part.
//!
//! ```
//! use token_service::idp::IssuerPattern;
//! let p = IssuerPattern::parse("https://kc.example.org/realms/{tenant}").unwrap();
//! assert_eq!(p.tenant("https://kc.example.org/realms/diku"), Some("diku"));
//! assert_eq!(p.tenant("https://kc.example.org/realms/a/b"), None);
//! ```

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::Jwk;
use serde_json::Value;

use crate::config::IssuerConfig;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::subject::{IssuerKey, jwk_algorithm};

/// Largest discovery or JWKS document read, in bytes.
pub const MAX_KEYS_DOCUMENT_BYTES: usize = 512 * 1024;
/// Time allowed for one fetch of a discovery or JWKS document.
pub const KEYS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// New realms of one pattern whose keys may be fetched per second (bursts of twice that):
/// tokens naming made-up realms cost no fetch storm.
pub const NEW_REALMS_PER_SECOND: f64 = 10.0;
/// Keys are refreshed in the background once this share of their cache time has passed.
const REFRESH_AHEAD: f64 = 0.8;

/// An `issuer_pattern`: a literal prefix and suffix around one `{tenant}` path segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerPattern {
    prefix: String,
    suffix: String,
}

impl IssuerPattern {
    /// Parses `https://host/realms/{tenant}`: exactly one `{tenant}`, standing for a whole
    /// path segment of an http(s) URL.
    pub fn parse(pattern: &str) -> std::result::Result<Self, String> {
        let (prefix, suffix) = pattern
            .split_once("{tenant}")
            .ok_or("issuer_pattern needs a {tenant} placeholder")?;
        if suffix.contains("{tenant}") {
            return Err("issuer_pattern holds {tenant} more than once".into());
        }
        if !(prefix.starts_with("https://") || prefix.starts_with("http://")) {
            return Err("issuer_pattern must be an http(s) URL".into());
        }
        if !prefix.ends_with('/') || !(suffix.is_empty() || suffix.starts_with('/')) {
            return Err("{tenant} must be a whole path segment of issuer_pattern".into());
        }
        if prefix.matches('/').count() < 3 {
            return Err("{tenant} must be in the path of issuer_pattern, not the host".into());
        }
        Ok(Self {
            prefix: prefix.to_owned(),
            suffix: suffix.to_owned(),
        })
    }

    /// The tenant of `iss` if it has this shape. The tenant is one path segment of
    /// unreserved URL characters (letters, digits, `-._~`), so the issuer URL built from it
    /// is the configured one with a plain name in it.
    pub fn tenant<'i>(&self, iss: &'i str) -> Option<&'i str> {
        let tenant = iss.strip_prefix(&self.prefix)?.strip_suffix(&self.suffix)?;
        let plain = !tenant.is_empty()
            && tenant != "."
            && tenant != ".."
            && tenant.len() <= crate::limits::MAX_ID_LEN
            && tenant
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
        plain.then_some(tenant)
    }
}

/// One HTTP GET, as the identity provider or the permission source is asked.
pub struct GetRequest<'a> {
    /// The URL.
    pub url: &'a str,
    /// Extra headers. May hold the user's token: never logged.
    pub headers: &'a [(http::HeaderName, http::HeaderValue)],
    /// Time allowed for the whole call.
    pub timeout: Duration,
    /// Largest body read; a longer one is an error.
    pub max_bytes: usize,
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The status code.
    pub status: u16,
    /// The `Cache-Control` header, if any.
    pub cache_control: Option<String>,
    /// The body (at most the request's `max_bytes`).
    pub body: Bytes,
}

/// Why a GET got no answer.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Connection, TLS or timeout.
    #[error("{0}")]
    Transport(String),
    /// The body is longer than allowed.
    #[error("the answer is larger than {0} bytes")]
    TooLarge(usize),
}

/// The HTTP port: the keys cache and the permission source call out through it, so tests
/// can answer in-process and the domain stays transport-free.
#[async_trait::async_trait]
pub trait HttpGet: Send + Sync + 'static {
    /// Sends one GET and reads the answer.
    async fn get(&self, request: GetRequest<'_>) -> std::result::Result<Fetched, FetchError>;

    /// Sends one POST with an `application/x-www-form-urlencoded` body (an OAuth2 token
    /// request) and reads the answer. Clients that only read keys need not implement it.
    async fn post_form(
        &self,
        _request: GetRequest<'_>,
        _form: &[(&str, &str)],
    ) -> std::result::Result<Fetched, FetchError> {
        Err(FetchError::Transport("this client sends no POST".into()))
    }
}

/// TLS for outgoing HTTPS: rustls on aws-lc-rs (the provider tonic uses too, so the
/// process has one crypto library and no ambiguity about rustls' default provider),
/// servers verified against the Mozilla roots (webpki-roots) and the certificates of
/// `extra_ca` (a PEM file: a private CA of the identity provider). Any reqwest client in
/// this process must be built with it (`ClientBuilder::use_preconfigured_tls`).
pub fn tls_config(
    extra_ca: Option<&std::path::Path>,
) -> std::result::Result<rustls::ClientConfig, crate::config::StartupError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = extra_ca {
        let problem = |problem: String| crate::config::StartupError::Key {
            path: path.to_owned(),
            problem,
        };
        let pem = std::fs::read(path).map_err(|source| crate::config::StartupError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut added = 0;
        for block in x509_parser::pem::Pem::iter_from_buffer(&pem) {
            let block = block.map_err(|e| problem(format!("not PEM: {e}")))?;
            if block.label != "CERTIFICATE" {
                continue;
            }
            roots
                .add(rustls::pki_types::CertificateDer::from(block.contents))
                .map_err(|e| problem(format!("not a CA certificate: {e}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(problem("holds no CERTIFICATE".into()));
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| crate::config::StartupError::Invalid(format!("tls: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// [`HttpGet`] over reqwest with rustls: no redirects are followed, every call has a
/// timeout and a body limit.
#[derive(Debug, Clone)]
pub struct HttpClient {
    client: reqwest::Client,
}

impl HttpClient {
    /// A client with a 5 s connect timeout that follows no redirect, with
    /// [`tls_config`]`(extra_ca)`.
    pub fn new(
        extra_ca: Option<&std::path::Path>,
    ) -> std::result::Result<Self, crate::config::StartupError> {
        let invalid = |e: &dyn fmt::Display| {
            crate::config::StartupError::Invalid(format!("http client: {e}"))
        };
        let tls = tls_config(extra_ca)?;
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("jobtoken/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| invalid(&e))?;
        Ok(Self { client })
    }
}

#[async_trait::async_trait]
impl HttpGet for HttpClient {
    async fn get(&self, request: GetRequest<'_>) -> std::result::Result<Fetched, FetchError> {
        let builder = self.client.get(request.url);
        read_answer(builder, &request).await
    }

    async fn post_form(
        &self,
        request: GetRequest<'_>,
        form: &[(&str, &str)],
    ) -> std::result::Result<Fetched, FetchError> {
        let builder = self.client.post(request.url).form(form);
        read_answer(builder, &request).await
    }
}

/// Sends `builder` with the request's headers and timeout, and reads at most its
/// `max_bytes` of answer.
async fn read_answer(
    mut builder: reqwest::RequestBuilder,
    request: &GetRequest<'_>,
) -> std::result::Result<Fetched, FetchError> {
    let transport = |e: reqwest::Error| FetchError::Transport(e.without_url().to_string());
    builder = builder.timeout(request.timeout);
    for (name, value) in request.headers {
        builder = builder.header(name, value);
    }
    let mut response = builder.send().await.map_err(transport)?;
    let too_large = FetchError::TooLarge(request.max_bytes);
    if response
        .content_length()
        .is_some_and(|n| n > request.max_bytes as u64)
    {
        return Err(too_large);
    }
    let status = response.status().as_u16();
    let cache_control = response
        .headers()
        .get(http::header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport)? {
        if body.len() + chunk.len() > request.max_bytes {
            return Err(too_large);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Fetched {
        status,
        cache_control,
        body: body.into(),
    })
}

/// How long `Cache-Control` allows an answer to be kept: `max-age`, or zero for
/// `no-cache`/`no-store`; `None` when it says neither.
pub fn max_age(cache_control: Option<&str>) -> Option<Duration> {
    let mut age = None;
    for directive in cache_control?.split(',') {
        let directive = directive.trim().to_ascii_lowercase();
        if directive == "no-cache" || directive == "no-store" {
            return Some(Duration::ZERO);
        }
        if let Some(secs) = directive.strip_prefix("max-age=") {
            age = secs.trim_matches('"').parse().ok().map(Duration::from_secs);
        }
    }
    age
}

/// Reads a JWKS document: the signing keys of a supported algorithm. Keys for encryption
/// (`use: enc`, which Keycloak publishes beside its signing keys) and keys of other types
/// are skipped; a document with no usable key is an error.
pub(crate) fn keys_from_jwks(body: &[u8]) -> std::result::Result<Vec<IssuerKey>, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let entries = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("not a JWKS document (no keys array)")?;
    let mut keys = Vec::new();
    for entry in entries {
        if entry.get("use").is_some_and(|u| u != "sig") {
            continue;
        }
        let Ok(jwk) = serde_json::from_value::<Jwk>(entry.clone()) else {
            continue;
        };
        let Some(algorithm) = jwk_algorithm(&jwk) else {
            continue;
        };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        keys.push(IssuerKey {
            kid: jwk.common.key_id.clone(),
            algorithm,
            key,
        });
    }
    if keys.is_empty() {
        return Err("the JWKS has no RS256, ES256 or EdDSA signing key".into());
    }
    Ok(keys)
}

/// Where an entry's keys come from.
#[derive(Debug, Clone)]
enum KeySource {
    /// `<issuer>/.well-known/openid-configuration` → `jwks_uri`.
    Discovery,
    /// This URL; `{tenant}` replaced by the realm's tenant.
    JwksUri(String),
}

/// The cache bounds of one entry.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    refetch_interval: Duration,
    min_ttl: Duration,
    max_ttl: Duration,
    max_stale: Duration,
    max_realms: usize,
}

/// Keys in hand for one issuer (one realm).
#[derive(Clone)]
struct Held {
    keys: Arc<[IssuerKey]>,
    kids: BTreeSet<String>,
    fetched_at: SystemTime,
    /// Kept until then; refreshed in the background from `refresh_at`.
    fresh_until: SystemTime,
    refresh_at: SystemTime,
}

impl Held {
    /// After this instant the keys verify nothing until a fetch succeeds: `max_stale`
    /// after they were fetched (or their cache time, if longer).
    fn usable_until(&self, b: &Bounds) -> SystemTime {
        let ttl = self
            .fresh_until
            .duration_since(self.fetched_at)
            .unwrap_or_default();
        self.fetched_at + b.max_stale.max(ttl)
    }
}

/// What is known of one realm.
#[derive(Default)]
struct RealmState {
    held: Option<Held>,
    /// When a fetch last started.
    last_attempt: Option<SystemTime>,
    /// The last fetch failed: `Some(true)` when the provider said the realm does not
    /// exist (404).
    failing: Option<bool>,
    /// A background refresh is running.
    refreshing: bool,
    last_used: Option<SystemTime>,
}

struct Realm {
    /// The issuer URL (the token's `iss`, trusted).
    iss: String,
    tenant: Option<String>,
    state: Mutex<RealmState>,
    /// One fetch at a time per realm.
    fetching: tokio::sync::Mutex<()>,
}

/// What to do with a verification's request for keys: a pure decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Use the keys in hand.
    Use,
    /// Use them, and refresh in the background.
    UseAndRefresh,
    /// Fetch now and wait.
    Fetch,
    /// No keys, and a fetch failed too recently to try again.
    Unavailable,
}

fn decide(state: &RealmState, kid: Option<&str>, now: SystemTime, b: &Bounds) -> Action {
    let may_try = state
        .last_attempt
        .is_none_or(|at| now >= at + b.refetch_interval);
    let Some(held) = &state.held else {
        return if may_try {
            Action::Fetch
        } else {
            Action::Unavailable
        };
    };
    let too_old = now >= held.usable_until(b);
    let unknown_kid = kid.is_some_and(|k| !held.kids.contains(k));
    if (unknown_kid || too_old) && may_try {
        return Action::Fetch;
    }
    if too_old {
        return Action::Unavailable;
    }
    if now >= held.refresh_at && may_try && !state.refreshing {
        return Action::UseAndRefresh;
    }
    Action::Use
}

/// The fetched keys of one trusted-issuer entry: one issuer, or every realm of a pattern.
pub struct RemoteKeys {
    /// The entry's name (its issuer or pattern), for logs and metrics.
    name: String,
    source: KeySource,
    bounds: Bounds,
    http: Arc<dyn HttpGet>,
    metrics: Arc<Metrics>,
    realms: Mutex<HashMap<String, Arc<Realm>>>,
    /// Token bucket for first fetches of realms: (tokens, last refill).
    new_realms: Mutex<(f64, Option<SystemTime>)>,
}

impl fmt::Debug for RemoteKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteKeys")
            .field("name", &self.name)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl RemoteKeys {
    /// The cache of an entry with `discovery` or `jwks_uri`.
    pub fn new(c: &IssuerConfig, http: Arc<dyn HttpGet>, metrics: Arc<Metrics>) -> Self {
        let source = match &c.jwks_uri {
            Some(uri) => KeySource::JwksUri(uri.clone()),
            None => KeySource::Discovery,
        };
        Self {
            name: c.name().to_owned(),
            source,
            bounds: Bounds {
                refetch_interval: c.jwks_refetch_interval,
                min_ttl: c.jwks_min_ttl,
                max_ttl: c.jwks_max_ttl,
                max_stale: c.jwks_max_stale,
                max_realms: if c.issuer_pattern.is_some() {
                    c.max_realms
                } else {
                    1
                },
            },
            http,
            metrics,
            realms: Mutex::new(HashMap::new()),
            new_realms: Mutex::new((2.0 * NEW_REALMS_PER_SECOND, None)),
        }
    }

    /// Realms in the cache.
    #[cfg(test)]
    pub(crate) fn realms_cached(&self) -> usize {
        self.realms.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Takes a token from the new-realm bucket.
    fn admit_new_realm(&self, now: SystemTime) -> bool {
        let mut bucket = self.new_realms.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = &mut *bucket;
        if let Some(at) = *last {
            let passed = now.duration_since(at).unwrap_or_default().as_secs_f64();
            *tokens = (*tokens + passed * NEW_REALMS_PER_SECOND).min(2.0 * NEW_REALMS_PER_SECOND);
        }
        // Callers' clocks are read a moment apart: never move the refill time back.
        *last = Some(last.map_or(now, |at| at.max(now)));
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The realm of `iss`, made (within the bounds) if new.
    fn realm(&self, iss: &str, tenant: Option<&str>, now: SystemTime) -> Result<Arc<Realm>> {
        let mut realms = self.realms.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(realm) = realms.get(iss) {
            return Ok(Arc::clone(realm));
        }
        if !self.admit_new_realm(now) {
            tracing::debug!(issuer = %self.name, "too many new realms at once; not fetched");
            return Err(Error::IssuerUnavailable(iss.to_owned()));
        }
        if realms.len() >= self.bounds.max_realms {
            // Forget a realm without keys first (unknown or made up), else the one used
            // least recently; it is fetched again when next used.
            let oldest = realms
                .iter()
                .min_by_key(|(_, r)| {
                    let state = r.state.lock().unwrap_or_else(|e| e.into_inner());
                    (state.held.is_some(), state.last_used)
                })
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                realms.remove(&oldest);
            }
        }
        let realm = Arc::new(Realm {
            iss: iss.to_owned(),
            tenant: tenant.map(str::to_owned),
            state: Mutex::new(RealmState::default()),
            fetching: tokio::sync::Mutex::new(()),
        });
        realms.insert(iss.to_owned(), Arc::clone(&realm));
        Ok(realm)
    }

    /// The keys to verify a token of `iss` (whose header names `kid`) with, fetching
    /// them first if needed.
    pub(crate) async fn keys_for(
        self: &Arc<Self>,
        iss: &str,
        tenant: Option<&str>,
        kid: Option<&str>,
        now: SystemTime,
    ) -> Result<Arc<[IssuerKey]>> {
        let realm = self.realm(iss, tenant, now)?;
        let action = {
            let mut state = realm.state.lock().unwrap_or_else(|e| e.into_inner());
            state.last_used = Some(now);
            let mut action = decide(&state, kid, now, &self.bounds);
            // A realm that never got keys (unknown, made up, or failing) is tried again
            // only as the new-realm budget allows, so junk realms can't keep the
            // provider busy or starve real ones.
            if action == Action::Fetch
                && state.held.is_none()
                && state.last_attempt.is_some()
                && !self.admit_new_realm(now)
            {
                action = Action::Unavailable;
            }
            if action == Action::UseAndRefresh {
                state.refreshing = true;
            }
            action
        };
        match action {
            Action::Use => {}
            Action::UseAndRefresh => {
                let this = Arc::clone(self);
                let realm = Arc::clone(&realm);
                tokio::spawn(async move {
                    this.refresh(&realm, now).await;
                    realm
                        .state
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .refreshing = false;
                });
            }
            Action::Fetch => self.refresh(&realm, now).await,
            Action::Unavailable => {}
        }
        self.in_hand(&realm, now)
    }

    /// The keys in hand for `iss`, without fetching (for synchronous checks).
    pub(crate) fn cached(&self, iss: &str, now: SystemTime) -> Result<Arc<[IssuerKey]>> {
        let realm = self
            .realms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(iss)
            .cloned()
            .ok_or_else(|| Error::IssuerUnavailable(iss.to_owned()))?;
        self.in_hand(&realm, now)
    }

    fn in_hand(&self, realm: &Realm, now: SystemTime) -> Result<Arc<[IssuerKey]>> {
        let state = realm.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(held) = &state.held else {
            return Err(match state.failing {
                Some(true) => Error::UntrustedIssuer(realm.iss.clone()),
                _ => Error::IssuerUnavailable(realm.iss.clone()),
            });
        };
        if now >= held.usable_until(&self.bounds) {
            return Err(Error::IssuerUnavailable(realm.iss.clone()));
        }
        let age = now.duration_since(held.fetched_at).unwrap_or_default();
        self.metrics
            .keys_used(&self.name, age, now >= held.fresh_until);
        Ok(Arc::clone(&held.keys))
    }

    /// Fetches the realm's keys (one fetch at a time; a fetch that started while this one
    /// waited counts as this one) and records the outcome, logging state changes.
    async fn refresh(&self, realm: &Realm, now: SystemTime) {
        let _one = realm.fetching.lock().await;
        {
            let mut state = realm.state.lock().unwrap_or_else(|e| e.into_inner());
            // Another caller fetched while this one waited: its answer is this one's.
            if state
                .last_attempt
                .is_some_and(|at| at + self.bounds.refetch_interval > now)
            {
                return;
            }
            state.last_attempt = Some(now);
        }
        let result = self.fetch(realm).await;
        self.metrics.key_fetch(&self.name, result.is_ok());
        let mut state = realm.state.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok((keys, max_age)) => {
                let ttl = max_age
                    .unwrap_or(self.bounds.max_ttl)
                    .clamp(self.bounds.min_ttl, self.bounds.max_ttl);
                let kids: BTreeSet<String> = keys.iter().filter_map(|k| k.kid.clone()).collect();
                match (&state.held, state.failing) {
                    (None, _) => tracing::info!(
                        issuer = %realm.iss, tenant = ?realm.tenant, kids = ?kids,
                        cache_secs = ttl.as_secs(), "issuer keys fetched"
                    ),
                    (Some(old), _) if old.kids != kids => tracing::info!(
                        issuer = %realm.iss, tenant = ?realm.tenant,
                        added = ?kids.difference(&old.kids).collect::<Vec<_>>(),
                        removed = ?old.kids.difference(&kids).collect::<Vec<_>>(),
                        "issuer keys changed"
                    ),
                    (Some(_), Some(_)) => tracing::info!(
                        issuer = %realm.iss, tenant = ?realm.tenant, "issuer keys fetched again after failures"
                    ),
                    _ => {}
                }
                let refresh_after = ttl.mul_f64(REFRESH_AHEAD);
                state.held = Some(Held {
                    keys: keys.into(),
                    kids,
                    fetched_at: now,
                    fresh_until: now + ttl,
                    refresh_at: now + refresh_after,
                });
                state.failing = None;
            }
            Err(problem) => {
                let not_found = matches!(problem, KeysProblem::NotFound(_));
                if state.failing.is_none() {
                    match &state.held {
                        Some(held) => tracing::warn!(
                            issuer = %realm.iss, tenant = ?realm.tenant, error = %problem,
                            keys_age_secs = now.duration_since(held.fetched_at).unwrap_or_default().as_secs(),
                            "issuer keys could not be refreshed; verifying with the last good keys"
                        ),
                        None => tracing::warn!(
                            issuer = %realm.iss, tenant = ?realm.tenant, error = %problem,
                            "issuer keys could not be fetched; its tokens are refused"
                        ),
                    }
                }
                state.failing = Some(not_found);
                if not_found {
                    // The provider disowns the realm: its old keys vouch for nothing.
                    state.held = None;
                }
            }
        }
    }

    async fn get(&self, url: &str) -> std::result::Result<Fetched, KeysProblem> {
        let fetched = self
            .http
            .get(GetRequest {
                url,
                headers: &[],
                timeout: KEYS_FETCH_TIMEOUT,
                max_bytes: MAX_KEYS_DOCUMENT_BYTES,
            })
            .await
            .map_err(|e| KeysProblem::Other(format!("{url}: {e}")))?;
        match fetched.status {
            200 => Ok(fetched),
            404 => Err(KeysProblem::NotFound(format!("{url}: HTTP 404"))),
            status => Err(KeysProblem::Other(format!("{url}: HTTP {status}"))),
        }
    }

    async fn fetch(
        &self,
        realm: &Realm,
    ) -> std::result::Result<(Vec<IssuerKey>, Option<Duration>), KeysProblem> {
        let jwks_uri = match &self.source {
            KeySource::JwksUri(uri) => {
                uri.replace("{tenant}", realm.tenant.as_deref().unwrap_or(""))
            }
            KeySource::Discovery => {
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    realm.iss.trim_end_matches('/')
                );
                let doc = self.get(&url).await?;
                let doc: Value = serde_json::from_slice(&doc.body)
                    .map_err(|e| KeysProblem::Other(format!("{url}: not JSON: {e}")))?;
                // OpenID Connect Discovery §4.3: the document must name the issuer it
                // was fetched for.
                if doc.get("issuer").and_then(Value::as_str) != Some(realm.iss.as_str()) {
                    return Err(KeysProblem::Other(format!(
                        "{url}: the document's issuer is not {}",
                        realm.iss
                    )));
                }
                let uri = doc
                    .get("jwks_uri")
                    .and_then(Value::as_str)
                    // Keys of an https issuer never travel in clear text (a misconfigured
                    // proxy advertising http:// would let anyone on the path inject one).
                    .filter(|u| {
                        u.starts_with("https://")
                            || (u.starts_with("http://") && realm.iss.starts_with("http://"))
                    })
                    .ok_or_else(|| {
                        KeysProblem::Other(format!(
                            "{url}: no jwks_uri, or an http:// one for an https:// issuer"
                        ))
                    })?;
                uri.to_owned()
            }
        };
        let fetched = self.get(&jwks_uri).await?;
        let keys = keys_from_jwks(&fetched.body)
            .map_err(|e| KeysProblem::Other(format!("{jwks_uri}: {e}")))?;
        Ok((keys, max_age(fetched.cache_control.as_deref())))
    }
}

/// Why keys could not be had.
#[derive(Debug)]
enum KeysProblem {
    /// The provider does not know the realm.
    NotFound(String),
    Other(String),
}

impl fmt::Display for KeysProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeysProblem::NotFound(m) | KeysProblem::Other(m) => f.write_str(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::UNIX_EPOCH;

    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use serde_json::json;

    use super::*;
    use crate::subject::SubjectVerifier;

    const T0: u64 = 1_767_225_600;
    const KC: &str = "http://kc.test/realms/";

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(T0 + secs)
    }

    /// A scripted identity provider: realms answer discovery and `/certs`, the JWKS and
    /// its Cache-Control can change, and it can go down. Every URL asked is recorded.
    struct FakeIdp {
        realms: Vec<&'static str>,
        jwks: Mutex<Value>,
        cache_control: Mutex<Option<&'static str>>,
        down: AtomicBool,
        asked: Mutex<Vec<String>>,
    }

    impl FakeIdp {
        fn new(realms: Vec<&'static str>, keys: &[&Key]) -> Arc<Self> {
            Arc::new(Self {
                realms,
                jwks: Mutex::new(
                    json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() }),
                ),
                cache_control: Mutex::new(Some("max-age=300")),
                down: AtomicBool::new(false),
                asked: Mutex::new(Vec::new()),
            })
        }

        fn publish(&self, keys: &[&Key]) {
            *self.jwks.lock().unwrap() =
                json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() });
        }

        fn asked(&self) -> usize {
            self.asked.lock().unwrap().len()
        }
    }

    #[async_trait::async_trait]
    impl HttpGet for FakeIdp {
        async fn get(&self, r: GetRequest<'_>) -> std::result::Result<Fetched, FetchError> {
            self.asked.lock().unwrap().push(r.url.to_owned());
            if self.down.load(Ordering::SeqCst) {
                return Err(FetchError::Transport("connection refused".into()));
            }
            let answer = |status, body: Value, cc: Option<&str>| Fetched {
                status,
                cache_control: cc.map(str::to_owned),
                body: body.to_string().into(),
            };
            let realm = r
                .url
                .strip_prefix(KC)
                .and_then(|rest| rest.split('/').next());
            if !realm.is_some_and(|realm| self.realms.contains(&realm)) {
                return Ok(answer(404, json!({}), None));
            }
            if let Some(iss) = r.url.strip_suffix("/.well-known/openid-configuration") {
                let doc = json!({"issuer": iss, "jwks_uri": format!("{iss}/certs")});
                return Ok(answer(200, doc, None));
            }
            let jwks = self.jwks.lock().unwrap().clone();
            Ok(answer(200, jwks, *self.cache_control.lock().unwrap()))
        }
    }

    struct Key {
        pair: Ed25519KeyPair,
        kid: String,
        jwk: Value,
    }

    fn key(kid: &str) -> Key {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let x = B64.encode(pair.public_key().as_ref());
        let jwk = json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "use": "sig", "x": x});
        Key {
            pair,
            kid: kid.into(),
            jwk,
        }
    }

    /// A Keycloak-shaped token of `realm` (no permissions, `user_id` claim) signed by `k`.
    fn token(k: &Key, realm: &str, extra: Value) -> String {
        let mut claims = json!({"iss": format!("{KC}{realm}"), "sub": "kc-uuid-1",
            "user_id": "u-1", "sid": "s", "iat": T0, "exp": T0 + 7200});
        for (name, value) in extra.as_object().unwrap() {
            claims[name] = value.clone();
        }
        let header = json!({"alg": "EdDSA", "typ": "JWT", "kid": k.kid});
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = k.pair.sign(input.as_bytes());
        format!("{input}.{}", B64.encode(sig.as_ref()))
    }

    fn pattern_entry(adjust: impl FnOnce(&mut IssuerConfig)) -> IssuerConfig {
        let mut c = IssuerConfig {
            issuer_pattern: Some(format!("{KC}{{tenant}}")),
            discovery: true,
            subject_claim: "user_id".into(),
            ..IssuerConfig::default()
        };
        adjust(&mut c);
        c
    }

    fn verifier(c: IssuerConfig, idp: &Arc<FakeIdp>) -> (SubjectVerifier, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let http: Arc<dyn HttpGet> = idp.clone();
        let v = SubjectVerifier::with_http(&[c], http, Arc::clone(&metrics)).unwrap();
        (v, metrics)
    }

    #[test]
    fn a_pattern_takes_one_plain_path_segment() {
        let p = IssuerPattern::parse("https://kc/realms/{tenant}").unwrap();
        assert_eq!(p.tenant("https://kc/realms/diku"), Some("diku"));
        for bad in [
            "https://kc/realms/",
            "https://kc/realms/a/b",
            "https://kc/realms/..",
            "https://kc/realms/a%2Fb",
            "https://kc/realms/a?x",
            "https://kc/realms/a#x",
            "https://kc/realms/di ku",
            "https://kc/realmsx/diku",
            "http://kc/realms/diku",
        ] {
            assert_eq!(p.tenant(bad), None, "{bad}");
        }
        let with_suffix = IssuerPattern::parse("https://idp/{tenant}/oidc").unwrap();
        assert_eq!(
            with_suffix.tenant("https://idp/college/oidc"),
            Some("college")
        );
        for bad in [
            "https://kc/realms/",
            "https://{tenant}.kc/realms",
            "https://kc/realms/x{tenant}",
            "https://kc/{tenant}/{tenant}",
            "ftp://kc/{tenant}",
        ] {
            assert!(IssuerPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_fetch_decision_as_a_table() {
        let b = Bounds {
            refetch_interval: Duration::from_secs(10),
            min_ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(900),
            max_stale: Duration::from_secs(3600),
            max_realms: 10,
        };
        let held = |fetched: u64, ttl: u64| Held {
            keys: Vec::new().into(),
            kids: ["k1".to_owned()].into(),
            fetched_at: at(fetched),
            fresh_until: at(fetched + ttl),
            refresh_at: at(fetched + ttl * 8 / 10),
        };
        let state = |held: Option<Held>, attempt: Option<u64>, refreshing: bool| RealmState {
            held,
            last_attempt: attempt.map(at),
            failing: None,
            refreshing,
            last_used: None,
        };
        use Action::*;
        for (case, s, kid, now, want) in [
            ("never fetched", state(None, None, false), None, 0, Fetch),
            (
                "failed 5 s ago",
                state(None, Some(0), false),
                None,
                5,
                Unavailable,
            ),
            (
                "failed 10 s ago",
                state(None, Some(0), false),
                None,
                10,
                Fetch,
            ),
            (
                "fresh",
                state(Some(held(0, 100)), Some(0), false),
                Some("k1"),
                50,
                Use,
            ),
            (
                "no kid, fresh",
                state(Some(held(0, 100)), Some(0), false),
                None,
                50,
                Use,
            ),
            (
                "unknown kid",
                state(Some(held(0, 100)), Some(0), false),
                Some("k2"),
                50,
                Fetch,
            ),
            (
                "unknown kid, just fetched",
                state(Some(held(0, 100)), Some(0), false),
                Some("k2"),
                9,
                Use,
            ),
            (
                "80% of max-age",
                state(Some(held(0, 100)), Some(0), false),
                Some("k1"),
                80,
                UseAndRefresh,
            ),
            (
                "refresh running",
                state(Some(held(0, 100)), Some(0), true),
                Some("k1"),
                80,
                Use,
            ),
            (
                "stale, refresh failing",
                state(Some(held(0, 100)), Some(150), false),
                Some("k1"),
                155,
                Use,
            ),
            (
                "stale, retry due",
                state(Some(held(0, 100)), Some(150), false),
                Some("k1"),
                160,
                UseAndRefresh,
            ),
            (
                "beyond max_stale",
                state(Some(held(0, 100)), Some(3600), false),
                None,
                3601,
                Unavailable,
            ),
            (
                "beyond max_stale, retry due",
                state(Some(held(0, 100)), Some(3590), false),
                None,
                3601,
                Fetch,
            ),
        ] {
            assert_eq!(decide(&s, kid, at(now), &b), want, "{case}");
        }
    }

    /// The real client against an in-process server: bodies over the limit (declared or
    /// streamed) and slow answers are errors, redirects are not followed, and the
    /// Cache-Control header comes back.
    #[tokio::test]
    async fn the_http_client_bounds_size_and_time_and_follows_no_redirect() {
        use axum::routing::get;
        let app = axum::Router::new()
            .route(
                "/small",
                get(|| async { ([("cache-control", "max-age=42")], "{}") }),
            )
            .route("/big", get(|| async { "x".repeat(10_000) }))
            .route(
                "/streamed",
                get(|| async {
                    let chunks = (0..10).map(|_| Ok::<_, std::io::Error>("x".repeat(1000)));
                    axum::body::Body::from_stream(futures::stream::iter(chunks))
                }),
            )
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    "{}"
                }),
            )
            .route(
                "/redirect",
                get(|| async { (http::StatusCode::FOUND, [("location", "/small")]) }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = HttpClient::new(None).unwrap();
        let get = |path: &'static str, timeout_ms: u64| {
            let client = client.clone();
            async move {
                let url = format!("http://{addr}{path}");
                client
                    .get(GetRequest {
                        url: &url,
                        headers: &[],
                        timeout: Duration::from_millis(timeout_ms),
                        max_bytes: 5000,
                    })
                    .await
            }
        };
        let small = get("/small", 2000).await.unwrap();
        assert_eq!((small.status, small.body.as_ref()), (200, &b"{}"[..]));
        assert_eq!(small.cache_control.as_deref(), Some("max-age=42"));
        assert!(matches!(
            get("/big", 2000).await,
            Err(FetchError::TooLarge(5000))
        ));
        assert!(matches!(
            get("/streamed", 2000).await,
            Err(FetchError::TooLarge(5000))
        ));
        assert!(matches!(
            get("/slow", 200).await,
            Err(FetchError::Transport(_))
        ));
        assert_eq!(get("/redirect", 2000).await.unwrap().status, 302);
    }

    /// Keycloak's certs hold an encryption key beside the signing keys; providers add key
    /// types we don't know. Those are skipped, not fatal; no signing key at all is.
    #[test]
    fn jwks_documents_keep_only_usable_signing_keys() {
        let k = key("sig-1");
        let enc = json!({"kid": "enc-1", "kty": "RSA", "alg": "RSA-OAEP", "use": "enc",
            "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw",
            "e": "AQAB"});
        let odd = json!({"kid": "pq-1", "kty": "AKP", "alg": "ML-DSA-44", "pub": "AAAA"});
        let doc = json!({"keys": [enc, odd, k.jwk]});
        let keys = keys_from_jwks(doc.to_string().as_bytes()).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("sig-1"));
        let only_enc = json!({"keys": [doc["keys"][0]]});
        assert!(keys_from_jwks(only_enc.to_string().as_bytes()).is_err());
        assert!(keys_from_jwks(b"{\"keys\": 7}").is_err());
        assert!(keys_from_jwks(b"<html>").is_err());
    }

    #[test]
    fn cache_control_gives_the_keys_age() {
        assert_eq!(
            max_age(Some("public, max-age=120")),
            Some(Duration::from_secs(120))
        );
        assert_eq!(max_age(Some("no-cache")), Some(Duration::ZERO));
        assert_eq!(max_age(Some("private")), None);
        assert_eq!(max_age(None), None);
    }

    #[tokio::test]
    async fn realms_are_discovered_lazily_and_the_tenant_comes_from_iss() {
        let k1 = key("k1");
        let idp = FakeIdp::new(vec!["diku", "college"], &[&k1]);
        let (v, metrics) = verifier(pattern_entry(|_| {}), &idp);

        let subject = v
            .verify_fetching(&token(&k1, "diku", json!({})), at(1))
            .await
            .unwrap();
        assert_eq!(subject.tenant, "diku");
        assert_eq!(subject.subject, "u-1", "subject_claim = user_id");
        assert_eq!(subject.sub.as_deref(), Some("kc-uuid-1"));
        assert_eq!(subject.issuer, format!("{KC}diku"));
        assert_eq!(
            *idp.asked.lock().unwrap(),
            [
                format!("{KC}diku/.well-known/openid-configuration"),
                format!("{KC}diku/certs")
            ]
        );
        // Cached: the next token of the realm costs no fetch; another realm costs its own.
        v.verify_fetching(&token(&k1, "diku", json!({})), at(2))
            .await
            .unwrap();
        assert_eq!(idp.asked(), 2);
        let college = v
            .verify_fetching(&token(&k1, "college", json!({"tenant": "college"})), at(2))
            .await
            .unwrap();
        assert_eq!(college.tenant, "college");
        assert_eq!(idp.asked(), 4);
        // A tenant claim that disagrees with iss is refused.
        let e = v
            .verify_fetching(&token(&k1, "diku", json!({"tenant": "college"})), at(3))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("does not agree"), "{e}");
        assert!(metrics.encode(crate::metrics::Format::OpenMetrics).contains("jobtoken_issuer_key_fetches_total{issuer=\"http://kc.test/realms/{tenant}\",result=\"ok\"} 2"));
    }

    #[tokio::test]
    async fn unknown_realms_cost_one_fetch_per_interval_and_listed_tenants_none() {
        let k1 = key("k1");
        let idp = FakeIdp::new(vec!["diku"], &[&k1]);
        let (v, _) = verifier(pattern_entry(|_| {}), &idp);
        for second in [1, 2, 5] {
            let e = v
                .verify_fetching(&token(&k1, "nope", json!({})), at(second))
                .await
                .unwrap_err();
            assert!(matches!(e, Error::UntrustedIssuer(_)), "{e:?}");
        }
        assert_eq!(idp.asked(), 1, "404 remembered for the refetch interval");
        // Not of the pattern's shape: refused before any fetch.
        for realm in ["a/b", "..", "di%6Bu", ""] {
            let e = v
                .verify_fetching(&token(&k1, realm, json!({})), at(6))
                .await
                .unwrap_err();
            assert!(matches!(e, Error::UntrustedIssuer(_)), "{realm}: {e:?}");
        }
        assert_eq!(idp.asked(), 1);

        // With a tenant list, another realm is untrusted without a fetch.
        let idp = FakeIdp::new(vec!["diku", "college"], &[&k1]);
        let (v, _) = verifier(
            pattern_entry(|c| c.tenants = Some(vec!["diku".into()])),
            &idp,
        );
        let e = v
            .verify_fetching(&token(&k1, "college", json!({})), at(1))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::UntrustedIssuer(_)), "{e:?}");
        assert_eq!(idp.asked(), 0);
        v.verify_fetching(&token(&k1, "diku", json!({})), at(1))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn made_up_realms_are_bounded_in_number_and_rate() {
        let k1 = key("k1");
        let idp = FakeIdp::new(vec!["diku"], &[&k1]);
        let (v, _) = verifier(pattern_entry(|c| c.max_realms = 3), &idp);
        let mut refused_without_fetch = 0;
        for i in 0..100 {
            let before = idp.asked();
            let _ = v
                .verify_fetching(&token(&k1, &format!("r{i}"), json!({})), at(1))
                .await;
            if idp.asked() == before {
                refused_without_fetch += 1;
            }
        }
        // A burst of twice the rate is fetched, the rest refused at once.
        assert_eq!(idp.asked(), (2.0 * NEW_REALMS_PER_SECOND) as usize);
        assert_eq!(refused_without_fetch, 100 - idp.asked());
        assert!(v.patterns_cached() <= 3);
        // A second later, a real realm gets through.
        v.verify_fetching(&token(&k1, "diku", json!({})), at(2))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_unknown_kid_refetches_at_most_once_per_interval() {
        let (k1, k2) = (key("k1"), key("k2"));
        let idp = FakeIdp::new(vec!["diku"], &[&k1]);
        let (v, _) = verifier(pattern_entry(|_| {}), &idp);
        v.verify_fetching(&token(&k1, "diku", json!({})), at(0))
            .await
            .unwrap();
        assert_eq!(idp.asked(), 2);
        // k2 is not published yet: no fetch within 10 s of the last, then one, then
        // none for 10 s again.
        for (second, asked) in [(1, 2), (9, 2), (10, 4), (11, 4), (19, 4)] {
            let e = v
                .verify_fetching(&token(&k2, "diku", json!({})), at(second))
                .await
                .unwrap_err();
            assert!(matches!(e, Error::SubjectTokenInvalid(_)), "{e:?}");
            assert_eq!(idp.asked(), asked, "at {second} s");
        }
        // The provider rotates (k2 active, k1 passive): picked up once the interval passed.
        idp.publish(&[&k2, &k1]);
        v.verify_fetching(&token(&k2, "diku", json!({})), at(20))
            .await
            .unwrap();
        v.verify_fetching(&token(&k1, "diku", json!({})), at(21))
            .await
            .unwrap();
        assert_eq!(idp.asked(), 6);
        // The token's own key location is never followed.
        let jku = token(&k2, "diku", json!({"jku": "http://evil/jwks"}));
        v.verify_fetching(&jku, at(22)).await.unwrap();
        assert!(idp.asked.lock().unwrap().iter().all(|u| u.starts_with(KC)));
    }

    async fn settle(idp: &FakeIdp, asked: usize) {
        for _ in 0..1000 {
            if idp.asked() >= asked {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("expected {asked} fetches, saw {}", idp.asked());
    }

    #[tokio::test]
    async fn keys_follow_cache_control_within_bounds_and_refresh_ahead() {
        let k1 = key("k1");
        let idp = FakeIdp::new(vec!["diku"], &[&k1]);
        *idp.cache_control.lock().unwrap() = Some("max-age=100");
        let (v, _) = verifier(
            pattern_entry(|c| {
                c.jwks_min_ttl = Duration::from_secs(60);
                c.jwks_max_ttl = Duration::from_secs(900);
            }),
            &idp,
        );
        let tok = token(&k1, "diku", json!({}));
        v.verify_fetching(&tok, at(0)).await.unwrap();
        v.verify_fetching(&tok, at(79)).await.unwrap();
        assert_eq!(idp.asked(), 2, "fresh until 80% of max-age");
        // From 80 s: served at once from the cache, refreshed in the background.
        v.verify_fetching(&tok, at(81)).await.unwrap();
        settle(&idp, 4).await;
        v.verify_fetching(&tok, at(82)).await.unwrap();
        assert_eq!(idp.asked(), 4);

        // `no-cache` (Keycloak's certs endpoint) is held to jwks_min_ttl.
        *idp.cache_control.lock().unwrap() = Some("no-cache");
        v.verify_fetching(&tok, at(81 + 81)).await.unwrap();
        settle(&idp, 6).await;
        v.verify_fetching(&tok, at(162 + 47)).await.unwrap();
        assert_eq!(idp.asked(), 6, "60 s floor: no refresh before 48 s");
        v.verify_fetching(&tok, at(162 + 49)).await.unwrap();
        settle(&idp, 8).await;
    }

    #[tokio::test]
    async fn an_outage_serves_the_last_good_keys_for_a_bounded_time() {
        let k1 = key("k1");
        let idp = FakeIdp::new(vec!["diku"], &[&k1]);
        *idp.cache_control.lock().unwrap() = Some("max-age=60");
        let (v, metrics) = verifier(
            pattern_entry(|c| c.jwks_max_stale = Duration::from_secs(3600)),
            &idp,
        );
        let tok = token(&k1, "diku", json!({}));
        v.verify_fetching(&tok, at(0)).await.unwrap();
        idp.down.store(true, Ordering::SeqCst);
        // Stale, the refresh fails: the last good keys still verify, and that is counted.
        v.verify_fetching(&tok, at(120)).await.unwrap();
        settle(&idp, 3).await;
        v.verify_fetching(&tok, at(125)).await.unwrap();
        assert!(
            metrics.encode(crate::metrics::Format::OpenMetrics).contains(
                "jobtoken_issuer_stale_keys_used_total{issuer=\"http://kc.test/realms/{tenant}\"} 2"
            ),
            "{}",
            metrics.encode(crate::metrics::Format::OpenMetrics)
        );
        assert!(
            metrics
                .encode(crate::metrics::Format::OpenMetrics)
                .contains("result=\"error\"} 1")
        );
        // Beyond jwks_max_stale nothing verifies, and the grant is a retryable UNAVAILABLE.
        let e = v.verify_fetching(&tok, at(3601)).await.unwrap_err();
        assert!(matches!(e, Error::IssuerUnavailable(_)), "{e:?}");
        // The provider is back: the next attempt after the interval recovers.
        idp.down.store(false, Ordering::SeqCst);
        v.verify_fetching(&tok, at(3612)).await.unwrap();

        // A realm never fetched, with the provider down: UNAVAILABLE, retried per interval.
        idp.down.store(true, Ordering::SeqCst);
        let (v, _) = verifier(pattern_entry(|_| {}), &idp);
        let before = idp.asked();
        for second in [0, 1, 2] {
            let e = v.verify_fetching(&tok, at(second)).await.unwrap_err();
            assert!(matches!(e, Error::IssuerUnavailable(_)), "{e:?}");
        }
        assert_eq!(idp.asked(), before + 1);
    }

    #[tokio::test]
    async fn a_jwks_uri_issuer_and_okapi_tokens_without_iss() {
        let k1 = key("k1");
        let idp = FakeIdp::new(vec!["diku"], &[&k1]);
        let entry = IssuerConfig {
            issuer: format!("{KC}diku"),
            jwks_uri: Some(format!("{KC}diku/certs")),
            tenant_claim: "tenant".into(),
            ..IssuerConfig::default()
        };
        let (v, _) = verifier(entry, &idp);
        let with_tenant = token(&k1, "diku", json!({"tenant": "diku", "permissions": ["a"]}));
        let subject = v.verify_fetching(&with_tenant, at(0)).await.unwrap();
        assert_eq!(subject.subject, "kc-uuid-1");
        assert_eq!(subject.permissions.len(), 1);
        assert_eq!(*idp.asked.lock().unwrap(), [format!("{KC}diku/certs")]);
        // The synchronous check uses the keys in hand.
        v.verify(&with_tenant, at(1)).unwrap();

        // Okapi: HS256, no iss; only the entry that says so takes such tokens.
        let dir = tempfile::tempdir().unwrap();
        let secret = b"okapi-shared-secret-at-least-32-bytes";
        std::fs::write(dir.path().join("s"), secret).unwrap();
        let okapi = IssuerConfig {
            issuer: "okapi".into(),
            tokens_without_iss: true,
            hs256_secret_file: Some(dir.path().join("s")),
            subject_claim: "user_id".into(),
            ..IssuerConfig::default()
        };
        let v = SubjectVerifier::from_config(std::slice::from_ref(&okapi)).unwrap();
        let hs = |claims: Value| {
            let header = B64.encode(r#"{"alg":"HS256"}"#);
            let input = format!("{header}.{}", B64.encode(claims.to_string()));
            let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
            let sig = aws_lc_rs::hmac::sign(&k, input.as_bytes());
            format!("{input}.{}", B64.encode(sig.as_ref()))
        };
        let claims = json!({"sub": "diku_admin", "user_id": "u-9", "tenant": "diku",
            "type": "access-token", "iat": T0, "exp": T0 + 600});
        let subject = v.verify(&hs(claims.clone()), at(1)).unwrap();
        assert_eq!(
            (subject.subject.as_str(), subject.tenant.as_str()),
            ("u-9", "diku")
        );
        assert_eq!(subject.issuer, "okapi");
        let mut with_iss = claims.clone();
        with_iss["iss"] = json!("https://elsewhere");
        assert!(matches!(
            v.verify(&hs(with_iss), at(1)),
            Err(Error::UntrustedIssuer(_))
        ));
        // Every other issuer still needs iss.
        let (strict, _) = verifier(pattern_entry(|_| {}), &idp);
        assert!(matches!(
            strict.verify(&hs(claims), at(1)),
            Err(Error::SubjectTokenInvalid(_))
        ));
    }
}
