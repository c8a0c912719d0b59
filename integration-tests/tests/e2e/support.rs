//! A service started for one test, with two modules and an admin key.

use std::collections::BTreeSet;
use std::time::Duration;

use std::sync::Arc;
use std::time::SystemTime;
use token_sdk::proto::{
    IssueJobTokenRequest, IssueJobTokenResponse, WatchRevocationsRequest, WatchRevocationsResponse,
};
use token_sdk::{AdminClient, JobTokenClient};
use token_service::clock::{Clock, SystemClock};
use token_service::config::{Config, ModuleConfig, SecretString, StoreKind};
use token_service::dev::{self, DevTokenRequest};
use token_service::secrets::MasterKey;
use token_service::secrets::key_hash;

use token_service::lease::{Lease, LeaseEvent};
use token_service::server::{RunningServer, Server};
use token_service::store::{LeaseFilter, Logout, Retire, Store, StoreError, StoreOps, StoredKey};
use token_service::testing::TestSchema;

pub(crate) const IMPORTER_KEY: &str = "mk_importer-test-key-0123456789abcdefghijklmnop";
pub(crate) const OTHER_KEY: &str = "mk_other-test-key-0123456789abcdefghijklmnopqrs";
pub(crate) const ADMIN_KEY: &str = "ak_admin-test-key-0123456789abcdefghijklmnopqrs";

pub(crate) struct TestServer {
    running: RunningServer,
    dir: Arc<tempfile::TempDir>,
    config: Config,
    failure_rate: f64,
    /// The PostgreSQL schema, dropped with the last server (replicas share it).
    schema: Option<Arc<TestSchema>>,
}

fn module(id: &str, key: &str, delegable: &[&str]) -> ModuleConfig {
    ModuleConfig {
        delegable: delegable.iter().map(|s| s.to_string()).collect(),
        max_lifetime: Duration::from_secs(6 * 3600),
        default_lifetime: Duration::from_secs(3600),
        ..ModuleConfig::new(id, Some(key_hash(key)))
    }
}

