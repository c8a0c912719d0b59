//! Batching of concurrent requests into one database statement.
//!
//! Under load, a networked database spends most of its time per statement (parse, plan,
//! round trip, commit), not per row. A [`Batcher`] queues requests and hands whatever
//! has gathered to one call of its `run` function, with a few such calls in flight, so
//! a busy service sends a few large statements instead of many small ones while a quiet
//! one still answers each request at once (a batch of one).
//!
//! The PostgreSQL store batches its renewal path with it: lease reads by id
//! ([`read_leases`]) and event-less compare-and-set writes ([`write_leases`]).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};

use deadpool_postgres::Pool;

use bytes::BytesMut;
use tokio_postgres::types::{IsNull, ToSql, Type};

use super::{db_err, pool_err};
use crate::lease::Lease;
use crate::store::row::{self, Column, Kind, Value};
use crate::store::{BatchHook, StoreError};

/// Most rows one batched statement carries.
pub(super) const MAX_BATCH: usize = 256;
/// Batched statements of one kind in flight at once.
pub(super) const PARALLEL_BATCHES: usize = 4;

/// Reads many leases in one query; one answer per id, in order.
pub(super) async fn read_leases(
    pool: Pool,
    ids: Vec<String>,
) -> Result<Vec<Option<Lease>>, StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    let sql = format!(
        "SELECT {} FROM leases WHERE id = ANY($1)",
        row::lease_columns()
    );
    let select = client.prepare_cached(&sql).await.map_err(db_err)?;
    let rows = client.query(&select, &[&ids]).await.map_err(db_err)?;
    let mut found = HashMap::with_capacity(rows.len());
    for row in &rows {
        let lease = row::lease_from(row)?;
        found.insert(lease.id.clone(), lease);
    }
    Ok(ids.iter().map(|id| found.get(id).cloned()).collect())
}

/// The batched compare-and-set: the updated columns of [`row::LEASE`] as typed arrays,
/// after the batch position, id and expected version of each lease.
static WRITE_LEASES: LazyLock<String> = LazyLock::new(|| {
    let columns: Vec<&Column> = row::updated_columns().collect();
    let set: Vec<String> = columns
        .iter()
        .map(|c| format!("{0} = u.{0}", c.name))
        .collect();
    let arrays: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("${}::{}[]", i + 4, pg_type(c.kind)))
        .collect();
    let names: Vec<&str> = columns.iter().map(|c| c.name).collect();
    format!(
        "UPDATE leases AS l SET {}, version = l.version + 1 \
         FROM unnest($1::bigint[], $2::text[], $3::bigint[], {}) \
         AS u(ord, id, version, {}) \
         WHERE l.id = u.id AND l.version = u.version RETURNING u.ord",
        set.join(", "),
        arrays.join(", "),
        names.join(", ")
    )
});

/// Compare-and-set of many leases in one statement (one commit): each row is written
/// only if its stored version is still the one given. Two updates of one lease in a
/// batch: at most one matches, and `RETURNING u.ord` says which. One answer per lease:
/// its new version if written.
pub(super) async fn write_leases(
    pool: Pool,
    leases: Vec<Lease>,
) -> Result<Vec<Option<i64>>, StoreError> {
    let ord: Vec<i64> = (0..).take(leases.len()).collect();
    let ids: Vec<&str> = leases.iter().map(|l| l.id.as_str()).collect();
    let versions: Vec<i64> = leases.iter().map(|l| l.version).collect();
    let mut columns: Vec<Array> = row::updated_columns().map(|c| Array::new(c.kind)).collect();
    for lease in &leases {
        // The updated columns' values come first; `zip` leaves out the id and version.
        for (column, value) in columns.iter_mut().zip(row::update_values(lease)?) {
            column.push(value)?;
        }
    }
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&ord, &ids, &versions];
    params.extend(columns.iter().map(|c| c as &(dyn ToSql + Sync)));
    let client = pool.get().await.map_err(pool_err)?;
    let update = client.prepare_cached(&WRITE_LEASES).await.map_err(db_err)?;
    let rows = client.query(&update, &params).await.map_err(db_err)?;
    let written: HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    Ok(ord
        .iter()
        .zip(&leases)
        .map(|(i, lease)| written.contains(i).then_some(lease.version + 1))
        .collect())
}

