//! Prometheus metrics, served at `/metrics` on the HTTP listener, as OpenMetrics or as
//! the classic Prometheus text format (0.0.4), whichever the scraper asks for.

use std::sync::atomic::AtomicU64;
use std::time::Duration;
use token_domain::ports::Observer;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::store::PoolStatus;

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// The exposition formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 (`application/openmetrics-text`).
    OpenMetrics,
    /// The classic Prometheus text format 0.0.4 (`text/plain`).
    Text004,
}

impl Format {
    /// The Content-Type of a response in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text004 => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    /// The format an `Accept` header prefers: OpenMetrics when it is acceptable and
    /// ranked at least as high as plain text, else text 0.0.4 (also without a header).
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Text004;
        };
        let (mut open_metrics, mut text) = (0.0_f32, 0.0_f32);
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.strip_prefix("q="))
                .find_map(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => open_metrics = open_metrics.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if open_metrics > 0.0 && open_metrics >= text {
            Format::OpenMetrics
        } else {
            Format::Text004
        }
    }
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
    batch_sizes: Family<KindLabel, Histogram>,
    pool_connections: Family<StateLabel, Gauge>,
    pool_max: Gauge,
    pool_waiting: Gauge,
    key_fetches: Family<IssuerResult, Counter>,
    keys_age: Family<IssuerLabel, Gauge<f64, AtomicU64>>,
    stale_keys_used: Family<IssuerLabel, Counter>,
    permission_lookups: Family<IssuerResult, Counter>,
    permission_latency: Family<IssuerLabel, Histogram>,
    rechecks: Family<IssuerResult, Counter>,
    unverified_for: Family<IssuerLabel, Histogram>,
    logouts: Family<ResultLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The domain reports here.
impl Observer for Metrics {
    fn lease_ended(&self, reason: &'static str) {
        self.lease_ends.get_or_create(&ReasonLabel { reason }).inc();
    }

    fn set_active_leases(&self, n: u64) {
        self.active_leases.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    fn recheck(&self, issuer: &str, result: &'static str, unverified_for: Option<Duration>) {
        self.rechecks
            .get_or_create(&IssuerResult {
                issuer: issuer.to_owned(),
                result,
            })
            .inc();
        if let Some(age) = unverified_for {
            self.unverified_for
                .get_or_create(&IssuerLabel {
                    issuer: issuer.to_owned(),
                })
                .observe(age.as_secs_f64());
        }
    }

    fn logout(&self, result: &'static str) {
        self.logouts.get_or_create(&ResultLabel { result }).inc();
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut root = Registry::default();
        root.register_collector(Box::new(ProcessCollector));
        let registry = root.sub_registry_with_prefix("jobtoken");
        registry.register(
            "build",
            "Version of this build",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
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
        let batch_sizes = Family::<KindLabel, Histogram>::new_with_constructor(|| {
            // 1 .. 256 requests
            Histogram::new(exponential_buckets(1.0, 2.0, 9))
        });
        registry.register(
            "store_batch_size",
            "Requests per store batch: SQLite group commits, PostgreSQL batched lease \
             reads and writes",
            batch_sizes.clone(),
        );
        let pool_connections = Family::<StateLabel, Gauge>::default();
        registry.register(
            "store_pool_connections",
            "Store connections by state (idle, in_use); for SQLite the read connections",
            pool_connections.clone(),
        );
        let pool_max = Gauge::default();
        registry.register(
            "store_pool_max_connections",
            "Most connections the store pool opens",
            pool_max.clone(),
        );
        let pool_waiting = Gauge::default();
        registry.register(
            "store_pool_waiting",
            "Callers waiting for a store connection",
            pool_waiting.clone(),
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
        let rechecks = Family::<IssuerResult, Counter>::default();
        registry.register(
            "permission_rechecks",
            "Re-checks of a lease's permissions at renewal, by result (confirmed, narrowed, \
             withdrawn, disabled, unverified, unverifiable)",
            rechecks.clone(),
        );
        let unverified_for = Family::<IssuerLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(1.0, 2.0, 20))
        });
        registry.register(
            "permission_unverified_seconds",
            "At a re-check that could not reach the source: how long the lease's \
             permissions have gone unconfirmed",
            unverified_for.clone(),
        );
        let logouts = Family::<ResultLabel, Counter>::default();
        registry.register(
            "backchannel_logouts",
            "Back-channel logout requests, by result (accepted, invalid (replays included), \
             unavailable)",
            logouts.clone(),
        );
        Self {
            registry: root,
            rechecks,
            unverified_for,
            logouts,
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
            batch_sizes,
            pool_connections,
            pool_max,
            pool_waiting,
        }
    }

    /// A store batch of `size` requests (see [`crate::store::StoreOps::observe_batches`]).
    pub fn store_batch(&self, kind: &'static str, size: usize) {
        self.batch_sizes
            .get_or_create(&KindLabel { kind })
            .observe(size as f64);
    }

    /// The store's pool now.
    pub fn set_store_pool(&self, pool: &PoolStatus) {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.pool_connections
            .get_or_create(&StateLabel { state: "idle" })
            .set(gauge(pool.idle));
        self.pool_connections
            .get_or_create(&StateLabel { state: "in_use" })
            .set(gauge(pool.open.saturating_sub(pool.idle)));
        self.pool_max.set(gauge(pool.max));
        self.pool_waiting.set(gauge(pool.waiting));
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

    /// Every metric, in `format`.
    pub fn encode(&self, format: Format) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        match format {
            Format::OpenMetrics => out,
            Format::Text004 => to_text_004(&out),
        }
    }
}

