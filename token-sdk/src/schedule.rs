//! When to renew, and how long to wait after a failure: pure functions of the durations
//! the service returned, so a client whose wall clock is wrong still renews on time.
//!
//! The retry schedule serves the job, not a generic client. While the token in hand has
//! life to spare, retries back off politely; once it nears expiry (within
//! [`URGENT_RETRIES`] × [`RenewalConfig::retry_interval`]) and after it has expired, they
//! come every `retry_interval` (jittered ±50%), whatever the attempt count, so a job holds
//! a fresh token about a second after the service returns, however long it was gone.

use std::time::Duration;

/// Tuning of the background renewal. The defaults suit access tokens of minutes.
#[derive(Debug, Clone, PartialEq)]
pub struct RenewalConfig {
    /// Renew at this fraction of the token's life. Default 0.7.
    pub refresh_at: f64,
    /// Spread renewals by ± this fraction of the token's life, so thousands of leases do
    /// not renew in the same second. Default 0.1.
    pub jitter: f64,
    /// Never wait less than this between renewals (unless the token lives less than
    /// twice as long). Default 500 ms.
    pub min_delay: Duration,
    /// First wait after a transient failure while the token is healthy; doubles each
    /// attempt. Default 200 ms.
    pub backoff_initial: Duration,
    /// Longest wait after a transient failure while the token is healthy. Default 10 s.
    pub backoff_max: Duration,
    /// Wait between retries once the token is near expiry or expired, jittered ±50% so
    /// many leases do not retry in step; also paces the revocation stream's reconnects
    /// (a quarter of it at first, growing to half). Default 1 s.
    pub retry_interval: Duration,
    /// Stop a job that stopped making progress: when no [`crate::Lease::progress`] was
    /// reported for this long, the lease is released with outcome `failed` and ends with
    /// [`crate::EndReason::Stalled`], so a hung worker does not hold a live credential for
    /// hours. `None` (the default): renew for as long as the job holds the lease.
    pub stall_timeout: Option<Duration>,
}

impl Default for RenewalConfig {
    fn default() -> Self {
        Self {
            refresh_at: 0.7,
            jitter: 0.1,
            min_delay: Duration::from_millis(500),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            retry_interval: Duration::from_secs(1),
            stall_timeout: None,
        }
    }
}

/// Shortest wait of all: a token with no life left is renewed after this, not at once,
/// so a misbehaving server cannot drive a tight loop.
pub const FLOOR: Duration = Duration::from_millis(50);

/// The token is "near expiry" once it has at most this many retry intervals left.
pub const URGENT_RETRIES: u32 = 3;

/// Shortest wait while a retry is squeezed in before a token's expiry.
const SQUEEZE_FLOOR: Duration = Duration::from_millis(100);

/// How long after receiving a token that lives `life` to renew it. `u` is a uniform
/// random number in `[0, 1)` (0.5 means no jitter).
///
/// Always before the token expires (for tokens living more than [`FLOOR`]), never
/// sooner than `min(min_delay, life / 2)` or [`FLOOR`].
pub fn refresh_in(life: Duration, cfg: &RenewalConfig, u: f64) -> Duration {
    let life_s = life.as_secs_f64();
    let fraction = cfg.refresh_at.clamp(0.0, 1.0);
    let spread = cfg.jitter.clamp(0.0, 0.5) * (2.0 * u.clamp(0.0, 1.0) - 1.0);
    let wanted = life_s * (fraction + spread);
    let earliest = cfg.min_delay.as_secs_f64().min(life_s / 2.0);
    // Leave at least 5% of the life (and 10 ms) for the renewal itself.
    let latest = life_s - (life_s * 0.05).max(0.010);
    let chosen = wanted.min(latest).max(earliest);
    Duration::from_secs_f64(chosen.max(0.0)).max(FLOOR)
}

/// The two regimes of the retry schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The token has life to spare: back off exponentially.
    Healthy,
    /// The token is near expiry or expired: retry every `retry_interval`.
    Urgent,
}

/// Which regime a lease whose token expires in `until_expiry` is in.
pub fn phase(until_expiry: Duration, cfg: &RenewalConfig) -> Phase {
    if until_expiry > cfg.retry_interval.saturating_mul(URGENT_RETRIES) {
        Phase::Healthy
    } else {
        Phase::Urgent
    }
}

