//! The state a lease's handles, its renewal task and the revocation stream share.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{AccessToken, LeaseInfo};
use crate::end::{Ending, LeaseEnd};
use crate::proto;

/// State shared by the handles, the renewal task and the revocation watcher.
pub(crate) struct Shared {
    pub(super) info: LeaseInfo,
    pub(super) current: ArcSwap<AccessToken>,
    pub(super) changes: watch::Sender<Arc<AccessToken>>,
    pub(super) end: watch::Sender<Option<LeaseEnd>>,
    /// The lease's permissions as the service last stated them.
    pub(super) permissions: watch::Sender<Arc<[String]>>,
    /// Highest generation some caller of `refresh_now` wants to see exceeded.
    pub(super) wanted: watch::Sender<u64>,
    /// When the job last reported progress, in milliseconds after `origin`.
    pub(super) progress_ms: AtomicU64,
    pub(super) origin: Instant,
}

impl Shared {
    /// The state of a lease just granted or resumed, holding its first token.
    pub(super) fn new(info: LeaseInfo, token: AccessToken) -> Shared {
        let token = Arc::new(token);
        Shared {
            current: ArcSwap::new(Arc::clone(&token)),
            changes: watch::channel(token).0,
            end: watch::channel(None).0,
            permissions: watch::channel(Arc::from(info.permissions.as_slice())).0,
            wanted: watch::channel(0).0,
            progress_ms: AtomicU64::new(0),
            origin: crate::clock::now(),
            info,
        }
    }

    /// Ends the lease (first end wins).
    pub(super) fn finish(&self, end: LeaseEnd) {
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

    /// Records the permissions a renewal stated; subscribers hear only of a change.
    pub(super) fn set_permissions(&self, permissions: Vec<String>) {
        self.permissions.send_if_modified(|current| {
            if **current == *permissions {
                return false;
            }
            let dropped: Vec<&String> = current
                .iter()
                .filter(|p| !permissions.contains(p))
                .collect();
            tracing::info!(
                lease_id = %self.info.lease_id,
                job_id = %self.info.job_id,
                tenant = %self.info.tenant,
                ?dropped,
                now = ?permissions,
                "the lease's permissions changed"
            );
            *current = Arc::from(permissions);
            true
        });
    }

    pub(super) fn publish(&self, token: AccessToken) {
        let token = Arc::new(token);
        self.current.store(Arc::clone(&token));
        self.changes.send_replace(token);
    }
}

impl Ending for Shared {
    fn finish(&self, end: LeaseEnd) {
        Shared::finish(self, end);
    }
}

/// Longest token life believed; a larger answer is clamped (and cannot overflow
/// `Instant` arithmetic).
const MAX_LIFE: Duration = Duration::from_secs(24 * 3600);

/// The service's answer to a grant, resume or renewal.
pub(super) fn token_from(pair: &proto::TokenPair, generation: u64) -> (AccessToken, Duration) {
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
