//! The one mapping between leases, events and keys and the columns of their tables,
//! used by both stores.
//!
//! The two schemas have the same columns with compatible types: text, 64-bit integers
//! (instants as Unix milliseconds, durations as milliseconds, counters), booleans
//! (SQLite's 0/1) and bytes. A store reads a row through [`Columns`], which it
//! implements for its driver's row, and binds the [`Value`]s made here, which it converts
//! to its driver's parameters. Columns are read and written in the order of their list
//! ([`LEASE`], [`EVENT`], [`KEY`]); each read and write names its column, checked in
//! debug builds, and the round-trip tests below check both directions.
//!
//! Adding a lease column touches three places: the [`Lease`] struct, this file (the
//! column in [`LEASE`], its read in [`lease_from`] and its value in [`lease_values`]),
//! and one migration per store (`sqlite/schema.rs`, `postgres/schema.rs`). A column
//! marked `updated` is also written by every compare-and-set, batched or not.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use super::{StoreError, StoredKey};
use crate::clock::{from_millis, to_millis};
use crate::lease::{EndReason, EventKind, Lease, LeaseEnd, LeaseEvent, OnLogout, Standing};

/// What a column holds, in both schemas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `TEXT`.
    Text,
    /// `INTEGER` (SQLite), `BIGINT` (PostgreSQL).
    Int,
    /// `INTEGER` 0/1 (SQLite), `BOOLEAN` (PostgreSQL).
    Bool,
    /// `BLOB` (SQLite), `BYTEA` (PostgreSQL).
    Bytes,
}

/// One column of a table.
#[derive(Debug)]
pub(crate) struct Column {
    /// Its name.
    pub(crate) name: &'static str,
    /// What it holds.
    pub(crate) kind: Kind,
    /// Whether a lease update writes it (`false`: fixed when the lease is granted).
    pub(crate) updated: bool,
}

const fn fixed(name: &'static str, kind: Kind) -> Column {
    Column {
        name,
        kind,
        updated: false,
    }
}

const fn updated(name: &'static str, kind: Kind) -> Column {
    Column {
        name,
        kind,
        updated: true,
    }
}

/// The columns of `leases`, in the order a lease is read and written. `deadline` is
/// derived ([`Lease::deadline`]), kept for the index that finds leases due; it is
/// written, never read back. `version` is bumped by the update itself.
pub(crate) const LEASE: [Column; 30] = [
    fixed("id", Kind::Text),
    fixed("tenant", Kind::Text),
    fixed("subject", Kind::Text),
    fixed("actor", Kind::Text),
    fixed("job_id", Kind::Text),
    updated("permissions", Kind::Text),
    fixed("audience", Kind::Text),
    fixed("created_at", Kind::Int),
    fixed("expires_at", Kind::Int),
    fixed("idle_timeout_ms", Kind::Int),
    updated("last_active_at", Kind::Int),
    updated("active", Kind::Bool),
    updated("end_reason", Kind::Text),
    updated("ended_at", Kind::Int),
    updated("ended_by", Kind::Text),
    updated("end_detail", Kind::Text),
    updated("generation", Kind::Int),
    updated("seed", Kind::Bytes),
    updated("rotated_at", Kind::Int),
    updated("refresh_count", Kind::Int),
    updated("last_refreshed_at", Kind::Int),
    updated("resume_count", Kind::Int),
    fixed("issuer", Kind::Text),
    fixed("subject_sub", Kind::Text),
    fixed("session_id", Kind::Text),
    fixed("on_logout", Kind::Text),
    fixed("permission_source", Kind::Text),
    updated("permissions_checked_at", Kind::Int),
    fixed("version", Kind::Int),
    updated("deadline", Kind::Int),
];

