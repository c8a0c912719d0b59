//! The embedded store: one SQLite file in WAL mode.
//!
//! With `synchronous = NORMAL` a commit is in the WAL (the OS page cache) before it is
//! acknowledged, so it survives a killed process; `FULL` also survives power loss.
//!
//! Writes go to one writer thread that commits them in groups: every write that arrives
//! while a commit is running joins the next transaction, each inside its own savepoint so
//! one failure undoes only its own changes. A caller hears back only after the commit
//! that holds its write, so an acknowledged renewal survives `kill -9` while a busy
//! service pays for one commit per group instead of one per renewal. Reads run on a small
//! pool of their own connections, which WAL lets proceed beside the writer.
//!
//! Active leases are also kept in memory (up to a set number), so a renewal reads its
//! lease without leaving the async thread. The cache is coherent because this process is
//! the file's only writer (a lock file enforces it): the writer thread applies each
//! group's committed changes to it, in commit order, before it answers any caller of
//! that group; it never loads rows read from the file; and a compare-and-set that finds
//! the file ahead of the cache evicts the lease instead of trusting it.

mod cache;
mod lock;
mod schema;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use rusqlite::{Connection, ErrorCode, OptionalExtension, Row, params};
use tokio::sync::{Semaphore, oneshot};

use super::{
    BatchHook, BatchObserver, LeaseFilter, Logout, PoolStatus, Store, StoreError, StoredKey,
};
use crate::clock::{from_millis, to_millis};
use crate::lease::{EndReason, EventKind, Lease, LeaseEnd, LeaseEvent, OnLogout, Standing};
use cache::LeaseCache;
use writer::{Job, WriteJob};

const LEASE_COLUMNS: &str = "id, tenant, subject, actor, job_id, permissions, audience, \
    created_at, expires_at, idle_timeout_ms, last_active_at, active, end_reason, ended_at, \
    ended_by, end_detail, generation, seed, rotated_at, refresh_count, last_refreshed_at, \
    resume_count, version, issuer, subject_sub, session_id, on_logout, permission_source, \
    permissions_checked_at";

const EVENT_COLUMNS: &str = "seq, lease_id, tenant, subject, actor, job_id, kind, reason, at, \
    by_whom, detail, tokens_valid_until";

/// How hard a commit is pushed to disk before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Survives a killed process (kill -9), not a power cut. The default.
    #[default]
    Normal,
    /// fsync at every commit: survives a power cut too.
    Full,
}

/// Default number of active leases kept in memory (about 1 KiB each).
pub const DEFAULT_LEASE_CACHE: usize = 100_000;

