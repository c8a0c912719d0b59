//! Domain tests: real SQLite (in memory), real signatures, a manual clock.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::auth::Module;
use crate::clock::{Clock, ManualClock, to_unix_secs};
use crate::config::OverCap;
use crate::dev::{DEV_ISSUER, dev_issuer_config, sign_with_dev_issuer};
use crate::error::{Error, Result};
use crate::keys::KeyRing;
use crate::lease::{EndReason, EventKind, Lease};
use crate::metrics::Metrics;
use crate::secrets::MasterKey;
use crate::service::revocations::{Next, Revocations, Start};
use crate::service::*;
use crate::settings::Settings;
use crate::store::LeaseFilter;
use crate::store::SqliteStore;
use crate::subject::SubjectVerifier;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

const TTL: Duration = Duration::from_secs(300);
const GRACE: Duration = Duration::from_secs(30);
const IDLE: Duration = Duration::from_secs(900);
const KEY_ACTIVATION: Duration = Duration::from_secs(90);

struct Harness {
    svc: Arc<LeaseService>,
    store: Arc<dyn crate::store::Store>,
    clock: ManualClock,
    dir: tempfile::TempDir,
    importer: Module,
    other: Module,
    /// Dropped last: the PostgreSQL schema goes once the store is done with it.
    _schema: Option<crate::testing::TestSchema>,
}

fn module(id: &str, delegable: &[&str]) -> Module {
    Module {
        id: id.into(),
        delegable: delegable.iter().map(|s| s.to_string()).collect(),
        max_lifetime: Duration::from_secs(6 * 3600),
        default_lifetime: Duration::from_secs(3600),
        tenants: None,
        audiences: vec!["platform".into()],
        on_logout: Default::default(),
    }
}

/// Which store a test runs against: every domain test runs on both (the store
/// conformance suite).
#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// The PostgreSQL server for tests (`on_both_stores!` skips the PostgreSQL legs when it
/// is not set).
pub(crate) fn test_postgres_url() -> String {
    crate::testing::postgres_url()
        .unwrap_or_else(|| panic!("{} is not set", crate::testing::POSTGRES_URL_VAR))
}

/// A store for one test; for PostgreSQL, with the schema that is dropped after it.
async fn open_store(
    backend: Backend,
) -> (
    Arc<dyn crate::store::Store>,
    Option<crate::testing::TestSchema>,
) {
    match backend {
        Backend::Sqlite => (Arc::new(SqliteStore::temporary().unwrap()), None),
        Backend::Postgres => {
            // A schema of its own, so test runs never collide.
            let url = test_postgres_url();
            let schema = crate::testing::TestSchema::new(&url, "jt_test");
            let options = crate::store::postgres::PostgresOptions {
                url,
                schema: schema.name().to_owned(),
                max_connections: 8,
                statement_timeout: Duration::from_secs(10),
                ca_file: None,
            };
            let store = crate::store::PostgresStore::connect(&options)
                .await
                .unwrap();
            (Arc::new(store), Some(schema))
        }
    }
}

async fn harness_with(backend: Backend, over_cap: OverCap) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::at_fixed_instant();
    let (store, schema) = open_store(backend).await;
    let master = MasterKey::from_bytes(&[9u8; 32]);
    let keys = Arc::new(
        KeyRing::load(
            Arc::clone(&store),
            master.clone(),
            TTL + GRACE,
            KEY_ACTIVATION,
            clock.now(),
        )
        .await
        .unwrap(),
    );
    let subjects =
        SubjectVerifier::from_config(&[dev_issuer_config(dir.path())]).unwrap_or_else(|_| {
            crate::dev::ensure_issuer_key(dir.path()).unwrap();
            SubjectVerifier::from_config(&[dev_issuer_config(dir.path())]).unwrap()
        });
    let settings = Settings {
        issuer: "jobtoken".into(),
        default_audience: "platform".into(),
        access_token_ttl: TTL,
        idle_timeout: IDLE,
        refresh_grace: GRACE,
        over_cap,
    };
    let svc = Arc::new(LeaseService::new(
        Arc::clone(&store),
        keys,
        master,
        Arc::new(subjects),
        Arc::new(clock.clone()),
        settings,
        Arc::new(Metrics::new()),
    ));
    Harness {
        svc,
        store,
        clock,
        dir,
        importer: module("importer", &["inventory.*", "users.read"]),
        other: module("other", &["*"]),
        _schema: schema,
    }
}

async fn harness(backend: Backend) -> Harness {
    harness_with(backend, OverCap::Clamp).await
}

impl Harness {
    fn claims(&self, perms: &[&str]) -> serde_json::Value {
        let now = to_unix_secs(self.clock.now());
        json!({
            "iss": DEV_ISSUER, "sub": "alice", "tenant": "acme",
            "permissions": perms, "iat": now, "nbf": now, "exp": now + 600,
        })
    }

    fn sign(&self, claims: &serde_json::Value) -> String {
        sign_with_dev_issuer(self.dir.path(), claims).unwrap()
    }

    fn user_token(&self) -> String {
        self.sign(&self.claims(&[
            "inventory.read",
            "inventory.write",
            "users.read",
            "billing.pay",
        ]))
    }

    fn request(&self, job: &str, perms: &[&str]) -> IssueRequest {
        IssueRequest {
            subject_token: self.user_token(),
            job_id: job.into(),
            permissions: perms.iter().map(|s| s.to_string()).collect(),
            max_lifetime: Some(Duration::from_secs(3600)),
            audience: None,
            on_logout: None,
        }
    }

    async fn issue(&self, job: &str) -> Issued {
        self.svc
            .issue(&self.importer, self.request(job, &["inventory.read"]))
            .await
            .unwrap()
    }

    async fn refresh(&self, lease: &str, token: &str) -> Result<(Lease, TokenPair)> {
        self.svc.refresh(&self.importer, lease, token).await
    }

    fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }
}

fn rt(t: &TokenPair) -> String {
    t.refresh_token.expose().to_owned()
}

async fn grant_is_requested_intersect_user_intersect_delegable(backend: Backend) {
    let h = harness(backend).await;
    let issued = h
        .svc
        .issue(
            &h.importer,
            h.request("job-1", &["inventory.read", "users.read"]),
        )
        .await
        .unwrap();
    assert_eq!(
        issued.lease.permissions,
        vec!["inventory.read", "users.read"]
    );
    assert_eq!(issued.lease.subject, "alice");
    assert_eq!(issued.lease.tenant, "acme");
    assert_eq!(issued.lease.actor, "importer");

    // Empty request: everything the user holds that the module may delegate.
    let all = h
        .svc
        .issue(&h.importer, h.request("job-2", &[]))
        .await
        .unwrap();
    assert_eq!(
        all.lease.permissions,
        vec!["inventory.read", "inventory.write", "users.read"]
    );

    // Escalation attempts are refused by name, never silently dropped.
    let e = h
        .svc
        .issue(
            &h.importer,
            h.request("job-3", &["inventory.read", "inventory.delete"]),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::PermissionNotHeld(n) if n == &["inventory.delete"]),
        "{e:?}"
    );
    let e = h
        .svc
        .issue(&h.importer, h.request("job-3", &["billing.pay"]))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::PermissionNotDelegable(n) if n == &["billing.pay"]),
        "{e:?}"
    );
}

async fn lifetime_over_the_cap_is_clamped_and_said_or_refused(backend: Backend) {
    let h = harness(backend).await;
    let mut req = h.request("job-1", &["inventory.read"]);
    req.max_lifetime = Some(Duration::from_secs(48 * 3600));
    let issued = h.svc.issue(&h.importer, req.clone()).await.unwrap();
    assert!(issued.clamped);
    assert_eq!(issued.granted_lifetime, h.importer.max_lifetime);
    assert_eq!(
        issued.lease.expires_at,
        h.clock.now() + h.importer.max_lifetime
    );

    let strict = harness_with(backend, OverCap::Refuse).await;
    let mut req = strict.request("job-1", &["inventory.read"]);
    req.max_lifetime = Some(Duration::from_secs(48 * 3600));
    let e = strict.svc.issue(&strict.importer, req).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::LifetimeExceedsCap {
                cap_secs: 21600,
                ..
            }
        ),
        "{e:?}"
    );

    let mut req = h.request("job-2", &["inventory.read"]);
    req.max_lifetime = None;
    let issued = h.svc.issue(&h.importer, req).await.unwrap();
    assert!(!issued.clamped);
    assert_eq!(issued.granted_lifetime, h.importer.default_lifetime);
}

async fn malformed_input_is_invalid_argument(backend: Backend) {
    let h = harness(backend).await;
    let cases: Vec<(&str, IssueRequest)> = vec![
        (
            "job_id",
            IssueRequest {
                job_id: String::new(),
                ..h.request("x", &[])
            },
        ),
        (
            "job_id",
            IssueRequest {
                job_id: "a\u{0}b".into(),
                ..h.request("x", &[])
            },
        ),
        (
            "job_id",
            IssueRequest {
                job_id: "j".repeat(5000),
                ..h.request("x", &[])
            },
        ),
        (
            "max_lifetime",
            IssueRequest {
                max_lifetime: Some(Duration::ZERO),
                ..h.request("x", &[])
            },
        ),
        (
            "max_lifetime",
            IssueRequest {
                max_lifetime: Some(Duration::from_secs(u64::MAX / 2)),
                ..h.request("x", &[])
            },
        ),
        (
            "subject_token",
            IssueRequest {
                subject_token: String::new(),
                ..h.request("x", &[])
            },
        ),
        (
            "subject_token",
            IssueRequest {
                subject_token: "x".repeat(100_000),
                ..h.request("x", &[])
            },
        ),
        ("permissions", h.request("x", &["inventory.*"])),
    ];
    for (field, req) in cases {
        match h.svc.issue(&h.importer, req).await {
            Err(Error::InvalidArgument { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    let many: Vec<String> = (0..5000).map(|i| format!("p{i}")).collect();
    let req = IssueRequest {
        permissions: many,
        ..h.request("x", &[])
    };
    assert!(matches!(
        h.svc.issue(&h.importer, req).await,
        Err(Error::InvalidArgument { .. })
    ));
    for bad in [
        "",
        "garbage",
        "jrt1.0.short",
        "jrt1.-1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ] {
        let issued = h.issue(&format!("job-{}", bad.len())).await;
        let e = h.refresh(&issued.lease.id, bad).await.unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidArgument { .. } | Error::RefreshTokenInvalid
            ),
            "{bad}: {e:?}"
        );
    }
}

async fn subject_tokens_are_verified_strictly(backend: Backend) {
    let h = harness(backend).await;
    let now = to_unix_secs(h.clock.now());
    let issue = |token: String| {
        let req = IssueRequest {
            subject_token: token,
            ..h.request("job", &["inventory.read"])
        };
        let svc = Arc::clone(&h.svc);
        let m = h.importer.clone();
        async move { svc.issue(&m, req).await }
    };
    let mut expired = h.claims(&["inventory.read"]);
    expired["exp"] = json!(now - 31);
    assert!(matches!(
        issue(h.sign(&expired)).await,
        Err(Error::SubjectTokenExpired)
    ));
    // Within the 30 s leeway it still passes.
    let mut barely = h.claims(&["inventory.read"]);
    barely["exp"] = json!(now - 10);
    let ok = issue(h.sign(&barely)).await.unwrap();
    h.svc
        .release(&h.importer, &ok.lease.id, "succeeded", "")
        .await
        .unwrap();

    let mut early = h.claims(&["inventory.read"]);
    early["nbf"] = json!(now + 120);
    assert!(matches!(
        issue(h.sign(&early)).await,
        Err(Error::SubjectTokenNotYetValid)
    ));

    let mut foreign = h.claims(&["inventory.read"]);
    foreign["iss"] = json!("https://evil.example");
    assert!(
        matches!(issue(h.sign(&foreign)).await, Err(Error::UntrustedIssuer(i)) if i == "https://evil.example")
    );

    let mut no_tenant = h.claims(&["inventory.read"]);
    no_tenant.as_object_mut().unwrap().remove("tenant");
    assert!(matches!(
        issue(h.sign(&no_tenant)).await,
        Err(Error::SubjectTokenInvalid(_))
    ));

    // Tampered payload: signature no longer matches.
    let good = h.user_token();
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    let mut richer = h.claims(&["inventory.read", "inventory.admin"]);
    richer["sub"] = json!("mallory");
    parts[1] = B64.encode(richer.to_string());
    assert!(matches!(
        issue(parts.join(".")).await,
        Err(Error::SubjectTokenInvalid(_))
    ));

    // alg: none.
    let header = B64.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let body = B64.encode(h.claims(&["inventory.read"]).to_string());
    assert!(matches!(
        issue(format!("{header}.{body}.")).await,
        Err(Error::SubjectTokenInvalid(_))
    ));

    // HS256 signed with the issuer's *public* key as the HMAC secret (key confusion).
    let public_pem =
        std::fs::read(dev_issuer_config(h.dir.path()).public_key_file.unwrap()).unwrap();
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &h.claims(&["inventory.read"]),
        &jsonwebtoken::EncodingKey::from_secret(&public_pem),
    )
    .unwrap();
    assert!(matches!(
        issue(forged).await,
        Err(Error::SubjectTokenInvalid(_))
    ));

    for garbage in ["abc", "a.b.c", "....", "eyJ.eyJ.sig", "\u{1F600}.x.y"] {
        assert!(
            matches!(
                issue(garbage.into()).await,
                Err(Error::SubjectTokenInvalid(_))
            ),
            "{garbage}"
        );
    }
}

async fn one_active_lease_per_job_and_module(backend: Backend) {
    let h = harness(backend).await;
    let first = h.issue("job-1").await;
    let e = h
        .svc
        .issue(&h.importer, h.request("job-1", &["inventory.read"]))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::LeaseAlreadyExists(ref j) if j == "job-1"));
    // Another module may use the same job id; after release the job id is free again.
    h.svc
        .issue(&h.other, h.request("job-1", &["inventory.read"]))
        .await
        .unwrap();
    h.svc
        .release(&h.importer, &first.lease.id, "succeeded", "")
        .await
        .unwrap();
    h.issue("job-1").await;
}

