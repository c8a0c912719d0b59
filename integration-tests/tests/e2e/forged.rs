//! Forged and malformed subject and refresh tokens over real gRPC (issue #9): each class
//! is refused with its stable reason while its well-formed twin is granted, so the rule
//! holds at the API and not only in the unit that implements it.

use aws_lc_rs::signature::Ed25519KeyPair;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD as B64};
use serde_json::{Value, json};
use token_sdk::proto::{IssueJobTokenRequest, IssueJobTokenResponse, RefreshJobTokenRequest};
use token_service::clock::{Clock, SystemClock, to_unix_secs};
use token_service::dev::DEV_ISSUER;

use crate::support::{TestServer, reason};

const HEADER: &str = r#"{"alg":"EdDSA","typ":"JWT"}"#;

/// Signs header and payload text exactly as given with the dev issuer's key, so a test
/// can send what no JWT library would write (a member named twice, a float `nbf`).
struct Forger {
    key: Ed25519KeyPair,
    now: i64,
}

impl Forger {
    fn new(server: &TestServer) -> Self {
        // The dev issuer's private key, PKCS#8 PEM, beside its public key.
        let pem = std::fs::read_to_string(server.data_dir().join("dev-issuer-key.pem")).unwrap();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let key = Ed25519KeyPair::from_pkcs8(&STANDARD.decode(body).unwrap()).unwrap();
        Self {
            key,
            now: to_unix_secs(SystemClock.now()),
        }
    }

    fn sign(&self, header: &str, payload: &str) -> String {
        let input = format!("{}.{}", B64.encode(header), B64.encode(payload));
        let sig = self.key.sign(input.as_bytes());
        format!("{input}.{}", B64.encode(sig.as_ref()))
    }

    /// Claims the dev issuer would sign for alice of acme.
    fn claims(&self) -> Value {
        json!({"iss": DEV_ISSUER, "sub": "alice", "tenant": "acme",
               "permissions": ["inventory.read"], "iat": self.now, "exp": self.now + 600})
    }

    fn with(&self, name: &str, value: Value) -> String {
        let mut claims = self.claims();
        claims[name] = value;
        self.sign(HEADER, &claims.to_string())
    }

    /// The claims as JSON text without the closing brace, to append members to.
    fn open_claims(&self) -> String {
        let text = self.claims().to_string();
        text[..text.len() - 1].to_owned()
    }
}

async fn issue(
    server: &TestServer,
    job: &str,
    subject_token: String,
) -> Result<IssueJobTokenResponse, tonic::Status> {
    let response = server
        .client()
        .await
        .issue_job_token(IssueJobTokenRequest {
            subject_token,
            job_id: job.into(),
            permissions: vec!["inventory.read".into()],
            max_lifetime: None,
            audience: String::new(),
            ..Default::default()
        })
        .await?;
    Ok(response.into_inner())
}

/// Issues `token` and expects the refusal `want`, with `mentions` in its message.
async fn refused(server: &TestServer, case: &str, token: String, want: &str, mentions: &str) {
    let err = issue(server, case, token)
        .await
        .expect_err(&format!("{case}: granted"));
    assert_eq!(reason(&err), want, "{case}: {err:?}");
    assert!(err.message().contains(mentions), "{case}: {err:?}");
}

