//! The gRPC transport: converts messages to and from domain types, authenticates callers
//! and records metrics. Business rules live in [`crate::service`].

mod admin;
mod convert;
mod job_token;
pub mod status;

pub use admin::AdminApi;
pub use job_token::JobTokenApi;

use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant as StdInstant;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tonic::{Code, Request, Status};

use crate::auth::{Module, Modules};
use crate::error::Error;
use crate::metrics::Metrics;

pub use jobtoken_proto::wire::{ADMIN_KEY_HEADER, MODULE_KEY_HEADER};

/// Refused-credential log lines per second, beyond which they are only counted (and the
/// next line says how many were left out), so a flood of bad calls can't flood the log.
const REFUSAL_LOG_PER_SECOND: u32 = 10;

/// What every RPC reports to: metrics, and the audit log of refused credentials.
#[derive(Debug)]
pub struct RpcObserver {
    metrics: Arc<Metrics>,
    refusal_log: DefaultDirectRateLimiter,
    refusals_unlogged: AtomicU64,
}

impl RpcObserver {
    /// Reports to `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        let rate = NonZeroU32::new(REFUSAL_LOG_PER_SECOND).unwrap_or(NonZeroU32::MIN);
        Self {
            metrics,
            refusal_log: RateLimiter::direct(Quota::per_second(rate)),
            refusals_unlogged: AtomicU64::new(0),
        }
    }

    /// A refused credential: counted always, logged (with the peer, never the
    /// credential) while the log budget lasts.
    fn refused(&self, method: &'static str, error: &Error, peer: Option<SocketAddr>) {
        let reason = error.reason();
        self.metrics.auth_refused(method, reason);
        if self.refusal_log.check().is_err() {
            self.refusals_unlogged.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let unlogged = self.refusals_unlogged.swap(0, Ordering::Relaxed);
        tracing::warn!(
            target: "audit",
            event = "auth.refused",
            method,
            reason,
            peer = peer.map(|p| p.to_string()).as_deref().unwrap_or("unknown"),
            problem = ?error.to_string(),
            refusals_not_logged_before = unlogged,
        );
    }
}

/// Runs one RPC body, recording its latency and outcome, and mapping its error.
async fn observe<T>(
    observer: &RpcObserver,
    method: &'static str,
    peer: Option<SocketAddr>,
    body: impl Future<Output = Result<T, Error>>,
) -> Result<T, Status> {
    // Latency is measured with the monotonic clock; it never feeds a decision.
    #[allow(clippy::disallowed_methods)]
    let start = StdInstant::now();
    let result = body.await;
    let reason = match &result {
        Ok(_) => "OK",
        Err(e) => e.reason(),
    };
    observer.metrics.rpc(method, reason, start.elapsed());
    result.map_err(|e| {
        if status::code(&e) == Code::Unauthenticated {
            observer.refused(method, &e, peer);
        }
        status::to_status(&e)
    })
}

/// Names on a client certificate that can identify a module: subject CNs and DNS SANs.
fn certificate_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push((*dns).to_owned());
            }
        }
    }
    names
}

/// The module making the call: by mTLS client certificate, else by module key.
fn authenticate<T>(modules: &Modules, request: &Request<T>) -> Result<Arc<Module>, Error> {
    if let Some(certs) = request.peer_certs()
        && let Some(leaf) = certs.first()
    {
        let names = certificate_names(leaf.as_ref());
        if let Some(m) = modules.by_cert_names(names.iter().map(String::as_str)) {
            return Ok(m);
        }
    }
    let key = request
        .metadata()
        .get(MODULE_KEY_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or(Error::ModuleUnauthenticated)?;
    modules.by_key(key).ok_or(Error::ModuleUnauthenticated)
}