fn serving(module: &Module, tenants: &[&str]) -> Module {
    Module {
        tenants: Some(tenants.iter().map(|t| t.to_string()).collect()),
        ..module.clone()
    }
}

impl Harness {
    fn request_in(&self, tenant: &str, job: &str) -> IssueRequest {
        let mut claims = self.claims(&["inventory.read"]);
        claims["tenant"] = json!(tenant);
        IssueRequest {
            subject_token: self.sign(&claims),
            ..self.request(job, &["inventory.read"])
        }
    }
}

async fn a_lease_is_identified_by_tenant_module_and_job(backend: Backend) {
    let h = harness(backend).await;
    let in_acme = h.issue("job-1").await;
    // The same job id in another tenant is another job, not a conflict.
    let in_diku = h
        .svc
        .issue(&h.importer, h.request_in("diku", "job-1"))
        .await
        .unwrap();
    assert_ne!(in_acme.lease.id, in_diku.lease.id);
    assert_eq!(in_diku.lease.tenant, "diku");
    let (resumed, _) = h
        .svc
        .resume(&h.importer, Some("diku"), "job-1")
        .await
        .unwrap();
    assert_eq!(resumed.id, in_diku.lease.id);
    let (resumed, _) = h
        .svc
        .resume(&h.importer, Some("acme"), "job-1")
        .await
        .unwrap();
    assert_eq!(resumed.id, in_acme.lease.id);
    // A module serving every tenant must name one; a tenant without the job has none.
    let e = h.svc.resume(&h.importer, None, "job-1").await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidArgument {
                field: "tenant",
                ..
            }
        ),
        "{e:?}"
    );
    let e = h
        .svc
        .resume(&h.importer, Some("college"), "job-1")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::LeaseNotFound), "{e:?}");
    // A tenant is an identifier: no invisible variant of one.
    let e = h
        .svc
        .resume(&h.importer, Some("acme\u{200B}"), "job-1")
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidArgument {
                field: "tenant",
                ..
            }
        ),
        "{e:?}"
    );
}

async fn modules_act_only_for_the_tenants_they_serve(backend: Backend) {
    let h = harness(backend).await;
    let acme_only = serving(&h.importer, &["acme"]);
    let diku_only = serving(&h.other, &["diku"]);
    let issued = h
        .svc
        .issue(&acme_only, h.request("job", &["inventory.read"]))
        .await
        .unwrap();
    let e = h
        .svc
        .issue(&diku_only, h.request("job", &["inventory.read"]))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::TenantNotServed(t) if t == "acme"),
        "{e:?}"
    );
    // Introspection: another tenant's token looks inactive, its own active.
    let token = &issued.tokens.access_token;
    assert!(h.svc.introspect(&diku_only, token).await.unwrap().is_none());
    assert!(h.svc.introspect(&acme_only, token).await.unwrap().is_some());
    // A module with one tenant may leave it out when resuming.
    let (resumed, pair) = h.svc.resume(&acme_only, None, "job").await.unwrap();
    assert_eq!(resumed.id, issued.lease.id);
    let e = h
        .svc
        .resume(&acme_only, Some("diku"), "job")
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::TenantNotServed(t) if t == "diku"),
        "{e:?}"
    );
    // Once the module no longer serves the tenant, its lease there stops renewing.
    let narrowed = serving(&h.importer, &["diku"]);
    let e = h
        .svc
        .refresh(&narrowed, &resumed.id, &rt(&pair))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::TenantNotServed(t) if t == "acme"),
        "{e:?}"
    );
    let e = h
        .svc
        .release(&narrowed, &resumed.id, "succeeded", "")
        .await
        .unwrap_err();
    assert!(matches!(&e, Error::TenantNotServed(_)), "{e:?}");
    h.svc
        .refresh(&acme_only, &resumed.id, &rt(&pair))
        .await
        .unwrap();
}

