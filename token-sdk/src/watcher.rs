//! Following the service's revocation stream: ends that the service records (an
//! administrator's revoke, say) reach leases and verifiers within a second, not at the
//! next renewal.
//!
//! The stream runs on a connection of its own (see [`crate::Client`]), reconnects on
//! its own fast schedule ([`reconnect_in`]) from its cursor, so nothing ended while it was
//! down is missed, and reports whether it is live ([`RevocationFeed`]). Its reopening is
//! the client's signal that the service is back. If the follower dies (a panic), it is
//! restarted from the same cursor; it never goes blind silently.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch;

use crate::health::{Feed, RevocationFeed, millis};
use crate::lease::{EndReason, LeaseEnd, Shared, retry_delay};
use crate::schedule::{RenewalConfig, reconnect_in};
use crate::{JobTokenClient, proto};

/// The service sends a heartbeat every 30 s; a stream silent for longer than this is
/// presumed dead (a half-open connection) and reopened from its cursor. The stream's
/// connection also sends HTTP/2 pings, which notice a dead peer much sooner.
const SILENCE: Duration = Duration::from_secs(75);

/// Shortest wait for the stream to open.
const MIN_OPEN_TIMEOUT: Duration = Duration::from_secs(1);

/// Receives the lease ends of a revocation stream. Only the fields every event carries
/// for verification are read: tenant, lease id, reason, `tokens_valid_until`, cursor.
pub(crate) trait EndSink: Send + Sync + 'static {
    /// One lease ended.
    fn on_end(&self, event: &proto::WatchRevocationsResponse);
}

/// A running revocation stream. Dropping it stops the stream.
pub(crate) struct Subscription {
    _stop: watch::Sender<()>,
    feed: Arc<Feed>,
}

/// Where a (re)started follower resumes.
type Cursor = Arc<Mutex<Option<u64>>>;

