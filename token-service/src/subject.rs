//! Verification of subject tokens: the user's access token, from a trusted issuer.
//!
//! Parse once, then decide (RFC 8725 §2–3): the header and the payload are each decoded
//! by one strict parser (no member named twice, at any depth) into one value; the
//! signature is checked over the exact bytes received; every decision reads that one
//! value, against the injected clock. jsonwebtoken supplies keys and the signature
//! primitive only: its `Validation` checks `aud` and `nbf` only when present and well
//! typed, which is how malformed claims used to skip their checks.
//!
//! The algorithm is fixed by the configured key, never taken from the token header: a
//! token whose header names another algorithm than its issuer's key is refused, which
//! rules out `alg: none` and HS/RS confusion. A token that marks any header parameter
//! critical (`crit`) is refused, as no extension is implemented; other unknown header
//! parameters are ignored.

mod logout;
pub use logout::BACKCHANNEL_LOGOUT_EVENT;

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::map::Entry;
use serde_json::{Map, Number, Value};

use crate::clock::to_unix_secs;
use crate::config::{BackchannelLogoutConfig, IssuerConfig, PermissionSourceKind, StartupError};
use crate::error::{Error, Result};
use crate::ident;
use crate::idp::{HttpGet, IssuerPattern, RemoteKeys};
use crate::limits::{MAX_ID_LEN, MAX_NUMERIC_DATE, MAX_PERMISSION_LEN, MAX_TOKEN_LEN};
use crate::metrics::Metrics;

pub use token_domain::ports::{LogoutClaims, Subject, Subjects};

/// The subject port, as the domain calls it.
#[async_trait::async_trait]
impl Subjects for SubjectVerifier {
    async fn verify(&self, token: &str, now: SystemTime) -> Result<Subject> {
        SubjectVerifier::verify_fetching(self, token, now).await
    }

    async fn verify_logout(&self, token: &str, now: SystemTime) -> Result<LogoutClaims> {
        SubjectVerifier::verify_logout(self, token, now).await
    }
}

/// One key of a trusted issuer, with the algorithm it is pinned to.
pub(crate) struct IssuerKey {
    pub(crate) kid: Option<String>,
    pub(crate) algorithm: Algorithm,
    pub(crate) key: DecodingKey,
}

/// Where an issuer's keys are.
enum Keys {
    /// Read from files at start-up.
    Static(Arc<[IssuerKey]>),
    /// Fetched from the network and cached.
    Remote(Arc<RemoteKeys>),
}

struct TrustedIssuer {
    /// The entry's name: `issuer` or `issuer_pattern`.
    name: String,
    audiences: Vec<String>,
    keys: Keys,
    permissions_claim: String,
    tenant_claim: String,
    subject_claim: String,
    /// The permissions come from the platform, not the token.
    permission_source: bool,
    leeway: Duration,
    /// How its back-channel logout tokens are checked; `None`: not received.
    logout: Option<BackchannelLogoutConfig>,
}

/// Verifies subject tokens against the configured trusted issuers.
pub struct SubjectVerifier {
    issuers: HashMap<String, TrustedIssuer>,
    /// `issuer_pattern` entries, with the tenants each may match (`None`: any).
    patterns: Vec<(IssuerPattern, Option<Vec<String>>, TrustedIssuer)>,
    /// The entry for tokens without `iss`.
    without_iss: Option<TrustedIssuer>,
}

impl fmt::Debug for SubjectVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubjectVerifier")
            .field("issuers", &self.issuers.keys().collect::<Vec<_>>())
            .field(
                "patterns",
                &self.patterns.iter().map(|p| &p.2.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, StartupError> {
    std::fs::read(path).map_err(|source| StartupError::Io {
        path: path.to_owned(),
        source,
    })
}

fn key_problem(path: &Path, problem: impl Into<String>) -> StartupError {
    StartupError::Key {
        path: path.to_owned(),
        problem: problem.into(),
    }
}

pub(crate) fn jwk_algorithm(jwk: &jsonwebtoken::jwk::Jwk) -> Option<Algorithm> {
    if let Some(alg) = jwk.common.key_algorithm {
        return match alg {
            KeyAlgorithm::RS256 => Some(Algorithm::RS256),
            KeyAlgorithm::ES256 => Some(Algorithm::ES256),
            KeyAlgorithm::EdDSA => Some(Algorithm::EdDSA),
            _ => None,
        };
    }
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
            Some(Algorithm::ES256)
        }
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Some(Algorithm::EdDSA)
        }
        _ => None,
    }
}

fn load_keys(c: &IssuerConfig) -> Result<Vec<IssuerKey>, StartupError> {
    if let Some(path) = &c.jwks_file {
        let set: JwkSet = serde_json::from_slice(&read(path)?)
            .map_err(|e| key_problem(path, format!("not a JWKS document: {e}")))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let algorithm = jwk_algorithm(jwk).ok_or_else(|| {
                key_problem(
                    path,
                    "only RS256, ES256 (P-256) and EdDSA (Ed25519) keys are supported",
                )
            })?;
            let key = DecodingKey::from_jwk(jwk).map_err(|e| key_problem(path, e.to_string()))?;
            keys.push(IssuerKey {
                kid: jwk.common.key_id.clone(),
                algorithm,
                key,
            });
        }
        if keys.is_empty() {
            return Err(key_problem(path, "the JWKS has no keys"));
        }
        return Ok(keys);
    }
    if let Some(path) = &c.public_key_file {
        let pem = read(path)?;
        let (algorithm, key) = match c.algorithm.as_deref() {
            Some("RS256") => (Algorithm::RS256, DecodingKey::from_rsa_pem(&pem)),
            Some("ES256") => (Algorithm::ES256, DecodingKey::from_ec_pem(&pem)),
            Some("EdDSA") => (Algorithm::EdDSA, DecodingKey::from_ed_pem(&pem)),
            other => {
                return Err(StartupError::Invalid(format!(
                    "issuer {:?}: algorithm {} is not one of RS256, ES256, EdDSA",
                    c.issuer,
                    other.unwrap_or("(none)")
                )));
            }
        };
        let key = key.map_err(|e| key_problem(path, e.to_string()))?;
        return Ok(vec![IssuerKey {
            kid: None,
            algorithm,
            key,
        }]);
    }
    if let Some(path) = &c.hs256_secret_file {
        let secret = read(path)?;
        let secret = secret.trim_ascii();
        if secret.len() < 32 {
            return Err(key_problem(
                path,
                "an HS256 secret must be at least 32 bytes",
            ));
        }
        return Ok(vec![IssuerKey {
            kid: None,
            algorithm: Algorithm::HS256,
            key: DecodingKey::from_secret(secret),
        }]);
    }
    Err(StartupError::Invalid(format!(
        "issuer {:?} has no key",
        c.issuer
    )))
}