async fn audiences_lifetimes_and_identifiers_are_bounded(backend: Backend) {
    let h = harness(backend).await;
    let mut req = h.request("job-a", &["inventory.read"]);
    req.audience = Some("admin-console".into());
    let e = h.svc.issue(&h.importer, req).await.unwrap_err();
    assert!(
        matches!(&e, Error::AudienceNotAllowed(a) if a == "admin-console"),
        "{e:?}"
    );
    let reporting = Module {
        audiences: vec!["platform".into(), "reports".into()],
        ..h.importer.clone()
    };
    let mut req = h.request("job-a", &["inventory.read"]);
    req.audience = Some("reports".into());
    let issued = h.svc.issue(&reporting, req).await.unwrap();
    assert_eq!(issued.lease.audience, "reports");
    // Once the module may no longer address it, the lease mints no more such tokens.
    let e = h
        .svc
        .refresh(&h.importer, &issued.lease.id, &rt(&issued.tokens))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::AudienceNotAllowed(a) if a == "reports"),
        "{e:?}"
    );
    let e = h
        .svc
        .resume(&h.importer, Some("acme"), "job-a")
        .await
        .unwrap_err();
    assert!(matches!(&e, Error::AudienceNotAllowed(_)), "{e:?}");
    h.svc
        .release(&h.importer, &issued.lease.id, "cancelled", "")
        .await
        .unwrap();

    // A lease shorter than one access token would mint tokens born expired.
    for short in [Duration::from_nanos(1), TTL - Duration::from_millis(1)] {
        let mut req = h.request("job-b", &["inventory.read"]);
        req.max_lifetime = Some(short);
        let e = h.svc.issue(&h.importer, req).await.unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidArgument {
                    field: "max_lifetime",
                    ..
                }
            ),
            "{short:?}: {e:?}"
        );
    }
    let mut req = h.request("job-b", &["inventory.read"]);
    req.max_lifetime = Some(TTL);
    h.svc.issue(&h.importer, req).await.unwrap();

    for job in [
        "import\u{202E}txt.exe",
        "import\u{200B}",
        "   ",
        " import",
        "a\u{2066}b",
    ] {
        let e = h
            .svc
            .issue(&h.importer, h.request(job, &["inventory.read"]))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidArgument {
                    field: "job_id",
                    ..
                }
            ),
            "{job:?}: {e:?}"
        );
    }
}

async fn refresh_rotates_and_reuse_of_an_old_token_revokes(backend: Backend) {
    let h = harness(backend).await;
    let issued = h.issue("job").await;
    let id = issued.lease.id.clone();
    let t0 = rt(&issued.tokens);
    let (_, p1) = h.refresh(&id, &t0).await.unwrap();
    let t1 = rt(&p1);
    assert_ne!(t0, t1);
    h.advance(Duration::from_secs(60));
    let (lease, p2) = h.refresh(&id, &t1).await.unwrap();
    assert_eq!(lease.refresh_count, 2);
    let t2 = rt(&p2);
    assert_ne!(t1, t2);

    // t0 is two generations old: theft. The lease is revoked for everyone.
    assert!(matches!(
        h.refresh(&id, &t0).await,
        Err(Error::RefreshTokenReused)
    ));
    assert!(matches!(
        h.refresh(&id, &t2).await,
        Err(Error::LeaseEnded(EndReason::RefreshTokenReused, _))
    ));
    let (lease, events) = h.svc.get_lease(&id).await.unwrap();
    assert_eq!(lease.end.unwrap().reason, EndReason::RefreshTokenReused);
    assert_eq!(events.last().unwrap().kind, EventKind::Ended);
}

async fn retry_of_the_previous_token_within_grace_returns_the_same_successor(backend: Backend) {
    let h = harness(backend).await;
    let issued = h.issue("job").await;
    let id = issued.lease.id.clone();
    let t0 = rt(&issued.tokens);
    let (_, first) = h.refresh(&id, &t0).await.unwrap();
    h.advance(GRACE - Duration::from_secs(1));
    let (_, retry) = h.refresh(&id, &t0).await.unwrap();
    assert_eq!(rt(&first), rt(&retry), "retries converge on one successor");
    // The successor works, and the chain goes on.
    h.refresh(&id, &rt(&first)).await.unwrap();
}

async fn racing_renewals_converge_without_a_false_alarm(backend: Backend) {
    let h = harness(backend).await;
    let issued = h.issue("job").await;
    let id = issued.lease.id.clone();
    let t0 = rt(&issued.tokens);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (svc, m, id, t0) = (
            Arc::clone(&h.svc),
            h.importer.clone(),
            id.clone(),
            t0.clone(),
        );
        tasks.push(tokio::spawn(async move { svc.refresh(&m, &id, &t0).await }));
    }
    let mut successors = HashSet::new();
    for t in tasks {
        successors.insert(rt(&t.await.unwrap().unwrap().1));
    }
    assert_eq!(successors.len(), 1, "every racer got the same successor");
    let (lease, _) = h.svc.get_lease(&id).await.unwrap();
    assert!(lease.is_active());
    assert_eq!(lease.refresh_count, 1, "one rotation, not sixteen");
}

