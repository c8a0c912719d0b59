//! What one module may hold or spend: revocation streams and call rates. Every bound is
//! read from [`LimitsConfig`] once, at start; reaching one is an [`Error`] that maps to
//! `RESOURCE_EXHAUSTED` with a reason (and, for rates, when to retry).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::config::{LimitsConfig, ModuleConfig};
use crate::error::Error;

/// A kind of call with a rate of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spend {
    /// `IssueJobToken`, `ResumeJobToken`: each verifies a user token or writes a lease.
    Grant,
    /// `RefreshJobToken`.
    Renewal,
    /// `IntrospectToken`.
    Introspection,
}

impl Spend {
    fn name(self) -> &'static str {
        match self {
            Spend::Grant => "grants",
            Spend::Renewal => "renewals",
            Spend::Introspection => "introspections",
        }
    }
}

/// Token buckets of one module: a rate per second, bursts of twice that.
#[derive(Debug)]
struct Buckets {
    grants: DefaultDirectRateLimiter,
    renewals: DefaultDirectRateLimiter,
    introspections: DefaultDirectRateLimiter,
}

fn bucket(per_second: u32) -> DefaultDirectRateLimiter {
    let rate = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
    let burst = rate.saturating_mul(NonZeroU32::new(2).unwrap_or(NonZeroU32::MIN));
    RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
}

/// The limits of every configured module.
#[derive(Debug)]
pub struct Limits {
    buckets: HashMap<String, Buckets>,
    streams_per_module: usize,
    /// Shared with the limits a reload replaces, so streams opened before it still count.
    open_streams: Arc<Mutex<HashMap<String, usize>>>,
    clock: DefaultClock,
}

impl Limits {
    /// One set of buckets per configured module (the set is fixed, so the map is bounded).
    pub fn new(modules: &[ModuleConfig], config: &LimitsConfig) -> Self {
        let buckets = modules
            .iter()
            .map(|m| {
                let b = Buckets {
                    grants: bucket(config.grants_per_second),
                    renewals: bucket(config.renewals_per_second),
                    introspections: bucket(config.introspections_per_second),
                };
                (m.id.clone(), b)
            })
            .collect();
        Self {
            buckets,
            streams_per_module: config.streams_per_module,
            open_streams: Arc::new(Mutex::new(HashMap::new())),
            clock: DefaultClock::default(),
        }
    }

    /// New limits for a reloaded config. Open streams keep counting against their
    /// module; rate buckets start full.
    pub fn reconfigured(&self, modules: &[ModuleConfig], config: &LimitsConfig) -> Self {
        Self {
            open_streams: Arc::clone(&self.open_streams),
            ..Self::new(modules, config)
        }
    }

    /// Takes one call of `spend` from `module`'s bucket, or says when to retry.
    pub fn spend(&self, module: &str, spend: Spend) -> Result<(), Error> {
        // Only configured modules authenticate; anything else is refused, not waved on.
        let b = self
            .buckets
            .get(module)
            .ok_or(Error::ModuleUnauthenticated)?;
        let bucket = match spend {
            Spend::Grant => &b.grants,
            Spend::Renewal => &b.renewals,
            Spend::Introspection => &b.introspections,
        };
        bucket.check().map_err(|not_until| Error::RateLimited {
            what: spend.name(),
            retry_after: not_until.wait_time_from(self.clock.now()),
        })
    }

    /// Opens one revocation stream for `module`; the slot is given back when the
    /// returned guard drops (the stream ended or its client went away).
    pub fn open_stream(self: &Arc<Self>, module: &str) -> Result<StreamSlot, Error> {
        let mut open = self.open_streams.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(module.to_owned()).or_insert(0);
        if *n >= self.streams_per_module {
            return Err(Error::TooManyStreams {
                limit: self.streams_per_module,
            });
        }
        *n += 1;
        Ok(StreamSlot {
            limits: Arc::clone(self),
            module: module.to_owned(),
        })
    }

    /// Streams `module` holds now.
    pub fn streams_open(&self, module: &str) -> usize {
        let open = self.open_streams.lock().unwrap_or_else(|e| e.into_inner());
        open.get(module).copied().unwrap_or(0)
    }
}

/// One open revocation stream, counted against its module until dropped.
#[derive(Debug)]
pub struct StreamSlot {
    limits: Arc<Limits>,
    module: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self
            .limits
            .open_streams
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.module) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.module);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_second: u32, streams: usize) -> Arc<Limits> {
        let config = LimitsConfig {
            streams_per_module: streams,
            grants_per_second: per_second,
            renewals_per_second: per_second,
            introspections_per_second: per_second,
            ..LimitsConfig::default()
        };
        let modules = [ModuleConfig::new("a", None), ModuleConfig::new("b", None)];
        Arc::new(Limits::new(&modules, &config))
    }

    #[test]
    fn a_burst_of_twice_the_rate_passes_then_calls_wait() {
        let l = limits(2, 1);
        for _ in 0..4 {
            l.spend("a", Spend::Renewal).unwrap();
        }
        match l.spend("a", Spend::Renewal) {
            Err(Error::RateLimited { what, retry_after }) => {
                assert_eq!(what, "renewals");
                assert!(retry_after > std::time::Duration::ZERO);
                assert!(retry_after <= std::time::Duration::from_millis(500));
            }
            other => panic!("{other:?}"),
        }
        // Buckets are per module and per kind.
        l.spend("b", Spend::Renewal).unwrap();
        l.spend("a", Spend::Grant).unwrap();
    }

    #[test]
    fn unknown_modules_are_refused() {
        let l = limits(100, 1);
        assert!(matches!(
            l.spend("ghost", Spend::Grant),
            Err(Error::ModuleUnauthenticated)
        ));
    }

    #[test]
    fn stream_slots_are_counted_per_module_and_given_back() {
        let l = limits(100, 2);
        let s1 = l.open_stream("a").unwrap();
        let _s2 = l.open_stream("a").unwrap();
        assert!(matches!(
            l.open_stream("a"),
            Err(Error::TooManyStreams { limit: 2 })
        ));
        let _other = l.open_stream("b").unwrap();
        drop(s1);
        assert_eq!(l.streams_open("a"), 1);
        let _s3 = l.open_stream("a").unwrap();
    }
}
