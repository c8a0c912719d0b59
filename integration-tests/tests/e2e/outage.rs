//! Continuity through outages (issue #10): jobs holding 2 s tokens call a resource server
//! guarded by `VerifyLayer` (no leeway) every 100 ms while the real service binary is
//! SIGKILLed and restarted on the same port and SQLite file, and while a TCP proxy
//! partitions them from it. Prints the recovery figures it measures (`--nocapture`).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use token_sdk::proto::RevokeLeaseRequest;
use token_sdk::{
    Client, EndReason, Lease, LeaseState, RevocationFeed, Verifier, VerifyError, VerifyLayer,
    WhenBlind,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::support::{ADMIN_KEY, IMPORTER_KEY, TestServer};

const BIN: &str = env!("CARGO_BIN_EXE_token-service-e2e");
/// Leases held through each outage.
const JOBS: usize = 20;
/// How often each job calls the resource server.
const CALL_EVERY: Duration = Duration::from_millis(100);
/// Extra token life, beyond the outage, that a lease needs to come through without a
/// refused request: time for a retry to land and the new token to reach the next call.
const MARGIN: Duration = Duration::from_millis(500);
/// The promise: a fresh token within this long of the service's return...
const FRESH_WITHIN: Duration = Duration::from_secs(1);
/// ...asserted for this share of the jobs, since a loaded CI machine has been seen to
/// stall a few renewal calls to a just-restarted debug build past their 1 s timeout...
const FRESH_SHARE: f64 = 0.75;
/// ...and for every job within one such retry.
const FRESH_AT_WORST: Duration = Duration::from_secs(3);

/// Checks the recovery figures, printing them.
fn assert_fresh(label: &str, mut fresh_after: Vec<Duration>) {
    fresh_after.sort();
    let n = fresh_after.len();
    let within = fresh_after.iter().filter(|d| **d < FRESH_WITHIN).count();
    eprintln!(
        "{label}: fresh token after the return: p50 {:?}, p90 {:?}, max {:?} ({n} jobs)",
        fresh_after[n / 2],
        fresh_after[n * 9 / 10],
        fresh_after[n - 1],
    );
    assert!(
        within as f64 >= FRESH_SHARE * n as f64,
        "{within} of {n} within {FRESH_WITHIN:?}: {fresh_after:?}"
    );
    assert!(fresh_after[n - 1] < FRESH_AT_WORST, "{fresh_after:?}");
}

#[allow(clippy::disallowed_methods)] // these tests measure real time
fn now() -> Instant {
    Instant::now()
}

/// The monotonic instant of a wall-clock time (a log line's timestamp).
#[allow(clippy::disallowed_methods)] // these tests measure real time
fn instant_of(at: std::time::SystemTime) -> Instant {
    let (instant, wall) = (Instant::now(), std::time::SystemTime::now());
    match wall.duration_since(at) {
        Ok(ago) => instant - ago,
        Err(ahead) => instant + ahead.duration(),
    }
}

/// The service binary, run with 2 s tokens on a data directory that outlives it.
struct Process {
    child: tokio::process::Child,
    addr: SocketAddr,
    /// When it started serving, from its own log line: reading that line may lag on a
    /// busy machine, and the service answers from this moment.
    serving: Instant,
}

fn write_config(dir: &Path) -> std::path::PathBuf {
    token_service::dev::ensure_issuer_key(dir).unwrap();
    let issuer = token_service::dev::dev_issuer_config(dir);
    let config = format!(
        r#"
data_dir = "{data}"
admin_key_sha256 = "{admin}"
access_token_ttl = "2s"
idle_timeout = "10s"
refresh_grace = "4s"

[[modules]]
id = "importer"
key_sha256 = "{module}"
delegable = ["inventory.*"]

[[trusted_issuers]]
issuer = "{issuer}"
public_key_file = "{public}"
algorithm = "EdDSA"
"#,
        data = dir.display(),
        admin = token_service::secrets::key_hash(ADMIN_KEY),
        module = token_service::secrets::key_hash(IMPORTER_KEY),
        issuer = issuer.issuer,
        public = issuer.public_key_file.unwrap().display(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, config).unwrap();
    path
}

impl Process {
    /// Starts the binary listening on `listen` and returns once it serves.
    async fn start(dir: &Path, listen: &str) -> Process {
        let config = dir.join("config.toml");
        let mut child = tokio::process::Command::new(BIN)
            .args(["serve", "--config", config.to_str().unwrap()])
            .env("JOBTOKEN_GRPC_LISTEN", listen)
            .env("JOBTOKEN_HTTP_LISTEN", "127.0.0.1:0")
            .env("JOBTOKEN_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the service binary");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (addr, serving) = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && let Some(addr) = v["fields"]["grpc_addr"].as_str()
                {
                    let at = v["timestamp"].as_str().unwrap();
                    let at = humantime::parse_rfc3339(at).unwrap();
                    return (addr.parse().unwrap(), instant_of(at));
                }
                eprintln!("service: {line}");
            }
            panic!("the service exited before serving");
        })
        .await
        .expect("the service serves within 20 s");
        // Keep draining its log, so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Process {
            child,
            addr,
            serving,
        }
    }

    async fn kill_9(mut self) {
        self.child.start_kill().unwrap(); // SIGKILL on Unix
        self.child.wait().await.unwrap();
    }
}

