//! The SDK's `Verifier` against the service's real tokens (issue #9, SDK half): the one
//! parser accepts them, requires the audience when one is configured, and refuses tokens
//! whose bytes were altered: a repeated member by name, anything else by signature.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use token_sdk::{Client, VerifyError};

use crate::support::{IMPORTER_KEY, TestServer};

#[tokio::test]
async fn real_tokens_pass_the_one_parser_and_the_audience_is_required_when_configured() {
    // Each module names the audiences its tokens may carry.
    let server = TestServer::start_with(|c| {
        let importer = c.modules.iter_mut().find(|m| m.id == "importer").unwrap();
        importer.audiences = vec!["inventory".into()];
    })
    .await;
    let client = Client::builder(server.endpoint())
        .module_key(IMPORTER_KEY)
        .connect()
        .await
        .unwrap();
    let lease = client
        .lease("verify-audience", server.user_token(&["inventory.read"]))
        .audience("inventory")
        .start()
        .await
        .unwrap();
    let token = lease.access_token().secret().to_owned();
    let build = |audience: Option<&str>| {
        let mut builder = client.verifier().watch_revocations(false);
        if let Some(audience) = audience {
            builder = builder.audience(audience);
        }
        builder.build()
    };

    let any = build(None).await.unwrap();
    let claims = any.verify(&token).await.unwrap();
    assert_eq!(claims.lease_id, lease.info().lease_id);
    assert_eq!(claims.actor, "importer");
    assert!(claims.exp > 0);
    build(Some("inventory"))
        .await
        .unwrap()
        .verify(&token)
        .await
        .unwrap();
    assert_eq!(
        build(Some("billing")).await.unwrap().verify(&token).await,
        Err(VerifyError::Invalid("wrong audience".into()))
    );

    // The same claims with a member repeated: refused as such, not read twice.
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let payload = String::from_utf8(URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
    let repeated = format!("{},\"sub\":\"mallory\"}}", payload.trim_end_matches('}'));
    parts[1] = URL_SAFE_NO_PAD.encode(repeated);
    let err = any.verify(&parts.join(".")).await.unwrap_err();
    assert_eq!(
        err,
        VerifyError::Invalid("claims: duplicate member \"sub\"".into())
    );
    // Any other change to the bytes breaks the signature.
    parts[1] = URL_SAFE_NO_PAD.encode(payload.replace("alice", "alicf"));
    assert_eq!(
        any.verify(&parts.join(".")).await,
        Err(VerifyError::Invalid("bad signature".into()))
    );
    server.stop().await;
}