/// How long to wait before the next renewal attempt after `attempt` (0-based)
/// consecutive transient failures, when the token in hand expires in `until_expiry`
/// (zero once expired). `u` is uniform in `[0, 1)`.
///
/// - Healthy token: exponential from `backoff_initial`, capped by `backoff_max`, with
///   "equal jitter" (half fixed, half random), and never past the start of the urgent
///   window, so a long backoff cannot sleep through the token's last seconds.
/// - Near expiry: `retry_interval` × `[0.5, 1.5)`, but at most half the life left (at
///   least 100 ms), so retries are squeezed in before expiry.
/// - Expired: `retry_interval` × `[0.5, 1.5)`. The attempt count plays no part here, so
///   the retries squeezed in before expiry cannot inflate the wait after it.
///
/// Never less than [`FLOOR`]. Callers asking for a renewal and a reconnected channel cut
/// the wait short (see the crate's README); a `RetryInfo` from the service lengthens it.
pub fn backoff(attempt: u32, until_expiry: Duration, cfg: &RenewalConfig, u: f64) -> Duration {
    let u = u.clamp(0.0, 1.0);
    let window = cfg.retry_interval.saturating_mul(URGENT_RETRIES);
    let wait = match phase(until_expiry, cfg) {
        Phase::Healthy => {
            let exp = cfg
                .backoff_initial
                .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
                .min(cfg.backoff_max);
            exp.mul_f64(0.5 + 0.5 * u).min(until_expiry - window)
        }
        Phase::Urgent => {
            let interval = cfg.retry_interval.mul_f64(0.5 + u);
            if until_expiry.is_zero() {
                interval
            } else {
                interval.min((until_expiry / 2).max(SQUEEZE_FLOOR))
            }
        }
    };
    wait.max(FLOOR)
}

