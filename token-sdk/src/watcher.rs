//! Following the service's revocation stream: ends that the service records (an
//! administrator's revoke, say) reach leases and verifiers within a second, not at the
//! next renewal.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch;

use crate::lease::{EndReason, LeaseEnd, Shared};
use crate::schedule::{RenewalConfig, backoff};
use crate::{JobTokenClient, proto};

/// The service sends a heartbeat every 30 s; a stream silent for longer than this is
/// presumed dead (a half-open connection) and reopened from its cursor.
const SILENCE: Duration = Duration::from_secs(75);

/// Receives the lease ends of a revocation stream.
pub(crate) trait EndSink: Send + Sync + 'static {
    /// One lease ended.
    fn on_end(&self, event: &proto::WatchRevocationsResponse);
}

/// A running revocation stream. Dropping it stops the stream.
pub(crate) struct Subscription {
    _stop: watch::Sender<()>,
    ready: watch::Receiver<bool>,
}

impl Subscription {
    /// Follows the revocation stream into `sink` until dropped: reconnects from the last
    /// cursor with backoff, so no end is missed while disconnected. With `replay_live`,
    /// starts with every end whose tokens may still be valid; otherwise from now.
    pub(crate) fn start(
        client: JobTokenClient,
        sink: Arc<dyn EndSink>,
        replay_live: bool,
    ) -> Subscription {
        let (stop, stopped) = watch::channel(());
        let (ready_tx, ready) = watch::channel(false);
        tokio::spawn(follow(client, sink, replay_live, stopped, ready_tx));
        Subscription { _stop: stop, ready }
    }

    /// Waits (at most `limit`) until the stream is open and caught up (its first
    /// heartbeat follows the backlog), so every end it replays has been seen.
    pub(crate) async fn wait_ready(&self, limit: Duration) {
        let mut ready = self.ready.clone();
        let _ = tokio::time::timeout(limit, async {
            let _ = ready.wait_for(|r| *r).await;
        })
        .await;
    }
}

async fn follow(
    client: JobTokenClient,
    sink: Arc<dyn EndSink>,
    replay_live: bool,
    mut stopped: watch::Receiver<()>,
    ready: watch::Sender<bool>,
) {
    let retry = RenewalConfig::default();
    let mut cursor = None;
    let mut attempt = 0u32;
    let run = async {
        loop {
            let request = proto::WatchRevocationsRequest {
                after_cursor: cursor,
                replay_live,
                ..Default::default()
            };
            if let Ok(response) = client.clone().watch_revocations(request).await {
                let mut events = response.into_inner();
                while let Ok(Ok(Some(event))) =
                    tokio::time::timeout(SILENCE, events.message()).await
                {
                    attempt = 0;
                    cursor = Some(event.cursor);
                    if event.heartbeat {
                        ready.send_replace(true);
                    } else {
                        sink.on_end(&event);
                    }
                }
            }
            let wait = backoff(attempt, Duration::ZERO, &retry, fastrand::f64());
            attempt = attempt.saturating_add(1);
            tracing::debug!(
                attempt,
                retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                "revocation stream reconnecting"
            );
            tokio::time::sleep(wait).await;
        }
    };
    tokio::select! {
        // The owner dropped the subscription.
        _ = stopped.changed() => {}
        _ = run => {}
    }
}

/// Routes revocation events to the leases of this process.
pub(crate) struct Watcher {
    leases: Mutex<HashMap<String, Weak<Shared>>>,
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
            leases.remove(&event.lease_id)
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
    pub(crate) fn start(client: JobTokenClient) -> Arc<LeaseWatch> {
        let router = Arc::new(Watcher {
            leases: Mutex::new(HashMap::new()),
        });
        let subscription = Subscription::start(client, router.clone(), false);
        Arc::new(LeaseWatch {
            router,
            subscription,
        })
    }

    pub(crate) async fn wait_ready(&self, limit: Duration) {
        self.subscription.wait_ready(limit).await;
    }

    pub(crate) fn register(&self, shared: &Arc<Shared>) {
        let mut leases = self.router.leases.lock().unwrap_or_else(|e| e.into_inner());
        leases.retain(|_, lease| lease.strong_count() > 0);
        leases.insert(shared.info.lease_id.clone(), Arc::downgrade(shared));
    }
}
