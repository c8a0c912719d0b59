//! The load generator behind the `token-load` binary: drives a running `token-service`
//! over real gRPC with a scenario and reports throughput, latency percentiles and errors
//! by reason. `BENCHMARKS.md` records what it measured.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use token_load::{Load, Scenario};
//! let load = Load {
//!     endpoint: "http://127.0.0.1:50051".into(),
//!     module_key: std::fs::read_to_string("data/dev-module.key")?.trim().into(),
//!     data_dir: "data".into(),
//!     scenario: Scenario::Refresh,
//!     concurrency: 64,
//!     connections: 4,
//!     duration: Duration::from_secs(10),
//!     warmup: Duration::from_secs(2),
//!     lease_lifetime: Duration::from_secs(3600),
//!     idp_listen: "127.0.0.1:50070".parse()?,
//! };
//! println!("{}", load.run().await?);
//! # Ok(()) }
//! ```

pub mod idp;
pub mod scale;

pub use scale::{Scale, ScaleReport};

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use token_sdk::JobTokenClient;
use token_sdk::proto::{
    IntrospectTokenRequest, IssueJobTokenRequest, JobOutcome, RefreshJobTokenRequest,
    RevokeJobTokenRequest,
};
use token_service::clock::{Clock, SystemClock};
use token_service::dev::{DevTokenRequest, mint_dev_token};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// What each virtual client does in a loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// The gRPC health check: what one RPC costs on this machine (the baseline).
    Noop,
    /// Grant a new lease each time (subject-token check, lease insert, signing).
    Issue,
    /// `issue` with a Eureka-shaped user token: keys through OIDC discovery and the
    /// permissions from an HTTP permission source, both served by token-load on
    /// `--idp-listen` (see [`idp`]); the service must trust it.
    IssueIdp,
    /// Renew, chaining refresh tokens as a real holder does.
    Refresh,
    /// Introspect the client's access token.
    Introspect,
    /// 80% refresh, 15% introspect, 5% issue.
    Mixed,
    /// A whole short job: grant a lease, then release it (two RPCs per request). Also
    /// fills a store with ended leases for the memory and start-up measurements.
    Churn,
    /// `--leases` leases held at once by simulated jobs renewing on the SDK's schedule
    /// for `--duration` (see [`Scale`]).
    Scale,
}

/// A load run's settings.
#[derive(Debug, Clone)]
pub struct Load {
    /// gRPC endpoint of the service.
    pub endpoint: String,
    /// Module key to authenticate with.
    pub module_key: String,
    /// Dev-mode data directory of the service, whose dev issuer signs the subject tokens.
    pub data_dir: PathBuf,
    /// What to do.
    pub scenario: Scenario,
    /// Virtual clients.
    pub concurrency: usize,
    /// HTTP/2 connections shared by the clients.
    pub connections: usize,
    /// Measured time.
    pub duration: Duration,
    /// Unmeasured time before it.
    pub warmup: Duration,
    /// Lifetime requested for each granted lease.
    pub lease_lifetime: Duration,
    /// `issue-idp`: where token-load serves the identity provider.
    pub idp_listen: std::net::SocketAddr,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The scenario.
    pub scenario: Scenario,
    /// Virtual clients.
    pub concurrency: usize,
    /// Connections.
    pub connections: usize,
    /// Measured seconds.
    pub seconds: f64,
    /// Successful requests in the measured time.
    pub ok: u64,
    /// Successful requests per second.
    pub rps: f64,
    /// Latency percentiles of successful requests, milliseconds.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Maximum.
    pub max_ms: f64,
    /// Failed requests by machine reason (or gRPC code).
    pub errors: BTreeMap<String, u64>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:?}: {} clients on {} connections, {:.1} s measured",
            self.scenario, self.concurrency, self.connections, self.seconds
        )?;
        writeln!(f, "  {:.0} req/s ({} ok)", self.rps, self.ok)?;
        writeln!(
            f,
            "  latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}",
            self.p50_ms, self.p90_ms, self.p99_ms, self.max_ms
        )?;
        if self.errors.is_empty() {
            write!(f, "  errors: none")
        } else {
            write!(f, "  errors: {:?}", self.errors)
        }
    }
}