/// A TCP proxy that can partition its clients from the service: while cut, nothing it
/// has read is forwarded and new connections wait, as behind a black hole; on heal,
/// everything flows again.
struct Proxy {
    addr: SocketAddr,
    open: watch::Sender<bool>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, _) = watch::channel(true);
        let gate = open.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut gate = gate.subscribe();
                tokio::spawn(async move {
                    let _ = gate.wait_for(|open| *open).await;
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::spawn(pump(client_read, server_write, gate.clone()));
                    tokio::spawn(pump(server_read, client_write, gate));
                });
            }
        });
        Proxy { addr, open }
    }

    fn cut(&self) {
        self.open.send_replace(false);
    }

    fn heal(&self) {
        self.open.send_replace(true);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut gate: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if gate.wait_for(|open| *open).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// A resource server: a gRPC service (health, standing in for any API) behind the SDK's
/// `VerifyLayer`.
async fn resource_server(verifier: Verifier) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(VerifyLayer::new(verifier).require(["inventory.write"]))
            .add_service(health)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

/// One job: its lease, every token it received (arrival, expiry) and every refused call.
struct Job {
    lease: Lease,
    tokens: Arc<Mutex<Vec<(Instant, Instant)>>>,
    refused: Arc<Mutex<Vec<Instant>>>,
}

impl Job {
    async fn start(
        client: &Client,
        service: &TestServerOrDir<'_>,
        n: usize,
        resource: SocketAddr,
    ) -> Job {
        let lease = client
            .lease(
                format!("import-{n}"),
                service.user_token(&["inventory.read", "inventory.write"]),
            )
            .permissions(["inventory.write"])
            .max_lifetime(Duration::from_secs(3600))
            .start()
            .await
            .unwrap();
        let first = lease.access_token().expires_at();
        let tokens = Arc::new(Mutex::new(vec![(now(), first)]));
        let mut changes = lease.changes();
        let log = Arc::clone(&tokens);
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let expires = changes.borrow_and_update().expires_at();
                log.lock().unwrap().push((now(), expires));
            }
        });
        let refused = Arc::new(Mutex::new(Vec::new()));
        let (log, worker) = (Arc::clone(&refused), lease.clone());
        tokio::spawn(async move {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{resource}"))
                .unwrap()
                .connect_lazy();
            let mut api = HealthClient::with_interceptor(channel, worker.interceptor());
            // Bounded: no job outlives a few minutes, whatever happens to the test.
            let deadline = now() + Duration::from_secs(240);
            while now() < deadline && worker.state() == LeaseState::Active {
                let call = api.check(HealthCheckRequest::default()).await;
                if call.is_err_and(|s| s.code() == Code::Unauthenticated) {
                    log.lock().unwrap().push(now());
                }
                tokio::time::sleep(CALL_EVERY).await;
            }
        });
        Job {
            lease,
            tokens,
            refused,
        }
    }

    /// Expiry of the token held at `at`.
    fn expiry_at(&self, at: Instant) -> Instant {
        let tokens = self.tokens.lock().unwrap();
        tokens.iter().rev().find(|(got, _)| *got <= at).unwrap().1
    }

    /// The first token received after `at` (for an outage: the first the service gave
    /// after it began, possibly just before the test saw it back).
    fn first_token_after(&self, at: Instant) -> Option<Instant> {
        let tokens = self.tokens.lock().unwrap();
        tokens.iter().map(|(got, _)| *got).find(|got| *got >= at)
    }

    fn refused_between(&self, from: Instant, to: Instant) -> usize {
        let refused = self.refused.lock().unwrap();
        refused.iter().filter(|t| **t >= from && **t <= to).count()
    }
}