/// How long the revocation stream waits before reopening after `attempt` (0-based)
/// consecutive failures: a quarter of `retry_interval`, doubling up to half of it, with
/// equal jitter. One stream per client, so it can probe faster than leases retry; its
/// reopening is what wakes the leases when the service returns.
pub fn reconnect_in(attempt: u32, cfg: &RenewalConfig, u: f64) -> Duration {
    let base = cfg.retry_interval / 4;
    let exp = base
        .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .min(cfg.retry_interval / 2);
    exp.mul_f64(0.5 + 0.5 * u.clamp(0.0, 1.0)).max(FLOOR)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator, so the property checks below are repeatable.
    fn uniforms(n: usize) -> impl Iterator<Item = f64> {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..n).map(move |_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64
        })
    }

    #[test]
    fn always_before_expiry_and_never_a_tight_loop() {
        let cfg = RenewalConfig::default();
        let lives = [0.06, 0.2, 1.0, 2.0, 5.0, 59.0, 300.0, 3600.0, 86_400.0];
        for life in lives.map(Duration::from_secs_f64) {
            for u in uniforms(2000) {
                let d = refresh_in(life, &cfg, u);
                assert!(d < life, "life {life:?}: {d:?} is not before expiry");
                let floor = cfg.min_delay.min(life / 2).max(FLOOR);
                assert!(
                    d + Duration::from_micros(1) >= floor,
                    "life {life:?}: {d:?} too soon"
                );
            }
        }
        // A token with no life left still waits the floor.
        assert_eq!(refresh_in(Duration::ZERO, &cfg, 0.5), FLOOR);
    }

    #[test]
    fn renews_at_the_configured_fraction_without_jitter() {
        let cfg = RenewalConfig::default();
        let d = refresh_in(Duration::from_secs(300), &cfg, 0.5);
        assert_eq!(d.as_millis(), 210_000);
        let exact = RenewalConfig { jitter: 0.0, ..cfg };
        for u in uniforms(100) {
            assert_eq!(
                refresh_in(Duration::from_secs(100), &exact, u).as_secs(),
                70
            );
        }
    }

    #[test]
    fn jitter_spreads_many_clients_over_the_window() {
        let cfg = RenewalConfig::default();
        let life = Duration::from_secs(300);
        // 10,000 clients: each 6-second bucket of the ±30 s window gets a fair share.
        let mut buckets = [0u32; 10];
        for u in uniforms(10_000) {
            let d = refresh_in(life, &cfg, u).as_secs_f64();
            assert!((180.0..=240.0).contains(&d), "{d}");
            let i = (((d - 180.0) / 6.0) as usize).min(9);
            buckets[i] += 1;
        }
        for (i, n) in buckets.iter().enumerate() {
            assert!(
                (800..1200).contains(n),
                "bucket {i} has {n} of 10000: {buckets:?}"
            );
        }
    }

    #[test]
    fn healthy_backoff_grows_caps_and_stops_at_the_urgent_window() {
        let cfg = RenewalConfig::default();
        let long = Duration::from_secs(3600);
        let waits: Vec<Duration> = (0..12).map(|a| backoff(a, long, &cfg, 1.0)).collect();
        assert_eq!(waits[0], Duration::from_millis(200));
        assert_eq!(waits[1], Duration::from_millis(400));
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*waits.last().unwrap(), cfg.backoff_max);
        let window = cfg.retry_interval * URGENT_RETRIES;
        for u in uniforms(500) {
            for a in 0..40 {
                let d = backoff(a, long, &cfg, u);
                assert!(d <= cfg.backoff_max && d >= FLOOR);
                // 5 s left: never sleeps past the start of the urgent window (3 s left).
                let left = Duration::from_secs(5);
                assert!(backoff(a, left, &cfg, u) <= left - window + FLOOR);
            }
        }
    }

    /// Virtual time: a token of 2 s, the service gone for good from the renewal point.
    /// Walks the schedule as the renewal task does (each attempt fails at once).
    fn walk(life: Duration, cfg: &RenewalConfig, u: f64, until: Duration) -> Vec<Duration> {
        let mut now = refresh_in(life, cfg, 0.5);
        let mut attempts = vec![now];
        let mut attempt = 0;
        while now < until {
            let left = life.saturating_sub(now);
            now += backoff(attempt, left, cfg, u);
            attempt += 1;
            attempts.push(now);
        }
        attempts
    }

    #[test]
    fn squeezed_retries_before_expiry_do_not_lengthen_the_wait_after_it() {
        let cfg = RenewalConfig::default();
        for u in [0.0, 0.3, 0.5, 0.99] {
            let life = Duration::from_secs(2);
            let attempts = walk(life, &cfg, u, Duration::from_secs(120));
            let before = attempts.iter().filter(|t| **t < life).count();
            // Several attempts before expiry (the renewal point, then squeezed retries)...
            assert!((2..=8).contains(&before), "u {u}: {attempts:?}");
            // ...and yet every wait after expiry is the urgent interval, also after an
            // hour's worth of attempts: the old schedule jumped to 5-10 s here.
            let gaps: Vec<Duration> = attempts
                .windows(2)
                .filter(|w| w[0] >= life)
                .map(|w| w[1] - w[0])
                .collect();
            assert!(gaps.len() > 50, "{}", gaps.len());
            let expected = cfg.retry_interval.mul_f64(0.5 + u);
            assert!(gaps.iter().all(|g| *g == expected), "u {u}: {gaps:?}");
            // The attempt count in the thousands changes nothing.
            assert_eq!(backoff(5000, Duration::ZERO, &cfg, u), expected);
        }
    }

    #[test]
    fn near_expiry_retries_come_often_enough_to_land_before_it() {
        let cfg = RenewalConfig::default();
        for u in uniforms(500) {
            for left_ms in [2900, 1500, 600, 250, 120, 60, 1] {
                let left = Duration::from_millis(left_ms);
                assert_eq!(phase(left, &cfg), Phase::Urgent);
                let d = backoff(40, left, &cfg, u);
                assert!(d <= cfg.retry_interval.mul_f64(1.5), "{d:?}");
                // Half the life left, but never under 100 ms.
                assert!(d <= (left / 2).max(SQUEEZE_FLOOR), "{left:?}: {d:?}");
                assert!(d >= FLOOR);
            }
        }
    }

    #[test]
    fn expired_retries_spread_ten_thousand_leases_around_the_interval() {
        let cfg = RenewalConfig::default();
        let mut buckets = [0u32; 10];
        for u in uniforms(10_000) {
            let d = backoff(7, Duration::ZERO, &cfg, u);
            assert!(d >= Duration::from_millis(500) && d < Duration::from_millis(1500));
            buckets[((d.as_millis() - 500) / 100) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|n| (800..1200).contains(n)),
            "{buckets:?}"
        );
    }

    #[test]
    fn the_revocation_stream_reconnects_fast_and_politely() {
        let cfg = RenewalConfig::default();
        for u in uniforms(500) {
            let first = reconnect_in(0, &cfg, u);
            assert!(first >= Duration::from_millis(125) && first <= Duration::from_millis(250));
            for a in 0..50 {
                let d = reconnect_in(a, &cfg, u);
                assert!(d >= FLOOR && d <= Duration::from_millis(500), "{a}: {d:?}");
            }
        }
        // Honours the client's config.
        let slow = RenewalConfig {
            retry_interval: Duration::from_secs(8),
            ..cfg
        };
        assert_eq!(reconnect_in(9, &slow, 1.0), Duration::from_secs(4));
    }
}
