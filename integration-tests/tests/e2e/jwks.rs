//! Resource servers verify job tokens offline with the published keys, using an
//! independent JWT library (jwt-simple), across a key rotation.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jwt_simple::prelude::*;
use token_sdk::proto::{GetJwksRequest, RotateSigningKeyRequest};

use crate::support::{TestServer, http_get};

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
