//! A held lease: its current access token, its background renewal, and how it ended.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::time::Instant;
#[cfg(test)]
use tonic::Request;
use tonic::Status;
#[cfg(test)]
use tonic::service::Interceptor;

use crate::api::Api;
use crate::error::{is_transient, retry_delay};
use crate::health::{Health, RevocationFeed, millis};
use crate::proto;
use crate::schedule::{RenewalConfig, backoff, phase, refresh_in};
use crate::watcher::LeaseWatch;

/// Why a lease ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EndReason {
    /// Released by its holder ([`Lease::release`], or every handle dropped).
    Released,
    /// Its hard expiry (maximum lifetime) passed.
    Expired,
    /// Nobody renewed it within the service's idle timeout.
    IdleTimeout,
    /// An administrator revoked it.
    Revoked,
    /// An old refresh token was presented again; the service revoked the lease.
    RefreshTokenReused,
    /// Another instance of this module resumed the job, so this one lost the lease.
    Superseded,
    /// The service refused a renewal for another reason (see the detail).
    Rejected,
    /// A re-check found the user no longer holds a permission the lease carried (module
    /// policy `end`, or policy `narrow` with nothing left).
    PermissionsWithdrawn,
    /// The identity platform says the user no longer exists or is disabled.
    SubjectDisabled,
    /// The user's session was logged out and the lease was granted with `on_logout = end`.
    SubjectLoggedOut,
    /// The user's permissions could not be confirmed for longer than the service allows.
    PermissionsUnverifiable,
    /// The job reported no progress within its stall timeout, so the SDK released the
    /// lease (outcome `failed`) instead of renewing it (see
    /// [`RenewalConfig::stall_timeout`]).
    Stalled,
}

impl EndReason {
    /// From the machine reason of a failed renewal.
    fn from_error_reason(reason: &str) -> Self {
        use jobtoken_proto::wire::reason as r;
        match reason {
            r::LEASE_RELEASED => EndReason::Released,
            r::LEASE_EXPIRED => EndReason::Expired,
            r::LEASE_IDLE_TIMEOUT => EndReason::IdleTimeout,
            r::LEASE_REVOKED => EndReason::Revoked,
            r::REFRESH_TOKEN_REUSED => EndReason::RefreshTokenReused,
            r::REFRESH_TOKEN_INVALID => EndReason::Superseded,
            r::PERMISSIONS_WITHDRAWN => EndReason::PermissionsWithdrawn,
            r::SUBJECT_DISABLED => EndReason::SubjectDisabled,
            r::SUBJECT_LOGGED_OUT => EndReason::SubjectLoggedOut,
            r::PERMISSIONS_UNVERIFIABLE => EndReason::PermissionsUnverifiable,
            _ => EndReason::Rejected,
        }
    }

    /// From the reason of a revocation event.
    pub(crate) fn from_proto(reason: proto::EndReason) -> Self {
        match reason {
            proto::EndReason::Released => EndReason::Released,
            proto::EndReason::Expired => EndReason::Expired,
            proto::EndReason::IdleTimeout => EndReason::IdleTimeout,
            proto::EndReason::Revoked => EndReason::Revoked,
            proto::EndReason::RefreshTokenReused => EndReason::RefreshTokenReused,
            proto::EndReason::PermissionsWithdrawn => EndReason::PermissionsWithdrawn,
            proto::EndReason::SubjectDisabled => EndReason::SubjectDisabled,
            proto::EndReason::SubjectLoggedOut => EndReason::SubjectLoggedOut,
            proto::EndReason::PermissionsUnverifiable => EndReason::PermissionsUnverifiable,
            proto::EndReason::Unspecified => EndReason::Rejected,
        }
    }
}

/// How a lease ended: the reason, and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseEnd {
    /// Why.
    pub reason: EndReason,
    /// Details (the service's message, or the operator's reason).
    pub detail: String,
}

/// Whether the lease still renews.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseState {
    /// Renewing in the background.
    Active,
    /// Ended; the job should checkpoint and stop.
    Ended(LeaseEnd),
}

/// How the job ended, told to the service on release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The job finished its work.
    Succeeded,
    /// The job failed.
    Failed,
    /// The job was cancelled.
    Cancelled,
}

impl Outcome {
    pub(crate) fn to_proto(self) -> proto::JobOutcome {
        match self {
            Outcome::Succeeded => proto::JobOutcome::Succeeded,
            Outcome::Failed => proto::JobOutcome::Failed,
            Outcome::Cancelled => proto::JobOutcome::Cancelled,
        }
    }
}

/// A job access token. `Debug` never shows the token itself.
#[derive(Clone)]
pub struct AccessToken {
    secret: Arc<str>,
    expires_at: Instant,
    generation: u64,
}

impl AccessToken {
    /// The token, for an `Authorization: Bearer` header. Secret: do not log it.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// When it expires, on this process's monotonic clock (measured from the lifetime
    /// the service returned, so wall-clock skew does not matter).
    pub fn expires_at(&self) -> Instant {
        self.expires_at
    }

