//! The store contract, written once and held against both stores.
//!
//! Each test is an async function of a `&dyn Store`; [`on_both_stores!`] runs it on a
//! fresh temporary SQLite store and on PostgreSQL, in a schema of its own. The
//! PostgreSQL legs skip (saying so once on stderr) without
//! [`POSTGRES_URL_VAR`](crate::testing::POSTGRES_URL_VAR), and fail instead with
//! [`REQUIRE_POSTGRES_VAR`](crate::testing::REQUIRE_POSTGRES_VAR)` = 1`. What only one
//! store has (SQLite's group commit, lease cache and lock file; PostgreSQL's batching)
//! is tested beside that store.

use std::time::{Duration, SystemTime};

use super::{LeaseFilter, Logout, Retire, Store, StoreError, StoredKey};
use crate::lease::{EndReason, EventKind, Lease, LeaseEvent, OnLogout};

/// The instant the fixtures are created at.
fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// An active lease for `job` of tenant `t`, actor `importer`, with a fresh id.
pub(crate) fn lease(job: &str) -> Lease {
    let now = t0();
    Lease {
        id: uuid::Uuid::new_v4().to_string(),
        tenant: "t".into(),
        subject: "alice".into(),
        actor: "importer".into(),
        job_id: job.into(),
        permissions: vec!["records:write".into()],
        audience: "api".into(),
        created_at: now,
        expires_at: now + Duration::from_secs(3600),
        idle_timeout: Duration::from_secs(600),
        last_active_at: now,
        end: None,
        generation: 0,
        seed: vec![7; 32],
        rotated_at: now,
        refresh_count: 0,
        last_refreshed_at: None,
        resume_count: 0,
        standing: Default::default(),
        version: 0,
    }
}

/// The `Issued` event of `l`.
pub(crate) fn issued(l: &Lease) -> LeaseEvent {
    LeaseEvent::new(l, EventKind::Issued, l.created_at, "module:importer", "")
}

/// `l` ended for `reason` at `at`, with its `Ended` event.
fn ended(l: &Lease, reason: EndReason, at: SystemTime) -> (Lease, LeaseEvent) {
    let mut l = l.clone();
    l.finish(reason, at, "system", reason.describe());
    let event = LeaseEvent::ended(&l, Duration::from_secs(300), Duration::from_secs(60))
        .expect("an ended lease has an end event");
    (l, event)
}

async fn insert(store: &dyn Store, l: &Lease) {
    store.insert_lease(l, &issued(l)).await.unwrap();
}

/// Ends `l` (at its stored version) and returns it as stored.
async fn end(store: &dyn Store, l: &Lease, reason: EndReason, at: SystemTime) -> Lease {
    let (mut l, event) = ended(l, reason, at);
    l.version = store.update_lease(&l, Some(&event)).await.unwrap().unwrap();
    l
}

fn ids(leases: &[Lease]) -> Vec<&str> {
    leases.iter().map(|l| l.id.as_str()).collect()
}

async fn a_lease_reads_back_as_inserted(store: &dyn Store) {
    let mut l = lease("job-1");
    l.permissions = vec!["a".into(), "b:c".into()];
    l.last_refreshed_at = Some(t0() + Duration::from_secs(3));
    l.standing.issuer = "https://idp".into();
    l.standing.sub = Some("u-1".into());
    l.standing.session_id = Some("s-1".into());
    l.standing.on_logout = OnLogout::End;
    l.standing.permission_source = Some("idp".into());
    l.standing.permissions_checked_at = Some(t0() + Duration::from_millis(1500));
    insert(store, &l).await;
    assert_eq!(store.get_lease(&l.id).await.unwrap(), Some(l.clone()));
    assert_eq!(store.get_lease("no-such-lease").await.unwrap(), None);
    let found = store.find_active_lease("t", "importer", "job-1").await;
    assert_eq!(found.unwrap(), Some(l.clone()));
    // The tenant is part of the key.
    let other = store.find_active_lease("t2", "importer", "job-1").await;
    assert_eq!(other.unwrap(), None);
    let other = store.find_active_lease("t", "exporter", "job-1").await;
    assert_eq!(other.unwrap(), None);
    // An ended lease is no longer the job's active one.
    end(store, &l, EndReason::Released, t0()).await;
    let found = store.find_active_lease("t", "importer", "job-1").await;
    assert_eq!(found.unwrap(), None);
}