/// The columns of `lease_events`. `seq` is assigned by the database on insert.
pub(crate) const EVENT: [Column; 12] = [
    fixed("seq", Kind::Int),
    fixed("lease_id", Kind::Text),
    fixed("tenant", Kind::Text),
    fixed("subject", Kind::Text),
    fixed("actor", Kind::Text),
    fixed("job_id", Kind::Text),
    fixed("kind", Kind::Text),
    fixed("reason", Kind::Text),
    fixed("at", Kind::Int),
    fixed("by_whom", Kind::Text),
    fixed("detail", Kind::Text),
    fixed("tokens_valid_until", Kind::Int),
];

/// The columns of `signing_keys`.
pub(crate) const KEY: [Column; 7] = [
    fixed("kid", Kind::Text),
    fixed("algorithm", Kind::Text),
    fixed("public_key", Kind::Bytes),
    fixed("sealed_private_key", Kind::Bytes),
    fixed("created_at", Kind::Int),
    fixed("activates_at", Kind::Int),
    updated("retired_at", Kind::Int),
];

/// `id, tenant, …`: the select list of a lease.
pub(crate) fn lease_columns() -> &'static str {
    static LIST: LazyLock<String> = LazyLock::new(|| names(&LEASE));
    &LIST
}

/// The select list of an event.
pub(crate) fn event_columns() -> &'static str {
    static LIST: LazyLock<String> = LazyLock::new(|| names(&EVENT));
    &LIST
}

/// The select list of a key.
pub(crate) fn key_columns() -> &'static str {
    static LIST: LazyLock<String> = LazyLock::new(|| names(&KEY));
    &LIST
}

fn names(columns: &[Column]) -> String {
    let names: Vec<&str> = columns.iter().map(|c| c.name).collect();
    names.join(", ")
}

/// How a store's SQL numbers its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placeholder {
    /// `?1, ?2, …` (SQLite).
    Question,
    /// `$1, $2, …` (PostgreSQL).
    Dollar,
}

impl Placeholder {
    /// The `n`th parameter (from 1).
    pub(crate) fn at(self, n: usize) -> String {
        match self {
            Placeholder::Question => format!("?{n}"),
            Placeholder::Dollar => format!("${n}"),
        }
    }
}

/// A store's statements that are generated from the column lists, built once.
#[derive(Debug)]
pub(crate) struct Statements {
    /// `INSERT INTO leases …`, for the values of [`lease_values`].
    pub(crate) insert_lease: String,
    /// `INSERT INTO lease_events …`, for the values of [`event_values`].
    pub(crate) insert_event: String,
    /// `INSERT INTO signing_keys …`, for the values of [`key_values`].
    pub(crate) insert_key: String,
    /// The compare-and-set of one lease, for the values of [`update_values`]: writes
    /// the updated columns and bumps the version if the stored version is still the
    /// given one.
    pub(crate) update_lease: String,
}

impl Statements {
    /// The statements with parameters numbered in style `p`.
    pub(crate) fn new(p: Placeholder) -> Self {
        Self {
            insert_lease: insert_sql("leases", &LEASE, p),
            insert_event: insert_sql("lease_events", &EVENT[1..], p),
            insert_key: insert_sql("signing_keys", &KEY, p),
            update_lease: update_lease_sql(p),
        }
    }
}

fn insert_sql(table: &str, columns: &[Column], p: Placeholder) -> String {
    let values: Vec<String> = (1..=columns.len()).map(|n| p.at(n)).collect();
    format!(
        "INSERT INTO {table} ({}) VALUES ({})",
        names(columns),
        values.join(", ")
    )
}

fn update_lease_sql(p: Placeholder) -> String {
    let mut set: Vec<String> = updated_columns()
        .enumerate()
        .map(|(i, c)| format!("{} = {}", c.name, p.at(i + 1)))
        .collect();
    set.push("version = version + 1".into());
    let n = set.len();
    format!(
        "UPDATE leases SET {} WHERE id = {} AND version = {}",
        set.join(", "),
        p.at(n),
        p.at(n + 1)
    )
}

/// The lease columns an update writes, in order.
pub(crate) fn updated_columns() -> impl Iterator<Item = &'static Column> {
    LEASE.iter().filter(|c| c.updated)
}