/// The array type `unnest` takes for a column of this kind.
fn pg_type(kind: Kind) -> &'static str {
    match kind {
        Kind::Text => "text",
        Kind::Int => "bigint",
        Kind::Bool => "boolean",
        Kind::Bytes => "bytea",
    }
}

/// One column of a batch, as the typed array `unnest` takes.
#[derive(Debug)]
enum Array {
    Text(Vec<Option<String>>),
    Int(Vec<Option<i64>>),
    Bool(Vec<Option<bool>>),
    Bytes(Vec<Option<Vec<u8>>>),
}

impl Array {
    fn new(kind: Kind) -> Self {
        match kind {
            Kind::Text => Array::Text(Vec::new()),
            Kind::Int => Array::Int(Vec::new()),
            Kind::Bool => Array::Bool(Vec::new()),
            Kind::Bytes => Array::Bytes(Vec::new()),
        }
    }

    fn push(&mut self, value: Value) -> Result<(), StoreError> {
        match (self, value) {
            (Array::Text(a), Value::Text(v)) => a.push(Some(v)),
            (Array::Text(a), Value::Null) => a.push(None),
            (Array::Int(a), Value::Int(v)) => a.push(Some(v)),
            (Array::Int(a), Value::Null) => a.push(None),
            (Array::Bool(a), Value::Bool(v)) => a.push(Some(v)),
            (Array::Bool(a), Value::Null) => a.push(None),
            (Array::Bytes(a), Value::Bytes(v)) => a.push(Some(v)),
            (Array::Bytes(a), Value::Null) => a.push(None),
            (array, value) => {
                return Err(StoreError::Corrupt(format!(
                    "{value:?} in a batch column of {array:?}"
                )));
            }
        }
        Ok(())
    }
}

impl ToSql for Array {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, ToSqlError> {
        match self {
            Array::Text(a) => a.to_sql(ty, out),
            Array::Int(a) => a.to_sql(ty, out),
            Array::Bool(a) => a.to_sql(ty, out),
            Array::Bytes(a) => a.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        <Vec<Option<String>>>::accepts(ty)
            || <Vec<Option<i64>>>::accepts(ty)
            || <Vec<Option<bool>>>::accepts(ty)
            || <Vec<Option<Vec<u8>>>>::accepts(ty)
    }

