//! The store port: durable home of leases, their events and the signing keys, as the
//! domain needs it. Adapters (SQLite, PostgreSQL) live in the service crate, with what
//! only its wiring needs (metrics, other processes' ends: `StoreOps`); they keep data and
//! answer queries and hold no business rules.

use std::fmt;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::lease::{Lease, LeaseEvent};

/// A failure of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or is too busy; the operation did not happen.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A uniqueness rule refused the write (an active lease for the job already exists).
    #[error("conflicting row exists")]
    Conflict,
    /// Stored data could not be read back (corruption or a bug).
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// Any other failure of the database driver (its text carries the cause: SQLSTATE
    /// and message, never a password).
    #[error("database error: {0}")]
    Database(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The store could not be opened at start-up: where (host, port, user, database;
    /// never the password) and why.
    #[error("cannot open {target}: {problem}")]
    Open {
        /// Where it connects.
        target: String,
        /// Why it failed.
        problem: String,
    },
}

/// Which leases to list. `None` fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseFilter {
    /// Only this tenant.
    pub tenant: Option<String>,
    /// Only this subject.
    pub subject: Option<String>,
    /// Only this actor.
    pub actor: Option<String>,
    /// Only this job.
    pub job_id: Option<String>,
    /// Only active (`Some(true)`) or ended (`Some(false)`) leases.
    pub active: Option<bool>,
    /// Keyset position: only leases ordered after this `(created_at, id)`.
    pub after: Option<(SystemTime, String)>,
}

/// Whom a back-channel logout names: a session, a user, or both, of one issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logout {
    /// The issuer that logged the user out.
    pub issuer: String,
    /// The session (`sid`).
    pub session_id: Option<String>,
    /// The user (`sub`).
    pub sub: Option<String>,
}

/// A signing key as stored: the private half sealed with the service's master key.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredKey {
    /// Key id, the JWT header `kid`.
    pub kid: String,
    /// JWS algorithm, `EdDSA`.
    pub algorithm: String,
    /// Raw public key.
    pub public_key: Vec<u8>,
    /// Private key (PKCS#8), encrypted with the master key.
    pub sealed_private_key: Vec<u8>,
    /// Created (and published) at.
    pub created_at: SystemTime,
    /// When it starts signing.
    pub activates_at: SystemTime,
    /// When it stops signing (its successor's activation); `None` for the newest key.
    pub retired_at: Option<SystemTime>,
}

impl fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredKey")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .field("created_at", &self.created_at)
            .field("activates_at", &self.activates_at)
            .field("retired_at", &self.retired_at)
            .finish_non_exhaustive()
    }
}

/// The key a rotation retires, and when it stops signing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retire<'a> {
    /// The newest key now, which the rotation expects to replace.
    pub kid: &'a str,
    /// When it stops signing.
    pub at: SystemTime,
}

/// Durable home of leases, events and keys.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Inserts a new lease and its `Issued` event atomically. [`StoreError::Conflict`] if
    /// the actor already holds an active lease for the job in the lease's tenant.
    async fn insert_lease(&self, lease: &Lease, event: &LeaseEvent) -> Result<(), StoreError>;

    /// The lease with this id.
    async fn get_lease(&self, id: &str) -> Result<Option<Lease>, StoreError>;

    /// The actor's active lease for a job of a tenant.
    async fn find_active_lease(
        &self,
        tenant: &str,
        actor: &str,
        job_id: &str,
    ) -> Result<Option<Lease>, StoreError>;

    /// Writes `lease` if its stored version is still `lease.version` (and bumps it), with
    /// `event` appended in the same transaction. `Ok(Some(version))`: written, now at
    /// `version`; `Ok(None)`: someone else wrote first.
    async fn update_lease(
        &self,
        lease: &Lease,
        event: Option<&LeaseEvent>,
    ) -> Result<Option<i64>, StoreError>;

    /// Leases matching `filter`, newest first, at most `limit`.
    async fn list_leases(
        &self,
        filter: &LeaseFilter,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError>;

    /// Every event of one lease, oldest first.
    async fn lease_events(&self, lease_id: &str) -> Result<Vec<LeaseEvent>, StoreError>;

    /// `Ended` events with a sequence above `cursor`, oldest first, at most `limit`.
    async fn end_events_after(
        &self,
        cursor: u64,
        limit: usize,
    ) -> Result<Vec<LeaseEvent>, StoreError>;

    /// The lowest sequence of an `Ended` event whose `tokens_valid_until` is after `now`.
    async fn earliest_live_end(&self, now: SystemTime) -> Result<Option<u64>, StoreError>;

    /// The highest event sequence so far (0 if none).
    async fn last_event_sequence(&self) -> Result<u64, StoreError>;

    /// Active leases whose [`Lease::deadline`] is at or before `now`, at most `limit`.
    async fn leases_due(&self, now: SystemTime, limit: usize) -> Result<Vec<Lease>, StoreError>;

    /// Active leases with logout policy `end` that a logout by `issuer` of session `sid`
    /// or user `sub` reaches, at most `limit`: with a `sid`, the leases granted from that
    /// session and the user's leases that recorded no session; without one, every lease
    /// of the user.
    async fn leases_to_log_out(
        &self,
        logout: &Logout,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError>;

    /// Number of active leases.
    async fn count_active_leases(&self) -> Result<u64, StoreError>;

    /// Every signing key, newest first.
    async fn signing_keys(&self) -> Result<Vec<StoredKey>, StoreError>;

    /// Adds `new` as the newest key and, atomically, marks the key `retire` names retired
    /// at the time it says, but only if that key is still the newest one (`None`: only if
    /// there is no key yet); otherwise returns `Ok(false)`, so racing rotations (or
    /// replicas starting together) make one key, not two. When a key retires is the
    /// domain's rule ([`crate::crypto::keys`]), not the store's.
    async fn rotate_signing_key(
        &self,
        new: &StoredKey,
        retire: Option<Retire<'_>>,
    ) -> Result<bool, StoreError>;

    /// Deletes up to `limit` leases that ended before `before`, with their events.
    /// Returns how many leases it deleted. Safe to run on several replicas at once.
    async fn purge_ended(&self, before: SystemTime, limit: usize) -> Result<usize, StoreError>;
}
