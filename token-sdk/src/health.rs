//! What a client knows about the service's availability: one log line per outage (not
//! one per retry), counters an application can read, the revocation feed's state, and
//! the signal that the service is reachable again.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// Whether the service's revocation stream is feeding this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevocationFeed {
    /// Not followed (turned off in the builder).
    Off,
    /// Open and caught up: ends recorded by the service arrive within a second.
    Live,
    /// Not open since `since` (on the SDK's monotonic clock); ends recorded meanwhile
    /// arrive when it reopens, since it resumes from its cursor.
    Blind {
        /// When it went down (or started connecting).
        since: Instant,
    },
}

impl RevocationFeed {
    /// How long it has been blind at `now`; `None` when live or off.
    pub fn blind_for(&self, now: Instant) -> Option<Duration> {
        match self {
            RevocationFeed::Blind { since } => Some(now.saturating_duration_since(*since)),
            _ => None,
        }
    }
}

/// The state of one revocation stream, and the signal its reopening sends.
pub(crate) struct Feed {
    pub(crate) state: watch::Sender<RevocationFeed>,
    /// Bumped each time the stream comes back after being down: the service is
    /// reachable again, so leases waiting to retry should retry now.
    pub(crate) reconnected: watch::Sender<u64>,
}

impl Feed {
    pub(crate) fn new(on: bool) -> Feed {
        let state = if on {
            RevocationFeed::Blind {
                since: crate::clock::now(),
            }
        } else {
            RevocationFeed::Off
        };
        Feed {
            state: watch::channel(state).0,
            reconnected: watch::channel(0).0,
        }
    }

    pub(crate) fn get(&self) -> RevocationFeed {
        *self.state.borrow()
    }

    /// The stream is open and caught up.
    pub(crate) fn live(&self) {
        let was = self.get();
        if was == RevocationFeed::Live {
            return;
        }
        self.state.send_replace(RevocationFeed::Live);
        if let Some(blind) = was.blind_for(crate::clock::now()) {
            tracing::debug!(
                blind_ms = millis(blind),
                "revocation stream live after being blind"
            );
        }
        self.reconnected.send_modify(|n| *n += 1);
    }

    /// Starts (or restarts) connecting.
    pub(crate) fn connecting(&self) {
        self.state.send_replace(RevocationFeed::Blind {
            since: crate::clock::now(),
        });
    }

    /// The stream is down (first failure since it was live).
    pub(crate) fn blind(&self) {
        self.state.send_if_modified(|state| match state {
            RevocationFeed::Live => {
                *state = RevocationFeed::Blind {
                    since: crate::clock::now(),
                };
                true
            }
            _ => false,
        });
    }
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Renewal counters of one [`crate::Client`], for an application's metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RenewalStats {
    /// Failed renewal attempts by gRPC code (transient ones, retried, and terminal ones).
    pub failures: Vec<(tonic::Code, u64)>,
    /// Total time leases of this client held an expired token, waiting for a fresh one.
    pub expired_token_time: Duration,
    /// Outages seen (a run of failed renewals ended by a successful one).
    pub outages: u64,
    /// How long the current outage has lasted, if one is under way.
    pub outage_for: Option<Duration>,
}

/// One run of failing renewals.
struct Outage {
    started: Instant,
    first_code: tonic::Code,
    leases: HashSet<String>,
    failures: u64,
}

#[derive(Default)]
struct OutageLog {
    current: Option<Outage>,
    /// When the last outage ended: failures of attempts that began before belong to it.
    last_end: Option<Instant>,
    count: u64,
}

/// Shared by a client and its leases.
pub(crate) struct Health {
    failures: [AtomicU64; 17],
    expired_nanos: AtomicU64,
    outage: Mutex<OutageLog>,
}

impl Health {
    pub(crate) fn new() -> Health {
        Health {
            failures: Default::default(),
            expired_nanos: AtomicU64::new(0),
            outage: Mutex::new(OutageLog::default()),
        }
    }

