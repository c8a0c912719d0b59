//! The scale scenario: many leases held at once by simulated jobs, each renewing on the
//! SDK's own schedule ([`token_sdk::refresh_in`], [`token_sdk::backoff`]). It answers the
//! questions a platform asks before trusting the service with every long job: what
//! steady renewal rate that many jobs produce, whether renewals stay spread out (no
//! storms), what the service's memory does, and whether any job ever held an expired
//! token or lost its lease.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use token_sdk::proto::{IssueJobTokenRequest, RefreshJobTokenRequest};
use token_sdk::{JobTokenClient, RenewalConfig};
use tokio::time::Instant;

use crate::{LoadError, connect, monotonic_now, proto_duration, setup, subject_token};

/// A scale run's settings.
#[derive(Debug, Clone)]
pub struct Scale {
    /// gRPC endpoint of the service.
    pub endpoint: String,
    /// Module key to authenticate with.
    pub module_key: String,
    /// Dev-mode data directory of the service (its dev issuer signs subject tokens).
    pub data_dir: PathBuf,
    /// Leases to hold at once.
    pub leases: usize,
    /// HTTP/2 connections shared by all jobs.
    pub connections: usize,
    /// Grants in flight while the leases are being granted.
    pub grant_concurrency: usize,
    /// Spread the grants evenly over this long, as jobs arriving over time would be
    /// (zero: as fast as the service grants). Spreading them over one token life starts
    /// the run in the steady state of a platform whose jobs start at random times.
    pub grant_over: Duration,
    /// How long to hold them all, renewing, once every lease is granted.
    pub duration: Duration,
    /// Lifetime requested for each lease.
    pub lease_lifetime: Duration,
    /// The service's process id, to sample its resident memory (Linux `/proc`).
    pub service_pid: Option<u32>,
}

/// What a scale run measured.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    /// Leases held.
    pub leases: usize,
    /// Seconds it took to grant them all.
    pub grant_seconds: f64,
    /// Access-token life the service granted (seconds), which sets the renewal rate.
    pub token_life_seconds: f64,
    /// Seconds the leases were held after the last grant.
    pub hold_seconds: f64,
    /// Renewals that succeeded while holding.
    pub renewals: u64,
    /// Mean renewals per second while holding.
    pub renewals_per_second: f64,
    /// What the SDK schedule predicts: leases / (0.7 × token life).
    pub expected_per_second: f64,
    /// Renewals in the quietest and busiest whole second after the first token life,
    /// and the busiest over the mean: near 1 means evenly spread, a storm shows as a
    /// large peak. Leases granted in a burst renew in a burst that the schedule's
    /// jitter widens every cycle; `grant_over` one token life shows the steady state.
    pub per_second_min: u64,
    /// Busiest second.
    pub per_second_max: u64,
    /// Busiest second over the mean.
    pub peak_to_mean: f64,
    /// Renewals completed in each second of the hold, for plotting the spread.
    pub per_second: Vec<u64>,
    /// Renewal latency, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Maximum.
    pub max_ms: f64,
    /// Least life a token had left when its successor arrived, seconds (life counted
    /// from when the request that brought it was sent).
    pub min_slack_seconds: f64,
    /// Renewals whose answer came after the token in hand had expired: a job would
    /// have held an expired token. Must be 0.
    pub lapses: u64,
    /// Jobs that lost their lease, by reason. Must be empty.
    pub lost: BTreeMap<String, u64>,
    /// Transient failures that the SDK schedule retried, by reason (or gRPC code).
    pub retried: BTreeMap<String, u64>,
    /// Service resident memory (MiB) before granting, after granting, and the most seen
    /// while holding; `None` without `service_pid`.
    pub rss_mib_before: Option<f64>,
    /// After granting.
    pub rss_mib_granted: Option<f64>,
    /// Peak while holding.
    pub rss_mib_peak: Option<f64>,
}

impl fmt::Display for ScaleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |v: Option<f64>| v.map_or_else(|| "?".to_owned(), |v| format!("{v:.0}"));
        writeln!(
            f,
            "Scale: {} leases granted in {:.1} s, then held {:.0} s; token life {:.0} s",
            self.leases, self.grant_seconds, self.hold_seconds, self.token_life_seconds
        )?;
        writeln!(
            f,
            "  {} renewals, {:.0}/s (schedule predicts {:.0}/s)",
            self.renewals, self.renewals_per_second, self.expected_per_second
        )?;
        writeln!(
            f,
            "  per second: min {}  max {}  peak/mean {:.2}",
            self.per_second_min, self.per_second_max, self.peak_to_mean
        )?;
        writeln!(
            f,
            "  renewal latency ms: p50 {:.3}  p99 {:.3}  max {:.3}; least slack {:.1} s",
            self.p50_ms, self.p99_ms, self.max_ms, self.min_slack_seconds
        )?;
        writeln!(
            f,
            "  lapses {}  lost {:?}  retried {:?}",
            self.lapses, self.lost, self.retried
        )?;
        write!(
            f,
            "  service RSS MiB: before {}  granted {}  peak {}",
            mib(self.rss_mib_before),
            mib(self.rss_mib_granted),
            mib(self.rss_mib_peak)
        )
    }
}

