//! The embedded store: one SQLite file in WAL mode.
//!
//! With `synchronous = NORMAL` a commit is in the WAL (the OS page cache) before it is
//! acknowledged, so it survives a killed process; `FULL` also survives power loss.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use rusqlite::{Connection, ErrorCode, OptionalExtension, Row, params};

use super::{LeaseFilter, Store, StoreError, StoredKey};
use crate::clock::{from_millis, to_millis};
use crate::lease::{EndReason, EventKind, Lease, LeaseEnd, LeaseEvent};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE leases (
    id                TEXT PRIMARY KEY,
    tenant            TEXT NOT NULL,
    subject           TEXT NOT NULL,
    actor             TEXT NOT NULL,
    job_id            TEXT NOT NULL,
    permissions       TEXT NOT NULL,
    audience          TEXT NOT NULL,
    created_at        INTEGER NOT NULL,
    expires_at        INTEGER NOT NULL,
    idle_timeout_ms   INTEGER NOT NULL,
    last_active_at    INTEGER NOT NULL,
    deadline          INTEGER NOT NULL,
    active            INTEGER NOT NULL,
    end_reason        TEXT,
    ended_at          INTEGER,
    ended_by          TEXT,
    end_detail        TEXT,
    generation        INTEGER NOT NULL,
    seed              BLOB NOT NULL,
    rotated_at        INTEGER NOT NULL,
    refresh_count     INTEGER NOT NULL,
    last_refreshed_at INTEGER,
    resume_count      INTEGER NOT NULL,
    version           INTEGER NOT NULL
);
CREATE UNIQUE INDEX leases_active_job ON leases (actor, job_id) WHERE active = 1;
CREATE INDEX leases_due ON leases (deadline) WHERE active = 1;
CREATE INDEX leases_created ON leases (created_at DESC, id DESC);
CREATE INDEX leases_subject ON leases (tenant, subject);
CREATE TABLE lease_events (
    seq                INTEGER PRIMARY KEY AUTOINCREMENT,
    lease_id           TEXT NOT NULL,
    tenant             TEXT NOT NULL,
    subject            TEXT NOT NULL,
    actor              TEXT NOT NULL,
    job_id             TEXT NOT NULL,
    kind               TEXT NOT NULL,
    reason             TEXT,
    at                 INTEGER NOT NULL,
    by_whom            TEXT NOT NULL,
    detail             TEXT NOT NULL,
    tokens_valid_until INTEGER
);
CREATE INDEX lease_events_lease ON lease_events (lease_id, seq);
CREATE INDEX lease_events_ended ON lease_events (seq) WHERE kind = 'ended';
CREATE INDEX leases_ended_at ON leases (ended_at) WHERE active = 0;
CREATE TABLE signing_keys (
    kid                TEXT PRIMARY KEY,
    algorithm          TEXT NOT NULL,
    public_key         BLOB NOT NULL,
    sealed_private_key BLOB NOT NULL,
    created_at         INTEGER NOT NULL,
    activates_at       INTEGER NOT NULL,
    retired_at         INTEGER
);
"#];

const LEASE_COLUMNS: &str = "id, tenant, subject, actor, job_id, permissions, audience, \
    created_at, expires_at, idle_timeout_ms, last_active_at, active, end_reason, ended_at, \
    ended_by, end_detail, generation, seed, rotated_at, refresh_count, last_refreshed_at, \
    resume_count, version";

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

