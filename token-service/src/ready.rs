//! Readiness: whether this replica can serve calls right now. The background task probes
//! the store every second and reloads the signing keys; either failing makes the replica
//! not ready (`/readyz` 503, gRPC health `NOT_SERVING`) until a probe succeeds again.
//! Liveness (`/healthz`) does not depend on it: a replica that lost its database should
//! leave the load balancer's rotation, not be restarted.

use std::sync::Mutex;

use tokio::sync::watch;

/// What readiness depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The store answers a query.
    Store,
    /// The signing keys load from the store and unseal.
    Keys,
}

impl Check {
    fn problem(self) -> &'static str {
        match self {
            Check::Store => "store unreachable",
            Check::Keys => "signing keys cannot be loaded",
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Failing {
    store: bool,
    keys: bool,
}

impl Failing {
    fn problems(self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.store {
            out.push(Check::Store.problem());
        }
        if self.keys {
            out.push(Check::Keys.problem());
        }
        out
    }
}

/// The replica's readiness, updated by probes and watched by the health service.
#[derive(Debug)]
pub struct Readiness {
    failing: Mutex<Failing>,
    ready: watch::Sender<bool>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    /// Ready: the service has just loaded its keys from a reachable store.
    pub fn new() -> Self {
        Self {
            failing: Mutex::new(Failing::default()),
            ready: watch::channel(true).0,
        }
    }

    /// Records a probe's outcome; `error` is its failure, logged when readiness changes.
    pub fn record(&self, check: Check, error: Option<&dyn std::fmt::Display>) {
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        let flag = match check {
            Check::Store => &mut failing.store,
            Check::Keys => &mut failing.keys,
        };
        let was = *flag;
        *flag = error.is_some();
        match error {
            Some(e) if !was => {
                tracing::warn!(problem = check.problem(), error = %e, "not ready");
            }
            None if was => tracing::info!(recovered = check.problem(), "check passes again"),
            _ => {}
        }
        let ready = !failing.store && !failing.keys;
        let changed = self.ready.send_if_modified(|r| {
            let changed = *r != ready;
            *r = ready;
            changed
        });
        if changed && ready {
            tracing::info!("ready");
        }
    }

    /// Whether the check is failing now.
    pub fn failing(&self, check: Check) -> bool {
        let failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        match check {
            Check::Store => failing.store,
            Check::Keys => failing.keys,
        }
    }

    /// Whether every check passes.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// What fails now, for `/readyz` (empty when ready).
    pub fn problems(&self) -> Vec<&'static str> {
        self.failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .problems()
    }

    /// Changes of readiness.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_failing_check_makes_it_not_ready_until_that_check_passes() {
        let r = Readiness::new();
        let mut rx = r.subscribe();
        assert!(r.is_ready());
        r.record(Check::Store, Some(&"connection refused"));
        assert!(!r.is_ready());
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        r.record(Check::Keys, Some(&"store unavailable"));
        assert_eq!(
            r.problems(),
            ["store unreachable", "signing keys cannot be loaded"]
        );
        r.record(Check::Store, None);
        assert!(!r.is_ready(), "keys still fail");
        assert!(!rx.has_changed().unwrap());
        r.record(Check::Keys, None);
        assert!(r.is_ready());
        assert!(rx.has_changed().unwrap());
        assert!(r.problems().is_empty());
    }
}