    /// Time left until it expires (zero once expired).
    pub fn remaining(&self) -> Duration {
        self.expires_at
            .saturating_duration_since(crate::clock::now())
    }

    /// How many renewals came before this token (0 for the first).
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("secret", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .field("generation", &self.generation)
            .finish()
    }
}

/// What the service granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    /// Lease id.
    pub lease_id: String,
    /// Job id.
    pub job_id: String,
    /// Tenant.
    pub tenant: String,
    /// The user.
    pub subject: String,
    /// This module.
    pub actor: String,
    /// Granted permissions.
    pub permissions: Vec<String>,
    /// Hard expiry (the service's clock).
    pub expires_at: Option<SystemTime>,
    /// The lease ends if not renewed for this long.
    pub idle_timeout: Option<Duration>,
    /// Time left until the hard expiry when the lease was granted or resumed, computed
    /// from the service's own timestamps (so local clock skew does not matter).
    pub remaining: Option<Duration>,
}

/// State shared by the handles, the renewal task and the revocation watcher.
pub(crate) struct Shared {
    pub(crate) info: LeaseInfo,
    current: ArcSwap<AccessToken>,
    changes: watch::Sender<Arc<AccessToken>>,
    end: watch::Sender<Option<LeaseEnd>>,
    /// Highest generation some caller of `refresh_now` wants to see exceeded.
    wanted: watch::Sender<u64>,
    /// When the job last reported progress, in milliseconds after `origin`.
    progress_ms: AtomicU64,
    origin: Instant,
}

impl Shared {
    /// Ends the lease (first end wins).
    pub(crate) fn finish(&self, end: LeaseEnd) {
        self.end.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            tracing::info!(
                lease_id = %self.info.lease_id,
                job_id = %self.info.job_id,
                reason = ?end.reason,
                detail = %end.detail,
                "lease ended"
            );
            *current = Some(end);
            true
        });
    }

    fn publish(&self, token: AccessToken) {
        let token = Arc::new(token);
        self.current.store(Arc::clone(&token));
        self.changes.send_replace(token);
    }
}

/// Dropped with the last [`Lease`] handle, which tells the renewal task to stop (its
/// receiver of `_alive` sees the sender gone). Keeps the revocation watcher running.
struct Handle {
    shared: Arc<Shared>,
    _alive: watch::Sender<()>,
    watcher: Option<Arc<LeaseWatch>>,
}

/// A lease held by this module for one job. Cheap to clone: hand it to every worker of
/// the job. The lease renews itself in the background until it ends; when the last
/// handle is dropped, renewal stops and (by default) the lease is released.
#[derive(Clone)]
pub struct Lease {
    handle: Arc<Handle>,
    api: Arc<dyn Api>,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("info", &self.handle.shared.info)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

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

/// Longest token life believed; a larger answer is clamped (and cannot overflow
/// `Instant` arithmetic).
const MAX_LIFE: Duration = Duration::from_secs(24 * 3600);

/// The service's answer to a grant, resume or renewal.
pub(crate) fn token_from(pair: &proto::TokenPair, generation: u64) -> (AccessToken, Duration) {
    let life = pair
        .access_token_expires_in
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or_default()
        .min(MAX_LIFE);
    let token = AccessToken {
        secret: Arc::from(pair.access_token.as_str()),
        expires_at: crate::clock::now() + life,
        generation,
    };
    (token, life)
}

impl Lease {
    /// Starts holding a lease the service just granted (or resumed).
    pub(crate) fn start(info: LeaseInfo, pair: proto::TokenPair, renewal: Renewal) -> Lease {
        let (token, life) = token_from(&pair, 0);
        let token = Arc::new(token);
        let shared = Arc::new(Shared {
            info,
            current: ArcSwap::new(Arc::clone(&token)),
            changes: watch::channel(token).0,
            end: watch::channel(None).0,
            wanted: watch::channel(0).0,
            progress_ms: AtomicU64::new(0),
            origin: crate::clock::now(),
        });
        let (alive, alive_rx) = watch::channel(());
        if let Some(watcher) = &renewal.watcher {
            watcher.register(&shared);
        }
        let api = Arc::clone(&renewal.api);
        let watcher = renewal.watcher.clone();
        tokio::spawn(run(
            Arc::clone(&shared),
            renewal,
            pair.refresh_token,
            life,
            alive_rx,
        ));
        Lease {
            handle: Arc::new(Handle {
                shared,
                _alive: alive,
                watcher,
            }),
            api,
        }
    }

    fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    /// What the service granted.
    pub fn info(&self) -> &LeaseInfo {
        &self.shared().info
    }