/// SQLite-backed [`Store`].
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and applies migrations.
    pub fn open(path: &Path, sync: SyncMode) -> Result<Self, StoreError> {
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|e| StoreError::Database(Box::new(e)))?;
        }
        let conn = Connection::open(path).map_err(map_err)?;
        Self::configure(conn, sync)
    }

    /// A private in-memory database, for tests.
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::configure(
            Connection::open_in_memory().map_err(map_err)?,
            SyncMode::Normal,
        )
    }

    fn configure(mut conn: Connection, sync: SyncMode) -> Result<Self, StoreError> {
        conn.busy_timeout(Duration::from_secs(5)).map_err(map_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(map_err)?;
        let sync = match sync {
            SyncMode::Normal => "NORMAL",
            SyncMode::Full => "FULL",
        };
        conn.pragma_update(None, "synchronous", sync)
            .map_err(map_err)?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the connection in the blocking pool.
    async fn with<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut conn)
        })
        .await
        .map_err(|e| StoreError::Database(Box::new(e)))?
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let done: usize = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(map_err)?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(done) {
        let tx = conn.transaction().map_err(map_err)?;
        tx.execute_batch(sql).map_err(map_err)?;
        tx.pragma_update(None, "user_version", i + 1)
            .map_err(map_err)?;
        tx.commit().map_err(map_err)?;
    }
    Ok(())
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
            version: row.get(22)?,
        })
    })();
    let lease: rusqlite::Result<Lease> = lease;
    let mut lease = lease?;
    Ok((|| {
        lease.permissions = permissions?;
        lease.end = end?;
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
    async fn insert_lease(&self, lease: &Lease, event: &LeaseEvent) -> Result<(), StoreError> {
        let lease = lease.clone();
        let event = event.clone();
        self.with(move |conn| {
            let permissions = serde_json::to_string(&lease.permissions)
                .map_err(|e| StoreError::Database(Box::new(e)))?;
            let tx = conn.transaction().map_err(map_err)?;
            tx.prepare_cached(&format!(
                "INSERT INTO leases ({LEASE_COLUMNS}, deadline) VALUES \
                 (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, \
                 ?18, ?19, ?20, ?21, ?22, ?23, ?24)"
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
                    to_millis(lease.deadline()),
                ])
            })
            .map_err(map_err)?;
            insert_event(&tx, &event)?;
            tx.commit().map_err(map_err)
        })
        .await
    }

    async fn get_lease(&self, id: &str) -> Result<Option<Lease>, StoreError> {
        let id = id.to_owned();
        self.with(move |conn| {
            conn.prepare_cached(&format!("SELECT {LEASE_COLUMNS} FROM leases WHERE id = ?1"))
                .and_then(|mut s| s.query_row([id], lease_from_row).optional())
                .map_err(map_err)?
                .transpose()
        })
        .await
    }

    async fn find_active_lease(
        &self,
        actor: &str,
        job_id: &str,
    ) -> Result<Option<Lease>, StoreError> {
        let (actor, job_id) = (actor.to_owned(), job_id.to_owned());
        self.with(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {LEASE_COLUMNS} FROM leases WHERE actor = ?1 AND job_id = ?2 AND active = 1"
            ))
            .and_then(|mut s| s.query_row([actor, job_id], lease_from_row).optional())
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
        let lease = lease.clone();
        let event = event.cloned();
        self.with(move |conn| {
            let tx = conn.transaction().map_err(map_err)?;
            let changed = tx
                .prepare_cached(
                    "UPDATE leases SET last_active_at = ?1, deadline = ?2, active = ?3, \
                     end_reason = ?4, ended_at = ?5, ended_by = ?6, end_detail = ?7, \
                     generation = ?8, seed = ?9, rotated_at = ?10, refresh_count = ?11, \
                     last_refreshed_at = ?12, resume_count = ?13, version = version + 1 \
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
                    ])
                })
                .map_err(map_err)?;
            if changed == 0 {
                return Ok(false);
            }
            if let Some(event) = &event {
                insert_event(&tx, event)?;
            }
            tx.commit().map_err(map_err)?;
            Ok(true)
        })
        .await
    }

    async fn list_leases(
        &self,
        filter: &LeaseFilter,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        let filter = filter.clone();
        self.with(move |conn| {
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
        self.with(move |conn| {
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
        self.with(move |conn| {
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
        self.with(move |conn| {
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
        self.with(|conn| {
            let seq: Option<i64> = conn
                .query_row("SELECT MAX(seq) FROM lease_events", [], |r| r.get(0))
                .map_err(map_err)?;
            Ok(seq.unwrap_or(0).max(0).unsigned_abs())
        })
        .await
    }

    async fn leases_due(&self, now: SystemTime, limit: usize) -> Result<Vec<Lease>, StoreError> {
        self.with(move |conn| {
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

    async fn count_active_leases(&self) -> Result<u64, StoreError> {
        self.with(|conn| {
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
        self.with(|conn| {
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
        self.with(move |conn| {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(map_err)?;
            let current: Option<String> = tx
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
            tx.execute(
                "UPDATE signing_keys SET retired_at = ?1 WHERE retired_at IS NULL",
                [to_millis(new.activates_at)],
            )
            .map_err(map_err)?;
            tx.execute(
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
            tx.commit().map_err(map_err)?;
            Ok(true)
        })
        .await
    }

    async fn purge_ended(&self, before: SystemTime, limit: usize) -> Result<usize, StoreError> {
        self.with(move |conn| {
            let tx = conn.transaction().map_err(map_err)?;
            let ids: Vec<String> = {
                let mut stmt = tx
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
                tx.execute("DELETE FROM lease_events WHERE lease_id = ?1", [id])
                    .map_err(map_err)?;
                tx.execute("DELETE FROM leases WHERE id = ?1", [id])
                    .map_err(map_err)?;
            }
            tx.commit().map_err(map_err)?;
            Ok(ids.len())
        })
        .await
    }
}
