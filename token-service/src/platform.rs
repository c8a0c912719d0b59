//! The user's permissions from the platform, for issuers whose tokens do not carry them
//! (FOLIO Eureka, FOLIO Okapi).
//!
//! [`PermissionSource`] is the port the grant path calls after the user token verified;
//! [`HttpPermissionSources`] is its adapter: one HTTP source per trusted-issuer entry with
//! `permission_source.kind = "http"`, called with the user's own token, answers cached
//! per tenant and user for a short time (like the platform's own cache).
//!
//! Outcomes: the permissions; `SUBJECT_TOKEN_INVALID` when the platform says the user does
//! not exist (404) or refuses the user's token (401, 403); otherwise (down, slow, 5xx, an
//! answer not of the configured shape) `PERMISSION_SOURCE_UNAVAILABLE`, which callers
//! retry. A source's change between working and failing is logged once each way.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use http::{HeaderName, HeaderValue};
use serde_json::Value;

use crate::clock::Clock;
use crate::config::{IssuerConfig, PermissionSourceKind, StartupError};
use crate::credential::ServiceCredential;
use crate::error::{Error, Result};
use crate::idp::{FetchError, GetRequest, HttpGet};
use crate::limits::MAX_PERMISSION_LEN;
use crate::metrics::Metrics;
pub use token_domain::ports::permissions::{
    NoPermissionSource, PermissionQuery, PermissionSource, Recheck, RecheckPolicy, RecheckQuery,
};

/// Cached answers: `(tenant, user)` → (cached until, permissions).
type AnswerCache = Mutex<HashMap<(String, String), (SystemTime, BTreeSet<String>)>>;

/// What one call to a source found, shared by every caller that waited for it.
#[derive(Debug, Clone)]
enum Answer {
    Names(BTreeSet<String>),
    UnknownUser,
    Disabled,
    Refused(u16),
    Unavailable,
}

/// Calls in flight, by `(tenant, user, asked with the service's credential)`: concurrent
/// grants of one user share one call, and so do concurrent re-checks, but a grant never
/// takes the answer to a call made with another credential (a refusal means something
/// else for each).
type InFlight = Mutex<HashMap<(String, String, bool), Shared<BoxFuture<'static, Answer>>>>;

/// One HTTP source.
struct HttpSource {
    url: String,
    pointer: String,
    headers: Vec<(HeaderName, String)>,
    token_header: Option<HeaderName>,
    cache_for: Duration,
    timeout: Duration,
    max_bytes: usize,
    cache_entries: usize,
    cache: AnswerCache,
    in_flight: InFlight,
    failing: AtomicBool,
    /// When the source (or the service's credential for it) last failed; cleared when it
    /// answers. Re-checks wait a `cache` period before asking a failing source again.
    failed_at: Mutex<Option<SystemTime>>,
    /// Where the answer says whether the user is active.
    active_pointer: Option<String>,
    recheck: Option<RecheckPolicy>,
    credential: Option<ServiceCredential>,
}

/// [`PermissionSource`] over HTTP, one source per trusted-issuer entry that has one.
pub struct HttpPermissionSources {
    inner: Arc<Sources>,
}

struct Sources {
    sources: HashMap<String, HttpSource>,
    http: Arc<dyn HttpGet>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
}

impl fmt::Debug for HttpPermissionSources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpPermissionSources")
            .field("sources", &self.inner.sources.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Replaces `{user_id}`, `{tenant}` and `{sub}` in `template`, each value passed through
/// `encode`.
fn fill(template: &str, q: &PermissionQuery<'_>, encode: fn(&str) -> String) -> String {
    template
        .replace("{user_id}", &encode(q.user_id))
        .replace("{tenant}", &encode(q.tenant))
        .replace("{sub}", &encode(q.sub.unwrap_or("")))
}

/// Percent-encodes all but the unreserved characters (RFC 3986 §2.3): a user id can never
/// add a path segment or a query to the configured URL.
pub fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reads the array of permission names at `pointer`.
fn names_at(body: &[u8], pointer: &str) -> std::result::Result<BTreeSet<String>, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let items = doc
        .pointer(pointer)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("no array of strings at {pointer:?}"))?;
    items
        .iter()
        .map(|v| {
            let name = v
                .as_str()
                .ok_or_else(|| format!("a non-string in the array at {pointer:?}"))?;
            crate::ident::check(name, MAX_PERMISSION_LEN)
                .map(|()| name.to_owned())
                .map_err(|p| format!("a permission name {p}"))
        })
        .collect()
}

