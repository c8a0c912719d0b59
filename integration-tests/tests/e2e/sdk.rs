//! The SDK against the real service: a job that outlives dozens of access tokens without
//! one rejected request, and the opposite, a revoke that stops the job within a second.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jwt_simple::prelude::*;
use token_sdk::proto::RevokeLeaseRequest;
use token_sdk::{Client, EndReason, LeaseState, Outcome};

use crate::support::{IMPORTER_KEY, TestServer, http_get};

/// A resource server's offline check: signature by a published key, and `exp` strictly.
struct ResourceServer {
    keys: HashMap<String, Ed25519PublicKey>,
}

impl ResourceServer {
    async fn new(server: &TestServer) -> Self {
        let (_, body) = http_get(server.http_addr(), "/.well-known/jwks.json").await;
        let jwks: serde_json::Value = serde_json::from_str(&body).unwrap();
        let keys = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                let kid = k["kid"].as_str().unwrap().to_owned();
                let x = URL_SAFE_NO_PAD.decode(k["x"].as_str().unwrap()).unwrap();
                let key = Ed25519PublicKey::from_bytes(&x).unwrap().with_key_id(&kid);
                (kid, key)
            })
            .collect();
        Self { keys }
    }

    fn accepts(&self, token: &str) -> bool {
        let Some(kid) = Token::decode_metadata(token)
            .ok()
            .and_then(|m| m.key_id().map(str::to_owned))
        else {
            return false;
        };
        let options = VerificationOptions {
            time_tolerance: Some(jwt_simple::prelude::Duration::from_secs(0)),
            ..Default::default()
        };
        self.keys.get(&kid).is_some_and(|k| {
            k.verify_token::<NoCustomClaims>(token, Some(options))
                .is_ok()
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_outlives_thirty_access_tokens_without_a_rejected_request() {
    let server = TestServer::start_with(|c| {
        c.access_token_ttl = Duration::from_secs(1);
        c.idle_timeout = Duration::from_secs(5);
        c.refresh_grace = Duration::from_secs(2);
    })
    .await;
    let resource = Arc::new(ResourceServer::new(&server).await);
    let client = Client::builder(server.endpoint())
        .module_key(IMPORTER_KEY)
        .connect()
        .await
        .unwrap();
    let lease = client
        .lease(
            "long-import",
            server.user_token(&["inventory.read", "inventory.write"]),
        )
        .permissions(["inventory.write"])
        .max_lifetime(Duration::from_secs(3600))
        .start()
        .await
        .unwrap();
    assert_eq!(lease.info().permissions, vec!["inventory.write"]);

    // Four workers send a request every few milliseconds for 31 s (31 token lifetimes).
    let (sent, rejected) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (lease, resource) = (lease.clone(), Arc::clone(&resource));
            let (sent, rejected) = (Arc::clone(&sent), Arc::clone(&rejected));
            tokio::spawn(async move {
                let work = async {
                    loop {
                        let token = lease.access_token();
                        sent.fetch_add(1, Ordering::Relaxed);
                        if !resource.accepts(token.secret()) {
                            rejected.fetch_add(1, Ordering::Relaxed);
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(31), work).await;
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let generation = lease.access_token().generation();
    assert!(generation >= 30, "renewed {generation} times in 31 s");
    assert!(sent.load(Ordering::Relaxed) > 4000);
    assert_eq!(
        rejected.load(Ordering::Relaxed),
        0,
        "no request was rejected"
    );
    assert_eq!(lease.state(), LeaseState::Active);
    lease.release(Outcome::Succeeded).await.unwrap();
    assert_eq!(lease.ended().await.reason, EndReason::Released);
    server.stop().await;
}

#[tokio::test]
async fn an_admin_revoke_stops_the_job_within_a_second() {
    let server = TestServer::start().await; // 5-minute tokens: no renewal will notice
    let client = Client::builder(server.endpoint())
        .module_key(IMPORTER_KEY)
        .connect()
        .await
        .unwrap();
    let lease = client
        .lease("import-to-cancel", server.user_token(&["inventory.read"]))
        .start()
        .await
        .unwrap();
    // Let the revocation stream open before revoking.
    tokio::time::sleep(Duration::from_millis(300)).await;
    server
        .admin()
        .await
        .revoke_lease(RevokeLeaseRequest {
            lease_id: lease.info().lease_id.clone(),
            reason: "wrong file".into(),
        })
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(1), lease.ended())
        .await
        .expect("the job hears of the revoke within a second");
    assert_eq!(end.reason, EndReason::Revoked);
    server.stop().await;
}

#[tokio::test]
async fn a_restarted_instance_resumes_and_the_old_one_learns_it_lost_the_lease() {
    let server = TestServer::start().await;
    let connect = || async {
        Client::builder(server.endpoint())
            .module_key(IMPORTER_KEY)
            .release_on_drop(false)
            .watch_revocations(false)
            .connect()
            .await
            .unwrap()
    };
    let old = connect()
        .await
        .lease("nightly", server.user_token(&["inventory.read"]))
        .start()
        .await
        .unwrap();
    let new = connect().await.resume("nightly").await.unwrap();
    assert_eq!(new.info().lease_id, old.info().lease_id);
    let end = old.refresh_now().await.unwrap_err();
    assert_eq!(end.reason, EndReason::Superseded);
    assert!(new.refresh_now().await.is_ok());
    server.stop().await;
}