/// SQLite-backed [`Store`].
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Queue of the writer thread, which stops when the last store handle is dropped.
    writer: mpsc::Sender<Box<dyn WriteJob>>,
    /// Idle read connections; `read_slots` has one permit per connection.
    readers: Mutex<Vec<Connection>>,
    read_slots: Arc<Semaphore>,
    /// Number of read connections.
    readers_max: usize,
    /// Where the writer reports the size of each group commit.
    batches: BatchHook,
    /// Active leases as of the last commit that touched them.
    cache: Arc<Mutex<LeaseCache>>,
    /// A directory to delete on drop (a [`SqliteStore::temporary`] store).
    temporary: Option<PathBuf>,
    /// Held (locked) while the store is open: the cache is only coherent if this
    /// process is the file's one writer.
    _exclusive: std::fs::File,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(dir) = &self.temporary {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and applies migrations. Up to
    /// `lease_cache` active leases are kept in memory (0: none).
    pub fn open(path: &Path, sync: SyncMode, lease_cache: usize) -> Result<Self, StoreError> {
        Self::open_inner(path, sync, lease_cache, None)
    }

    /// A store in a fresh file under the system's temporary directory, deleted when the
    /// last handle is dropped: for tests and benchmarks, which should exercise the same
    /// file, WAL and connections as a real deployment.
    pub fn temporary() -> Result<Self, StoreError> {
        let dir = std::env::temp_dir().join(format!("jobtoken-{}", uuid::Uuid::new_v4()));
        let path = dir.join("jobtoken.db");
        Self::open_inner(&path, SyncMode::Normal, DEFAULT_LEASE_CACHE, Some(dir))
    }

    fn open_inner(
        path: &Path,
        sync: SyncMode,
        lease_cache: usize,
        temporary: Option<PathBuf>,
    ) -> Result<Self, StoreError> {
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|e| StoreError::Database(Box::new(e)))?;
        }
        let exclusive = lock::lock_exclusively(path)?;
        let mut conn = open_connection(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(map_err)?;
        let sync = match sync {
            SyncMode::Normal => "NORMAL",
            SyncMode::Full => "FULL",
        };
        conn.pragma_update(None, "synchronous", sync)
            .map_err(map_err)?;
        // Each grouped write runs in a savepoint; keep its undo journal off the disk.
        conn.pragma_update(None, "temp_store", "MEMORY")
            .map_err(map_err)?;
        schema::migrate(&mut conn)?;
        // Reads are point lookups and short scans; two per core keeps both cores busy
        // while one waits on the disk.
        let pool = std::thread::available_parallelism().map_or(2, |n| n.get() * 2);
        let readers = (0..pool)
            .map(|_| open_connection(path))
            .collect::<Result<Vec<_>, _>>()?;
        let (tx, rx) = mpsc::channel();
        let batches = BatchHook::default();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn({
                let batches = batches.clone();
                move || writer::write_loop(conn, rx, batches)
            })
            .map_err(|e| StoreError::Database(Box::new(e)))?;
        Ok(Self {
            inner: Arc::new(Inner {
                writer: tx,
                readers: Mutex::new(readers),
                read_slots: Arc::new(Semaphore::new(pool)),
                readers_max: pool,
                batches,
                cache: Arc::new(Mutex::new(LeaseCache::new(lease_cache))),
                temporary,
                _exclusive: exclusive,
            }),
        })
    }

    /// Runs `f` on an idle read connection in the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let permit = Arc::clone(&self.inner.read_slots)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Unavailable("store closed".into()))?;
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let conn = lock(&inner.readers).pop();
            // The permit guarantees an idle connection; be safe anyway.
            let conn = conn.ok_or_else(|| StoreError::Unavailable("no read connection".into()))?;
            let result = f(&conn);
            lock(&inner.readers).push(conn);
            drop(permit);
            result
        })
        .await
        .map_err(|e| StoreError::Database(Box::new(e)))?
    }

    /// Runs `f` in the writer's next group transaction, inside a savepoint of its own, and
    /// answers once that transaction has committed (or failed).
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.write_then(f, |_| {}).await
    }

    /// [`Self::write`], running `on_commit` on the writer thread after the commit and
    /// before the caller hears of it, in commit order.
    async fn write_then<T, F, C>(&self, f: F, on_commit: C) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        C: FnOnce(&T) + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Box::new(Job {
            work: Some(f),
            outcome: None,
            on_commit: Some(on_commit),
            reply,
        });
        self.inner
            .writer
            .send(job)
            .map_err(|_| StoreError::Unavailable("store writer stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("store writer stopped".into()))?
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(map_err)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(map_err)?;
    Ok(conn)
}

fn map_err(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            StoreError::Unavailable("database is locked".into())
        }
        Some(ErrorCode::ConstraintViolation) => StoreError::Conflict,
        Some(ErrorCode::CannotOpen | ErrorCode::DiskFull | ErrorCode::SystemIoFailure) => {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Database(Box::new(e)),
    }
}

fn opt_millis(t: Option<SystemTime>) -> Option<i64> {
    t.map(to_millis)
}