/// Reads the boolean at `pointer`: whether the user is active. Anything but a boolean
/// there makes the answer unreadable (never "active by default").
fn is_active(body: &[u8], pointer: &str) -> std::result::Result<bool, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    doc.pointer(pointer)
        .and_then(Value::as_bool)
        .ok_or_else(|| format!("no boolean at {pointer:?}"))
}

impl HttpPermissionSources {
    /// The sources of every entry with `permission_source.kind = "http"`.
    pub fn from_config(
        issuers: &[IssuerConfig],
        http: Arc<dyn HttpGet>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StartupError> {
        let mut sources = HashMap::new();
        for c in issuers {
            let Some(p) = &c.permission_source else {
                continue;
            };
            if p.kind != PermissionSourceKind::Http {
                continue;
            }
            let header = |name: &str| {
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                    StartupError::Invalid(format!("permission_source: bad header {name:?}"))
                })
            };
            let source = HttpSource {
                url: p.url.clone().unwrap_or_default(),
                pointer: p.pointer.clone(),
                headers: p
                    .headers
                    .iter()
                    .map(|(k, v)| Ok((header(k)?, v.clone())))
                    .collect::<Result<_, StartupError>>()?,
                token_header: p.token_header.as_deref().map(header).transpose()?,
                cache_for: p.cache,
                timeout: p.timeout,
                max_bytes: p.max_response_bytes,
                cache_entries: p.cache_entries,
                cache: Mutex::new(HashMap::new()),
                in_flight: Mutex::new(HashMap::new()),
                failing: AtomicBool::new(false),
                failed_at: Mutex::new(None),
                active_pointer: p.active_pointer.clone(),
                recheck: p.recheck_interval.map(|interval| RecheckPolicy {
                    interval,
                    on_withdrawn: p.on_withdrawn,
                    max_unverified: p.max_unverified,
                }),
                credential: p
                    .service_credential
                    .as_ref()
                    .map(ServiceCredential::from_config)
                    .transpose()?,
            };
            sources.insert(c.name().to_owned(), source);
        }
        Ok(Self {
            inner: Arc::new(Sources {
                sources,
                http,
                clock,
                metrics,
            }),
        })
    }
}

impl Sources {
    fn cached(&self, source: &HttpSource, key: &(String, String)) -> Option<BTreeSet<String>> {
        let now = self.clock.now();
        let cache = source.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(key)
            .filter(|(until, _)| now < *until)
            .map(|(_, names)| names.clone())
    }

    fn remember(&self, source: &HttpSource, key: (String, String), names: &BTreeSet<String>) {
        if source.cache_for.is_zero() {
            return;
        }
        let now = self.clock.now();
        let mut cache = source.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= source.cache_entries {
            cache.retain(|_, (until, _)| now < *until);
            if cache.len() >= source.cache_entries {
                cache.clear();
            }
        }
        cache.insert(key, (now + source.cache_for, names.clone()));
    }

    /// Logs a change between working and failing, once each way.
    fn note(&self, name: &str, source: &HttpSource, problem: Option<&str>) {
        *source.failed_at.lock().unwrap_or_else(|e| e.into_inner()) =
            problem.map(|_| self.clock.now());
        let was_failing = source.failing.swap(problem.is_some(), Ordering::Relaxed);
        match problem {
            Some(problem) if !was_failing => tracing::warn!(
                issuer = %name, error = %problem,
                "permission source failing: grants of its users fail with PERMISSION_SOURCE_UNAVAILABLE"
            ),
            None if was_failing => {
                tracing::info!(issuer = %name, "permission source answering again");
            }
            _ => {}
        }
    }
}