impl TestServer {
    pub(crate) async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub(crate) async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        Self::start_flaky(adjust, 0.0).await
    }

    /// A server whose store fails `failure_rate` of lease updates with UNAVAILABLE: half
    /// before writing (a lost request), half after (a lost response).
    pub(crate) async fn start_flaky(adjust: impl FnOnce(&mut Config), failure_rate: f64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        dev::ensure_issuer_key(dir.path()).unwrap();
        let mut config = Config::for_test(dir.path());
        config.modules = vec![
            module("importer", IMPORTER_KEY, &["inventory.*"]),
            module("other", OTHER_KEY, &["*"]),
        ];
        config.admin_key_sha256 = Some(key_hash(ADMIN_KEY));
        config.trusted_issuers = vec![dev::dev_issuer_config(dir.path())];
        adjust(&mut config);
        if config.store.kind == StoreKind::Postgres && !config.master_key_path().exists() {
            std::fs::write(config.master_key_path(), MasterKey::generate().1).unwrap();
        }
        // Dropped through the test server's own URL, not a test proxy that may be gone.
        let schema = (config.store.kind == StoreKind::Postgres)
            .then(|| {
                postgres_url().map(|url| Arc::new(TestSchema::adopt(&url, &config.store.schema)))
            })
            .flatten();
        let running = launch(config.clone(), failure_rate).await;
        Self {
            running,
            dir: Arc::new(dir),
            config,
            failure_rate,
            schema,
        }
    }

    /// Another replica on the same store, data directory and master key.
    pub(crate) async fn replica(&self) -> Self {
        let mut config = self.config.clone();
        config.listen.grpc = "127.0.0.1:0".parse().unwrap();
        config.listen.http = "127.0.0.1:0".parse().unwrap();
        Self {
            running: launch(config.clone(), self.failure_rate).await,
            dir: Arc::clone(&self.dir),
            config,
            failure_rate: self.failure_rate,
            schema: self.schema.clone(),
        }
    }

    /// Stops the service and starts it again on the same address and data.
    pub(crate) async fn restart(mut self, downtime: Duration) -> Self {
        let addr = self.running.grpc_addr();
        self.running.shutdown().await;
        tokio::time::sleep(downtime).await;
        self.config.listen.grpc = addr;
        self.running = launch(self.config.clone(), self.failure_rate).await;
        self
    }

    /// Applies `adjust` to the running config, as a SIGHUP with an edited file would.
    pub(crate) fn reload(
        &self,
        adjust: impl FnOnce(&mut Config),
    ) -> token_service::reload::Reloaded {
        let mut config = self.config.clone();
        adjust(&mut config);
        self.running.reload(config).unwrap()
    }

    pub(crate) fn endpoint(&self) -> String {
        format!("http://{}", self.running.grpc_addr())
    }

    pub(crate) fn http_addr(&self) -> std::net::SocketAddr {
        self.running.http_addr()
    }

    pub(crate) fn user_token(&self, permissions: &[&str]) -> String {
        self.user_token_for(permissions, Duration::from_secs(600))
    }

    /// A user token that lives `ttl`.
    pub(crate) fn user_token_for(&self, permissions: &[&str], ttl: Duration) -> String {
        self.user_token_in("acme", permissions, ttl)
    }

    /// A user token of `tenant`.
    pub(crate) fn user_token_in(
        &self,
        tenant: &str,
        permissions: &[&str],
        ttl: Duration,
    ) -> String {
        let request = DevTokenRequest {
            user: "alice".into(),
            tenant: tenant.into(),
            permissions: permissions
                .iter()
                .map(|s| s.to_string())
                .collect::<BTreeSet<_>>(),
            ttl,
        };
        dev::mint_dev_token(self.dir.path(), &request, SystemClock.now()).unwrap()
    }

    pub(crate) async fn client(&self) -> JobTokenClient {
        token_sdk::connect(&self.endpoint(), IMPORTER_KEY)
            .await
            .unwrap()
    }

    pub(crate) async fn client_with_key(&self, key: &str) -> JobTokenClient {
        token_sdk::connect(&self.endpoint(), key).await.unwrap()
    }

    pub(crate) async fn admin(&self) -> AdminClient {
        token_sdk::connect_admin(&self.endpoint(), ADMIN_KEY)
            .await
            .unwrap()
    }

    pub(crate) async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.endpoint())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Grants a lease for `job` to the importer module.
    pub(crate) async fn issue(&self, job: &str) -> IssueJobTokenResponse {
        self.client()
            .await
            .issue_job_token(IssueJobTokenRequest {
                subject_token: self.user_token(&["inventory.read", "inventory.write"]),
                job_id: job.into(),
                permissions: vec!["inventory.read".into()],
                max_lifetime: Some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                }),
                audience: String::new(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    pub(crate) async fn stop(self) {
        self.running.shutdown().await;
    }
}

async fn launch(config: Config, failure_rate: f64) -> RunningServer {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    Server::start_custom(config, clock, |store| {
        if failure_rate > 0.0 {
            Arc::new(FlakyStore {
                inner: store,
                failure_rate,
                updates: std::sync::atomic::AtomicUsize::new(0),
                failures: std::sync::atomic::AtomicUsize::new(0),
            })
        } else {
            store
        }
    })
    .await
    .unwrap()
}

/// A store that loses some lease updates, before or after writing them. The pattern is
/// fixed (not random), so every run sees both kinds of failure.
struct FlakyStore {
    inner: Arc<dyn StoreOps>,
    failure_rate: f64,
    updates: std::sync::atomic::AtomicUsize,
    failures: std::sync::atomic::AtomicUsize,
}

fn lost() -> StoreError {
    StoreError::Unavailable("injected failure".into())
}

#[async_trait::async_trait]
impl Store for FlakyStore {
    async fn insert_lease(&self, lease: &Lease, event: &LeaseEvent) -> Result<(), StoreError> {
        self.inner.insert_lease(lease, event).await
    }
    async fn get_lease(&self, id: &str) -> Result<Option<Lease>, StoreError> {
        self.inner.get_lease(id).await
    }
    async fn find_active_lease(
        &self,
        tenant: &str,
        actor: &str,
        job: &str,
    ) -> Result<Option<Lease>, StoreError> {
        self.inner.find_active_lease(tenant, actor, job).await
    }
    async fn update_lease(
        &self,
        lease: &Lease,
        event: Option<&LeaseEvent>,
    ) -> Result<Option<i64>, StoreError> {
        // Of every ten updates, `failure_rate` fail, evenly spread; failures alternate
        // between before writing (a lost request) and after (a lost answer).
        let n = self
            .updates
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let per_ten = ((self.failure_rate * 10.0).round() as usize).clamp(1, 10);
        if (n % 10 * per_ten) % 10 >= per_ten {
            return self.inner.update_lease(lease, event).await;
        }
        let failure = self
            .failures
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if failure.is_multiple_of(2) {
            return Err(lost());
        }
        self.inner.update_lease(lease, event).await?;
        Err(lost())
    }
    async fn list_leases(
        &self,
        filter: &LeaseFilter,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        self.inner.list_leases(filter, limit).await
    }
    async fn lease_events(&self, id: &str) -> Result<Vec<LeaseEvent>, StoreError> {
        self.inner.lease_events(id).await
    }
    async fn end_events_after(
        &self,
        cursor: u64,
        limit: usize,
    ) -> Result<Vec<LeaseEvent>, StoreError> {
        self.inner.end_events_after(cursor, limit).await
    }
    async fn earliest_live_end(&self, now: SystemTime) -> Result<Option<u64>, StoreError> {
        self.inner.earliest_live_end(now).await
    }
    async fn last_event_sequence(&self) -> Result<u64, StoreError> {
        self.inner.last_event_sequence().await
    }
    async fn leases_due(&self, now: SystemTime, limit: usize) -> Result<Vec<Lease>, StoreError> {
        self.inner.leases_due(now, limit).await
    }
    async fn leases_to_log_out(
        &self,
        logout: &Logout,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        self.inner.leases_to_log_out(logout, limit).await
    }
    async fn count_active_leases(&self) -> Result<u64, StoreError> {
        self.inner.count_active_leases().await
    }
    async fn signing_keys(&self) -> Result<Vec<StoredKey>, StoreError> {
        self.inner.signing_keys().await
    }
    async fn rotate_signing_key(
        &self,
        new: &StoredKey,
        retire: Option<Retire<'_>>,
    ) -> Result<bool, StoreError> {
        self.inner.rotate_signing_key(new, retire).await
    }
    async fn purge_ended(&self, before: SystemTime, limit: usize) -> Result<usize, StoreError> {
        self.inner.purge_ended(before, limit).await
    }
}

impl StoreOps for FlakyStore {
    fn remote_ends(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.inner.remote_ends()
    }
}

/// The PostgreSQL server for tests, or `None` when PostgreSQL tests skip (see
/// `token_service::testing`).
pub(crate) fn postgres_url() -> Option<String> {
    token_service::testing::postgres_url()
}

/// Points `config` at PostgreSQL through `url`, in a schema of its own (dropped when the
/// last server using it is).
pub(crate) fn use_postgres(config: &mut Config, url: &str) {
    config.store.kind = StoreKind::Postgres;
    config.store.url = Some(SecretString::new(url));
    config.store.schema = TestSchema::fresh_name("jt_e2e");
    config.store.statement_timeout = Duration::from_secs(2);
}

/// Opens a revocation stream and returns it with its first message, which must come
/// within 2 s (the opening heartbeat once the backlog is sent).
pub(crate) async fn open_watch(
    client: &mut JobTokenClient,
    request: WatchRevocationsRequest,
) -> (
    tonic::Streaming<WatchRevocationsResponse>,
    WatchRevocationsResponse,
) {
    use tokio_stream::StreamExt as _;
    let mut stream = client
        .watch_revocations(request)
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(2), stream.next())
        .await
        .expect("a first message within 2 s")
        .unwrap()
        .unwrap();
    (stream, first)
}

/// The machine reason of a failed call.
/// An HTTP client for the tests (reqwest with the service's TLS setup: the process has
/// no default rustls provider).
pub(crate) fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(token_service::idp::tls_config(None).unwrap())
        .build()
        .unwrap()
}

/// The body of a GET.
pub(crate) async fn http_text(url: &str) -> String {
    http_client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

pub(crate) fn reason(status: &tonic::Status) -> String {
    token_sdk::error_reason(status).unwrap_or_else(|| format!("<no ErrorInfo: {status:?}>"))
}

/// A minimal HTTP/1.1 GET over a plain TCP socket: the status line and the body.
pub(crate) async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let (head, body) = http_get_with(addr, path, &[]).await;
    (head.lines().next().unwrap().to_owned(), body)
}

/// A GET with extra request headers: the whole response head and the body.
pub(crate) async fn http_get_with(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.to_owned(), body.to_owned())
}

impl TestServer {
    /// The data directory (its dev issuer signs the load generator's subject tokens).
    pub(crate) fn data_dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}
