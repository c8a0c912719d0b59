//! Dev mode: with no config file the service starts on its own, with a dev issuer whose
//! tokens `token-service dev-token` mints, and a dev module key and admin key stored under
//! the data directory (never logged). Not for production.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use crate::clock::to_unix_secs;
use crate::config::{Config, IssuerConfig, ModuleConfig, StartupError};
use crate::secrets::{MasterKey, generate_key_text, key_hash};

/// `iss` of dev-mode subject tokens.
pub const DEV_ISSUER: &str = "https://dev-issuer.jobtoken.invalid";
/// Module id of the dev module.
pub const DEV_MODULE: &str = "dev-module";
/// File (under the data dir) holding the dev module key.
pub const DEV_MODULE_KEY_FILE: &str = "dev-module.key";
/// File (under the data dir) holding the dev admin key.
pub const DEV_ADMIN_KEY_FILE: &str = "dev-admin.key";
const DEV_ISSUER_KEY_FILE: &str = "dev-issuer-key.pem";
const DEV_ISSUER_PUB_FILE: &str = "dev-issuer-pub.pem";
/// DER prefix of an Ed25519 SubjectPublicKeyInfo; the 32 key bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StartupError + '_ {
    move |source| StartupError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes a new file readable by its owner only; fails if it exists.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), StartupError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(io_err(path))?;
    file.write_all(contents).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

/// Reads the file, creating it with `make()` first if it does not exist.
fn read_or_create(path: &Path, make: impl FnOnce() -> Vec<u8>) -> Result<Vec<u8>, StartupError> {
    if !path.exists() {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        write_private(path, &make())?;
        tracing::info!(path = %path.display(), "created secret file");
    }
    std::fs::read(path).map_err(io_err(path))
}

/// Loads the master key, generating and storing one on first start.
pub fn load_or_create_master_key(path: &Path) -> Result<MasterKey, StartupError> {
    let text = read_or_create(path, || MasterKey::generate().1.into_bytes())?;
    let text = String::from_utf8_lossy(&text);
    MasterKey::from_text(&text).ok_or_else(|| StartupError::Key {
        path: path.to_owned(),
        problem: "must hold base64url of 32 bytes".into(),
    })
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn issuer_key_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    (
        data_dir.join(DEV_ISSUER_KEY_FILE),
        data_dir.join(DEV_ISSUER_PUB_FILE),
    )
}

/// Creates the dev issuer's Ed25519 key pair under `data_dir` unless it exists.
pub fn ensure_issuer_key(data_dir: &Path) -> Result<(), StartupError> {
    let (private, public) = issuer_key_paths(data_dir);
    if private.exists() && public.exists() {
        return Ok(());
    }
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .expect("Ed25519 key generation does not fail");
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("fresh key parses");
    let mut spki = ED25519_SPKI_PREFIX.to_vec();
    spki.extend_from_slice(pair.public_key().as_ref());
    std::fs::create_dir_all(data_dir).map_err(io_err(data_dir))?;
    let _ = std::fs::remove_file(&private);
    let _ = std::fs::remove_file(&public);
    write_private(&private, pem("PRIVATE KEY", pkcs8.as_ref()).as_bytes())?;
    std::fs::write(&public, pem("PUBLIC KEY", &spki)).map_err(io_err(&public))
}

/// Fails unless the dev issuer's key exists under `data_dir`: `dev-token` must sign with
/// the key the dev-mode service trusts, not make a new one nobody trusts.
pub fn require_issuer_key(data_dir: &Path) -> Result<(), StartupError> {
    let (private, public) = issuer_key_paths(data_dir);
    if private.exists() && public.exists() {
        return Ok(());
    }
    Err(StartupError::Key {
        path: private,
        problem: format!(
            "no dev issuer key here: run `dev-token` from the directory where the dev-mode \
             `serve` runs, or pass the same --data-dir (now {})",
            data_dir.display()
        ),
    })
}

/// The dev-mode config for `data_dir`, creating its keys on first use.
pub fn dev_config(data_dir: &Path) -> Result<Config, StartupError> {
    ensure_issuer_key(data_dir)?;
    let module_key = read_or_create(&data_dir.join(DEV_MODULE_KEY_FILE), || {
        generate_key_text("mk").into_bytes()
    })?;
    let admin_key = read_or_create(&data_dir.join(DEV_ADMIN_KEY_FILE), || {
        generate_key_text("ak").into_bytes()
    })?;
    let mut config = Config::from_toml("", Path::new("<dev mode>"))?;
    config.data_dir = data_dir.to_owned();
    config.dev_mode = true;
    config.admin_key_sha256 = Some(key_hash(String::from_utf8_lossy(&admin_key).trim()));
    config.modules = vec![ModuleConfig {
        delegable: vec!["*".into()],
        ..ModuleConfig::new(
            DEV_MODULE,
            Some(key_hash(String::from_utf8_lossy(&module_key).trim())),
        )
    }];
    config.trusted_issuers = vec![dev_issuer_config(data_dir)];
    Ok(config)
}

/// The trusted-issuer entry of the dev issuer whose keys live in `data_dir`.
pub fn dev_issuer_config(data_dir: &Path) -> IssuerConfig {
    IssuerConfig {
        issuer: DEV_ISSUER.into(),
        audiences: Vec::new(),
        jwks_file: None,
        public_key_file: Some(issuer_key_paths(data_dir).1),
        algorithm: Some("EdDSA".into()),
        hs256_secret_file: None,
        ..IssuerConfig::default()
    }
}

/// Signs arbitrary claims with the dev issuer's key (EdDSA). Tests use it to forge
/// expired, early or foreign tokens.
pub fn sign_with_dev_issuer(
    data_dir: &Path,
    claims: &serde_json::Value,
) -> Result<String, StartupError> {
    ensure_issuer_key(data_dir)?;
    let (private, _) = issuer_key_paths(data_dir);
    let pem = std::fs::read(&private).map_err(io_err(&private))?;
    let key_error = |problem: String| StartupError::Key {
        path: private.clone(),
        problem,
    };
    let key = EncodingKey::from_ed_pem(&pem).map_err(|e| key_error(e.to_string()))?;
    jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), claims, &key)
        .map_err(|e| key_error(e.to_string()))
}

/// What a dev subject token says.
#[derive(Debug, Clone)]
pub struct DevTokenRequest {
    /// The user (`sub`).
    pub user: String,
    /// The tenant.
    pub tenant: String,
    /// The user's permissions.
    pub permissions: BTreeSet<String>,
    /// Lifetime.
    pub ttl: Duration,
}

/// Mints a subject token from the dev issuer of `data_dir`.
pub fn mint_dev_token(
    data_dir: &Path,
    request: &DevTokenRequest,
    now: SystemTime,
) -> Result<String, StartupError> {
    let now_s = to_unix_secs(now);
    let claims = serde_json::json!({
        "iss": DEV_ISSUER,
        "sub": request.user,
        "tenant": request.tenant,
        "permissions": request.permissions,
        "iat": now_s,
        "nbf": now_s,
        "exp": now_s + i64::try_from(request.ttl.as_secs()).unwrap_or(i64::MAX / 2),
        "jti": uuid::Uuid::new_v4().to_string(),
    });
    sign_with_dev_issuer(data_dir, &claims)
}