/// A value for one column, to be converted to the driver's parameter type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    /// SQL `NULL`.
    Null,
    /// A text.
    Text(String),
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// Bytes.
    Bytes(Vec<u8>),
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}

impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Bytes(v)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// Values written in the order of a column list, each naming its column.
struct Values {
    columns: &'static [Column],
    values: Vec<Value>,
}

impl Values {
    fn new(columns: &'static [Column]) -> Self {
        Self {
            columns,
            values: Vec::with_capacity(columns.len()),
        }
    }

    fn put(&mut self, name: &str, value: impl Into<Value>) -> &mut Self {
        debug_assert_eq!(self.columns[self.values.len()].name, name);
        self.values.push(value.into());
        self
    }

    fn done(&mut self) -> Vec<Value> {
        debug_assert_eq!(self.values.len(), self.columns.len());
        std::mem::take(&mut self.values)
    }
}

/// The lease's value for each column of [`LEASE`], in order.
pub(crate) fn lease_values(lease: &Lease) -> Result<Vec<Value>, StoreError> {
    let permissions =
        serde_json::to_string(&lease.permissions).map_err(|e| StoreError::Database(Box::new(e)))?;
    let end = lease.end.as_ref();
    let s = &lease.standing;
    Ok(Values::new(&LEASE)
        .put("id", lease.id.as_str())
        .put("tenant", lease.tenant.as_str())
        .put("subject", lease.subject.as_str())
        .put("actor", lease.actor.as_str())
        .put("job_id", lease.job_id.as_str())
        .put("permissions", permissions)
        .put("audience", lease.audience.as_str())
        .put("created_at", to_millis(lease.created_at))
        .put("expires_at", to_millis(lease.expires_at))
        .put("idle_timeout_ms", millis(lease.idle_timeout))
        .put("last_active_at", to_millis(lease.last_active_at))
        .put("active", lease.is_active())
        .put("end_reason", end.map(|e| e.reason.as_str()))
        .put("ended_at", end.map(|e| to_millis(e.at)))
        .put("ended_by", end.map(|e| e.by.as_str()))
        .put("end_detail", end.map(|e| e.detail.as_str()))
        .put("generation", u64_to_i64(lease.generation))
        .put("seed", lease.seed.clone())
        .put("rotated_at", to_millis(lease.rotated_at))
        .put("refresh_count", u64_to_i64(lease.refresh_count))
        .put("last_refreshed_at", lease.last_refreshed_at.map(to_millis))
        .put("resume_count", u64_to_i64(lease.resume_count))
        .put("issuer", s.issuer.as_str())
        .put("subject_sub", s.sub.as_deref())
        .put("session_id", s.session_id.as_deref())
        .put("on_logout", s.on_logout.as_str())
        .put("permission_source", s.permission_source.as_deref())
        .put(
            "permissions_checked_at",
            s.permissions_checked_at.map(to_millis),
        )
        .put("version", lease.version)
        .put("deadline", to_millis(lease.deadline()))
        .done())
}