    fn to_sql_checked(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, ToSqlError> {
        match self {
            Array::Text(a) => a.to_sql_checked(ty, out),
            Array::Int(a) => a.to_sql_checked(ty, out),
            Array::Bool(a) => a.to_sql_checked(ty, out),
            Array::Bytes(a) => a.to_sql_checked(ty, out),
        }
    }
}

type ToSqlError = Box<dyn std::error::Error + Sync + Send>;

type Waiting<Q, A> = (Q, oneshot::Sender<Result<A, StoreError>>);

/// Queues requests of type `Q` and answers each with an `A`, by batches.
pub(crate) struct Batcher<Q, A> {
    queue: mpsc::UnboundedSender<Waiting<Q, A>>,
}

impl<Q: Send + 'static, A: Send + 'static> Batcher<Q, A> {
    /// Starts the batching task. `run` gets up to `max` requests and must return one
    /// answer per request, in order, within `timeout` (else every request of the batch
    /// fails as unavailable). At most `parallel` batches run at once; requests arriving
    /// meanwhile form the next batch. The task ends when the batcher is dropped.
    /// Each batch's size is reported to `hook` as `kind`.
    pub(crate) fn spawn<F, Fut>(
        max: usize,
        parallel: usize,
        timeout: Duration,
        (kind, hook): (&'static str, BatchHook),
        run: F,
    ) -> Self
    where
        F: Fn(Vec<Q>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<A>, StoreError>> + Send + 'static,
    {
        let (queue, mut incoming) = mpsc::unbounded_channel::<Waiting<Q, A>>();
        let slots = Arc::new(Semaphore::new(parallel.max(1)));
        tokio::spawn(async move {
            let run = Arc::new(run);
            while let Some(first) = incoming.recv().await {
                // Wait for a free slot first: what queues up meanwhile joins this batch.
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                    return;
                };
                let mut batch = vec![first];
                while batch.len() < max {
                    match incoming.try_recv() {
                        Ok(waiting) => batch.push(waiting),
                        Err(_) => break,
                    }
                }
                hook.observe(kind, batch.len());
                let run = Arc::clone(&run);
                tokio::spawn(async move {
                    let (requests, replies): (Vec<Q>, Vec<_>) = batch.into_iter().unzip();
                    let n = requests.len();
                    let outcome = tokio::time::timeout(timeout, run(requests))
                        .await
                        .unwrap_or_else(|_| {
                            Err(StoreError::Unavailable(format!(
                                "no answer from the database within {timeout:?}"
                            )))
                        });
                    match outcome {
                        Ok(answers) if answers.len() == n => {
                            for (reply, answer) in replies.into_iter().zip(answers) {
                                let _ = reply.send(Ok(answer));
                            }
                        }
                        Ok(answers) => {
                            let why = format!("batch of {n} got {} answers", answers.len());
                            for reply in replies {
                                let _ = reply.send(Err(StoreError::Corrupt(why.clone())));
                            }
                        }
                        Err(e) => {
                            for reply in replies {
                                let _ = reply.send(Err(copy(&e)));
                            }
                        }
                    }
                    drop(slot);
                });
            }
        });
        Self { queue }
    }

    /// Queues one request and waits for its answer.
    pub(crate) async fn call(&self, request: Q) -> Result<A, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((request, reply))
            .map_err(|_| StoreError::Unavailable("store closed".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("store batch was dropped".into()))?
    }
}

/// The same failure, for each request of a failed batch.
fn copy(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(why) => StoreError::Unavailable(why.clone()),
        StoreError::Conflict => StoreError::Conflict,
        StoreError::Corrupt(why) => StoreError::Corrupt(why.clone()),
        StoreError::Database(source) => {
            StoreError::Database(Box::new(std::io::Error::other(source.to_string())))
        }
        StoreError::Open { target, problem } => StoreError::Open {
            target: target.clone(),
            problem: problem.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn concurrent_requests_share_batches_and_each_gets_its_own_answer() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&sizes);
        let hook = BatchHook::default();
        let observed = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&observed);
        hook.set(Arc::new(move |kind, n| {
            sink.lock().unwrap().push((kind, n))
        }));
        let batcher = Arc::new(Batcher::spawn(
            16,
            1,
            Duration::from_secs(5),
            ("test", hook),
            move |xs: Vec<u32>| {
                seen.lock().unwrap().push(xs.len());
                async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok(xs.into_iter().map(|x| x * 10).collect())
                }
            },
        ));
        let calls: Vec<_> = (0..40)
            .map(|i| {
                let b = Arc::clone(&batcher);
                tokio::spawn(async move { b.call(i).await })
            })
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap().unwrap(), u32::try_from(i).unwrap() * 10);
        }
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 40);
        assert!(sizes.iter().all(|&n| n <= 16), "{sizes:?}");
        assert!(sizes.len() < 40, "requests were batched: {sizes:?}");
        let observed: Vec<(&str, usize)> = observed.lock().unwrap().clone();
        let want: Vec<(&str, usize)> = sizes.iter().map(|&n| ("test", n)).collect();
        assert_eq!(observed, want, "each batch's size is reported");
    }

    #[tokio::test]
    async fn a_failed_batch_fails_each_request_with_the_same_kind_of_error() {
        let batcher = Batcher::spawn(
            8,
            2,
            Duration::from_secs(5),
            ("test", BatchHook::default()),
            |_: Vec<u32>| async { Err::<Vec<u32>, _>(StoreError::Unavailable("db down".into())) },
        );
        assert!(matches!(
            batcher.call(1).await,
            Err(StoreError::Unavailable(why)) if why == "db down"
        ));
        let short = Batcher::spawn(
            8,
            2,
            Duration::from_secs(5),
            ("test", BatchHook::default()),
            |_: Vec<u32>| async { Ok(Vec::<u32>::new()) },
        );
        assert!(matches!(short.call(1).await, Err(StoreError::Corrupt(_))));
        let hung = Batcher::spawn(
            8,
            2,
            Duration::from_millis(50),
            ("test", BatchHook::default()),
            |_: Vec<u32>| std::future::pending::<Result<Vec<u32>, StoreError>>(),
        );
        assert!(matches!(
            hung.call(1).await,
            Err(StoreError::Unavailable(why)) if why.contains("no answer")
        ));
    }
}
