//! A real identity provider: oidc-provider (OpenID certified, from npm) serves one realm per
//! tenant, Keycloak-shaped, and a platform-shaped permission endpoint (mod-roles-keycloak's
//! `GET /permissions/users/{userId}`) serves the users' permissions. The service trusts
//! the realms with the README's Eureka example: one `issuer_pattern`, discovery,
//! `subject_claim = "user_id"` and an HTTP permission source; the provider then restarts
//! with a rotated key, and tokens of the new key are granted without restarting the
//! service.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use token_sdk::proto::{IssueJobTokenRequest, IssueJobTokenResponse};
use token_service::config::{Config, IssuerConfig, PermissionSourceKind};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::Code;

use crate::support::{OTHER_KEY, TestServer, http_client, http_text, reason};

pub(crate) const RESOURCE: &str = "https://jobtoken.example.org";
pub(crate) const CLIENTS: &str = r#"{
    "alice-app": {"secret": "alice-secret-0123456789abcdefghij", "user_id": "u-alice", "sid": "s-alice-1"},
    "jobtoken": {"secret": "jobtoken-secret-0123456789abcdefghij"},
    "bob-app": {"secret": "bob-secret-0123456789abcdefghijklm", "user_id": "u-bob"},
    "ghost-app": {"secret": "ghost-secret-0123456789abcdefghijk", "user_id": "u-ghost"}
}"#;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The TOML examples of the README's "Connecting your identity provider" section.
fn readme_examples() -> Vec<String> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let start = readme
        .find("## Connecting your identity provider")
        .expect("the README has the section");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    section
        .split("```toml\n")
        .skip(1)
        .map(|block| block.split("```").next().unwrap().to_owned())
        .collect()
}

/// Parses and validates one example as a whole config file.
fn example_config(toml: &str) -> Config {
    let config = Config::from_toml(toml, Path::new("README.md")).unwrap();
    config.validate().unwrap();
    config
}

#[test]
fn the_readme_examples_are_valid_configs() {
    let examples = readme_examples();
    assert_eq!(examples.len(), 3, "Eureka, Okapi, plain JWKS");
    let eureka = &example_config(&examples[0]).trusted_issuers[0];
    assert!(eureka.issuer_pattern.is_some() && eureka.discovery);
    assert_eq!(eureka.subject_claim, "user_id");
    let okapi = &example_config(&examples[1]).trusted_issuers[0];
    assert!(okapi.tokens_without_iss);
    let source = okapi.permission_source.as_ref().unwrap();
    assert_eq!(source.kind, PermissionSourceKind::Http);
    assert_eq!(source.pointer, "/permissionNames");
    assert_eq!(source.token_header.as_deref(), Some("x-okapi-token"));
    let plain = &example_config(&examples[2]).trusted_issuers[0];
    assert!(plain.jwks_uri.is_some() && plain.permission_source.is_none());
}

/// Set to `1` (as `.ci/run` does) to make a missing OpenID provider a failure.
const REQUIRE_OIDC_VAR: &str = "JOBTOKEN_TEST_REQUIRE_OIDC";

/// Whether the real OpenID provider can run here (`npm install` done, `node` on the
/// PATH). Without it the tests that need it skip, and one line says so, like the
/// PostgreSQL legs; with `JOBTOKEN_TEST_REQUIRE_OIDC=1` they fail instead.
pub(crate) fn oidc_available() -> bool {
    use std::io::Write as _;
    let installed = repo_root().join("node_modules/oidc-provider").is_dir();
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if installed && node {
        return true;
    }
    let why = if node {
        "node_modules/oidc-provider is missing: run `npm install` at the repository root"
    } else {
        "`node` is not on the PATH"
    };
    if std::env::var(REQUIRE_OIDC_VAR).as_deref() == Ok("1") {
        panic!("{REQUIRE_OIDC_VAR}=1 but the OpenID provider cannot run: {why}");
    }
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        let _ = writeln!(
            std::io::stderr(),
            "skipping the OpenID provider tests: {why}"
        );
    });
    false
}

