//! Typed configuration: TOML with unknown fields refused, overlaid by environment
//! variables, with named defaults and a [`Config::for_test`] constructor.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::store::SyncMode;
pub use token_domain::module::OnLogoutConfig;
use token_domain::settings::Settings;
pub use token_domain::settings::{OnWithdrawn, OverCap};

/// Default gRPC listen address.
pub const DEFAULT_GRPC_LISTEN: &str = "127.0.0.1:50051";
/// Default HTTP listen address (JWKS, metrics, liveness).
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:50052";
/// Default lifetime of an access token.
pub const DEFAULT_ACCESS_TOKEN_TTL: Duration = Duration::from_secs(5 * 60);
/// Default idle timeout: a lease nobody renews for this long ends.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Default grace window in which a retry of the previous refresh token converges.
pub const DEFAULT_REFRESH_GRACE: Duration = Duration::from_secs(30);
/// Default leeway on subject-token `exp`/`nbf`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// Default cap on a module's lease lifetime.
pub const DEFAULT_MAX_LEASE_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Default lease lifetime when the request names none.
pub const DEFAULT_LEASE_LIFETIME: Duration = Duration::from_secs(8 * 3600);
/// Default `iss` of access tokens.
pub use jobtoken_proto::wire::DEFAULT_ISSUER;
/// Default `aud` of access tokens.
pub const DEFAULT_AUDIENCE: &str = "jobtoken";
/// Default data directory (SQLite file, master key, dev-mode files).
pub const DEFAULT_DATA_DIR: &str = "./data";
/// Default time a rotated-in signing key is published before it signs: longer than
/// verifiers cache the JWKS (`max-age=60`) plus the key reload interval.
pub const DEFAULT_KEY_ACTIVATION_DELAY: Duration = Duration::from_secs(90);
/// Longest duration any setting accepts; beyond it is surely a mistake.
pub const MAX_SETTING_DURATION: Duration = crate::limits::ABSURD_LIFETIME;
/// Shortest access-token lifetime accepted.
pub const MIN_ACCESS_TOKEN_TTL: Duration = Duration::from_secs(1);

/// Problems found while starting: bad config, unreadable key files, a port in use.
/// These never become a gRPC `Status`.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML for [`Config`].
    #[error("config {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A setting is out of range or inconsistent.
    #[error("invalid config: {0}")]
    Invalid(String),
    /// A key file does not hold a usable key.
    #[error("key file {path}: {problem}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The signing keys could not be loaded.
    #[error("signing keys: {0}")]
    Keys(#[from] crate::keys::KeyError),
    /// A listener could not bind or serve.
    #[error("listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// TLS could not be set up.
    #[error("tls: {0}")]
    Tls(String),
}

/// The whole configuration of the service.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `iss` of the access tokens this service signs. Default `jobtoken`.
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// `aud` of access tokens when the request names none. Default `jobtoken`.
    #[serde(default = "default_audience")]
    pub default_audience: String,
    /// Lifetime of an access token (at least 1s). Default 5m.
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub access_token_ttl: Duration,
    /// A lease not renewed for this long ends. Must exceed `access_token_ttl`. Default 15m.
    #[serde(default = "default_idle", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Window in which the previous refresh token still returns the current one. Default 30s.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub refresh_grace: Duration,
    /// How long a rotated-in signing key is published before it signs. Default 90s.
    #[serde(default = "default_key_activation_delay", with = "humantime_serde")]
    pub key_activation_delay: Duration,
    /// What to do when a request asks for a lifetime above the module's cap. Default clamp.
    #[serde(default)]
    pub lifetime_over_cap: OverCap,
    /// Directory for the SQLite file and generated keys. Default `./data`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// File holding the master key (base64url of 32 bytes). Default `<data_dir>/master.key`,
    /// created on first start. Replicas sharing a store must share this key.
    #[serde(default)]
    pub master_key_file: Option<PathBuf>,
    /// SHA-256 (hex) of the admin key; without it the admin service refuses every call.
    #[serde(default)]
    pub admin_key_sha256: Option<String>,
    /// Listen addresses.
    #[serde(default)]
    pub listen: ListenConfig,
    /// Where leases are kept.
    #[serde(default)]
    pub store: StoreConfig,
    /// TLS for the gRPC listener; absent means plaintext.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// PEM file of CA certificates trusted, besides the Mozilla roots, when fetching
    /// identity providers' keys and asking permission sources over HTTPS.
    #[serde(default)]
    pub idp_ca_file: Option<PathBuf>,
    /// Modules allowed to hold leases.
    #[serde(default)]
    pub modules: Vec<ModuleConfig>,
    /// Issuers whose user tokens are accepted as subject tokens.
    #[serde(default)]
    pub trusted_issuers: Vec<IssuerConfig>,
    /// Per-module streams and rates.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Set by dev mode only; labels logs and the health output.
    #[serde(skip)]
    pub dev_mode: bool,
}

/// Listen addresses.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// gRPC. Default 127.0.0.1:50051.
    #[serde(default = "default_grpc_listen")]
    pub grpc: SocketAddr,
    /// HTTP: `/.well-known/jwks.json`, `/metrics`, `/healthz`. Default 127.0.0.1:50052.
    #[serde(default = "default_http_listen")]
    pub http: SocketAddr,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            grpc: default_grpc_listen(),
            http: default_http_listen(),
        }
    }
}

/// Store selection.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite` (default: one process, embedded) or `postgres` (several replicas).
    #[serde(default)]
    pub kind: StoreKind,
    /// SQLite file. Default `<data_dir>/jobtoken.db`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// SQLite: `normal` (survives kill -9; default) or `full` (fsync each commit; survives
    /// power loss).
    #[serde(default)]
    pub sync: SyncMode,
    /// SQLite: how many active leases to keep in memory, so renewals and introspection
    /// read them without touching the file (about 1 KiB each). 0 turns it off.
    #[serde(default = "default_lease_cache")]
    pub lease_cache: usize,
    /// PostgreSQL connection URL (`postgres://user:password@host/db`). Secret: never
    /// logged.
    #[serde(default)]
    pub url: Option<SecretString>,
    /// PostgreSQL: CA certificates (PEM) the server's certificate must chain to, for
    /// `sslmode=verify-ca`/`verify-full` (and checked with `prefer`/`require` when set).
    /// `sslrootcert` in the URL overrides it.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PostgreSQL schema for the tables, created if missing. Default `jobtoken`.
    #[serde(default = "default_pg_schema")]
    pub schema: String,
    /// PostgreSQL connection pool size per replica. Default 16.
    #[serde(default = "default_pg_pool")]
    pub max_connections: usize,
    /// PostgreSQL statement timeout; a slower query fails with UNAVAILABLE. Default 5s.
    #[serde(default = "default_pg_timeout", with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// How long ended leases (and their events) are kept before cleanup. Default 7 days.
    #[serde(default = "default_retention", with = "humantime_serde")]
    pub retention: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            kind: StoreKind::default(),
            path: None,
            sync: SyncMode::default(),
            lease_cache: default_lease_cache(),
            url: None,
            ca_file: None,
            schema: default_pg_schema(),
            max_connections: default_pg_pool(),
            statement_timeout: default_pg_timeout(),
            retention: default_retention(),
        }
    }
}

