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
use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::BytesMut;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::watch;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{IsNull, ToSql, Type};

use super::filter;
use super::row::{self, Placeholder, Statements, Value, i64_to_u64, u64_to_i64};
use super::{
    BatchHook, BatchObserver, LeaseFilter, Logout, PoolStatus, Retire, Store, StoreError, StoreOps,
    StoredKey,
};
use crate::clock::to_millis;
use crate::lease::{EventKind, Lease, LeaseEvent};
use batch::{Batcher, MAX_BATCH, PARALLEL_BATCHES, read_leases, write_leases};
use tls::MakeRustls;

/// Lock key serialising event inserts, so sequence order is commit order.
const EVENT_LOCK: i64 = 0x6a6f_6274_6f6b_0002;
/// Lock key serialising key rotations.
const KEY_LOCK: i64 = 0x6a6f_6274_6f6b_0003;
/// Connection option that keeps NOTICEs off the wire.
const QUIET: &str = "-c client_min_messages=warning";

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
    renewals: Batcher<Lease, Option<i64>>,
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

/// This store's statements generated from the column lists.
static SQL: LazyLock<Statements> = LazyLock::new(|| Statements::new(Placeholder::Dollar));

row::impl_columns!(Row, try_get, corrupt);

fn corrupt(e: tokio_postgres::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

impl ToSql for Value {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, ToSqlError> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Text(v) => v.to_sql(ty, out),
            Value::Int(v) => v.to_sql(ty, out),
            Value::Bool(v) => v.to_sql(ty, out),
            Value::Bytes(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        String::accepts(ty) || i64::accepts(ty) || bool::accepts(ty) || Vec::<u8>::accepts(ty)
    }

    /// Checks the type the value's own variant accepts (a `NULL` fits any column).
    fn to_sql_checked(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, ToSqlError> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Text(v) => v.to_sql_checked(ty, out),
            Value::Int(v) => v.to_sql_checked(ty, out),
            Value::Bool(v) => v.to_sql_checked(ty, out),
            Value::Bytes(v) => v.to_sql_checked(ty, out),
        }
    }
}

type ToSqlError = Box<dyn std::error::Error + Sync + Send>;

/// `values` as the driver's statement parameters.
fn params(values: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    values.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

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
    let insert = tx.prepare_cached(&SQL.insert_event).await.map_err(db_err)?;
    tx.execute(&insert, &params(&row::event_values(e)))
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

impl StoreOps for PostgresStore {
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

    fn remote_ends(&self) -> Option<watch::Receiver<u64>> {
        Some(self.ends.clone())
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn insert_lease(&self, lease: &Lease, event: &LeaseEvent) -> Result<(), StoreError> {
        let values = row::lease_values(lease)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        let insert = tx.prepare_cached(&SQL.insert_lease).await.map_err(db_err)?;
        tx.execute(&insert, &params(&values))
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
        let sql = format!(
            "SELECT {} FROM leases WHERE tenant = $1 AND actor = $2 AND job_id = $3 AND active",
            row::lease_columns()
        );
        let row = client
            .query_opt(&sql, &[&tenant, &actor, &job_id])
            .await
            .map_err(db_err)?;
        row.as_ref().map(row::lease_from).transpose()
    }

    async fn update_lease(
        &self,
        lease: &Lease,
        event: Option<&LeaseEvent>,
    ) -> Result<Option<i64>, StoreError> {
        let Some(event) = event else {
            // A renewal writes no event: it joins the next batched compare-and-set.
            return self.renewals.call(lease.clone()).await;
        };
        let values = row::update_values(lease)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        let update = tx.prepare_cached(&SQL.update_lease).await.map_err(db_err)?;
        if tx
            .execute(&update, &params(&values))
            .await
            .map_err(db_err)?
            == 0
        {
            return Ok(None);
        }
        insert_event(&tx, event).await?;
        tx.commit().await.map_err(db_err)?;
        // What the update set, the stored version having been the lease's.
        Ok(Some(lease.version + 1))
    }

    async fn list_leases(
        &self,
        filter: &LeaseFilter,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        let (sql, args) = filter::list_leases(filter, limit, Placeholder::Dollar);
        let client = self.client().await?;
        let rows = client.query(&sql, &params(&args)).await.map_err(db_err)?;
        rows.iter().map(row::lease_from).collect()
    }

    async fn lease_events(&self, lease_id: &str) -> Result<Vec<LeaseEvent>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {} FROM lease_events WHERE lease_id = $1 ORDER BY seq",
                    row::event_columns()
                ),
                &[&lease_id],
            )
            .await
            .map_err(db_err)?;
        rows.iter().map(row::event_from).collect()
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
                    "SELECT {} FROM lease_events WHERE kind = 'ended' AND seq > $1 \
                     ORDER BY seq LIMIT $2",
                    row::event_columns()
                ),
                &[&u64_to_i64(cursor), &row::limit(limit)],
            )
            .await
            .map_err(db_err)?;
        rows.iter().map(row::event_from).collect()
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
                    "SELECT {} FROM leases WHERE active AND deadline <= $1 \
                     ORDER BY deadline LIMIT $2",
                    row::lease_columns()
                ),
                &[&to_millis(now), &row::limit(limit)],
            )
            .await
            .map_err(db_err)?;
        rows.iter().map(row::lease_from).collect()
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
                    "SELECT {} FROM leases \
                     WHERE active AND on_logout = 'end' AND issuer = $1 AND \
                     (($2::text IS NOT NULL AND session_id = $2) OR \
                      ($3::text IS NOT NULL AND subject_sub = $3 \
                       AND ($2::text IS NULL OR session_id IS NULL))) \
                     LIMIT $4",
                    row::lease_columns()
                ),
                &[
                    &logout.issuer,
                    &logout.session_id,
                    &logout.sub,
                    &row::limit(limit),
                ],
            )
            .await
            .map_err(db_err)?;
        rows.iter().map(row::lease_from).collect()
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
                &format!(
                    "SELECT {} FROM signing_keys ORDER BY created_at DESC, kid DESC",
                    row::key_columns()
                ),
                &[],
            )
            .await
            .map_err(db_err)?;
        rows.iter().map(row::key_from).collect()
    }

    async fn rotate_signing_key(
        &self,
        new: &StoredKey,
        retire: Option<Retire<'_>>,
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
        if current.as_deref() != retire.map(|r| r.kid) {
            return Ok(false);
        }
        if let Some(retire) = retire {
            tx.execute(
                "UPDATE signing_keys SET retired_at = $1 WHERE kid = $2",
                &[&to_millis(retire.at), &retire.kid],
            )
            .await
            .map_err(db_err)?;
        }
        let new = row::key_values(&StoredKey {
            retired_at: None,
            ..new.clone()
        });
        tx.execute(&SQL.insert_key, &params(&new))
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
                &[&to_millis(before), &row::limit(limit)],
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
}
