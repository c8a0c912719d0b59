//! The revocation stream: prompt, complete, resumable from a cursor.

use std::time::Duration;

use token_sdk::proto::{
    EndReason, JobOutcome, RevokeJobTokenRequest, RevokeLeaseRequest, WatchRevocationsRequest,
    WatchRevocationsResponse,
};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::support::{TestServer, reason};

async fn next(stream: &mut tonic::Streaming<WatchRevocationsResponse>) -> WatchRevocationsResponse {
    tokio::time::timeout(Duration::from_secs(1), stream.next())
        .await
        .expect("an event within a second")
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn revocations_reach_watchers_within_a_second_and_resume_from_a_cursor() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut admin = server.admin().await;
    let a = server.issue("job-a").await.lease.unwrap();
    let b = server.issue("job-b").await.lease.unwrap();
    let c = server.issue("job-c").await.lease.unwrap();

    let mut stream = client
        .watch_revocations(WatchRevocationsRequest { after_cursor: None })
        .await
        .unwrap()
        .into_inner();
    admin
        .revoke_lease(RevokeLeaseRequest {
            lease_id: a.lease_id.clone(),
            reason: "stolen laptop".into(),
        })
        .await
        .unwrap();
    let first = next(&mut stream).await;
    assert_eq!(first.lease_id, a.lease_id);
    assert_eq!(first.reason(), EndReason::Revoked);
    assert_eq!(first.tenant, "acme");
    assert_eq!(first.job_id, "job-a");
    assert!(first.tokens_valid_until.unwrap().seconds >= first.ended_at.unwrap().seconds);
    drop(stream);

    // While disconnected, two more leases end.
    client
        .revoke_job_token(RevokeJobTokenRequest {
            lease_id: b.lease_id.clone(),
            outcome: JobOutcome::Failed as i32,
            detail: String::new(),
        })
        .await
        .unwrap();
    admin
        .revoke_lease(RevokeLeaseRequest {
            lease_id: c.lease_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    let mut resumed = client
        .watch_revocations(WatchRevocationsRequest {
            after_cursor: Some(first.cursor),
        })
        .await
        .unwrap()
        .into_inner();
    let second = next(&mut resumed).await;
    let third = next(&mut resumed).await;
    assert_eq!(
        (second.lease_id.as_str(), second.reason()),
        (b.lease_id.as_str(), EndReason::Released)
    );
    assert_eq!(
        (third.lease_id.as_str(), third.reason()),
        (c.lease_id.as_str(), EndReason::Revoked)
    );
    assert!(first.cursor < second.cursor && second.cursor < third.cursor);

    // From the start, everything is replayed.
    let mut all = client
        .watch_revocations(WatchRevocationsRequest {
            after_cursor: Some(0),
        })
        .await
        .unwrap()
        .into_inner();
    for expected in [&a, &b, &c] {
        assert_eq!(next(&mut all).await.lease_id, expected.lease_id);
    }

    let err = token_sdk::connect(&server.endpoint(), "mk_unknown")
        .await
        .unwrap()
        .watch_revocations(WatchRevocationsRequest { after_cursor: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(reason(&err), "MODULE_UNAUTHENTICATED");
    server.stop().await;
}
