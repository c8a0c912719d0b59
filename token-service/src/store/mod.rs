//! Persistence of leases, their events and the signing keys.
//!
//! A [`Store`] keeps data and answers queries; it holds no business rules. Leases are
//! updated with compare-and-set on [`crate::lease::Lease::version`], so concurrent renewals (threads or
//! replicas) never lose a rotation: the loser re-reads and decides again.

#[cfg(test)]
mod conformance;
mod filter;
pub mod postgres;
mod row;
pub mod sqlite;

pub use postgres::PostgresStore;
pub use sqlite::{SqliteStore, SyncMode};
pub use token_domain::ports::store::{LeaseFilter, Logout, Retire, Store, StoreError, StoredKey};

/// What the service's wiring asks of a store beyond the domain's port: batch sizes and
/// the connection pool for metrics, and the lease ends other processes record.
pub trait StoreOps: Store {
    /// Gives the store where to report the size of each batch it commits or sends
    /// (group commit): `(kind, requests in the batch)`. Stores that don't batch ignore it.
    fn observe_batches(&self, _observer: BatchObserver) {}

    /// Its connection pool now, for metrics.
    fn pool_status(&self) -> Option<PoolStatus> {
        None
    }

    /// Changes whenever *another process* sharing this store records a lease end, so
    /// revocation streams wake at once. `None` for a store only one process uses.
    fn remote_ends(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// Receives `(kind, size)` of every batch a store runs.
pub type BatchObserver = std::sync::Arc<dyn Fn(&'static str, usize) + Send + Sync>;

/// A store's connection pool at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStatus {
    /// Most connections it opens.
    pub max: usize,
    /// Connections open now.
    pub open: usize,
    /// Open connections not in use.
    pub idle: usize,
    /// Callers waiting for a connection.
    pub waiting: usize,
}

/// Where a store's batching code reports, once an observer is set.
#[derive(Clone, Default)]
pub(crate) struct BatchHook(std::sync::Arc<std::sync::OnceLock<BatchObserver>>);

impl BatchHook {
    pub(crate) fn set(&self, observer: BatchObserver) {
        let _ = self.0.set(observer);
    }

    pub(crate) fn observe(&self, kind: &'static str, size: usize) {
        if let Some(observer) = self.0.get() {
            observer(kind, size);
        }
    }
}
