//! Several replicas on one PostgreSQL database: any replica serves any request,
//! revocations fan out, and an outage fails fast and heals by itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use token_sdk::proto::{
    GetJwksRequest, RefreshJobTokenRequest, RevokeLeaseRequest, RotateSigningKeyRequest,
    WatchRevocationsRequest,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use tokio_stream::StreamExt;
use tonic::Code;

use crate::support::{TestServer, http_get, postgres_url, reason, use_postgres};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Two replicas on one PostgreSQL schema; `None` when PostgreSQL tests skip.
async fn pair() -> Option<(TestServer, TestServer)> {
    let url = postgres_url()?;
    let a = TestServer::start_with(|c| use_postgres(c, &url)).await;
    let b = a.replica().await;
    Some((a, b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_replica_serves_any_lease_and_racing_renewals_converge() {
    let Some((a, b)) = pair().await else { return };
    let issued = a.issue("job").await;
    let lease_id = issued.lease.unwrap().lease_id;
    let t0 = issued.tokens.unwrap().refresh_token;
    let refresh = |token: &str| RefreshJobTokenRequest {
        lease_id: lease_id.clone(),
        refresh_token: token.to_owned(),
    };
    // Granted on A, renewed on B.
    let t1 = b
        .client()
        .await
        .refresh_job_token(refresh(&t0))
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap()
        .refresh_token;
    // The same token renewed on both replicas at once: one rotation, one successor.
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let (ra, rb) = tokio::join!(
        ca.refresh_job_token(refresh(&t1)),
        cb.refresh_job_token(refresh(&t1))
    );
    let (ra, rb) = (ra.unwrap().into_inner(), rb.unwrap().into_inner());
    let successor = ra.tokens.unwrap().refresh_token;
    assert_eq!(
        successor,
        rb.tokens.unwrap().refresh_token,
        "no lost rotation, no false alarm"
    );
    assert!(ca.refresh_job_token(refresh(&successor)).await.is_ok());

    // A key rotated on A is published by B (within its 10 s reload).
    let rotated = a
        .admin()
        .await
        .rotate_signing_key(RotateSigningKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    let published = async {
        loop {
            let jwks = cb.get_jwks(GetJwksRequest {}).await.unwrap().into_inner();
            if jwks.keys.iter().any(|k| k.kid == rotated.new_kid) {
                return jwks.keys.len();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let count = tokio::time::timeout(Duration::from_secs(15), published)
        .await
        .unwrap();
    assert_eq!(count, 2, "old key still published beside the new one");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_on_one_replica_reaches_watchers_of_another_within_a_second() {
    let Some((a, b)) = pair().await else { return };
    let first = a.issue("job-1").await.lease.unwrap().lease_id;
    let second = a.issue("job-2").await.lease.unwrap().lease_id;
    let mut stream = b
        .client()
        .await
        .watch_revocations(WatchRevocationsRequest {
            after_cursor: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let opening = stream.next().await.unwrap().unwrap();
    assert!(opening.heartbeat);
    let revoke = |id: &str| RevokeLeaseRequest {
        lease_id: id.to_owned(),
        reason: "test".into(),
    };
    a.admin().await.revoke_lease(revoke(&first)).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(1), stream.next())
        .await
        .expect("within a second")
        .unwrap()
        .unwrap();
    assert_eq!(event.lease_id, first);
    drop(stream);

    // Reconnecting to the other replica with the cursor misses nothing.
    a.admin().await.revoke_lease(revoke(&second)).await.unwrap();
    let mut resumed = a
        .client()
        .await
        .watch_revocations(WatchRevocationsRequest {
            after_cursor: Some(event.cursor),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let next = loop {
        let m = resumed.next().await.unwrap().unwrap();
        if !m.heartbeat {
            break m;
        }
    };
    assert_eq!(next.lease_id, second);
    a.stop().await;
    b.stop().await;
}

/// A loopback TCP proxy to PostgreSQL that can be cut (every connection dropped, new
/// ones refused) and restored.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<JoinSet<()>>>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(JoinSet::new()));
        let (flag, set) = (Arc::clone(&cut), Arc::clone(&conns));
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if flag.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused in effect
                }
                set.lock().await.spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Proxy { addr, cut, conns }
    }

    async fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.conns.lock().await.abort_all();
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_fails_fast_with_unavailable_and_heals_by_itself() {
    let Some(real) = postgres_url() else { return };
    let upstream = token_service::testing::postgres_addr(&real)
        .expect("the test URL names the server by IP address and port");
    let proxy = Proxy::start(upstream).await;
    let url = real.replacen(&upstream.to_string(), &proxy.addr.to_string(), 1);
    assert!(
        url.contains(&proxy.addr.to_string()),
        "the test URL spells the server as {upstream}"
    );
    let server = TestServer::start_with(|c| use_postgres(c, &url)).await;
    let issued = server.issue("job").await;
    let lease_id = issued.lease.unwrap().lease_id;
    let token = issued.tokens.unwrap().refresh_token;
    let mut client = server.client().await;
    let refresh = || RefreshJobTokenRequest {
        lease_id: lease_id.clone(),
        refresh_token: token.clone(),
    };

    proxy.cut().await;
    let err = tokio::time::timeout(Duration::from_secs(5), client.refresh_job_token(refresh()))
        .await
        .expect("fails fast")
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(reason(&err), "UNAVAILABLE");
    assert!(
        !err.message().contains("127.0.0.1"),
        "no internals leak: {}",
        err.message()
    );

    proxy.restore();
    // The same token still renews once PostgreSQL is back: nothing was half-written.
    let healed = async {
        loop {
            match client.refresh_job_token(refresh()).await {
                Ok(r) => return r.into_inner(),
                Err(e) => assert_eq!(e.code(), Code::Unavailable, "{e:?}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let renewed = tokio::time::timeout(Duration::from_secs(15), healed)
        .await
        .expect("heals");
    assert!(renewed.tokens.is_some());
    server.stop().await;
}

/// The gRPC health status of the whole server and `/readyz`'s status line.
async fn readiness(server: &TestServer) -> (ServingStatus, String) {
    let mut health = HealthClient::new(server.channel().await);
    let status = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    let (line, _) = http_get(server.http_addr(), "/readyz").await;
    (status, line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_database_while_liveness_stays_ok() {
    let Some(real) = postgres_url() else { return };
    let upstream = token_service::testing::postgres_addr(&real)
        .expect("the test URL names the server by IP address and port");
    let proxy = Proxy::start(upstream).await;
    let url = real.replacen(&upstream.to_string(), &proxy.addr.to_string(), 1);
    let server = TestServer::start_with(|c| use_postgres(c, &url)).await;
    let (status, line) = readiness(&server).await;
    assert_eq!(status, ServingStatus::Serving);
    assert!(line.contains("200"), "{line}");

    proxy.cut().await;
    // The store probe and the key reload both notice; whichever is first, the store's
    // own probe is reported within the bound.
    let down = async {
        loop {
            let (status, line) = readiness(&server).await;
            let (_, body) = http_get(server.http_addr(), "/readyz").await;
            if status == ServingStatus::NotServing
                && line.contains("503")
                && body.contains("store unreachable")
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), down)
        .await
        .expect("not ready, store unreachable, within 10 s of the database going away");
    let (live, body) = http_get(server.http_addr(), "/healthz").await;
    assert!(live.contains("200") && body == "ok\n", "{live} {body}");

    proxy.restore();
    let up = async {
        loop {
            let (status, line) = readiness(&server).await;
            if status == ServingStatus::Serving && line.contains("200") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), up)
        .await
        .expect("ready again within 10 s of the database coming back");
    server.stop().await;
}
