//! The shared store: PostgreSQL, for several replicas.
//!
//! - Migrations run under an advisory lock, so replicas starting together apply them once.
//! - Lease events get their sequence numbers under a transaction-level advisory lock, so
//!   sequence order is commit order and a watcher reading "after cursor" never skips an
//!   event that commits late.
//! - Every lease end is announced with `NOTIFY`; each replica `LISTEN`s and wakes its
//!   revocation streams at once.
//! - The renewal path is batched: concurrent lease reads become one `= ANY($1)` query,
//!   and concurrent event-less updates one `UPDATE … FROM unnest(…)` statement (one
//!   commit), each row still guarded by its own version.

mod batch;
mod listen;
mod schema;
mod tls;

use std::fmt;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::watch;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;

use super::{
    BatchHook, BatchObserver, LeaseFilter, Logout, PoolStatus, Store, StoreError, StoredKey,
};
use crate::clock::{from_millis, to_millis};
use crate::lease::{EndReason, EventKind, Lease, LeaseEnd, LeaseEvent, OnLogout, Standing};
use batch::{Batcher, MAX_BATCH, PARALLEL_BATCHES, read_leases, write_leases};
use tls::MakeRustls;

/// Lock key serialising event inserts, so sequence order is commit order.
const EVENT_LOCK: i64 = 0x6a6f_6274_6f6b_0002;
/// Lock key serialising key rotations.
const KEY_LOCK: i64 = 0x6a6f_6274_6f6b_0003;
/// Connection option that keeps NOTICEs off the wire.
const QUIET: &str = "-c client_min_messages=warning";

const LEASE_COLUMNS: &str = "id, tenant, subject, actor, job_id, permissions, audience, \
    created_at, expires_at, idle_timeout_ms, last_active_at, active, end_reason, ended_at, \
    ended_by, end_detail, generation, seed, rotated_at, refresh_count, last_refreshed_at, \
    resume_count, version, issuer, subject_sub, session_id, on_logout, permission_source, \
    permissions_checked_at";

const EVENT_COLUMNS: &str = "seq, lease_id, tenant, subject, actor, job_id, kind, reason, at, \
    by_whom, detail, tokens_valid_until";

/// Connection settings.
#[derive(Clone)]
pub struct PostgresOptions {
    /// `postgres://…` URL. Secret.
    pub url: String,
    /// Schema for the tables (created if missing).
    pub schema: String,
    /// Pool size.
    pub max_connections: usize,
    /// Statement timeout (and the longest wait for a pooled connection).
    pub statement_timeout: Duration,
    /// CA certificates (PEM) that the server's certificate must chain to; `sslrootcert`
    /// in the URL overrides it.
    pub ca_file: Option<std::path::PathBuf>,
}

impl fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresOptions")
            .field("url", &"<redacted>")
            .field("schema", &self.schema)
            .field("max_connections", &self.max_connections)
            .field("statement_timeout", &self.statement_timeout)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// PostgreSQL-backed [`Store`].