/// A compact JWS, split and parsed once, not yet verified. Every later check reads these
/// two maps; nothing parses the token's bytes again.
struct ParsedToken<'t> {
    /// `header.payload` exactly as received: what the signature covers.
    signed: &'t str,
    /// The signature, base64url.
    signature: &'t str,
    header: Map<String, Value>,
    claims: Map<String, Value>,
}

impl<'t> ParsedToken<'t> {
    fn parse(token: &'t str) -> Result<Self> {
        let malformed = || invalid("not a well-formed JWT (three base64url parts)");
        let (signed, signature) = token.rsplit_once('.').ok_or_else(malformed)?;
        let (header, payload) = signed.split_once('.').ok_or_else(malformed)?;
        if payload.contains('.') {
            return Err(malformed());
        }
        Ok(Self {
            signed,
            signature,
            header: json_object("header", header)?,
            claims: json_object("payload", payload)?,
        })
    }
}

fn invalid(problem: impl Into<String>) -> Error {
    Error::SubjectTokenInvalid(problem.into())
}

/// A name taken from the token, cut short for an error message (which escapes it).
fn shorten(name: &str) -> String {
    name.chars().take(32).collect()
}

/// Decodes one base64url part into a JSON object, strictly (see [`StrictValue`]).
fn json_object(part: &str, b64: &str) -> Result<Map<String, Value>> {
    let bytes = B64
        .decode(b64)
        .map_err(|_| invalid(format!("the {part} is not base64url")))?;
    match serde_json::from_slice(&bytes) {
        Ok(StrictValue(Value::Object(members))) => Ok(members),
        Ok(_) => Err(invalid(format!("the {part} is not a JSON object"))),
        Err(e) => Err(invalid(format!("the {part} is not strict JSON: {e}"))),
    }
}

/// A JSON value whose objects, at every depth, name no member twice. serde_json keeps
/// the last of two equal names, and derived structs refuse duplicates of known fields
/// only: two readers of one token could disagree on which `tenant` counts.
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number is not finite"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = Map::new();
        while let Some(name) = map.next_key::<String>()? {
            match members.entry(name) {
                Entry::Occupied(e) => {
                    return Err(de::Error::custom(format_args!(
                        "member {:?} appears twice",
                        shorten(e.key())
                    )));
                }
                Entry::Vacant(e) => {
                    let StrictValue(value) = map.next_value()?;
                    e.insert(value);
                }
            }
        }
        Ok(Value::Object(members))
    }
}

/// Reads a claim by dotted path (`realm_access.roles`).
fn claim<'c>(claims: &'c Map<String, Value>, path: &str) -> Option<&'c Value> {
    let mut parts = path.split('.');
    let first = claims.get(parts.next()?)?;
    parts.try_fold(first, |v, part| v.get(part))
}

/// Reads a string claim held to the identifier rule: subject and tenant are stored,
/// logged and compared, so each must have one printable spelling.
fn identifier<'c>(claims: &'c Map<String, Value>, name: &str) -> Result<&'c str> {
    match claim(claims, name) {
        None => Err(invalid(format!("the {name} claim is missing"))),
        Some(Value::String(s)) => ident::check(s, MAX_ID_LEN)
            .map(|()| s.as_str())
            .map_err(|problem| invalid(format!("the {name} claim {problem}"))),
        Some(_) => Err(invalid(format!("the {name} claim is not a string"))),
    }
}

/// Reads a NumericDate (RFC 7519 §2): integer or fractional seconds since the epoch, from
/// 1970 to 9999. `round` takes a fraction to the stricter side of the claim's check.
fn numeric_date(
    claims: &Map<String, Value>,
    name: &str,
    round: fn(f64) -> f64,
) -> Result<Option<i64>> {
    let Some(value) = claims.get(name) else {
        return Ok(None);
    };
    let Value::Number(n) = value else {
        return Err(invalid(format!(
            "the {name} claim is not a NumericDate (a number of seconds)"
        )));
    };
    let secs = match n.as_i64() {
        Some(secs) => Some(secs),
        // A fraction; a whole number beyond i64 is out of range below either way.
        None => n
            .as_f64()
            .filter(|f| n.is_f64() && (0.0..=MAX_NUMERIC_DATE as f64).contains(f))
            .map(|f| round(f) as i64),
    };
    match secs {
        Some(secs) if (0..=MAX_NUMERIC_DATE).contains(&secs) => Ok(Some(secs)),
        _ => Err(invalid(format!(
            "the {name} claim is not a date between 1970 and 9999"
        ))),
    }
}

/// RFC 7515 §4.1.11: a recipient must refuse a token whose `crit` names a header
/// extension it does not implement. This service implements none, so any `crit`, well
/// formed or not, is a refusal.
fn refuse_crit(header: &Map<String, Value>) -> Result<()> {
    let Some(crit) = header.get("crit") else {
        return Ok(());
    };
    let first = crit
        .as_array()
        .and_then(|names| names.first())
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("the crit header is not a non-empty list of names"))?;
    Err(invalid(format!(
        "the token requires header extension {:?} (crit), which this service does not implement",
        shorten(first)
    )))
}