/// Counters every job writes to.
struct Tally {
    /// Renewals completed in each second since holding began.
    per_second: Vec<AtomicU64>,
    latency: Mutex<Histogram<u64>>,
    min_slack_ms: AtomicU64,
    lapses: AtomicU64,
    retried: Mutex<BTreeMap<String, u64>>,
    lost: Mutex<BTreeMap<String, u64>>,
}

/// The hold's `(start, end)`, known once every lease is granted.
type Window = std::sync::OnceLock<(Instant, Instant)>;

/// A granted lease as its job holds it.
struct Held {
    lease_id: String,
    refresh_token: String,
    life: Duration,
    received: Instant,
}

fn now() -> Instant {
    Instant::from_std(monotonic_now())
}

fn resident_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// The machine reason of a failure, else its gRPC code and message.
fn reason(status: &tonic::Status) -> String {
    token_sdk::error_reason(status)
        .unwrap_or_else(|| format!("{:?}: {}", status.code(), status.message()))
}

fn life_of(tokens: &token_sdk::proto::TokenPair) -> Duration {
    tokens
        .access_token_expires_in
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or_default()
}

async fn grant(
    client: &mut JobTokenClient,
    subject_token: &str,
    job_id: String,
    lifetime: Duration,
) -> Result<Held, tonic::Status> {
    let sent = now();
    let response = client
        .issue_job_token(IssueJobTokenRequest {
            subject_token: subject_token.to_owned(),
            job_id,
            permissions: vec!["load.run".into()],
            max_lifetime: Some(proto_duration(lifetime)),
            audience: String::new(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let tokens = response.tokens.unwrap_or_default();
    Ok(Held {
        lease_id: response.lease.unwrap_or_default().lease_id,
        life: life_of(&tokens),
        refresh_token: tokens.refresh_token,
        received: sent,
    })
}

/// One simulated job: renews on the SDK's schedule until `end`.
async fn hold(mut client: JobTokenClient, mut held: Held, window: Arc<Window>, tally: Arc<Tally>) {
    let config = RenewalConfig::default();
    let mut attempt = 0;
    let mut due = held.received + token_sdk::refresh_in(held.life, &config, fastrand::f64());
    loop {
        if window.get().is_some_and(|&(_, end)| due >= end) {
            return;
        }
        tokio::time::sleep_until(due).await;
        let expires = held.received + held.life;
        let began = now();
        let result = client
            .refresh_job_token(RefreshJobTokenRequest {
                lease_id: held.lease_id.clone(),
                refresh_token: held.refresh_token.clone(),
            })
            .await;
        let done = now();
        match result {
            Ok(answer) => {
                attempt = 0;
                let tokens = answer.into_inner().tokens.unwrap_or_default();
                if done > expires {
                    tally.lapses.fetch_add(1, Ordering::Relaxed);
                }
                let slack = u64::try_from(expires.saturating_duration_since(done).as_millis())
                    .unwrap_or(u64::MAX);
                tally.min_slack_ms.fetch_min(slack, Ordering::Relaxed);
                let micros =
                    u64::try_from(done.duration_since(began).as_micros()).unwrap_or(u64::MAX);
                let _ = tally
                    .latency
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .record(micros.max(1));
                // Renewals while others are still being granted are checked, not counted.
                if let Some(&(start, _)) = window.get().filter(|(start, _)| done >= *start) {
                    let second =
                        usize::try_from(done.duration_since(start).as_secs()).unwrap_or(usize::MAX);
                    if let Some(bucket) = tally.per_second.get(second) {
                        bucket.fetch_add(1, Ordering::Relaxed);
                    }
                }
                held.life = life_of(&tokens);
                held.refresh_token = tokens.refresh_token;
                // The service measured the life at some moment during the call: count
                // it from the request, so expiries (and lapses) are never flattered.
                held.received = began;
                // As the SDK does: the next renewal is timed from this request's start.
                due = began + token_sdk::refresh_in(held.life, &config, fastrand::f64());
            }
            Err(status) if token_sdk::is_transient(&status) => {
                *tally
                    .retried
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(reason(&status))
                    .or_default() += 1;
                let left = expires.saturating_duration_since(done);
                due = done + token_sdk::backoff(attempt, left, &config, fastrand::f64());
                attempt += 1;
            }
            Err(status) => {
                *tally
                    .lost
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(reason(&status))
                    .or_default() += 1;
                return;
            }
        }
    }
}

impl Scale {
    /// Grants the leases, holds them for the duration, and reports.
    pub async fn run(&self) -> Result<ScaleReport, LoadError> {
        let rss_before = self.service_pid.and_then(resident_mib);
        let subject_token = subject_token(&self.data_dir, self.lease_lifetime + self.duration * 2)?;
        let clients = connect(&self.endpoint, &self.module_key, self.connections).await?;
        let run = fastrand::u64(..);

        let seconds = usize::try_from(self.duration.as_secs()).unwrap_or(0) + 1;
        let tally = Arc::new(Tally {
            per_second: (0..seconds).map(|_| AtomicU64::new(0)).collect(),
            latency: Mutex::new(
                Histogram::new_with_bounds(1, 60_000_000, 3).map_err(setup("histogram"))?,
            ),
            min_slack_ms: AtomicU64::new(u64::MAX),
            lapses: AtomicU64::new(0),
            retried: Mutex::new(BTreeMap::new()),
            lost: Mutex::new(BTreeMap::new()),
        });
        let window = Arc::new(Window::new());

        // Grant the leases, `grant_concurrency` at a time; each job starts renewing as
        // soon as it holds its lease, as a real one would.
        let granting = now();
        let pace = self.grant_over / u32::try_from(self.leases.max(1)).unwrap_or(u32::MAX);
        let next = Arc::new(AtomicU64::new(0));
        let mut granters = Vec::new();
        for g in 0..self.grant_concurrency.max(1) {
            let mut client = clients[g % clients.len()].clone();
            let (next, subject_token) = (Arc::clone(&next), Arc::clone(&subject_token));
            let (window, tally) = (Arc::clone(&window), Arc::clone(&tally));
            let (leases, lifetime) = (self.leases as u64, self.lease_lifetime);
            granters.push(tokio::spawn(async move {
                let mut jobs = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= leases {
                        return Ok::<_, LoadError>(jobs);
                    }
                    let at = granting + pace * u32::try_from(i).unwrap_or(u32::MAX);
                    tokio::time::sleep_until(at).await;
                    let job = format!("scale-{run:x}-{i}");
                    let lease = grant(&mut client, &subject_token, job, lifetime)
                        .await
                        .map_err(setup("granting a lease"))?;
                    let life = lease.life;
                    let (window, tally) = (Arc::clone(&window), Arc::clone(&tally));
                    jobs.push((
                        life,
                        tokio::spawn(hold(client.clone(), lease, window, tally)),
                    ));
                }
            }));
        }
        let mut jobs = Vec::with_capacity(self.leases);
        for granter in granters {
            jobs.extend(granter.await.map_err(setup("granter"))??);
        }
        let grant_seconds = granting.elapsed().as_secs_f64();
        let rss_granted = self.service_pid.and_then(resident_mib);
        let token_life = jobs.first().map(|(life, _)| *life).unwrap_or_default();

        // Hold them all for the duration.
        let start = now();
        let end = start + self.duration;
        let _ = window.set((start, end));
        let mut rss_peak = rss_granted;
        while now() < end {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Some(now) = self.service_pid.and_then(resident_mib) {
                rss_peak = Some(rss_peak.map_or(now, |p: f64| p.max(now)));
            }
        }
        for (_, job) in jobs {
            job.await.map_err(setup("job"))?;
        }

        let counts: Vec<u64> = tally
            .per_second
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let renewals: u64 = counts.iter().sum();
        let hold_seconds = self.duration.as_secs_f64();
        // Skip the first token life (renewals then follow the grant order) and the last,
        // partial second.
        let settled_from = usize::try_from(token_life.as_secs()).unwrap_or(usize::MAX);
        let settled = counts
            .get(settled_from..counts.len().saturating_sub(1))
            .unwrap_or(&[]);
        let settled_mean = if settled.is_empty() {
            0.0
        } else {
            settled.iter().sum::<u64>() as f64 / settled.len() as f64
        };
        let latency = tally.latency.lock().unwrap_or_else(|e| e.into_inner());
        let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
        let min_slack = tally.min_slack_ms.load(Ordering::Relaxed);
        let lost = tally.lost.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Ok(ScaleReport {
            leases: self.leases,
            grant_seconds,
            token_life_seconds: token_life.as_secs_f64(),
            hold_seconds,
            renewals,
            renewals_per_second: renewals as f64 / hold_seconds,
            expected_per_second: self.leases as f64 / (0.7 * token_life.as_secs_f64().max(1e-3)),
            per_second_min: settled.iter().copied().min().unwrap_or(0),
            per_second_max: settled.iter().copied().max().unwrap_or(0),
            peak_to_mean: if settled_mean > 0.0 {
                settled.iter().copied().max().unwrap_or(0) as f64 / settled_mean
            } else {
                0.0
            },
            per_second: counts.clone(),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            max_ms: latency.max() as f64 / 1000.0,
            min_slack_seconds: if min_slack == u64::MAX {
                0.0
            } else {
                min_slack as f64 / 1000.0
            },
            lapses: tally.lapses.load(Ordering::Relaxed),
            lost,
            retried: tally
                .retried
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            rss_mib_before: rss_before,
            rss_mib_granted: rss_granted,
            rss_mib_peak: rss_peak,
        })
    }
}
