//! The lease follows the user's standing, against a real OpenID provider (oidc-provider:
//! Keycloak-shaped realms, client credentials for the service's own token, back-channel
//! logout tokens) and a platform-shaped permission endpoint whose answers the tests
//! change: permissions withdrawn (policies `end` and `narrow`), the user disabled or
//! gone, the endpoint down (with and without a bound), and logouts (policies `end` and
//! `survive`). Each asserts what the job's `ended()` says and that a resource server
//! (the SDK's verifier, following the revocation stream) refuses within a second.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use token_sdk::proto::{
    GetLeaseRequest, GetLeaseResponse, IntrospectTokenRequest, IssueJobTokenRequest, OnLogout,
    RefreshJobTokenRequest,
};
use token_sdk::{Client, EndReason, Lease, LeaseState, Verifier};
use token_service::config::{
    BackchannelLogoutConfig, IssuerConfig, OnWithdrawn, PermissionSourceConfig,
    ServiceCredentialConfig,
};
use token_service::lease::OnLogout as Policy;
use tonic::Code;

use crate::identity::{Provider, RESOURCE, access_token, oidc_available};
use crate::support::{IMPORTER_KEY, OTHER_KEY, TestServer, http_client, reason};

/// What the platform says of one user.
#[derive(Clone)]
struct User {
    permissions: Vec<&'static str>,
    active: bool,
}

/// mod-roles-keycloak-shaped `GET /permissions/users/{userId}`, answering
/// `{"userId", "active", "permissions"}` from state the test changes; 404 for users it
/// does not know, 503 while down. Only calls with a Bearer JWT pass (the user's own at
/// grant, the service's client-credentials token at re-checks); it records which.
#[derive(Clone)]
struct Platform {
    addr: SocketAddr,
    users: Arc<Mutex<HashMap<String, User>>>,
    down: Arc<std::sync::atomic::AtomicBool>,
    bearers: Arc<Mutex<Vec<String>>>,
}