async fn an_actor_holds_one_active_lease_per_job_of_a_tenant(store: &dyn Store) {
    let first = lease("job-1");
    insert(store, &first).await;
    let again = lease("job-1");
    assert!(matches!(
        store.insert_lease(&again, &issued(&again)).await,
        Err(StoreError::Conflict)
    ));
    // Neither the refused lease nor its event was written.
    assert_eq!(store.get_lease(&again.id).await.unwrap(), None);
    assert!(store.lease_events(&again.id).await.unwrap().is_empty());
    // The same job id in another tenant, or for another actor, is another job.
    let mut elsewhere = lease("job-1");
    elsewhere.tenant = "t2".into();
    insert(store, &elsewhere).await;
    let mut other_actor = lease("job-1");
    other_actor.actor = "exporter".into();
    insert(store, &other_actor).await;
    // Once the first ends, the job can be leased again.
    end(store, &first, EndReason::Released, t0()).await;
    insert(store, &again).await;
}

async fn an_update_is_a_compare_and_set_on_the_version(store: &dyn Store) {
    let l = lease("job-1");
    insert(store, &l).await;
    let mut renewed = l.clone();
    renewed.generation = 1;
    renewed.refresh_count = 1;
    renewed.rotated_at = t0() + Duration::from_secs(5);
    renewed.last_active_at = t0() + Duration::from_secs(5);
    renewed.last_refreshed_at = Some(t0() + Duration::from_secs(5));
    renewed.seed = vec![8; 32];
    renewed.permissions = vec!["records:read".into()];
    renewed.standing.permissions_checked_at = Some(t0() + Duration::from_secs(4));
    assert_eq!(store.update_lease(&renewed, None).await.unwrap(), Some(1));
    // A writer still at version 0 lost: nothing of its write lands.
    let mut stale = l.clone();
    stale.generation = 9;
    assert_eq!(store.update_lease(&stale, None).await.unwrap(), None);
    let stored = store.get_lease(&l.id).await.unwrap().unwrap();
    assert_eq!(
        stored,
        Lease {
            version: 1,
            ..renewed.clone()
        }
    );
    // With an event: both land, or (lost race) neither.
    let resumed = LeaseEvent::new(&stored, EventKind::Resumed, t0(), "module:importer", "");
    assert_eq!(
        store.update_lease(&stale, Some(&resumed)).await.unwrap(),
        None
    );
    assert_eq!(store.lease_events(&l.id).await.unwrap().len(), 1);
    let mut again = stored.clone();
    again.resume_count = 1;
    assert_eq!(
        store.update_lease(&again, Some(&resumed)).await.unwrap(),
        Some(2)
    );
    let kinds: Vec<EventKind> = store
        .lease_events(&l.id)
        .await
        .unwrap()
        .iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, [EventKind::Issued, EventKind::Resumed]);
    // Ending is an update too, and the end reads back.
    let ended = end(
        store,
        &Lease {
            version: 2,
            ..again
        },
        EndReason::Revoked,
        t0(),
    )
    .await;
    assert_eq!(ended.version, 3);
    assert_eq!(store.get_lease(&l.id).await.unwrap(), Some(ended));
}