impl Sources {
    /// One call to the source `name` for `key`, its outcome recorded (metrics, state-change
    /// log, cache) once, however many callers share it.
    async fn call(
        self: Arc<Self>,
        name: String,
        key: (String, String),
        url: String,
        headers: Vec<(HeaderName, HeaderValue)>,
    ) -> Answer {
        let Some(source) = self.sources.get(&name) else {
            return Answer::Unavailable;
        };
        let started = self.clock.now();
        let answer = self
            .http
            .get(GetRequest {
                url: &url,
                headers: &headers,
                timeout: source.timeout,
                max_bytes: source.max_bytes,
            })
            .await;
        let took = self.clock.now().duration_since(started).ok();
        let failed = |problem: &str| {
            tracing::warn!(
                issuer = %name, tenant = %key.0, user = %key.1, error = %problem,
                "permission source lookup failed"
            );
            self.note(&name, source, Some(problem));
            self.metrics.permission_lookup(&name, "unavailable", took);
            Answer::Unavailable
        };
        let answer = match answer {
            Ok(answer) => answer,
            Err(e @ (FetchError::Transport(_) | FetchError::TooLarge(_))) => {
                return failed(&e.to_string());
            }
        };
        match answer.status {
            200 => {}
            404 => {
                self.metrics.permission_lookup(&name, "unknown_user", took);
                self.note(&name, source, None);
                return Answer::UnknownUser;
            }
            status @ (401 | 403) => {
                self.metrics.permission_lookup(&name, "refused", took);
                self.note(&name, source, None);
                return Answer::Refused(status);
            }
            status => return failed(&format!("HTTP {status}")),
        }
        match names_at(&answer.body, &source.pointer).and_then(|names| {
            match &source.active_pointer {
                Some(pointer) if !is_active(&answer.body, pointer)? => Ok(None),
                _ => Ok(Some(names)),
            }
        }) {
            Ok(None) => {
                self.metrics.permission_lookup(&name, "disabled", took);
                self.note(&name, source, None);
                Answer::Disabled
            }
            Ok(Some(names)) => {
                self.metrics.permission_lookup(&name, "ok", took);
                self.note(&name, source, None);
                self.remember(source, key, &names);
                Answer::Names(names)
            }
            Err(problem) => failed(&problem),
        }
    }
}

impl HttpPermissionSources {
    /// The source named `name`; a verified subject names only configured ones.
    fn source(&self, name: &str) -> Result<&HttpSource> {
        self.inner.sources.get(name).ok_or_else(|| {
            Error::internal(std::io::Error::other(format!(
                "no permission source for issuer {name:?}"
            )))
        })
    }

    /// The configured headers, filled for `q`, then `credential`.
    fn headers(
        name: &str,
        source: &HttpSource,
        q: &PermissionQuery<'_>,
        credential: (HeaderName, HeaderValue),
    ) -> Option<Vec<(HeaderName, HeaderValue)>> {
        let mut headers = Vec::with_capacity(source.headers.len() + 1);
        for (header, template) in &source.headers {
            let Ok(value) = HeaderValue::from_str(&fill(template, q, str::to_owned)) else {
                tracing::warn!(issuer = %name, %header, "permission source header is not a valid value");
                return None;
            };
            headers.push((header.clone(), value));
        }
        headers.push(credential);
        Some(headers)
    }

    /// Asks source `name` about `q`'s user with `headers`: from the cache, or by joining
    /// a call in flight for the same user, or by a new call.
    async fn ask(
        &self,
        name: &str,
        q: &PermissionQuery<'_>,
        headers: Vec<(HeaderName, HeaderValue)>,
        by_service: bool,
    ) -> Answer {
        let sources = &self.inner;
        let Some(source) = sources.sources.get(name) else {
            return Answer::Unavailable;
        };
        let key = (q.tenant.to_owned(), q.user_id.to_owned());
        if let Some(names) = sources.cached(source, &key) {
            sources.metrics.permission_lookup(name, "cached", None);
            return Answer::Names(names);
        }
        let url = fill(&source.url, q, percent_encode);
        let flight = (key.0.clone(), key.1.clone(), by_service);
        let call = {
            let mut in_flight = source.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            in_flight
                .entry(flight.clone())
                .or_insert_with(|| {
                    // A task of its own that removes its entry when done: a caller that
                    // gives up (its deadline passed) must not leave the call, and the
                    // user's token in it, behind for the next grant to join.
                    let owner = Arc::clone(sources);
                    let name = name.to_owned();
                    tokio::spawn(async move {
                        let answer = Arc::clone(&owner)
                            .call(name.clone(), key, url, headers)
                            .await;
                        if let Some(source) = owner.sources.get(&name) {
                            let mut in_flight =
                                source.in_flight.lock().unwrap_or_else(|e| e.into_inner());
                            in_flight.remove(&flight);
                        }
                        answer
                    })
                    .map(|joined| joined.unwrap_or(Answer::Unavailable))
                    .boxed()
                    .shared()
                })
                .clone()
        };
        call.await
    }
}