async fn retry_after_the_grace_window_is_reuse(backend: Backend) {
    let h = harness(backend).await;
    let issued = h.issue("job").await;
    let id = issued.lease.id.clone();
    let t0 = rt(&issued.tokens);
    h.refresh(&id, &t0).await.unwrap();
    h.advance(GRACE);
    assert!(matches!(
        h.refresh(&id, &t0).await,
        Err(Error::RefreshTokenReused)
    ));
}

async fn forged_or_foreign_refresh_tokens_do_not_revoke(backend: Backend) {
    let h = harness(backend).await;
    let a = h.issue("job-a").await;
    let b = h.issue("job-b").await;
    // B's token presented for A: invalid, and A lives on.
    assert!(matches!(
        h.refresh(&a.lease.id, &rt(&b.tokens)).await,
        Err(Error::RefreshTokenInvalid)
    ));
    // A token claiming a future generation is invalid too.
    let forged = rt(&a.tokens).replacen("jrt1.0.", "jrt1.7.", 1);
    assert!(matches!(
        h.refresh(&a.lease.id, &forged).await,
        Err(Error::RefreshTokenInvalid)
    ));
    h.refresh(&a.lease.id, &rt(&a.tokens)).await.unwrap();
    // Another module cannot renew A's lease even with the right token.
    assert!(matches!(
        h.svc.refresh(&h.other, &b.lease.id, &rt(&b.tokens)).await,
        Err(Error::ActorMismatch)
    ));
    assert!(matches!(
        h.refresh("no-such-lease", &rt(&b.tokens)).await,
        Err(Error::LeaseNotFound)
    ));
}

async fn access_tokens_never_outlive_the_lease_and_expiry_ends_it(backend: Backend) {
    let h = harness(backend).await;
    let mut req = h.request("job", &["inventory.read"]);
    req.max_lifetime = Some(Duration::from_secs(400));
    let issued = h.svc.issue(&h.importer, req).await.unwrap();
    assert_eq!(issued.tokens.expires_in, TTL);
    let mut token = rt(&issued.tokens);
    h.advance(Duration::from_secs(250));
    let (lease, pair) = h.refresh(&issued.lease.id, &token).await.unwrap();
    assert_eq!(
        pair.expires_at, lease.expires_at,
        "capped at the hard expiry"
    );
    assert_eq!(pair.expires_in, Duration::from_secs(150));
    token = rt(&pair);
    h.advance(Duration::from_secs(150));
    assert!(matches!(
        h.refresh(&issued.lease.id, &token).await,
        Err(Error::LeaseEnded(EndReason::Expired, _))
    ));
    assert!(
        h.svc
            .introspect(&h.importer, &pair.access_token)
            .await
            .unwrap()
            .is_none()
    );
}

async fn survives_the_users_session(backend: Backend) {
    let h = harness(backend).await;
    let issued = h.issue("job").await;
    let mut token = rt(&issued.tokens);
    // The user's token expires after 10 minutes; the job renews for an hour without it.
    for _ in 0..12 {
        h.advance(Duration::from_secs(240));
        token = rt(&h.refresh(&issued.lease.id, &token).await.unwrap().1);
    }
}

async fn idle_leases_end_and_the_sweeper_reports_them(backend: Backend) {
    let h = harness(backend).await;
    let idle = h.issue("idle").await;
    let busy = h.issue("busy").await;
    let cursor = h.svc.last_sequence().await.unwrap();
    let mut token = rt(&busy.tokens);
    for _ in 0..4 {
        h.advance(IDLE / 4);
        token = rt(&h.refresh(&busy.lease.id, &token).await.unwrap().1);
    }
    assert_eq!(h.svc.sweep().await.unwrap(), 1);
    let ends = h.svc.ends_after(cursor, 10).await.unwrap();
    assert_eq!(ends.len(), 1);
    assert_eq!(ends[0].lease_id, idle.lease.id);
    assert_eq!(ends[0].reason, Some(EndReason::IdleTimeout));
    assert!(matches!(
        h.refresh(&idle.lease.id, &rt(&idle.tokens)).await,
        Err(Error::LeaseEnded(EndReason::IdleTimeout, _))
    ));
    assert_eq!(h.svc.sweep().await.unwrap(), 0, "nothing left to sweep");
}

async fn resume_reattaches_and_kills_the_previous_refresh_token(backend: Backend) {
    let h = harness(backend).await;
    let issued = h.issue("job").await;
    let old = rt(&issued.tokens);
    let (lease, pair) = h
        .svc
        .resume(&h.importer, Some("acme"), "job")
        .await
        .unwrap();
    assert_eq!(lease.id, issued.lease.id);
    assert_eq!(lease.resume_count, 1);
    // The old instance's token no longer works, but does not kill the lease either.
    assert!(matches!(
        h.refresh(&lease.id, &old).await,
        Err(Error::RefreshTokenInvalid)
    ));
    h.refresh(&lease.id, &rt(&pair)).await.unwrap();
    // Only the same module can resume.
    assert!(matches!(
        h.svc.resume(&h.other, Some("acme"), "job").await,
        Err(Error::LeaseNotFound)
    ));
    let (_, events) = h.svc.get_lease(&lease.id).await.unwrap();
    let kinds: Vec<_> = events.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, vec![EventKind::Issued, EventKind::Resumed]);
}