#[tokio::test]
async fn audience_is_required_and_well_typed_when_the_issuer_names_one() {
    let server = TestServer::start_with(|c| {
        c.trusted_issuers[0].audiences = vec!["platform".into()];
    })
    .await;
    let forger = Forger::new(&server);
    let cases = [
        (
            "aud-missing",
            forger.sign(HEADER, &forger.claims().to_string()),
        ),
        ("aud-null", forger.with("aud", json!(null))),
        ("aud-number", forger.with("aud", json!(7))),
        ("aud-bool", forger.with("aud", json!(true))),
        ("aud-object", forger.with("aud", json!({"platform": 1}))),
        ("aud-mixed", forger.with("aud", json!(["platform", 7]))),
    ];
    for (case, token) in cases {
        refused(&server, case, token, "SUBJECT_TOKEN_AUDIENCE", "audience").await;
    }
    issue(
        &server,
        "aud-ok",
        forger.with("aud", json!(["x", "platform"])),
    )
    .await
    .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn numeric_dates_take_both_number_forms_and_refuse_other_types() {
    let server = TestServer::start().await;
    let forger = Forger::new(&server);
    let now = forger.now as f64;
    issue(&server, "exp-float", forger.with("exp", json!(now + 600.5)))
        .await
        .unwrap();
    let cases = [
        (
            "nbf-float",
            forger.with("nbf", json!(now + 3600.5)),
            "SUBJECT_TOKEN_NOT_YET_VALID",
            "",
        ),
        (
            "nbf-string",
            forger.with("nbf", json!((forger.now + 3600).to_string())),
            "SUBJECT_TOKEN_INVALID",
            "nbf",
        ),
        (
            "nbf-2^63",
            forger.with("nbf", json!(1u64 << 63)),
            "SUBJECT_TOKEN_INVALID",
            "nbf",
        ),
        (
            "exp-string",
            forger.with("exp", json!((forger.now + 600).to_string())),
            "SUBJECT_TOKEN_INVALID",
            "exp",
        ),
        (
            "iat-bool",
            forger.with("iat", json!(true)),
            "SUBJECT_TOKEN_INVALID",
            "iat",
        ),
    ];
    for (case, token, want, mentions) in cases {
        refused(&server, case, token, want, mentions).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn a_member_named_twice_is_refused_in_payload_and_header() {
    let server = TestServer::start().await;
    let forger = Forger::new(&server);
    let open = forger.open_claims();
    let cases = [
        (
            "tenant-twice",
            forger.sign(HEADER, &format!(r#"{open},"tenant":"globex"}}"#)),
        ),
        (
            "permissions-twice",
            forger.sign(
                HEADER,
                &format!(r#"{open},"permissions":["inventory.write"]}}"#),
            ),
        ),
        (
            "header-alg-twice",
            forger.sign(
                r#"{"alg":"EdDSA","alg":"EdDSA"}"#,
                &forger.claims().to_string(),
            ),
        ),
    ];
    for (case, token) in cases {
        refused(
            &server,
            case,
            token,
            "SUBJECT_TOKEN_INVALID",
            "appears twice",
        )
        .await;
    }
    issue(&server, "once", forger.sign(HEADER, &format!("{open}}}")))
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn crit_is_refused_and_unknown_header_parameters_are_ignored() {
    let server = TestServer::start().await;
    let forger = Forger::new(&server);
    let claims = forger.claims().to_string();
    let crit = r#"{"alg":"EdDSA","crit":["x-policy"],"x-policy":"strict"}"#;
    refused(
        &server,
        "crit",
        forger.sign(crit, &claims),
        "SUBJECT_TOKEN_INVALID",
        "crit",
    )
    .await;
    let unknown = r#"{"alg":"EdDSA","typ":"JWT","x-n":5,"x-o":{"a":[1,null]},"x-b":false}"#;
    issue(&server, "unknown-header", forger.sign(unknown, &claims))
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn identifiers_in_the_token_must_be_printable() {
    let server = TestServer::start().await;
    let forger = Forger::new(&server);
    let cases = [
        (
            "tenant-zwsp",
            forger.with("tenant", json!("acme\u{200B}")),
            "tenant",
        ),
        (
            "tenant-padded",
            forger.with("tenant", json!("acme ")),
            "tenant",
        ),
        (
            "sub-bidi",
            forger.with("sub", json!("\u{202E}alice")),
            "sub",
        ),
        (
            "permission-zwj",
            forger.with(
                "permissions",
                json!(["inventory.read", "inventory\u{200D}.read"]),
            ),
            "permissions",
        ),
    ];
    for (case, token, claim) in cases {
        refused(&server, case, token, "SUBJECT_TOKEN_INVALID", claim).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn a_refresh_token_has_one_spelling() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let issued = server.issue("spelling").await;
    let lease_id = issued.lease.unwrap().lease_id;
    let genuine = issued.tokens.unwrap().refresh_token;
    let (generation, mac) = genuine
        .strip_prefix("jrt1.")
        .and_then(|rest| rest.split_once('.'))
        .unwrap();
    let refresh = |refresh_token: String| RefreshJobTokenRequest {
        lease_id: lease_id.clone(),
        refresh_token,
    };
    for spelling in [
        format!("0{generation}"),
        format!("+{generation}"),
        format!("00{generation}"),
    ] {
        let err = client
            .refresh_job_token(refresh(format!("jrt1.{spelling}.{mac}")))
            .await
            .expect_err(&spelling);
        assert_eq!(reason(&err), "REFRESH_TOKEN_INVALID", "{spelling}: {err:?}");
    }
    // None of them counted as a use: the genuine token still renews the lease.
    client.refresh_job_token(refresh(genuine)).await.unwrap();
    server.stop().await;
}