/// Which store backs the service.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// One SQLite file.
    #[default]
    Sqlite,
    /// PostgreSQL, shared by replicas.
    Postgres,
}

/// A string that never shows in `Debug` output.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// TLS files (PEM).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain.
    pub cert_file: PathBuf,
    /// Server private key.
    pub key_file: PathBuf,
    /// CA that signs module client certificates; enables mTLS module authentication.
    /// Client certificates stay optional so module keys keep working.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

/// A module (actor) that may hold leases.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModuleConfig {
    /// Module id: the token's `act.sub`.
    pub id: String,
    /// SHA-256 (hex) of its module key (`token-service hash-key` prints it).
    #[serde(default)]
    pub key_sha256: Option<String>,
    /// Common name or DNS name of its mTLS client certificate.
    #[serde(default)]
    pub mtls_subject: Option<String>,
    /// Permissions it may delegate: exact names, `prefix.*`, or `*`.
    #[serde(default)]
    pub delegable: Vec<String>,
    /// Cap on its lease lifetime. Default 24h.
    #[serde(default = "default_max_lifetime", with = "humantime_serde")]
    pub max_lifetime: Duration,
    /// Lifetime when the request names none. Default 8h (or the cap, if lower).
    #[serde(default = "default_lifetime", with = "humantime_serde")]
    pub default_lifetime: Duration,
    /// Tenants it serves; absent means every tenant. Grants, renewals, introspection and
    /// the revocation stream are limited to these.
    #[serde(default)]
    pub tenants: Option<Vec<String>>,
    /// Audiences its access tokens may name; empty means only `default_audience`.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// What a logout of the user does to its leases: the policy when a grant asks for
    /// none, and the policies a grant may ask for.
    #[serde(default)]
    pub on_logout: OnLogoutConfig,
}

impl ModuleConfig {
    /// A module with this id and credential hash, defaults for everything else.
    pub fn new(id: impl Into<String>, key_sha256: Option<String>) -> Self {
        Self {
            id: id.into(),
            key_sha256,
            mtls_subject: None,
            delegable: Vec::new(),
            max_lifetime: DEFAULT_MAX_LEASE_LIFETIME,
            default_lifetime: DEFAULT_LEASE_LIFETIME,
            tenants: None,
            audiences: Vec::new(),
            on_logout: OnLogoutConfig::default(),
        }
    }
}

/// What one caller may hold or spend: streams and request rates, per module. Reaching a
/// limit is `RESOURCE_EXHAUSTED` with a reason (and, for rates, a retry delay).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Open `WatchRevocations` streams per module. Default 64.
    #[serde(default = "default_streams_per_module")]
    pub streams_per_module: usize,
    /// HTTP/2 streams (calls in flight) per connection. Default 1024.
    #[serde(default = "default_concurrent_streams")]
    pub concurrent_streams_per_connection: u32,
    /// Grants (`IssueJobToken`, `ResumeJobToken`) per second per module; bursts of twice
    /// that pass. Default 1000.
    #[serde(default = "default_grants_per_second")]
    pub grants_per_second: u32,
    /// Renewals (`RefreshJobToken`) per second per module, bursts of twice. Default
    /// 20000: six million leases renewing every five minutes.
    #[serde(default = "default_renewals_per_second")]
    pub renewals_per_second: u32,
    /// Introspections per second per module, bursts of twice. Default 20000.
    #[serde(default = "default_introspections_per_second")]
    pub introspections_per_second: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            streams_per_module: default_streams_per_module(),
            concurrent_streams_per_connection: default_concurrent_streams(),
            grants_per_second: default_grants_per_second(),
            renewals_per_second: default_renewals_per_second(),
            introspections_per_second: default_introspections_per_second(),
        }
    }
}

/// An issuer of user (subject) tokens.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// Exact `iss` value (or, with `tokens_without_iss`, the entry's name). Leave out
    /// with `issuer_pattern`.
    #[serde(default)]
    pub issuer: String,
    /// Accepted `aud` values; empty means `aud` is not checked.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// JWKS document file (RS256, ES256, EdDSA keys; algorithm from each key).
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// A single PEM public key; needs `algorithm`.
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
    /// Algorithm of `public_key_file`: RS256, ES256 or EdDSA.
    #[serde(default)]
    pub algorithm: Option<String>,
    /// File holding an HS256 shared secret (for platforms that sign that way).
    #[serde(default)]
    pub hs256_secret_file: Option<PathBuf>,
    /// Claim holding the user's permissions (array or space-separated string).
    #[serde(default = "default_permissions_claim")]
    pub permissions_claim: String,
    /// Claim holding the tenant.
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
    /// Leeway on `exp` and `nbf`. Default 30s.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub leeway: Duration,
    /// Instead of `issuer`: the shape of many issuers, with one `{tenant}` placeholder
    /// standing for a whole path segment (`https://kc.example.org/realms/{tenant}`). Any
    /// `iss` of that shape is trusted, and its tenant is taken from it.
    #[serde(default)]
    pub issuer_pattern: Option<String>,
    /// With `issuer_pattern`: the only tenants it may match. Absent: any.
    #[serde(default)]
    pub tenants: Option<Vec<String>>,
    /// With `issuer_pattern`: most realms whose keys are cached at once. Default 1000.
    #[serde(default = "default_max_realms")]
    pub max_realms: usize,
    /// Keys from OIDC discovery: `<issuer>/.well-known/openid-configuration` names the
    /// `jwks_uri`, and its `issuer` must be the token's.
    #[serde(default)]
    pub discovery: bool,
    /// Keys from this JWKS URL (with `issuer_pattern`, `{tenant}` is replaced).
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// The tokens carry no `iss` at all (FOLIO Okapi). Only with `hs256_secret_file`, and
    /// for one entry at most: a token without `iss` is checked against it.
    #[serde(default)]
    pub tokens_without_iss: bool,
    /// Claim naming the user the lease is for. Default `sub`.
    #[serde(default = "default_subject_claim")]
    pub subject_claim: String,
    /// A token naming a key id not in the cached keys refetches them at most this often.
    /// Default 10s.
    #[serde(default = "default_jwks_refetch_interval", with = "humantime_serde")]
    pub jwks_refetch_interval: Duration,
    /// Shortest time fetched keys are kept before a refresh, whatever `Cache-Control`
    /// says. Default 1m.
    #[serde(default = "default_jwks_min_ttl", with = "humantime_serde")]
    pub jwks_min_ttl: Duration,
    /// Longest time fetched keys are kept before a refresh; also the time without
    /// `Cache-Control`. Default 15m.
    #[serde(default = "default_jwks_max_ttl", with = "humantime_serde")]
    pub jwks_max_ttl: Duration,
    /// While the identity provider is unreachable, the last good keys keep verifying for
    /// this long after they were fetched. Default 24h.
    #[serde(default = "default_jwks_max_stale", with = "humantime_serde")]
    pub jwks_max_stale: Duration,
    /// Where the user's permissions come from. Absent: `permissions_claim`.
    #[serde(default)]
    pub permission_source: Option<PermissionSourceConfig>,
    /// Receive OpenID Connect back-channel logouts from this issuer at
    /// `POST /backchannel-logout`. Absent: its logouts are not received, and grants of its
    /// users cannot ask for `on_logout = end`.
    #[serde(default)]
    pub backchannel_logout: Option<BackchannelLogoutConfig>,
}

