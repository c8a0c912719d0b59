//! The SQLite schema: its migrations, applied in order at open.

use rusqlite::Connection;

use super::map_err;
use crate::store::StoreError;

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
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
"#,
    // A lease is identified by (tenant, module, job): the same job id in two tenants is
    // two jobs.
    r#"
DROP INDEX leases_active_job;
CREATE UNIQUE INDEX leases_active_job ON leases (tenant, actor, job_id) WHERE active = 1;
"#,
    // The user's standing: who they are at their identity provider (for back-channel
    // logout) and where their permissions are re-checked.
    r#"
ALTER TABLE leases ADD COLUMN issuer TEXT NOT NULL DEFAULT '';
ALTER TABLE leases ADD COLUMN subject_sub TEXT;
ALTER TABLE leases ADD COLUMN session_id TEXT;
ALTER TABLE leases ADD COLUMN on_logout TEXT NOT NULL DEFAULT 'survive';
ALTER TABLE leases ADD COLUMN permission_source TEXT;
ALTER TABLE leases ADD COLUMN permissions_checked_at INTEGER;
CREATE INDEX leases_logout_session ON leases (issuer, session_id) WHERE active = 1 AND on_logout = 'end';
CREATE INDEX leases_logout_user ON leases (issuer, subject_sub) WHERE active = 1 AND on_logout = 'end';
"#,
];

pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
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