/// The `kid` header, if any.
fn header_kid(header: &Map<String, Value>) -> Result<Option<&str>> {
    match header.get("kid") {
        None => Ok(None),
        Some(Value::String(kid)) => Ok(Some(kid.as_str())),
        Some(_) => Err(invalid("the kid header is not a string")),
    }
}

/// The trusted issuer a parsed token names, before its signature is checked.
struct Resolved<'v, 't> {
    issuer: &'v TrustedIssuer,
    /// The token's `iss`; `None` for the entry of tokens without one.
    iss: Option<&'t str>,
    /// The tenant read from `iss` by an `issuer_pattern`.
    tenant: Option<&'t str>,
}

impl Resolved<'_, '_> {
    /// The name the subject is vouched for by: the `iss`, or the entry's name.
    fn issuer_name(&self) -> &str {
        self.iss.unwrap_or(&self.issuer.name)
    }
}

impl TrustedIssuer {
    /// Checks the signature over the exact bytes received, with one of `keys` whose
    /// pinned algorithm the header names.
    fn verify_signature(&self, token: &ParsedToken<'_>, keys: &[IssuerKey]) -> Result<()> {
        let alg = match token.header.get("alg") {
            Some(Value::String(alg)) => alg,
            _ => return Err(invalid("the alg header is missing or not a string")),
        };
        let kid = header_kid(&token.header)?;
        refuse_crit(&token.header)?;
        // The key fixes the algorithm; the header may only agree with it. `none` and
        // unknown names parse to nothing and match no key.
        let named: Option<Algorithm> = alg.parse().ok();
        let mut candidates = keys
            .iter()
            .filter(|k| Some(k.algorithm) == named)
            .filter(|k| match (kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            })
            .peekable();
        if candidates.peek().is_none() {
            return Err(invalid(format!(
                "algorithm {:?} (or key id) is not the one this issuer signs with",
                shorten(alg)
            )));
        }
        for key in candidates {
            let message = token.signed.as_bytes();
            if jsonwebtoken::crypto::verify(token.signature, message, &key.key, key.algorithm)
                .unwrap_or(false)
            {
                return Ok(());
            }
        }
        Err(invalid("signature does not verify"))
    }

    /// Whether `aud` is well formed (a string or a list of strings, RFC 7519 §4.1.3) and,
    /// when this issuer names audiences, names one of them. Without `aud` a token passes
    /// only an issuer that names none.
    fn audience_accepted(&self, aud: Option<&Value>) -> bool {
        let ours =
            |name: &str| self.audiences.is_empty() || self.audiences.iter().any(|a| a == name);
        match aud {
            None => self.audiences.is_empty(),
            Some(Value::String(name)) => ours(name),
            Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
                self.audiences.is_empty() || items.iter().filter_map(Value::as_str).any(ours)
            }
            Some(_) => false,
        }
    }

    /// The user's permissions: a list of strings, or one space-separated string.
    fn permissions(&self, claims: &Map<String, Value>) -> Result<BTreeSet<String>> {
        let name = &self.permissions_claim;
        let entry = |p: &str| {
            ident::check(p, MAX_PERMISSION_LEN)
                .map(|()| p.to_owned())
                .map_err(|problem| invalid(format!("an entry of the {name} claim {problem}")))
        };
        match claim(claims, name) {
            None | Some(Value::Null) => Ok(BTreeSet::new()),
            Some(Value::String(s)) => s.split_whitespace().map(entry).collect(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| invalid(format!("the {name} claim holds a non-string")))
                        .and_then(entry)
                })
                .collect(),
            Some(_) => Err(invalid(format!(
                "the {name} claim is neither a list nor a string"
            ))),
        }
    }

    /// Every claim decision, read from the one verified payload, at `now`.
    fn decide(
        &self,
        resolved: &Resolved<'_, '_>,
        claims: &Map<String, Value>,
        now: SystemTime,
    ) -> Result<Subject> {
        // Read every claim into its type first: a malformed claim is refused, never skipped.
        let exp = numeric_date(claims, "exp", f64::floor)?
            .ok_or_else(|| invalid("the exp claim is missing"))?;
        let nbf = numeric_date(claims, "nbf", f64::ceil)?;
        // `iat` decides nothing here, but a malformed one makes a malformed token.
        numeric_date(claims, "iat", f64::floor)?;
        let subject = identifier(claims, &self.subject_claim)?;
        let sub = match claims.get("sub") {
            None => None,
            Some(_) => Some(identifier(claims, "sub")?),
        };
        // The session, for back-channel logout: `sid` (OpenID Connect), or Keycloak's
        // older `session_state` when there is no `sid`.
        let session_id = match (claims.get("sid"), claims.get("session_state")) {
            (None, None) => None,
            (Some(_), _) => Some(identifier(claims, "sid")?),
            (None, Some(_)) => Some(identifier(claims, "session_state")?),
        };
        let tenant = match resolved.tenant {
            None => identifier(claims, &self.tenant_claim)?,
            // A tenant claim, when the token has one, must agree with the issuer's.
            Some(from_iss) => {
                ident::check(from_iss, MAX_ID_LEN)
                    .map_err(|problem| invalid(format!("the tenant in iss {problem}")))?;
                if claim(claims, &self.tenant_claim).is_some() {
                    let named = identifier(claims, &self.tenant_claim)?;
                    if named != from_iss {
                        return Err(invalid(format!(
                            "the {} claim does not agree with the tenant of iss",
                            self.tenant_claim
                        )));
                    }
                }
                from_iss
            }
        };
        let permissions = if self.permission_source {
            BTreeSet::new()
        } else {
            self.permissions(claims)?
        };

        if !self.audience_accepted(claims.get("aud")) {
            return Err(Error::SubjectTokenAudience);
        }
        let now = to_unix_secs(now);
        let leeway = i64::try_from(self.leeway.as_secs()).unwrap_or(i64::MAX);
        if now > exp.saturating_add(leeway) {
            return Err(Error::SubjectTokenExpired);
        }
        if nbf.is_some_and(|nbf| now.saturating_add(leeway) < nbf) {
            return Err(Error::SubjectTokenNotYetValid);
        }
        Ok(Subject {
            issuer: resolved.issuer_name().to_owned(),
            subject: subject.to_owned(),
            sub: sub.map(str::to_owned),
            session_id: session_id.map(str::to_owned),
            logout_received: self.logout.is_some(),
            tenant: tenant.to_owned(),
            permissions,
            permission_source: self.permission_source.then(|| self.name.clone()),
        })
    }
}