/// Where user tokens are minted: the dev issuer of a data directory.
enum TestServerOrDir<'a> {
    Server(&'a TestServer),
    Dir(&'a Path),
}

impl TestServerOrDir<'_> {
    fn user_token(&self, permissions: &[&str]) -> String {
        match self {
            TestServerOrDir::Server(server) => server.user_token(permissions),
            TestServerOrDir::Dir(dir) => {
                use token_service::clock::Clock;
                let request = token_service::dev::DevTokenRequest {
                    user: "alice".into(),
                    tenant: "acme".into(),
                    permissions: permissions.iter().map(|s| s.to_string()).collect(),
                    ttl: Duration::from_secs(600),
                };
                token_service::dev::mint_dev_token(
                    dir,
                    &request,
                    token_service::clock::SystemClock.now(),
                )
                .unwrap()
            }
        }
    }
}

/// What one outage did to the jobs.
#[derive(Default)]
struct Report {
    /// Jobs whose token outlived the outage by `MARGIN`, and the calls refused to them.
    covered: usize,
    covered_refusals: usize,
    /// Jobs whose token expired during the outage, and the delay to their fresh token.
    fresh_after: Vec<Duration>,
}

fn analyse(jobs: &[Job], down: Instant, back: Instant, label: &str) -> Report {
    let mut report = Report::default();
    let outage = back - down;
    let mut between = (0, 0);
    let mut total = 0;
    for job in jobs {
        let left = job.expiry_at(down).saturating_duration_since(down);
        let refusals = job.refused_between(down, back + Duration::from_secs(3));
        total += refusals;
        if left > outage + MARGIN {
            report.covered += 1;
            report.covered_refusals += refusals;
        } else if left > outage {
            between = (between.0 + 1, between.1 + refusals);
        } else {
            let fresh = job
                .first_token_after(down)
                .expect("a fresh token after the return");
            report
                .fresh_after
                .push(fresh.saturating_duration_since(back));
        }
    }
    report.fresh_after.sort();
    eprintln!(
        "{label}: outage {outage:?}, {total} calls refused; {} jobs whose token outlived it by {MARGIN:?}, {} refusals \
         among them; {} jobs with less to spare, {} refusals; fresh token after the return \
         for {} expired jobs: {:?}",
        report.covered,
        report.covered_refusals,
        between.0,
        between.1,
        report.fresh_after.len(),
        report.fresh_after,
    );
    report
}

async fn client(endpoint: String) -> Client {
    Client::builder(endpoint)
        .module_key(IMPORTER_KEY)
        .connect()
        .await
        .unwrap()
}

