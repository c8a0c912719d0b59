//! When to renew, and how long to wait after a failure: pure functions of the durations
//! the service returned, so a client whose wall clock is wrong still renews on time.

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
    /// First wait after a transient failure; doubles each attempt. Default 200 ms.
    pub backoff_initial: Duration,
    /// Longest wait after a transient failure. Default 10 s.
    pub backoff_max: Duration,
}

impl Default for RenewalConfig {
    fn default() -> Self {
        Self {
            refresh_at: 0.7,
            jitter: 0.1,
            min_delay: Duration::from_millis(500),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
        }
    }
}

/// Shortest wait of all: a token with no life left is renewed after this, not at once,
/// so a misbehaving server cannot drive a tight loop.
pub const FLOOR: Duration = Duration::from_millis(50);

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

/// How long to wait before retry number `attempt` (0-based) after a transient failure:
/// exponential, with "equal jitter" (half fixed, half random), capped by `backoff_max`
/// and by `until_expiry` (retry before the token in hand expires while it still lives).
pub fn backoff(attempt: u32, until_expiry: Duration, cfg: &RenewalConfig, u: f64) -> Duration {
    let exp = cfg
        .backoff_initial
        .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .min(cfg.backoff_max);
    let jittered = exp.mul_f64(0.5 + 0.5 * u.clamp(0.0, 1.0));
    let bounded = if until_expiry > FLOOR {
        jittered.min(until_expiry / 2)
    } else {
        jittered
    };
    bounded.max(FLOOR)
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
    fn backoff_grows_caps_and_stays_inside_the_token_life() {
        let cfg = RenewalConfig::default();
        let long = Duration::from_secs(3600);
        let waits: Vec<Duration> = (0..12).map(|a| backoff(a, long, &cfg, 1.0)).collect();
        assert_eq!(waits[0], Duration::from_millis(200));
        assert_eq!(waits[1], Duration::from_millis(400));
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*waits.last().unwrap(), cfg.backoff_max);
        for u in uniforms(500) {
            for a in 0..40 {
                let d = backoff(a, long, &cfg, u);
                assert!(d <= cfg.backoff_max && d >= FLOOR);
            }
            // With 3 s of token life left, no wait exceeds half of it.
            assert!(backoff(10, Duration::from_secs(3), &cfg, u) <= Duration::from_millis(1500));
        }
        // Expired token: plain backoff, still bounded and never zero.
        assert_eq!(
            backoff(0, Duration::ZERO, &cfg, 0.0),
            Duration::from_millis(100)
        );
    }
}
