//! Signing keys: the current Ed25519 key signs access tokens; retired keys stay published
//! until the last token they signed has expired. Private keys are stored sealed with the
//! master key, so every replica sharing the store signs with the same key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use aws_lc_rs::{digest, rand::SystemRandom, signature::Ed25519KeyPair, signature::KeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::clock::to_unix_secs;
use crate::crypto::secrets::MasterKey;
use crate::lease::token_reach;
use crate::ports::{Retire, Store, StoreError, StoredKey};

/// How far behind a verifier's clock may run.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// How long a retired key stays published: until every token it signed has expired
/// (their [`token_reach`]), plus [`CLOCK_SKEW`] for verifiers whose clocks run behind.
pub fn retention(access_token_ttl: Duration, refresh_grace: Duration) -> Duration {
    token_reach(access_token_ttl, refresh_grace) + CLOCK_SKEW
}

const ALGORITHM: &str = "EdDSA";

/// Most verified tokens remembered; when full, expired ones go, then all of them.
const VERIFIED_CAPACITY: usize = 65_536;

/// The claims of a job access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    /// Issuer: this service.
    pub iss: String,
    /// The subject (user).
    pub sub: String,
    /// Audience.
    pub aud: String,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Not before, Unix seconds.
    pub nbf: i64,
    /// Unique token id.
    pub jti: String,
    /// Tenant.
    pub tenant: String,
    /// Granted permissions.
    pub permissions: Vec<String>,
    /// Job id.
    pub job_id: String,
    /// Lease id.
    pub lease_id: String,
    /// The actor (RFC 8693 `act`).
    pub act: Actor,
}

/// RFC 8693 actor claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The module id.
    pub sub: String,
}

/// A published public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Jwk {
    /// Key id.
    pub kid: String,
    /// "OKP".
    pub kty: &'static str,
    /// "Ed25519".
    pub crv: &'static str,
    /// Public key, base64url.
    pub x: String,
    /// "EdDSA".
    pub alg: &'static str,
    /// "sig".
    #[serde(rename = "use")]
    pub use_: &'static str,
}

/// Failures of the key ring.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored private key could not be opened: the master key is not the one it was
    /// sealed with.
    #[error("signing key {kid} cannot be unsealed: is this the right master key?")]
    Unseal {
        /// The key.
        kid: String,
    },
    /// A stored key is malformed.
    #[error("signing key {kid} is malformed")]
    Malformed {
        /// The key.
        kid: String,
    },
    /// Signing failed (a bug).
    #[error("signing failed")]
    Sign(#[source] serde_json::Error),
}

/// Verified tokens by SHA-256: the key id that signed each, and its claims.
type Verified = HashMap<[u8; 32], (String, Arc<AccessClaims>)>;

/// A key that can sign, from its activation on.
struct Signer {
    kid: String,
    activates_at: SystemTime,
    /// Parsed once: parsing a PKCS#8 Ed25519 key derives its public half, a scalar
    /// multiplication as costly as the signature itself.
    pair: Ed25519KeyPair,
    /// The token's first segment, base64url of `{"typ":"JWT","alg":"EdDSA","kid":…}`.
    header: String,
}

struct Loaded {
    /// The newest key (the store's current one), possibly not signing yet.
    newest_kid: String,
    /// Keys that sign, newest activation first.
    signers: Vec<Signer>,
    published: HashMap<String, (Jwk, DecodingKey)>,
}

impl Loaded {
    /// The key that signs at `now`: the newest already active, else the oldest.
    fn signer(&self, now: SystemTime) -> &Signer {
        self.signers
            .iter()
            .find(|s| s.activates_at <= now)
            .or_else(|| self.signers.last())
            .expect("a key ring always has a signer")
    }
}

/// The service's signing keys, reloaded from the store after rotations.
///
/// A rotation publishes the new key at once but signs with it only after
/// `activation_delay`, so verifiers that cached the JWKS have refetched it before the
/// first token under the new `kid` reaches them.
pub struct KeyRing {
    store: Arc<dyn Store>,
    master: MasterKey,
    /// How long a retired key stays published: the longest a token it signed can live.
    retain: Duration,
    activation_delay: Duration,
    loaded: RwLock<Arc<Loaded>>,
    /// Claims of tokens whose signature already checked out, by SHA-256 of the whole
    /// token: a resource server introspects the same token on every call, and an
    /// Ed25519 verification costs far more than the rest of an introspection. Keyed by a
    /// digest so no token is kept in memory.
    verified: Mutex<Verified>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("newest_kid", &self.current().newest_kid)
            .finish_non_exhaustive()
    }
}

