//! The SDK against the real service: a job that outlives dozens of access tokens without
//! one rejected request, and the opposite, a revoke that stops the job within a second.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use token_sdk::proto::RevokeLeaseRequest;
use token_sdk::{Client, EndReason, LeaseState, Outcome, Verifier, VerifyLayer};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::support::{IMPORTER_KEY, TestServer};

/// A resource server: a gRPC service (health, standing in for any API) behind the SDK's
/// `VerifyLayer`, on its own port.
async fn resource_server(verifier: Verifier, required: &[&str]) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_, health) = tonic_health::server::health_reporter();
    let layer = VerifyLayer::new(verifier).require(required.iter().copied());
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(layer)
            .add_service(health)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

async fn channel(addr: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn check() -> HealthCheckRequest {
    HealthCheckRequest {
        service: String::new(),
    }
}

async fn client(server: &TestServer) -> Client {
    Client::builder(server.endpoint())
        .module_key(IMPORTER_KEY)
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_outlives_thirty_access_tokens_without_a_rejected_request() {
    // 2-second tokens: 31 lifetimes in about a minute, with the strictest verifier (no
    // leeway), on a CI machine busy with the other tests.
    let server = TestServer::start_with(|c| {
        c.access_token_ttl = Duration::from_secs(2);
        c.idle_timeout = Duration::from_secs(10);
        c.refresh_grace = Duration::from_secs(4);
    })
    .await;
    let client = client(&server).await;
    let verifier = client
        .verifier()
        .leeway(Duration::ZERO)
        .build()
        .await
        .unwrap();
    let resource = resource_server(verifier, &["inventory.write"]).await;
    // The user's own token lives 2 s: the user "logs out" right after the job starts.
    let lease = client
        .lease(
            "long-import",
            server.user_token_for(
                &["inventory.read", "inventory.write"],
                Duration::from_secs(2),
            ),
        )
        .permissions(["inventory.write"])
        .max_lifetime(Duration::from_secs(3600))
        .start()
        .await
        .unwrap();
    assert_eq!(lease.info().permissions, vec!["inventory.write"]);

    // Four workers call the resource server every few milliseconds for 62 s: 31 access
    // token lifetimes.
    let (sent, rejected) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let lease = lease.clone();
            let (sent, rejected) = (Arc::clone(&sent), Arc::clone(&rejected));
            tokio::spawn(async move {
                let mut api =
                    HealthClient::with_interceptor(channel(resource).await, lease.interceptor());
                let work = async {
                    loop {
                        sent.fetch_add(1, Ordering::Relaxed);
                        if let Err(status) = api.check(check()).await {
                            eprintln!("rejected: {status:?}");
                            rejected.fetch_add(1, Ordering::Relaxed);
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(62), work).await;
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let generation = lease.access_token().generation();
    assert!(generation >= 30, "renewed {generation} times in 62 s");
    assert!(sent.load(Ordering::Relaxed) > 2000, "{sent:?}");
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
async fn the_verifier_refuses_missing_tokens_permissions_and_revoked_leases() {
    let server = TestServer::start().await; // 5-minute tokens: no renewal will notice
    let client = client(&server).await;
    let verifier = client.verifier().build().await.unwrap();
    let open = resource_server(verifier.clone(), &[]).await;
    let strict = resource_server(verifier.clone(), &["inventory.write"]).await;
    let lease = client
        .lease("import-to-cancel", server.user_token(&["inventory.read"]))
        .start()
        .await
        .unwrap();
    let token = lease.access_token().secret().to_owned();
    let claims = verifier.verify(&token).await.unwrap();
    assert_eq!(
        (claims.subject.as_str(), claims.actor.as_str()),
        ("alice", "importer")
    );
    assert_eq!(claims.lease_id, lease.info().lease_id);

    let err = HealthClient::new(channel(open).await)
        .check(check())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "no token");
    HealthClient::with_interceptor(channel(open).await, lease.interceptor())
        .check(check())
        .await
        .unwrap();
    let err = HealthClient::with_interceptor(channel(strict).await, lease.interceptor())
        .check(check())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // Revoke: the job and the resource server both know within a second, long before
    // the token's exp. (Both streams were open before the grant returned.)
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
    let refused = async {
        loop {
            if verifier.verify(&token).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(1), refused)
        .await
        .expect("the resource server refuses the revoked lease's token within a second");
    // A verifier that starts after the revoke refuses the token too.
    let late = client.verifier().build().await.unwrap();
    assert_eq!(
        late.verify(&token).await.unwrap_err(),
        token_sdk::VerifyError::Revoked
    );
    let mut raw = tonic::Request::new(check());
    raw.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let err = HealthClient::new(channel(open).await)
        .check(raw)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
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
    let new = connect().await.resume("acme", "nightly").await.unwrap();
    assert_eq!(new.info().lease_id, old.info().lease_id);
    let end = old.refresh_now().await.unwrap_err();
    assert_eq!(end.reason, EndReason::Superseded);
    assert!(new.refresh_now().await.is_ok());
    server.stop().await;
}

/// The job keeps renewing through a restart of the service and through 30% of renewals
/// failing transiently (half of them after the rotation was written: lost responses
/// that the grace window turns into convergent retries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_ride_out_a_restart_and_transient_failures() {
    let server = TestServer::start_flaky(
        |c| {
            c.access_token_ttl = Duration::from_secs(2);
            c.idle_timeout = Duration::from_secs(10);
            c.refresh_grace = Duration::from_secs(5);
        },
        0.3,
    )
    .await;
    let client = client(&server).await;
    let verifier = client
        .verifier()
        .leeway(Duration::ZERO)
        .build()
        .await
        .unwrap();
    let lease = client
        .lease("flaky-import", server.user_token(&["inventory.read"]))
        .start()
        .await
        .unwrap();
    let checks = async {
        let mut rejected = 0;
        for _ in 0..600 {
            if verifier
                .verify(lease.access_token().secret())
                .await
                .is_err()
            {
                rejected += 1;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        rejected
    };
    assert_eq!(
        checks.await,
        0,
        "no token was refused over 12 s of flaky renewals"
    );
    let before_restart = lease.access_token().generation();
    assert!(before_restart >= 5, "{before_restart} renewals");
    let (_, metrics) = crate::support::http_get(server.http_addr(), "/metrics").await;
    assert!(
        metrics.contains(r#"jobtoken_renewals_total{result="UNAVAILABLE"}"#),
        "failures were injected:\n{metrics}"
    );

    let server = server.restart(Duration::from_millis(500)).await;
    let renewing = async {
        while lease.access_token().generation() < before_restart + 3 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(15), renewing)
        .await
        .expect("renewing again after the restart");
    assert_eq!(lease.state(), LeaseState::Active);
    assert!(verifier.verify(lease.access_token().secret()).await.is_ok());
    server.stop().await;
}

/// A resource server layer that refuses the first token it sees, as if it had expired in
/// flight, and records every token.
#[derive(Clone, Default)]
struct RefuseFirst {
    seen: Arc<std::sync::Mutex<Vec<String>>>,
}

impl<S> tower::Layer<S> for RefuseFirst {
    type Service = RefuseFirstService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RefuseFirstService {
            inner,
            seen: Arc::clone(&self.seen),
        }
    }
}

#[derive(Clone)]
struct RefuseFirstService<S> {
    inner: S,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for RefuseFirstService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let token = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let first = {
            let mut seen = self.seen.lock().unwrap();
            seen.push(token);
            seen.len() == 1
        };
        if first {
            let refused = tonic::Status::unauthenticated("token expired").into_http();
            return Box::pin(async move { Ok(refused) });
        }
        Box::pin(self.inner.call(request))
    }
}

#[tokio::test]
async fn the_auth_layer_renews_and_retries_once_when_a_token_expires_in_flight() {
    let server = TestServer::start().await;
    let client = client(&server).await;
    let lease = client
        .lease("retrying", server.user_token(&["inventory.read"]))
        .start()
        .await
        .unwrap();
    let refuse = RefuseFirst::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(refuse.clone())
            .add_service(health)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let channel = tower::ServiceBuilder::new()
        .layer(token_sdk::AuthLayer::new(lease.clone()))
        .service(channel(addr).await);
    let mut api = HealthClient::new(channel);
    api.check(check())
        .await
        .expect("retried with a renewed token");
    let seen = refuse.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "one refusal, one retry");
    assert_ne!(seen[0], seen[1], "the retry carried the renewed token");
    assert_eq!(seen[1], format!("Bearer {}", lease.access_token().secret()));
    assert_eq!(lease.access_token().generation(), 1);
    // Later calls go straight through with the current token.
    api.check(check()).await.unwrap();
    assert_eq!(refuse.seen.lock().unwrap().len(), 3);
    server.stop().await;
}