pub struct PostgresStore {
    pool: Pool,
    ends: watch::Receiver<u64>,
    reads: Batcher<String, Option<Lease>>,
    renewals: Batcher<Lease, bool>,
    batches: BatchHook,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

fn db_err(e: tokio_postgres::Error) -> StoreError {
    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        return StoreError::Conflict;
    }
    let unavailable = e.is_closed()
        || e.as_db_error().is_none()
        || matches!(
            e.code(),
            Some(c) if *c == SqlState::QUERY_CANCELED
                || *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
                || *c == SqlState::TOO_MANY_CONNECTIONS
                || *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::T_R_DEADLOCK_DETECTED
        );
    if unavailable {
        StoreError::Unavailable(tls::describe(&e))
    } else {
        StoreError::Database(tls::describe(&e).into())
    }
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db_err(e),
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// The driver's config, the TLS connector `sslmode` asks for, and where it connects (for
/// error texts).
fn pg_config(
    options: &PostgresOptions,
) -> Result<(tokio_postgres::Config, MakeRustls, String), StoreError> {
    let invalid = |problem: String| StoreError::Open {
        target: "PostgreSQL".into(),
        problem,
    };
    let split = tls::split_url(&options.url).map_err(|e| invalid(format!("store.url: {e}")))?;
    let mut config: tokio_postgres::Config = split
        .rest
        .parse()
        .map_err(|_| invalid("store.url is not a valid PostgreSQL URL".into()))?;
    let target = tls::target(&config);
    let ca_file = split.root_cert.as_deref().or(options.ca_file.as_deref());
    // A CA file means "check the server": as libpq does with a root certificate, prefer
    // and require then verify the chain, so a man in the middle answering "no TLS"
    // cannot downgrade the connection to plaintext.
    let mode = match (split.mode, ca_file) {
        (tls::TlsMode::Prefer | tls::TlsMode::Require, Some(_)) => tls::TlsMode::VerifyCa,
        (mode, _) => mode,
    };
    let tls = tls::client_config(mode, ca_file).map_err(|problem| StoreError::Open {
        target: target.clone(),
        problem,
    })?;
    config.ssl_mode(mode.ssl_mode());
    let timeout_ms = options.statement_timeout.as_millis();
    // NOTICEs ("schema already exists, skipping") would reach the log at INFO through
    // the driver; the server sends none below WARNING.
    config.options(format!(
        "-c search_path={} -c statement_timeout={timeout_ms} {QUIET}",
        options.schema
    ));
    config.connect_timeout(options.statement_timeout);
    config.application_name("token-service");
    Ok((config, tls, target))
}

/// A failure to open the store, with where and why.
fn open_err(target: &str, e: StoreError) -> StoreError {
    StoreError::Open {
        target: target.to_owned(),
        problem: e.to_string(),
    }
}

fn u64_to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn i64_to_u64(v: i64) -> u64 {
    v.max(0).unsigned_abs()
}

fn lease_from_row(row: &Row) -> Result<Lease, StoreError> {
    let get = |e: tokio_postgres::Error| StoreError::Corrupt(e.to_string());
    let active: bool = row.try_get(11).map_err(get)?;
    let end = if active {
        None
    } else {
        let reason: Option<String> = row.try_get(12).map_err(get)?;
        let reason = reason
            .as_deref()
            .and_then(EndReason::parse)
            .ok_or_else(|| StoreError::Corrupt("ended lease without a known reason".into()))?;
        Some(LeaseEnd {
            reason,
            at: from_millis(
                row.try_get::<_, Option<i64>>(13)
                    .map_err(get)?
                    .unwrap_or_default(),
            ),
            by: row
                .try_get::<_, Option<String>>(14)
                .map_err(get)?
                .unwrap_or_default(),
            detail: row
                .try_get::<_, Option<String>>(15)
                .map_err(get)?
                .unwrap_or_default(),
        })
    };
    let permissions: String = row.try_get(5).map_err(get)?;
    let idle_ms: i64 = row.try_get(9).map_err(get)?;
    let on_logout: String = row.try_get(26).map_err(get)?;
    let on_logout = OnLogout::parse(&on_logout)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown logout policy {on_logout:?}")))?;
    Ok(Lease {
        id: row.try_get(0).map_err(get)?,
        tenant: row.try_get(1).map_err(get)?,
        subject: row.try_get(2).map_err(get)?,
        actor: row.try_get(3).map_err(get)?,
        job_id: row.try_get(4).map_err(get)?,
        permissions: serde_json::from_str(&permissions)
            .map_err(|e| StoreError::Corrupt(format!("permissions: {e}")))?,
        audience: row.try_get(6).map_err(get)?,
        created_at: from_millis(row.try_get(7).map_err(get)?),
        expires_at: from_millis(row.try_get(8).map_err(get)?),
        idle_timeout: Duration::from_millis(i64_to_u64(idle_ms)),
        last_active_at: from_millis(row.try_get(10).map_err(get)?),
        end,
        generation: i64_to_u64(row.try_get(16).map_err(get)?),
        seed: row.try_get(17).map_err(get)?,
        rotated_at: from_millis(row.try_get(18).map_err(get)?),
        refresh_count: i64_to_u64(row.try_get(19).map_err(get)?),
        last_refreshed_at: row
            .try_get::<_, Option<i64>>(20)
            .map_err(get)?
            .map(from_millis),
        resume_count: i64_to_u64(row.try_get(21).map_err(get)?),
        standing: Standing {
            issuer: row.try_get(23).map_err(get)?,
            sub: row.try_get(24).map_err(get)?,
            session_id: row.try_get(25).map_err(get)?,
            on_logout,
            permission_source: row.try_get(27).map_err(get)?,
            permissions_checked_at: row
                .try_get::<_, Option<i64>>(28)
                .map_err(get)?
                .map(from_millis),
        },
        version: row.try_get(22).map_err(get)?,
    })
}

fn event_from_row(row: &Row) -> Result<LeaseEvent, StoreError> {
    let get = |e: tokio_postgres::Error| StoreError::Corrupt(e.to_string());
    let kind: String = row.try_get(6).map_err(get)?;
    let reason: Option<String> = row.try_get(7).map_err(get)?;
    Ok(LeaseEvent {
        sequence: i64_to_u64(row.try_get(0).map_err(get)?),
        lease_id: row.try_get(1).map_err(get)?,
        tenant: row.try_get(2).map_err(get)?,
        subject: row.try_get(3).map_err(get)?,
        actor: row.try_get(4).map_err(get)?,
        job_id: row.try_get(5).map_err(get)?,
        kind: EventKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown event kind {kind:?}")))?,
        reason: match reason {
            None => None,
            Some(r) => Some(
                EndReason::parse(&r)
                    .ok_or_else(|| StoreError::Corrupt(format!("unknown end reason {r:?}")))?,
            ),
        },
        at: from_millis(row.try_get(8).map_err(get)?),
        by: row.try_get(9).map_err(get)?,
        detail: row.try_get(10).map_err(get)?,
        tokens_valid_until: row
            .try_get::<_, Option<i64>>(11)
            .map_err(get)?
            .map(from_millis),
    })
}

fn key_from_row(row: &Row) -> Result<StoredKey, StoreError> {
    let get = |e: tokio_postgres::Error| StoreError::Corrupt(e.to_string());
    Ok(StoredKey {
        kid: row.try_get(0).map_err(get)?,
        algorithm: row.try_get(1).map_err(get)?,
        public_key: row.try_get(2).map_err(get)?,
        sealed_private_key: row.try_get(3).map_err(get)?,
        created_at: from_millis(row.try_get(4).map_err(get)?),
        activates_at: from_millis(row.try_get(5).map_err(get)?),
        retired_at: row
            .try_get::<_, Option<i64>>(6)
            .map_err(get)?
            .map(from_millis),
    })
}

const UPDATE_LEASE: &str = "UPDATE leases SET last_active_at = $1, deadline = $2, active = $3, \
    end_reason = $4, ended_at = $5, ended_by = $6, end_detail = $7, generation = $8, seed = $9, \
    rotated_at = $10, refresh_count = $11, last_refreshed_at = $12, resume_count = $13, \
    permissions = $16, permissions_checked_at = $17, version = version + 1 \
    WHERE id = $14 AND version = $15";

async fn insert_event(
    tx: &deadpool_postgres::Transaction<'_>,
    e: &LeaseEvent,
) -> Result<(), StoreError> {
    // Serialise event writers until commit: sequence order is then commit order.
    let lock = tx
        .prepare_cached("SELECT pg_advisory_xact_lock($1)")
        .await
        .map_err(db_err)?;
    tx.execute(&lock, &[&EVENT_LOCK]).await.map_err(db_err)?;
    let insert = tx
        .prepare_cached(
            "INSERT INTO lease_events (lease_id, tenant, subject, actor, job_id, kind, reason, \
             at, by_whom, detail, tokens_valid_until) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .await
        .map_err(db_err)?;
    tx.execute(
        &insert,
        &[
            &e.lease_id,
            &e.tenant,
            &e.subject,
            &e.actor,
            &e.job_id,
            &e.kind.as_str(),
            &e.reason.map(EndReason::as_str),
            &to_millis(e.at),
            &e.by,
            &e.detail,
            &e.tokens_valid_until.map(to_millis),
        ],
    )
    .await
    .map_err(db_err)?;
    if e.kind == EventKind::Ended {
        // Delivered to every listening replica when the transaction commits.
        tx.execute(&format!("NOTIFY {}", listen::CHANNEL), &[])
            .await
            .map_err(db_err)?;
    }
    Ok(())
}

impl PostgresStore {
    /// Connects, creates the schema if needed, applies migrations (once, even when
    /// replicas start together) and starts listening for lease ends.
    pub async fn connect(options: &PostgresOptions) -> Result<Self, StoreError> {
        let (config, tls, target) = pg_config(options)?;
        let opened = |e: StoreError| open_err(&target, e);
        // The schema must exist before pooled connections use it as search_path.
        {
            let mut bootstrap = config.clone();
            bootstrap.options(QUIET);
            let (client, connection) = bootstrap
                .connect(tls.clone())
                .await
                .map_err(|e| opened(db_err(e)))?;
            let driver = tokio::spawn(connection);
            client
                .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {}", options.schema))
                .await
                .or_else(|e| {
                    // Two replicas racing to create it: the loser sees a unique violation.
                    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
                        Ok(())
                    } else {
                        Err(opened(db_err(e)))
                    }
                })?;
            drop(client);
            let _ = driver.await;
        }
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.max_connections)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.statement_timeout))
            .create_timeout(Some(options.statement_timeout))
            .recycle_timeout(Some(options.statement_timeout))
            .build()
            .map_err(|e| opened(StoreError::Database(Box::new(e))))?;
        schema::migrate(&pool).await.map_err(opened)?;
        let (tx, ends) = watch::channel(0);
        tokio::spawn(listen::listen(config, tls, tx));
        // Waiting for a pooled connection, then the statement: each bounded by the
        // statement timeout.
        let batch_timeout = options.statement_timeout * 2;
        let batches = BatchHook::default();
        let reads = {
            let pool = pool.clone();
            let kind = ("postgres_lease_reads", batches.clone());
            Batcher::spawn(
                MAX_BATCH,
                PARALLEL_BATCHES,
                batch_timeout,
                kind,
                move |ids| read_leases(pool.clone(), ids),
            )
        };
        let renewals = {
            let pool = pool.clone();
            let kind = ("postgres_lease_writes", batches.clone());
            Batcher::spawn(
                MAX_BATCH,
                PARALLEL_BATCHES,
                batch_timeout,
                kind,
                move |leases| write_leases(pool.clone(), leases),
            )
        };
        Ok(Self {
            pool,
            ends,
            reads,
            renewals,
            batches,
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_err)
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn observe_batches(&self, observer: BatchObserver) {
        self.batches.set(observer);
    }

    fn pool_status(&self) -> Option<PoolStatus> {
        let status = self.pool.status();
        Some(PoolStatus {
            max: status.max_size,
            open: status.size,
            idle: status.available,
            waiting: status.waiting,
        })
    }

    async fn insert_lease(&self, lease: &Lease, event: &LeaseEvent) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let permissions = serde_json::to_string(&lease.permissions)
            .map_err(|e| StoreError::Database(Box::new(e)))?;
        let tx = client.transaction().await.map_err(db_err)?;
        let end = lease.end.as_ref();
        let insert = tx
            .prepare_cached(&format!(
                "INSERT INTO leases ({LEASE_COLUMNS}, deadline) VALUES ($1, $2, $3, $4, $5, $6, \
                 $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, \
                 $23, $24, $25, $26, $27, $28, $29, $30)"
            ))
            .await
            .map_err(db_err)?;
        tx.execute(
            &insert,
            &[
                &lease.id,
                &lease.tenant,
                &lease.subject,
                &lease.actor,
                &lease.job_id,
                &permissions,
                &lease.audience,
                &to_millis(lease.created_at),
                &to_millis(lease.expires_at),
                &i64::try_from(lease.idle_timeout.as_millis()).unwrap_or(i64::MAX),
                &to_millis(lease.last_active_at),
                &lease.is_active(),
                &end.map(|e| e.reason.as_str()),
                &end.map(|e| to_millis(e.at)),
                &end.map(|e| e.by.as_str()),
                &end.map(|e| e.detail.as_str()),
                &u64_to_i64(lease.generation),
                &lease.seed,
                &to_millis(lease.rotated_at),
                &u64_to_i64(lease.refresh_count),
                &lease.last_refreshed_at.map(to_millis),
                &u64_to_i64(lease.resume_count),
                &lease.version,
                &lease.standing.issuer,
                &lease.standing.sub,
                &lease.standing.session_id,
                &lease.standing.on_logout.as_str(),
                &lease.standing.permission_source,
                &lease.standing.permissions_checked_at.map(to_millis),
                &to_millis(lease.deadline()),
            ],
        )
        .await
        .map_err(db_err)?;
        insert_event(&tx, event).await?;
        tx.commit().await.map_err(db_err)
    }

    async fn get_lease(&self, id: &str) -> Result<Option<Lease>, StoreError> {
        self.reads.call(id.to_owned()).await
    }

    async fn find_active_lease(
        &self,
        tenant: &str,
        actor: &str,
        job_id: &str,
    ) -> Result<Option<Lease>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT {LEASE_COLUMNS} FROM leases \
                     WHERE tenant = $1 AND actor = $2 AND job_id = $3 AND active"
                ),
                &[&tenant, &actor, &job_id],
            )
            .await
            .map_err(db_err)?;
        row.as_ref().map(lease_from_row).transpose()
    }

    async fn update_lease(
        &self,
        lease: &Lease,
        event: Option<&LeaseEvent>,
    ) -> Result<bool, StoreError> {
        let Some(event) = event else {
            // A renewal writes no event: it joins the next batched compare-and-set.
            return self.renewals.call(lease.clone()).await;
        };
        let mut client = self.client().await?;
        let end = lease.end.as_ref();
        let permissions = serde_json::to_string(&lease.permissions)
            .map_err(|e| StoreError::Database(Box::new(e)))?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 17] = [
            &to_millis(lease.last_active_at),
            &to_millis(lease.deadline()),
            &lease.is_active(),
            &end.map(|e| e.reason.as_str()),
            &end.map(|e| to_millis(e.at)),
            &end.map(|e| e.by.as_str()),
            &end.map(|e| e.detail.as_str()),
            &u64_to_i64(lease.generation),
            &lease.seed,
            &to_millis(lease.rotated_at),
            &u64_to_i64(lease.refresh_count),
            &lease.last_refreshed_at.map(to_millis),
            &u64_to_i64(lease.resume_count),
            &lease.id,
            &lease.version,
            &permissions,
            &lease.standing.permissions_checked_at.map(to_millis),
        ];
        let tx = client.transaction().await.map_err(db_err)?;
        let update = tx.prepare_cached(UPDATE_LEASE).await.map_err(db_err)?;
        if tx.execute(&update, &params).await.map_err(db_err)? == 0 {
            return Ok(false);
        }
        insert_event(&tx, event).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(true)
    }

    async fn list_leases(
        &self,
        filter: &LeaseFilter,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        let mut sql = format!("SELECT {LEASE_COLUMNS} FROM leases WHERE TRUE");
        let mut args: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> = Vec::new();
        for (column, value) in [
            ("tenant", &filter.tenant),
            ("subject", &filter.subject),
            ("actor", &filter.actor),
            ("job_id", &filter.job_id),
        ] {
            if let Some(v) = value {
                args.push(Box::new(v.clone()));
                sql.push_str(&format!(" AND {column} = ${}", args.len()));
            }
        }
        if let Some(active) = filter.active {
            args.push(Box::new(active));
            sql.push_str(&format!(" AND active = ${}", args.len()));
        }
        if let Some((created, id)) = &filter.after {
            args.push(Box::new(to_millis(*created)));
            let c = args.len();
            args.push(Box::new(id.clone()));
            let i = args.len();
            sql.push_str(&format!(
                " AND (created_at < ${c} OR (created_at = ${c} AND id < ${i}))"
            ));
        }
        args.push(Box::new(i64::try_from(limit).unwrap_or(i64::MAX)));
        sql.push_str(&format!(
            " ORDER BY created_at DESC, id DESC LIMIT ${}",
            args.len()
        ));
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = args
            .iter()
            .map(|a| a.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let client = self.client().await?;
        let rows = client.query(&sql, &params).await.map_err(db_err)?;
        rows.iter().map(lease_from_row).collect()
    }

    async fn lease_events(&self, lease_id: &str) -> Result<Vec<LeaseEvent>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM lease_events WHERE lease_id = $1 ORDER BY seq"
                ),
                &[&lease_id],
            )
            .await
            .map_err(db_err)?;
        rows.iter().map(event_from_row).collect()
    }

    async fn end_events_after(
        &self,
        cursor: u64,
        limit: usize,
    ) -> Result<Vec<LeaseEvent>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM lease_events WHERE kind = 'ended' AND seq > $1 \
                     ORDER BY seq LIMIT $2"
                ),
                &[
                    &u64_to_i64(cursor),
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(db_err)?;
        rows.iter().map(event_from_row).collect()
    }

    async fn earliest_live_end(&self, now: SystemTime) -> Result<Option<u64>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT MIN(seq) FROM lease_events WHERE kind = 'ended' \
                 AND tokens_valid_until > $1",
                &[&to_millis(now)],
            )
            .await
            .map_err(db_err)?;
        Ok(row.get::<_, Option<i64>>(0).map(i64_to_u64))
    }

    async fn last_event_sequence(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT COALESCE(MAX(seq), 0) FROM lease_events", &[])
            .await
            .map_err(db_err)?;
        Ok(i64_to_u64(row.get(0)))
    }

    async fn leases_due(&self, now: SystemTime, limit: usize) -> Result<Vec<Lease>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {LEASE_COLUMNS} FROM leases WHERE active AND deadline <= $1 \
                     ORDER BY deadline LIMIT $2"
                ),
                &[&to_millis(now), &i64::try_from(limit).unwrap_or(i64::MAX)],
            )
            .await
            .map_err(db_err)?;
        rows.iter().map(lease_from_row).collect()
    }

    async fn leases_to_log_out(
        &self,
        logout: &Logout,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {LEASE_COLUMNS} FROM leases \
                     WHERE active AND on_logout = 'end' AND issuer = $1 AND \
                     (($2::text IS NOT NULL AND session_id = $2) OR \
                      ($3::text IS NOT NULL AND subject_sub = $3 \
                       AND ($2::text IS NULL OR session_id IS NULL))) \
                     LIMIT $4"
                ),
                &[
                    &logout.issuer,
                    &logout.session_id,
                    &logout.sub,
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(db_err)?;
        rows.iter().map(lease_from_row).collect()
    }

    async fn count_active_leases(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT COUNT(*) FROM leases WHERE active", &[])
            .await
            .map_err(db_err)?;
        Ok(i64_to_u64(row.get(0)))
    }

    async fn signing_keys(&self) -> Result<Vec<StoredKey>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT kid, algorithm, public_key, sealed_private_key, created_at, activates_at, \
                 retired_at FROM signing_keys ORDER BY created_at DESC, kid DESC",
                &[],
            )
            .await
            .map_err(db_err)?;
        rows.iter().map(key_from_row).collect()
    }

    async fn rotate_signing_key(
        &self,
        new: &StoredKey,
        expected_current: Option<&str>,
    ) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&KEY_LOCK])
            .await
            .map_err(db_err)?;
        let current: Option<String> = tx
            .query_opt("SELECT kid FROM signing_keys WHERE retired_at IS NULL", &[])
            .await
            .map_err(db_err)?
            .map(|r| r.get(0));
        if current.as_deref() != expected_current {
            return Ok(false);
        }
        tx.execute(
            "UPDATE signing_keys SET retired_at = $1 WHERE retired_at IS NULL",
            &[&to_millis(new.activates_at)],
        )
        .await
        .map_err(db_err)?;
        tx.execute(
            "INSERT INTO signing_keys (kid, algorithm, public_key, sealed_private_key, \
             created_at, activates_at, retired_at) VALUES ($1, $2, $3, $4, $5, $6, NULL)",
            &[
                &new.kid,
                &new.algorithm,
                &new.public_key,
                &new.sealed_private_key,
                &to_millis(new.created_at),
                &to_millis(new.activates_at),
            ],
        )
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(true)
    }

    async fn purge_ended(&self, before: SystemTime, limit: usize) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        // SKIP LOCKED: replicas cleaning at once take disjoint batches instead of waiting.
        let ids: Vec<String> = tx
            .query(
                "SELECT id FROM leases WHERE NOT active AND ended_at < $1 \
                 LIMIT $2 FOR UPDATE SKIP LOCKED",
                &[
                    &to_millis(before),
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(db_err)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !ids.is_empty() {
            tx.execute("DELETE FROM lease_events WHERE lease_id = ANY($1)", &[&ids])
                .await
                .map_err(db_err)?;
            tx.execute("DELETE FROM leases WHERE id = ANY($1)", &[&ids])
                .await
                .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)?;
        Ok(ids.len())
    }

    fn remote_ends(&self) -> Option<watch::Receiver<u64>> {
        Some(self.ends.clone())
    }
}