/// The values of [`Statements::update_lease`]: the updated columns, then the id and the version
/// the stored row must still have. Built on its own, not filtered from [`lease_values`]:
/// a renewal's write should not copy the columns it doesn't write.
pub(crate) fn update_values(lease: &Lease) -> Result<Vec<Value>, StoreError> {
    let permissions =
        serde_json::to_string(&lease.permissions).map_err(|e| StoreError::Database(Box::new(e)))?;
    let end = lease.end.as_ref();
    let mut columns = updated_columns();
    let mut values = Vec::with_capacity(LEASE.len());
    let mut put = |name: &str, value: Value| {
        debug_assert_eq!(columns.next().map(|c| c.name), Some(name));
        values.push(value);
    };
    put("permissions", permissions.into());
    put("last_active_at", to_millis(lease.last_active_at).into());
    put("active", lease.is_active().into());
    put("end_reason", end.map(|e| e.reason.as_str()).into());
    put("ended_at", end.map(|e| to_millis(e.at)).into());
    put("ended_by", end.map(|e| e.by.as_str()).into());
    put("end_detail", end.map(|e| e.detail.as_str()).into());
    put("generation", u64_to_i64(lease.generation).into());
    put("seed", lease.seed.clone().into());
    put("rotated_at", to_millis(lease.rotated_at).into());
    put("refresh_count", u64_to_i64(lease.refresh_count).into());
    put(
        "last_refreshed_at",
        lease.last_refreshed_at.map(to_millis).into(),
    );
    put("resume_count", u64_to_i64(lease.resume_count).into());
    put(
        "permissions_checked_at",
        lease.standing.permissions_checked_at.map(to_millis).into(),
    );
    put("deadline", to_millis(lease.deadline()).into());
    debug_assert!(columns.next().is_none());
    values.push(lease.id.as_str().into());
    values.push(lease.version.into());
    Ok(values)
}

/// The event's value for each column of [`EVENT`] but `seq`, in order.
pub(crate) fn event_values(e: &LeaseEvent) -> Vec<Value> {
    Values::new(&EVENT[1..])
        .put("lease_id", e.lease_id.as_str())
        .put("tenant", e.tenant.as_str())
        .put("subject", e.subject.as_str())
        .put("actor", e.actor.as_str())
        .put("job_id", e.job_id.as_str())
        .put("kind", e.kind.as_str())
        .put("reason", e.reason.map(EndReason::as_str))
        .put("at", to_millis(e.at))
        .put("by_whom", e.by.as_str())
        .put("detail", e.detail.as_str())
        .put("tokens_valid_until", e.tokens_valid_until.map(to_millis))
        .done()
}

/// The key's value for each column of [`KEY`], in order.
pub(crate) fn key_values(k: &StoredKey) -> Vec<Value> {
    Values::new(&KEY)
        .put("kid", k.kid.as_str())
        .put("algorithm", k.algorithm.as_str())
        .put("public_key", k.public_key.clone())
        .put("sealed_private_key", k.sealed_private_key.clone())
        .put("created_at", to_millis(k.created_at))
        .put("activates_at", to_millis(k.activates_at))
        .put("retired_at", k.retired_at.map(to_millis))
        .done()
}

/// A row as a store's driver gives it, read by column index.
pub(crate) trait Columns {
    /// A `NOT NULL` text.
    fn text(&self, i: usize) -> Result<String, StoreError>;
    /// A text or `NULL`.
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError>;
    /// A `NOT NULL` integer.
    fn int(&self, i: usize) -> Result<i64, StoreError>;
    /// An integer or `NULL`.
    fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError>;
    /// A `NOT NULL` boolean.
    fn flag(&self, i: usize) -> Result<bool, StoreError>;
    /// `NOT NULL` bytes.
    fn bytes(&self, i: usize) -> Result<Vec<u8>, StoreError>;
}

/// Implements [`Columns`] for a driver's row type, whose generic `$get(i)` reads every
/// column type and whose error `$err` turns into a [`StoreError`].
macro_rules! impl_columns {
    ($row:ty, $get:ident, $err:path) => {
        impl $crate::store::row::Columns for $row {
            fn text(&self, i: usize) -> Result<String, StoreError> {
                self.$get(i).map_err($err)
            }
            fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
                self.$get(i).map_err($err)
            }
            fn int(&self, i: usize) -> Result<i64, StoreError> {
                self.$get(i).map_err($err)
            }
            fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
                self.$get(i).map_err($err)
            }
            fn flag(&self, i: usize) -> Result<bool, StoreError> {
                self.$get(i).map_err($err)
            }
            fn bytes(&self, i: usize) -> Result<Vec<u8>, StoreError> {
                self.$get(i).map_err($err)
            }
        }
    };
}
pub(crate) use impl_columns;

/// Reads a row's columns in the order of their list, each naming its column.
struct Reader<'r, R: ?Sized> {
    row: &'r R,
    columns: &'static [Column],
    next: usize,
}