impl SubjectVerifier {
    /// Loads every trusted issuer's keys; keys on the network are fetched with a default
    /// HTTP client when first needed.
    pub fn from_config(issuers: &[IssuerConfig]) -> Result<Self, StartupError> {
        let http = Arc::new(crate::idp::HttpClient::new(None)?);
        Self::with_http(issuers, http, Arc::new(Metrics::new()))
    }

    /// Loads every trusted issuer's keys; keys on the network are fetched through `http`
    /// when first needed, and counted in `metrics`.
    pub fn with_http(
        issuers: &[IssuerConfig],
        http: Arc<dyn HttpGet>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StartupError> {
        let mut verifier = Self {
            issuers: HashMap::new(),
            patterns: Vec::new(),
            without_iss: None,
        };
        for c in issuers {
            let keys = if c.fetches_keys() {
                Keys::Remote(Arc::new(RemoteKeys::new(
                    c,
                    Arc::clone(&http),
                    Arc::clone(&metrics),
                )))
            } else {
                Keys::Static(load_keys(c)?.into())
            };
            let issuer = TrustedIssuer {
                name: c.name().to_owned(),
                audiences: c.audiences.clone(),
                keys,
                permissions_claim: c.permissions_claim.clone(),
                tenant_claim: c.tenant_claim.clone(),
                subject_claim: c.subject_claim.clone(),
                permission_source: c
                    .permission_source
                    .as_ref()
                    .is_some_and(|p| p.kind == PermissionSourceKind::Http),
                leeway: c.leeway,
                logout: c.backchannel_logout.clone(),
            };
            let twice = || StartupError::Invalid(format!("issuer {:?} is listed twice", c.name()));
            if let Some(pattern) = &c.issuer_pattern {
                let parsed = IssuerPattern::parse(pattern).map_err(StartupError::Invalid)?;
                if verifier.patterns.iter().any(|(p, _, _)| *p == parsed) {
                    return Err(twice());
                }
                verifier.patterns.push((parsed, c.tenants.clone(), issuer));
            } else if c.tokens_without_iss {
                if issuer.keys_are_not_hs256() {
                    return Err(StartupError::Invalid(format!(
                        "issuer {:?}: tokens_without_iss needs hs256_secret_file",
                        c.name()
                    )));
                }
                verifier.without_iss = Some(issuer);
            } else if verifier.issuers.insert(c.issuer.clone(), issuer).is_some() {
                return Err(twice());
            }
        }
        Ok(verifier)
    }

    /// Checks the length and parses the token once.
    fn parse(token: &str) -> Result<ParsedToken<'_>> {
        if token.is_empty() {
            return Err(Error::invalid("subject_token", "is required"));
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(Error::invalid(
                "subject_token",
                format!("is longer than {MAX_TOKEN_LEN} bytes"),
            ));
        }
        ParsedToken::parse(token)
    }

    /// The trusted issuer the token names. The issuer picks the keys, so it is read
    /// before the signature is checked; it is only looked up (or matched against a
    /// configured pattern), and everything else waits for the signature.
    fn resolve<'t>(&self, token: &'t ParsedToken<'_>) -> Result<Resolved<'_, 't>> {
        let iss = match token.claims.get("iss") {
            Some(Value::String(iss)) => iss.as_str(),
            None => {
                return match &self.without_iss {
                    Some(issuer) => Ok(Resolved {
                        issuer,
                        iss: None,
                        tenant: None,
                    }),
                    None => Err(invalid("the token has no iss claim")),
                };
            }
            Some(_) => return Err(invalid("the iss claim is not a string")),
        };
        // Named back only when it is a printable identifier: the message is logged too.
        let untrusted = || match ident::check(iss, MAX_ID_LEN) {
            Ok(()) => Error::UntrustedIssuer(iss.to_owned()),
            Err(problem) => invalid(format!("the iss claim {problem}")),
        };
        if let Some(issuer) = self.issuers.get(iss) {
            return Ok(Resolved {
                issuer,
                iss: Some(iss),
                tenant: None,
            });
        }
        for (pattern, tenants, issuer) in &self.patterns {
            let Some(tenant) = pattern.tenant(iss) else {
                continue;
            };
            if tenants
                .as_ref()
                .is_some_and(|list| !list.iter().any(|t| t == tenant))
            {
                return Err(untrusted());
            }
            return Ok(Resolved {
                issuer,
                iss: Some(iss),
                tenant: Some(tenant),
            });
        }
        Err(untrusted())
    }

    /// Verifies `token` at `now` with the keys in hand, fetching none: an issuer whose
    /// keys come from the network verifies only once they have been fetched (by
    /// [`SubjectVerifier::verify_fetching`]).
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Subject> {
        let token = Self::parse(token)?;
        let resolved = self.resolve(&token)?;
        let keys = match &resolved.issuer.keys {
            Keys::Static(keys) => Arc::clone(keys),
            Keys::Remote(remote) => remote.cached(resolved.issuer_name(), now)?,
        };
        resolved.issuer.verify_signature(&token, &keys)?;
        resolved.issuer.decide(&resolved, &token.claims, now)
    }

    /// Verifies `token` at `now` and returns the user it vouches for, fetching the
    /// issuer's keys first when they are not in hand, stale, or lack the token's `kid`.
    pub async fn verify_fetching(&self, token: &str, now: SystemTime) -> Result<Subject> {
        let token = Self::parse(token)?;
        let resolved = self.resolve(&token)?;
        let keys = match &resolved.issuer.keys {
            Keys::Static(keys) => Arc::clone(keys),
            Keys::Remote(remote) => {
                let kid = header_kid(&token.header)?;
                remote
                    .keys_for(resolved.issuer_name(), resolved.tenant, kid, now)
                    .await?
            }
        };
        resolved.issuer.verify_signature(&token, &keys)?;
        resolved.issuer.decide(&resolved, &token.claims, now)
    }
}

