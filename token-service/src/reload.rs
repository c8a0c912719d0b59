//! What changes without a restart: modules, trusted issuers, the admin key and the
//! per-module limits. Each is rebuilt from the new [`Config`] with its usual constructor
//! and swapped in atomically; calls in flight finish with the values they started with,
//! and connections stay open.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::auth::{AdminAuth, Modules};
use crate::clock::Clock;
use crate::config::{Config, IssuerConfig, StartupError};
use crate::idp::HttpGet;
use crate::metrics::Metrics;
use crate::platform::{HttpPermissionSources, PermissionSource};
use crate::ports::Subjects;
use crate::quota::Limits;
use crate::service::LeaseService;
use crate::subject::SubjectVerifier;

/// Builds the trusted issuers' verifier and permission sources from their config, at
/// start and again at each reload, from the same HTTP client, clock and metrics.
pub struct IssuerFactory {
    /// Fetches keys and permissions.
    pub http: Arc<dyn HttpGet>,
    /// The injected clock.
    pub clock: Arc<dyn Clock>,
    /// Where issuer metrics go.
    pub metrics: Arc<Metrics>,
}

impl std::fmt::Debug for IssuerFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerFactory").finish_non_exhaustive()
    }
}

/// The domain's identity ports, as built from the trusted issuers: who the user is, and
/// the permissions the platform holds.
pub type IssuerPorts = (Arc<dyn Subjects>, Arc<dyn PermissionSource>);

impl IssuerFactory {
    /// The verifier and the permission sources of `issuers`.
    pub fn build(&self, issuers: &[IssuerConfig]) -> Result<IssuerPorts, StartupError> {
        let subjects =
            SubjectVerifier::with_http(issuers, Arc::clone(&self.http), Arc::clone(&self.metrics))?;
        let sources = HttpPermissionSources::from_config(
            issuers,
            Arc::clone(&self.http),
            Arc::clone(&self.clock),
            Arc::clone(&self.metrics),
        )?;
        Ok((Arc::new(subjects), Arc::new(sources)))
    }
}

/// The live, swappable part of the configuration, shared by the gRPC APIs.
#[derive(Debug)]
pub struct Live {
    /// Modules, by credential.
    pub modules: ArcSwap<Modules>,
    /// Per-module rates and stream caps.
    pub limits: ArcSwap<Limits>,
    /// The admin key.
    pub admin: ArcSwap<AdminAuth>,
    /// Rebuilds the trusted issuers.
    pub issuers: IssuerFactory,
    /// Bumped by every reload that changed modules, issuers, the admin key or limits:
    /// open revocation streams end then, and their holders reconnect (with their cursor)
    /// under the new credentials and tenants.
    pub generation: std::sync::atomic::AtomicU64,
}

impl Live {
    /// From the start-up config.
    pub fn new(config: &Config, issuers: IssuerFactory) -> Self {
        Self {
            modules: ArcSwap::from_pointee(modules(config)),
            limits: ArcSwap::from_pointee(Limits::new(&config.modules, &config.limits)),
            admin: ArcSwap::from_pointee(AdminAuth::new(config.admin_key_sha256.clone())),
            issuers,
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

fn modules(config: &Config) -> Modules {
    Modules::from_config(&config.modules, &config.default_audience)
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Live settings that changed and now apply.
    pub applied: Vec<&'static str>,
    /// Settings that changed in the file but need a restart (they keep their old value).
    pub need_restart: Vec<&'static str>,
}

/// Settings that can't change in a running process: listeners, store, TLS, keys and the
/// token settings the domain was built with.
fn restart_only(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |name: &'static str, differs: bool| {
        if differs {
            out.push(name);
        }
    };
    check("listen", old.listen != new.listen);
    check("store", old.store != new.store);
    check("tls", old.tls != new.tls);
    // The identity providers' HTTP client is built once, with this CA.
    check("idp_ca_file", old.idp_ca_file != new.idp_ca_file);
    check("data_dir", old.data_dir != new.data_dir);
    check(
        "master_key_file",
        old.master_key_file != new.master_key_file,
    );
    check("issuer", old.issuer != new.issuer);
    check(
        "default_audience",
        old.default_audience != new.default_audience,
    );
    check(
        "access_token_ttl",
        old.access_token_ttl != new.access_token_ttl,
    );
    check("idle_timeout", old.idle_timeout != new.idle_timeout);
    check("refresh_grace", old.refresh_grace != new.refresh_grace);
    check(
        "key_activation_delay",
        old.key_activation_delay != new.key_activation_delay,
    );
    check(
        "lifetime_over_cap",
        old.lifetime_over_cap != new.lifetime_over_cap,
    );
    check(
        "limits.concurrent_streams_per_connection",
        old.limits.concurrent_streams_per_connection
            != new.limits.concurrent_streams_per_connection,
    );
    out
}

/// Validates `new` and, if it passes, swaps in its modules, issuers, admin key and
/// limits. On error nothing changes. `current` becomes `new` with the restart-only
/// settings kept as they were, so the next reload compares against what runs.
pub fn apply(
    current: &mut Config,
    new: Config,
    live: &Live,
    service: &LeaseService,
) -> Result<Reloaded, StartupError> {
    new.validate()?;
    // Rebuilt only when the issuers changed: a rebuild drops every realm's cached keys
    // (refetched through the new-realm limit, and lost if the provider is down).
    let issuers = if current.trusted_issuers != new.trusted_issuers {
        Some(live.issuers.build(&new.trusted_issuers)?)
    } else {
        None
    };
    let need_restart = restart_only(current, &new);
    let mut applied = Vec::new();
    if current.modules != new.modules {
        applied.push("modules");
    }
    if current.trusted_issuers != new.trusted_issuers {
        applied.push("trusted_issuers");
    }
    if current.admin_key_sha256 != new.admin_key_sha256 {
        applied.push("admin_key_sha256");
    }
    if current.limits != new.limits {
        applied.push("limits");
    }
    // Modules are built with the running default audience (a restart-only setting).
    let mut next = current.clone();
    next.modules = new.modules;
    next.trusted_issuers = new.trusted_issuers;
    next.admin_key_sha256 = new.admin_key_sha256;
    let streams_per_connection = current.limits.concurrent_streams_per_connection;
    next.limits = new.limits;
    next.limits.concurrent_streams_per_connection = streams_per_connection;

    live.modules.store(Arc::new(modules(&next)));
    let limits = live.limits.load().reconfigured(&next.modules, &next.limits);
    live.limits.store(Arc::new(limits));
    live.admin
        .store(Arc::new(AdminAuth::new(next.admin_key_sha256.clone())));
    if let Some((subjects, permission_source)) = issuers {
        service.set_issuers(subjects, permission_source);
    }
    *current = next;
    if !applied.is_empty() {
        live.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    Ok(Reloaded {
        applied,
        need_restart,
    })
}