/// `[trusted_issuers.backchannel_logout]`: how logout tokens of an issuer are checked.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackchannelLogoutConfig {
    /// This service's client id at the issuer: the logout token's `aud` must name it.
    pub client_id: String,
    /// Oldest logout token accepted, by its `iat` (its `jti` is remembered this long, so
    /// a replay is refused). Default 5m.
    #[serde(default = "default_logout_max_age", with = "humantime_serde")]
    pub max_age: Duration,
}

fn default_logout_max_age() -> Duration {
    Duration::from_secs(300)
}

impl Default for IssuerConfig {
    /// An entry with every default and no issuer or key: tests and dev mode fill those.
    fn default() -> Self {
        Self {
            issuer: String::new(),
            audiences: Vec::new(),
            jwks_file: None,
            public_key_file: None,
            algorithm: None,
            hs256_secret_file: None,
            permissions_claim: default_permissions_claim(),
            tenant_claim: default_tenant_claim(),
            leeway: DEFAULT_LEEWAY,
            issuer_pattern: None,
            tenants: None,
            max_realms: default_max_realms(),
            discovery: false,
            jwks_uri: None,
            tokens_without_iss: false,
            subject_claim: default_subject_claim(),
            jwks_refetch_interval: DEFAULT_JWKS_REFETCH_INTERVAL,
            jwks_min_ttl: DEFAULT_JWKS_MIN_TTL,
            jwks_max_ttl: DEFAULT_JWKS_MAX_TTL,
            jwks_max_stale: DEFAULT_JWKS_MAX_STALE,
            permission_source: None,
            backchannel_logout: None,
        }
    }
}

impl IssuerConfig {
    /// The entry's name in logs and metrics: `issuer`, or else `issuer_pattern`.
    pub fn name(&self) -> &str {
        self.issuer_pattern.as_deref().unwrap_or(&self.issuer)
    }

    /// Whether its keys come from the network.
    pub fn fetches_keys(&self) -> bool {
        self.discovery || self.jwks_uri.is_some()
    }
}

/// Where an issuer's users' permissions come from.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PermissionSourceKind {
    /// The token's `permissions_claim` (the default).
    #[default]
    Claim,
    /// The platform's permission service, over HTTP.
    Http,
}

/// `[trusted_issuers.permission_source]`: the platform's permission service.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PermissionSourceConfig {
    /// `claim` or `http`.
    pub kind: PermissionSourceKind,
    /// `http`: the URL, with `{user_id}`, `{tenant}` and `{sub}` placeholders (each
    /// replaced percent-encoded).
    #[serde(default)]
    pub url: Option<String>,
    /// JSON pointer (RFC 6901) to the array of permission names. Default `/permissions`.
    #[serde(default = "default_pointer")]
    pub pointer: String,
    /// Extra request headers; values may hold the same placeholders.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// Header that carries the user's own token, raw (e.g. `x-okapi-token`). Default:
    /// `Authorization: Bearer <token>`.
    #[serde(default)]
    pub token_header: Option<String>,
    /// How long an answer is reused for the same user. Default 30s; `0s` turns it off.
    #[serde(default = "default_permission_cache", with = "humantime_serde")]
    pub cache: Duration,
    /// Time allowed for one call. Default 2s.
    #[serde(default = "default_permission_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Largest answer read, in bytes. Default 1 MiB.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// Most users' answers cached at once. Default 10000.
    #[serde(default = "default_cache_entries")]
    pub cache_entries: usize,
    /// JSON pointer to a boolean saying whether the user is active; `false` means
    /// disabled (grants refused, leases end at their next re-check). Absent: not read.
    /// When set, an answer without a boolean there is malformed.
    #[serde(default)]
    pub active_pointer: Option<String>,
    /// Re-check the permissions of a lease at a renewal when the last check is older than
    /// this. Absent (the default): never re-checked; a lease keeps what it was granted.
    #[serde(default, with = "humantime_serde")]
    pub recheck_interval: Option<Duration>,
    /// What a re-check that finds a granted permission withdrawn does. Default `end`.
    #[serde(default)]
    pub on_withdrawn: OnWithdrawn,
    /// While re-checks fail (the source is down), leases renew with what they hold; after
    /// this long without a successful check they end (`PERMISSIONS_UNVERIFIABLE`).
    /// Absent (the default): an outage never ends a lease.
    #[serde(default, with = "humantime_serde")]
    pub max_unverified: Option<Duration>,
    /// How the service authenticates to the source for re-checks, when no user token is
    /// at hand. Required with `recheck_interval`.
    #[serde(default)]
    pub service_credential: Option<ServiceCredentialConfig>,
}

/// `[trusted_issuers.permission_source.service_credential]`: the service's own credential
/// at the platform.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServiceCredentialConfig {
    /// OAuth2 client credentials grant (RFC 6749 §4.4) at the issuer's token endpoint;
    /// the token is sent as `Authorization: Bearer` and reused until shortly before it
    /// expires.
    ClientCredentials {
        /// The token endpoint; `{tenant}` is replaced by the lease's tenant
        /// (`https://kc.example.org/realms/{tenant}/protocol/openid-connect/token`).
        token_endpoint: String,
        /// The client id (`{tenant}` is replaced).
        client_id: String,
        /// File holding the client secret (`{tenant}` in the path is replaced).
        client_secret_file: PathBuf,
        /// `scope` to ask for, if any.
        #[serde(default)]
        scope: Option<String>,
    },
    /// A fixed header, e.g. a platform API key.
    Header {
        /// Header name.
        name: String,
        /// File holding the header's value.
        value_file: PathBuf,
    },
}

