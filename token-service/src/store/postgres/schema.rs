//! The PostgreSQL schema: its migrations, applied once under an advisory lock.

use deadpool_postgres::Pool;

use super::{db_err, i64_to_u64, pool_err};
use crate::store::StoreError;

/// Lock key for migrations (arbitrary, fixed).
const MIGRATION_LOCK: i64 = 0x6a6f_6274_6f6b_0001;

pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE leases (
    id                TEXT PRIMARY KEY,
    tenant            TEXT NOT NULL,
    subject           TEXT NOT NULL,
    actor             TEXT NOT NULL,
    job_id            TEXT NOT NULL,
    permissions       TEXT NOT NULL,
    audience          TEXT NOT NULL,
    created_at        BIGINT NOT NULL,
    expires_at        BIGINT NOT NULL,
    idle_timeout_ms   BIGINT NOT NULL,
    last_active_at    BIGINT NOT NULL,
    deadline          BIGINT NOT NULL,
    active            BOOLEAN NOT NULL,
    end_reason        TEXT,
    ended_at          BIGINT,
    ended_by          TEXT,
    end_detail        TEXT,
    generation        BIGINT NOT NULL,
    seed              BYTEA NOT NULL,
    rotated_at        BIGINT NOT NULL,
    refresh_count     BIGINT NOT NULL,
    last_refreshed_at BIGINT,
    resume_count      BIGINT NOT NULL,
    version           BIGINT NOT NULL
);
CREATE UNIQUE INDEX leases_active_job ON leases (actor, job_id) WHERE active;
CREATE INDEX leases_due ON leases (deadline) WHERE active;
CREATE INDEX leases_created ON leases (created_at DESC, id DESC);
CREATE INDEX leases_subject ON leases (tenant, subject);
CREATE INDEX leases_ended_at ON leases (ended_at) WHERE NOT active;
CREATE TABLE lease_events (
    seq                BIGSERIAL PRIMARY KEY,
    lease_id           TEXT NOT NULL,
    tenant             TEXT NOT NULL,
    subject            TEXT NOT NULL,
    actor              TEXT NOT NULL,
    job_id             TEXT NOT NULL,
    kind               TEXT NOT NULL,
    reason             TEXT,
    at                 BIGINT NOT NULL,
    by_whom            TEXT NOT NULL,
    detail             TEXT NOT NULL,
    tokens_valid_until BIGINT
);
CREATE INDEX lease_events_lease ON lease_events (lease_id, seq);
CREATE INDEX lease_events_ended ON lease_events (seq) WHERE kind = 'ended';
CREATE TABLE signing_keys (
    kid                TEXT PRIMARY KEY,
    algorithm          TEXT NOT NULL,
    public_key         BYTEA NOT NULL,
    sealed_private_key BYTEA NOT NULL,
    created_at         BIGINT NOT NULL,
    activates_at       BIGINT NOT NULL,
    retired_at         BIGINT
);
"#,
    // A lease is identified by (tenant, module, job): the same job id in two tenants is
    // two jobs.
    r#"
DROP INDEX leases_active_job;
CREATE UNIQUE INDEX leases_active_job ON leases (tenant, actor, job_id) WHERE active;
"#,
    // The user's standing: who they are at their identity provider (for back-channel
    // logout) and where their permissions are re-checked.
    r#"
ALTER TABLE leases ADD COLUMN issuer TEXT NOT NULL DEFAULT '';
ALTER TABLE leases ADD COLUMN subject_sub TEXT;
ALTER TABLE leases ADD COLUMN session_id TEXT;
ALTER TABLE leases ADD COLUMN on_logout TEXT NOT NULL DEFAULT 'survive';
ALTER TABLE leases ADD COLUMN permission_source TEXT;
ALTER TABLE leases ADD COLUMN permissions_checked_at BIGINT;
CREATE INDEX leases_logout_session ON leases (issuer, session_id) WHERE active AND on_logout = 'end';
CREATE INDEX leases_logout_user ON leases (issuer, subject_sub) WHERE active AND on_logout = 'end';
"#,
];

pub(super) async fn migrate(pool: &Pool) -> Result<(), StoreError> {
    let mut client = pool.get().await.map_err(pool_err)?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db_err)?;
    let result = async {
        client
            .batch_execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INT PRIMARY KEY)")
            .await
            .map_err(db_err)?;
        let done: i64 = client
            .query_one("SELECT COUNT(*) FROM schema_migrations", &[])
            .await
            .map_err(db_err)?
            .get(0);
        for (i, sql) in MIGRATIONS
            .iter()
            .enumerate()
            .skip(i64_to_u64(done) as usize)
        {
            let tx = client.transaction().await.map_err(db_err)?;
            tx.batch_execute(sql).await.map_err(db_err)?;
            let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
            tx.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[&version],
            )
            .await
            .map_err(db_err)?;
            tx.commit().await.map_err(db_err)?;
        }
        Ok(())
    }
    .await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db_err)?;
    result
}