/// Resolves once the resource server refuses `token`.
async fn refused(verifier: &Verifier, token: &str) {
    while verifier.verify(token).await.is_ok() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_keep_their_tokens_through_sigkill_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path());
    let mut service = Process::start(dir.path(), "127.0.0.1:0").await;
    let addr = service.addr;
    let endpoint = format!("http://{addr}");
    let jobs_client = client(endpoint.clone()).await;
    let verifier = client(endpoint.clone())
        .await
        .verifier()
        .leeway(Duration::ZERO)
        .build()
        .await
        .unwrap();
    let resource = resource_server(verifier.clone()).await;
    // A resource server that will not trust a revocation set more than 1 s stale (with a
    // long leeway, so tokens stay valid through the outage and only blindness refuses).
    let strict = client(endpoint.clone())
        .await
        .verifier()
        .leeway(Duration::from_secs(60))
        .max_blind(Duration::from_secs(1), WhenBlind::Refuse)
        .build()
        .await
        .unwrap();
    // One that asks the service instead while blind.
    let asking = client(endpoint.clone())
        .await
        .verifier()
        .leeway(Duration::from_secs(60))
        .max_blind(Duration::from_secs(1), WhenBlind::Introspect)
        .build()
        .await
        .unwrap();
    let mut jobs = Vec::new();
    for n in 0..JOBS {
        jobs.push(Job::start(&jobs_client, &TestServerOrDir::Dir(dir.path()), n, resource).await);
        // Spread over a token's life, so each outage finds tokens at every age.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Down for about 0.2 s, 0.6 s, 1 s and 3 s (plus the restart), at arbitrary moments.
    let mut fresh_after = Vec::new();
    let mut covered = 0;
    for (round, downtime) in [200u64, 600, 1000, 3000].into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(300 + 370 * round as u64)).await;
        let down = now();
        service.kill_9().await;
        tokio::time::sleep(Duration::from_millis(downtime)).await;
        if downtime > 2000 {
            let token = jobs[1].lease.access_token().secret().to_owned();
            let blind = strict.revocation_feed().blind_for(now());
            assert!(blind > Some(Duration::from_secs(1)), "{blind:?}");
            assert_eq!(strict.verify(&token).await, Err(VerifyError::Unavailable));
            // Asking a service that is down: refused too, never accepted blind.
            assert_eq!(asking.verify(&token).await, Err(VerifyError::Unavailable));
        }
        service = Process::start(dir.path(), &addr.to_string()).await;
        let back = service.serving;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let report = analyse(&jobs, down, back, &format!("kill -9, round {round}"));
        eprintln!("kill -9, round {round}: {:?}", jobs_client.renewal_stats());
        assert_eq!(
            report.covered_refusals, 0,
            "round {round}: a job whose token outlived the outage had a call refused"
        );
        covered += report.covered;
        fresh_after.extend(report.fresh_after);
    }
    assert!(
        covered > 0,
        "no job had a token to spare: the check above was empty"
    );
    // The 3 s outage outlives every 2 s token.
    assert!(fresh_after.len() >= JOBS, "{}", fresh_after.len());
    assert_fresh("kill -9", fresh_after);
    for job in &jobs {
        assert_eq!(job.lease.state(), LeaseState::Active);
    }
    assert_eq!(verifier.revocation_feed(), RevocationFeed::Live);
    let token = jobs[1].lease.access_token().secret().to_owned();
    assert!(
        strict.verify(&token).await.is_ok(),
        "trusted again once live"
    );
    assert!(asking.verify(&token).await.is_ok());
    assert_eq!(jobs[0].lease.revocation_feed(), RevocationFeed::Live);
    let stats = jobs_client.renewal_stats();
    assert!(stats.outages >= 2, "{stats:?}");
    assert!(stats.expired_token_time > Duration::ZERO, "{stats:?}");

    // A revoke issued right after a restart reaches the job and the resource server
    // within a second, although both streams are still reconnecting.
    service.kill_9().await;
    let service = Process::start(dir.path(), &addr.to_string()).await;
    let job = &jobs[0];
    let token = job.lease.access_token().secret().to_owned();
    token_sdk::connect_admin(&endpoint, ADMIN_KEY)
        .await
        .unwrap()
        .revoke_lease(RevokeLeaseRequest {
            lease_id: job.lease.info().lease_id.clone(),
            reason: "revoked right after a restart".into(),
        })
        .await
        .unwrap();
    let revoked = now();
    let end = tokio::time::timeout(Duration::from_secs(1), job.lease.ended())
        .await
        .expect("the job hears of the revoke within a second");
    assert_eq!(end.reason, EndReason::Revoked);
    let job_heard = now() - revoked;
    tokio::time::timeout(Duration::from_secs(1), refused(&verifier, &token))
        .await
        .expect("the resource server refuses the token within a second");
    eprintln!(
        "revoke after restart: job {job_heard:?}, resource server {:?}",
        now() - revoked
    );
    service.kill_9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_keep_their_tokens_through_a_partition() {
    let server = TestServer::start_with(|c| {
        c.access_token_ttl = Duration::from_secs(2);
        c.idle_timeout = Duration::from_secs(10);
        c.refresh_grace = Duration::from_secs(4);
    })
    .await;
    let upstream: SocketAddr = server.endpoint()["http://".len()..].parse().unwrap();
    let proxy = Proxy::start(upstream).await;
    let endpoint = format!("http://{}", proxy.addr);
    let jobs_client = client(endpoint.clone()).await;
    let verifier = client(endpoint.clone())
        .await
        .verifier()
        .leeway(Duration::ZERO)
        .build()
        .await
        .unwrap();
    let resource = resource_server(verifier.clone()).await;
    let mut jobs = Vec::new();
    for n in 0..JOBS {
        jobs.push(Job::start(&jobs_client, &TestServerOrDir::Server(&server), n, resource).await);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut fresh_after = Vec::new();
    for (round, cut) in [700u64, 4000].into_iter().enumerate() {
        let down = now();
        proxy.cut();
        let revoked = (round == 1).then(|| {
            // Revoked during the partition, straight at the service.
            jobs.last().unwrap()
        });
        if let Some(job) = revoked {
            server
                .admin()
                .await
                .revoke_lease(RevokeLeaseRequest {
                    lease_id: job.lease.info().lease_id.clone(),
                    reason: "revoked during a partition".into(),
                })
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(cut)).await;
        proxy.heal();
        let back = now();
        if let Some(job) = revoked {
            let token = job.lease.access_token().secret().to_owned();
            let end = tokio::time::timeout(Duration::from_secs(1), job.lease.ended())
                .await
                .expect("the job hears of a revoke made during the partition within 1 s");
            assert_eq!(end.reason, EndReason::Revoked);
            let job_heard = now() - back;
            tokio::time::timeout(Duration::from_secs(1), refused(&verifier, &token))
                .await
                .expect("the resource server refuses it within 1 s of the heal");
            eprintln!(
                "revoke during a partition, after the heal: job {job_heard:?}, resource server {:?}",
                now() - back
            );
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let live = &jobs[..JOBS - 1];
        let report = analyse(live, down, back, &format!("partition, round {round}"));
        assert_eq!(report.covered_refusals, 0, "round {round}");
        fresh_after.extend(report.fresh_after);
    }
    assert!(fresh_after.len() >= JOBS - 1, "{}", fresh_after.len());
    assert_fresh("partition", fresh_after);
    // Renewals cancelled over the stalled connection did not get it closed under the
    // others (the server's reset guard answers that with RESOURCE_EXHAUSTED).
    let stats = jobs_client.renewal_stats();
    eprintln!("partition: {stats:?}");
    assert!(
        stats
            .failures
            .iter()
            .all(|(code, _)| *code != Code::ResourceExhausted),
        "{stats:?}"
    );
    for job in &jobs[..JOBS - 1] {
        assert_eq!(job.lease.state(), LeaseState::Active);
    }
    server.stop().await;
}