impl PermissionSourceConfig {
    /// An `http` source at `url` with every default.
    pub fn http(url: &str) -> Self {
        Self {
            kind: PermissionSourceKind::Http,
            url: Some(url.to_owned()),
            pointer: default_pointer(),
            headers: Default::default(),
            token_header: None,
            cache: default_permission_cache(),
            timeout: default_permission_timeout(),
            max_response_bytes: default_max_response_bytes(),
            cache_entries: default_cache_entries(),
            active_pointer: None,
            recheck_interval: None,
            on_withdrawn: OnWithdrawn::End,
            max_unverified: None,
            service_credential: None,
        }
    }
}

/// Default unknown-`kid` refetch interval.
pub const DEFAULT_JWKS_REFETCH_INTERVAL: Duration = Duration::from_secs(10);
/// Default floor on how long fetched keys are kept.
pub const DEFAULT_JWKS_MIN_TTL: Duration = Duration::from_secs(60);
/// Default ceiling on how long fetched keys are kept (and the time without Cache-Control).
pub const DEFAULT_JWKS_MAX_TTL: Duration = Duration::from_secs(15 * 60);
/// Default time the last good keys keep verifying while the identity provider is down.
pub const DEFAULT_JWKS_MAX_STALE: Duration = Duration::from_secs(24 * 3600);

fn default_max_realms() -> usize {
    1000
}
fn default_subject_claim() -> String {
    "sub".into()
}
fn default_jwks_refetch_interval() -> Duration {
    DEFAULT_JWKS_REFETCH_INTERVAL
}
fn default_jwks_min_ttl() -> Duration {
    DEFAULT_JWKS_MIN_TTL
}
fn default_jwks_max_ttl() -> Duration {
    DEFAULT_JWKS_MAX_TTL
}
fn default_jwks_max_stale() -> Duration {
    DEFAULT_JWKS_MAX_STALE
}
fn default_pointer() -> String {
    "/permissions".into()
}
fn default_permission_cache() -> Duration {
    Duration::from_secs(30)
}
fn default_permission_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_max_response_bytes() -> usize {
    1024 * 1024
}
fn default_cache_entries() -> usize {
    10_000
}

fn default_issuer() -> String {
    DEFAULT_ISSUER.into()
}
fn default_audience() -> String {
    DEFAULT_AUDIENCE.into()
}
fn default_ttl() -> Duration {
    DEFAULT_ACCESS_TOKEN_TTL
}
fn default_idle() -> Duration {
    DEFAULT_IDLE_TIMEOUT
}
fn default_grace() -> Duration {
    DEFAULT_REFRESH_GRACE
}
fn default_key_activation_delay() -> Duration {
    DEFAULT_KEY_ACTIVATION_DELAY
}
fn default_leeway() -> Duration {
    DEFAULT_LEEWAY
}
fn default_data_dir() -> PathBuf {
    DEFAULT_DATA_DIR.into()
}
fn default_grpc_listen() -> SocketAddr {
    DEFAULT_GRPC_LISTEN.parse().expect("valid default")
}
fn default_http_listen() -> SocketAddr {
    DEFAULT_HTTP_LISTEN.parse().expect("valid default")
}
fn default_max_lifetime() -> Duration {
    DEFAULT_MAX_LEASE_LIFETIME
}
fn default_lifetime() -> Duration {
    DEFAULT_LEASE_LIFETIME
}
fn default_lease_cache() -> usize {
    crate::store::sqlite::DEFAULT_LEASE_CACHE
}

fn default_streams_per_module() -> usize {
    64
}
fn default_concurrent_streams() -> u32 {
    1024
}
fn default_grants_per_second() -> u32 {
    1000
}
fn default_renewals_per_second() -> u32 {
    20_000
}
fn default_introspections_per_second() -> u32 {
    20_000
}

fn default_pg_schema() -> String {
    "jobtoken".into()
}
fn default_pg_pool() -> usize {
    16
}
fn default_pg_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_retention() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_permissions_claim() -> String {
    "permissions".into()
}
fn default_tenant_claim() -> String {
    "tenant".into()
}

/// Environment variables that override the file, by name.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("JOBTOKEN_GRPC_LISTEN", "listen.grpc"),
    ("JOBTOKEN_HTTP_LISTEN", "listen.http"),
    ("JOBTOKEN_DATA_DIR", "data_dir"),
    ("JOBTOKEN_STORE_PATH", "store.path"),
    (
        "JOBTOKEN_STORE_URL",
        "store.url (and store.kind = postgres)",
    ),
    ("JOBTOKEN_STORE_SYNC", "store.sync"),
    ("JOBTOKEN_STORE_MAX_CONNECTIONS", "store.max_connections"),
    ("JOBTOKEN_MASTER_KEY_FILE", "master_key_file"),
    ("JOBTOKEN_ACCESS_TOKEN_TTL", "access_token_ttl"),
    ("JOBTOKEN_IDLE_TIMEOUT", "idle_timeout"),
    ("JOBTOKEN_ADMIN_KEY_SHA256", "admin_key_sha256"),
    ("JOBTOKEN_GRANTS_PER_SECOND", "limits.grants_per_second"),
    ("JOBTOKEN_RENEWALS_PER_SECOND", "limits.renewals_per_second"),
    (
        "JOBTOKEN_INTROSPECTIONS_PER_SECOND",
        "limits.introspections_per_second",
    ),
];

