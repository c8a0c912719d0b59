//! The background renewal task of one lease.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tonic::Status;

use super::state::{Shared, token_from};
use crate::api::{Api, Renewed};
use crate::end::{EndReason, LeaseEnd};
use crate::error::{is_transient, retry_delay};
use crate::health::{Health, millis};
use crate::proto;
use crate::schedule::{RenewalConfig, backoff, phase, refresh_in};
use crate::watcher::LeaseWatch;

/// What the renewal task needs besides the shared state.
pub(crate) struct Renewal {
    pub(crate) api: Arc<dyn Api>,
    pub(crate) config: RenewalConfig,
    pub(crate) release_on_drop: bool,
    pub(crate) watcher: Option<Arc<LeaseWatch>>,
    /// The client's outage log and counters.
    pub(crate) health: Arc<Health>,
    /// Bumped when the service is seen back (the revocation stream reopened).
    pub(crate) reconnected: Option<watch::Receiver<u64>>,
}

/// Longest wait for one renewal RPC; a black-holed connection then counts as a transient
/// failure instead of stalling renewal.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest such wait, for tokens about to expire.
const MIN_RPC_TIMEOUT: Duration = Duration::from_secs(1);
/// The background renewal: sleep to the renewal point (or until asked), renew, publish;
/// retry transient failures on the schedule of [`backoff`], sooner when a caller asks or
/// the service is seen back, never sooner than a `RetryInfo` allows; stop on a terminal
/// answer, on release, when every handle is gone, or locally once the service's own
/// limits (hard expiry, idle timeout) have passed without a successful renewal.
pub(super) async fn run(
    shared: Arc<Shared>,
    renewal: Renewal,
    mut refresh_token: String,
    life: Duration,
    mut alive: watch::Receiver<()>,
) {
    let Renewal {
        api,
        config,
        release_on_drop,
        watcher: _,
        health,
        reconnected,
    } = renewal;
    // Without a revocation stream nothing signals the service's return; the schedule
    // alone paces retries.
    let (_no_signal, quiet) = watch::channel(0u64);
    let mut reconnected = reconnected.unwrap_or(quiet);
    let lease_id = shared.info.lease_id.clone();
    let mut end = shared.end.subscribe();
    let mut wanted = shared.wanted.subscribe();
    let started = crate::clock::now();
    let hard_deadline = shared.info.remaining.and_then(|r| started.checked_add(r));
    let mut last_success = started;
    let mut due = started + refresh_in(life, &config, fastrand::f64());
    // Consecutive transient failures; only the healthy phase of the schedule uses it.
    let mut attempt = 0u32;
    // The `wanted` value an immediate attempt last served: a standing request that
    // failed once waits for the schedule, so an abandoned caller cannot make it spin.
    let mut served = 0u64;
    // Not before this, whatever asks: the service's `RetryInfo`.
    let mut not_before = started;
    loop {
        let now = crate::clock::now();
        // A job that reported no progress for `stall_timeout` is presumed hung: release
        // (so its tokens stop working at once) rather than keep renewing for it.
        // `checked_add`: `Duration::MAX` ("never") must not overflow the clock.
        let stall_at = config.stall_timeout.and_then(|t| {
            let last =
                shared.origin + Duration::from_millis(shared.progress_ms.load(Ordering::Relaxed));
            last.checked_add(t)
        });
        if let Some(at) = stall_at
            && now >= at
        {
            let quiet = config.stall_timeout.unwrap_or_default();
            let detail = format!("no progress reported for {} s", quiet.as_secs_f64());
            // The job hears first; the release is bounded, as the service may be away.
            shared.finish(LeaseEnd {
                reason: EndReason::Stalled,
                detail: detail.clone(),
            });
            let released = tokio::time::timeout(
                RPC_TIMEOUT,
                api.release(&lease_id, proto::JobOutcome::Failed, &detail),
            )
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded("release timed out")));
            if let Err(status) = released {
                // The lease then idles out on the service; it is not renewed either way.
                tracing::warn!(lease_id = %lease_id, code = ?status.code(), "release of a stalled job failed");
            }
            return;
        }
        let limit = [
            hard_deadline.map(|d| (d, EndReason::Expired)),
            shared
                .info
                .idle_timeout
                .and_then(|idle| Some((last_success.checked_add(idle)?, EndReason::IdleTimeout))),
        ]
        .into_iter()
        .flatten()
        .find(|(at, _)| now >= *at);
        if let Some((_, reason)) = limit {
            health.add_expired(now.saturating_duration_since(shared.current.load().expires_at));
            shared.finish(LeaseEnd {
                reason,
                detail: "the lease ran out while the service could not be reached".into(),
            });
            return;
        }
        let generation = shared.current.load().generation;
        let wants = *wanted.borrow_and_update();
        let asked = wants > generation && wants > served;
        let wake_at = if asked { now } else { due }.max(not_before);
        // Wake for the stall check too; it is re-checked at the top of the loop.
        let stall_wake = stall_at.unwrap_or(wake_at).min(wake_at);
        tokio::select! {
            biased;
            _ = alive.changed() => {
                if release_on_drop && shared.end.borrow().is_none() {
                    let released = tokio::time::timeout(
                        RPC_TIMEOUT,
                        api.release(&lease_id, proto::JobOutcome::Cancelled, "every handle was dropped"),
                    )
                    .await
                    .unwrap_or_else(|_| Err(Status::deadline_exceeded("release timed out")));
                    if let Err(status) = released {
                        tracing::warn!(lease_id = %lease_id, code = ?status.code(), "release on drop failed");
                    }
                }
                shared.finish(LeaseEnd {
                    reason: EndReason::Released,
                    detail: "every handle was dropped".into(),
                });
                return;
            }
            _ = async { let _ = end.wait_for(Option::is_some).await; } => return,
            // A caller of `refresh_now`: re-check whether it still needs a renewal.
            _ = wanted.changed(), if !asked => continue,
            // The service is reachable again (the revocation stream reopened): retry now
            // rather than at the end of a wait sized for an outage.
            _ = reconnected.changed(), if attempt > 0 => {
                due = crate::clock::now();
                continue;
            }
            _ = tokio::time::sleep_until(stall_wake) => {
                if stall_wake < wake_at {
                    continue;
                }
            }
        }
        if asked {
            served = wants;
        }
        if attempt == 0 {
            // Only returns seen after this renewal starts failing count.
            reconnected.borrow_and_update();
        }
        // Never wait on one RPC past half the token's remaining life (but at least 1 s).
        let began = crate::clock::now();
        let old_expiry = shared.current.load().expires_at;
        let rpc_timeout =
            (old_expiry.saturating_duration_since(began) / 2).clamp(MIN_RPC_TIMEOUT, RPC_TIMEOUT);
        let answer = tokio::time::timeout(rpc_timeout, api.refresh(&lease_id, &refresh_token))
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded("renewal timed out")));
        let now = crate::clock::now();
        match answer {
            Ok(Renewed {
                tokens,
                permissions,
            }) => {
                let (token, life) = token_from(&tokens, generation + 1);
                refresh_token = tokens.refresh_token;
                // Permissions first: a job that sees a narrowed set before the narrowed
                // token only holds back early; the other order would try what the new
                // token no longer allows.
                if let Some(permissions) = permissions {
                    shared.set_permissions(permissions);
                }
                shared.publish(token);
                health.renewal_succeeded(now.saturating_duration_since(old_expiry));
                attempt = 0;
                last_success = now;
                let wait = refresh_in(life, &config, fastrand::f64());
                due = last_success + wait;
                tracing::debug!(
                    lease_id = %lease_id,
                    generation = generation + 1,
                    next_in_ms = millis(wait),
                    "lease renewed"
                );
            }
            Err(status) if is_transient(&status) => {
                health.renewal_failed(&lease_id, status.code(), true, began);
                let until_expiry = old_expiry.saturating_duration_since(now);
                let mut wait = backoff(attempt, until_expiry, &config, fastrand::f64());
                if let Some(delay) = retry_delay(&status) {
                    // Rate limited: never sooner than the service asked, even if asked.
                    not_before = now + delay;
                    wait = wait.max(delay);
                }
                due = now + wait;
                attempt = attempt.saturating_add(1);
                tracing::debug!(
                    lease_id = %lease_id,
                    code = ?status.code(),
                    attempt,
                    phase = ?phase(until_expiry, &config),
                    retry_in_ms = millis(wait),
                    "renewal failed; retrying with the same refresh token"
                );
            }
            Err(status) => {
                health.renewal_failed(&lease_id, status.code(), false, began);
                shared.finish(LeaseEnd::from_status(&status));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests;