/// OpenMetrics text as the classic Prometheus text format 0.0.4: a counter's family is
/// named with its `_total` suffix, an info metric becomes a gauge named `…_info`, and
/// `# UNIT` and `# EOF` lines go. Samples are the same in both.
fn to_text_004(open_metrics: &str) -> String {
    // Family name -> the name 0.0.4 gives it, with its type.
    let mut renamed = std::collections::HashMap::new();
    for line in open_metrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            match kind {
                "counter" => renamed.insert(name, (format!("{name}_total"), "counter")),
                "info" => renamed.insert(name, (format!("{name}_info"), "gauge")),
                _ => None,
            };
        }
    }
    let mut out = String::with_capacity(open_metrics.len());
    for line in open_metrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        if let Some((prefix, rest)) = meta {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if let Some((new_name, new_type)) = renamed.get(name) {
                let tail = if prefix == "# TYPE " { new_type } else { tail };
                out.push_str(&format!("{prefix}{new_name} {tail}\n"));
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// `process_*` metrics read from `/proc/self` at each scrape (Linux; nothing elsewhere).
#[derive(Debug)]
struct ProcessCollector;

/// Clock ticks per second of `/proc/<pid>/stat` times (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug, Default, PartialEq)]
struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    threads: u64,
    start_time_seconds: f64,
    open_fds: u64,
    max_fds: u64,
}

impl ProcessStats {
    /// From the texts of `/proc/self/stat`, `/proc/self/status`, `/proc/stat` and
    /// `/proc/self/limits`.
    fn parse(stat: &str, status: &str, system: &str, limits: &str, open_fds: u64) -> Option<Self> {
        // The command name (field 2) may hold spaces: fields are counted after its ')'.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .map(|k| k * 1024)
        };
        let boot: u64 = system
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse().ok())?;
        let max_fds = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
            .unwrap_or(0);
        Some(Self {
            cpu_seconds: (field(14)? + field(15)?) as f64 / TICKS_PER_SECOND,
            resident_bytes: kib("VmRSS:").unwrap_or(0),
            virtual_bytes: field(23)?,
            threads: field(20)?,
            start_time_seconds: boot as f64 + field(22)? as f64 / TICKS_PER_SECOND,
            open_fds,
            max_fds,
        })
    }

    fn read() -> Option<Self> {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        let fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        Self::parse(
            &read("/proc/self/stat")?,
            &read("/proc/self/status")?,
            &read("/proc/stat")?,
            &read("/proc/self/limits").unwrap_or_default(),
            fds,
        )
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(p) = ProcessStats::read() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(p.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds",
            None,
            cpu.metric_type(),
        )?)?;
        let gauges: [(&str, &str, f64); 6] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                p.resident_bytes as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                p.virtual_bytes as f64,
            ),
            ("process_threads", "OS threads", p.threads as f64),
            (
                "process_start_time_seconds",
                "Start time since the Unix epoch, in seconds",
                p.start_time_seconds,
            ),
            (
                "process_open_fds",
                "Open file descriptors",
                p.open_fds as f64,
            ),
            (
                "process_max_fds",
                "Most open file descriptors allowed",
                p.max_fds as f64,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_prefers_what_the_scraper_ranks_highest() {
        let cases = [
            (None, Format::Text004),
            (Some("*/*"), Format::Text004),
            (Some("text/plain; version=0.0.4"), Format::Text004),
            (Some("application/openmetrics-text"), Format::OpenMetrics),
            (
                Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
                Format::OpenMetrics,
            ),
            (
                Some("application/openmetrics-text;q=0.3,text/plain;q=0.9"),
                Format::Text004,
            ),
            (Some("application/openmetrics-text;q=0"), Format::Text004),
            (Some("application/json"), Format::Text004),
        ];
        for (accept, want) in cases {
            assert_eq!(Format::negotiate(accept), want, "{accept:?}");
        }
    }

    #[test]
    fn text_004_names_counter_and_info_families_as_their_samples() {
        let open = "# HELP a_total_things Things.\n# TYPE a_total_things counter\n\
                    a_total_things_total 3\n# HELP b Bytes.\n# TYPE b gauge\n# UNIT b bytes\nb 1\n\
                    # HELP build Build.\n# TYPE build info\nbuild_info{version=\"1\"} 1\n# EOF\n";
        assert_eq!(
            to_text_004(open),
            "# HELP a_total_things_total Things.\n# TYPE a_total_things_total counter\n\
             a_total_things_total 3\n# HELP b Bytes.\n# TYPE b gauge\nb 1\n\
             # HELP build_info Build.\n# TYPE build_info gauge\nbuild_info{version=\"1\"} 1\n"
        );
    }

    #[test]
    fn process_stats_parse_from_proc_texts() {
        let stat = "4242 (token (service)) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 \
                    0 7 0 12000 104857600 2560 18446744073709551615";
        let status = "Name:\ttoken-service\nVmRSS:\t   10240 kB\n";
        let system = "cpu  1 2 3\nbtime 1800000000\n";
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        let p = ProcessStats::parse(stat, status, system, limits, 12).unwrap();
        assert_eq!(
            p,
            ProcessStats {
                cpu_seconds: 3.0,
                resident_bytes: 10_485_760,
                virtual_bytes: 104_857_600,
                threads: 7,
                start_time_seconds: 1_800_000_120.0,
                open_fds: 12,
                max_fds: 1024,
            }
        );
        assert!(ProcessStats::read().is_some(), "this test runs on Linux");
    }
}
