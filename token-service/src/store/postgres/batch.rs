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
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};

use deadpool_postgres::Pool;

use super::{LEASE_COLUMNS, db_err, lease_from_row, pool_err, u64_to_i64};
use crate::clock::to_millis;
use crate::lease::{Lease, LeaseEnd};
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
    let select = client
        .prepare_cached(&format!(
            "SELECT {LEASE_COLUMNS} FROM leases WHERE id = ANY($1)"
        ))
        .await
        .map_err(db_err)?;
    let rows = client.query(&select, &[&ids]).await.map_err(db_err)?;
    let mut found = HashMap::with_capacity(rows.len());
    for row in &rows {
        let lease = lease_from_row(row)?;
        found.insert(lease.id.clone(), lease);
    }
    Ok(ids.iter().map(|id| found.get(id).cloned()).collect())
}

/// Compare-and-set of many leases in one statement (one commit): each row is written
/// only if its stored version is still the one given. Two updates of one lease in a
/// batch: at most one matches, and `RETURNING u.ord` says which.
pub(super) async fn write_leases(pool: Pool, leases: Vec<Lease>) -> Result<Vec<bool>, StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    let update = client
        .prepare_cached(
            "UPDATE leases AS l SET last_active_at = u.last_active_at, deadline = u.deadline, \
             active = u.active, end_reason = u.end_reason, ended_at = u.ended_at, \
             ended_by = u.ended_by, end_detail = u.end_detail, generation = u.generation, \
             seed = u.seed, rotated_at = u.rotated_at, refresh_count = u.refresh_count, \
             last_refreshed_at = u.last_refreshed_at, resume_count = u.resume_count, \
             permissions = u.permissions, permissions_checked_at = u.permissions_checked_at, \
             version = l.version + 1 \
             FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], \
             $6::boolean[], $7::text[], $8::bigint[], $9::text[], $10::text[], $11::bigint[], \
             $12::bytea[], $13::bigint[], $14::bigint[], $15::bigint[], $16::bigint[], \
             $17::text[], $18::bigint[]) \
             AS u(ord, id, version, last_active_at, deadline, active, end_reason, ended_at, \
             ended_by, end_detail, generation, seed, rotated_at, refresh_count, \
             last_refreshed_at, resume_count, permissions, permissions_checked_at) \
             WHERE l.id = u.id AND l.version = u.version RETURNING u.ord",
        )
        .await
        .map_err(db_err)?;
    let ord: Vec<i64> = (0..leases.len())
        .map(|i| i64::try_from(i).unwrap_or(i64::MAX))
        .collect();
    let column = |f: &dyn Fn(&Lease) -> i64| leases.iter().map(f).collect::<Vec<i64>>();
    let ends = |f: &dyn Fn(&LeaseEnd) -> String| {
        leases
            .iter()
            .map(|l| l.end.as_ref().map(f))
            .collect::<Vec<Option<String>>>()
    };
    let ids: Vec<&str> = leases.iter().map(|l| l.id.as_str()).collect();
    let versions = column(&|l| l.version);
    let last_active = column(&|l| to_millis(l.last_active_at));
    let deadlines = column(&|l| to_millis(l.deadline()));
    let active: Vec<bool> = leases.iter().map(Lease::is_active).collect();
    let end_reasons = ends(&|e| e.reason.as_str().to_owned());
    let ended_at: Vec<Option<i64>> = leases
        .iter()
        .map(|l| l.end.as_ref().map(|e| to_millis(e.at)))
        .collect();
    let ended_by = ends(&|e| e.by.clone());
    let end_details = ends(&|e| e.detail.clone());
    let generations = column(&|l| u64_to_i64(l.generation));
    let seeds: Vec<&[u8]> = leases.iter().map(|l| l.seed.as_slice()).collect();
    let rotated = column(&|l| to_millis(l.rotated_at));
    let refreshes = column(&|l| u64_to_i64(l.refresh_count));
    let last_refreshed: Vec<Option<i64>> = leases
        .iter()
        .map(|l| l.last_refreshed_at.map(to_millis))
        .collect();
    let resumes = column(&|l| u64_to_i64(l.resume_count));
    let permissions = leases
        .iter()
        .map(|l| serde_json::to_string(&l.permissions))
        .collect::<Result<Vec<String>, _>>()
        .map_err(|e| StoreError::Database(Box::new(e)))?;
    let checked: Vec<Option<i64>> = leases
        .iter()
        .map(|l| l.standing.permissions_checked_at.map(to_millis))
        .collect();
    let rows = client
        .query(
            &update,
            &[
                &ord,
                &ids,
                &versions,
                &last_active,
                &deadlines,
                &active,
                &end_reasons,
                &ended_at,
                &ended_by,
                &end_details,
                &generations,
                &seeds,
                &rotated,
                &refreshes,
                &last_refreshed,
                &resumes,
                &permissions,
                &checked,
            ],
        )
        .await
        .map_err(db_err)?;
    let written: HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    Ok(ord.iter().map(|i| written.contains(i)).collect())
}

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