async fn release_ends_the_lease_once_and_only_for_its_holder(backend: Backend) {
    let h = harness(backend).await;
    let issued = h.issue("job").await;
    assert!(matches!(
        h.svc
            .release(&h.other, &issued.lease.id, "succeeded", "")
            .await,
        Err(Error::ActorMismatch)
    ));
    let lease = h
        .svc
        .release(&h.importer, &issued.lease.id, "succeeded", "imported 500k")
        .await
        .unwrap();
    let end = lease.end.clone().unwrap();
    assert_eq!(end.reason, EndReason::Released);
    assert_eq!(end.by, "module:importer");
    assert_eq!(end.detail, "outcome: succeeded; imported 500k");
    h.advance(Duration::from_secs(5));
    let again = h
        .svc
        .release(&h.importer, &issued.lease.id, "failed", "")
        .await
        .unwrap();
    assert_eq!(again.end.unwrap(), end, "idempotent: the first end stands");
    assert!(matches!(
        h.refresh(&issued.lease.id, &rt(&issued.tokens)).await,
        Err(Error::LeaseEnded(EndReason::Released, _))
    ));
    assert!(
        h.svc
            .introspect(&h.importer, &issued.tokens.access_token)
            .await
            .unwrap()
            .is_none()
    );
}

async fn administrators_revoke_by_lease_job_subject_and_actor(backend: Backend) {
    let h = harness(backend).await;
    let a = h.issue("job-a").await;
    h.issue("job-b").await;
    h.issue("job-c").await;
    h.svc
        .issue(&h.other, h.request("job-a", &["inventory.read"]))
        .await
        .unwrap();

    let lease = h
        .svc
        .admin_revoke_lease(&a.lease.id, "suspicious")
        .await
        .unwrap();
    assert_eq!(lease.end.as_ref().unwrap().by, "admin");
    let job = LeaseFilter {
        tenant: Some("acme".into()),
        job_id: Some("job-a".into()),
        ..Default::default()
    };
    assert_eq!(
        h.svc.admin_revoke_matching(job, "cancel").await.unwrap(),
        1,
        "other's job-a"
    );
    let actor = LeaseFilter {
        actor: Some("importer".into()),
        ..Default::default()
    };
    assert_eq!(
        h.svc
            .admin_revoke_matching(actor, "module compromised")
            .await
            .unwrap(),
        2
    );
    h.issue("job-d").await;
    let subject = LeaseFilter {
        tenant: Some("acme".into()),
        subject: Some("alice".into()),
        ..Default::default()
    };
    assert_eq!(
        h.svc
            .admin_revoke_matching(subject, "user left")
            .await
            .unwrap(),
        1
    );
    assert_eq!(h.svc.count_active_leases().await.unwrap(), 0);
    assert!(matches!(
        h.refresh(&a.lease.id, &rt(&a.tokens)).await,
        Err(Error::LeaseEnded(EndReason::Revoked, _))
    ));
}

async fn introspection_is_active_only_for_live_tokens_of_live_leases(backend: Backend) {
    let h = harness(backend).await;
    let issued = h.issue("job").await;
    let claims = h
        .svc
        .introspect(&h.importer, &issued.tokens.access_token)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claims.lease_id, issued.lease.id);
    assert_eq!(claims.act.sub, "importer");
    assert_eq!(claims.permissions, vec!["inventory.read"]);
    assert_eq!(claims.aud, "platform");
    assert_eq!(claims.exp - claims.iat, 300);
    for garbage in ["", "x", "a.b.c", &issued.tokens.access_token[..40]] {
        assert!(
            h.svc
                .introspect(&h.importer, garbage)
                .await
                .unwrap()
                .is_none()
        );
    }
    // A subject token (another issuer's JWT) is not one of ours.
    assert!(
        h.svc
            .introspect(&h.importer, &h.user_token())
            .await
            .unwrap()
            .is_none()
    );
    h.advance(TTL);
    assert!(
        h.svc
            .introspect(&h.importer, &issued.tokens.access_token)
            .await
            .unwrap()
            .is_none(),
        "expired"
    );
}

async fn key_rotation_publishes_first_signs_later_and_keeps_tokens_in_flight_valid(
    backend: Backend,
) {
    let h = harness(backend).await;
    let issued = h.issue("job").await;
    let old_kid = h.svc.keys().signing_kid(h.clock.now());
    let (new_kid, retired, starts) = h.svc.rotate_signing_key().await.unwrap();
    assert_eq!(retired, old_kid);
    assert_ne!(new_kid, old_kid);
    assert_eq!(starts, h.clock.now() + KEY_ACTIVATION);
    let kid_of = |token: &str| jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
    let kids =
        |h: &Harness| -> Vec<String> { h.svc.keys().jwks().into_iter().map(|k| k.kid).collect() };
    assert_eq!(
        kids(&h),
        vec![new_kid.clone(), old_kid.clone()],
        "newest first, both published"
    );

    // Until the new key activates, the old one keeps signing: verifiers with a cached
    // JWKS never see an unknown kid.
    let mut token = rt(&issued.tokens);
    let (_, pair) = h.refresh(&issued.lease.id, &token).await.unwrap();
    assert_eq!(kid_of(&pair.access_token), old_kid);
    token = rt(&pair);
    h.advance(KEY_ACTIVATION);
    let (_, pair) = h.refresh(&issued.lease.id, &token).await.unwrap();
    assert_eq!(kid_of(&pair.access_token), new_kid);
    // Tokens the old key signed still verify while they live.
    assert!(
        h.svc
            .introspect(&h.importer, &issued.tokens.access_token)
            .await
            .unwrap()
            .is_some()
    );
    // Once every token the old key signed has expired, it is no longer published.
    h.advance(TTL + GRACE + Duration::from_secs(1));
    h.svc.keys().reload(h.clock.now()).await.unwrap();
    assert_eq!(kids(&h), vec![new_kid]);
    h.refresh(&issued.lease.id, &rt(&pair)).await.unwrap();
}

