//! The revocation stream: prompt, complete, resumable from a cursor.

use std::time::Duration;

use token_sdk::proto::{
    EndReason, JobOutcome, RevokeJobTokenRequest, RevokeLeaseRequest, WatchRevocationsRequest,
    WatchRevocationsResponse,
};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::support::{TestServer, reason};

type Watch = tonic::Streaming<WatchRevocationsResponse>;

async fn next_message(stream: &mut Watch) -> WatchRevocationsResponse {
    tokio::time::timeout(Duration::from_secs(1), stream.next())
        .await
        .expect("a message within a second")
        .unwrap()
        .unwrap()
}

/// The next lease end, skipping heartbeats.
async fn next(stream: &mut Watch) -> WatchRevocationsResponse {
    loop {
        let message = next_message(stream).await;
        if !message.heartbeat {
            return message;
        }
    }
}

/// Nothing but heartbeats for a while (no duplicates, no stray events).
async fn quiet(stream: &mut Watch) {
    let wait = tokio::time::timeout(Duration::from_millis(300), async {
        loop {
            let m = stream.next().await.unwrap().unwrap();
            if !m.heartbeat {
                return m;
            }
        }
    });
    if let Ok(unexpected) = wait.await {
        panic!("unexpected event {unexpected:?}");
    }
}

#[tokio::test]
async fn revocations_reach_watchers_within_a_second_and_resume_from_a_cursor() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut admin = server.admin().await;
    let before = server.issue("job-before").await.lease.unwrap();
    let a = server.issue("job-a").await.lease.unwrap();
    let b = server.issue("job-b").await.lease.unwrap();
    let c = server.issue("job-c").await.lease.unwrap();
    admin
        .revoke_lease(RevokeLeaseRequest {
            lease_id: before.lease_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap();

    // "From now": the stream opens with a heartbeat carrying its starting cursor, and
    // does not replay the end that happened before.
    let mut stream = client
        .watch_revocations(WatchRevocationsRequest {
            after_cursor: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let opening = next_message(&mut stream).await;
    assert!(opening.heartbeat);
    assert!(opening.cursor > 0);
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
    assert!(first.tokens_valid_until.unwrap().seconds >= first.ended_at.unwrap().seconds);
    assert!(first.cursor > opening.cursor);
    quiet(&mut stream).await;
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
            ..Default::default()
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
    quiet(&mut resumed).await;

    // From the start, everything is replayed.
    let mut all = client
        .watch_revocations(WatchRevocationsRequest {
            after_cursor: Some(0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for expected in [&before, &a, &b, &c] {
        assert_eq!(next(&mut all).await.lease_id, expected.lease_id);
    }

    let err = token_sdk::connect(&server.endpoint(), "mk_unknown")
        .await
        .unwrap()
        .watch_revocations(WatchRevocationsRequest {
            after_cursor: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(reason(&err), "MODULE_UNAUTHENTICATED");
    server.stop().await;
}