#[cfg(test)]
impl SubjectVerifier {
    /// Realms cached by every pattern entry, for tests of the bound.
    pub(crate) fn patterns_cached(&self) -> usize {
        self.patterns
            .iter()
            .map(|(_, _, i)| match &i.keys {
                Keys::Remote(r) => r.realms_cached(),
                Keys::Static(_) => 0,
            })
            .sum()
    }
}

impl TrustedIssuer {
    fn keys_are_not_hs256(&self) -> bool {
        match &self.keys {
            Keys::Static(keys) => keys.iter().any(|k| k.algorithm != Algorithm::HS256),
            Keys::Remote(_) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};
    use serde_json::json;

    use super::*;

    const NOW: u64 = 1_767_225_600;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW)
    }

    fn issuer(name: &str) -> IssuerConfig {
        IssuerConfig {
            issuer: name.into(),
            audiences: Vec::new(),
            jwks_file: None,
            public_key_file: None,
            algorithm: None,
            hs256_secret_file: None,
            permissions_claim: "permissions".into(),
            tenant_claim: "tenant".into(),
            leeway: Duration::from_secs(30),
            ..IssuerConfig::default()
        }
    }

    fn claims(iss: &str) -> Value {
        let now = NOW as i64;
        json!({"iss": iss, "sub": "alice", "tenant": "acme", "permissions": ["a.read"],
               "iat": now, "exp": now + 300})
    }

    /// Builds a compact JWS by hand, so these tests do not trust the library under test to
    /// produce what they check.
    fn jws(
        alg: &str,
        kid: Option<&str>,
        claims: &Value,
        sign: impl Fn(&[u8]) -> Vec<u8>,
    ) -> String {
        let mut header = json!({"alg": alg, "typ": "JWT"});
        if let Some(kid) = kid {
            header["kid"] = json!(kid);
        }
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = sign(input.as_bytes());
        format!("{input}.{}", B64.encode(sig))
    }

    fn pem(label: &str, der: &[u8]) -> String {
        use base64::engine::general_purpose::STANDARD;
        let body = STANDARD.encode(der);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }

    #[test]
    fn rs256_public_key_file_and_key_confusion() {
        let dir = tempfile::tempdir().unwrap();
        let pair = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let spki = pair.public_key().as_der().unwrap();
        let public_pem = pem("PUBLIC KEY", spki.as_ref());
        let path = dir.path().join("rsa.pem");
        std::fs::write(&path, &public_pem).unwrap();
        let mut config = issuer("https://rsa");
        config.public_key_file = Some(path);
        config.algorithm = Some("RS256".into());
        let verifier = SubjectVerifier::from_config(&[config]).unwrap();

        let rsa_sign = |msg: &[u8]| {
            let mut sig = vec![0; pair.public_modulus_len()];
            pair.sign(
                &signature::RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                msg,
                &mut sig,
            )
            .unwrap();
            sig
        };
        let token = jws("RS256", None, &claims("https://rsa"), rsa_sign);
        let subject = verifier.verify(&token, now()).unwrap();
        assert_eq!(subject.subject, "alice");

        // The classic confusion: HS256 keyed with the RSA public key the attacker knows.
        let hmac_key =
            aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, public_pem.as_bytes());
        let forged = jws("HS256", None, &claims("https://rsa"), |m| {
            aws_lc_rs::hmac::sign(&hmac_key, m).as_ref().to_vec()
        });
        assert!(matches!(
            verifier.verify(&forged, now()),
            Err(Error::SubjectTokenInvalid(_))
        ));
        let none = jws("none", None, &claims("https://rsa"), |_| Vec::new());
        assert!(matches!(
            verifier.verify(&none, now()),
            Err(Error::SubjectTokenInvalid(_))
        ));
    }

    #[test]
    fn es256_from_a_jwks_file_selected_by_kid() {
        let dir = tempfile::tempdir().unwrap();
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pairs: Vec<EcdsaKeyPair> = (0..2)
            .map(|_| {
                let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
                EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref()).unwrap()
            })
            .collect();
        let keys: Vec<Value> = pairs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let point = p.public_key().as_ref();
                json!({"kty": "EC", "crv": "P-256", "kid": format!("ec{i}"), "use": "sig",
                       "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65])})
            })
            .collect();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, json!({ "keys": keys }).to_string()).unwrap();
        let mut config = issuer("https://ec");
        config.jwks_file = Some(path);
        let verifier = SubjectVerifier::from_config(&[config]).unwrap();

        let sign_with = |i: usize| {
            let pair = &pairs[i];
            move |m: &[u8]| {
                pair.sign(&SystemRandom::new(), m)
                    .unwrap()
                    .as_ref()
                    .to_vec()
            }
        };
        let token = jws("ES256", Some("ec1"), &claims("https://ec"), sign_with(1));
        assert_eq!(verifier.verify(&token, now()).unwrap().tenant, "acme");
        // Signed by key 0 but naming key 1: refused.
        let wrong = jws("ES256", Some("ec1"), &claims("https://ec"), sign_with(0));
        assert!(matches!(
            verifier.verify(&wrong, now()),
            Err(Error::SubjectTokenInvalid(_))
        ));
        // The header cannot switch the algorithm away from the key's.
        let switched = jws("RS256", Some("ec1"), &claims("https://ec"), sign_with(1));
        assert!(matches!(
            verifier.verify(&switched, now()),
            Err(Error::SubjectTokenInvalid(_))
        ));
    }

    #[test]
    fn hs256_shared_secret_with_custom_claims_and_audience() {
        let dir = tempfile::tempdir().unwrap();
        let secret = b"a-shared-secret-of-at-least-32-bytes!!";
        let path = dir.path().join("secret");
        std::fs::write(&path, secret).unwrap();
        let mut config = issuer("https://hs");
        config.hs256_secret_file = Some(path);
        config.permissions_claim = "realm_access.roles".into();
        config.tenant_claim = "org".into();
        config.audiences = vec!["platform".into()];
        let verifier = SubjectVerifier::from_config(&[config]).unwrap();
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
        let hs = |m: &[u8]| aws_lc_rs::hmac::sign(&key, m).as_ref().to_vec();

        let mut c = claims("https://hs");
        c["org"] = json!("globex");
        c["aud"] = json!(["platform", "other"]);
        c["realm_access"] = json!({"roles": ["x.read", "x.write"]});
        let subject = verifier.verify(&jws("HS256", None, &c, hs), now()).unwrap();
        assert_eq!(subject.tenant, "globex");
        assert_eq!(
            subject.permissions,
            ["x.read".to_owned(), "x.write".to_owned()].into()
        );

        c["aud"] = json!("someone-else");
        assert!(matches!(
            verifier.verify(&jws("HS256", None, &c, hs), now()),
            Err(Error::SubjectTokenAudience)
        ));
        c["aud"] = json!("platform");
        c["org"] = json!("globex\nINFO forged log line");
        assert!(matches!(
            verifier.verify(&jws("HS256", None, &c, hs), now()),
            Err(Error::SubjectTokenInvalid(_))
        ));
        c["org"] = json!("globex");
        c["realm_access"] = json!({"roles": "x.read x.admin"});
        let subject = verifier.verify(&jws("HS256", None, &c, hs), now()).unwrap();
        assert!(
            subject.permissions.contains("x.admin"),
            "space-separated string form"
        );
    }

    #[test]
    fn weak_or_missing_keys_stop_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, b"too short").unwrap();
        let mut config = issuer("https://hs");
        config.hs256_secret_file = Some(short);
        assert!(matches!(
            SubjectVerifier::from_config(&[config]),
            Err(StartupError::Key { .. })
        ));
        let mut config = issuer("https://x");
        config.jwks_file = Some(dir.path().join("missing.json"));
        assert!(matches!(
            SubjectVerifier::from_config(&[config]),
            Err(StartupError::Io { .. })
        ));
    }

    const ISS: &str = "https://hs";
    const HS_SECRET: &[u8] = b"a-shared-secret-of-at-least-32-bytes!!";

    /// An HS256 issuer `ISS` (leeway 30 s), adjusted by `adjust`.
    fn hs_verifier(adjust: impl FnOnce(&mut IssuerConfig)) -> (SubjectVerifier, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, HS_SECRET).unwrap();
        let mut config = issuer(ISS);
        config.hs256_secret_file = Some(path);
        adjust(&mut config);
        (SubjectVerifier::from_config(&[config]).unwrap(), dir)
    }

    /// A token from header and payload text as given, signed with `HS_SECRET`: tests can
    /// send what serde_json would never write, such as a member named twice.
    fn raw(header: &str, payload: &str) -> String {
        let input = format!("{}.{}", B64.encode(header), B64.encode(payload));
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, HS_SECRET);
        let sig = aws_lc_rs::hmac::sign(&key, input.as_bytes());
        format!("{input}.{}", B64.encode(sig))
    }

    const HS_HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

    fn signed(claims: &Value) -> String {
        raw(HS_HEADER, &claims.to_string())
    }

    /// The message of a SUBJECT_TOKEN_INVALID refusal.
    fn refusal(result: Result<Subject>) -> String {
        match result {
            Err(Error::SubjectTokenInvalid(message)) => message,
            other => panic!("expected SubjectTokenInvalid, got {other:?}"),
        }
    }

    #[test]
    fn audience_must_be_a_string_or_string_list_naming_us_when_required() {
        let (verifier, _dir) = hs_verifier(|c| c.audiences = vec!["platform".into()]);
        let with_aud = |aud: Option<Value>| {
            let mut c = claims(ISS);
            if let Some(aud) = aud {
                c["aud"] = aud;
            }
            verifier.verify(&signed(&c), now())
        };
        for bad in [
            None,
            Some(json!(null)),
            Some(json!(7)),
            Some(json!(true)),
            Some(json!({"platform": true})),
            Some(json!(["platform", 7])),
            Some(json!([])),
            Some(json!(["other"])),
        ] {
            assert!(
                matches!(with_aud(bad.clone()), Err(Error::SubjectTokenAudience)),
                "aud {bad:?}"
            );
        }
        for good in [json!("platform"), json!(["other", "platform"])] {
            with_aud(Some(good)).unwrap();
        }

        // An issuer that names no audience takes any well-formed aud, or none.
        let (open, _dir) = hs_verifier(|_| {});
        let mut c = claims(ISS);
        open.verify(&signed(&c), now()).unwrap();
        c["aud"] = json!(["anyone"]);
        open.verify(&signed(&c), now()).unwrap();
        c["aud"] = json!(7);
        assert!(matches!(
            open.verify(&signed(&c), now()),
            Err(Error::SubjectTokenAudience)
        ));
    }

    #[test]
    fn numeric_dates_take_both_number_forms_and_refuse_anything_else() {
        let (verifier, _dir) = hs_verifier(|_| {});
        let at = |name: &str, value: Value| {
            let mut c = claims(ISS);
            c[name] = value;
            verifier.verify(&signed(&c), now())
        };
        let n = NOW as f64;
        at("exp", json!(n + 300.5)).unwrap();
        at("nbf", json!(n - 0.5)).unwrap();
        at("iat", json!(n - 0.25)).unwrap();
        at("nbf", json!(NOW)).unwrap();
        // A fraction rounds to the stricter side: just beyond the 30 s leeway is beyond.
        assert!(matches!(
            at("exp", json!(n - 30.5)),
            Err(Error::SubjectTokenExpired)
        ));
        assert!(matches!(
            at("nbf", json!(n + 30.5)),
            Err(Error::SubjectTokenNotYetValid)
        ));
        assert!(matches!(
            at("nbf", json!(n + 3600.0)),
            Err(Error::SubjectTokenNotYetValid)
        ));
        // Any other type, or a date beyond the horizon, is refused naming the claim.
        for name in ["exp", "nbf", "iat"] {
            for bad in [
                json!(NOW.to_string()),
                json!(true),
                json!(null),
                json!([NOW]),
                json!({ "secs": NOW }),
                json!(-1),
                json!(-0.5),
                json!(1u64 << 63),
                json!(u64::MAX),
                json!(1e300),
                json!(MAX_NUMERIC_DATE + 1),
                json!(MAX_NUMERIC_DATE as f64 + 0.5),
            ] {
                let message = refusal(at(name, bad.clone()));
                assert!(
                    message.contains(&format!("the {name} claim")),
                    "{name}: {bad}: {message}"
                );
            }
        }
        let mut c = claims(ISS);
        c.as_object_mut().unwrap().remove("exp");
        assert_eq!(
            refusal(verifier.verify(&signed(&c), now())),
            "the exp claim is missing"
        );
    }

    #[test]
    fn a_member_named_twice_anywhere_is_refused() {
        let (verifier, _dir) = hs_verifier(|c| c.permissions_claim = "realm_access.roles".into());
        let base = format!(r#""iss":"{ISS}","sub":"alice","exp":{}"#, NOW + 300);
        let ok = format!(r#"{{{base},"tenant":"acme","realm_access":{{"roles":["a.read"]}}}}"#);
        let subject = verifier.verify(&raw(HS_HEADER, &ok), now()).unwrap();
        assert_eq!(subject.permissions, ["a.read".to_owned()].into());
        for payload in [
            format!(r#"{{{base},"tenant":"acme","tenant":"globex"}}"#),
            // The same name spelled with an escape is the same name.
            format!(r#"{{{base},"tenant":"acme","ten\u0061nt":"globex"}}"#),
            format!(r#"{{{base},"tenant":"acme","sub":"mallory"}}"#),
            format!(
                r#"{{{base},"tenant":"acme","realm_access":{{"roles":["a.read"]}},"realm_access":{{"roles":["a.admin"]}}}}"#
            ),
            format!(
                r#"{{{base},"tenant":"acme","realm_access":{{"roles":["a.read"],"roles":["a.admin"]}}}}"#
            ),
            format!(r#"{{{base},"tenant":"acme","ext":[{{"a":1,"a":2}}]}}"#),
        ] {
            let message = refusal(verifier.verify(&raw(HS_HEADER, &payload), now()));
            assert!(message.contains("appears twice"), "{payload}: {message}");
        }
        let payload = claims(ISS).to_string();
        for header in [
            r#"{"alg":"HS256","alg":"HS256"}"#,
            r#"{"alg":"HS256","kid":"a","kid":"b"}"#,
            r#"{"alg":"HS256","x":{"y":1,"y":1}}"#,
        ] {
            let message = refusal(verifier.verify(&raw(header, &payload), now()));
            assert!(message.contains("appears twice"), "{header}: {message}");
        }
    }

    #[test]
    fn crit_is_refused_and_other_unknown_header_parameters_are_ignored() {
        let (verifier, _dir) = hs_verifier(|_| {});
        let payload = claims(ISS).to_string();
        for header in [
            r#"{"alg":"HS256","crit":["x-policy"],"x-policy":1}"#,
            r#"{"alg":"HS256","b64":false,"crit":["b64"]}"#,
            r#"{"alg":"HS256","crit":["x-policy", 7],"x-policy":1}"#,
            r#"{"alg":"HS256","crit":[]}"#,
            r#"{"alg":"HS256","crit":"x-policy","x-policy":1}"#,
            r#"{"alg":"HS256","crit":null}"#,
        ] {
            let message = refusal(verifier.verify(&raw(header, &payload), now()));
            assert!(message.contains("crit"), "{header}: {message}");
        }
        let header = r#"{"alg":"HS256","typ":"JWT","x-n":5,"x-o":{"a":[1,null]},"x-z":null,"x-b":true,"jku":7}"#;
        verifier.verify(&raw(header, &payload), now()).unwrap();
    }

    #[test]
    fn identifiers_read_from_the_token_follow_the_identifier_rule() {
        let (verifier, _dir) = hs_verifier(|_| {});
        for (name, value) in [
            ("tenant", json!("acme\u{200B}")),
            ("tenant", json!(" acme")),
            ("tenant", json!("")),
            ("tenant", json!(7)),
            ("sub", json!("\u{202E}alice")),
            ("sub", json!("ali\u{200D}ce")),
            ("sub", json!("x".repeat(MAX_ID_LEN + 1))),
            ("permissions", json!(["a.read\u{200B}"])),
            ("permissions", json!("a.read b\u{2066}")),
            ("permissions", json!([""])),
        ] {
            let mut c = claims(ISS);
            c[name] = value.clone();
            let message = refusal(verifier.verify(&signed(&c), now()));
            assert!(
                message.contains(&format!("the {name} claim")),
                "{name}: {value}: {message}"
            );
        }
    }

    #[test]
    fn an_untrusted_issuer_is_named_back_only_when_printable() {
        let (verifier, _dir) = hs_verifier(|_| {});
        let with_iss = |iss: Value| {
            let mut c = claims(ISS);
            c["iss"] = iss;
            verifier.verify(&signed(&c), now())
        };
        assert!(matches!(
            with_iss(json!("https://evil")),
            Err(Error::UntrustedIssuer(iss)) if iss == "https://evil"
        ));
        for bad in [
            json!("\u{7f}".repeat(300)),
            json!("https://hs\u{200B}"),
            json!(format!("https://{}", "x".repeat(MAX_ID_LEN))),
        ] {
            assert!(refusal(with_iss(bad)).starts_with("the iss claim"));
        }
        assert_eq!(refusal(with_iss(json!(7))), "the iss claim is not a string");
    }

    #[test]
    fn only_a_compact_jws_of_json_objects_is_read() {
        let (verifier, _dir) = hs_verifier(|_| {});
        let good = signed(&claims(ISS));
        verifier.verify(&good, now()).unwrap();
        let (header, rest) = good.split_once('.').unwrap();
        for bad in [
            format!("{good}.x"),
            format!("{header}=.{rest}"),
            format!("{header}.."),
            raw("[]", &claims(ISS).to_string()),
            raw(HS_HEADER, "null"),
            raw(HS_HEADER, &format!("{} x", claims(ISS))),
            raw(r#"{"alg":"none"}"#, &claims(ISS).to_string()),
            raw(r#"{"alg":5}"#, &claims(ISS).to_string()),
            raw(r#"{"alg":"HS256","kid":5}"#, &claims(ISS).to_string()),
        ] {
            refusal(verifier.verify(&bad, now()));
        }
        // The signature's last character with a trailing bit set: the same bytes to a
        // lax decoder, a second spelling of one token to us.
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut tampered = good.clone();
        let last = alphabet.find(tampered.pop().unwrap()).unwrap();
        tampered.push(alphabet.as_bytes()[last ^ 1].into());
        assert_eq!(
            refusal(verifier.verify(&tampered, now())),
            "signature does not verify"
        );
    }

    #[tokio::test]
    async fn logout_tokens_are_held_to_every_rule_of_the_spec() {
        use crate::config::BackchannelLogoutConfig;
        let (verifier, _dir) = hs_verifier(|c| {
            c.backchannel_logout = Some(BackchannelLogoutConfig {
                client_id: "jobtoken".into(),
                max_age: Duration::from_secs(300),
            })
        });
        let at = now();
        let iat = to_unix_secs(at);
        let event = json!({BACKCHANNEL_LOGOUT_EVENT: {}});
        let good = json!({"iss": ISS, "aud": "jobtoken", "iat": iat, "jti": "j-1",
            "events": event, "sid": "s-1", "sub": "alice"});
        let claims = verifier.verify_logout(&signed(&good), at).await.unwrap();
        assert_eq!(claims.issuer, ISS);
        assert_eq!(claims.session_id.as_deref(), Some("s-1"));
        assert_eq!(claims.sub.as_deref(), Some("alice"));
        assert_eq!(claims.jti, "j-1");
        let edit = |f: &dyn Fn(&mut Map<String, Value>)| {
            let mut c = good.as_object().unwrap().clone();
            f(&mut c);
            signed(&Value::Object(c))
        };
        let refusals: Vec<(&str, String)> = vec![
            (
                "aud",
                edit(&|c| {
                    c.insert("aud".into(), json!("other"));
                }),
            ),
            (
                "aud",
                edit(&|c| {
                    c.insert("aud".into(), json!(["a", 1]));
                }),
            ),
            (
                "aud",
                edit(&|c| {
                    c.remove("aud");
                }),
            ),
            (
                "iat",
                edit(&|c| {
                    c.remove("iat");
                }),
            ),
            (
                "iat",
                edit(&|c| {
                    c.insert("iat".into(), json!("now"));
                }),
            ),
            (
                "too old",
                edit(&|c| {
                    c.insert("iat".into(), json!(iat - 400));
                }),
            ),
            (
                "future",
                edit(&|c| {
                    c.insert("iat".into(), json!(iat + 400));
                }),
            ),
            (
                "expired",
                edit(&|c| {
                    c.insert("exp".into(), json!(iat - 100));
                }),
            ),
            (
                "jti",
                edit(&|c| {
                    c.remove("jti");
                }),
            ),
            (
                "jti",
                edit(&|c| {
                    c.insert("jti".into(), json!(7));
                }),
            ),
            (
                "events",
                edit(&|c| {
                    c.remove("events");
                }),
            ),
            (
                "events",
                edit(&|c| {
                    c.insert("events".into(), json!({"other": {}}));
                }),
            ),
            (
                "events",
                edit(&|c| {
                    c.insert("events".into(), json!({BACKCHANNEL_LOGOUT_EVENT: "x"}));
                }),
            ),
            (
                "nonce",
                edit(&|c| {
                    c.insert("nonce".into(), json!("n"));
                }),
            ),
            (
                "sid",
                edit(&|c| {
                    c.remove("sid");
                    c.remove("sub");
                }),
            ),
            (
                "sid",
                edit(&|c| {
                    c.insert("sid".into(), json!(null));
                }),
            ),
            (
                "sub",
                edit(&|c| {
                    c.insert("sub".into(), json!("al\u{202E}ice"));
                }),
            ),
        ];
        for (named, token) in refusals {
            match verifier.verify_logout(&token, at).await {
                Err(Error::LogoutTokenInvalid(problem)) => {
                    assert!(problem.contains(named), "{named}: {problem}")
                }
                other => panic!("{named}: {other:?}"),
            }
        }
        // A signature by another key, and an issuer whose logouts are not received.
        let forged = format!("{}x", signed(&good));
        assert!(matches!(
            verifier.verify_logout(&forged, at).await,
            Err(Error::LogoutTokenInvalid(_))
        ));
        let (deaf, _dir) = hs_verifier(|_| {});
        assert!(matches!(
            deaf.verify_logout(&signed(&good), at).await,
            Err(Error::LogoutTokenInvalid(p)) if p.contains("not received")
        ));
        // One of sid and sub is enough.
        let only_sub = edit(&|c| {
            c.remove("sid");
        });
        assert!(verifier.verify_logout(&only_sub, at).await.is_ok());
    }
}