impl<'r, R: Columns + ?Sized> Reader<'r, R> {
    fn new(row: &'r R, columns: &'static [Column]) -> Self {
        Self {
            row,
            columns,
            next: 0,
        }
    }

    fn at(&mut self, name: &str) -> usize {
        debug_assert_eq!(self.columns[self.next].name, name);
        self.next += 1;
        self.next - 1
    }

    fn text(&mut self, name: &str) -> Result<String, StoreError> {
        let i = self.at(name);
        self.row.text(i)
    }

    fn opt_text(&mut self, name: &str) -> Result<Option<String>, StoreError> {
        let i = self.at(name);
        self.row.opt_text(i)
    }

    fn int(&mut self, name: &str) -> Result<i64, StoreError> {
        let i = self.at(name);
        self.row.int(i)
    }

    fn count(&mut self, name: &str) -> Result<u64, StoreError> {
        self.int(name).map(i64_to_u64)
    }

    fn time(&mut self, name: &str) -> Result<SystemTime, StoreError> {
        self.int(name).map(from_millis)
    }

    fn opt_time(&mut self, name: &str) -> Result<Option<SystemTime>, StoreError> {
        let i = self.at(name);
        Ok(self.row.opt_int(i)?.map(from_millis))
    }

    fn flag(&mut self, name: &str) -> Result<bool, StoreError> {
        let i = self.at(name);
        self.row.flag(i)
    }

    fn bytes(&mut self, name: &str) -> Result<Vec<u8>, StoreError> {
        let i = self.at(name);
        self.row.bytes(i)
    }
}

/// The lease in a row selected with [`lease_columns`].
pub(crate) fn lease_from(row: &(impl Columns + ?Sized)) -> Result<Lease, StoreError> {
    let mut c = Reader::new(row, &LEASE);
    // Struct fields are evaluated in the order written: the order of `LEASE`.
    Ok(Lease {
        id: c.text("id")?,
        tenant: c.text("tenant")?,
        subject: c.text("subject")?,
        actor: c.text("actor")?,
        job_id: c.text("job_id")?,
        permissions: serde_json::from_str(&c.text("permissions")?)
            .map_err(|e| StoreError::Corrupt(format!("permissions: {e}")))?,
        audience: c.text("audience")?,
        created_at: c.time("created_at")?,
        expires_at: c.time("expires_at")?,
        idle_timeout: Duration::from_millis(c.count("idle_timeout_ms")?),
        last_active_at: c.time("last_active_at")?,
        end: end_from(&mut c)?,
        generation: c.count("generation")?,
        seed: c.bytes("seed")?,
        rotated_at: c.time("rotated_at")?,
        refresh_count: c.count("refresh_count")?,
        last_refreshed_at: c.opt_time("last_refreshed_at")?,
        resume_count: c.count("resume_count")?,
        standing: Standing {
            issuer: c.text("issuer")?,
            sub: c.opt_text("subject_sub")?,
            session_id: c.opt_text("session_id")?,
            on_logout: {
                let policy = c.text("on_logout")?;
                OnLogout::parse(&policy).ok_or_else(|| {
                    StoreError::Corrupt(format!("unknown logout policy {policy:?}"))
                })?
            },
            permission_source: c.opt_text("permission_source")?,
            permissions_checked_at: c.opt_time("permissions_checked_at")?,
        },
        version: c.int("version")?,
    })
}

/// How the lease ended, from `active`, `end_reason`, `ended_at`, `ended_by` and
/// `end_detail`.
fn end_from<R: Columns + ?Sized>(c: &mut Reader<'_, R>) -> Result<Option<LeaseEnd>, StoreError> {
    let active = c.flag("active")?;
    let reason = c.opt_text("end_reason")?;
    let at = c.opt_time("ended_at")?;
    let by = c.opt_text("ended_by")?;
    let detail = c.opt_text("end_detail")?;
    if active {
        return Ok(None);
    }
    let reason = reason.ok_or_else(|| StoreError::Corrupt("ended lease without reason".into()))?;
    let reason = EndReason::parse(&reason)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown end reason {reason:?}")))?;
    Ok(Some(LeaseEnd {
        reason,
        at: at.unwrap_or(SystemTime::UNIX_EPOCH),
        by: by.unwrap_or_default(),
        detail: detail.unwrap_or_default(),
    }))
}

