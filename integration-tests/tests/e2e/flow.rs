//! Grant → renew → introspect → release over real gRPC, with the admin's view.

use token_sdk::proto::{
    GetJwksRequest, GetLeaseRequest, IntrospectTokenRequest, IssueJobTokenRequest, JobOutcome,
    LeaseState, ListLeasesRequest, RefreshJobTokenRequest, ResumeJobTokenRequest, RevokeJobRequest,
    RevokeJobTokenRequest,
};
use tonic::Code;

use crate::support::{TestServer, reason};

#[tokio::test]
async fn issue_refresh_introspect_release() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let issued = server.issue("import-1").await;
    let lease = issued.lease.unwrap();
    let tokens = issued.tokens.unwrap();
    assert_eq!(lease.state(), LeaseState::Active);
    assert_eq!(lease.actor, "importer");
    assert_eq!(lease.granted_permissions, vec!["inventory.read"]);
    assert_eq!(tokens.token_type, "Bearer");
    assert_eq!(tokens.access_token_expires_in.unwrap().seconds, 300);
    assert!(!issued.lifetime_clamped);

    let refreshed = client
        .refresh_job_token(RefreshJobTokenRequest {
            lease_id: lease.lease_id.clone(),
            refresh_token: tokens.refresh_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let new_tokens = refreshed.tokens.unwrap();
    assert_ne!(new_tokens.refresh_token, tokens.refresh_token);

    let introspected = client
        .introspect_token(IntrospectTokenRequest {
            token: new_tokens.access_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(introspected.active);
    let claims = introspected.claims.unwrap();
    assert_eq!(claims.sub, "alice");
    assert_eq!(claims.tenant, "acme");
    assert_eq!(claims.actor, "importer");
    assert_eq!(claims.job_id, "import-1");
    assert_eq!(claims.lease_id, lease.lease_id);

    let released = client
        .revoke_job_token(RevokeJobTokenRequest {
            lease_id: lease.lease_id.clone(),
            outcome: JobOutcome::Succeeded as i32,
            detail: "500000 records".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(released.state(), LeaseState::Ended);
    assert_eq!(released.ended_by, "module:importer");

    let err = client
        .refresh_job_token(RefreshJobTokenRequest {
            lease_id: lease.lease_id.clone(),
            refresh_token: new_tokens.refresh_token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "LEASE_RELEASED");
    let after = client
        .introspect_token(IntrospectTokenRequest {
            token: new_tokens.access_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!after.active);
    assert!(after.claims.is_none());

    let story = server
        .admin()
        .await
        .get_lease(GetLeaseRequest {
            lease_id: lease.lease_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(story.refresh_count, 1);
    let kinds: Vec<_> = story.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["issued", "ended"]);
    assert_eq!(
        story.events[1].detail,
        "released: outcome: succeeded; 500000 records"
    );
    server.stop().await;
}

#[tokio::test]
async fn reuse_detection_and_grace_over_the_wire() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let issued = server.issue("job").await;
    let lease_id = issued.lease.unwrap().lease_id;
    let t0 = issued.tokens.unwrap().refresh_token;
    let refresh = |token: String| RefreshJobTokenRequest {
        lease_id: lease_id.clone(),
        refresh_token: token,
    };
    let t1 = client
        .refresh_job_token(refresh(t0.clone()))
        .await
        .unwrap()
        .into_inner();
    // A lost response: the holder retries t0 and gets the same successor.
    let retry = client
        .refresh_job_token(refresh(t0.clone()))
        .await
        .unwrap()
        .into_inner();
    let t1 = t1.tokens.unwrap().refresh_token;
    assert_eq!(retry.tokens.unwrap().refresh_token, t1);
    let t2 = client
        .refresh_job_token(refresh(t1))
        .await
        .unwrap()
        .into_inner();
    // t0 is now two generations old: theft. The lease dies with a clear reason.
    let err = client.refresh_job_token(refresh(t0)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(reason(&err), "REFRESH_TOKEN_REUSED");
    let err = client
        .refresh_job_token(refresh(t2.tokens.unwrap().refresh_token))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "REFRESH_TOKEN_REUSED");
    server.stop().await;
}

#[tokio::test]
async fn callers_must_authenticate_and_errors_carry_reasons() {
    let server = TestServer::start().await;
    let mut stranger = server.client_with_key("mk_not-a-configured-key").await;
    let err = stranger
        .introspect_token(IntrospectTokenRequest { token: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(reason(&err), "MODULE_UNAUTHENTICATED");

    // No key at all, raw generated client.
    let mut bare = token_sdk::proto::job_token_service_client::JobTokenServiceClient::new(
        server.channel().await,
    );
    let err = bare
        .resume_job_token(ResumeJobTokenRequest {
            job_id: "j".into(),
            tenant: "acme".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "MODULE_UNAUTHENTICATED");
    // GetJwks is open.
    let jwks = bare.get_jwks(GetJwksRequest {}).await.unwrap().into_inner();
    assert_eq!(jwks.keys.len(), 1);

    // A module key is not an admin key.
    let mut wrong_admin =
        token_sdk::connect_admin(&server.endpoint(), crate::support::IMPORTER_KEY)
            .await
            .unwrap();
    let err = wrong_admin
        .list_leases(ListLeasesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "ADMIN_UNAUTHENTICATED");

    let mut client = server.client().await;
    let err = client
        .issue_job_token(IssueJobTokenRequest {
            subject_token: server.user_token(&["inventory.read"]),
            job_id: "job".into(),
            permissions: vec!["inventory.read".into(), "inventory.delete".into()],
            max_lifetime: None,
            audience: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(reason(&err), "PERMISSION_NOT_HELD");
    assert!(
        err.message().contains("inventory.delete"),
        "{}",
        err.message()
    );

    let err = client
        .issue_job_token(IssueJobTokenRequest {
            subject_token: server.user_token(&["billing.pay"]),
            job_id: "job".into(),
            permissions: vec!["billing.pay".into()],
            max_lifetime: None,
            audience: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "PERMISSION_NOT_DELEGABLE");

    let err = client
        .issue_job_token(IssueJobTokenRequest {
            subject_token: "not.a.jwt".into(),
            job_id: "job".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "SUBJECT_TOKEN_INVALID");

    // Another module's lease is not yours.
    let issued = server.issue("job").await;
    let err = server
        .client_with_key(crate::support::OTHER_KEY)
        .await
        .refresh_job_token(RefreshJobTokenRequest {
            lease_id: issued.lease.unwrap().lease_id,
            refresh_token: issued.tokens.unwrap().refresh_token,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "ACTOR_MISMATCH");
    let err = client
        .refresh_job_token(RefreshJobTokenRequest {
            lease_id: "no-such-lease".into(),
            refresh_token: "jrt1.0.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "LEASE_NOT_FOUND");
    server.stop().await;
}

#[tokio::test]
async fn resume_and_admin_revocation_over_the_wire() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let issued = server.issue("nightly-import").await;
    let lease_id = issued.lease.unwrap().lease_id;
    let resumed = client
        .resume_job_token(ResumeJobTokenRequest {
            job_id: "nightly-import".into(),
            tenant: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resumed.lease.unwrap().lease_id, lease_id);
    let err = client
        .refresh_job_token(RefreshJobTokenRequest {
            lease_id: lease_id.clone(),
            refresh_token: issued.tokens.unwrap().refresh_token,
        })
        .await
        .unwrap_err();
    assert_eq!(
        reason(&err),
        "REFRESH_TOKEN_INVALID",
        "the pre-restart token died"
    );

    let mut admin = server.admin().await;
    let count = admin
        .revoke_job(RevokeJobRequest {
            tenant: "acme".into(),
            job_id: "nightly-import".into(),
            reason: "cancelled by operator".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .revoked_count;
    assert_eq!(count, 1);
    let err = client
        .refresh_job_token(RefreshJobTokenRequest {
            lease_id: lease_id.clone(),
            refresh_token: resumed.tokens.unwrap().refresh_token,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "LEASE_REVOKED");
    let err = admin
        .revoke_job(RevokeJobRequest::default())
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "INVALID_ARGUMENT");
    let ended = admin
        .list_leases(ListLeasesRequest {
            state: LeaseState::Ended as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ended.leases.len(), 1);
    assert_eq!(ended.leases[0].end_detail, "cancelled by operator");
    server.stop().await;
}