impl Subscription {
    /// Follows the revocation stream into `sink` until dropped, reporting its state in
    /// `feed`. With `replay_live`, starts with every end whose tokens may still be valid;
    /// otherwise from now.
    pub(crate) fn start(
        client: JobTokenClient,
        sink: Arc<dyn EndSink>,
        replay_live: bool,
        config: RenewalConfig,
        feed: Arc<Feed>,
    ) -> Subscription {
        let (stop, mut stopped) = watch::channel(());
        feed.connecting();
        let follower = Follower {
            client,
            sink,
            replay_live,
            config,
            feed: Arc::clone(&feed),
            cursor: Cursor::default(),
        };
        tokio::spawn(async move {
            let mut restarts = 0u32;
            loop {
                let task = tokio::spawn(follower.clone().follow());
                let abort = task.abort_handle();
                tokio::select! {
                    // The owner dropped the subscription.
                    _ = stopped.changed() => {
                        abort.abort();
                        return;
                    }
                    joined = task => match joined {
                        Err(e) if e.is_panic() => {
                            follower.feed.blind();
                            tracing::error!(
                                restarts,
                                "the revocation stream follower panicked; restarting it from its cursor"
                            );
                        }
                        _ => return,
                    },
                }
                let wait = reconnect_in(restarts, &follower.config, fastrand::f64());
                restarts = restarts.saturating_add(1);
                tokio::select! {
                    _ = stopped.changed() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        });
        Subscription { _stop: stop, feed }
    }

    /// Waits (at most `limit`) until the stream is open and caught up (its first
    /// heartbeat follows the backlog), so every end it replays has been seen.
    pub(crate) async fn wait_ready(&self, limit: Duration) {
        let mut state = self.feed.state.subscribe();
        let _ = tokio::time::timeout(limit, async {
            let _ = state.wait_for(|s| *s == RevocationFeed::Live).await;
        })
        .await;
    }
}

#[derive(Clone)]
struct Follower {
    client: JobTokenClient,
    sink: Arc<dyn EndSink>,
    replay_live: bool,
    config: RenewalConfig,
    feed: Arc<Feed>,
    cursor: Cursor,
}

impl Follower {
    fn cursor(&self) -> Option<u64> {
        *self.cursor.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn follow(self) {
        let open_timeout = (self.config.retry_interval * 2).max(MIN_OPEN_TIMEOUT);
        let mut attempt = 0u32;
        loop {
            let request = proto::WatchRevocationsRequest {
                after_cursor: self.cursor(),
                replay_live: self.replay_live,
                ..Default::default()
            };
            let opened =
                tokio::time::timeout(open_timeout, self.client.clone().watch_revocations(request))
                    .await;
            let mut at_least = Duration::ZERO;
            let failure = match opened {
                Ok(Ok(response)) => {
                    let mut events = response.into_inner();
                    loop {
                        match tokio::time::timeout(SILENCE, events.message()).await {
                            Ok(Ok(Some(event))) => {
                                attempt = 0;
                                if event.heartbeat {
                                    self.feed.live();
                                } else {
                                    self.sink.on_end(&event);
                                }
                                // After the sink: an end is never skipped by a restart.
                                *self.cursor.lock().unwrap_or_else(|e| e.into_inner()) =
                                    Some(event.cursor);
                            }
                            Ok(Ok(None)) => break "closed by the service".to_owned(),
                            Ok(Err(status)) => break format!("{:?}", status.code()),
                            Err(_) => break "silent too long".to_owned(),
                        }
                    }
                }
                Ok(Err(status)) => {
                    // A cursor beyond the service's newest event: its store was replaced
                    // (restored or recreated). Waiting for that cursor would be blind
                    // forever; start over from what the service has.
                    if status.code() == tonic::Code::InvalidArgument
                        && crate::error_field(&status).as_deref() == Some("after_cursor")
                    {
                        tracing::warn!(
                            "the revocation stream's cursor is ahead of the service; starting over"
                        );
                        *self.cursor.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    }
                    // A stream cap or rate limit: never sooner than the service asked.
                    at_least = retry_delay(&status).unwrap_or_default();
                    format!("{:?}", status.code())
                }
                Err(_) => "open timed out".to_owned(),
            };
            self.feed.blind();
            let wait = reconnect_in(attempt, &self.config, fastrand::f64()).max(at_least);
            attempt = attempt.saturating_add(1);
            tracing::debug!(
                attempt,
                failure,
                retry_in_ms = millis(wait),
                "revocation stream reconnecting"
            );
            tokio::time::sleep(wait).await;
        }
    }
}

/// Lease ends are routed by tenant, then lease id.
type LeaseKey = (String, String);

/// Routes revocation events to the leases of this process.
pub(crate) struct Watcher {
    leases: Mutex<HashMap<LeaseKey, Weak<Shared>>>,
}

/// The lease router and its stream; leases hold it, and the stream stops with the last.
pub(crate) struct LeaseWatch {
    router: Arc<Watcher>,
    subscription: Subscription,
}

impl EndSink for Watcher {
    fn on_end(&self, event: &proto::WatchRevocationsResponse) {
        let lease = {
            let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            leases.remove(&(event.tenant.clone(), event.lease_id.clone()))
        };
        if let Some(shared) = lease.and_then(|l| l.upgrade()) {
            shared.finish(LeaseEnd {
                reason: EndReason::from_proto(event.reason()),
                detail: format!("ended by the service ({:?})", event.reason()),
            });
        }
    }
}

impl LeaseWatch {
    /// Starts routing lease ends from the service's stream.
    pub(crate) fn start(client: JobTokenClient, config: RenewalConfig) -> Arc<LeaseWatch> {
        let feed = Arc::new(Feed::new(true));
        let router = Arc::new(Watcher {
            leases: Mutex::new(HashMap::new()),
        });
        let subscription = Subscription::start(client, router.clone(), false, config, feed);
        Arc::new(LeaseWatch {
            router,
            subscription,
        })
    }

    pub(crate) async fn wait_ready(&self, limit: Duration) {
        self.subscription.wait_ready(limit).await;
    }

    /// The stream's state and its "service is back" signal.
    pub(crate) fn feed(&self) -> &Arc<Feed> {
        &self.subscription.feed
    }

    pub(crate) fn register(&self, shared: &Arc<Shared>) {
        let mut leases = self.router.leases.lock().unwrap_or_else(|e| e.into_inner());
        leases.retain(|_, lease| lease.strong_count() > 0);
        let key = (shared.info.tenant.clone(), shared.info.lease_id.clone());
        leases.insert(key, Arc::downgrade(shared));
    }
}
