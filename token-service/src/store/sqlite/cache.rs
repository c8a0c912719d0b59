//! The in-memory copy of active leases (see the parent module's docs for why it is
//! coherent).

use std::collections::HashMap;
use std::time::SystemTime;

use crate::clock::{from_millis, to_millis};
use crate::lease::Lease;

/// Active leases by id, as of the last commit that touched each (see the module docs).
pub(super) struct LeaseCache {
    pub(super) leases: HashMap<String, Lease>,
    pub(super) capacity: usize,
}

impl LeaseCache {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            leases: HashMap::new(),
            capacity,
        }
    }

    /// Records the committed state of a lease: kept while active (room permitting),
    /// dropped once it ends. Times are cut to the file's millisecond precision, so a
    /// cached lease equals the one the file would return.
    pub(super) fn committed(&mut self, mut lease: Lease) {
        let ms = |t: SystemTime| from_millis(to_millis(t));
        lease.created_at = ms(lease.created_at);
        lease.expires_at = ms(lease.expires_at);
        lease.last_active_at = ms(lease.last_active_at);
        lease.rotated_at = ms(lease.rotated_at);
        lease.last_refreshed_at = lease.last_refreshed_at.map(ms);
        lease.standing.permissions_checked_at = lease.standing.permissions_checked_at.map(ms);
        if !lease.is_active() {
            self.leases.remove(&lease.id);
        } else if let Some(slot) = self.leases.get_mut(&lease.id) {
            *slot = lease;
        } else if self.leases.len() < self.capacity {
            self.leases.insert(lease.id.clone(), lease);
        }
    }

    pub(super) fn get(&self, id: &str) -> Option<Lease> {
        self.leases.get(id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use crate::lease::EndReason;
    use crate::store::Store;
    use crate::store::conformance::{issued, lease};
    use crate::store::sqlite::{DEFAULT_LEASE_CACHE, SqliteStore, lock};

    #[tokio::test]
    async fn the_lease_cache_follows_every_commit_and_only_commits() {
        for capacity in [0, 1, DEFAULT_LEASE_CACHE] {
            let store = SqliteStore::temporary().unwrap();
            lock(&store.inner.cache).capacity = capacity;
            let a = lease("job-a");
            let b = lease("job-b");
            for l in [&a, &b] {
                store.insert_lease(l, &issued(l)).await.unwrap();
            }
            assert_eq!(lock(&store.inner.cache).leases.len(), capacity.min(2));
            assert_eq!(store.get_lease(&a.id).await.unwrap().unwrap(), a);

            let mut renewed = a.clone();
            renewed.generation = 1;
            assert_eq!(store.update_lease(&renewed, None).await.unwrap(), Some(1));
            if capacity > 0 {
                // The cache holds the committed row: new generation, bumped version.
                let cached = lock(&store.inner.cache).get(&a.id).unwrap();
                assert_eq!((cached.generation, cached.version), (1, 1));
            }
            // A stale compare-and-set loses; the cache drops the lease rather than
            // guess, and the next read comes from the file.
            assert_eq!(store.update_lease(&a, None).await.unwrap(), None);
            assert!(!lock(&store.inner.cache).leases.contains_key(&a.id));
            let got = store.get_lease(&a.id).await.unwrap().unwrap();
            assert_eq!((got.generation, got.version), (1, 1));

            let mut ended = got.clone();
            ended.finish(EndReason::Released, ended.created_at, "module:importer", "");
            assert_eq!(store.update_lease(&ended, None).await.unwrap(), Some(2));
            assert!(!lock(&store.inner.cache).leases.contains_key(&a.id));
            let got = store.get_lease(&a.id).await.unwrap().unwrap();
            assert_eq!(got.end.map(|e| e.reason), Some(EndReason::Released));
            assert_eq!(got.version, 2);
        }
    }

    #[tokio::test]
    async fn a_cached_lease_equals_the_one_the_file_returns() {
        let store = SqliteStore::temporary().unwrap();
        let mut l = lease("job-a");
        // Times finer than the file keeps: the cache must cut them the same way.
        let odd = std::time::Duration::from_nanos(123_456);
        l.created_at += odd;
        l.last_active_at += odd;
        l.rotated_at += odd;
        l.last_refreshed_at = Some(l.created_at + odd);
        l.standing.permissions_checked_at = Some(l.created_at + odd);
        store.insert_lease(&l, &issued(&l)).await.unwrap();
        let cached = store.get_lease(&l.id).await.unwrap().unwrap();
        lock(&store.inner.cache).leases.clear();
        let from_file = store.get_lease(&l.id).await.unwrap().unwrap();
        assert_eq!(cached, from_file);
    }
}