/// The provider as a child process on `port`, killed when dropped.
pub(crate) struct Provider {
    child: Child,
}

impl Provider {
    pub(crate) async fn start(port: u16, keys_file: &Path, rotate: bool) -> Self {
        Self::start_with(port, keys_file, rotate, None).await
    }

    /// With `tls` (certificate and key PEM files), over HTTPS.
    async fn start_with(
        port: u16,
        keys_file: &Path,
        rotate: bool,
        tls: Option<(&Path, &Path)>,
    ) -> Self {
        let root = repo_root();
        assert!(
            root.join("node_modules/oidc-provider").is_dir(),
            "node_modules/oidc-provider is missing: run `npm install` at the repository root \
             (CI does, see .ci/run); this test needs a real OpenID provider"
        );
        let mut child = Command::new("node")
            .arg(root.join("integration-tests/oidc/provider.mjs"))
            .current_dir(&root)
            .env("PORT", port.to_string())
            .env("TENANTS", "diku,college")
            .env("KEYS_FILE", keys_file)
            .env("ROTATE", if rotate { "1" } else { "0" })
            .env("CLIENTS", CLIENTS)
            .env("RESOURCE", RESOURCE)
            .envs(
                tls.map(|(cert, key)| [("TLS_CERT", cert), ("TLS_KEY", key)])
                    .into_iter()
                    .flatten(),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("node must be installed to run the OpenID provider");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.starts_with("ready ") {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(ready, Ok(true), "the OpenID provider did not start");
        Self { child }
    }

    pub(crate) async fn stop(mut self) {
        self.child.kill().await.unwrap();
    }
}

/// An access token of `client` from the realm of `tenant`: client credentials with a
/// resource indicator, which oidc-provider answers with a JWT (RFC 9068).
pub(crate) async fn access_token(port: u16, tenant: &str, client: &str) -> String {
    access_token_from(&http_client(), "http", port, tenant, client).await
}

async fn access_token_from(
    http: &reqwest::Client,
    scheme: &str,
    port: u16,
    tenant: &str,
    client: &str,
) -> String {
    let clients: serde_json::Value = serde_json::from_str(CLIENTS).unwrap();
    let secret = clients[client]["secret"].as_str().unwrap();
    let response = http
        .post(format!("{scheme}://127.0.0.1:{port}/realms/{tenant}/token"))
        .basic_auth(client, Some(secret))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "grant_type=client_credentials&scope=api&resource={}",
            RESOURCE.replace(':', "%3A").replace('/', "%2F")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

/// The kid a token was signed with.
fn kid(token: &str) -> String {
    use base64::Engine as _;
    let header = token.split('.').next().unwrap();
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .unwrap();
    let header: serde_json::Value = serde_json::from_slice(&header).unwrap();
    header["kid"].as_str().unwrap().to_owned()
}

/// mod-roles-keycloak's `GET /permissions/users/{userId}`, shaped like the platform's:
/// `{"userId": …, "permissions": […]}`; 404 for a user it does not know; 503 while down.
/// It checks that the user's own token comes with the call.
struct Platform {
    addr: std::net::SocketAddr,
    calls: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
}

async fn platform() -> Platform {
    use axum::extract::Path as UrlPath;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::get;

    let calls = Arc::new(AtomicUsize::new(0));
    let down = Arc::new(AtomicBool::new(false));
    let (c, d) = (Arc::clone(&calls), Arc::clone(&down));
    let app = axum::Router::new().route(
        "/permissions/users/{user_id}",
        get(move |UrlPath(user): UrlPath<String>, headers: HeaderMap| {
            let (c, d) = (Arc::clone(&c), Arc::clone(&d));
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                if d.load(Ordering::SeqCst) {
                    return Err(StatusCode::SERVICE_UNAVAILABLE);
                }
                let bearer = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("Bearer ey"));
                if !bearer {
                    return Err(StatusCode::UNAUTHORIZED);
                }
                let permissions = match user.as_str() {
                    "u-alice" => vec!["inventory.read", "inventory.write", "users.read"],
                    "u-bob" => vec!["inventory.read"],
                    _ => return Err(StatusCode::NOT_FOUND),
                };
                Ok(axum::Json(
                    serde_json::json!({"userId": user, "permissions": permissions}),
                ))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Platform { addr, calls, down }
}

async fn grant(
    server: &TestServer,
    token: String,
    job: &str,
    permissions: &[&str],
) -> Result<IssueJobTokenResponse, tonic::Status> {
    server
        .client_with_key(OTHER_KEY)
        .await
        .issue_job_token(IssueJobTokenRequest {
            subject_token: token,
            job_id: job.into(),
            permissions: permissions.iter().map(|p| p.to_string()).collect(),
            max_lifetime: None,
            audience: String::new(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn eureka_realms_discovery_platform_permissions_and_key_rotation() {
    if !oidc_available() {
        return;
    }
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("provider-keys.json");
    let provider = Provider::start(port, &keys_file, false).await;
    let platform = platform().await;

    // The README's Eureka example, with local addresses (and a refetch interval short
    // enough for the test).
    let toml = readme_examples()[0]
        .replace(
            "https://keycloak.example.org",
            &format!("http://127.0.0.1:{port}"),
        )
        .replace(
            "https://kong.example.org",
            &format!("http://{}", platform.addr),
        )
        .replace(
            "jwks_refetch_interval = \"10s\"",
            "jwks_refetch_interval = \"1s\"",
        );
    let eureka: IssuerConfig = example_config(&toml).trusted_issuers.remove(0);
    assert_eq!(eureka.jwks_refetch_interval, Duration::from_secs(1));
    let server = TestServer::start_with(|c| c.trusted_issuers.push(eureka)).await;

    // A grant from realm diku: tenant from iss, user from user_id, permissions from the
    // platform (the token carries none).
    let alice = access_token(port, "diku", "alice-app").await;
    let issued = grant(&server, alice.clone(), "import-1", &["inventory.write"])
        .await
        .unwrap();
    let lease = issued.lease.unwrap();
    assert_eq!(lease.tenant, "diku");
    assert_eq!(lease.subject, "u-alice");
    assert_eq!(lease.granted_permissions, ["inventory.write"]);
    assert_eq!(platform.calls.load(Ordering::SeqCst), 1);
    // Everything the user holds that the module may delegate; the answer is cached.
    let all = grant(&server, alice.clone(), "import-2", &[])
        .await
        .unwrap();
    assert_eq!(
        all.lease.unwrap().granted_permissions,
        ["inventory.read", "inventory.write", "users.read"]
    );
    assert_eq!(platform.calls.load(Ordering::SeqCst), 1);
    // A permission the platform does not give the user is refused by name.
    let bob = access_token(port, "diku", "bob-app").await;
    let refused = grant(&server, bob, "import-3", &["users.read"])
        .await
        .unwrap_err();
    assert_eq!(reason(&refused), "PERMISSION_NOT_HELD");

    // Another realm is another tenant, through the same entry.
    let college = access_token(port, "college", "alice-app").await;
    let issued = grant(&server, college, "import-1", &["inventory.read"])
        .await
        .unwrap();
    assert_eq!(issued.lease.unwrap().tenant, "college");

    // A user the platform does not know: SUBJECT_TOKEN_INVALID, saying so.
    let ghost = access_token(port, "diku", "ghost-app").await;
    let unknown = grant(&server, ghost, "import-4", &[]).await.unwrap_err();
    assert_eq!(unknown.code(), Code::Unauthenticated);
    assert_eq!(reason(&unknown), "SUBJECT_TOKEN_INVALID");
    assert!(
        unknown.message().contains("does not know user"),
        "{unknown:?}"
    );

    // The platform down: a transient UNAVAILABLE the caller retries.
    platform.down.store(true, Ordering::SeqCst);
    let bob = access_token(port, "college", "bob-app").await;
    let down = grant(&server, bob.clone(), "import-5", &[])
        .await
        .unwrap_err();
    assert_eq!(down.code(), Code::Unavailable);
    assert_eq!(reason(&down), "PERMISSION_SOURCE_UNAVAILABLE");
    assert!(token_sdk::is_transient(&down));
    platform.down.store(false, Ordering::SeqCst);
    grant(&server, bob, "import-5", &[]).await.unwrap();

    // Keycloak-style rotation: the provider restarts with a new active key (the old one
    // stays, passive). Our service keeps running and picks the new key up on first sight
    // of its kid.
    let old_kid = kid(&alice);
    provider.stop().await;
    let provider = Provider::start(port, &keys_file, true).await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // past jwks_refetch_interval
    let rotated = access_token(port, "diku", "alice-app").await;
    assert_ne!(
        kid(&rotated),
        old_kid,
        "the provider signs with the new key"
    );
    let issued = grant(&server, rotated, "import-6", &["inventory.read"])
        .await
        .unwrap();
    assert_eq!(issued.lease.unwrap().subject, "u-alice");
    // A token of the old, now passive, key still verifies.
    grant(&server, alice, "import-7", &["inventory.read"])
        .await
        .unwrap();

    // The issuer's state is visible in the metrics.
    let metrics = http_text(&format!("http://{}/metrics", server.http_addr())).await;
    let entry = format!("issuer=\"http://127.0.0.1:{port}/realms/{{tenant}}\"");
    for line in [
        format!("jobtoken_issuer_key_fetches_total{{{entry},result=\"ok\"}} 3"),
        format!("jobtoken_permission_source_lookups_total{{{entry},result=\"unavailable\"}} 1"),
        format!("jobtoken_permission_source_lookups_total{{{entry},result=\"unknown_user\"}} 1"),
    ] {
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }

    provider.stop().await;
    server.stop().await;
}

/// The provider over HTTPS with a certificate from a private CA: trusted through
/// `idp_ca_file`, and not without it (the Mozilla roots don't know that CA).
#[tokio::test]
async fn an_identity_provider_behind_a_private_ca() {
    if !oidc_available() {
        return;
    }
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "idp test CA");
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let (ca_file, cert, key) = (
        write("ca.pem", &ca_pem),
        write("idp.pem", &leaf.pem()),
        write("idp.key", &key.serialize_pem()),
    );
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let provider = Provider::start_with(
        port,
        &dir.path().join("keys.json"),
        false,
        Some((&cert, &key)),
    )
    .await;
    let platform = platform().await;
    let entry = IssuerConfig {
        issuer_pattern: Some(format!("https://127.0.0.1:{port}/realms/{{tenant}}")),
        discovery: true,
        subject_claim: "user_id".into(),
        permission_source: Some(token_service::config::PermissionSourceConfig::http(
            &format!("http://{}/permissions/users/{{user_id}}", platform.addr),
        )),
        ..IssuerConfig::default()
    };
    let trusting = entry.clone();
    let ca = ca_file.clone();
    let server = TestServer::start_with(move |c| {
        c.idp_ca_file = Some(ca);
        c.trusted_issuers.push(trusting);
    })
    .await;
    let stranger = TestServer::start_with(move |c| c.trusted_issuers.push(entry)).await;

    let http = reqwest::Client::builder()
        .use_preconfigured_tls(token_service::idp::tls_config(Some(&ca_file)).unwrap())
        .build()
        .unwrap();
    let token = access_token_from(&http, "https", port, "diku", "alice-app").await;
    let issued = grant(&server, token.clone(), "import-1", &["inventory.read"])
        .await
        .unwrap();
    assert_eq!(issued.lease.unwrap().tenant, "diku");
    // Without the CA the keys cannot be fetched: a retryable UNAVAILABLE.
    let refused = grant(&stranger, token, "import-1", &["inventory.read"])
        .await
        .unwrap_err();
    assert_eq!(reason(&refused), "ISSUER_UNAVAILABLE");
    assert_eq!(refused.code(), Code::Unavailable);

    provider.stop().await;
    server.stop().await;
    stranger.stop().await;
}
