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
use std::sync::{Arc, LazyLock, Mutex, mpsc};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use rusqlite::{
    Connection, ErrorCode, OptionalExtension, Row, Statement, params, params_from_iter,
};
use tokio::sync::{Semaphore, oneshot};

use super::filter;
use super::row::{self, Placeholder, Statements, Value, u64_to_i64};
use super::{
    BatchHook, BatchObserver, LeaseFilter, Logout, PoolStatus, Retire, Store, StoreError, StoreOps,
    StoredKey,
};
use crate::clock::to_millis;
use crate::lease::{Lease, LeaseEvent};
use cache::LeaseCache;
use writer::{Job, WriteJob};

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

/// This store's statements generated from the column lists.
static SQL: LazyLock<Statements> = LazyLock::new(|| Statements::new(Placeholder::Question));

row::impl_columns!(Row<'_>, get, map_err);

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::ValueRef;
        Ok(rusqlite::types::ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Int(n) => ValueRef::Integer(*n),
            Value::Bool(b) => ValueRef::Integer(i64::from(*b)),
            Value::Bytes(b) => ValueRef::Blob(b),
        }))
    }
}

/// Runs a query and reads every row it returns with `read`.
fn query<T>(
    stmt: &mut Statement<'_>,
    params: impl rusqlite::Params,
    read: impl Fn(&Row<'_>) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut rows = stmt.query(params).map_err(map_err)?;
    let mut found = Vec::new();
    while let Some(row) = rows.next().map_err(map_err)? {
        found.push(read(row)?);
    }
    Ok(found)
}

/// Runs a query and reads its first row, if any, with `read`.
fn query_opt<T>(
    stmt: &mut Statement<'_>,
    params: impl rusqlite::Params,
    read: impl Fn(&Row<'_>) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    let mut rows = stmt.query(params).map_err(map_err)?;
    rows.next().map_err(map_err)?.map(read).transpose()
}

fn execute(conn: &Connection, sql: &str, values: &[Value]) -> Result<usize, StoreError> {
    conn.prepare_cached(sql)
        .and_then(|mut s| s.execute(params_from_iter(values)))
        .map_err(map_err)
}

impl StoreOps for SqliteStore {
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
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_lease(&self, lease: &Lease, event: &LeaseEvent) -> Result<(), StoreError> {
        let cache = Arc::clone(&self.inner.cache);
        let values = row::lease_values(lease)?;
        let event = row::event_values(event);
        let committed = lease.clone();
        self.write_then(
            move |conn| {
                execute(conn, &SQL.insert_lease, &values)?;
                execute(conn, &SQL.insert_event, &event)?;
                Ok(())
            },
            move |()| lock(&cache).committed(committed),
        )
        .await
    }

    async fn get_lease(&self, id: &str) -> Result<Option<Lease>, StoreError> {
        if let Some(lease) = lock(&self.inner.cache).get(id) {
            return Ok(Some(lease));
        }
        let id = id.to_owned();
        self.read(move |conn| {
            let sql = format!("SELECT {} FROM leases WHERE id = ?1", row::lease_columns());
            let mut stmt = conn.prepare_cached(&sql).map_err(map_err)?;
            query_opt(&mut stmt, [id], |r| row::lease_from(r))
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
            let sql = format!(
                "SELECT {} FROM leases \
                 WHERE tenant = ?1 AND actor = ?2 AND job_id = ?3 AND active = 1",
                row::lease_columns()
            );
            let mut stmt = conn.prepare_cached(&sql).map_err(map_err)?;
            query_opt(&mut stmt, key, |r| row::lease_from(r))
        })
        .await
    }

    async fn update_lease(
        &self,
        lease: &Lease,
        event: Option<&LeaseEvent>,
    ) -> Result<Option<i64>, StoreError> {
        let cache = Arc::clone(&self.inner.cache);
        let values = row::update_values(lease)?;
        let event = event.map(row::event_values);
        // What the update sets where the stored version is still the lease's.
        let version = lease.version + 1;
        let mut committed = lease.clone();
        let on_commit = move |written: &Option<i64>| {
            if let Some(version) = *written {
                committed.version = version;
                lock(&cache).committed(committed);
            } else {
                // The stored version moved on without this cache seeing it: stop
                // answering from the cache for this lease until it is written again.
                lock(&cache).leases.remove(&committed.id);
            }
        };
        self.write_then(
            move |conn| {
                if execute(conn, &SQL.update_lease, &values)? == 0 {
                    return Ok(None);
                }
                if let Some(event) = &event {
                    execute(conn, &SQL.insert_event, event)?;
                }
                Ok(Some(version))
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
        let (sql, args) = filter::list_leases(filter, limit, Placeholder::Question);
        self.read(move |conn| {
            let mut stmt = conn.prepare(&sql).map_err(map_err)?;
            query(&mut stmt, params_from_iter(args), |r| row::lease_from(r))
        })
        .await
    }

    async fn lease_events(&self, lease_id: &str) -> Result<Vec<LeaseEvent>, StoreError> {
        let lease_id = lease_id.to_owned();
        self.read(move |conn| {
            let sql = format!(
                "SELECT {} FROM lease_events WHERE lease_id = ?1 ORDER BY seq",
                row::event_columns()
            );
            let mut stmt = conn.prepare_cached(&sql).map_err(map_err)?;
            query(&mut stmt, [lease_id], |r| row::event_from(r))
        })
        .await
    }

    async fn end_events_after(
        &self,
        cursor: u64,
        limit: usize,
    ) -> Result<Vec<LeaseEvent>, StoreError> {
        self.read(move |conn| {
            let sql = format!(
                "SELECT {} FROM lease_events WHERE kind = 'ended' AND seq > ?1 \
                 ORDER BY seq LIMIT ?2",
                row::event_columns()
            );
            let mut stmt = conn.prepare_cached(&sql).map_err(map_err)?;
            let args = params![u64_to_i64(cursor), row::limit(limit)];
            query(&mut stmt, args, |r| row::event_from(r))
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
            let sql = format!(
                "SELECT {} FROM leases WHERE active = 1 AND deadline <= ?1 \
                 ORDER BY deadline LIMIT ?2",
                row::lease_columns()
            );
            let mut stmt = conn.prepare_cached(&sql).map_err(map_err)?;
            let args = params![to_millis(now), row::limit(limit)];
            query(&mut stmt, args, |r| row::lease_from(r))
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
            let sql = format!(
                "SELECT {} FROM leases \
                 WHERE active = 1 AND on_logout = 'end' AND issuer = ?1 AND \
                 ((?2 IS NOT NULL AND session_id = ?2) OR \
                  (?3 IS NOT NULL AND subject_sub = ?3 AND (?2 IS NULL OR session_id IS NULL))) \
                 LIMIT ?4",
                row::lease_columns()
            );
            let mut stmt = conn.prepare_cached(&sql).map_err(map_err)?;
            let args = params![
                logout.issuer,
                logout.session_id,
                logout.sub,
                row::limit(limit)
            ];
            query(&mut stmt, args, |r| row::lease_from(r))
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
            let sql = format!(
                "SELECT {} FROM signing_keys ORDER BY created_at DESC, kid DESC",
                row::key_columns()
            );
            let mut stmt = conn.prepare_cached(&sql).map_err(map_err)?;
            query(&mut stmt, [], |r| row::key_from(r))
        })
        .await
    }

    async fn rotate_signing_key(
        &self,
        new: &StoredKey,
        retire: Option<Retire<'_>>,
    ) -> Result<bool, StoreError> {
        let new = row::key_values(&StoredKey {
            retired_at: None,
            ..new.clone()
        });
        let expected = retire.map(|r| r.kid.to_owned());
        let retire_at = retire.map(|r| to_millis(r.at));
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
            if let (Some(kid), Some(at)) = (&expected, retire_at) {
                conn.execute(
                    "UPDATE signing_keys SET retired_at = ?1 WHERE kid = ?2",
                    rusqlite::params![at, kid],
                )
                .map_err(map_err)?;
            }
            execute(conn, &SQL.insert_key, &new)?;
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
                    .query_map(params![to_millis(before), row::limit(limit)], |r| r.get(0))
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
