//! A held lease: its current access token, its background renewal, and how it ended.

#[cfg(test)]
pub(crate) mod fake;
mod renew;
mod state;

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

pub(crate) use renew::Renewal;

use crate::api::Api;
use crate::end::{EndReason, Ending, LeaseEnd};
use crate::health::RevocationFeed;
use crate::proto;
use crate::watcher::LeaseWatch;
use state::{Shared, token_from};

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

/// What happens to a lease when the user's session is logged out (OpenID Connect
/// back-channel logout). Set with [`crate::LeaseRequest::on_logout`]; the module's
/// configured default applies when not set (`Survive` unless configured otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnLogout {
    /// The lease outlives the user's session: the job finishes what the user started.
    Survive,
    /// The lease ends, with [`EndReason::SubjectLoggedOut`], when the session it was
    /// granted from (or the user) is logged out.
    End,
}

impl OnLogout {
    pub(crate) fn to_proto(self) -> proto::OnLogout {
        match self {
            OnLogout::Survive => proto::OnLogout::Survive,
            OnLogout::End => proto::OnLogout::End,
        }
    }

    /// From a lease's `on_logout`; `None` if the service did not say.
    pub(crate) fn from_proto(on_logout: proto::OnLogout) -> Option<Self> {
        match on_logout {
            proto::OnLogout::Survive => Some(OnLogout::Survive),
            proto::OnLogout::End => Some(OnLogout::End),
            proto::OnLogout::Unspecified => None,
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
    /// The permissions granted when the lease was granted or resumed. A renewal may
    /// narrow them; [`Lease::permissions`] gives them as they stand now.
    pub permissions: Vec<String>,
    /// Hard expiry (the service's clock).
    pub expires_at: Option<SystemTime>,
    /// The lease ends if not renewed for this long.
    pub idle_timeout: Option<Duration>,
    /// Time left until the hard expiry when the lease was granted or resumed, computed
    /// from the service's own timestamps (so local clock skew does not matter).
    pub remaining: Option<Duration>,
    /// What the user's logout does to the lease; `None` if the service did not say.
    pub on_logout: Option<OnLogout>,
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

impl Lease {
    /// Starts holding a lease the service just granted (or resumed).
    pub(crate) fn start(info: LeaseInfo, pair: proto::TokenPair, renewal: Renewal) -> Lease {
        let (token, life) = token_from(&pair, 0);
        let shared = Arc::new(Shared::new(info, token));
        let (alive, alive_rx) = watch::channel(());
        if let Some(watcher) = &renewal.watcher {
            let ending: Weak<dyn Ending> = Arc::downgrade(&shared) as Weak<dyn Ending>;
            watcher.register(&shared.info.tenant, &shared.info.lease_id, ending);
        }
        let api = Arc::clone(&renewal.api);
        let watcher = renewal.watcher.clone();
        tokio::spawn(renew::run(
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
    /// [`RenewalConfig::stall_timeout`](crate::RenewalConfig::stall_timeout): without a call for that long, the lease is
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

    /// The lease's permissions as they stand now, in the service's order: those granted,
    /// then as each renewal (or resume) states them. The service re-checks the user's
    /// permissions at renewal; under the module's `narrow` policy a renewal may carry
    /// fewer than before, and the new access token carries only those. A job should stop
    /// (or checkpoint) the work that needs a permission no longer here rather than fail
    /// on it call by call. Cheap: one `Arc` clone.
    pub fn permissions(&self) -> Arc<[String]> {
        Arc::clone(&self.shared().permissions.borrow())
    }

    /// Every change of [`Lease::permissions`], as it arrives: the receiver is marked
    /// changed only when a renewal states a different set, and that set is visible
    /// before the token that carries it appears on [`Lease::changes`].
    ///
    /// ```no_run
    /// # async fn f(lease: token_sdk::Lease) {
    /// let mut permissions = lease.permission_changes();
    /// while permissions.changed().await.is_ok() {
    ///     let now = permissions.borrow_and_update().clone();
    ///     if !now.iter().any(|p| p == "inventory.write") {
    ///         // checkpoint: this job can no longer write records
    ///         break;
    ///     }
    /// }
    /// # }
    /// ```
    pub fn permission_changes(&self) -> watch::Receiver<Arc<[String]>> {
        self.shared().permissions.subscribe()
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::*;
    use crate::lease::fake::*;

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
    async fn a_renewal_with_fewer_permissions_narrows_the_lease_and_says_so() {
        let fake = Fake::new(Duration::from_secs(10));
        let granted = vec!["a.read".to_owned(), "a.write".to_owned()];
        *fake.granted.lock().unwrap() = Some(granted.clone());
        let info = LeaseInfo {
            permissions: granted.clone(),
            ..info()
        };
        let lease = hold_with(&fake, no_jitter(), info);
        // The grant's permissions are reported from the start.
        assert_eq!(*lease.permissions(), *granted);
        let mut permissions = lease.permission_changes();
        let mut changes = lease.changes();
        // A renewal that states the same permissions is no change.
        changes.changed().await.unwrap();
        assert!(!permissions.has_changed().unwrap());
        // The user lost `a.write`: the next renewal narrows the lease, and the narrowed
        // set is there by the time its token is.
        *fake.granted.lock().unwrap() = Some(vec!["a.read".to_owned()]);
        changes.changed().await.unwrap();
        assert!(permissions.has_changed().unwrap());
        assert_eq!(**permissions.borrow_and_update(), ["a.read".to_owned()]);
        assert_eq!(*lease.permissions(), ["a.read".to_owned()]);
        assert_eq!(
            lease.info().permissions,
            granted,
            "info keeps what was granted"
        );
        assert_eq!(lease.state(), LeaseState::Active);
        // An answer without the lease (an older service) leaves them as they are.
        *fake.granted.lock().unwrap() = None;
        changes.changed().await.unwrap();
        assert!(!permissions.has_changed().unwrap());
        assert_eq!(*lease.permissions(), ["a.read".to_owned()]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_permission_change_wakes_a_waiting_job() {
        let fake = Fake::new(Duration::from_secs(10));
        *fake.granted.lock().unwrap() = Some(Vec::new());
        let lease = hold(&fake, no_jitter());
        let start = crate::clock::now();
        let mut permissions = lease.permission_changes();
        permissions.changed().await.unwrap();
        // At the first renewal (70% of the 10 s token, plus the 5 ms answer).
        assert_eq!(crate::clock::now() - start, Duration::from_millis(7005));
        assert!(permissions.borrow_and_update().is_empty());
    }
}
