//! One revocation stream per client: ends that the service records (an administrator's
//! revoke, say) reach the lease within a second, not at its next renewal.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::lease::{EndReason, LeaseEnd, Shared};
use crate::schedule::{RenewalConfig, backoff};
use crate::{JobTokenClient, proto};

/// Receives the lease ends of a revocation stream.
pub(crate) trait EndSink: Send + Sync + 'static {
    /// One lease ended.
    fn on_end(&self, event: &proto::WatchRevocationsResponse);
}

/// Routes revocation events to the leases of this process.
pub(crate) struct Watcher {
    leases: Mutex<HashMap<String, Weak<Shared>>>,
}

impl EndSink for Watcher {
    fn on_end(&self, event: &proto::WatchRevocationsResponse) {
        self.dispatch(event);
    }
}

impl Watcher {
    /// Starts streaming; the stream stops once the watcher is dropped.
    pub(crate) fn spawn(client: JobTokenClient) -> Arc<Watcher> {
        let watcher = Arc::new(Watcher {
            leases: Mutex::new(HashMap::new()),
        });
        let sink: Arc<dyn EndSink> = watcher.clone();
        tokio::spawn(stream(Arc::downgrade(&sink), client));
        watcher
    }

    pub(crate) fn register(&self, shared: &Arc<Shared>) {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        leases.retain(|_, lease| lease.strong_count() > 0);
        leases.insert(shared.info.lease_id.clone(), Arc::downgrade(shared));
    }

    fn dispatch(&self, event: &proto::WatchRevocationsResponse) {
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

/// Follows the revocation stream for as long as `sink` lives, reconnecting from the last
/// cursor with backoff, so no end is missed while disconnected.
pub(crate) async fn stream(sink: Weak<dyn EndSink>, client: JobTokenClient) {
    let retry = RenewalConfig::default();
    let mut cursor = None;
    let mut attempt = 0u32;
    while sink.strong_count() > 0 {
        let request = proto::WatchRevocationsRequest {
            after_cursor: cursor,
        };
        if let Ok(response) = client.clone().watch_revocations(request).await {
            let mut events = response.into_inner();
            while let Ok(Some(event)) = events.message().await {
                attempt = 0;
                cursor = Some(event.cursor);
                let Some(sink) = sink.upgrade() else {
                    return;
                };
                if !event.heartbeat {
                    sink.on_end(&event);
                }
            }
        }
        // Reconnect from the cursor, so no end is missed while disconnected.
        let wait = backoff(attempt, Duration::ZERO, &retry, fastrand::f64());
        attempt = attempt.saturating_add(1);
        tracing::debug!(
            attempt,
            retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            "revocation stream reconnecting"
        );
        tokio::time::sleep(wait).await;
    }
}
