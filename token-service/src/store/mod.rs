//! Persistence of leases, their events and the signing keys.
//!
//! A [`Store`] keeps data and answers queries; it holds no business rules. Leases are
//! updated with compare-and-set on [`Lease::version`], so concurrent renewals (threads or
//! replicas) never lose a rotation: the loser re-reads and decides again.

#[cfg(test)]
mod conformance;
mod filter;
pub mod postgres;
mod row;
pub mod sqlite;

pub use postgres::PostgresStore;
pub use sqlite::{SqliteStore, SyncMode};
pub use token_domain::ports::store::{
    BatchObserver, LeaseFilter, Logout, PoolStatus, Retire, Store, StoreError, StoredKey,
};

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
