//! Wiring: builds the domain from config, serves gRPC and HTTP, runs the sweeper, and
//! shuts down gracefully.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use jobtoken_proto::jobtoken::v1::admin_service_server::AdminServiceServer;
use jobtoken_proto::jobtoken::v1::job_token_service_server::JobTokenServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::clock::{Clock, SystemClock};
use crate::config::StoreKind;
use crate::config::{Config, StartupError};
use crate::dev::load_or_create_master_key;
use crate::grpc::{AdminApi, JobTokenApi, RpcObserver};
use crate::idp::HttpClient;
use crate::keys::KeyRing;
use crate::limits::MAX_MESSAGE_BYTES;
use crate::metrics::Metrics;
use crate::ready::{Check, Readiness};
use crate::reload::{IssuerFactory, Live, Reloaded};
use crate::service::LeaseService;
use crate::store::postgres::PostgresOptions;
use crate::store::{PostgresStore, SqliteStore, Store, StoreOps};

/// How often expired and idle leases are swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How often keys are re-read (another replica may rotate).
const KEY_RELOAD_INTERVAL: Duration = Duration::from_secs(10);
/// How often leases past their retention are deleted.
const CLEANUP_INTERVAL: Duration = Duration::from_secs(60);
/// How often a revocation stream re-reads the store without a local wake-up.
const WATCH_POLL: Duration = Duration::from_secs(1);

/// Starts servers.
#[derive(Debug)]
pub struct Server;

/// A started service: its bound addresses and a handle to stop it.
#[derive(Debug)]
pub struct RunningServer {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    service: Arc<LeaseService>,
    live: Arc<Live>,
    /// The config running now (reloads compare against it).
    config: std::sync::Mutex<Config>,
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, StartupError> {
    std::fs::read(path).map_err(|source| StartupError::Io {
        path: path.to_owned(),
        source,
    })
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartupError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartupError::Bind { addr, source })
}

impl Server {
    /// Starts the service with the system clock.
    pub async fn start(config: Config) -> Result<RunningServer, StartupError> {
        Self::start_with_clock(config, Arc::new(SystemClock)).await
    }