async fn leases_list_newest_first_by_filter_and_page(store: &dyn Store) {
    let mut all = Vec::new();
    for (i, (tenant, subject, actor)) in [
        ("t", "alice", "importer"),
        ("t", "bob", "importer"),
        ("t", "alice", "exporter"),
        ("t2", "alice", "importer"),
        ("t", "alice", "importer"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut l = lease(&format!("job-{i}"));
        (l.tenant, l.subject, l.actor) = (tenant.into(), subject.into(), actor.into());
        l.created_at = t0() + Duration::from_secs(i as u64);
        insert(store, &l).await;
        all.push(l);
    }
    all[4] = end(store, &all[4], EndReason::Released, t0()).await;
    let list = |filter: LeaseFilter, limit| async move {
        store.list_leases(&filter, limit).await.unwrap()
    };
    let newest_first: Vec<&str> = all.iter().rev().map(|l| l.id.as_str()).collect();
    assert_eq!(ids(&list(LeaseFilter::default(), 10).await), newest_first);
    assert_eq!(list(LeaseFilter::default(), 10).await[0], all[4]);
    let tenant = LeaseFilter {
        tenant: Some("t2".into()),
        ..Default::default()
    };
    assert_eq!(ids(&list(tenant, 10).await), [all[3].id.as_str()]);
    let subject = LeaseFilter {
        subject: Some("bob".into()),
        ..Default::default()
    };
    assert_eq!(ids(&list(subject, 10).await), [all[1].id.as_str()]);
    let actor = LeaseFilter {
        actor: Some("exporter".into()),
        ..Default::default()
    };
    assert_eq!(ids(&list(actor, 10).await), [all[2].id.as_str()]);
    let job = LeaseFilter {
        job_id: Some("job-0".into()),
        ..Default::default()
    };
    assert_eq!(ids(&list(job, 10).await), [all[0].id.as_str()]);
    let ended = LeaseFilter {
        active: Some(false),
        ..Default::default()
    };
    assert_eq!(ids(&list(ended, 10).await), [all[4].id.as_str()]);
    let active = LeaseFilter {
        tenant: Some("t".into()),
        subject: Some("alice".into()),
        active: Some(true),
        ..Default::default()
    };
    assert_eq!(
        ids(&list(active, 10).await),
        [all[2].id.as_str(), all[0].id.as_str()]
    );
    // Keyset paging: pages of two, each after the last of the one before.
    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let page = list(
            LeaseFilter {
                after: after.clone(),
                ..Default::default()
            },
            2,
        )
        .await;
        let Some(last) = page.last() else { break };
        after = Some((last.created_at, last.id.clone()));
        pages.push(
            ids(&page)
                .into_iter()
                .map(str::to_owned)
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
    assert_eq!(pages.concat(), newest_first);
    // Leases created in the same millisecond page by id.
    let mut twins = vec![lease("twin-a"), lease("twin-b")];
    for l in &mut twins {
        l.created_at = t0() + Duration::from_secs(100);
        insert(store, l).await;
    }
    twins.sort_by(|a, b| b.id.cmp(&a.id));
    let first = list(LeaseFilter::default(), 1).await;
    assert_eq!(ids(&first), [twins[0].id.as_str()]);
    let after = Some((twins[0].created_at, twins[0].id.clone()));
    let next = list(
        LeaseFilter {
            after,
            ..Default::default()
        },
        1,
    )
    .await;
    assert_eq!(ids(&next), [twins[1].id.as_str()]);
}

async fn events_read_back_in_order_and_end_events_by_cursor(store: &dyn Store) {
    assert_eq!(store.last_event_sequence().await.unwrap(), 0);
    assert_eq!(store.earliest_live_end(t0()).await.unwrap(), None);
    let a = lease("job-a");
    let mut b = lease("job-b");
    // Active later, so its tokens stay valid longer.
    b.last_active_at = t0() + Duration::from_secs(500);
    insert(store, &a).await;
    insert(store, &b).await;
    let early = t0() + Duration::from_secs(10);
    let (a_end, a_event) = ended(&a, EndReason::Revoked, early);
    store
        .update_lease(&a_end, Some(&a_event))
        .await
        .unwrap()
        .unwrap();
    let late = t0() + Duration::from_secs(1000);
    let (b_end, b_event) = ended(&b, EndReason::Released, late);
    store
        .update_lease(&b_end, Some(&b_event))
        .await
        .unwrap()
        .unwrap();

    let events = store.lease_events(&a.id).await.unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(
        events[0],
        LeaseEvent {
            sequence: events[0].sequence,
            ..issued(&a)
        }
    );
    assert_eq!(
        events[1],
        LeaseEvent {
            sequence: events[1].sequence,
            ..a_event.clone()
        }
    );
    assert!(events[0].sequence < events[1].sequence);
    let last = store.last_event_sequence().await.unwrap();
    assert!(last >= events[1].sequence);

    // Only `Ended` events, after the cursor, oldest first, at most `limit`.
    let ends = store.end_events_after(0, 10).await.unwrap();
    let ended_ids: Vec<&str> = ends.iter().map(|e| e.lease_id.as_str()).collect();
    assert_eq!(ended_ids, [a.id.as_str(), b.id.as_str()]);
    assert!(ends.iter().all(|e| e.kind == EventKind::Ended));
    assert_eq!(ends[0].reason, Some(EndReason::Revoked));
    let after_first = store.end_events_after(ends[0].sequence, 10).await.unwrap();
    assert_eq!(after_first, ends[1..]);
    assert_eq!(store.end_events_after(0, 1).await.unwrap(), ends[..1]);
    assert!(store.end_events_after(last, 10).await.unwrap().is_empty());

    // The earliest end whose tokens may still be in use at `now`.
    let a_until = a_event.tokens_valid_until.unwrap();
    let b_until = b_event.tokens_valid_until.unwrap();
    assert!(a_until < b_until);
    let live = |now| store.earliest_live_end(now);
    assert_eq!(
        live(a_until - Duration::from_millis(1)).await.unwrap(),
        Some(ends[0].sequence)
    );
    assert_eq!(live(a_until).await.unwrap(), Some(ends[1].sequence));
    assert_eq!(live(b_until).await.unwrap(), None);
}

async fn leases_due_are_active_and_past_their_deadline_soonest_first(store: &dyn Store) {
    let mut soon = lease("soon");
    soon.idle_timeout = Duration::from_secs(60);
    let mut later = lease("later");
    later.idle_timeout = Duration::from_secs(120);
    let mut not_yet = lease("not-yet");
    not_yet.idle_timeout = Duration::from_secs(3000);
    let mut gone = lease("gone");
    gone.idle_timeout = Duration::from_secs(30);
    for l in [&later, &not_yet, &soon, &gone] {
        insert(store, l).await;
    }
    end(store, &gone, EndReason::Released, t0()).await;
    let now = t0() + Duration::from_secs(200);
    let due = store.leases_due(now, 10).await.unwrap();
    assert_eq!(ids(&due), [soon.id.as_str(), later.id.as_str()]);
    assert_eq!(
        ids(&store.leases_due(now, 1).await.unwrap()),
        [soon.id.as_str()]
    );
    // At the deadline itself, it is due.
    let at_deadline = store.leases_due(soon.deadline(), 10).await.unwrap();
    assert_eq!(ids(&at_deadline), [soon.id.as_str()]);
    // The deadline follows renewals.
    let mut renewed = soon.clone();
    renewed.last_active_at = now;
    store.update_lease(&renewed, None).await.unwrap().unwrap();
    assert_eq!(
        ids(&store.leases_due(now, 10).await.unwrap()),
        [later.id.as_str()]
    );
}

async fn active_leases_are_counted(store: &dyn Store) {
    assert_eq!(store.count_active_leases().await.unwrap(), 0);
    let a = lease("a");
    let b = lease("b");
    insert(store, &a).await;
    insert(store, &b).await;
    assert_eq!(store.count_active_leases().await.unwrap(), 2);
    end(store, &a, EndReason::Released, t0()).await;
    assert_eq!(store.count_active_leases().await.unwrap(), 1);
}

fn key(kid: &str, at: u64) -> StoredKey {
    StoredKey {
        kid: kid.into(),
        algorithm: "EdDSA".into(),
        public_key: vec![1; 32],
        sealed_private_key: vec![2; 60],
        created_at: t0() + Duration::from_secs(at),
        activates_at: t0() + Duration::from_secs(at + 10),
        retired_at: None,
    }
}

async fn signing_keys_rotate_by_compare_and_set(store: &dyn Store) {
    assert!(store.signing_keys().await.unwrap().is_empty());
    let k1 = key("k1", 0);
    assert!(store.rotate_signing_key(&k1, None).await.unwrap());
    // A racing first rotation (another replica starting) loses.
    assert!(
        !store
            .rotate_signing_key(&key("k1b", 0), None)
            .await
            .unwrap()
    );
    assert_eq!(
        store.signing_keys().await.unwrap(),
        std::slice::from_ref(&k1)
    );
    let k2 = key("k2", 100);
    // The store keeps the retirement time it is told (the domain's rule decides it).
    let at = k2.activates_at + Duration::from_secs(5);
    let retire = |kid| Some(Retire { kid, at });
    assert!(!store.rotate_signing_key(&k2, retire("k0")).await.unwrap());
    assert!(!store.rotate_signing_key(&k2, None).await.unwrap());
    assert!(store.rotate_signing_key(&k2, retire("k1")).await.unwrap());
    // Newest first.
    let retired = StoredKey {
        retired_at: Some(at),
        ..k1.clone()
    };
    assert_eq!(store.signing_keys().await.unwrap(), [k2.clone(), retired]);
    assert!(
        !store
            .rotate_signing_key(&key("k3", 200), retire("k1"))
            .await
            .unwrap()
    );
    assert_eq!(store.signing_keys().await.unwrap().len(), 2);
}

async fn purging_deletes_leases_ended_before_with_their_events(store: &dyn Store) {
    let mut old = Vec::new();
    for job in ["old-1", "old-2", "old-3"] {
        let l = lease(job);
        insert(store, &l).await;
        old.push(end(store, &l, EndReason::Expired, t0()).await);
    }
    let recent = lease("recent");
    insert(store, &recent).await;
    end(
        store,
        &recent,
        EndReason::Released,
        t0() + Duration::from_secs(100),
    )
    .await;
    let active = lease("active");
    insert(store, &active).await;
    let before = t0() + Duration::from_secs(50);
    assert_eq!(store.purge_ended(before, 2).await.unwrap(), 2);
    assert_eq!(store.purge_ended(before, 10).await.unwrap(), 1);
    assert_eq!(store.purge_ended(before, 10).await.unwrap(), 0);
    for l in &old {
        assert_eq!(store.get_lease(&l.id).await.unwrap(), None);
        assert!(store.lease_events(&l.id).await.unwrap().is_empty());
    }
    for l in [&recent, &active] {
        assert!(store.get_lease(&l.id).await.unwrap().is_some());
        assert!(!store.lease_events(&l.id).await.unwrap().is_empty());
    }
}

/// A lease of `issuer`'s user `sub`, granted from `session`, with logout policy
/// `on_logout`.
fn of_user(issuer: &str, sub: &str, session: Option<&str>, on_logout: OnLogout) -> Lease {
    let mut l = lease(&uuid::Uuid::new_v4().to_string());
    l.standing.issuer = issuer.into();
    l.standing.sub = Some(sub.into());
    l.standing.session_id = session.map(str::to_owned);
    l.standing.on_logout = on_logout;
    l
}

async fn a_logout_reaches_the_active_leases_that_end_on_logout(store: &dyn Store) {
    use OnLogout::{End, Survive};
    let idp = "https://idp";
    let in_session = of_user(idp, "u1", Some("s1"), End);
    let other_session = of_user(idp, "u1", Some("s2"), End);
    let no_session = of_user(idp, "u1", None, End);
    let surviving = of_user(idp, "u1", Some("s1"), Survive);
    let other_user = of_user(idp, "u2", Some("s3"), End);
    let other_issuer = of_user("https://other", "u1", Some("s1"), End);
    let ended_lease = of_user(idp, "u1", Some("s1"), End);
    for l in [
        &in_session,
        &other_session,
        &no_session,
        &surviving,
        &other_user,
        &other_issuer,
        &ended_lease,
    ] {
        insert(store, l).await;
    }
    end(store, &ended_lease, EndReason::Released, t0()).await;
    let reached = |issuer: &str, sid: Option<&str>, sub: Option<&str>| {
        let logout = Logout {
            issuer: issuer.into(),
            session_id: sid.map(str::to_owned),
            sub: sub.map(str::to_owned),
        };
        async move {
            let mut found: Vec<String> = store
                .leases_to_log_out(&logout, 100)
                .await
                .unwrap()
                .into_iter()
                .map(|l| l.id)
                .collect();
            found.sort();
            found
        }
    };
    let sorted = |leases: &[&Lease]| {
        let mut ids: Vec<String> = leases.iter().map(|l| l.id.clone()).collect();
        ids.sort();
        ids
    };
    // By session: that session's leases only.
    assert_eq!(reached(idp, Some("s1"), None).await, sorted(&[&in_session]));
    // By session and user: the session's leases, and the user's leases that recorded
    // no session (a lease of another session of the user survives).
    assert_eq!(
        reached(idp, Some("s1"), Some("u1")).await,
        sorted(&[&in_session, &no_session])
    );
    // By user alone: every lease of the user.
    assert_eq!(
        reached(idp, None, Some("u1")).await,
        sorted(&[&in_session, &other_session, &no_session])
    );
    // Only the given issuer's, and nothing for a logout that names no one.
    assert_eq!(
        reached("https://other", None, Some("u1")).await,
        sorted(&[&other_issuer])
    );
    assert!(
        reached("https://nobody", Some("s1"), Some("u1"))
            .await
            .is_empty()
    );
    assert!(reached(idp, None, None).await.is_empty());
    // At most `limit`.
    let logout = Logout {
        issuer: idp.into(),
        session_id: None,
        sub: Some("u1".into()),
    };
    assert_eq!(store.leases_to_log_out(&logout, 2).await.unwrap().len(), 2);
}

/// Runs each contract test on a temporary SQLite store and on PostgreSQL.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    let store = crate::store::SqliteStore::temporary().unwrap();
                    super::$name(&store).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let Some((store, schema)) = super::postgres().await else {
                        return;
                    };
                    super::$name(&store).await;
                    // The schema goes once the store is done with it.
                    drop(store);
                    drop(schema);
                }
            )*
        }
    };
}

/// A PostgreSQL store in a schema of its own (dropped with the returned guard), or
/// `None` when the PostgreSQL tests skip.
async fn postgres() -> Option<(super::PostgresStore, crate::testing::TestSchema)> {
    let url = crate::testing::postgres_url()?;
    let schema = crate::testing::TestSchema::new(&url, "jt_store");
    let options = super::postgres::PostgresOptions {
        url,
        schema: schema.name().to_owned(),
        max_connections: 4,
        statement_timeout: Duration::from_secs(10),
        ca_file: None,
    };
    let store = super::PostgresStore::connect(&options).await.unwrap();
    Some((store, schema))
}

on_both_stores!(
    a_lease_reads_back_as_inserted,
    an_actor_holds_one_active_lease_per_job_of_a_tenant,
    an_update_is_a_compare_and_set_on_the_version,
    leases_list_newest_first_by_filter_and_page,
    events_read_back_in_order_and_end_events_by_cursor,
    leases_due_are_active_and_past_their_deadline_soonest_first,
    active_leases_are_counted,
    signing_keys_rotate_by_compare_and_set,
    purging_deletes_leases_ended_before_with_their_events,
    a_logout_reaches_the_active_leases_that_end_on_logout,
);