/// A subject token from the service's dev issuer, living `ttl`.
pub(crate) fn subject_token(
    data_dir: &std::path::Path,
    ttl: Duration,
) -> Result<Arc<str>, LoadError> {
    let request = DevTokenRequest {
        user: "load".into(),
        tenant: "load".into(),
        permissions: ["load.run".to_owned()].into(),
        ttl,
    };
    Ok(mint_dev_token(data_dir, &request, SystemClock.now())
        .map_err(setup("minting a subject token from the dev issuer"))?
        .into())
}

/// `connections` HTTP/2 connections to the service.
pub(crate) async fn channels(
    endpoint: &str,
    connections: usize,
) -> Result<Vec<tonic::transport::Channel>, LoadError> {
    let mut channels = Vec::new();
    for _ in 0..connections.max(1) {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
            .map_err(setup("endpoint"))?
            .connect()
            .await
            .map_err(setup("connecting"))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// A job-token client per connection, authenticated with the module key.
pub(crate) async fn connect(
    endpoint: &str,
    module_key: &str,
    connections: usize,
) -> Result<Vec<JobTokenClient>, LoadError> {
    let interceptor =
        token_sdk::KeyInterceptor::module_key(module_key).map_err(setup("module key"))?;
    Ok(channels(endpoint, connections)
        .await?
        .into_iter()
        .map(|channel| {
            token_sdk::proto::job_token_service_client::JobTokenServiceClient::with_interceptor(
                channel,
                interceptor.clone(),
            )
        })
        .collect())
}

pub(crate) fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

/// Failures of a run's set-up (not of the measured requests, which are counted).
#[derive(Debug)]
pub struct LoadError(pub String);

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LoadError {}

pub(crate) fn setup<E: fmt::Display>(what: &str) -> impl FnOnce(E) -> LoadError + '_ {
    move |e| LoadError(format!("{what}: {e}"))
}

/// One virtual client's state.
struct Holder {
    lease_id: String,
    refresh_token: String,
    access_token: String,
}

struct Worker {
    id: usize,
    /// Distinguishes this run's job ids from earlier runs' (still active) leases.
    run: u64,
    client: JobTokenClient,
    health: HealthClient<tonic::transport::Channel>,
    subject_token: Arc<str>,
    lease_lifetime: Duration,
    holder: Option<Holder>,
    issued: u64,
}

impl Worker {
    async fn issue(&mut self) -> Result<Holder, tonic::Status> {
        self.issued += 1;
        let response = self
            .client
            .issue_job_token(IssueJobTokenRequest {
                subject_token: self.subject_token.to_string(),
                job_id: format!("load-{:x}-{}-{}", self.run, self.id, self.issued),
                permissions: vec!["load.run".into()],
                max_lifetime: Some(proto_duration(self.lease_lifetime)),
                audience: String::new(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let lease = response.lease.unwrap_or_default();
        let tokens = response.tokens.unwrap_or_default();
        Ok(Holder {
            lease_id: lease.lease_id,
            refresh_token: tokens.refresh_token,
            access_token: tokens.access_token,
        })
    }

    async fn step(&mut self, op: Scenario) -> Result<(), tonic::Status> {
        match op {
            Scenario::Noop => {
                self.health
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await?;
            }
            Scenario::Issue | Scenario::IssueIdp => {
                self.issue().await?;
            }
            Scenario::Churn => {
                let holder = self.issue().await?;
                self.client
                    .revoke_job_token(RevokeJobTokenRequest {
                        lease_id: holder.lease_id,
                        outcome: JobOutcome::Succeeded.into(),
                        detail: String::new(),
                    })
                    .await?;
            }
            Scenario::Refresh => {
                let holder = self
                    .holder
                    .as_mut()
                    .ok_or_else(|| tonic::Status::internal("no lease"))?;
                let tokens = self
                    .client
                    .refresh_job_token(RefreshJobTokenRequest {
                        lease_id: holder.lease_id.clone(),
                        refresh_token: holder.refresh_token.clone(),
                    })
                    .await?
                    .into_inner()
                    .tokens
                    .unwrap_or_default();
                holder.refresh_token = tokens.refresh_token;
                holder.access_token = tokens.access_token;
            }
            Scenario::Introspect => {
                let holder = self
                    .holder
                    .as_ref()
                    .ok_or_else(|| tonic::Status::internal("no lease"))?;
                let answer = self
                    .client
                    .introspect_token(IntrospectTokenRequest {
                        token: holder.access_token.clone(),
                    })
                    .await?
                    .into_inner();
                if !answer.active {
                    return Err(tonic::Status::failed_precondition("token inactive"));
                }
            }
            Scenario::Mixed | Scenario::Scale => {
                return Err(tonic::Status::internal("not a per-request scenario"));
            }
        }
        Ok(())
    }
}

fn pick(scenario: Scenario, n: u64) -> Scenario {
    match scenario {
        Scenario::Mixed => match n % 20 {
            0 => Scenario::Issue,
            1..=3 => Scenario::Introspect,
            _ => Scenario::Refresh,
        },
        other => other,
    }
}

impl Load {
    /// Runs the scenario and reports.
    pub async fn run(&self) -> Result<Report, LoadError> {
        let ttl = self.lease_lifetime + self.warmup + self.duration;
        let subject_token = subject_token(&self.data_dir, ttl)?;
        let idp_base = match self.scenario {
            Scenario::IssueIdp => Some(idp::serve(self.idp_listen, &self.data_dir).await?),
            _ => None,
        };
        let channels = channels(&self.endpoint, self.connections).await?;
        let interceptor =
            token_sdk::KeyInterceptor::module_key(&self.module_key).map_err(setup("module key"))?;
        let concurrency = self.concurrency.max(1);
        let run = u64::from(
            SystemClock
                .now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .subsec_nanos(),
        ) ^ (u64::from(std::process::id()) << 32);
        // Set up every client first (a failure here is the run's failure), then start all.
        let mut workers = Vec::new();
        for id in 0..concurrency {
            let channel = channels[id % channels.len()].clone();
            let mut worker = Worker {
                id,
                run,
                client: token_sdk::proto::job_token_service_client::JobTokenServiceClient::with_interceptor(
                    channel.clone(),
                    interceptor.clone(),
                ),
                health: HealthClient::new(channel),
                subject_token: match &idp_base {
                    Some(base) => idp::subject_token(&self.data_dir, base, id, ttl)?,
                    None => Arc::clone(&subject_token),
                },
                lease_lifetime: self.lease_lifetime,
                holder: None,
                issued: 0,
            };
            if matches!(
                self.scenario,
                Scenario::Refresh | Scenario::Introspect | Scenario::Mixed
            ) {
                worker.holder = Some(worker.issue().await.map_err(setup("granting a lease"))?);
            }
            workers.push(worker);
        }
        let mut tasks = Vec::new();
        for mut worker in workers {
            let (scenario, warmup, duration) = (self.scenario, self.warmup, self.duration);
            tasks.push(tokio::spawn(async move {
                let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                    .map_err(setup("histogram"))?;
                let mut errors = BTreeMap::<String, u64>::new();
                let t0 = monotonic_now();
                let mut n = 0u64;
                loop {
                    let elapsed = t0.elapsed();
                    if elapsed >= warmup + duration {
                        break;
                    }
                    let measuring = elapsed >= warmup;
                    let op = pick(scenario, n);
                    n += 1;
                    let began = monotonic_now();
                    let result = worker.step(op).await;
                    let micros = u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX);
                    if !measuring {
                        continue;
                    }
                    match result {
                        Ok(()) => {
                            let _ = latency.record(micros.max(1));
                        }
                        Err(status) => {
                            let reason = token_sdk::error_reason(&status)
                                .unwrap_or_else(|| format!("{:?}", status.code()));
                            *errors.entry(reason).or_default() += 1;
                        }
                    }
                }
                Ok::<_, LoadError>((latency, errors))
            }));
        }
        let mut latency =
            Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(setup("histogram"))?;
        let mut errors = BTreeMap::<String, u64>::new();
        for task in tasks {
            let (h, e) = task.await.map_err(setup("worker"))??;
            latency.add(&h).map_err(setup("histogram"))?;
            for (reason, count) in e {
                *errors.entry(reason).or_default() += count;
            }
        }
        let seconds = self.duration.as_secs_f64();
        let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
        Ok(Report {
            scenario: self.scenario,
            concurrency,
            connections: channels.len(),
            seconds,
            ok: latency.len(),
            rps: latency.len() as f64 / seconds,
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            max_ms: latency.max() as f64 / 1000.0,
            errors,
        })
    }
}

/// Latency is measured on the monotonic clock; it feeds no decision.
#[allow(clippy::disallowed_methods)]
pub(crate) fn monotonic_now() -> std::time::Instant {
    std::time::Instant::now()
}
