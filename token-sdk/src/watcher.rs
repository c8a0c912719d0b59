//! One revocation stream per client: ends that the service records (an administrator's
//! revoke, say) reach the lease within a second, not at its next renewal.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::lease::{EndReason, LeaseEnd, Shared};
use crate::schedule::{RenewalConfig, backoff};
use crate::{JobTokenClient, proto};

/// Routes revocation events to the leases of this process.
pub(crate) struct Watcher {
    leases: Mutex<HashMap<String, Weak<Shared>>>,
}

impl Watcher {
    /// Starts streaming; the stream stops once the watcher is dropped.
    pub(crate) fn spawn(client: JobTokenClient) -> Arc<Watcher> {
        let watcher = Arc::new(Watcher {
            leases: Mutex::new(HashMap::new()),
        });
        tokio::spawn(stream(Arc::downgrade(&watcher), client));
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

async fn stream(watcher: Weak<Watcher>, client: JobTokenClient) {
    let retry = RenewalConfig::default();
    let mut cursor = None;
    let mut attempt = 0u32;
    while watcher.strong_count() > 0 {
        let request = proto::WatchRevocationsRequest {
            after_cursor: cursor,
        };
        if let Ok(response) = client.clone().watch_revocations(request).await {
            let mut events = response.into_inner();
            while let Ok(Some(event)) = events.message().await {
                attempt = 0;
                cursor = Some(event.cursor);
                let Some(watcher) = watcher.upgrade() else {
                    return;
                };
                if !event.heartbeat {
                    watcher.dispatch(&event);
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