impl Platform {
    async fn start() -> Self {
        use axum::extract::Path as UrlPath;
        use axum::http::{HeaderMap, StatusCode};
        use std::sync::atomic::Ordering;

        let users = Arc::new(Mutex::new(HashMap::from([(
            "u-alice".to_owned(),
            User {
                permissions: vec!["inventory.read", "inventory.write"],
                active: true,
            },
        )])));
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let bearers = Arc::new(Mutex::new(Vec::new()));
        let (u, d, b) = (Arc::clone(&users), Arc::clone(&down), Arc::clone(&bearers));
        let app = axum::Router::new().route(
            "/permissions/users/{user_id}",
            axum::routing::get(move |UrlPath(id): UrlPath<String>, headers: HeaderMap| {
                let (u, d, b) = (Arc::clone(&u), Arc::clone(&d), Arc::clone(&b));
                async move {
                    if d.load(Ordering::SeqCst) {
                        return Err(StatusCode::SERVICE_UNAVAILABLE);
                    }
                    let bearer = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Bearer "))
                        .filter(|t| t.starts_with("ey"))
                        .ok_or(StatusCode::UNAUTHORIZED)?;
                    b.lock().unwrap().push(bearer.to_owned());
                    let user = u.lock().unwrap().get(&id).cloned();
                    let user = user.ok_or(StatusCode::NOT_FOUND)?;
                    Ok(axum::Json(serde_json::json!({
                        "userId": id, "active": user.active, "permissions": user.permissions,
                    })))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            addr,
            users,
            down,
            bearers,
        }
    }

    fn set(&self, user: &str, permissions: &[&'static str], active: bool) {
        self.users.lock().unwrap().insert(
            user.to_owned(),
            User {
                permissions: permissions.to_vec(),
                active,
            },
        );
    }
}

/// The provider's realm `diku`, its token endpoint for the service's credential, and the
/// platform; leases re-checked every second with `on_withdrawn`, ended after
/// `max_unverified` without an answer.
struct World {
    port: u16,
    provider: Provider,
    platform: Platform,
    _dir: tempfile::TempDir,
}

impl World {
    async fn start() -> Self {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let dir = tempfile::tempdir().unwrap();
        let provider = Provider::start(port, &dir.path().join("keys.json"), false).await;
        std::fs::write(
            dir.path().join("diku.secret"),
            "jobtoken-secret-0123456789abcdefghij\n",
        )
        .unwrap();
        Self {
            port,
            provider,
            platform: Platform::start().await,
            _dir: dir,
        }
    }

    fn issuer(&self, on_withdrawn: OnWithdrawn, max_unverified: Option<Duration>) -> IssuerConfig {
        let mut source = PermissionSourceConfig::http(&format!(
            "http://{}/permissions/users/{{user_id}}",
            self.platform.addr
        ));
        source.cache = Duration::ZERO;
        source.active_pointer = Some("/active".into());
        source.recheck_interval = Some(Duration::from_secs(1));
        source.on_withdrawn = on_withdrawn;
        source.max_unverified = max_unverified;
        source.service_credential = Some(ServiceCredentialConfig::ClientCredentials {
            token_endpoint: format!("http://127.0.0.1:{}/realms/{{tenant}}/token", self.port),
            client_id: "jobtoken".into(),
            client_secret_file: self._dir.path().join("{tenant}.secret"),
            scope: None,
        });
        IssuerConfig {
            issuer_pattern: Some(format!("http://127.0.0.1:{}/realms/{{tenant}}", self.port)),
            discovery: true,
            audiences: vec![RESOURCE.into()],
            subject_claim: "user_id".into(),
            permission_source: Some(source),
            backchannel_logout: Some(BackchannelLogoutConfig {
                client_id: "jobtoken".into(),
                max_age: Duration::from_secs(300),
            }),
            ..IssuerConfig::default()
        }
    }

    /// A server trusting the realms, with 2-second access tokens (renewals every second
    /// or so); the importer module's leases end at logout by default.
    async fn server(
        &self,
        on_withdrawn: OnWithdrawn,
        max_unverified: Option<Duration>,
    ) -> TestServer {
        let issuer = self.issuer(on_withdrawn, max_unverified);
        TestServer::start_with(|c| {
            c.access_token_ttl = Duration::from_secs(2);
            c.refresh_grace = Duration::from_secs(2);
            c.trusted_issuers.push(issuer);
            c.modules[0].on_logout.default = Policy::End;
        })
        .await
    }

    async fn alice(&self) -> String {
        access_token(self.port, "diku", "alice-app").await
    }

    /// A logout token the realm signs for client `aud`.
    async fn logout_token(&self, aud: &str, sub: Option<&str>, sid: Option<&str>) -> String {
        let mut url = format!("http://127.0.0.1:{}/logout-token/diku?aud={aud}", self.port);
        for (name, value) in [("sub", sub), ("sid", sid)] {
            if let Some(v) = value {
                url.push_str(&format!("&{name}={v}"));
            }
        }
        let answer = http_client().get(url).send().await.unwrap();
        assert_eq!(answer.status(), 200);
        answer.text().await.unwrap()
    }
}

async fn sdk(server: &TestServer) -> (Client, Verifier) {
    let client = Client::builder(server.endpoint())
        .module_key(IMPORTER_KEY)
        .connect()
        .await
        .unwrap();
    let verifier = client.verifier().build().await.unwrap();
    (client, verifier)
}

/// Alice's lease for `job`, held by the SDK.
async fn hold(world: &World, client: &Client, job: &str, permissions: &[&str]) -> Lease {
    client
        .lease(job, world.alice().await)
        .permissions(permissions.iter().map(|p| p.to_string()))
        .max_lifetime(Duration::from_secs(3600))
        .start()
        .await
        .unwrap()
}

/// The lease's story, as an operator reads it.
async fn lease_story(server: &TestServer, lease: &Lease) -> GetLeaseResponse {
    server
        .admin()
        .await
        .get_lease(GetLeaseRequest {
            lease_id: lease.info().lease_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// The job hears why its lease ended, and a resource server refuses its last token,
/// each within a second of `end` being caused (the wait for the next renewal aside).
async fn ends_with(lease: &Lease, verifier: &Verifier, reason: EndReason) {
    let token = lease.access_token().secret().to_owned();
    let end = tokio::time::timeout(Duration::from_secs(10), lease.ended())
        .await
        .expect("the lease ends at its next renewal");
    assert_eq!(end.reason, reason, "{end:?}");
    let token_now = lease.access_token().secret().to_owned();
    let refused = async {
        loop {
            let old = verifier.verify(&token).await.is_err();
            let last = verifier.verify(&token_now).await.is_err();
            if old && last {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(1), refused)
        .await
        .expect("the resource server refuses the lease's tokens within a second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawn_permissions_end_the_lease_or_narrow_it() {
    if !oidc_available() {
        return;
    }
    let world = World::start().await;

    // Policy `end`: the next re-check after the withdrawal ends the lease.
    let server = world.server(OnWithdrawn::End, None).await;
    let (client, verifier) = sdk(&server).await;
    let lease = hold(&world, &client, "import-end", &["inventory.write"]).await;
    assert_eq!(lease.info().permissions, ["inventory.write"]);
    // Renewals re-check (every second) and go on while nothing changes.
    let generation = lease.access_token().generation();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(lease.access_token().generation() > generation);
    assert_eq!(lease.state(), LeaseState::Active);
    // The grant asked with alice's token; the re-checks with the service's own token
    // from the provider, never hers.
    let bearers = world.platform.bearers.lock().unwrap().clone();
    assert!(bearers.len() >= 2, "{bearers:?}");
    assert!(
        bearers[1..].iter().all(|b| *b != bearers[0]),
        "re-checks use the service token"
    );
    world.platform.set("u-alice", &["inventory.read"], true);
    ends_with(&lease, &verifier, EndReason::PermissionsWithdrawn).await;
    let story = lease_story(&server, &lease).await;
    let ended = story.lease.unwrap();
    assert_eq!(ended.ended_by, "system");
    assert!(
        ended.end_detail.contains("inventory.write"),
        "{}",
        ended.end_detail
    );
    assert!(story.permissions_checked_at.is_some());
    server.stop().await;

    // Policy `narrow`: new tokens carry what remains, the story records it; with nothing
    // left, the lease ends.
    world
        .platform
        .set("u-alice", &["inventory.read", "inventory.write"], true);
    let server = world.server(OnWithdrawn::Narrow, None).await;
    let (client, verifier) = sdk(&server).await;
    let lease = hold(
        &world,
        &client,
        "import-narrow",
        &["inventory.read", "inventory.write"],
    )
    .await;
    let before = lease.access_token().secret().to_owned();
    world.platform.set("u-alice", &["inventory.read"], true);
    let narrowed = async {
        loop {
            let token = lease.access_token().secret().to_owned();
            if let Ok(claims) = verifier.verify(&token).await
                && claims.permissions == ["inventory.read"]
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), narrowed)
        .await
        .expect("a renewal narrows the lease's tokens");
    assert_eq!(lease.state(), LeaseState::Active);
    // The job sees what it may still do.
    assert_eq!(&*lease.permissions(), ["inventory.read"]);
    let story = lease_story(&server, &lease).await;
    assert_eq!(story.lease.unwrap().granted_permissions, ["inventory.read"]);
    // Introspection refuses a token minted before the narrowing at once.
    let introspected = server
        .client_with_key(IMPORTER_KEY)
        .await
        .introspect_token(IntrospectTokenRequest { token: before })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !introspected.active,
        "a token with a withdrawn permission is inactive"
    );
    let event = story.events.iter().find(|e| e.kind == "narrowed").unwrap();
    assert!(event.detail.contains("inventory.write"), "{}", event.detail);
    world.platform.set("u-alice", &[], true);
    ends_with(&lease, &verifier, EndReason::PermissionsWithdrawn).await;
    server.stop().await;
    world.provider.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_or_removed_user_ends_the_lease() {
    if !oidc_available() {
        return;
    }
    let world = World::start().await;
    let server = world.server(OnWithdrawn::Narrow, None).await;
    let (client, verifier) = sdk(&server).await;

    let lease = hold(&world, &client, "import-disabled", &["inventory.read"]).await;
    world
        .platform
        .set("u-alice", &["inventory.read", "inventory.write"], false);
    ends_with(&lease, &verifier, EndReason::SubjectDisabled).await;
    // A disabled user gets no new lease either.
    let refused = client
        .lease("import-again", world.alice().await)
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(refused, token_sdk::Error::Rejected(ref s) if reason(s) == "SUBJECT_TOKEN_INVALID"),
        "{refused:?}"
    );

    world
        .platform
        .set("u-alice", &["inventory.read", "inventory.write"], true);
    let lease = hold(&world, &client, "import-removed", &["inventory.read"]).await;
    world.platform.users.lock().unwrap().remove("u-alice");
    ends_with(&lease, &verifier, EndReason::SubjectDisabled).await;
    server.stop().await;
    world.provider.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_the_permission_source_never_ends_jobs_unless_bounded() {
    use std::sync::atomic::Ordering;
    if !oidc_available() {
        return;
    }
    let world = World::start().await;

    // No bound: renewals go on with the current grant while the source is down.
    let server = world.server(OnWithdrawn::End, None).await;
    let (client, _verifier) = sdk(&server).await;
    let lease = hold(&world, &client, "import-outage", &["inventory.read"]).await;
    world.platform.down.store(true, Ordering::SeqCst);
    let generation = lease.access_token().generation();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        lease.access_token().generation() >= generation + 2,
        "renewals go on during the outage"
    );
    assert_eq!(lease.state(), LeaseState::Active);
    let (_, metrics) = crate::support::http_get(server.http_addr(), "/metrics").await;
    assert!(
        metrics.contains("jobtoken_permission_rechecks_total{issuer=")
            && metrics.contains("result=\"unverified\""),
        "the staleness is measured"
    );
    assert!(metrics.contains("jobtoken_permission_unverified_seconds_bucket"));
    world.platform.down.store(false, Ordering::SeqCst);
    lease.release(token_sdk::Outcome::Succeeded).await.unwrap();
    server.stop().await;

    // A 3-second bound: the lease ends once its permissions went unconfirmed that long.
    let server = world
        .server(OnWithdrawn::End, Some(Duration::from_secs(3)))
        .await;
    let (client, verifier) = sdk(&server).await;
    let lease = hold(&world, &client, "import-bounded", &["inventory.read"]).await;
    world.platform.down.store(true, Ordering::SeqCst);
    ends_with(&lease, &verifier, EndReason::PermissionsUnverifiable).await;
    server.stop().await;
    world.provider.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_channel_logout_ends_the_leases_that_asked_for_it() {
    if !oidc_available() {
        return;
    }
    let world = World::start().await;
    let server = world.server(OnWithdrawn::End, None).await;
    let (client, verifier) = sdk(&server).await;
    let logout_url = format!("http://{}/backchannel-logout", server.http_addr());
    let post = |token: String| {
        let url = logout_url.clone();
        async move {
            http_client()
                .post(url)
                .form(&[("logout_token", token)])
                .send()
                .await
                .unwrap()
        }
    };

    // The importer's leases end at logout (its configured default); the other module's
    // survive (the default policy), and it may not be forced to `end` by mistake: it
    // asks explicitly.
    let ends = hold(&world, &client, "import-logout", &["inventory.read"]).await;
    assert_eq!(ends.state(), LeaseState::Active);
    let mut other = server.client_with_key(OTHER_KEY).await;
    let survives = other
        .issue_job_token(IssueJobTokenRequest {
            subject_token: world.alice().await,
            job_id: "report".into(),
            permissions: vec!["inventory.read".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        survives.lease.as_ref().unwrap().on_logout,
        OnLogout::Survive as i32
    );
    let explicit = other
        .issue_job_token(IssueJobTokenRequest {
            subject_token: world.alice().await,
            job_id: "report-ends".into(),
            permissions: vec!["inventory.read".into()],
            on_logout: OnLogout::End as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    // Tokens that must be refused: another client's, altered, without the form field.
    let for_bob = world
        .logout_token("bob-app", Some("alice-app"), Some("s-alice-1"))
        .await;
    assert_eq!(
        post(for_bob).await.status(),
        400,
        "aud is not our client id"
    );
    let good = world
        .logout_token("jobtoken", Some("alice-app"), Some("s-alice-1"))
        .await;
    // One character inside the signature (the last one may differ only in padding bits).
    let mut altered = good.clone().into_bytes();
    let inside = altered.len() - 10;
    altered[inside] = if altered[inside] == b'A' { b'B' } else { b'A' };
    let answer = post(String::from_utf8(altered).unwrap()).await;
    assert_eq!(answer.status(), 400);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");
    let bare = http_client()
        .post(&logout_url)
        .form(&[("token", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(bare.status(), 400);
    assert_eq!(ends.state(), LeaseState::Active);

    // The session's logout: policy `end` ends, `survive` renews on.
    let answer = post(good.clone()).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.headers()["cache-control"].to_str().unwrap(),
        "no-store"
    );
    ends_with(&ends, &verifier, EndReason::SubjectLoggedOut).await;
    let refreshed = other
        .refresh_job_token(RefreshJobTokenRequest {
            lease_id: survives.lease.as_ref().unwrap().lease_id.clone(),
            refresh_token: survives.tokens.as_ref().unwrap().refresh_token.clone(),
        })
        .await
        .unwrap();
    assert_eq!(refreshed.into_inner().lease.unwrap().state, 1, "active");
    let ended = other
        .refresh_job_token(RefreshJobTokenRequest {
            lease_id: explicit.lease.as_ref().unwrap().lease_id.clone(),
            refresh_token: explicit.tokens.as_ref().unwrap().refresh_token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(ended.code(), Code::FailedPrecondition);
    assert_eq!(reason(&ended), "SUBJECT_LOGGED_OUT");
    // The same token again is a replay.
    assert_eq!(post(good).await.status(), 400);

    // A logout naming only the user ends the user's leases from any session.
    let again = hold(&world, &client, "import-user-logout", &["inventory.read"]).await;
    let by_user = world
        .logout_token("jobtoken", Some("alice-app"), None)
        .await;
    assert_eq!(post(by_user).await.status(), 200);
    ends_with(&again, &verifier, EndReason::SubjectLoggedOut).await;
    // A lease granted after a logout token was issued is not its concern, even when the
    // token arrives later; a second delivery is a replay.
    let earlier = world
        .logout_token("jobtoken", Some("alice-app"), None)
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let later = hold(&world, &client, "import-after-logout", &["inventory.read"]).await;
    assert_eq!(post(earlier.clone()).await.status(), 200);
    assert_eq!(post(earlier).await.status(), 400, "a replay");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(later.state(), LeaseState::Active);

    // `end` cannot be asked of an issuer whose logouts are not received.
    let refused = other
        .issue_job_token(IssueJobTokenRequest {
            subject_token: server.user_token(&["inventory.read"]),
            job_id: "dev-job".into(),
            on_logout: OnLogout::End as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert_eq!(reason(&refused), "LOGOUT_POLICY_NOT_ALLOWED");
    server.stop().await;
    world.provider.stop().await;
}