    /// Tells the lease the job is making progress (a record imported, a page written).
    /// Cheap: a clock read and an atomic store. Only matters with a
    /// [`RenewalConfig::stall_timeout`]: without a call for that long, the lease is
    /// released instead of renewed.
    pub fn progress(&self) {
        let shared = self.shared();
        let ms = crate::clock::now()
            .saturating_duration_since(shared.origin)
            .as_millis();
        shared
            .progress_ms
            .fetch_max(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The current access token: a lock-free load and one `Arc` clone.
    pub fn access_token(&self) -> Arc<AccessToken> {
        self.shared().current.load_full()
    }

    /// Every new token, as it arrives.
    pub fn changes(&self) -> watch::Receiver<Arc<AccessToken>> {
        self.shared().changes.subscribe()
    }

    /// Active, or how it ended. Cheap.
    pub fn state(&self) -> LeaseState {
        match &*self.shared().end.borrow() {
            None => LeaseState::Active,
            Some(end) => LeaseState::Ended(end.clone()),
        }
    }

    /// Whether the service's revocation stream feeds this lease (so an administrator's
    /// revoke reaches [`Lease::ended`] within a second), or how long it has been blind.
    /// While blind the lease still renews; ends recorded meanwhile arrive on reconnect.
    pub fn revocation_feed(&self) -> RevocationFeed {
        self.handle
            .watcher
            .as_ref()
            .map_or(RevocationFeed::Off, |w| w.feed().get())
    }

    /// Resolves when the lease ends, with why: the job should checkpoint and stop.
    pub async fn ended(&self) -> LeaseEnd {
        let mut end = self.shared().end.subscribe();
        let ended = end.wait_for(Option::is_some).await;
        match ended {
            Ok(end) => end
                .clone()
                .unwrap_or_else(|| unreachable!("waited for Some")),
            // The sender lives in `Shared`, which this handle keeps alive.
            Err(_) => unreachable!("the lease's state outlives its handles"),
        }
    }

    /// Renews now (for a token found stale, say after a downstream UNAUTHENTICATED) and
    /// returns the new token. Concurrent callers share one renewal.
    pub async fn refresh_now(&self) -> Result<Arc<AccessToken>, LeaseEnd> {
        let current = self.access_token().generation;
        self.refresh_if_stale(current).await
    }

    /// Renews unless a token newer than `generation` already exists (someone else renewed
    /// since this caller read its token), and returns the newest token. A burst of
    /// callers that all found generation `g` stale shares one renewal.
    pub async fn refresh_if_stale(&self, generation: u64) -> Result<Arc<AccessToken>, LeaseEnd> {
        let mut changes = self.changes();
        let before = generation;
        self.shared()
            .wanted
            .send_modify(|w| *w = (*w).max(before + 1));
        let mut end = self.shared().end.subscribe();
        loop {
            if let Some(ended) = end.borrow_and_update().clone() {
                return Err(ended);
            }
            {
                let token = changes.borrow_and_update();
                if token.generation > before {
                    return Ok(Arc::clone(&token));
                }
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = end.changed() => {}
            }
        }
    }

    /// Releases the lease at the end of the job: every token of it stops being valid.
    /// Idempotent.
    pub async fn release(&self, outcome: Outcome) -> Result<(), crate::Error> {
        let shared = self.shared();
        if let LeaseState::Ended(_) = self.state() {
            return Ok(());
        }
        self.api
            .release(&shared.info.lease_id, outcome.to_proto(), "")
            .await
            .map_err(crate::Error::Rejected)?;
        shared.finish(LeaseEnd {
            reason: EndReason::Released,
            detail: format!("released by this module ({outcome:?})"),
        });
        Ok(())
    }
}

fn end_from(status: &Status) -> LeaseEnd {
    let reason = crate::error_reason(status).unwrap_or_default();
    // Who ended it and why (an administrator's reason, say), when the service says.
    let said = <Status as tonic_types::StatusExt>::get_error_details(status)
        .error_info()
        .and_then(|info| info.metadata.get("end_detail").cloned())
        .filter(|d| !d.is_empty());
    let detail = match said {
        Some(said) => format!("{reason}: {}; {said}", status.message()),
        None => format!("{reason}: {}", status.message()),
    };
    LeaseEnd {
        reason: EndReason::from_error_reason(&reason),
        detail,
    }
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
async fn run(
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
            Ok(pair) => {
                let (token, life) = token_from(&pair, generation + 1);
                refresh_token = pair.refresh_token;
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
                shared.finish(end_from(&status));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::error::MAX_RETRY_DELAY;

    /// A scripted service: answers renewals from a script, then with fresh tokens of
    /// `life`; records every call.
    struct Fake {
        life: Duration,
        script: Mutex<VecDeque<Result<(), Status>>>,
        /// Answers that never come (a black-holed connection), before the script.
        hangs: AtomicUsize,
        presented: Mutex<Vec<(Instant, String)>>,
        releases: AtomicUsize,
        issued: AtomicUsize,
        /// An outage: every renewal before this instant fails with UNAVAILABLE.
        down_until: Mutex<Option<Instant>>,
        /// Releases never answer.
        release_hangs: std::sync::atomic::AtomicBool,
    }

    impl Fake {
        fn new(life: Duration) -> Arc<Fake> {
            Arc::new(Fake {
                life,
                script: Mutex::new(VecDeque::new()),
                hangs: AtomicUsize::new(0),
                presented: Mutex::new(Vec::new()),
                releases: AtomicUsize::new(0),
                issued: AtomicUsize::new(0),
                down_until: Mutex::new(None),
                release_hangs: std::sync::atomic::AtomicBool::new(false),
            })
        }

        fn then(&self, answer: Result<(), Status>) {
            self.script.lock().unwrap().push_back(answer);
        }

        fn pair(&self) -> proto::TokenPair {
            let n = self.issued.fetch_add(1, Ordering::SeqCst);
            proto::TokenPair {
                access_token: format!("access-{n}"),
                access_token_expires_in: prost_types::Duration::try_from(self.life).ok(),
                // Deliberately absurd: the SDK must schedule from the duration only.
                access_token_expires_at: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: 0,
                }),
                refresh_token: format!("rt-{n}"),
                token_type: "Bearer".into(),
            }
        }

        fn calls(&self) -> Vec<(Instant, String)> {
            self.presented.lock().unwrap().clone()
        }
    }

    #[async_trait]
    impl Api for Fake {
        async fn refresh(&self, _: &str, refresh_token: &str) -> Result<proto::TokenPair, Status> {
            self.presented
                .lock()
                .unwrap()
                .push((crate::clock::now(), refresh_token.to_owned()));
            if self
                .hangs
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                std::future::pending::<()>().await;
            }
            // A round trip takes a moment, so racing callers overlap.
            tokio::time::sleep(Duration::from_millis(5)).await;
            let down = *self.down_until.lock().unwrap();
            if down.is_some_and(|until| crate::clock::now() < until) {
                return Err(Status::unavailable("connection refused"));
            }
            let next = self.script.lock().unwrap().pop_front();
            match next {
                Some(Err(status)) => Err(status),
                _ => Ok(self.pair()),
            }
        }

        async fn release(&self, _: &str, _: proto::JobOutcome, _: &str) -> Result<(), Status> {
            self.releases.fetch_add(1, Ordering::SeqCst);
            if self.release_hangs.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            Ok(())
        }
    }

    fn info() -> LeaseInfo {
        info_with(None, None)
    }

    fn info_with(remaining: Option<Duration>, idle_timeout: Option<Duration>) -> LeaseInfo {
        LeaseInfo {
            lease_id: "lease-1".into(),
            job_id: "job-1".into(),
            tenant: "acme".into(),
            subject: "alice".into(),
            actor: "importer".into(),
            permissions: vec!["a.read".into()],
            expires_at: None,
            idle_timeout,
            remaining,
        }
    }

    fn no_jitter() -> RenewalConfig {
        RenewalConfig {
            jitter: 0.0,
            ..RenewalConfig::default()
        }
    }

    fn hold(fake: &Arc<Fake>, config: RenewalConfig) -> Lease {
        hold_with(fake, config, info())
    }

    fn hold_with(fake: &Arc<Fake>, config: RenewalConfig, info: LeaseInfo) -> Lease {
        hold_signalled(fake, config, info, None, Arc::new(Health::new()))
    }

    fn hold_signalled(
        fake: &Arc<Fake>,
        config: RenewalConfig,
        info: LeaseInfo,
        reconnected: Option<watch::Receiver<u64>>,
        health: Arc<Health>,
    ) -> Lease {
        let first = fake.pair();
        Lease::start(
            info,
            first,
            Renewal {
                api: Arc::clone(fake) as Arc<dyn Api>,
                config,
                release_on_drop: true,
                watcher: None,
                health,
                reconnected,
            },
        )
    }

    /// Waits for the next token and returns when it arrived.
    async fn next_token(changes: &mut watch::Receiver<Arc<AccessToken>>) -> Instant {
        changes.changed().await.unwrap();
        crate::clock::now()
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_that_reports_progress_keeps_its_lease_and_a_stalled_one_is_released() {
        let fake = Fake::new(Duration::from_secs(4));
        let config = RenewalConfig {
            stall_timeout: Some(Duration::from_secs(10)),
            ..no_jitter()
        };
        let lease = hold(&fake, config);
        let start = crate::clock::now();
        // Progress every 2 s for a minute: renewals go on, the lease stays.
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            lease.progress();
        }
        assert_eq!(lease.state(), LeaseState::Active);
        let renewals = fake.calls().len();
        assert!(
            renewals >= 15,
            "{renewals} renewals in a minute of 4 s tokens"
        );
        // Then the job hangs: within the stall timeout (plus nothing) the lease ends.
        let hung = crate::clock::now();
        let end = lease.ended().await;
        let took = crate::clock::now() - hung;
        assert_eq!(end.reason, EndReason::Stalled);
        assert!(end.detail.contains("no progress"), "{}", end.detail);
        assert!(took <= Duration::from_secs(10), "{took:?}");
        assert!(took >= Duration::from_secs(8), "{took:?}");
        // It was released (tokens die at the service), and renewing stopped.
        assert_eq!(fake.releases.load(Ordering::SeqCst), 1);
        let calls = fake.calls().len();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(fake.calls().len(), calls);
        assert!(crate::clock::now() - start > Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_job_hears_at_once_even_when_the_service_is_away_and_max_means_never() {
        let fake = Fake::new(Duration::from_secs(4));
        let config = RenewalConfig {
            stall_timeout: Some(Duration::from_secs(5)),
            ..no_jitter()
        };
        let lease = hold(&fake, config);
        // Every call from now on hangs (a black-holed connection), the release too.
        fake.hangs.store(usize::MAX, Ordering::SeqCst);
        fake.release_hangs.store(true, Ordering::SeqCst);
        let end = tokio::time::timeout(Duration::from_secs(30), lease.ended())
            .await
            .expect("ended() resolves although the release never answers");
        assert_eq!(end.reason, EndReason::Stalled);

        let fake = Fake::new(Duration::from_secs(4));
        let never = RenewalConfig {
            stall_timeout: Some(Duration::MAX),
            ..no_jitter()
        };
        let lease = hold(&fake, never);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(lease.state(), LeaseState::Active);
        assert!(fake.calls().len() >= 10);
    }

    #[tokio::test(start_paused = true)]
    async fn an_administrators_reason_reaches_the_job_once() {
        use tonic_types::{ErrorDetails, StatusExt};
        let fake = Fake::new(Duration::from_secs(4));
        let metadata = std::collections::HashMap::from([(
            "end_detail".to_owned(),
            "stolen laptop".to_owned(),
        )]);
        fake.then(Err(Status::with_error_details(
            tonic::Code::FailedPrecondition,
            "the lease has ended: revoked by an administrator",
            ErrorDetails::with_error_info("LEASE_REVOKED", "jobtoken.v1", metadata),
        )));
        let lease = hold(&fake, no_jitter());
        let end = lease.ended().await;
        assert_eq!(end.reason, EndReason::Revoked);
        assert!(end.detail.contains("stolen laptop"), "{}", end.detail);
        assert_eq!(end.detail.matches("revoked").count(), 1, "{}", end.detail);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_stall_timeout_progress_does_not_matter() {
        let fake = Fake::new(Duration::from_secs(4));
        let lease = hold(&fake, no_jitter());
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(lease.state(), LeaseState::Active);
        assert_eq!(fake.releases.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_long_outage_a_fresh_token_comes_within_the_retry_interval() {
        // 2 s tokens, the service gone for 30 s from just before the first renewal.
        let fake = Fake::new(Duration::from_secs(2));
        let start = crate::clock::now();
        let back = start + Duration::from_secs(31);
        *fake.down_until.lock().unwrap() = Some(back);
        let health = Arc::new(Health::new());
        let lease = hold_signalled(&fake, no_jitter(), info(), None, Arc::clone(&health));
        let mut changes = lease.changes();
        let got = next_token(&mut changes).await;
        // No signal here: the schedule alone. The old one waited 5-10 s at this point.
        let late = got - back;
        assert!(late <= Duration::from_millis(1505), "{late:?}");
        let calls = fake.calls();
        let after_expiry: Vec<Duration> = calls
            .windows(2)
            .filter(|w| w[0].0 >= start + Duration::from_secs(2))
            .map(|w| w[1].0 - w[0].0)
            .collect();
        assert!(
            after_expiry
                .iter()
                .all(|g| *g >= Duration::from_millis(500) && *g <= Duration::from_millis(1510)),
            "{after_expiry:?}"
        );
        // The outage and the time with an expired token are on record.
        let stats = health.stats();
        assert_eq!(stats.outages, 1);
        assert_eq!(stats.failures[0].0, tonic::Code::Unavailable);
        assert_eq!(stats.failures[0].1, calls.len() as u64 - 1);
        let expired = stats.expired_token_time;
        assert!(expired >= Duration::from_secs(29) && expired <= Duration::from_secs(31));
    }

    #[tokio::test(start_paused = true)]
    async fn the_service_seen_back_cuts_the_wait_short() {
        let fake = Fake::new(Duration::from_secs(2));
        let start = crate::clock::now();
        let back = start + Duration::from_secs(10);
        *fake.down_until.lock().unwrap() = Some(back);
        let (signal, reconnected) = watch::channel(0u64);
        // A slow schedule, to tell them apart: once the 2 s token has expired, retries come
        // 30-90 s apart (the jitter is random), so none can land near the return at 10 s
        // and answer before the signal does.
        let config = RenewalConfig {
            retry_interval: Duration::from_secs(60),
            ..no_jitter()
        };
        let lease = hold_signalled(
            &fake,
            config,
            info(),
            Some(reconnected),
            Arc::new(Health::new()),
        );
        let mut changes = lease.changes();
        // A return signalled before the renewal starts failing is old news.
        signal.send_replace(1);
        tokio::time::sleep_until(back + Duration::from_millis(20)).await;
        let before = fake.calls().len();
        signal.send_replace(2);
        let got = next_token(&mut changes).await;
        assert!(got - back < Duration::from_millis(40), "{:?}", got - back);
        assert_eq!(fake.calls().len(), before + 1, "one attempt on the signal");
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_asking_cuts_a_healthy_backoff_short_once() {
        // 300 s tokens: the renewal at 210 s fails for a minute, so backoff is long.
        let fake = Fake::new(Duration::from_secs(300));
        let start = crate::clock::now();
        *fake.down_until.lock().unwrap() = Some(start + Duration::from_secs(270));
        let lease = hold(&fake, no_jitter());
        tokio::time::sleep_until(start + Duration::from_secs(250)).await;
        let failed = fake.calls().len();
        assert!(failed >= 6, "{failed}");
        let asked = tokio::spawn({
            let lease = lease.clone();
            async move { lease.refresh_now().await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        let calls = fake.calls();
        assert_eq!(calls.len(), failed + 1, "asking renews at once");
        assert!(calls.last().unwrap().0 - start < Duration::from_millis(250_002));
        // The ask failed; the same standing request does not retry at once again.
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(fake.calls().len(), failed + 1);
        // ...and many more callers share it.
        for _ in 0..50 {
            let lease = lease.clone();
            tokio::spawn(async move { lease.refresh_now().await });
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(fake.calls().len(), failed + 1);
        let token = asked.await.unwrap().unwrap();
        assert_eq!(token.generation(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limited_renewals_wait_as_long_as_the_service_asks() {
        let fake = Fake::new(Duration::from_secs(10));
        let limited = <Status as tonic_types::StatusExt>::with_error_details(
            tonic::Code::ResourceExhausted,
            "slow down",
            tonic_types::ErrorDetails::with_retry_info(Some(Duration::from_secs(3))),
        );
        fake.then(Err(limited));
        // Absurd delays are clamped rather than obeyed.
        let absurd = <Status as tonic_types::StatusExt>::with_error_details(
            tonic::Code::ResourceExhausted,
            "slow down",
            tonic_types::ErrorDetails::with_retry_info(Some(Duration::from_secs(1 << 40))),
        );
        assert_eq!(retry_delay(&absurd), Some(MAX_RETRY_DELAY));
        let lease = hold(&fake, no_jitter());
        let mut changes = lease.changes();
        tokio::time::sleep(Duration::from_millis(7100)).await;
        // Asking does not get round the delay either.
        let asked = tokio::spawn({
            let lease = lease.clone();
            async move { lease.refresh_now().await }
        });
        next_token(&mut changes).await;
        let calls = fake.calls();
        assert_eq!(calls.len(), 2);
        let gap = calls[1].0 - calls[0].0;
        assert!(gap >= Duration::from_secs(3), "{gap:?}");
        assert!(gap < Duration::from_millis(3100), "{gap:?}");
        asked.await.unwrap().unwrap();
    }

    fn unavailable() -> Status {
        Status::unavailable("connection reset")
    }

    fn terminal(reason: &str) -> Status {
        <Status as tonic_types::StatusExt>::with_error_details(
            tonic::Code::FailedPrecondition,
            "the lease has ended",
            tonic_types::ErrorDetails::with_error_info(
                reason,
                "jobtoken.v1",
                std::collections::HashMap::new(),
            ),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn renews_at_seventy_percent_from_durations_chaining_refresh_tokens() {
        let fake = Fake::new(Duration::from_secs(100));
        let start = crate::clock::now();
        let lease = hold(&fake, no_jitter());
        let mut changes = lease.changes();
        for n in 1..=5u64 {
            changes.changed().await.unwrap();
            assert_eq!(lease.access_token().generation(), n);
            assert_eq!(lease.access_token().secret(), format!("access-{n}"));
        }
        let calls = fake.calls();
        for (i, (at, presented)) in calls.iter().enumerate() {
            // Each renewal presents the refresh token of the previous answer...
            assert_eq!(presented, &format!("rt-{i}"));
            // ...70 s after that answer arrived (answers take 5 ms).
            let expected = start + Duration::from_millis(70_000 * (i as u64 + 1) + 5 * i as u64);
            assert_eq!(*at, expected, "renewal {i}");
        }
        assert_eq!(lease.state(), LeaseState::Active);
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_retry_the_same_token_with_backoff_inside_the_token_life() {
        let fake = Fake::new(Duration::from_secs(10));
        for _ in 0..4 {
            fake.then(Err(unavailable()));
        }
        let lease = hold(&fake, no_jitter());
        let mut changes = lease.changes();
        changes.changed().await.unwrap();
        let calls = fake.calls();
        assert_eq!(calls.len(), 5);
        assert!(
            calls.iter().all(|(_, t)| t == "rt-0"),
            "retries reuse the token: {calls:?}"
        );
        // The first retry 7 s in; all retries before the 10 s token expires.
        let first = calls[0].0;
        let last = calls[4].0;
        assert!(last - first < Duration::from_secs(3), "{:?}", last - first);
        let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1].0 - w[0].0).collect();
        assert!(
            gaps.iter().all(|g| *g >= crate::schedule::FLOOR),
            "{gaps:?}"
        );
        assert_eq!(lease.state(), LeaseState::Active);
        assert_eq!(lease.access_token().generation(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn terminal_failures_end_the_lease_with_the_reason() {
        for (reason, expected) in [
            ("LEASE_REVOKED", EndReason::Revoked),
            ("LEASE_EXPIRED", EndReason::Expired),
            ("LEASE_IDLE_TIMEOUT", EndReason::IdleTimeout),
            ("REFRESH_TOKEN_REUSED", EndReason::RefreshTokenReused),
            ("REFRESH_TOKEN_INVALID", EndReason::Superseded),
            ("PERMISSIONS_WITHDRAWN", EndReason::PermissionsWithdrawn),
            ("SUBJECT_DISABLED", EndReason::SubjectDisabled),
            ("SUBJECT_LOGGED_OUT", EndReason::SubjectLoggedOut),
            (
                "PERMISSIONS_UNVERIFIABLE",
                EndReason::PermissionsUnverifiable,
            ),
            ("SOMETHING_NEW", EndReason::Rejected),
        ] {
            let fake = Fake::new(Duration::from_secs(10));
            fake.then(Err(terminal(reason)));
            let lease = hold(&fake, no_jitter());
            let end = lease.ended().await;
            assert_eq!(end.reason, expected, "{reason}");
            assert!(end.detail.contains(reason));
            assert!(matches!(lease.state(), LeaseState::Ended(_)));
            // No renewal after a terminal answer.
            tokio::time::sleep(Duration::from_secs(60)).await;
            assert_eq!(fake.calls().len(), 1, "{reason}");
            // The interceptor refuses locally once the lease has ended.
            let err = lease.interceptor().call(Request::new(())).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn on_demand_refresh_is_single_flight() {
        let fake = Fake::new(Duration::from_secs(300));
        let start = crate::clock::now();
        let lease = hold(&fake, no_jitter());
        let callers: Vec<_> = (0..200)
            .map(|_| {
                let lease = lease.clone();
                tokio::spawn(async move { lease.refresh_now().await })
            })
            .collect();
        for caller in callers {
            let token = caller.await.unwrap().unwrap();
            assert_eq!(token.generation(), 1);
        }
        assert_eq!(fake.calls().len(), 1, "200 callers, one renewal");
        // At once, not at the scheduled renewal 210 s later.
        assert!(fake.calls()[0].0 - start < Duration::from_millis(10));
        // Later callers get a renewal of their own.
        assert_eq!(lease.refresh_now().await.unwrap().generation(), 2);
        assert_eq!(fake.calls().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn on_demand_refresh_respects_backoff_during_an_outage() {
        let fake = Fake::new(Duration::from_secs(300));
        for _ in 0..5 {
            fake.then(Err(unavailable()));
        }
        let lease = hold(&fake, no_jitter());
        let token = lease.refresh_now().await.unwrap();
        assert_eq!(token.generation(), 1);
        let calls = fake.calls();
        assert_eq!(calls.len(), 6, "five failures, then success: no spinning");
        let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1].0 - w[0].0).collect();
        assert!(
            gaps.windows(2).all(|g| g[0] <= g[1]),
            "backoff grows: {gaps:?}"
        );
        assert!(gaps[0] >= Duration::from_millis(100), "{gaps:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_refresh_request_does_not_spin() {
        let fake = Fake::new(Duration::from_secs(300));
        for _ in 0..1000 {
            fake.then(Err(unavailable()));
        }
        let lease = hold(&fake, no_jitter());
        let asked = tokio::spawn({
            let lease = lease.clone();
            async move { lease.refresh_now().await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        asked.abort();
        tokio::time::sleep(Duration::from_secs(60)).await;
        let calls = fake.calls().len();
        assert!((5..=20).contains(&calls), "{calls} calls in 60 s of outage");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_renewal_times_out_and_is_retried() {
        let fake = Fake::new(Duration::from_secs(60));
        fake.hangs.store(1, Ordering::SeqCst);
        let lease = hold(&fake, no_jitter());
        let mut changes = lease.changes();
        changes.changed().await.unwrap();
        let calls = fake.calls();
        assert_eq!(calls.len(), 2);
        let gap = calls[1].0 - calls[0].0;
        // The timeout (half the 18 s of token life left at the 70% point), then the first
        // backoff (100-200 ms with jitter).
        let timeout = Duration::from_secs(9);
        assert!(gap >= timeout + Duration::from_millis(100), "{gap:?}");
        assert!(gap <= timeout + Duration::from_millis(200), "{gap:?}");
        assert_eq!(calls[1].1, "rt-0", "the retry reuses the refresh token");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_service_ends_the_lease_locally_at_its_limits() {
        // Hard expiry 30 s away, the service unreachable for good.
        let fake = Fake::new(Duration::from_secs(10));
        for _ in 0..10_000 {
            fake.then(Err(unavailable()));
        }
        let start = crate::clock::now();
        let lease = hold_with(
            &fake,
            no_jitter(),
            info_with(Some(Duration::from_secs(30)), None),
        );
        let end = lease.ended().await;
        assert_eq!(end.reason, EndReason::Expired);
        let took = crate::clock::now() - start;
        assert!(
            took >= Duration::from_secs(30) && took < Duration::from_secs(41),
            "{took:?}"
        );
        // Idle timeout: no successful renewal for 20 s.
        let fake = Fake::new(Duration::from_secs(10));
        for _ in 0..10_000 {
            fake.then(Err(unavailable()));
        }
        let lease = hold_with(
            &fake,
            no_jitter(),
            info_with(None, Some(Duration::from_secs(20))),
        );
        assert_eq!(lease.ended().await.reason, EndReason::IdleTimeout);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_last_handle_releases_and_stops() {
        let fake = Fake::new(Duration::from_secs(10));
        let lease = hold(&fake, no_jitter());
        let worker = lease.clone();
        drop(lease);
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert_eq!(
            fake.releases.load(Ordering::SeqCst),
            0,
            "a worker still holds it"
        );
        assert_eq!(fake.calls().len(), 1, "and it kept renewing");
        drop(worker);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(fake.releases.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            fake.calls().len(),
            1,
            "no renewal after the last handle went"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn release_ends_the_lease_and_debug_hides_tokens() {
        let fake = Fake::new(Duration::from_secs(10));
        let lease = hold(&fake, no_jitter());
        let printed = format!("{lease:?} {:?}", lease.access_token());
        assert!(!printed.contains("access-0"), "{printed}");
        lease.release(Outcome::Succeeded).await.unwrap();
        assert_eq!(lease.ended().await.reason, EndReason::Released);
        lease.release(Outcome::Succeeded).await.unwrap(); // idempotent
        assert_eq!(fake.releases.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(fake.calls().is_empty(), "no renewal after release");
    }

    #[tokio::test(start_paused = true)]
    async fn with_retry_renews_once_after_an_unauthenticated_answer() {
        let fake = Fake::new(Duration::from_secs(300));
        let lease = hold(&fake, no_jitter());
        let seen = Mutex::new(Vec::new());
        // The callee refuses the first token (expired in flight), accepts the renewed one.
        let answer = lease
            .with_retry(|| {
                let token = lease.access_token();
                seen.lock().unwrap().push(token.generation());
                async move {
                    if token.generation() == 0 {
                        Err(Status::unauthenticated("token expired"))
                    } else {
                        Ok(token.generation())
                    }
                }
            })
            .await;
        assert_eq!(answer.unwrap(), 1);
        assert_eq!(*seen.lock().unwrap(), vec![0, 1]);
        // A second refusal is returned, not retried again.
        let calls = AtomicUsize::new(0);
        let err = lease
            .with_retry(|| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), _>(Status::unauthenticated("no")) }
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // Other errors are not retried.
        let calls = AtomicUsize::new(0);
        let _ = lease
            .with_retry(|| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), _>(Status::not_found("x")) }
            })
            .await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[cfg(feature = "reqwest")]
    #[tokio::test(start_paused = true)]
    async fn reqwest_requests_carry_the_current_token() {
        let fake = Fake::new(Duration::from_secs(10));
        let lease = hold(&fake, no_jitter());
        let request = lease
            .authorize(reqwest::Client::new().get("http://127.0.0.1:9/records"))
            .build()
            .unwrap();
        let value = request.headers().get("authorization").unwrap();
        assert_eq!(value, "Bearer access-0");
        assert!(value.is_sensitive());
    }

    #[tokio::test(start_paused = true)]
    async fn the_interceptor_sends_the_current_token() {
        let fake = Fake::new(Duration::from_secs(10));
        let lease = hold(&fake, no_jitter());
        let mut interceptor = lease.interceptor();
        let request = interceptor.call(Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer access-0"
        );
        lease.refresh_now().await.unwrap();
        let mut custom =
            crate::BearerInterceptor::with_header(lease.clone(), "X-Okapi-Token").unwrap();
        assert!(crate::BearerInterceptor::with_header(lease.clone(), "bad header").is_err());
        let request = custom.call(Request::new(())).unwrap();
        assert_eq!(request.metadata().get("x-okapi-token").unwrap(), "access-1");
        assert_eq!(lease.authorization_header(), "Bearer access-1");
    }
}