async fn every_lease_keeps_its_story(backend: Backend) {
    let h = harness(backend).await;
    let issued = h.issue("job").await;
    let mut token = rt(&issued.tokens);
    for _ in 0..3 {
        h.advance(Duration::from_secs(10));
        token = rt(&h.refresh(&issued.lease.id, &token).await.unwrap().1);
    }
    let refreshed_at = h.clock.now();
    h.svc
        .resume(&h.importer, Some("acme"), "job")
        .await
        .unwrap();
    h.svc
        .admin_revoke_lease(&issued.lease.id, "operator cleanup")
        .await
        .unwrap();
    let (lease, events) = h.svc.get_lease(&issued.lease.id).await.unwrap();
    assert_eq!(lease.refresh_count, 3);
    assert_eq!(lease.last_refreshed_at, Some(refreshed_at));
    assert_eq!(lease.resume_count, 1);
    let story: Vec<(EventKind, String)> = events.iter().map(|e| (e.kind, e.by.clone())).collect();
    assert_eq!(
        story,
        vec![
            (EventKind::Issued, "module:importer".into()),
            (EventKind::Resumed, "module:importer".into()),
            (EventKind::Ended, "admin".into()),
        ]
    );
    assert_eq!(events[2].detail, "operator cleanup");
    assert!(events.windows(2).all(|w| w[0].sequence < w[1].sequence));
}

async fn listing_pages_through_every_lease_once(backend: Backend) {
    let h = harness(backend).await;
    let mut ids = HashSet::new();
    for i in 0..7 {
        ids.insert(h.issue(&format!("job-{i}")).await.lease.id);
        h.advance(Duration::from_millis(if i % 2 == 0 { 0 } else { 5 }));
    }
    let mut seen = HashSet::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = h
            .svc
            .list_leases(
                LeaseFilter {
                    actor: Some("importer".into()),
                    ..Default::default()
                },
                3,
                token.as_deref(),
            )
            .await
            .unwrap();
        pages += 1;
        for l in &page.leases {
            assert!(seen.insert(l.id.clone()), "no lease twice");
        }
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    assert_eq!(seen, ids);
    assert_eq!(pages, 3);
    assert!(matches!(
        h.svc
            .list_leases(LeaseFilter::default(), 3, Some("not-a-token"))
            .await,
        Err(Error::InvalidArgument {
            field: "page_token",
            ..
        })
    ));
}

async fn debug_output_never_shows_secrets(backend: Backend) {
    let h = harness(backend).await;
    let req = h.request("job", &["inventory.read"]);
    let subject_token = req.subject_token.clone();
    let issued = h.svc.issue(&h.importer, req.clone()).await.unwrap();
    let refresh = rt(&issued.tokens);
    let printed = format!("{req:?} {issued:?} {:?}", issued.tokens);
    for secret in [&subject_token, &issued.tokens.access_token, &refresh] {
        assert!(!printed.contains(secret.as_str()), "{printed}");
    }
    let lease = format!("{:?}", issued.lease);
    assert!(
        !lease.contains(&format!("{:?}", issued.lease.seed)),
        "{lease}"
    );
    assert!(lease.contains("<redacted>"));
}

async fn purge_removes_only_leases_past_their_retention(backend: Backend) {
    let h = harness(backend).await;
    let old = h.issue("old").await;
    h.svc
        .release(&h.importer, &old.lease.id, "succeeded", "")
        .await
        .unwrap();
    h.advance(Duration::from_secs(3600));
    let recent = h.issue("recent").await;
    h.svc
        .release(&h.importer, &recent.lease.id, "succeeded", "")
        .await
        .unwrap();
    let active = h.issue("active").await;
    assert_eq!(
        h.svc.purge_ended(Duration::from_secs(1800)).await.unwrap(),
        1
    );
    assert!(matches!(
        h.svc.get_lease(&old.lease.id).await,
        Err(Error::LeaseNotFound)
    ));
    let (_, events) = h.svc.get_lease(&recent.lease.id).await.unwrap();
    assert_eq!(events.len(), 2);
    h.svc.get_lease(&active.lease.id).await.unwrap();
    assert_eq!(
        h.svc.purge_ended(Duration::from_secs(1800)).await.unwrap(),
        0
    );
}

async fn concurrent_ends_stream_in_order_without_gaps(backend: Backend) {
    let h = harness(backend).await;
    let mut ids = Vec::new();
    for i in 0..24 {
        ids.push(h.issue(&format!("job-{i}")).await.lease.id);
    }
    let start = h.svc.last_sequence().await.unwrap();
    // A watcher polls while the leases end concurrently.
    let svc = Arc::clone(&h.svc);
    let watcher = tokio::spawn(async move {
        let (mut cursor, mut seen) = (start, Vec::new());
        while seen.len() < 24 {
            for event in svc.ends_after(cursor, 5).await.unwrap() {
                assert!(event.sequence > cursor);
                cursor = event.sequence;
                seen.push(event.lease_id);
            }
            tokio::task::yield_now().await;
        }
        seen
    });
    let revokes: Vec<_> = ids
        .iter()
        .map(|id| {
            let (svc, id) = (Arc::clone(&h.svc), id.clone());
            tokio::spawn(async move { svc.admin_revoke_lease(&id, "bulk").await })
        })
        .collect();
    for r in revokes {
        r.await.unwrap().unwrap();
    }
    let seen = tokio::time::timeout(Duration::from_secs(20), watcher)
        .await
        .expect("the watcher saw every end")
        .unwrap();
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), 24, "each end once");
    assert_eq!(seen.len(), 24);
}

