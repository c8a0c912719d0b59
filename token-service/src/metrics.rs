//! Prometheus metrics, served at `/metrics` on the HTTP listener.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of per-RPC counters: the method and `OK` or the failure's machine reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Labels of per-issuer counters: the trusted-issuer entry (`issuer`, or its
/// `issuer_pattern`: one series for all realms) and the outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuerResult {
    issuer: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuerLabel {
    issuer: String,
}

/// The service's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RpcLabels, Counter>,
    latency: Family<MethodLabel, Histogram>,
    grants: Family<ResultLabel, Counter>,
    renewals: Family<ResultLabel, Counter>,
    lease_ends: Family<ReasonLabel, Counter>,
    active_leases: Gauge,
    auth_refusals: Family<RpcLabels, Counter>,
    key_fetches: Family<IssuerResult, Counter>,
    keys_age: Family<IssuerLabel, Gauge<f64, AtomicU64>>,
    stale_keys_used: Family<IssuerLabel, Counter>,
    permission_lookups: Family<IssuerResult, Counter>,
    permission_latency: Family<IssuerLabel, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("jobtoken");
        let requests = Family::<RpcLabels, Counter>::default();
        registry.register(
            "rpc_requests",
            "gRPC calls by method and outcome (OK or the machine reason)",
            requests.clone(),
        );
        let latency = Family::<MethodLabel, Histogram>::new_with_constructor(|| {
            // 50 µs .. ~3.3 s
            Histogram::new(exponential_buckets(0.000_05, 2.0, 17))
        });
        registry.register(
            "rpc_duration_seconds",
            "gRPC handling time by method",
            latency.clone(),
        );
        let grants = Family::<ResultLabel, Counter>::default();
        registry.register("grants", "Lease grants by result", grants.clone());
        let renewals = Family::<ResultLabel, Counter>::default();
        registry.register("renewals", "Lease renewals by result", renewals.clone());
        let lease_ends = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "lease_ends",
            "Leases ended by this process, by end reason (revocations included)",
            lease_ends.clone(),
        );
        let active_leases = Gauge::default();
        registry.register(
            "active_leases",
            "Active leases in the store",
            active_leases.clone(),
        );
        let auth_refusals = Family::<RpcLabels, Counter>::default();
        registry.register(
            "auth_refusals",
            "Refused credentials (module key, certificate, admin key, subject or refresh \
             token) by method and reason",
            auth_refusals.clone(),
        );
        let key_fetches = Family::<IssuerResult, Counter>::default();
        registry.register(
            "issuer_key_fetches",
            "Fetches of a trusted issuer's keys (discovery and JWKS) by result",
            key_fetches.clone(),
        );
        let keys_age = Family::<IssuerLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "issuer_keys_age_seconds",
            "Age of the fetched keys used by the latest verification of each issuer",
            keys_age.clone(),
        );
        let stale_keys_used = Family::<IssuerLabel, Counter>::default();
        registry.register(
            "issuer_stale_keys_used",
            "Verifications with keys past their cache time, served while a refresh fails",
            stale_keys_used.clone(),
        );
        let permission_lookups = Family::<IssuerResult, Counter>::default();
        registry.register(
            "permission_source_lookups",
            "Permission-source lookups by result (ok, cached, unknown_user, refused, \
             unavailable)",
            permission_lookups.clone(),
        );
        let permission_latency = Family::<IssuerLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_05, 2.0, 17))
        });
        registry.register(
            "permission_source_duration_seconds",
            "Time of the permission-source calls (cache misses)",
            permission_latency.clone(),
        );
        Self {
            registry,
            key_fetches,
            keys_age,
            stale_keys_used,
            permission_lookups,
            permission_latency,
            auth_refusals,
            requests,
            latency,
            grants,
            renewals,
            lease_ends,
            active_leases,
        }
    }

    /// Records one RPC.
    pub fn rpc(&self, method: &'static str, reason: &'static str, took: Duration) {
        self.requests
            .get_or_create(&RpcLabels { method, reason })
            .inc();
        self.latency
            .get_or_create(&MethodLabel { method })
            .observe(took.as_secs_f64());
        match method {
            "IssueJobToken" => self
                .grants
                .get_or_create(&ResultLabel { result: reason })
                .inc(),
            "RefreshJobToken" => self
                .renewals
                .get_or_create(&ResultLabel { result: reason })
                .inc(),
            _ => 0,
        };
    }

    /// Records a refused credential.
    pub fn auth_refused(&self, method: &'static str, reason: &'static str) {
        self.auth_refusals
            .get_or_create(&RpcLabels { method, reason })
            .inc();
    }

    /// Records a lease end.
    pub fn lease_ended(&self, reason: &'static str) {
        self.lease_ends.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Sets the active-lease gauge.
    pub fn set_active_leases(&self, n: u64) {
        self.active_leases.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Records a fetch of an issuer's keys.
    pub fn key_fetch(&self, issuer: &str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.key_fetches
            .get_or_create(&IssuerResult {
                issuer: issuer.to_owned(),
                result,
            })
            .inc();
    }

    /// Records the age of the fetched keys a verification used, and whether they were
    /// past their cache time.
    pub fn keys_used(&self, issuer: &str, age: Duration, stale: bool) {
        let label = IssuerLabel {
            issuer: issuer.to_owned(),
        };
        self.keys_age.get_or_create(&label).set(age.as_secs_f64());
        if stale {
            self.stale_keys_used.get_or_create(&label).inc();
        }
    }

    /// Records a permission-source lookup; `took` is the call's time (none when cached).
    pub fn permission_lookup(&self, issuer: &str, result: &'static str, took: Option<Duration>) {
        self.permission_lookups
            .get_or_create(&IssuerResult {
                issuer: issuer.to_owned(),
                result,
            })
            .inc();
        if let Some(took) = took {
            self.permission_latency
                .get_or_create(&IssuerLabel {
                    issuer: issuer.to_owned(),
                })
                .observe(took.as_secs_f64());
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