#[async_trait::async_trait]
impl PermissionSource for HttpPermissionSources {
    async fn permissions(&self, q: &PermissionQuery<'_>) -> Result<BTreeSet<String>> {
        let name = q.source;
        let source = self.source(name)?;
        let (token_header, token_value) = match &source.token_header {
            Some(h) => (h.clone(), q.token.to_owned()),
            None => (http::header::AUTHORIZATION, format!("Bearer {}", q.token)),
        };
        let mut token_value = HeaderValue::from_str(&token_value)
            .map_err(|_| Error::SubjectTokenInvalid("the token is not a header value".into()))?;
        token_value.set_sensitive(true);
        let headers = Self::headers(name, source, q, (token_header, token_value))
            .ok_or_else(|| Error::PermissionSourceUnavailable(name.to_owned()))?;
        match self.ask(name, q, headers, false).await {
            Answer::Names(names) => Ok(names),
            Answer::UnknownUser => Err(Error::SubjectTokenInvalid(format!(
                "the platform's permission source does not know user {:?} in tenant {:?}",
                q.user_id, q.tenant
            ))),
            Answer::Disabled => Err(Error::SubjectTokenInvalid(format!(
                "the platform says user {:?} in tenant {:?} is disabled",
                q.user_id, q.tenant
            ))),
            Answer::Refused(status) => Err(Error::SubjectTokenInvalid(format!(
                "the platform's permission source refused the user's token (HTTP {status})"
            ))),
            Answer::Unavailable => Err(Error::PermissionSourceUnavailable(name.to_owned())),
        }
    }

    fn recheck_policy(&self, source: &str) -> Option<RecheckPolicy> {
        self.inner.sources.get(source)?.recheck
    }

