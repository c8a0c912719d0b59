//! The audit trail: every event the domain writes under the `audit` tracing target, in
//! one place, so what an auditor can read is visible at a glance. Each event about a
//! lease names the lease, its job, tenant, module (`actor`) and user (`subject`); none
//! carries a token, a key or a free-text secret.

use std::time::Duration;

use crate::lease::{Lease, LeaseEnd};
use crate::ports::{LeaseFilter, LogoutClaims};

/// An audit event about `$lease`, with its identifying fields and then any others.
macro_rules! lease_event {
    ($level:ident, $event:expr, $lease:expr $(, $($field:tt)+)?) => {
        tracing::$level!(
            target: "audit",
            event = $event,
            lease_id = %$lease.id,
            job_id = %$lease.job_id,
            tenant = %$lease.tenant,
            actor = %$lease.actor,
            subject = %$lease.subject,
            $($($field)+)?
        )
    };
}

/// A lease was granted.
pub(crate) fn issued(lease: &Lease, issuer: &str, lifetime: Duration, clamped: bool) {
    lease_event!(
        info,
        "lease.issued",
        lease,
        issuer = %issuer,
        permissions = ?lease.permissions,
        lifetime_secs = lifetime.as_secs(),
        clamped,
    );
}

/// A lease that stays active moved on: `lease.refreshed`, `lease.refresh_retry`,
/// `lease.resumed`.
pub(crate) fn renewed(event: &'static str, lease: &Lease) {
    lease_event!(
        info,
        event,
        lease,
        generation = lease.generation,
        refresh_count = lease.refresh_count,
        resume_count = lease.resume_count,
    );
}

/// A lease ended (released, expired, idle, revoked, reuse, the user's standing).
pub(crate) fn ended(lease: &Lease, end: &LeaseEnd) {
    lease_event!(
        info,
        "lease.ended",
        lease,
        reason = end.reason.as_str(),
        by = %end.by,
        detail = %end.detail,
    );
}

/// An old refresh token came back: the lease was revoked (a warning: likely theft).
pub(crate) fn reuse_detected(lease: &Lease, presented: u64, current: u64) {
    lease_event!(
        warn,
        "lease.reuse_detected",
        lease,
        presented_generation = presented,
        current_generation = current,
    );
}

/// A re-check of the user's standing narrowed a lease's permissions.
pub(crate) fn narrowed(lease: &Lease, withdrawn: &[String]) {
    lease_event!(
        info,
        "lease.narrowed",
        lease,
        withdrawn = %withdrawn.join(","),
    );
}

/// An administrator revoked the leases matching `filter`.
pub(crate) fn revoked_matching(filter: &LeaseFilter, count: u32, reason: &str) {
    tracing::info!(
        target: "audit",
        event = "admin.revoke_matching",
        tenant = filter.tenant.as_deref(),
        subject = filter.subject.as_deref(),
        actor = filter.actor.as_deref(),
        job_id = filter.job_id.as_deref(),
        count,
        reason,
    );
}

/// An issuer logged a user out; `ended` leases ended with it.
pub(crate) fn logged_out(claims: &LogoutClaims, ended: usize) {
    tracing::info!(
        target: "audit",
        event = "subject.logged_out",
        issuer = %claims.issuer,
        by_session = claims.session_id.is_some(),
        leases_ended = ended,
    );
}

/// The signing key was rotated; the new one signs after `starts_in`.
pub(crate) fn keys_rotated(new_kid: &str, retired_kid: &str, starts_in: Duration) {
    tracing::info!(
        target: "audit",
        event = "keys.rotated",
        new_kid = %new_kid,
        retired_kid = %retired_kid,
        signing_starts_in_secs = starts_in.as_secs(),
    );
}
