//! Prometheus metrics, served at `/metrics` on the HTTP listener.

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
        Self {
            registry,
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

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