fn u64_to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn lease_from_row(row: &Row<'_>) -> rusqlite::Result<Result<Lease, StoreError>> {
    let permissions: String = row.get(5)?;
    let active: bool = row.get(11)?;
    let end_reason: Option<String> = row.get(12)?;
    let end = match (active, end_reason) {
        (true, _) => Ok(None),
        (false, Some(reason)) => match EndReason::parse(&reason) {
            Some(reason) => Ok(Some(LeaseEnd {
                reason,
                at: from_millis(row.get::<_, Option<i64>>(13)?.unwrap_or_default()),
                by: row.get::<_, Option<String>>(14)?.unwrap_or_default(),
                detail: row.get::<_, Option<String>>(15)?.unwrap_or_default(),
            })),
            None => Err(StoreError::Corrupt(format!(
                "unknown end reason {reason:?}"
            ))),
        },
        (false, None) => Err(StoreError::Corrupt("ended lease without reason".into())),
    };
    let permissions = serde_json::from_str::<Vec<String>>(&permissions)
        .map_err(|e| StoreError::Corrupt(format!("permissions: {e}")));
    let idle_ms: i64 = row.get(9)?;
    let on_logout: String = row.get(26)?;
    let on_logout = OnLogout::parse(&on_logout)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown logout policy {on_logout:?}")));
    let lease = (|| {
        Ok(Lease {
            id: row.get(0)?,
            tenant: row.get(1)?,
            subject: row.get(2)?,
            actor: row.get(3)?,
            job_id: row.get(4)?,
            permissions: Vec::new(),
            audience: row.get(6)?,
            created_at: from_millis(row.get(7)?),
            expires_at: from_millis(row.get(8)?),
            idle_timeout: Duration::from_millis(idle_ms.max(0).unsigned_abs()),
            last_active_at: from_millis(row.get(10)?),
            end: None,
            generation: row.get::<_, i64>(16)?.max(0).unsigned_abs(),
            seed: row.get(17)?,
            rotated_at: from_millis(row.get(18)?),
            refresh_count: row.get::<_, i64>(19)?.max(0).unsigned_abs(),
            last_refreshed_at: row.get::<_, Option<i64>>(20)?.map(from_millis),
            resume_count: row.get::<_, i64>(21)?.max(0).unsigned_abs(),
            standing: Standing {
                issuer: row.get(23)?,
                sub: row.get(24)?,
                session_id: row.get(25)?,
                on_logout: OnLogout::default(),
                permission_source: row.get(27)?,
                permissions_checked_at: row.get::<_, Option<i64>>(28)?.map(from_millis),
            },
            version: row.get(22)?,
        })
    })();
    let lease: rusqlite::Result<Lease> = lease;
    let mut lease = lease?;
    Ok((|| {
        lease.permissions = permissions?;
        lease.end = end?;
        lease.standing.on_logout = on_logout?;
        Ok(lease)
    })())
}

fn event_from_row(row: &Row<'_>) -> rusqlite::Result<Result<LeaseEvent, StoreError>> {
    let kind: String = row.get(6)?;
    let reason: Option<String> = row.get(7)?;
    let event = LeaseEvent {
        sequence: row.get::<_, i64>(0)?.max(0).unsigned_abs(),
        lease_id: row.get(1)?,
        tenant: row.get(2)?,
        subject: row.get(3)?,
        actor: row.get(4)?,
        job_id: row.get(5)?,
        kind: EventKind::Issued,
        reason: None,
        at: from_millis(row.get(8)?),
        by: row.get(9)?,
        detail: row.get(10)?,
        tokens_valid_until: row.get::<_, Option<i64>>(11)?.map(from_millis),
    };
    Ok((|| {
        let mut event = event;
        event.kind = EventKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown event kind {kind:?}")))?;
        event.reason = match reason {
            None => None,
            Some(r) => Some(
                EndReason::parse(&r)
                    .ok_or_else(|| StoreError::Corrupt(format!("unknown end reason {r:?}")))?,
            ),
        };
        Ok(event)
    })())
}

fn collect<T>(
    rows: impl Iterator<Item = rusqlite::Result<Result<T, StoreError>>>,
) -> Result<Vec<T>, StoreError> {
    rows.map(|r| r.map_err(map_err)?).collect()
}

fn insert_event(conn: &Connection, e: &LeaseEvent) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO lease_events (lease_id, tenant, subject, actor, job_id, kind, reason, at, \
         by_whom, detail, tokens_valid_until) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )
    .and_then(|mut s| {
        s.execute(params![
            e.lease_id,
            e.tenant,
            e.subject,
            e.actor,
            e.job_id,
            e.kind.as_str(),
            e.reason.map(EndReason::as_str),
            to_millis(e.at),
            e.by,
            e.detail,
            opt_millis(e.tokens_valid_until),
        ])
    })
    .map_err(map_err)?;
    Ok(())
}

