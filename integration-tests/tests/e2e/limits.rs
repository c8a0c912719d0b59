//! No caller can exhaust the service, and bad input is refused clearly: stream caps, rate
//! limits with a retry delay, oversize messages, cursors from the future, lifetimes
//! below one token, invisible characters in ids, and refused credentials made visible.

use std::time::Duration;

use token_sdk::proto::{
    IntrospectTokenRequest, IssueJobTokenRequest, RefreshJobTokenRequest, WatchRevocationsRequest,
};
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{TestServer, http_get, open_watch, reason};

#[tokio::test]
async fn revocation_streams_are_capped_per_module_and_slots_come_back() {
    let server = TestServer::start_with(|c| c.limits.streams_per_module = 2).await;
    let client = server.client().await;
    let open = |mut c: token_sdk::JobTokenClient| async move {
        c.watch_revocations(WatchRevocationsRequest::default())
            .await
            .map(tonic::Response::into_inner)
    };
    let first = open(client.clone()).await.unwrap();
    let _second = open(client.clone()).await.unwrap();
    let e = open(client.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert_eq!(reason(&e), "TOO_MANY_STREAMS");
    // Another module has slots of its own.
    let other = server.client_with_key(crate::support::OTHER_KEY).await;
    let _others = open(other).await.unwrap();
    // A closed stream gives its slot back (once the server notices the hang-up).
    drop(first);
    let mut reopened = None;
    for _ in 0..50 {
        match open(client.clone()).await {
            Ok(s) => {
                reopened = Some(s);
                break;
            }
            Err(e) => assert_eq!(reason(&e), "TOO_MANY_STREAMS"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reopened.is_some(), "the slot never came back");
    server.stop().await;
}

#[tokio::test]
async fn over_the_rate_a_module_is_told_when_to_retry() {
    let server = TestServer::start_with(|c| {
        c.limits.renewals_per_second = 1;
        c.limits.introspections_per_second = 1;
    })
    .await;
    let mut client = server.client().await;
    let issued = server.issue("job").await;
    let lease_id = issued.lease.unwrap().lease_id;
    let mut refresh_token = issued.tokens.unwrap().refresh_token;
    // A burst of twice the rate passes.
    for _ in 0..2 {
        refresh_token = client
            .refresh_job_token(RefreshJobTokenRequest {
                lease_id: lease_id.clone(),
                refresh_token: refresh_token.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .tokens
            .unwrap()
            .refresh_token;
    }
    let e = client
        .refresh_job_token(RefreshJobTokenRequest {
            lease_id: lease_id.clone(),
            refresh_token: refresh_token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert_eq!(reason(&e), "RATE_LIMITED");
    let delay = e
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo with a delay");
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_secs(1),
        "{delay:?}"
    );
    // Introspection has a bucket of its own, still full.
    client
        .introspect_token(IntrospectTokenRequest { token: "x".into() })
        .await
        .unwrap();
    // After the delay the renewal passes, with the same refresh token (nothing was spent).
    tokio::time::sleep(delay).await;
    client
        .refresh_job_token(RefreshJobTokenRequest {
            lease_id,
            refresh_token,
        })
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn oversize_messages_and_future_cursors_are_refused_with_reasons() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let e = client
        .introspect_token(IntrospectTokenRequest {
            token: "x".repeat(2 * 1024 * 1024),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(reason(&e), "MESSAGE_TOO_LARGE");
    // The connection is still good.
    client
        .introspect_token(IntrospectTokenRequest { token: "x".into() })
        .await
        .unwrap();

    let e = client
        .watch_revocations(WatchRevocationsRequest {
            after_cursor: Some(u64::MAX),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(
        e.get_error_details().error_info().unwrap().metadata["field"],
        "after_cursor"
    );
    // A cursor at the head is fine: the stream opens and reports it.
    let (_stream, first) = open_watch(
        &mut client,
        WatchRevocationsRequest {
            after_cursor: Some(0),
            ..Default::default()
        },
    )
    .await;
    assert!(first.heartbeat);
    server.stop().await;
}

#[tokio::test]
async fn lifetimes_below_one_token_and_invisible_ids_are_invalid() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let request = |job: &str, lifetime: Option<prost_types::Duration>| IssueJobTokenRequest {
        subject_token: server.user_token(&["inventory.read"]),
        job_id: job.into(),
        max_lifetime: lifetime,
        ..Default::default()
    };
    let nanos = |nanos| Some(prost_types::Duration { seconds: 0, nanos });
    for lifetime in [nanos(1), nanos(999_999_999)] {
        let e = client
            .issue_job_token(request("job", lifetime))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert_eq!(
            e.get_error_details().error_info().unwrap().metadata["field"],
            "max_lifetime"
        );
    }
    for job in ["job\u{202E}gpj.exe", "job\u{200B}", "   ", "\u{FEFF}job"] {
        let e = client
            .issue_job_token(request(job, None))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{job:?}");
        assert_eq!(
            e.get_error_details().error_info().unwrap().metadata["field"],
            "job_id",
            "{job:?}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn refused_credentials_are_counted() {
    let server = TestServer::start().await;
    let mut intruder = server.client_with_key("mk_not-a-real-key").await;
    for _ in 0..3 {
        let e = intruder
            .introspect_token(IntrospectTokenRequest { token: "x".into() })
            .await
            .unwrap_err();
        assert_eq!(reason(&e), "MODULE_UNAUTHENTICATED");
    }
    let mut client = server.client().await;
    let e = client
        .issue_job_token(IssueJobTokenRequest {
            subject_token: "not-a-jwt".into(),
            job_id: "job".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "SUBJECT_TOKEN_INVALID");
    let (_, metrics) = http_get(server.http_addr(), "/metrics").await;
    let count = |method: &str, reason: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("jobtoken_auth_refusals_total")
                    && l.contains(&format!("method=\"{method}\""))
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    assert_eq!(
        count("IntrospectToken", "MODULE_UNAUTHENTICATED"),
        Some(3),
        "{metrics}"
    );
    assert_eq!(count("IssueJobToken", "SUBJECT_TOKEN_INVALID"), Some(1));
    // The refused key never shows in the metrics.
    assert!(!metrics.contains("not-a-real-key"));
    server.stop().await;
}