    /// Starts the service with the given clock (tests move time by hand).
    pub async fn start_with_clock(
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> Result<RunningServer, StartupError> {
        Self::start_custom(config, clock, |store| store).await
    }

    /// Starts the service with the given clock, wrapping the store it opens with `wrap`
    /// (tests inject store failures this way).
    pub async fn start_custom(
        config: Config,
        clock: Arc<dyn Clock>,
        wrap: impl FnOnce(Arc<dyn StoreOps>) -> Arc<dyn StoreOps>,
    ) -> Result<RunningServer, StartupError> {
        config.validate()?;
        let master_path = config.master_key_path();
        let shared_store = config.store.kind == StoreKind::Postgres;
        if shared_store && !master_path.exists() {
            // Replicas must share one master key; making one here would split them.
            return Err(StartupError::Key {
                path: master_path,
                problem: "missing: with store.kind = \"postgres\" every replica needs the same \
                          master key; create it once with `token-service gen-master-key`"
                    .into(),
            });
        }
        if !shared_store && !master_path.exists() && config.store_path().exists() {
            // Generating a new key would orphan every sealed signing key in the store.
            return Err(StartupError::Key {
                path: master_path,
                problem: "missing, but the database already exists: restore the master key \
                          that sealed it (a new one cannot open its signing keys)"
                    .into(),
            });
        }
        let master = load_or_create_master_key(&master_path)?;
        let store: Arc<dyn StoreOps> = match config.store.kind {
            StoreKind::Sqlite => Arc::new(SqliteStore::open(
                &config.store_path(),
                config.store.sync,
                config.store.lease_cache,
            )?),
            StoreKind::Postgres => {
                let options = PostgresOptions {
                    url: config
                        .store
                        .url
                        .as_ref()
                        .map(|u| u.expose().to_owned())
                        .unwrap_or_default(),
                    schema: config.store.schema.clone(),
                    max_connections: config.store.max_connections,
                    statement_timeout: config.store.statement_timeout,
                    ca_file: config.store.ca_file.clone(),
                };
                Arc::new(PostgresStore::connect(&options).await?)
            }
        };
        let store = wrap(store);
        let remote_ends = store.remote_ends();
        let retain = crate::keys::retention(config.access_token_ttl, config.refresh_grace);
        let keys = Arc::new(
            KeyRing::load(
                Arc::clone(&store) as Arc<dyn Store>,
                master.clone(),
                retain,
                config.key_activation_delay,
                clock.now(),
            )
            .await?,
        );
        let metrics = Arc::new(Metrics::new());
        {
            let metrics = Arc::clone(&metrics);
            store.observe_batches(Arc::new(move |kind, size| metrics.store_batch(kind, size)));
        }
        let pool_source = Arc::clone(&store);
        // Trusted issuers (keys, permission sources) are rebuilt by a reload from the
        // same parts.
        let issuers = IssuerFactory {
            http: Arc::new(HttpClient::new(config.idp_ca_file.as_deref())?),
            clock: Arc::clone(&clock),
            metrics: Arc::clone(&metrics),
        };
        let (subjects, permission_source) = issuers.build(&config.trusted_issuers)?;
        let service = Arc::new(
            LeaseService::new(
                Arc::clone(&store) as Arc<dyn Store>,
                Arc::clone(&keys),
                master,
                subjects,
                Arc::clone(&clock),
                config.settings(),
                Arc::clone(&metrics) as Arc<dyn crate::ports::Observer>,
            )
            .with_permission_source(permission_source),
        );
        let live = Arc::new(Live::new(&config, issuers));

        let grpc_listener = bind(config.listen.grpc).await?;
        let http_listener = bind(config.listen.http).await?;
        let grpc_addr = grpc_listener
            .local_addr()
            .map_err(|source| StartupError::Bind {
                addr: config.listen.grpc,
                source,
            })?;
        let http_addr = http_listener
            .local_addr()
            .map_err(|source| StartupError::Bind {
                addr: config.listen.http,
                source,
            })?;

        // Set to SERVING (or not) by `report_health`, from readiness.
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        for name in HEALTH_NAMES {
            health_reporter
                .set_service_status(name, tonic_health::ServingStatus::Serving)
                .await;
        }
        // Both reflection versions describe everything served, including each other and
        // google.rpc error details, so any grpcurl lists all services and decodes ErrorInfo.
        let reflection = |b: tonic_reflection::server::Builder<'static>| {
            b.include_reflection_service(false)
                .register_encoded_file_descriptor_set(jobtoken_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(
                    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                )
        };
        let reflection_v1 = reflection(tonic_reflection::server::Builder::configure())
            .build_v1()
            .map_err(|e| StartupError::Invalid(format!("reflection: {e}")))?;
        let reflection_v1alpha = reflection(tonic_reflection::server::Builder::configure())
            .build_v1alpha()
            .map_err(|e| StartupError::Invalid(format!("reflection: {e}")))?;

        let (shutdown, _) = watch::channel(false);
        let readiness = Arc::new(Readiness::new());
        let observer = Arc::new(RpcObserver::new(Arc::clone(&metrics)));
        let job_api = JobTokenApi::new(
            Arc::clone(&service),
            Arc::clone(&live),
            Arc::clone(&observer),
            WATCH_POLL,
            shutdown.subscribe(),
        );
        let admin_api = AdminApi::new(Arc::clone(&service), Arc::clone(&live), observer);

        // A client whose calls timed out together over a stalled connection cancels them
        // together when it resumes; past h2's default guard (20 cancelled streams not yet
        // accepted) the server would close the whole connection with ENHANCE_YOUR_CALM,
        // failing every other call on it. Still bounded, as h2's other reset limits are.
        const MAX_PENDING_ACCEPT_RESETS: usize = 1024;
        let mut builder = tonic::transport::Server::builder()
            .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESETS))
            .max_concurrent_streams(Some(config.limits.concurrent_streams_per_connection));
        if let Some(tls) = &config.tls {
            let identity = Identity::from_pem(read(&tls.cert_file)?, read(&tls.key_file)?);
            let mut tls_config = ServerTlsConfig::new().identity(identity);
            if let Some(ca) = &tls.client_ca_file {
                tls_config = tls_config
                    .client_ca_root(Certificate::from_pem(read(ca)?))
                    .client_auth_optional(true);
            }
            builder = builder
                .tls_config(tls_config)
                .map_err(|e| StartupError::Tls(e.to_string()))?;
        }
        let router = builder
            .layer(crate::grpc::status::too_large_layer())
            .add_service(
                JobTokenServiceServer::new(job_api).max_decoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                AdminServiceServer::new(admin_api).max_decoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);

        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let mut tasks = JoinSet::new();
        let grpc_stop = stopped(shutdown.subscribe());
        tasks.spawn(async move {
            // Without TCP_NODELAY, a response written in two parts waits for the client's
            // delayed ACK (~40 ms) between them.
            let incoming =
                tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, grpc_stop)
                .await
            {
                tracing::error!(error = %e, "gRPC server failed");
            }
        });
        let http_stop = stopped(shutdown.subscribe());
        let http_app = crate::http::router(
            Arc::clone(&service),
            Arc::clone(&metrics),
            Arc::clone(&readiness),
        );
        tasks.spawn(async move {
            if let Err(e) = axum::serve(http_listener, http_app)
                .with_graceful_shutdown(http_stop)
                .await
            {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
        tasks.spawn(background(
            Arc::clone(&service),
            Arc::clone(&keys),
            Arc::clone(&readiness),
            (pool_source, Arc::clone(&metrics)),
            config.store.retention,
            shutdown.subscribe(),
        ));
        tasks.spawn(report_health(
            health_reporter,
            readiness.subscribe(),
            shutdown.subscribe(),
        ));
        if let Some(mut remote) = remote_ends {
            // Ends recorded by other replicas wake this replica's revocation streams.
            let service = Arc::clone(&service);
            let mut stop = shutdown.subscribe();
            tasks.spawn(async move {
                let stopped = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                tokio::pin!(stopped);
                loop {
                    tokio::select! {
                        _ = &mut stopped => return,
                        changed = remote.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            service.notify_ends();
                        }
                    }
                }
            });
        }

        for i in &config.trusted_issuers {
            let keys = match (&i.jwks_uri, i.discovery) {
                (Some(_), _) => "jwks_uri",
                (None, true) => "discovery",
                (None, false) => "file",
            };
            let permissions = match &i.permission_source {
                Some(p) if p.kind == crate::config::PermissionSourceKind::Http => "http",
                _ => "claim",
            };
            tracing::info!(
                issuer = %i.name(),
                keys,
                permissions,
                subject_claim = %i.subject_claim,
                tenant_from_iss = i.issuer_pattern.is_some(),
                tokens_without_iss = i.tokens_without_iss,
                "trusted issuer"
            );
        }
        tracing::info!(
            %grpc_addr,
            %http_addr,
            tls = config.tls.is_some(),
            dev_mode = config.dev_mode,
            store = ?config.store.kind,
            // The SQLite file, or the PostgreSQL schema: only the one in use.
            store_location = %match config.store.kind {
                StoreKind::Sqlite => config.store_path().display().to_string(),
                StoreKind::Postgres => format!("schema {}", config.store.schema),
            },
            modules = config.modules.len(),
            trusted_issuers = config.trusted_issuers.len(),
            access_token_ttl_secs = config.access_token_ttl.as_secs(),
            "token service serving"
        );
        Ok(RunningServer {
            grpc_addr,
            http_addr,
            shutdown,
            tasks,
            service,
            live,
            config: std::sync::Mutex::new(config),
        })
    }
}