/// The revocation stream as the domain drives it: a cursor from the future is refused;
/// a stream carries its tenants' ends only, its cursor passing every end; it says once
/// that it caught up; a watcher with no state replays the ends still live.
async fn a_revocation_stream_carries_its_tenants_and_says_once_it_caught_up(backend: Backend) {
    let h = harness(backend).await;
    let acme = h.issue("job-a").await;
    let diku = h
        .svc
        .issue(&h.importer, h.request_in("diku", "job-d"))
        .await
        .unwrap();
    let head = h.svc.last_sequence().await.unwrap();
    let e = Revocations::open(Arc::clone(&h.svc), Start::After(head + 1), None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidArgument {
                field: "after_cursor",
                ..
            }
        ),
        "{e:?}"
    );
    let acme_only = Some(HashSet::from(["acme".to_owned()]));
    let mut stream = Revocations::open(Arc::clone(&h.svc), Start::Newest, acme_only)
        .await
        .unwrap();
    assert_eq!(stream.covered(), ["acme"]);
    assert_eq!(stream.cursor(), head);
    assert!(matches!(stream.next().await.unwrap(), Next::CaughtUp));
    assert!(matches!(stream.next().await.unwrap(), Next::Quiet));
    h.svc.admin_revoke_lease(&diku.lease.id, "x").await.unwrap();
    h.svc.admin_revoke_lease(&acme.lease.id, "x").await.unwrap();
    let Next::Ends(ends) = stream.next().await.unwrap() else {
        panic!("the ends after the cursor")
    };
    let ids: Vec<_> = ends.iter().map(|e| e.lease_id.as_str()).collect();
    assert_eq!(ids, [acme.lease.id.as_str()]);
    assert_eq!(stream.cursor(), h.svc.last_sequence().await.unwrap());
    assert!(matches!(stream.next().await.unwrap(), Next::Quiet));
    let mut replay = Revocations::open(Arc::clone(&h.svc), Start::LiveEnds, None)
        .await
        .unwrap();
    assert!(replay.covered().is_empty());
    let Next::Ends(ends) = replay.next().await.unwrap() else {
        panic!("the live ends")
    };
    assert_eq!(ends.len(), 2);
    assert!(matches!(replay.next().await.unwrap(), Next::CaughtUp));
}

async fn replicas_starting_together_make_one_signing_key(backend: Backend) {
    let (store, _schema) = open_store(backend).await;
    let master = MasterKey::from_bytes(&[9u8; 32]);
    let now = ManualClock::at_fixed_instant().now();
    let load = || {
        let (store, master) = (Arc::clone(&store), master.clone());
        tokio::spawn(async move {
            KeyRing::load(store, master, TTL, KEY_ACTIVATION, now)
                .await
                .unwrap()
                .signing_kid(now)
        })
    };
    let (a, b) = (load(), load());
    assert_eq!(a.await.unwrap(), b.await.unwrap());
    assert_eq!(store.signing_keys().await.unwrap().len(), 1);
}

/// Runs each test above against both stores.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    if crate::testing::postgres_url().is_none() {
                        return;
                    }
                    super::$name(super::Backend::Postgres).await
                }
            )*
        }
    };
}

/// Compare-and-set under contention, as the stores batch it (one SQLite transaction,
/// one PostgreSQL `UPDATE … FROM unnest`): of writers racing from one version exactly
/// one wins, and writes to different leases in the same batch all land.
async fn racing_writes_from_one_version_have_exactly_one_winner(backend: Backend) {
    let h = harness(backend).await;
    let mut leases = Vec::new();
    for job in ["a", "b", "c"] {
        let issued = h.issue(job).await;
        leases.push(h.store.get_lease(&issued.lease.id).await.unwrap().unwrap());
    }
    let mut writes = Vec::new();
    for (n, lease) in leases.iter().enumerate() {
        for attempt in 0..8u64 {
            let store = Arc::clone(&h.store);
            let mut lease = lease.clone();
            lease.generation = attempt + 1;
            lease.refresh_count = attempt + 1;
            writes.push(tokio::spawn(async move {
                (
                    n,
                    attempt,
                    store.update_lease(&lease, None).await.unwrap().is_some(),
                )
            }));
        }
    }
    let mut winners = vec![Vec::new(); leases.len()];
    for write in writes {
        let (n, attempt, won) = write.await.unwrap();
        if won {
            winners[n].push(attempt);
        }
    }
    for (lease, won) in leases.iter().zip(&winners) {
        assert_eq!(won.len(), 1, "{won:?}");
        let stored = h.store.get_lease(&lease.id).await.unwrap().unwrap();
        // The stored row is the winner's, whole.
        assert_eq!(stored.generation, won[0] + 1);
        assert_eq!(stored.refresh_count, won[0] + 1);
        assert_eq!(stored.version, lease.version + 1);
    }
}

on_both_stores!(
    a_lease_is_identified_by_tenant_module_and_job,
    modules_act_only_for_the_tenants_they_serve,
    audiences_lifetimes_and_identifiers_are_bounded,
    racing_writes_from_one_version_have_exactly_one_winner,
    purge_removes_only_leases_past_their_retention,
    concurrent_ends_stream_in_order_without_gaps,
    a_revocation_stream_carries_its_tenants_and_says_once_it_caught_up,
    replicas_starting_together_make_one_signing_key,
    grant_is_requested_intersect_user_intersect_delegable,
    lifetime_over_the_cap_is_clamped_and_said_or_refused,
    malformed_input_is_invalid_argument,
    subject_tokens_are_verified_strictly,
    one_active_lease_per_job_and_module,
    refresh_rotates_and_reuse_of_an_old_token_revokes,
    retry_of_the_previous_token_within_grace_returns_the_same_successor,
    racing_renewals_converge_without_a_false_alarm,
    retry_after_the_grace_window_is_reuse,
    forged_or_foreign_refresh_tokens_do_not_revoke,
    access_tokens_never_outlive_the_lease_and_expiry_ends_it,
    survives_the_users_session,
    idle_leases_end_and_the_sweeper_reports_them,
    resume_reattaches_and_kills_the_previous_refresh_token,
    release_ends_the_lease_once_and_only_for_its_holder,
    administrators_revoke_by_lease_job_subject_and_actor,
    introspection_is_active_only_for_live_tokens_of_live_leases,
    key_rotation_publishes_first_signs_later_and_keeps_tokens_in_flight_valid,
    every_lease_keeps_its_story,
    listing_pages_through_every_lease_once,
    debug_output_never_shows_secrets,
);
