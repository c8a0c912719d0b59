//! The writer thread and its group commit (see the parent module's docs).

use std::sync::mpsc;

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::map_err;
use crate::store::{BatchHook, StoreError};

/// Most writes one transaction groups; bounds how long the first of them waits.
pub(super) const MAX_GROUP: usize = 512;

/// One write waiting for the writer thread.
pub(super) trait WriteJob: Send {
    /// Applies the write inside the open group transaction. `false` if the connection
    /// is left in a state the group cannot commit from (its savepoint could not be
    /// undone or released).
    fn run(&mut self, conn: &Connection) -> bool;
    /// Runs the job's commit hook, once the group has committed.
    fn committed(&mut self);
    /// Answers the caller: `Err` if the group did not commit.
    fn answer(self: Box<Self>, committed: Result<(), &str>);
}

pub(super) struct Job<T, F, C> {
    pub(super) work: Option<F>,
    pub(super) outcome: Option<Result<T, StoreError>>,
    pub(super) on_commit: Option<C>,
    pub(super) reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F, C> WriteJob for Job<T, F, C>
where
    T: Send,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send,
    C: FnOnce(&T) + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let Some(work) = self.work.take() else {
            return true;
        };
        match in_savepoint(conn, work) {
            Ok(outcome) => {
                self.outcome = Some(outcome);
                true
            }
            Err(_) => false,
        }
    }

    fn committed(&mut self) {
        if let (Some(Ok(value)), Some(on_commit)) = (&self.outcome, self.on_commit.take()) {
            // A panicking hook must not take the writer thread down with it.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| on_commit(value)));
        }
    }

    fn answer(self: Box<Self>, committed: Result<(), &str>) {
        let answer = match (committed, self.outcome) {
            (Ok(()), Some(outcome)) => outcome,
            (Ok(()), None) => Err(StoreError::Unavailable("write was not applied".into())),
            (Err(why), _) => Err(StoreError::Unavailable(format!("commit failed: {why}"))),
        };
        // The caller may have given up (cancelled request); the write stands regardless.
        let _ = self.reply.send(answer);
    }
}

/// Runs `work` in a savepoint, undone if it fails (or panics). The outer `Err` means the
/// savepoint itself could not be undone or released: the group must not commit.
fn in_savepoint<T>(
    conn: &Connection,
    work: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<Result<T, StoreError>, StoreError> {
    let exec = |sql: &str| {
        conn.prepare_cached(sql)
            .and_then(|mut s| s.execute([]))
            .map_err(map_err)
    };
    exec("SAVEPOINT job")?;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(conn)))
        .unwrap_or_else(|_| Err(StoreError::Corrupt("a store write panicked".into())));
    if outcome.is_err() {
        exec("ROLLBACK TO job")?;
    }
    exec("RELEASE job")?;
    Ok(outcome)
}

/// The writer thread: takes every write queued so far, applies them in one transaction,
/// commits once, updates the lease cache for all of them, then answers them all (so no
/// caller can observe one commit of the group while the cache still lacks another).
pub(super) fn write_loop(
    conn: Connection,
    queue: mpsc::Receiver<Box<dyn WriteJob>>,
    batches: BatchHook,
) {
    while let Ok(first) = queue.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        batches.observe("sqlite_group_commit", group.len());
        let committed = run_group(&conn, &mut group);
        if committed.is_ok() {
            for job in &mut group {
                job.committed();
            }
        }
        let committed = committed.as_ref().map(|_| ()).map_err(String::as_str);
        for job in group {
            job.answer(committed);
        }
    }
}

pub(super) fn run_group(conn: &Connection, group: &mut [Box<dyn WriteJob>]) -> Result<(), String> {
    if !conn.is_autocommit() {
        // A previous group's rollback failed and left a transaction open: never build
        // on it.
        let _ = conn.execute_batch("ROLLBACK");
    }
    conn.execute_batch("BEGIN IMMEDIATE")
        .map_err(|e| e.to_string())?;
    for job in group.iter_mut() {
        let clean = job.run(conn);
        // Some errors (disk full, I/O) make SQLite roll the whole transaction back; the
        // writes before this one are gone, and those after must not run outside it.
        if conn.is_autocommit() {
            return Err("the transaction was rolled back".into());
        }
        if !clean {
            // A write whose savepoint could not be undone may be half-applied: commit
            // none of the group rather than that.
            let _ = conn.execute_batch("ROLLBACK");
            return Err("a write could not be undone".into());
        }
    }
    if let Err(e) = conn.execute_batch("COMMIT") {
        let _ = conn.execute_batch("ROLLBACK");
        return Err(e.to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::store::conformance::{issued, lease};
    use crate::store::sqlite::{SqliteStore, open_connection};

    #[test]
    fn a_failed_write_in_a_group_undoes_only_itself() {
        let store = SqliteStore::temporary().unwrap();
        let path = store.inner.temporary.clone().unwrap().join("jobtoken.db");
        let conn = open_connection(&path).unwrap();
        let (reply_ok, mut ok) = oneshot::channel();
        let (reply_bad, mut bad) = oneshot::channel();
        let (reply_late, mut late) = oneshot::channel();
        fn insert(id: &'static str) -> impl Fn(&Connection) -> Result<usize, StoreError> {
            move |conn: &Connection| {
                conn.execute(
                    "INSERT INTO signing_keys VALUES (?1, 'EdDSA', x'00', x'00', 0, 0, NULL)",
                    [id],
                )
                .map_err(map_err)
            }
        }
        let mut group: Vec<Box<dyn WriteJob>> = vec![
            Box::new(Job {
                work: Some(insert("a")),
                outcome: None,
                on_commit: None::<fn(&usize)>,
                reply: reply_ok,
            }),
            // Writes a row, then fails: the row must not survive the group's commit.
            Box::new(Job {
                work: Some(|conn: &Connection| {
                    insert("b")(conn)?;
                    Err::<usize, _>(StoreError::Conflict)
                }),
                outcome: None,
                on_commit: None::<fn(&usize)>,
                reply: reply_bad,
            }),
            Box::new(Job {
                work: Some(insert("c")),
                outcome: None,
                on_commit: None::<fn(&usize)>,
                reply: reply_late,
            }),
        ];
        let committed = run_group(&conn, &mut group);
        assert_eq!(committed, Ok(()));
        for mut job in group {
            job.committed();
            job.answer(Ok(()));
        }
        assert_eq!(ok.try_recv().unwrap().unwrap(), 1);
        assert!(matches!(bad.try_recv().unwrap(), Err(StoreError::Conflict)));
        assert_eq!(late.try_recv().unwrap().unwrap(), 1);
        let mut kids: Vec<String> = conn
            .prepare("SELECT kid FROM signing_keys")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        kids.sort();
        assert_eq!(kids, ["a", "c"]);
    }

    #[test]
    fn a_group_that_does_not_commit_fails_every_write_in_it() {
        let (reply, mut answer) = oneshot::channel::<Result<usize, StoreError>>();
        let job: Box<dyn WriteJob> = Box::new(Job {
            work: Some(|_: &Connection| Ok(1)),
            outcome: Some(Ok(1)),
            on_commit: None::<fn(&usize)>,
            reply,
        });
        job.answer(Err("disk I/O error"));
        assert!(matches!(
            answer.try_recv().unwrap(),
            Err(StoreError::Unavailable(why)) if why.contains("disk I/O error")
        ));
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
                    renewed = store.update_lease(&l, None).await.unwrap().is_some();
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