/// Checks a token's header and EdDSA signature against the published keys (not its
/// time or issuer): its key id and claims.
fn verify_signature(loaded: &Loaded, token: &str) -> Option<(String, AccessClaims)> {
    let header = jsonwebtoken::decode_header(token).ok()?;
    if header.alg != Algorithm::EdDSA {
        return None;
    }
    let kid = header.kid?;
    let (_, key) = loaded.published.get(&kid)?;
    let mut validation = Validation::new(Algorithm::EdDSA);
    // Time and issuer are checked by the caller, against the injected clock.
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let claims = jsonwebtoken::decode::<AccessClaims>(token, key, &validation)
        .ok()?
        .claims;
    Some((kid, claims))
}

fn new_key(master: &MasterKey, now: SystemTime, activates_at: SystemTime) -> StoredKey {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .expect("Ed25519 key generation does not fail");
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("freshly generated key parses");
    let public_key = pair.public_key().as_ref().to_vec();
    let fingerprint = digest::digest(&digest::SHA256, &public_key);
    let kid = B64.encode(&fingerprint.as_ref()[..12]);
    StoredKey {
        sealed_private_key: master.seal(pkcs8.as_ref(), &kid),
        kid,
        algorithm: ALGORITHM.to_owned(),
        public_key,
        created_at: now,
        activates_at,
        retired_at: None,
    }
}

impl KeyRing {
    /// Loads the keys, creating the first one if the store has none.
    /// `retain`: how long a retired key stays published. `activation_delay`: how long a
    /// rotated-in key is published before it signs.
    pub async fn load(
        store: Arc<dyn Store>,
        master: MasterKey,
        retain: Duration,
        activation_delay: Duration,
        now: SystemTime,
    ) -> Result<Self, KeyError> {
        if store.signing_keys().await?.is_empty() {
            // The first key signs at once. Losing this race to another replica is fine:
            // its key is then used.
            store
                .rotate_signing_key(&new_key(&master, now, now), None)
                .await?;
        }
        let loaded = build(&store.signing_keys().await?, &master, retain, now)?;
        Ok(Self {
            store,
            master,
            retain,
            activation_delay,
            loaded: RwLock::new(Arc::new(loaded)),
            verified: Mutex::new(HashMap::new()),
        })
    }