fn key_from_row(row: &Row<'_>) -> rusqlite::Result<StoredKey> {
    Ok(StoredKey {
        kid: row.get(0)?,
        algorithm: row.get(1)?,
        public_key: row.get(2)?,
        sealed_private_key: row.get(3)?,
        created_at: from_millis(row.get(4)?),
        activates_at: from_millis(row.get(5)?),
        retired_at: row.get::<_, Option<i64>>(6)?.map(from_millis),
    })
}

#[async_trait]
impl Store for SqliteStore {
    fn observe_batches(&self, observer: BatchObserver) {
        self.inner.batches.set(observer);
    }

    /// The read connections (writes go to the one writer thread).
    fn pool_status(&self) -> Option<PoolStatus> {
        let idle = self.inner.read_slots.available_permits();
        Some(PoolStatus {
            max: self.inner.readers_max,
            open: self.inner.readers_max,
            idle,
            waiting: 0,
        })
    }

    async fn insert_lease(&self, lease: &Lease, event: &LeaseEvent) -> Result<(), StoreError> {
        let cache = Arc::clone(&self.inner.cache);
        // One copy, shared by the write and the cache: by the time the hook runs the
        // write has dropped its handle, so the cache takes the lease without copying.
        let lease = Arc::new(lease.clone());
        let committed = Arc::clone(&lease);
        let event = event.clone();
        self.write_then(
            move |conn| {
                let permissions = serde_json::to_string(&lease.permissions)
                    .map_err(|e| StoreError::Database(Box::new(e)))?;
                conn.prepare_cached(&format!(
                    "INSERT INTO leases ({LEASE_COLUMNS}, deadline) VALUES \
                 (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, \
                 ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30)"
                ))
                .and_then(|mut s| {
                    s.execute(params![
                        lease.id,
                        lease.tenant,
                        lease.subject,
                        lease.actor,
                        lease.job_id,
                        permissions,
                        lease.audience,
                        to_millis(lease.created_at),
                        to_millis(lease.expires_at),
                        i64::try_from(lease.idle_timeout.as_millis()).unwrap_or(i64::MAX),
                        to_millis(lease.last_active_at),
                        lease.is_active(),
                        lease.end.as_ref().map(|e| e.reason.as_str()),
                        opt_millis(lease.end.as_ref().map(|e| e.at)),
                        lease.end.as_ref().map(|e| e.by.as_str()),
                        lease.end.as_ref().map(|e| e.detail.as_str()),
                        u64_to_i64(lease.generation),
                        lease.seed,
                        to_millis(lease.rotated_at),
                        u64_to_i64(lease.refresh_count),
                        opt_millis(lease.last_refreshed_at),
                        u64_to_i64(lease.resume_count),
                        lease.version,
                        lease.standing.issuer,
                        lease.standing.sub,
                        lease.standing.session_id,
                        lease.standing.on_logout.as_str(),
                        lease.standing.permission_source,
                        opt_millis(lease.standing.permissions_checked_at),
                        to_millis(lease.deadline()),
                    ])
                })
                .map_err(map_err)?;
                insert_event(conn, &event)
            },
            move |()| lock(&cache).committed(Arc::unwrap_or_clone(committed)),
        )
        .await
    }