/// The event in a row selected with [`event_columns`].
pub(crate) fn event_from(row: &(impl Columns + ?Sized)) -> Result<LeaseEvent, StoreError> {
    let mut c = Reader::new(row, &EVENT);
    Ok(LeaseEvent {
        sequence: c.count("seq")?,
        lease_id: c.text("lease_id")?,
        tenant: c.text("tenant")?,
        subject: c.text("subject")?,
        actor: c.text("actor")?,
        job_id: c.text("job_id")?,
        kind: {
            let kind = c.text("kind")?;
            EventKind::parse(&kind)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown event kind {kind:?}")))?
        },
        reason: match c.opt_text("reason")? {
            None => None,
            Some(r) => Some(
                EndReason::parse(&r)
                    .ok_or_else(|| StoreError::Corrupt(format!("unknown end reason {r:?}")))?,
            ),
        },
        at: c.time("at")?,
        by: c.text("by_whom")?,
        detail: c.text("detail")?,
        tokens_valid_until: c.opt_time("tokens_valid_until")?,
    })
}

/// The key in a row selected with [`key_columns`].
pub(crate) fn key_from(row: &(impl Columns + ?Sized)) -> Result<StoredKey, StoreError> {
    let mut c = Reader::new(row, &KEY);
    Ok(StoredKey {
        kid: c.text("kid")?,
        algorithm: c.text("algorithm")?,
        public_key: c.bytes("public_key")?,
        sealed_private_key: c.bytes("sealed_private_key")?,
        created_at: c.time("created_at")?,
        activates_at: c.time("activates_at")?,
        retired_at: c.opt_time("retired_at")?,
    })
}

/// A duration in whole milliseconds, saturating.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A count or sequence as the databases store it (signed), saturating.
pub(crate) fn u64_to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored count or sequence; a negative one (never written) reads as 0.
pub(crate) fn i64_to_u64(v: i64) -> u64 {
    v.max(0).unsigned_abs()
}

