//! The observer port: what the domain reports as it works (the service crate's
//! Prometheus metrics implement it).

use std::time::Duration;

/// Receives the domain's measurements. Every method is cheap and never fails.
pub trait Observer: Send + Sync + 'static {
    /// A lease ended, for `reason` (an [`crate::lease::EndReason`] label).
    fn lease_ended(&self, reason: &'static str);

    /// Active leases now.
    fn set_active_leases(&self, n: u64);

    /// A re-check of a user's standing at `issuer` came to `result`; `unverified_for`
    /// is how long the lease's permissions have gone unconfirmed, if they have.
    fn recheck(&self, issuer: &str, result: &'static str, unverified_for: Option<Duration>);

    /// A back-channel logout came to `result`.
    fn logout(&self, result: &'static str);
}

/// Observes nothing: for tools and tests that keep no metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl Observer for NoObserver {
    fn lease_ended(&self, _reason: &'static str) {}
    fn set_active_leases(&self, _n: u64) {}
    fn recheck(&self, _issuer: &str, _result: &'static str, _unverified_for: Option<Duration>) {}
    fn logout(&self, _result: &'static str) {}
}