impl Config {
    /// The settings the domain runs with.
    pub fn settings(&self) -> Settings {
        Settings {
            issuer: self.issuer.clone(),
            default_audience: self.default_audience.clone(),
            access_token_ttl: self.access_token_ttl,
            idle_timeout: self.idle_timeout,
            refresh_grace: self.refresh_grace,
            over_cap: self.lifetime_over_cap,
        }
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, StartupError> {
        toml::from_str(text).map_err(|e| StartupError::Parse {
            path: path.to_owned(),
            source: Box::new(e),
        })
    }

    /// Reads and parses a config file.
    pub fn from_file(path: &Path) -> Result<Self, StartupError> {
        let text = std::fs::read_to_string(path).map_err(|source| StartupError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Applies the [`ENV_OVERRIDES`] found by `get` (the process environment in `main`).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), StartupError> {
        let duration = |name: &str, v: &str| {
            humantime::parse_duration(v)
                .map_err(|e| StartupError::Invalid(format!("{name}={v:?}: {e}")))
        };
        let addr = |name: &str, v: &str| {
            v.parse::<SocketAddr>()
                .map_err(|e| StartupError::Invalid(format!("{name}={v:?}: {e}")))
        };
        let number = |name: &str, v: &str| {
            v.parse::<u32>()
                .map_err(|e| StartupError::Invalid(format!("{name}={v:?}: {e}")))
        };
        for (name, _) in ENV_OVERRIDES {
            let Some(v) = get(name) else { continue };
            match *name {
                "JOBTOKEN_GRPC_LISTEN" => self.listen.grpc = addr(name, &v)?,
                "JOBTOKEN_HTTP_LISTEN" => self.listen.http = addr(name, &v)?,
                "JOBTOKEN_DATA_DIR" => self.data_dir = v.into(),
                "JOBTOKEN_STORE_PATH" => self.store.path = Some(v.into()),
                "JOBTOKEN_STORE_URL" => {
                    self.store.kind = StoreKind::Postgres;
                    self.store.url = Some(SecretString::new(v));
                }
                "JOBTOKEN_STORE_SYNC" => {
                    self.store.sync = match v.as_str() {
                        "normal" => SyncMode::Normal,
                        "full" => SyncMode::Full,
                        _ => {
                            return Err(StartupError::Invalid(format!(
                                "{name}={v:?}: expected \"normal\" or \"full\""
                            )));
                        }
                    };
                }
                "JOBTOKEN_STORE_MAX_CONNECTIONS" => {
                    self.store.max_connections = v
                        .parse()
                        .map_err(|e| StartupError::Invalid(format!("{name}={v:?}: {e}")))?;
                }
                "JOBTOKEN_MASTER_KEY_FILE" => self.master_key_file = Some(v.into()),
                "JOBTOKEN_ACCESS_TOKEN_TTL" => self.access_token_ttl = duration(name, &v)?,
                "JOBTOKEN_IDLE_TIMEOUT" => self.idle_timeout = duration(name, &v)?,
                "JOBTOKEN_ADMIN_KEY_SHA256" => self.admin_key_sha256 = Some(v),
                "JOBTOKEN_GRANTS_PER_SECOND" => self.limits.grants_per_second = number(name, &v)?,
                "JOBTOKEN_RENEWALS_PER_SECOND" => {
                    self.limits.renewals_per_second = number(name, &v)?;
                }
                "JOBTOKEN_INTROSPECTIONS_PER_SECOND" => {
                    self.limits.introspections_per_second = number(name, &v)?;
                }
                _ => unreachable!("every ENV_OVERRIDES entry is handled"),
            }
        }
        Ok(())
    }

    /// Checks ranges and consistency.
    pub fn validate(&self) -> Result<(), StartupError> {
        let bad = |m: String| Err(StartupError::Invalid(m));
        if self.access_token_ttl < MIN_ACCESS_TOKEN_TTL {
            return bad("access_token_ttl must be at least 1s".into());
        }
        if self.idle_timeout <= self.access_token_ttl {
            return bad("idle_timeout must be longer than access_token_ttl".into());
        }
        if self.refresh_grace > self.idle_timeout {
            return bad("refresh_grace must not exceed idle_timeout".into());
        }
        if self.store.kind == StoreKind::Postgres {
            if self.store.url.is_none() {
                return bad("store.kind = \"postgres\" needs store.url".into());
            }
            let schema_ok = !self.store.schema.is_empty()
                && self.store.schema.len() <= 63
                && self
                    .store
                    .schema
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !schema_ok {
                return bad("store.schema must be 1-63 characters of a-z 0-9 _".into());
            }
            if self.store.max_connections == 0 {
                return bad("store.max_connections must be at least 1".into());
            }
        }
        let mut durations = vec![
            ("access_token_ttl", self.access_token_ttl),
            ("idle_timeout", self.idle_timeout),
            ("refresh_grace", self.refresh_grace),
            ("key_activation_delay", self.key_activation_delay),
            ("store.statement_timeout", self.store.statement_timeout),
            ("store.retention", self.store.retention),
        ];
        for m in &self.modules {
            durations.push(("modules.max_lifetime", m.max_lifetime));
            durations.push(("modules.default_lifetime", m.default_lifetime));
        }
        for i in &self.trusted_issuers {
            durations.push(("trusted_issuers.leeway", i.leeway));
        }
        if let Some((name, _)) = durations.iter().find(|(_, d)| *d > MAX_SETTING_DURATION) {
            return bad(format!("{name} must be at most 366 days"));
        }
        let mut ids = std::collections::HashSet::new();
        let mut credentials = std::collections::HashSet::new();
        for m in &self.modules {
            if m.id.is_empty() || !ids.insert(&m.id) {
                return bad(format!("module id {:?} is empty or repeated", m.id));
            }
            // Two modules sharing a credential would authenticate as each other.
            let key = m
                .key_sha256
                .as_ref()
                .map(|h| format!("key:{}", h.to_ascii_lowercase()));
            let cert = m.mtls_subject.as_ref().map(|n| format!("cert:{n}"));
            for credential in [key, cert].into_iter().flatten() {
                if !credentials.insert(credential) {
                    return bad(format!(
                        "module {:?} shares its key_sha256 or mtls_subject with another module",
                        m.id
                    ));
                }
            }
            if !m.on_logout.allowed.contains(&m.on_logout.default) {
                return bad(format!(
                    "module {:?}: on_logout.allowed must include on_logout.default",
                    m.id
                ));
            }
            if m.key_sha256.is_none() && m.mtls_subject.is_none() {
                return bad(format!(
                    "module {:?} needs key_sha256 or mtls_subject",
                    m.id
                ));
            }
            let client_certs = self
                .tls
                .as_ref()
                .is_some_and(|t| t.client_ca_file.is_some());
            if m.key_sha256.is_none() && !client_certs {
                return bad(format!(
                    "module {:?} authenticates only by mtls_subject, but no client \
                     certificate can be checked without [tls] client_ca_file: it could \
                     never call",
                    m.id
                ));
            }
            for pattern in &m.delegable {
                if let Some(problem) = crate::grant::pattern_problem(pattern) {
                    return bad(format!(
                        "module {:?}: delegable {pattern:?} {problem}",
                        m.id
                    ));
                }
            }
            if let Some(h) = &m.key_sha256
                && !is_sha256_hex(h)
            {
                return bad(format!(
                    "module {:?}: key_sha256 must be 64 hex digits",
                    m.id
                ));
            }
            // A lease shorter than one access token would hand out tokens born expired.
            if m.max_lifetime < self.access_token_ttl || m.default_lifetime < self.access_token_ttl
            {
                return bad(format!(
                    "module {:?}: max_lifetime and default_lifetime must be at least \
                     access_token_ttl",
                    m.id
                ));
            }
            if let Err(p) = crate::ident::check(&m.id, crate::limits::MAX_ID_LEN) {
                return bad(format!("module id {:?} {p}", m.id));
            }
            for t in m.tenants.iter().flatten() {
                if let Err(p) = crate::ident::check(t, crate::limits::MAX_ID_LEN) {
                    return bad(format!("module {:?}: tenant {t:?} {p}", m.id));
                }
            }
            if m.tenants.as_ref().is_some_and(Vec::is_empty) {
                return bad(format!(
                    "module {:?}: tenants = [] would serve no tenant; leave it out to serve all",
                    m.id
                ));
            }
            for a in &m.audiences {
                if let Err(p) = crate::ident::check(a, crate::limits::MAX_ID_LEN) {
                    return bad(format!("module {:?}: audience {a:?} {p}", m.id));
                }
            }
        }
        let l = &self.limits;
        for (name, value) in [
            ("limits.streams_per_module", l.streams_per_module as u64),
            (
                "limits.concurrent_streams_per_connection",
                u64::from(l.concurrent_streams_per_connection),
            ),
            ("limits.grants_per_second", u64::from(l.grants_per_second)),
            (
                "limits.renewals_per_second",
                u64::from(l.renewals_per_second),
            ),
            (
                "limits.introspections_per_second",
                u64::from(l.introspections_per_second),
            ),
        ] {
            if value == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        if let Some(h) = &self.admin_key_sha256
            && !is_sha256_hex(h)
        {
            return bad("admin_key_sha256 must be 64 hex digits".into());
        }
        let mut without_iss = 0;
        for i in &self.trusted_issuers {
            validate_issuer(i)?;
            without_iss += usize::from(i.tokens_without_iss);
            if without_iss > 1 {
                return bad("only one trusted issuer may set tokens_without_iss".into());
            }
            let sources = [
                i.jwks_file.is_some(),
                i.public_key_file.is_some(),
                i.hs256_secret_file.is_some(),
                i.jwks_uri.is_some(),
                i.discovery,
            ];
            if sources.iter().filter(|s| **s).count() != 1 {
                return bad(format!(
                    "issuer {:?}: set exactly one of jwks_file, public_key_file, \
                     hs256_secret_file, jwks_uri, discovery = true",
                    i.name()
                ));
            }
            if i.public_key_file.is_some() != i.algorithm.is_some() {
                return bad(format!(
                    "issuer {:?}: algorithm goes with public_key_file (and only with it)",
                    i.issuer
                ));
            }
        }
        Ok(())
    }

    /// The SQLite file.
    pub fn store_path(&self) -> PathBuf {
        self.store
            .path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("jobtoken.db"))
    }

    /// The master key file.
    pub fn master_key_path(&self) -> PathBuf {
        self.master_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("master.key"))
    }

    /// A config for tests: ephemeral ports on loopback, data under `data_dir`, no modules
    /// or issuers (tests add their own).
    pub fn for_test(data_dir: &Path) -> Self {
        Self {
            issuer: DEFAULT_ISSUER.into(),
            default_audience: DEFAULT_AUDIENCE.into(),
            access_token_ttl: DEFAULT_ACCESS_TOKEN_TTL,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            refresh_grace: DEFAULT_REFRESH_GRACE,
            key_activation_delay: DEFAULT_KEY_ACTIVATION_DELAY,
            lifetime_over_cap: OverCap::Clamp,
            data_dir: data_dir.to_owned(),
            master_key_file: None,
            admin_key_sha256: None,
            listen: ListenConfig {
                grpc: "127.0.0.1:0".parse().expect("valid"),
                http: "127.0.0.1:0".parse().expect("valid"),
            },
            store: StoreConfig::default(),
            tls: None,
            idp_ca_file: None,
            modules: Vec::new(),
            trusted_issuers: Vec::new(),
            limits: LimitsConfig::default(),
            dev_mode: false,
        }
    }
}

/// The checks of one `[[trusted_issuers]]` entry that need no other entry.
fn validate_issuer(i: &IssuerConfig) -> Result<(), StartupError> {
    let name = i.name();
    let bad = |m: String| Err(StartupError::Invalid(format!("issuer {name:?}: {m}")));
    match (&i.issuer_pattern, i.issuer.is_empty()) {
        (None, true) => return bad("set issuer or issuer_pattern".into()),
        (Some(_), false) => return bad("set issuer or issuer_pattern, not both".into()),
        (Some(p), true) => {
            if let Err(problem) = crate::idp::IssuerPattern::parse(p) {
                return bad(problem);
            }
        }
        (None, false) => {}
    }
    if i.tenants.is_some() && i.issuer_pattern.is_none() {
        return bad("tenants goes with issuer_pattern".into());
    }
    if i.tenants.as_ref().is_some_and(Vec::is_empty) {
        return bad("tenants = [] would match no tenant; leave it out to match all".into());
    }
    for t in i.tenants.iter().flatten() {
        if let Err(p) = crate::ident::check(t, crate::limits::MAX_ID_LEN) {
            return bad(format!("tenant {t:?} {p}"));
        }
    }
    if i.max_realms == 0 {
        return bad("max_realms must be at least 1".into());
    }
    if i.tokens_without_iss && (i.hs256_secret_file.is_none() || i.issuer_pattern.is_some()) {
        return bad(
            "tokens_without_iss needs hs256_secret_file and an issuer (the entry's name)".into(),
        );
    }
    if let Some(uri) = &i.jwks_uri {
        if !(uri.starts_with("https://") || uri.starts_with("http://")) {
            return bad("jwks_uri must be an http(s) URL".into());
        }
        if uri.contains("{tenant}") && i.issuer_pattern.is_none() {
            return bad("{tenant} in jwks_uri goes with issuer_pattern".into());
        }
    }
    // One key set for every realm would let whoever signs for one realm name any other
    // realm (any tenant) in `iss`: each realm must have keys of its own.
    if i.issuer_pattern.is_some()
        && !i.discovery
        && !i
            .jwks_uri
            .as_deref()
            .is_some_and(|u| u.contains("{tenant}"))
    {
        return bad(
            "issuer_pattern needs discovery = true or a jwks_uri with {tenant}: one key set \
             for every realm would let any realm's key vouch for every tenant"
                .into(),
        );
    }
    if i.discovery && !(name.starts_with("https://") || name.starts_with("http://")) {
        return bad("discovery needs an http(s) issuer".into());
    }
    if i.subject_claim.is_empty() || i.tenant_claim.is_empty() {
        return bad("subject_claim and tenant_claim must not be empty".into());
    }
    // Zero would let every token naming an unknown kid cause a fetch.
    if i.jwks_refetch_interval < Duration::from_secs(1) {
        return bad("jwks_refetch_interval must be at least 1s".into());
    }
    if i.jwks_min_ttl > i.jwks_max_ttl {
        return bad("jwks_min_ttl must not exceed jwks_max_ttl".into());
    }
    for (field, d) in [
        ("jwks_refetch_interval", i.jwks_refetch_interval),
        ("jwks_min_ttl", i.jwks_min_ttl),
        ("jwks_max_ttl", i.jwks_max_ttl),
        ("jwks_max_stale", i.jwks_max_stale),
    ] {
        if d > MAX_SETTING_DURATION {
            return bad(format!("{field} must be at most 366 days"));
        }
    }
    let Some(source) = &i.permission_source else {
        return Ok(());
    };
    match source.kind {
        PermissionSourceKind::Claim => {
            if source.url.is_some() {
                return bad("permission_source: url goes with kind = \"http\"".into());
            }
        }
        PermissionSourceKind::Http => {
            let Some(url) = &source.url else {
                return bad("permission_source: kind = \"http\" needs url".into());
            };
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return bad("permission_source.url must be an http(s) URL".into());
            }
            if !(source.pointer.is_empty() || source.pointer.starts_with('/')) {
                return bad(
                    "permission_source.pointer must be a JSON pointer (\"/permissions\")".into(),
                );
            }
            let names = source.headers.keys().chain(source.token_header.iter());
            for h in names {
                if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                    return bad(format!("permission_source: {h:?} is not a header name"));
                }
            }
            if source.timeout.is_zero() || source.timeout > MAX_SETTING_DURATION {
                return bad("permission_source.timeout must be between 1ms and 366 days".into());
            }
            if source.cache > MAX_SETTING_DURATION {
                return bad("permission_source.cache must be at most 366 days".into());
            }
            if source.max_response_bytes == 0 || source.cache_entries == 0 {
                return bad(
                    "permission_source: max_response_bytes and cache_entries must be at least 1"
                        .into(),
                );
            }
            if let Some(pointer) = &source.active_pointer
                && !pointer.starts_with('/')
            {
                return bad(
                    "permission_source.active_pointer must be a JSON pointer (\"/active\")".into(),
                );
            }
            validate_recheck(source).map_err(StartupError::Invalid)?;
        }
    }
    if let Some(logout) = &i.backchannel_logout {
        if logout.client_id.trim().is_empty() {
            return bad("backchannel_logout.client_id is required".into());
        }
        if logout.max_age.is_zero() || logout.max_age > MAX_SETTING_DURATION {
            return bad("backchannel_logout.max_age must be between 1ms and 366 days".into());
        }
    }
    Ok(())
}