    async fn get_lease(&self, id: &str) -> Result<Option<Lease>, StoreError> {
        if let Some(lease) = lock(&self.inner.cache).get(id) {
            return Ok(Some(lease));
        }
        let id = id.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&format!("SELECT {LEASE_COLUMNS} FROM leases WHERE id = ?1"))
                .and_then(|mut s| s.query_row([id], lease_from_row).optional())
                .map_err(map_err)?
                .transpose()
        })
        .await
    }

    async fn find_active_lease(
        &self,
        tenant: &str,
        actor: &str,
        job_id: &str,
    ) -> Result<Option<Lease>, StoreError> {
        let key = [tenant.to_owned(), actor.to_owned(), job_id.to_owned()];
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {LEASE_COLUMNS} FROM leases \
                 WHERE tenant = ?1 AND actor = ?2 AND job_id = ?3 AND active = 1"
            ))
            .and_then(|mut s| s.query_row(key, lease_from_row).optional())
            .map_err(map_err)?
            .transpose()
        })
        .await
    }

    async fn update_lease(
        &self,
        lease: &Lease,
        event: Option<&LeaseEvent>,
    ) -> Result<bool, StoreError> {
        let cache = Arc::clone(&self.inner.cache);
        // As in `insert_lease`: one copy, handed to the cache after the write.
        let lease = Arc::new(lease.clone());
        let committed = Arc::clone(&lease);
        let event = event.cloned();
        let on_commit = move |written: &bool| {
            if *written {
                let mut committed = Arc::unwrap_or_clone(committed);
                committed.version += 1;
                lock(&cache).committed(committed);
            } else {
                // The stored version moved on without this cache seeing it: stop
                // answering from the cache for this lease until it is written again.
                lock(&cache).leases.remove(&committed.id);
            }
        };
        self.write_then(
            move |conn| {
                let permissions = serde_json::to_string(&lease.permissions)
                    .map_err(|e| StoreError::Database(Box::new(e)))?;
                let changed = conn
                    .prepare_cached(
                        "UPDATE leases SET last_active_at = ?1, deadline = ?2, active = ?3, \
                     end_reason = ?4, ended_at = ?5, ended_by = ?6, end_detail = ?7, \
                     generation = ?8, seed = ?9, rotated_at = ?10, refresh_count = ?11, \
                     last_refreshed_at = ?12, resume_count = ?13, permissions = ?16, \
                     permissions_checked_at = ?17, version = version + 1 \
                     WHERE id = ?14 AND version = ?15",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            to_millis(lease.last_active_at),
                            to_millis(lease.deadline()),
                            lease.is_active(),
                            lease.end.as_ref().map(|e| e.reason.as_str()),
                            opt_millis(lease.end.as_ref().map(|e| e.at)),
                            lease.end.as_ref().map(|e| e.by.as_str()),
                            lease.end.as_ref().map(|e| e.detail.as_str()),
                            u64_to_i64(lease.generation),
                            lease.seed,
                            to_millis(lease.rotated_at),
                            u64_to_i64(lease.refresh_count),
                            opt_millis(lease.last_refreshed_at),
                            u64_to_i64(lease.resume_count),
                            lease.id,
                            lease.version,
                            permissions,
                            opt_millis(lease.standing.permissions_checked_at),
                        ])
                    })
                    .map_err(map_err)?;
                if changed == 0 {
                    return Ok(false);
                }
                if let Some(event) = &event {
                    insert_event(conn, event)?;
                }
                Ok(true)
            },
            on_commit,
        )
        .await
    }

    async fn list_leases(
        &self,
        filter: &LeaseFilter,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        let filter = filter.clone();
        self.read(move |conn| {
            let mut sql = format!("SELECT {LEASE_COLUMNS} FROM leases WHERE 1 = 1");
            let mut args: Vec<rusqlite::types::Value> = Vec::new();
            let mut eq = |column: &str, value: &Option<String>| {
                if let Some(v) = value {
                    args.push(v.clone().into());
                    sql.push_str(&format!(" AND {column} = ?{}", args.len()));
                }
            };
            eq("tenant", &filter.tenant);
            eq("subject", &filter.subject);
            eq("actor", &filter.actor);
            eq("job_id", &filter.job_id);
            if let Some(active) = filter.active {
                args.push(i64::from(active).into());
                sql.push_str(&format!(" AND active = ?{}", args.len()));
            }
            if let Some((created, id)) = &filter.after {
                args.push(to_millis(*created).into());
                let c = args.len();
                args.push(id.clone().into());
                let i = args.len();
                sql.push_str(&format!(
                    " AND (created_at < ?{c} OR (created_at = ?{c} AND id < ?{i}))"
                ));
            }
            args.push(i64::try_from(limit).unwrap_or(i64::MAX).into());
            sql.push_str(&format!(
                " ORDER BY created_at DESC, id DESC LIMIT ?{}",
                args.len()
            ));
            let mut stmt = conn.prepare(&sql).map_err(map_err)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(args), lease_from_row)
                .map_err(map_err)?;
            collect(rows)
        })
        .await
    }

    async fn lease_events(&self, lease_id: &str) -> Result<Vec<LeaseEvent>, StoreError> {
        let lease_id = lease_id.to_owned();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {EVENT_COLUMNS} FROM lease_events WHERE lease_id = ?1 ORDER BY seq"
                ))
                .map_err(map_err)?;
            let rows = stmt
                .query_map([lease_id], event_from_row)
                .map_err(map_err)?;
            collect(rows)
        })
        .await
    }

    async fn end_events_after(
        &self,
        cursor: u64,
        limit: usize,
    ) -> Result<Vec<LeaseEvent>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {EVENT_COLUMNS} FROM lease_events WHERE kind = 'ended' AND seq > ?1 \
                     ORDER BY seq LIMIT ?2"
                ))
                .map_err(map_err)?;
            let rows = stmt
                .query_map(
                    params![u64_to_i64(cursor), i64::try_from(limit).unwrap_or(i64::MAX)],
                    event_from_row,
                )
                .map_err(map_err)?;
            collect(rows)
        })
        .await
    }

    async fn earliest_live_end(&self, now: SystemTime) -> Result<Option<u64>, StoreError> {
        self.read(move |conn| {
            let seq: Option<i64> = conn
                .query_row(
                    "SELECT MIN(seq) FROM lease_events WHERE kind = 'ended' \
                     AND tokens_valid_until > ?1",
                    [to_millis(now)],
                    |r| r.get(0),
                )
                .map_err(map_err)?;
            Ok(seq.map(|s| s.max(0).unsigned_abs()))
        })
        .await
    }

    async fn last_event_sequence(&self) -> Result<u64, StoreError> {
        self.read(|conn| {
            let seq: Option<i64> = conn
                .query_row("SELECT MAX(seq) FROM lease_events", [], |r| r.get(0))
                .map_err(map_err)?;
            Ok(seq.unwrap_or(0).max(0).unsigned_abs())
        })
        .await
    }

    async fn leases_due(&self, now: SystemTime, limit: usize) -> Result<Vec<Lease>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {LEASE_COLUMNS} FROM leases WHERE active = 1 AND deadline <= ?1 \
                     ORDER BY deadline LIMIT ?2"
                ))
                .map_err(map_err)?;
            let rows = stmt
                .query_map(
                    params![to_millis(now), i64::try_from(limit).unwrap_or(i64::MAX)],
                    lease_from_row,
                )
                .map_err(map_err)?;
            collect(rows)
        })
        .await
    }

    async fn leases_to_log_out(
        &self,
        logout: &Logout,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        let logout = logout.clone();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {LEASE_COLUMNS} FROM leases \
                     WHERE active = 1 AND on_logout = 'end' AND issuer = ?1 AND \
                     ((?2 IS NOT NULL AND session_id = ?2) OR \
                      (?3 IS NOT NULL AND subject_sub = ?3 AND (?2 IS NULL OR session_id IS NULL))) \
                     LIMIT ?4"
                ))
                .map_err(map_err)?;
            let rows = stmt
                .query_map(
                    params![
                        logout.issuer,
                        logout.session_id,
                        logout.sub,
                        i64::try_from(limit).unwrap_or(i64::MAX)
                    ],
                    lease_from_row,
                )
                .map_err(map_err)?;
            collect(rows)
        })
        .await
    }

    async fn count_active_leases(&self) -> Result<u64, StoreError> {
        self.read(|conn| {
            let n: i64 = conn
                .query_row("SELECT COUNT(*) FROM leases WHERE active = 1", [], |r| {
                    r.get(0)
                })
                .map_err(map_err)?;
            Ok(n.max(0).unsigned_abs())
        })
        .await
    }

    async fn signing_keys(&self) -> Result<Vec<StoredKey>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT kid, algorithm, public_key, sealed_private_key, created_at, \
                     activates_at, retired_at FROM signing_keys \
                     ORDER BY created_at DESC, kid DESC",
                )
                .map_err(map_err)?;
            let rows = stmt.query_map([], key_from_row).map_err(map_err)?;
            rows.map(|r| r.map_err(map_err)).collect()
        })
        .await
    }

    async fn rotate_signing_key(
        &self,
        new: &StoredKey,
        expected_current: Option<&str>,
    ) -> Result<bool, StoreError> {
        let new = new.clone();
        let expected = expected_current.map(str::to_owned);
        self.write(move |conn| {
            let current: Option<String> = conn
                .query_row(
                    "SELECT kid FROM signing_keys WHERE retired_at IS NULL",
                    [],
                    |r| r.get(0),
                )
                .optional()
                .map_err(map_err)?;
            if current != expected {
                return Ok(false);
            }
            conn.execute(
                "UPDATE signing_keys SET retired_at = ?1 WHERE retired_at IS NULL",
                [to_millis(new.activates_at)],
            )
            .map_err(map_err)?;
            conn.execute(
                "INSERT INTO signing_keys (kid, algorithm, public_key, sealed_private_key, \
                 created_at, activates_at, retired_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL)",
                params![
                    new.kid,
                    new.algorithm,
                    new.public_key,
                    new.sealed_private_key,
                    to_millis(new.created_at),
                    to_millis(new.activates_at),
                ],
            )
            .map_err(map_err)?;
            Ok(true)
        })
        .await
    }

    async fn purge_ended(&self, before: SystemTime, limit: usize) -> Result<usize, StoreError> {
        self.write(move |conn| {
            let ids: Vec<String> = {
                let mut stmt = conn
                    .prepare_cached(
                        "SELECT id FROM leases WHERE active = 0 AND ended_at < ?1 LIMIT ?2",
                    )
                    .map_err(map_err)?;
                let rows = stmt
                    .query_map(
                        params![to_millis(before), i64::try_from(limit).unwrap_or(i64::MAX)],
                        |r| r.get(0),
                    )
                    .map_err(map_err)?;
                rows.collect::<Result<_, _>>().map_err(map_err)?
            };
            for id in &ids {
                conn.prepare_cached("DELETE FROM lease_events WHERE lease_id = ?1")
                    .and_then(|mut s| s.execute([id]))
                    .map_err(map_err)?;
                conn.prepare_cached("DELETE FROM leases WHERE id = ?1")
                    .and_then(|mut s| s.execute([id]))
                    .map_err(map_err)?;
            }
            Ok(ids.len())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn lease(job: &str) -> Lease {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        Lease {
            id: uuid::Uuid::new_v4().to_string(),
            tenant: "t".into(),
            subject: "alice".into(),
            actor: "importer".into(),
            job_id: job.into(),
            permissions: vec!["records:write".into()],
            audience: "api".into(),
            created_at: now,
            expires_at: now + Duration::from_secs(3600),
            idle_timeout: Duration::from_secs(600),
            last_active_at: now,
            end: None,
            generation: 0,
            seed: vec![7; 32],
            rotated_at: now,
            refresh_count: 0,
            last_refreshed_at: None,
            resume_count: 0,
            standing: Default::default(),
            version: 0,
        }
    }

    pub(super) fn issued(l: &Lease) -> LeaseEvent {
        LeaseEvent::new(l, EventKind::Issued, l.created_at, "module:importer", "")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_are_grouped_and_every_acknowledged_one_is_on_disk() {
        let store = SqliteStore::temporary().unwrap();
        let path = store.inner.temporary.clone().unwrap().join("jobtoken.db");
        // Two holders race for each job: the unique index lets exactly one win, and the
        // loser's failure must not disturb the winners grouped with it.
        let mut tasks = Vec::new();
        for i in 0..200 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut l = lease(&format!("job-{}", i / 2));
                l.id = format!("lease-{i}");
                let written = store.insert_lease(&l, &issued(&l)).await;
                let mut renewed = false;
                if written.is_ok() {
                    l.generation = 1;
                    renewed = store.update_lease(&l, None).await.unwrap();
                }
                (l.id, written, renewed)
            }));
        }
        let mut won = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                (id, Ok(()), true) => won.push(id),
                (_, Err(StoreError::Conflict), false) => {}
                (id, other, renewed) => panic!("{id}: {other:?} renewed={renewed}"),
            }
        }
        assert_eq!(won.len(), 100);
        // A fresh connection sees exactly the acknowledged writes, renewals included.
        let conn = open_connection(&path).unwrap();
        let rows: Vec<(String, i64)> = conn
            .prepare("SELECT id, generation FROM leases ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        won.sort();
        assert_eq!(rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(), won);
        assert!(rows.iter().all(|r| r.1 == 1));
        let events: i64 = conn
            .query_row("SELECT COUNT(*) FROM lease_events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(events, 100);
    }
}