/// A query's `LIMIT`, saturating.
pub(crate) fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::EventKind;

    /// Values read back as a row, as a database would return them.
    impl Columns for [Value] {
        fn text(&self, i: usize) -> Result<String, StoreError> {
            self.opt_text(i)?
                .ok_or_else(|| StoreError::Corrupt(format!("column {i} is NULL")))
        }
        fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
            match &self[i] {
                Value::Null => Ok(None),
                Value::Text(s) => Ok(Some(s.clone())),
                other => Err(StoreError::Corrupt(format!("column {i}: {other:?}"))),
            }
        }
        fn int(&self, i: usize) -> Result<i64, StoreError> {
            self.opt_int(i)?
                .ok_or_else(|| StoreError::Corrupt(format!("column {i} is NULL")))
        }
        fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
            match &self[i] {
                Value::Null => Ok(None),
                Value::Int(n) => Ok(Some(*n)),
                other => Err(StoreError::Corrupt(format!("column {i}: {other:?}"))),
            }
        }
        fn flag(&self, i: usize) -> Result<bool, StoreError> {
            match &self[i] {
                Value::Bool(b) => Ok(*b),
                other => Err(StoreError::Corrupt(format!("column {i}: {other:?}"))),
            }
        }
        fn bytes(&self, i: usize) -> Result<Vec<u8>, StoreError> {
            match &self[i] {
                Value::Bytes(b) => Ok(b.clone()),
                other => Err(StoreError::Corrupt(format!("column {i}: {other:?}"))),
            }
        }
    }

    fn kind_of(v: &Value) -> Option<Kind> {
        match v {
            Value::Null => None,
            Value::Text(_) => Some(Kind::Text),
            Value::Int(_) => Some(Kind::Int),
            Value::Bool(_) => Some(Kind::Bool),
            Value::Bytes(_) => Some(Kind::Bytes),
        }
    }

    fn full_lease() -> Lease {
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_000 + s);
        let mut lease = crate::store::conformance::lease("job");
        lease.last_refreshed_at = Some(at(5));
        lease.standing = Standing {
            issuer: "https://idp".into(),
            sub: Some("u-1".into()),
            session_id: Some("s-1".into()),
            on_logout: OnLogout::End,
            permission_source: Some("idp".into()),
            permissions_checked_at: Some(at(7)),
        };
        lease.generation = 3;
        lease.version = 4;
        lease
    }

    #[test]
    fn a_lease_reads_back_as_written_active_and_ended() {
        let mut lease = full_lease();
        let values = lease_values(&lease).unwrap();
        assert_eq!(values.len(), LEASE.len());
        for (v, c) in values.iter().zip(&LEASE) {
            assert!(kind_of(v).is_none_or(|k| k == c.kind), "{}: {v:?}", c.name);
        }
        assert_eq!(lease_from(values.as_slice()).unwrap(), lease);
        lease.finish(EndReason::Revoked, lease.created_at, "admin:x", "why");
        let values = lease_values(&lease).unwrap();
        assert_eq!(lease_from(values.as_slice()).unwrap(), lease);
    }

    #[test]
    fn an_update_writes_the_updated_columns_then_id_and_version() {
        let lease = full_lease();
        let values = update_values(&lease).unwrap();
        let all = lease_values(&lease).unwrap();
        let updated: Vec<&str> = updated_columns().map(|c| c.name).collect();
        assert_eq!(values.len(), updated.len() + 2);
        for (name, value) in updated.iter().zip(&values) {
            let i = LEASE.iter().position(|c| c.name == *name).unwrap();
            assert_eq!(value, &all[i], "{name}");
        }
        assert_eq!(
            values[updated.len()..],
            [Value::Text(lease.id.clone()), Value::Int(4)]
        );
        let sql = Statements::new(Placeholder::Dollar).update_lease;
        assert!(
            sql.starts_with("UPDATE leases SET permissions = $1, "),
            "{sql}"
        );
        let n = updated.len();
        assert!(
            sql.ends_with(&format!(
                "version = version + 1 WHERE id = ${} AND version = ${}",
                n + 1,
                n + 2
            )),
            "{sql}"
        );
    }

    #[test]
    fn events_and_keys_read_back_as_written() {
        let lease = full_lease();
        let mut event = LeaseEvent::new(&lease, EventKind::Ended, lease.created_at, "x", "d");
        event.reason = Some(EndReason::Expired);
        event.tokens_valid_until = Some(lease.expires_at);
        event.sequence = 9;
        let mut row = vec![Value::Int(9)];
        row.extend(event_values(&event));
        assert_eq!(event_from(row.as_slice()).unwrap(), event);

        let key = StoredKey {
            kid: "k1".into(),
            algorithm: "EdDSA".into(),
            public_key: vec![1, 2],
            sealed_private_key: vec![3],
            created_at: lease.created_at,
            activates_at: lease.expires_at,
            retired_at: None,
        };
        assert_eq!(key_from(key_values(&key).as_slice()).unwrap(), key);
    }

    #[test]
    fn a_corrupt_row_is_refused_not_guessed() {
        let lease = full_lease();
        let mut values = lease_values(&lease).unwrap();
        values[11] = Value::Bool(false); // ended, without a reason
        assert!(matches!(
            lease_from(values.as_slice()),
            Err(StoreError::Corrupt(_))
        ));
        values[12] = Value::Text("no_such_reason".into());
        assert!(matches!(
            lease_from(values.as_slice()),
            Err(StoreError::Corrupt(_))
        ));
    }
}
