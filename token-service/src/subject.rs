//! Verification of subject tokens: the user's access token, from a trusted issuer.
//!
//! The algorithm is fixed by the configured key, never taken from the token header: a
//! token whose header names another algorithm than its issuer's key is refused, which
//! rules out `alg: none` and HS/RS confusion. `exp` and `nbf` are checked against the
//! injected clock, not the wall clock jsonwebtoken would read.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use crate::clock::to_unix_secs;
use crate::config::{IssuerConfig, StartupError};
use crate::error::{Error, Result};

/// Longest subject token accepted, in bytes.
pub const MAX_SUBJECT_TOKEN_LEN: usize = 16 * 1024;

/// Longest `sub` or tenant accepted.
pub const MAX_CLAIM_LEN: usize = 200;

/// The verified user behind a subject token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// The issuer that vouched for the user.
    pub issuer: String,
    /// The user (`sub`).
    pub subject: String,
    /// The user's tenant.
    pub tenant: String,
    /// The user's permissions.
    pub permissions: BTreeSet<String>,
}

struct IssuerKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

struct TrustedIssuer {
    audiences: Vec<String>,
    keys: Vec<IssuerKey>,
    permissions_claim: String,
    tenant_claim: String,
    leeway: Duration,
}

/// Verifies subject tokens against the configured trusted issuers.
pub struct SubjectVerifier {
    issuers: HashMap<String, TrustedIssuer>,
}

impl std::fmt::Debug for SubjectVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubjectVerifier")
            .field("issuers", &self.issuers.keys().collect::<Vec<_>>())
            .finish()
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

fn jwk_algorithm(jwk: &jsonwebtoken::jwk::Jwk) -> Option<Algorithm> {
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
                    "issuer {:?}: algorithm {other:?} is not one of RS256, ES256, EdDSA",
                    c.issuer
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

/// Reads a claim by dotted path (`realm_access.roles`).
fn claim<'a>(claims: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(claims, |v, part| v.get(part))
}

impl SubjectVerifier {
    /// Loads every trusted issuer's keys.
    pub fn from_config(issuers: &[IssuerConfig]) -> Result<Self, StartupError> {
        let mut map = HashMap::new();
        for c in issuers {
            let issuer = TrustedIssuer {
                audiences: c.audiences.clone(),
                keys: load_keys(c)?,
                permissions_claim: c.permissions_claim.clone(),
                tenant_claim: c.tenant_claim.clone(),
                leeway: c.leeway,
            };
            if map.insert(c.issuer.clone(), issuer).is_some() {
                return Err(StartupError::Invalid(format!(
                    "issuer {:?} is listed twice",
                    c.issuer
                )));
            }
        }
        Ok(Self { issuers: map })
    }

    /// Verifies `token` at `now` and returns the user it vouches for.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Subject> {
        if token.is_empty() {
            return Err(Error::invalid("subject_token", "is required"));
        }
        if token.len() > MAX_SUBJECT_TOKEN_LEN {
            return Err(Error::invalid(
                "subject_token",
                format!("is longer than {MAX_SUBJECT_TOKEN_LEN} bytes"),
            ));
        }
        let malformed = || Error::SubjectTokenInvalid("not a well-formed JWT".into());
        let payload = token.split('.').nth(1).ok_or_else(malformed)?;
        let unverified: Value =
            serde_json::from_slice(&B64.decode(payload).map_err(|_| malformed())?)
                .map_err(|_| malformed())?;
        let iss = unverified
            .get("iss")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::SubjectTokenInvalid("the token has no iss claim".into()))?;
        let issuer = self
            .issuers
            .get(iss)
            .ok_or_else(|| Error::UntrustedIssuer(iss.chars().take(200).collect()))?;
        let header = jsonwebtoken::decode_header(token).map_err(|_| malformed())?;
        let candidates: Vec<&IssuerKey> = issuer
            .keys
            .iter()
            .filter(|k| k.algorithm == header.alg)
            .filter(|k| match (&header.kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            })
            .collect();
        if candidates.is_empty() {
            return Err(Error::SubjectTokenInvalid(format!(
                "algorithm {:?} (or key id) is not the one this issuer signs with",
                header.alg
            )));
        }
        let mut validation = Validation::new(header.alg);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims.clear();
        validation.set_issuer(&[iss]);
        if issuer.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&issuer.audiences);
        }
        let mut last = Error::SubjectTokenInvalid("signature does not verify".into());
        let mut verified = None;
        for key in candidates {
            match jsonwebtoken::decode::<Value>(token, &key.key, &validation) {
                Ok(data) => {
                    verified = Some(data.claims);
                    break;
                }
                Err(e) => {
                    last = match e.kind() {
                        ErrorKind::InvalidAudience | ErrorKind::MissingRequiredClaim(_)
                            if !issuer.audiences.is_empty() =>
                        {
                            Error::SubjectTokenAudience
                        }
                        ErrorKind::InvalidSignature => {
                            Error::SubjectTokenInvalid("signature does not verify".into())
                        }
                        _ => Error::SubjectTokenInvalid("the token could not be decoded".into()),
                    }
                }
            }
        }
        let claims = verified.ok_or(last)?;
        self.check_time(&claims, issuer.leeway, now)?;
        // Subject and tenant are stored and logged: keep them short and printable.
        let text = |name: &str| {
            claim(&claims, name)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| Error::SubjectTokenInvalid(format!("the {name} claim is missing")))
                .and_then(|s| {
                    if s.len() > MAX_CLAIM_LEN || s.chars().any(char::is_control) {
                        Err(Error::SubjectTokenInvalid(format!(
                            "the {name} claim is longer than {MAX_CLAIM_LEN} bytes or has control characters"
                        )))
                    } else {
                        Ok(s)
                    }
                })
        };
        let permissions = match claim(&claims, &issuer.permissions_claim) {
            None | Some(Value::Null) => BTreeSet::new(),
            Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    Error::SubjectTokenInvalid("the permissions claim holds a non-string".into())
                })?,
            Some(_) => {
                return Err(Error::SubjectTokenInvalid(
                    "the permissions claim is neither a list nor a string".into(),
                ));
            }
        };
        Ok(Subject {
            issuer: iss.to_owned(),
            subject: text("sub")?,
            tenant: text(&issuer.tenant_claim)?,
            permissions,
        })
    }

    fn check_time(&self, claims: &Value, leeway: Duration, now: SystemTime) -> Result<()> {
        let now = to_unix_secs(now);
        let leeway = i64::try_from(leeway.as_secs()).unwrap_or(i64::MAX);
        let number = |name| claims.get(name).and_then(Value::as_i64);
        let exp = number("exp")
            .ok_or_else(|| Error::SubjectTokenInvalid("the exp claim is missing".into()))?;
        if now > exp.saturating_add(leeway) {
            return Err(Error::SubjectTokenExpired);
        }
        if let Some(nbf) = number("nbf")
            && now.saturating_add(leeway) < nbf
        {
            return Err(Error::SubjectTokenNotYetValid);
        }
        Ok(())
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
}
