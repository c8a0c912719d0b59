//! The gRPC transport: converts messages to and from domain types, authenticates callers
//! and records metrics. Business rules live in [`crate::service`].

mod admin;
mod convert;
mod job_token;
pub mod status;

pub use admin::AdminApi;
pub use job_token::JobTokenApi;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant as StdInstant;

use tonic::{Request, Status};

use crate::auth::{Module, Modules};
use crate::error::Error;
use crate::metrics::Metrics;

/// Metadata key carrying a module key.
pub const MODULE_KEY_HEADER: &str = "x-module-key";
/// Metadata key carrying the admin key.
pub const ADMIN_KEY_HEADER: &str = "x-admin-key";

/// Runs one RPC body, recording its latency and outcome, and mapping its error.
async fn observe<T>(
    metrics: &Metrics,
    method: &'static str,
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
    metrics.rpc(method, reason, start.elapsed());
    result.map_err(|e| status::to_status(&e))
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
