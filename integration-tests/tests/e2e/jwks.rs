//! Resource servers verify job tokens offline with the published keys, using an
//! independent JWT library (jwt-simple), across a key rotation.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jwt_simple::prelude::*;
use token_sdk::proto::{GetJwksRequest, RotateSigningKeyRequest};

use crate::support::{TestServer, http_get, http_get_with};

fn verify(
    jwks: &serde_json::Value,
    token: &str,
) -> JWTClaims<serde_json::Map<String, serde_json::Value>> {
    let kid = Token::decode_metadata(token)
        .unwrap()
        .key_id()
        .unwrap()
        .to_owned();
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .expect("the token's kid is published");
    assert_eq!(jwk["kty"], "OKP");
    assert_eq!(jwk["crv"], "Ed25519");
    assert_eq!(jwk["alg"], "EdDSA");
    let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
    let key = Ed25519PublicKey::from_bytes(&x).unwrap().with_key_id(&kid);
    let options = VerificationOptions {
        allowed_issuers: Some(HashSet::from_strings(&["jobtoken"])),
        allowed_audiences: Some(HashSet::from_strings(&["jobtoken"])),
        ..Default::default()
    };
    key.verify_token(token, Some(options)).unwrap()
}

#[tokio::test]
async fn jwks_over_http_verifies_tokens_with_an_independent_library() {
    let activation = std::time::Duration::from_millis(1500);
    let server = TestServer::start_with(|c| c.key_activation_delay = activation).await;
    let issued = server.issue("job").await;
    let token = issued.tokens.unwrap().access_token;
    let (status, body) = http_get(server.http_addr(), "/.well-known/jwks.json").await;
    assert!(status.contains("200"), "{status}");
    let jwks: serde_json::Value = serde_json::from_str(&body).unwrap();
    let claims = verify(&jwks, &token);
    assert_eq!(claims.subject.as_deref(), Some("alice"));
    assert_eq!(claims.custom["tenant"], "acme");
    assert_eq!(claims.custom["act"]["sub"], "importer");
    assert_eq!(
        claims.custom["permissions"],
        serde_json::json!(["inventory.read"])
    );
    assert!(claims.custom["lease_id"].is_string() && claims.custom["job_id"] == "job");
    assert!(claims.jwt_id.is_some());

    // Tampering is caught by the independent verifier too.
    let mut parts: Vec<&str> = token.split('.').collect();
    let forged_payload = URL_SAFE_NO_PAD.encode(br#"{"sub":"mallory"}"#);
    parts[1] = &forged_payload;
    let kid = Token::decode_metadata(&token)
        .unwrap()
        .key_id()
        .unwrap()
        .to_owned();
    let jwk_x = URL_SAFE_NO_PAD
        .decode(jwks["keys"][0]["x"].as_str().unwrap())
        .unwrap();
    let key = Ed25519PublicKey::from_bytes(&jwk_x)
        .unwrap()
        .with_key_id(&kid);
    assert!(
        key.verify_token::<NoCustomClaims>(&parts.join("."), None)
            .is_err()
    );

    // After a rotation both keys are published; old and new tokens verify.
    let rotated = server
        .admin()
        .await
        .rotate_signing_key(RotateSigningKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.retired_kid, kid);
    let newer = server.issue("job-2").await.tokens.unwrap().access_token;
    let (_, body) = http_get(server.http_addr(), "/.well-known/jwks.json").await;
    let jwks: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
    assert_eq!(
        jwks["keys"][0]["kid"],
        rotated.new_kid.as_str(),
        "current key first"
    );
    verify(&jwks, &token);
    verify(&jwks, &newer);

    // The gRPC GetJwks carries the same document.
    let grpc = server
        .client()
        .await
        .get_jwks(GetJwksRequest {})
        .await
        .unwrap()
        .into_inner();
    let from_grpc: serde_json::Value = serde_json::from_str(&grpc.jwks_json).unwrap();
    assert_eq!(from_grpc, jwks);
    assert_eq!(grpc.keys.len(), 2);

    let (status, metrics) = http_get(server.http_addr(), "/metrics").await;
    assert!(status.contains("200"));
    assert!(
        metrics.contains(r#"jobtoken_grants_total{result="OK"} 2"#),
        "{metrics}"
    );
    let (status, body) = http_get(server.http_addr(), "/healthz").await;
    assert!(status.contains("200") && body.starts_with("ok"));
    server.stop().await;
}

/// `/metrics` speaks what the scraper asks for: OpenMetrics to Prometheus, the classic
/// text format (0.0.4) to everything else, with process, build and store metrics.
#[tokio::test]
async fn metrics_follow_the_accept_header() {
    let server = TestServer::start().await;
    server.issue("job").await;
    let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                      version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let (head, open) =
        http_get_with(server.http_addr(), "/metrics", &[("Accept", prometheus)]).await;
    assert!(
        head.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert!(open.contains("# TYPE jobtoken_grants counter\n"), "{open}");
    assert!(open.contains("# TYPE jobtoken_build info\n"), "{open}");

    for accept in [None, Some("text/plain;version=0.0.4"), Some("*/*")] {
        let headers: Vec<(&str, &str)> = accept.map(|a| ("Accept", a)).into_iter().collect();
        let (head, text) = http_get_with(server.http_addr(), "/metrics", &headers).await;
        assert!(
            head.contains("content-type: text/plain; version=0.0.4"),
            "{accept:?}: {head}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        // A classic parser reads the TYPE line's name as the sample's name.
        assert!(
            text.contains("# TYPE jobtoken_grants_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# HELP jobtoken_grants_total "), "{text}");
        assert!(
            text.contains(r#"jobtoken_grants_total{result="OK"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("# TYPE jobtoken_build_info gauge\n"),
            "{text}"
        );
        let version = format!(
            r#"jobtoken_build_info{{version="{}"}} 1"#,
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&version), "{text}");
        assert!(
            text.contains("# TYPE process_cpu_seconds_total counter\n"),
            "{text}"
        );
        for name in [
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} gauge\n")),
                "{name}: {text}"
            );
        }
        // Every sample line's family was declared under its own name.
        for sample in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let name = sample.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| text.contains(&format!("# TYPE {f} histogram")))
                .unwrap_or(name);
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{sample} has no TYPE"
            );
        }
    }

    // The SQLite group commit reported its batch (the grant), and the pool its size
    // (updated every second).
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let (_, text) = http_get(server.http_addr(), "/metrics").await;
    assert!(
        text.contains(r#"jobtoken_store_batch_size_count{kind="sqlite_group_commit"}"#),
        "{text}"
    );
    assert!(
        text.contains("jobtoken_store_pool_max_connections "),
        "{text}"
    );
    assert!(
        text.contains(r#"jobtoken_store_pool_connections{state="idle"}"#),
        "{text}"
    );
    server.stop().await;
}
