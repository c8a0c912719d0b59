//! Tenants never see each other: a lease is (tenant, module, job), modules act only for
//! the tenants they serve, and the revocation stream shows a module only its tenants,
//! without users' names.

use std::time::Duration;

use token_sdk::JobTokenClient;
use token_sdk::proto::{
    IntrospectTokenRequest, IssueJobTokenRequest, IssueJobTokenResponse, ResumeJobTokenRequest,
    RevokeLeaseRequest, WatchRevocationsRequest, WatchRevocationsResponse,
};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::support::{OTHER_KEY, TestServer, open_watch, reason};

const HOUR: Duration = Duration::from_secs(3600);

/// The ends a stream carries within a second: enough for every end to arrive if it would.
async fn ends_within_a_second(
    s: &mut tonic::Streaming<WatchRevocationsResponse>,
) -> Vec<(String, String)> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(m)) = s.next().await {
            if !m.heartbeat {
                got.push((m.tenant, m.lease_id));
            }
        }
    })
    .await;
    got
}

async fn grant(
    server: &TestServer,
    client: &mut JobTokenClient,
    tenant: &str,
    job: &str,
) -> Result<IssueJobTokenResponse, tonic::Status> {
    client
        .issue_job_token(IssueJobTokenRequest {
            subject_token: server.user_token_in(tenant, &["inventory.read"], HOUR),
            job_id: job.into(),
            permissions: vec!["inventory.read".into()],
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn resume(
    client: &mut JobTokenClient,
    tenant: &str,
    job: &str,
) -> Result<String, tonic::Status> {
    client
        .resume_job_token(ResumeJobTokenRequest {
            job_id: job.into(),
            tenant: tenant.into(),
        })
        .await
        .map(|r| r.into_inner().lease.unwrap().lease_id)
}

#[tokio::test]
async fn the_same_job_in_two_tenants_is_two_leases_and_resume_names_the_tenant() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let acme = grant(&server, &mut client, "acme", "import-1")
        .await
        .unwrap();
    let diku = grant(&server, &mut client, "diku", "import-1")
        .await
        .unwrap();
    let (acme, diku) = (acme.lease.unwrap(), diku.lease.unwrap());
    assert_ne!(acme.lease_id, diku.lease_id);
    assert_eq!(diku.tenant, "diku");

    assert_eq!(
        resume(&mut client, "diku", "import-1").await.unwrap(),
        diku.lease_id
    );
    assert_eq!(
        resume(&mut client, "acme", "import-1").await.unwrap(),
        acme.lease_id
    );
    // A module serving every tenant must say which; it never gets another tenant's lease.
    let e = resume(&mut client, "", "import-1").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = resume(&mut client, "college", "import-1")
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "LEASE_NOT_FOUND");
    let e = resume(&mut client, "diku\u{200B}", "import-1")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_module_limited_to_tenants_grants_introspects_and_watches_only_those() {
    let server = TestServer::start_with(|c| {
        // `other` serves diku only; `importer` serves every tenant.
        let other = c.modules.iter_mut().find(|m| m.id == "other").unwrap();
        other.tenants = Some(vec!["diku".into()]);
    })
    .await;
    let mut importer = server.client().await;
    let mut other = server.client_with_key(OTHER_KEY).await;

    let e = grant(&server, &mut other, "acme", "job").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(reason(&e), "TENANT_NOT_SERVED");
    let own = grant(&server, &mut other, "diku", "job").await.unwrap();
    // One tenant served: the resume may leave it out.
    assert_eq!(
        resume(&mut other, "", "job").await.unwrap(),
        own.lease.as_ref().unwrap().lease_id
    );

    // Introspection: a token of a tenant the module does not serve is inactive for it.
    let acme = grant(&server, &mut importer, "acme", "job").await.unwrap();
    let introspect = |token: String| IntrospectTokenRequest { token };
    let acme_token = acme.tokens.unwrap().access_token;
    let seen = other
        .introspect_token(introspect(acme_token.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(!seen.active);
    assert!(seen.claims.is_none());
    let seen = importer
        .introspect_token(introspect(acme_token))
        .await
        .unwrap()
        .into_inner();
    assert!(seen.active);

    // The revocation stream: asking for an unserved tenant is refused; by default the
    // module sees only its own tenants' ends.
    let e = other
        .watch_revocations(WatchRevocationsRequest {
            tenants: vec!["acme".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "TENANT_NOT_SERVED");
    let mut stream = other
        .watch_revocations(WatchRevocationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut all = importer
        .watch_revocations(WatchRevocationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    // Both streams are live once their first heartbeat arrives.
    for s in [&mut stream, &mut all] {
        let first = tokio::time::timeout(Duration::from_secs(2), s.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(first.heartbeat);
    }
    let mut admin = server.admin().await;
    for lease in [acme.lease.unwrap(), own.lease.unwrap()] {
        admin
            .revoke_lease(RevokeLeaseRequest {
                lease_id: lease.lease_id,
                reason: "test".into(),
            })
            .await
            .unwrap();
    }
    // A verifier of a module that serves diku only: its revocation set cannot vouch for
    // acme, so an acme token is refused, never waved through; a diku token passes.
    let verifier_client = token_sdk::Client::builder(server.endpoint())
        .module_key(OTHER_KEY)
        .connect()
        .await
        .unwrap();
    let verifier = verifier_client.verifier().build().await.unwrap();
    let acme_live = grant(&server, &mut importer, "acme", "job-live")
        .await
        .unwrap();
    let e = verifier
        .verify(&acme_live.tokens.unwrap().access_token)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not served"), "{e}");
    let diku_live = grant(&server, &mut other, "diku", "job-live")
        .await
        .unwrap();
    verifier
        .verify(&diku_live.tokens.unwrap().access_token)
        .await
        .unwrap();
    let seen_by_other = ends_within_a_second(&mut stream).await;
    let seen_by_all = ends_within_a_second(&mut all).await;
    assert_eq!(seen_by_all.len(), 2, "{seen_by_all:?}");
    assert_eq!(seen_by_other.len(), 1, "{seen_by_other:?}");
    assert_eq!(seen_by_other[0].0, "diku");
    server.stop().await;
}

#[tokio::test]
async fn audiences_are_limited_per_module() {
    let server = TestServer::start_with(|c| {
        let other = c.modules.iter_mut().find(|m| m.id == "other").unwrap();
        other.audiences = vec!["jobtoken".into(), "reports".into()];
    })
    .await;
    let mut importer = server.client().await;
    let mut other = server.client_with_key(OTHER_KEY).await;
    let request = |audience: &str| IssueJobTokenRequest {
        subject_token: server.user_token(&["inventory.read"]),
        job_id: format!("job-{audience}"),
        audience: audience.into(),
        ..Default::default()
    };
    let e = importer
        .issue_job_token(request("admin-console"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(reason(&e), "AUDIENCE_NOT_ALLOWED");
    let e = importer
        .issue_job_token(request("reports"))
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "AUDIENCE_NOT_ALLOWED");
    // The default audience stays allowed; a configured one works for its module.
    importer.issue_job_token(request("")).await.unwrap();
    let granted = other
        .issue_job_token(request("reports"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(granted.lease.unwrap().audience, "reports");
    server.stop().await;
}

#[tokio::test]
async fn a_reload_ends_open_revocation_streams_so_they_reopen_under_the_new_config() {
    let server = TestServer::start().await;
    let mut other = server.client_with_key(OTHER_KEY).await;
    let (mut stream, first) = open_watch(&mut other, WatchRevocationsRequest::default()).await;
    assert!(first.heartbeat && first.tenants.is_empty());
    // The module is narrowed to one tenant: the stream it opened under the old config ends.
    let reloaded = server.reload(|c| {
        let m = c.modules.iter_mut().find(|m| m.id == "other").unwrap();
        m.tenants = Some(vec!["diku".into()]);
    });
    assert!(reloaded.applied.contains(&"modules"), "{reloaded:?}");
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match stream.next().await {
                Some(Ok(m)) if m.heartbeat => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream ends within a few seconds of the reload");
    let status = ended.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // Reopened, it covers only the module's tenants now.
    let (_stream, first) = open_watch(&mut other, WatchRevocationsRequest::default()).await;
    assert_eq!(first.tenants, vec!["diku".to_string()]);
    server.stop().await;
}