/// The gRPC health names that follow readiness: the whole server and each API.
const HEALTH_NAMES: [&str; 3] = [
    "",
    "jobtoken.v1.JobTokenService",
    "jobtoken.v1.AdminService",
];

/// Mirrors readiness into gRPC health: `SERVING` while ready, `NOT_SERVING` otherwise.
async fn report_health(
    reporter: tonic_health::server::HealthReporter,
    mut ready: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let status = if *ready.borrow_and_update() {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        for name in HEALTH_NAMES {
            reporter.set_service_status(name, status).await;
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            changed = ready.changed() => if changed.is_err() { return },
        }
    }
}

/// Sweeps ended leases, keeps the active-lease gauge current (which doubles as the
/// store's readiness probe), reloads keys and deletes leases ended longer than
/// `retention` ago.
async fn background(
    service: Arc<LeaseService>,
    keys: Arc<KeyRing>,
    readiness: Arc<Readiness>,
    (store, metrics): (Arc<dyn StoreOps>, Arc<Metrics>),
    retention: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    let mut reload = tokio::time::interval(KEY_RELOAD_INTERVAL);
    let mut cleanup = tokio::time::interval(CLEANUP_INTERVAL);
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => return,
            _ = sweep.tick() => {
                if let Err(e) = service.sweep().await {
                    tracing::warn!(error = %e, "sweeping ended leases failed");
                }
                if let Some(pool) = store.pool_status() {
                    metrics.set_store_pool(&pool);
                }
                match service.count_active_leases().await {
                    Ok(_) => readiness.record(Check::Store, None),
                    Err(e) => {
                        tracing::warn!(error = %e, "counting active leases failed");
                        readiness.record(Check::Store, Some(&e));
                    }
                }
                // Keys that failed to load are retried at every probe, so readiness
                // comes back within a second of the store.
                if readiness.failing(Check::Keys) {
                    let result = keys.reload(service.now()).await;
                    readiness.record(Check::Keys, result.as_ref().err().map(|e| e as _));
                }
            }
            _ = reload.tick() => {
                let result = keys.reload(service.now()).await;
                if let Err(e) = &result {
                    tracing::warn!(error = %e, "reloading signing keys failed");
                }
                readiness.record(Check::Keys, result.as_ref().err().map(|e| e as _));
            }
            _ = cleanup.tick() => {
                match service.purge_ended(retention).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(purged = n, "deleted leases past their retention"),
                    Err(e) => tracing::warn!(error = %e, "cleaning up ended leases failed"),
                }
            }
        }
    }
}

impl RunningServer {
    /// The bound gRPC address (useful with port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The domain service, for in-process tests.
    pub fn service(&self) -> &Arc<LeaseService> {
        &self.service
    }

    /// Applies a re-read config: modules, trusted issuers, the admin key and limits
    /// change at once, without dropping connections. A config that fails validation is
    /// refused and the running one stays. Changed settings that need a restart are
    /// reported (and keep their old value).
    pub fn reload(&self, new: Config) -> Result<Reloaded, StartupError> {
        let mut current = self.config.lock().unwrap_or_else(|e| e.into_inner());
        crate::reload::apply(&mut current, new, &self.live, &self.service)
    }

    /// Stops accepting, lets in-flight calls finish, and waits for every task.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
    }

    /// Serves until `signal` completes, then shuts down.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) {
        signal.await;
        tracing::info!("shutting down");
        self.shutdown().await;
    }
}