    async fn recheck(&self, r: &RecheckQuery<'_>) -> Recheck {
        let Ok(source) = self.source(r.source) else {
            return Recheck::Unanswered(format!("no permission source {:?}", r.source));
        };
        let Some(credential) = &source.credential else {
            return Recheck::Unanswered("the source has no service_credential".into());
        };
        let sources = &self.inner;
        // An outage must not turn every renewal into a call that waits for a timeout:
        // while the source is failing, re-checks ask it again once per `cache` period.
        let failed_at = *source.failed_at.lock().unwrap_or_else(|e| e.into_inner());
        if failed_at.is_some_and(|at| sources.clock.now() < at + source.cache_for) {
            sources
                .metrics
                .permission_lookup(r.source, "skipped_failing", None);
            return Recheck::Unanswered("the permission source is failing".into());
        }
        let header = credential
            .header(
                r.tenant,
                &*sources.http,
                source.timeout,
                sources.clock.now(),
            )
            .await;
        let header = match header {
            Ok(header) => header,
            Err(problem) => {
                tracing::warn!(issuer = %r.source, tenant = %r.tenant, error = %problem,
                    "service credential for permission re-checks unavailable");
                *source.failed_at.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(sources.clock.now());
                return Recheck::Unanswered(problem);
            }
        };
        let q = PermissionQuery {
            source: r.source,
            tenant: r.tenant,
            user_id: r.user_id,
            sub: r.sub,
            token: "",
        };
        let Some(headers) = Self::headers(r.source, source, &q, header) else {
            return Recheck::Unanswered("a configured header is not a valid value".into());
        };
        match self.ask(r.source, &q, headers, true).await {
            Answer::Names(names) => Recheck::Holds(names),
            Answer::UnknownUser => Recheck::Gone("the platform does not know the user"),
            Answer::Disabled => Recheck::Gone("the platform says the user is disabled"),
            // Asked with the service's own credential, a refusal is about the service,
            // not the user: it must not end anyone's lease.
            Answer::Refused(status) => {
                tracing::warn!(issuer = %r.source, status,
                    "permission source refused the service credential");
                Recheck::Unanswered(format!(
                    "the source refused the service credential (HTTP {status})"
                ))
            }
            Answer::Unavailable => Recheck::Unanswered("the source is unavailable".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_percent_encoded_in_urls_only() {
        let q = PermissionQuery {
            source: "s",
            tenant: "diku",
            user_id: "a/b?c d",
            sub: Some("alice"),
            token: "t",
        };
        assert_eq!(
            fill(
                "https://gw/perms/users/{user_id}?t={tenant}&s={sub}",
                &q,
                percent_encode
            ),
            "https://gw/perms/users/a%2Fb%3Fc%20d?t=diku&s=alice"
        );
        assert_eq!(fill("{tenant}", &q, str::to_owned), "diku");
        assert!(!format!("{q:?}").contains("\"t\""));
    }

    /// A call: the URL and its headers.
    type Call = (String, Vec<(String, String)>);

    /// A scripted platform: answers with `status` and `body`, records each call's URL
    /// and headers.
    struct FakePlatform {
        answer: Mutex<std::result::Result<(u16, &'static str), ()>>,
        calls: Mutex<Vec<Call>>,
    }

    #[async_trait::async_trait]
    impl HttpGet for FakePlatform {
        async fn get(
            &self,
            r: GetRequest<'_>,
        ) -> std::result::Result<crate::idp::Fetched, FetchError> {
            let headers = r
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
                .collect();
            self.calls.lock().unwrap().push((r.url.to_owned(), headers));
            // Answer a moment later, as a server would: concurrent callers overlap.
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
            match *self.answer.lock().unwrap() {
                Ok((status, body)) => Ok(crate::idp::Fetched {
                    status,
                    cache_control: None,
                    body: body.as_bytes().to_vec().into(),
                }),
                Err(()) => Err(FetchError::Transport("connection refused".into())),
            }
        }
    }

    #[tokio::test]
    async fn answers_are_cached_per_user_and_failures_are_told_apart() {
        let fake = Arc::new(FakePlatform {
            answer: Mutex::new(Ok((200, r#"{"permissionNames":["a.read","b.write"]}"#))),
            calls: Mutex::new(Vec::new()),
        });
        let mut source = crate::config::PermissionSourceConfig::http(
            "http://gw/perms/users/{user_id}/permissions?expanded=true",
        );
        source.pointer = "/permissionNames".into();
        source.headers = [("x-okapi-tenant".to_owned(), "{tenant}".to_owned())].into();
        source.token_header = Some("x-okapi-token".into());
        let entry = IssuerConfig {
            issuer: "okapi".into(),
            permission_source: Some(source),
            ..IssuerConfig::default()
        };
        let clock = crate::clock::ManualClock::at_fixed_instant();
        let metrics = Arc::new(Metrics::new());
        let http: Arc<dyn HttpGet> = fake.clone();
        let sources = HttpPermissionSources::from_config(
            &[entry],
            http,
            Arc::new(clock.clone()),
            Arc::clone(&metrics),
        )
        .unwrap();
        let q = |user: &'static str| PermissionQuery {
            source: "okapi",
            tenant: "diku",
            user_id: user,
            sub: Some("diku_admin"),
            token: "user-token",
        };
        let names = sources.permissions(&q("u-1")).await.unwrap();
        assert_eq!(names, ["a.read".to_owned(), "b.write".to_owned()].into());
        let (url, headers) = fake.calls.lock().unwrap()[0].clone();
        assert_eq!(url, "http://gw/perms/users/u-1/permissions?expanded=true");
        assert!(headers.contains(&("x-okapi-tenant".into(), "diku".into())));
        assert!(headers.contains(&("x-okapi-token".into(), "user-token".into())));
        assert!(!headers.iter().any(|(k, _)| k == "authorization"));

        // Cached for 30 s per (tenant, user); another user is asked for.
        sources.permissions(&q("u-1")).await.unwrap();
        assert_eq!(fake.calls.lock().unwrap().len(), 1);
        *fake.answer.lock().unwrap() = Ok((404, "{}"));
        let e = sources.permissions(&q("u-2")).await.unwrap_err();
        assert!(
            matches!(e, Error::SubjectTokenInvalid(ref m) if m.contains("does not know user \"u-2\"")),
            "{e:?}"
        );
        *fake.answer.lock().unwrap() = Ok((401, "{}"));
        assert!(matches!(
            sources.permissions(&q("u-2")).await,
            Err(Error::SubjectTokenInvalid(_))
        ));
        for answer in [Err(()), Ok((503, "{}")), Ok((200, r#"{"permissions":[]}"#))] {
            *fake.answer.lock().unwrap() = answer;
            assert!(matches!(
                sources.permissions(&q("u-3")).await,
                Err(Error::PermissionSourceUnavailable(ref n)) if n == "okapi"
            ));
        }
        clock.advance(Duration::from_secs(31));
        *fake.answer.lock().unwrap() = Err(());
        assert!(
            sources.permissions(&q("u-1")).await.is_err(),
            "the cache expired"
        );
        let text = metrics.encode(crate::metrics::Format::OpenMetrics);
        assert!(
            text.contains(
                "jobtoken_permission_source_lookups_total{issuer=\"okapi\",result=\"cached\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("result=\"unavailable\"} 4"), "{text}");
    }

    #[tokio::test]
    async fn a_failing_source_is_rechecked_once_per_cache_period_and_grants_never_join_rechecks() {
        let fake = Arc::new(FakePlatform {
            answer: Mutex::new(Err(())),
            calls: Mutex::new(Vec::new()),
        });
        let dir = tempfile::tempdir().unwrap();
        let value_file = dir.path().join("api-key");
        std::fs::write(&value_file, "service-key").unwrap();
        let mut source =
            crate::config::PermissionSourceConfig::http("http://gw/permissions/users/{user_id}");
        source.recheck_interval = Some(Duration::from_secs(60));
        source.service_credential = Some(crate::config::ServiceCredentialConfig::Header {
            name: "x-api-key".into(),
            value_file,
        });
        let entry = IssuerConfig {
            issuer: "kc".into(),
            permission_source: Some(source),
            ..IssuerConfig::default()
        };
        let clock = crate::clock::ManualClock::at_fixed_instant();
        let http: Arc<dyn HttpGet> = fake.clone();
        let sources = HttpPermissionSources::from_config(
            &[entry],
            http,
            Arc::new(clock.clone()),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let calls = || fake.calls.lock().unwrap().len();
        let r = |user: &'static str| RecheckQuery {
            source: "kc",
            tenant: "diku",
            user_id: user,
            sub: None,
        };
        let q = |user: &'static str| PermissionQuery {
            source: "kc",
            tenant: "diku",
            user_id: user,
            sub: None,
            token: "user-token",
        };
        let unanswered = |answer: Recheck| matches!(answer, Recheck::Unanswered(_));

        // Down: the first re-check asks; those within the cache period (30 s) do not.
        assert!(unanswered(sources.recheck(&r("u-1")).await));
        assert_eq!(calls(), 1);
        assert!(
            fake.calls.lock().unwrap()[0]
                .1
                .contains(&("x-api-key".into(), "service-key".into()))
        );
        clock.advance(Duration::from_secs(10));
        assert!(unanswered(sources.recheck(&r("u-2")).await));
        assert_eq!(calls(), 1);
        // A grant still asks (with the user's token), and its answer ends the failure.
        *fake.answer.lock().unwrap() = Ok((200, r#"{"permissions":["a.read"]}"#));
        sources.permissions(&q("u-1")).await.unwrap();
        assert_eq!(calls(), 2);
        assert!(matches!(
            sources.recheck(&r("u-2")).await,
            Recheck::Holds(ref held) if held.contains("a.read")
        ));
        assert_eq!(calls(), 3);
        // Down again: asked once, then again once the period has passed.
        *fake.answer.lock().unwrap() = Err(());
        assert!(unanswered(sources.recheck(&r("u-3")).await));
        assert!(unanswered(sources.recheck(&r("u-3")).await));
        assert_eq!(calls(), 4);
        clock.advance(Duration::from_secs(31));
        assert!(unanswered(sources.recheck(&r("u-3")).await));
        assert_eq!(calls(), 5);

        // A grant and a re-check of one user at once: two calls, each with its own
        // credential, neither taking the other's answer.
        clock.advance(Duration::from_secs(31));
        *fake.answer.lock().unwrap() = Ok((200, r#"{"permissions":["a.read"]}"#));
        let (grant, recheck) = (q("u-9"), r("u-9"));
        let (granted, rechecked) =
            tokio::join!(sources.permissions(&grant), sources.recheck(&recheck));
        assert!(granted.is_ok());
        assert!(matches!(rechecked, Recheck::Holds(_)));
        assert_eq!(calls(), 7);
    }

    #[tokio::test]
    async fn concurrent_grants_of_one_user_share_one_call() {
        let fake = Arc::new(FakePlatform {
            answer: Mutex::new(Ok((200, r#"{"permissions":["a.read"]}"#))),
            calls: Mutex::new(Vec::new()),
        });
        let entry = IssuerConfig {
            issuer: "kc".into(),
            permission_source: Some(crate::config::PermissionSourceConfig::http(
                "http://gw/permissions/users/{user_id}",
            )),
            ..IssuerConfig::default()
        };
        let http: Arc<dyn HttpGet> = fake.clone();
        let sources = HttpPermissionSources::from_config(
            &[entry],
            http,
            Arc::new(crate::clock::ManualClock::at_fixed_instant()),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let q = |user: &'static str| PermissionQuery {
            source: "kc",
            tenant: "diku",
            user_id: user,
            sub: None,
            token: "t",
        };
        let (a, b, c) = (q("u-1"), q("u-1"), q("u-2"));
        let answers = futures::future::join_all([
            sources.permissions(&a),
            sources.permissions(&b),
            sources.permissions(&a),
            sources.permissions(&c),
        ])
        .await;
        assert!(answers.iter().all(Result::is_ok), "{answers:?}");
        assert_eq!(fake.calls.lock().unwrap().len(), 2, "one call per user");
        // A failure is shared too, and nothing stays in flight.
        *fake.answer.lock().unwrap() = Err(());
        let (d, e) = (q("u-3"), q("u-3"));
        let answers =
            futures::future::join_all([sources.permissions(&d), sources.permissions(&e)]).await;
        assert!(
            answers
                .iter()
                .all(|a| matches!(a, Err(Error::PermissionSourceUnavailable(_))))
        );
        assert_eq!(fake.calls.lock().unwrap().len(), 3);
        let source = &sources.inner.sources["kc"];
        assert!(source.in_flight.lock().unwrap().is_empty());
    }

    #[test]
    fn only_an_array_of_good_names_at_the_pointer_is_read() {
        let names = names_at(br#"{"permissions":["a.read","b.write"]}"#, "/permissions").unwrap();
        assert_eq!(names, ["a.read".to_owned(), "b.write".to_owned()].into());
        let nested = names_at(br#"{"p":{"permissionNames":["x"]}}"#, "/p/permissionNames").unwrap();
        assert_eq!(nested.len(), 1);
        for (body, pointer) in [
            (&br#"{"permissions":"a.read"}"#[..], "/permissions"),
            (br#"{"permissions":["a", 7]}"#, "/permissions"),
            (br#"{"permissions":["a\u200B"]}"#, "/permissions"),
            (br#"{"other":[]}"#, "/permissions"),
            (b"not json", "/permissions"),
        ] {
            assert!(
                names_at(body, pointer).is_err(),
                "{:?}",
                std::str::from_utf8(body)
            );
        }
    }
}
