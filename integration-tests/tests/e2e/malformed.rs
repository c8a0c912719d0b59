//! Malformed input over the wire: a clear INVALID_ARGUMENT, never a panic or INTERNAL.

use token_sdk::proto::{
    IntrospectTokenRequest, IssueJobTokenRequest, IssueJobTokenResponse, RevokeJobTokenRequest,
};
use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;

use crate::support::{IMPORTER_KEY, TestServer, reason};

/// IssueJobTokenRequest with `job_id` as raw bytes, to send invalid UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawIssueRequest {
    #[prost(string, tag = "1")]
    subject_token: String,
    #[prost(bytes = "vec", tag = "2")]
    job_id: Vec<u8>,
}

#[tokio::test]
async fn bad_utf8_is_invalid_argument() {
    let server = TestServer::start().await;
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(RawIssueRequest {
        subject_token: server.user_token(&["inventory.read"]),
        job_id: vec![b'j', 0xff, 0xfe, b'x'],
    });
    request
        .metadata_mut()
        .insert("x-module-key", IMPORTER_KEY.parse().unwrap());
    let codec = tonic_prost::ProstCodec::<RawIssueRequest, IssueJobTokenResponse>::default();
    let err = grpc
        .unary(
            request,
            PathAndQuery::from_static("/jobtoken.v1.JobTokenService/IssueJobToken"),
            codec,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(reason(&err), "INVALID_ARGUMENT");
    server.stop().await;
}

#[tokio::test]
async fn absurd_and_oversize_requests_are_refused_and_the_service_lives_on() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let base = || IssueJobTokenRequest {
        subject_token: server.user_token(&["inventory.read"]),
        job_id: "job".into(),
        permissions: vec!["inventory.read".into()],
        max_lifetime: None,
        audience: String::new(),
        ..Default::default()
    };
    let duration = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
    let cases = [
        IssueJobTokenRequest {
            max_lifetime: duration(i64::MAX, 0),
            ..base()
        },
        IssueJobTokenRequest {
            max_lifetime: duration(-5, 0),
            ..base()
        },
        IssueJobTokenRequest {
            max_lifetime: duration(10, 2_000_000_000),
            ..base()
        },
        IssueJobTokenRequest {
            max_lifetime: duration(0, 0),
            ..base()
        },
        IssueJobTokenRequest {
            permissions: (0..5000).map(|i| format!("inventory.p{i}")).collect(),
            ..base()
        },
        IssueJobTokenRequest {
            job_id: "x".repeat(100_000),
            ..base()
        },
        IssueJobTokenRequest {
            job_id: String::new(),
            ..base()
        },
        IssueJobTokenRequest {
            audience: "a\nb".into(),
            ..base()
        },
    ];
    for (i, case) in cases.into_iter().enumerate() {
        let err = client.issue_job_token(case).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "case {i}: {err:?}");
        assert_eq!(reason(&err), "INVALID_ARGUMENT", "case {i}");
    }
    let err = client
        .issue_job_token(IssueJobTokenRequest {
            subject_token: "x".repeat(20_000),
            ..base()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .revoke_job_token(RevokeJobTokenRequest {
            lease_id: "l".into(),
            outcome: 99,
            detail: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "INVALID_ARGUMENT");
    // Beyond the message size limit the transport refuses it, still with a clear code.
    let err = client
        .introspect_token(IntrospectTokenRequest {
            token: "x".repeat(2 * 1024 * 1024),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            Code::ResourceExhausted | Code::OutOfRange | Code::InvalidArgument
        ),
        "{err:?}"
    );
    // Garbage tokens are simply inactive.
    let inactive = client
        .introspect_token(IntrospectTokenRequest {
            token: "\u{1F4A9}.\u{0}.x".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!inactive.active);
    // And the service still works.
    server.issue("still-alive").await;
    server.stop().await;
}