    /// A renewal attempt that began at `began` failed with `code`.
    pub(crate) fn renewal_failed(
        &self,
        lease_id: &str,
        code: tonic::Code,
        transient: bool,
        began: Instant,
    ) {
        if let Some(n) = self.failures.get(code as usize) {
            n.fetch_add(1, Ordering::Relaxed);
        }
        if !transient {
            return;
        }
        let mut log = self.outage.lock().unwrap_or_else(|e| e.into_inner());
        if log.current.is_none() && log.last_end.is_some_and(|end| began < end) {
            return; // a straggler of the outage that just ended
        }
        let outage = log.current.get_or_insert_with(|| {
            tracing::warn!(
                code = ?code,
                "token service unreachable: renewals are retrying (logged once per outage; \
                 each retry at DEBUG)"
            );
            Outage {
                started: crate::clock::now(),
                first_code: code,
                leases: HashSet::new(),
                failures: 0,
            }
        });
        outage.failures += 1;
        outage.leases.insert(lease_id.to_owned());
    }

    /// A renewal succeeded; `expired_for` is how long the lease had held an expired token.
    pub(crate) fn renewal_succeeded(&self, expired_for: Duration) {
        self.add_expired(expired_for);
        let mut log = self.outage.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(outage) = log.current.take() {
            let now = crate::clock::now();
            log.last_end = Some(now);
            log.count += 1;
            tracing::info!(
                outage_ms = millis(now.saturating_duration_since(outage.started)),
                leases_affected = outage.leases.len(),
                failed_attempts = outage.failures,
                first_code = ?outage.first_code,
                "token service reachable again: renewals resumed"
            );
        }
    }

    pub(crate) fn add_expired(&self, expired_for: Duration) {
        let nanos = u64::try_from(expired_for.as_nanos()).unwrap_or(u64::MAX);
        self.expired_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> RenewalStats {
        let failures = self
            .failures
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                let n = n.load(Ordering::Relaxed);
                (n > 0).then(|| (tonic::Code::from_i32(i as i32), n))
            })
            .collect();
        let log = self.outage.lock().unwrap_or_else(|e| e.into_inner());
        RenewalStats {
            failures,
            expired_token_time: Duration::from_nanos(self.expired_nanos.load(Ordering::Relaxed)),
            outages: log.count,
            outage_for: log
                .current
                .as_ref()
                .map(|o| crate::clock::now().saturating_duration_since(o.started)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_outage_counts_leases_and_ignores_stragglers() {
        let health = Health::new();
        let t0 = crate::clock::now();
        for i in 0..30 {
            health.renewal_failed(&format!("l{}", i % 3), tonic::Code::Unavailable, true, t0);
        }
        tokio::time::sleep(Duration::from_secs(4)).await;
        let stats = health.stats();
        assert_eq!(stats.outage_for, Some(Duration::from_secs(4)));
        assert_eq!(stats.failures, vec![(tonic::Code::Unavailable, 30)]);
        health.renewal_succeeded(Duration::from_millis(1500));
        // A failure of an attempt begun during the outage does not open another one.
        health.renewal_failed("l1", tonic::Code::Unavailable, true, t0);
        let stats = health.stats();
        assert_eq!((stats.outages, stats.outage_for), (1, None));
        assert_eq!(stats.expired_token_time, Duration::from_millis(1500));
        // A later one does; terminal answers never do.
        health.renewal_failed("l1", tonic::Code::NotFound, false, crate::clock::now());
        assert_eq!(health.stats().outage_for, None);
        health.renewal_failed("l1", tonic::Code::Unavailable, true, crate::clock::now());
        assert_eq!(health.stats().outage_for, Some(Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn the_feed_signals_only_a_return() {
        let feed = Feed::new(true);
        let mut back = feed.reconnected.subscribe();
        assert!(matches!(feed.get(), RevocationFeed::Blind { .. }));
        feed.live();
        assert!(back.has_changed().unwrap(), "first open counts as a return");
        back.borrow_and_update();
        feed.live();
        assert!(!back.has_changed().unwrap());
        feed.blind();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = crate::clock::now();
        assert_eq!(feed.get().blind_for(now), Some(Duration::from_secs(2)));
        feed.blind(); // a second failure keeps the first instant
        assert_eq!(feed.get().blind_for(now), Some(Duration::from_secs(2)));
        feed.live();
        assert!(back.has_changed().unwrap());
        assert_eq!(Feed::new(false).get(), RevocationFeed::Off);
    }
}