fn validate_recheck(source: &PermissionSourceConfig) -> Result<(), String> {
    for (field, d) in [
        ("recheck_interval", source.recheck_interval),
        ("max_unverified", source.max_unverified),
    ] {
        if d.is_some_and(|d| d.is_zero() || d > MAX_SETTING_DURATION) {
            return Err(format!(
                "permission_source.{field} must be between 1ms and 366 days"
            ));
        }
    }
    if source.recheck_interval.is_none() && source.max_unverified.is_some() {
        return Err("permission_source.max_unverified goes with recheck_interval".into());
    }
    match &source.service_credential {
        None if source.recheck_interval.is_some() => Err(
            "permission_source.recheck_interval needs a service_credential: a renewal has no \
             user token to ask the source with"
                .into(),
        ),
        Some(ServiceCredentialConfig::ClientCredentials {
            token_endpoint,
            client_id,
            ..
        }) => {
            if !(token_endpoint.starts_with("https://") || token_endpoint.starts_with("http://")) {
                return Err("service_credential.token_endpoint must be an http(s) URL".into());
            }
            if client_id.trim().is_empty() {
                return Err("service_credential.client_id is required".into());
            }
            Ok(())
        }
        Some(ServiceCredentialConfig::Header { name, .. }) => {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(format!("service_credential: {name:?} is not a header name"));
            }
            Ok(())
        }
        None => Ok(()),
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = Config::from_toml("", Path::new("x.toml")).unwrap();
        assert_eq!(c.listen.grpc.to_string(), DEFAULT_GRPC_LISTEN);
        assert_eq!(c.listen.http.to_string(), DEFAULT_HTTP_LISTEN);
        assert_eq!(c.access_token_ttl, DEFAULT_ACCESS_TOKEN_TTL);
        assert_eq!(c.refresh_grace, DEFAULT_REFRESH_GRACE);
        assert_eq!(c.store_path(), Path::new("./data/jobtoken.db"));
        c.validate().unwrap();
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = Config::from_toml("acces_token_ttl = \"1m\"", Path::new("c.toml")).unwrap_err();
        assert!(e.to_string().contains("acces_token_ttl"), "{e}");
        let e = Config::from_toml("[[modules]]\nid = \"m\"\nkey = \"x\"", Path::new("c.toml"))
            .unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    #[test]
    fn full_example_parses() {
        let c = Config::from_toml(
            r#"
            access_token_ttl = "2m"
            idle_timeout = "10m"
            lifetime_over_cap = "refuse"
            [listen]
            grpc = "0.0.0.0:6000"
            [store]
            sync = "full"
            [[modules]]
            id = "importer"
            key_sha256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
            delegable = ["inventory.*"]
            max_lifetime = "6h"
            [[trusted_issuers]]
            issuer = "https://idp"
            hs256_secret_file = "/run/secret"
            "#,
            Path::new("c.toml"),
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.access_token_ttl, Duration::from_secs(120));
        assert_eq!(c.lifetime_over_cap, OverCap::Refuse);
        assert_eq!(c.store.sync, SyncMode::Full);
        assert_eq!(c.modules[0].max_lifetime, Duration::from_secs(6 * 3600));
        assert_eq!(c.trusted_issuers[0].permissions_claim, "permissions");
    }

    #[test]
    fn identity_provider_entries_parse_and_bad_ones_are_refused() {
        // The issue's example, verbatim names.
        let c = Config::from_toml(
            r#"
            [[trusted_issuers]]
            issuer_pattern = "https://kc.example.org/realms/{tenant}"
            discovery = true
            subject_claim = "user_id"
            audiences = ["jobtoken"]
            jwks_refetch_interval = "10s"
            [trusted_issuers.permission_source]
            kind = "http"
            url = "https://gateway.example.org/permissions/users/{user_id}"
            pointer = "/permissions"
            headers = { "x-okapi-tenant" = "{tenant}" }
            token_header = "x-okapi-token"
            cache = "30s"
            timeout = "2s"
            "#,
            Path::new("c.toml"),
        )
        .unwrap();
        c.validate().unwrap();
        let i = &c.trusted_issuers[0];
        assert_eq!(i.name(), "https://kc.example.org/realms/{tenant}");
        assert_eq!(i.jwks_refetch_interval, Duration::from_secs(10));
        let p = i.permission_source.as_ref().unwrap();
        assert_eq!(p.kind, PermissionSourceKind::Http);
        assert_eq!(p.headers["x-okapi-tenant"], "{tenant}");

        let refused = |toml: &str, needle: &str| {
            let c = Config::from_toml(toml, Path::new("c.toml")).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{toml}: {e}");
        };
        refused(
            "[[trusted_issuers]]\nissuer_pattern = \"https://kc/realms/x{tenant}\"\ndiscovery = true",
            "whole path segment",
        );
        refused(
            "[[trusted_issuers]]\nissuer = \"https://kc\"\ndiscovery = true\njwks_uri = \"https://kc/certs\"",
            "exactly one",
        );
        refused(
            "[[trusted_issuers]]\nissuer = \"okapi\"\ntokens_without_iss = true\njwks_uri = \"https://kc/certs\"",
            "tokens_without_iss",
        );
        refused(
            "[[trusted_issuers]]\nissuer = \"https://kc\"\ndiscovery = true\ntenants = [\"a\"]",
            "tenants goes with issuer_pattern",
        );
        refused(
            "[[trusted_issuers]]\nissuer = \"https://kc\"\ndiscovery = true\n[trusted_issuers.permission_source]\nkind = \"http\"",
            "needs url",
        );
        refused(
            "[[trusted_issuers]]\ndiscovery = true",
            "set issuer or issuer_pattern",
        );
        // One key set for every realm: any realm's key would vouch for every tenant.
        refused(
            "[[trusted_issuers]]\nissuer_pattern = \"https://kc/realms/{tenant}\"\njwks_uri = \"https://kc/certs\"",
            "one key set for every realm",
        );
        refused(
            "[[trusted_issuers]]\nissuer_pattern = \"https://kc/realms/{tenant}\"\nhs256_secret_file = \"/run/s\"",
            "one key set for every realm",
        );
        refused(
            "[[trusted_issuers]]\nissuer = \"https://kc\"\ndiscovery = true\njwks_refetch_interval = \"0s\"",
            "at least 1s",
        );
    }

    #[test]
    fn env_overrides_win_and_bad_values_are_named() {
        let mut c = Config::from_toml("", Path::new("c.toml")).unwrap();
        c.apply_env(|k| match k {
            "JOBTOKEN_GRPC_LISTEN" => Some("127.0.0.1:7000".into()),
            "JOBTOKEN_ACCESS_TOKEN_TTL" => Some("90s".into()),
            "JOBTOKEN_STORE_MAX_CONNECTIONS" => Some("48".into()),
            "JOBTOKEN_STORE_SYNC" => Some("full".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.listen.grpc.port(), 7000);
        assert_eq!(c.access_token_ttl, Duration::from_secs(90));
        assert_eq!(c.store.max_connections, 48);
        assert_eq!(c.store.sync, SyncMode::Full);
        let e = c
            .apply_env(|k| (k == "JOBTOKEN_STORE_SYNC").then(|| "always".into()))
            .unwrap_err();
        assert!(e.to_string().contains("JOBTOKEN_STORE_SYNC"), "{e}");
        let e = c
            .apply_env(|k| (k == "JOBTOKEN_STORE_MAX_CONNECTIONS").then(|| "many".into()))
            .unwrap_err();
        assert!(
            e.to_string().contains("JOBTOKEN_STORE_MAX_CONNECTIONS"),
            "{e}"
        );
        let e = c
            .apply_env(|k| (k == "JOBTOKEN_IDLE_TIMEOUT").then(|| "soon".into()))
            .unwrap_err();
        assert!(e.to_string().contains("JOBTOKEN_IDLE_TIMEOUT"), "{e}");
    }

    #[test]
    fn inconsistent_settings_are_refused() {
        let mut c = Config::for_test(Path::new("/tmp"));
        c.idle_timeout = c.access_token_ttl;
        assert!(c.validate().is_err());
        let mut c = Config::for_test(Path::new("/tmp"));
        c.access_token_ttl = Duration::from_millis(500);
        assert!(c.validate().is_err());
        let mut c = Config::for_test(Path::new("/tmp"));
        c.modules.push(ModuleConfig::new("m", Some("short".into())));
        assert!(c.validate().is_err());
    }

    #[test]
    fn absurd_durations_and_shared_credentials_are_refused() {
        let mut c = Config::for_test(Path::new("/tmp"));
        c.idle_timeout = Duration::from_secs(u64::MAX / 4);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("idle_timeout")
        );
        let module = |id: &str| ModuleConfig::new(id, Some("ab".repeat(32)));
        let mut c = Config::for_test(Path::new("/tmp"));
        c.modules = vec![module("a"), module("b")];
        assert!(c.validate().unwrap_err().to_string().contains("shares"));
        c.modules[1].key_sha256 = Some("cd".repeat(32));
        c.validate().unwrap();
    }

    #[test]
    fn modules_that_could_never_work_are_refused() {
        let with_module = |extra: &str| {
            Config::from_toml(
                &format!("[[modules]]\nid = \"m\"\n{extra}"),
                Path::new("c.toml"),
            )
            .unwrap()
            .validate()
        };
        let key =
            "key_sha256 = \"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\"";
        for pattern in ["inventory*", "*.write", ""] {
            let e = with_module(&format!("{key}\ndelegable = [{pattern:?}]")).unwrap_err();
            assert!(
                e.to_string().contains(&format!("delegable {pattern:?}")),
                "{e}"
            );
        }
        with_module(&format!(
            "{key}\ndelegable = [\"*\", \"inventory.*\", \"users.read\"]"
        ))
        .unwrap();
        // mTLS only, and nothing checks client certificates.
        let e = with_module("mtls_subject = \"m.svc\"").unwrap_err();
        assert!(e.to_string().contains("client_ca_file"), "{e}");
        let mut c = Config::from_toml(
            "[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\nclient_ca_file = \"ca.pem\"\n\
             [[modules]]\nid = \"m\"\nmtls_subject = \"m.svc\"",
            Path::new("c.toml"),
        )
        .unwrap();
        c.validate().unwrap();
        c.tls.as_mut().unwrap().client_ca_file = None;
        assert!(c.validate().is_err());
    }
}
