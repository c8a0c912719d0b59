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

use crate::auth::{AdminAuth, Modules};
use crate::clock::{Clock, SystemClock};
use crate::config::StoreKind;
use crate::config::{Config, StartupError};
use crate::dev::load_or_create_master_key;
use crate::grpc::{AdminApi, JobTokenApi, Observer};
use crate::idp::{HttpClient, HttpGet};
use crate::keys::KeyRing;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::platform::HttpPermissionSources;
use crate::service::{LeaseService, MAX_MESSAGE_BYTES, Settings};
use crate::store::postgres::PostgresOptions;
use crate::store::{PostgresStore, SqliteStore, Store};
use crate::subject::SubjectVerifier;

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
        wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>,
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
        let store: Arc<dyn Store> = match config.store.kind {
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
                };
                Arc::new(PostgresStore::connect(&options).await?)
            }
        };
        let store = wrap(store);
        let remote_ends = store.remote_ends();
        // A retired key must verify every token it signed: their life plus the grace
        // window in which a retry can still mint one, plus slack for clock skew.
        let retain = config.access_token_ttl + config.refresh_grace + Duration::from_secs(60);
        let keys = Arc::new(
            KeyRing::load(
                Arc::clone(&store),
                master.clone(),
                retain,
                config.key_activation_delay,
                clock.now(),
            )
            .await?,
        );
        let metrics = Arc::new(Metrics::new());
        let http: Arc<dyn HttpGet> = Arc::new(HttpClient::new(config.idp_ca_file.as_deref())?);
        let subjects = SubjectVerifier::with_http(
            &config.trusted_issuers,
            Arc::clone(&http),
            Arc::clone(&metrics),
        )?;
        let permission_source = HttpPermissionSources::from_config(
            &config.trusted_issuers,
            http,
            Arc::clone(&clock),
            Arc::clone(&metrics),
        )?;
        let service = Arc::new(
            LeaseService::new(
                store,
                Arc::clone(&keys),
                master,
                subjects,
                Arc::clone(&clock),
                Settings::from_config(&config),
                Arc::clone(&metrics),
            )
            .with_permission_source(Arc::new(permission_source)),
        );
        let modules = Arc::new(Modules::from_config(
            &config.modules,
            &config.default_audience,
        ));

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

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<JobTokenServiceServer<JobTokenApi>>()
            .await;
        health_reporter
            .set_serving::<AdminServiceServer<AdminApi>>()
            .await;
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
        let observer = Arc::new(Observer::new(Arc::clone(&metrics)));
        let limits = Arc::new(Limits::new(&config.modules, &config.limits));
        let job_api = JobTokenApi::new(
            Arc::clone(&service),
            Arc::clone(&modules),
            limits,
            Arc::clone(&observer),
            WATCH_POLL,
            shutdown.subscribe(),
        );
        let admin_api = AdminApi::new(
            Arc::clone(&service),
            AdminAuth::new(config.admin_key_sha256.clone()),
            observer,
        );

        let mut builder = tonic::transport::Server::builder()
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
        let http_app = crate::http::router(Arc::clone(&service), Arc::clone(&metrics));
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
            config.store.retention,
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
            sqlite_path = %config.store_path().display(),
            pg_schema = %config.store.schema,
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
        })
    }
}

/// Sweeps ended leases, keeps the active-lease gauge current, reloads keys and deletes
/// leases ended longer than `retention` ago.
async fn background(
    service: Arc<LeaseService>,
    keys: Arc<KeyRing>,
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
                if let Err(e) = service.count_active_leases().await {
                    tracing::warn!(error = %e, "counting active leases failed");
                }
            }
            _ = reload.tick() => {
                if let Err(e) = keys.reload(service.now()).await {
                    tracing::warn!(error = %e, "reloading signing keys failed");
                }
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