    fn current(&self) -> Arc<Loaded> {
        Arc::clone(&self.loaded.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Re-reads the keys from the store (another replica may have rotated).
    pub async fn reload(&self, now: SystemTime) -> Result<(), KeyError> {
        let loaded = build(
            &self.store.signing_keys().await?,
            &self.master,
            self.retain,
            now,
        )?;
        *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(loaded);
        Ok(())
    }

    /// Adds a new key: published now, signing from the returned instant on, when the
    /// previous key retires. Returns `(new kid, retired kid, signing starts at)`.
    pub async fn rotate(&self, now: SystemTime) -> Result<(String, String, SystemTime), KeyError> {
        loop {
            self.reload(now).await?;
            let retired = self.current().newest_kid.clone();
            let key = new_key(&self.master, now, now + self.activation_delay);
            // The newest key stops signing when its successor starts.
            let retire = Retire {
                kid: &retired,
                at: key.activates_at,
            };
            if self.store.rotate_signing_key(&key, Some(retire)).await? {
                self.reload(now).await?;
                return Ok((key.kid, retired, key.activates_at));
            }
        }
    }

    /// The id of the key that signs at `now`.
    pub fn signing_kid(&self, now: SystemTime) -> String {
        self.current().signer(now).kid.clone()
    }

    /// Signs access-token claims with the key active at `now`.
    pub fn sign(&self, claims: &AccessClaims, now: SystemTime) -> Result<String, KeyError> {
        let loaded = self.current();
        let signer = loaded.signer(now);
        let payload = serde_json::to_vec(claims).map_err(KeyError::Sign)?;
        let mut token = String::with_capacity(signer.header.len() + payload.len() * 4 / 3 + 92);
        token.push_str(&signer.header);
        token.push('.');
        B64.encode_string(&payload, &mut token);
        let signature = signer.pair.sign(token.as_bytes());
        token.push('.');
        B64.encode_string(signature.as_ref(), &mut token);
        Ok(token)
    }

    /// Verifies an access token's signature and issuer, and that it is within its validity
    /// at `now` (with `leeway`). `None` if it is not a valid token of this service.
    pub fn verify(
        &self,
        token: &str,
        issuer: &str,
        now: SystemTime,
        leeway: Duration,
    ) -> Option<AccessClaims> {
        let digest = digest::digest(&digest::SHA256, token.as_bytes());
        let id: [u8; 32] = digest.as_ref().try_into().ok()?;
        let loaded = self.current();
        let remembered = self.remembered().get(&id).cloned();
        let claims = match remembered {
            // Still only while its key is published: a withdrawn key withdraws its tokens.
            Some((kid, claims)) if loaded.published.contains_key(&kid) => claims,
            _ => {
                let (kid, claims) = verify_signature(&loaded, token)?;
                let claims = Arc::new(claims);
                self.remember(id, kid, Arc::clone(&claims), now);
                claims
            }
        };
        let now = to_unix_secs(now);
        let leeway = i64::try_from(leeway.as_secs()).unwrap_or(i64::MAX);
        (claims.iss == issuer
            && now < claims.exp.saturating_add(leeway)
            && now >= claims.nbf.saturating_sub(leeway))
        .then(|| AccessClaims::clone(&claims))
    }

    fn remembered(&self) -> std::sync::MutexGuard<'_, Verified> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remember(&self, id: [u8; 32], kid: String, claims: Arc<AccessClaims>, now: SystemTime) {
        let mut verified = self.remembered();
        if verified.len() >= VERIFIED_CAPACITY {
            // Prune to at most half, so the scan runs once per many inserts even when
            // more tokens are live than the cache holds.
            let now = to_unix_secs(now);
            verified.retain(|_, (_, c)| c.exp > now);
            if verified.len() >= VERIFIED_CAPACITY / 2 {
                verified.clear();
            }
        }
        verified.insert(id, (kid, claims));
    }

    /// The published public keys: the newest (possibly not signing yet), the signing one
    /// and retired ones whose tokens may still be valid.
    pub fn jwks(&self) -> Vec<Jwk> {
        let loaded = self.current();
        let mut keys: Vec<Jwk> = loaded.published.values().map(|(j, _)| j.clone()).collect();
        // Newest key first, then by kid, so the document is stable.
        keys.sort_by(|a, b| {
            (a.kid != loaded.newest_kid, &a.kid).cmp(&(b.kid != loaded.newest_kid, &b.kid))
        });
        keys
    }

    /// The JWKS JSON document.
    pub fn jwks_json(&self) -> String {
        serde_json::json!({ "keys": self.jwks() }).to_string()
    }
}

fn build(
    keys: &[StoredKey],
    master: &MasterKey,
    retain: Duration,
    now: SystemTime,
) -> Result<Loaded, KeyError> {
    let newest = keys
        .iter()
        .find(|k| k.retired_at.is_none())
        .or_else(|| keys.first())
        .ok_or_else(|| KeyError::Malformed {
            kid: "<none>".into(),
        })?;
    let mut signers = Vec::new();
    let mut published = HashMap::new();
    for key in keys {
        // Published until every token it can have signed has expired.
        let live = key.retired_at.is_none_or(|r| r + retain > now);
        if !live || key.algorithm != ALGORITHM {
            continue;
        }
        // Only keys that still sign (or will) need their private half in memory.
        if key.retired_at.is_none_or(|r| r > now) {
            let pkcs8 = master
                .open(&key.sealed_private_key, &key.kid)
                .map_err(|_| KeyError::Unseal {
                    kid: key.kid.clone(),
                })?;
            let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| KeyError::Malformed {
                kid: key.kid.clone(),
            })?;
            let mut header = Header::new(Algorithm::EdDSA);
            header.kid = Some(key.kid.clone());
            let header = serde_json::to_vec(&header).map_err(KeyError::Sign)?;
            signers.push(Signer {
                kid: key.kid.clone(),
                activates_at: key.activates_at,
                pair,
                header: B64.encode(header),
            });
        }
        let x = B64.encode(&key.public_key);
        let decoding = DecodingKey::from_ed_components(&x).map_err(|_| KeyError::Malformed {
            kid: key.kid.clone(),
        })?;
        let jwk = Jwk {
            kid: key.kid.clone(),
            kty: "OKP",
            crv: "Ed25519",
            x,
            alg: ALGORITHM,
            use_: "sig",
        };
        published.insert(key.kid.clone(), (jwk, decoding));
    }
    if signers.is_empty() {
        return Err(KeyError::Malformed {
            kid: newest.kid.clone(),
        });
    }
    signers.sort_by_key(|s| std::cmp::Reverse(s.activates_at));
    Ok(Loaded {
        newest_kid: newest.kid.clone(),
        signers,
        published,
    })
}
