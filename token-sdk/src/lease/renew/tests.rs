//! The renewal task in virtual time, against the scripted service of `lease::fake`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use jobtoken_proto::wire;
use tokio::sync::watch;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::end::{END_DETAIL_METADATA, EndReason};
use crate::error::{MAX_RETRY_DELAY, retry_delay};
use crate::health::Health;
use crate::lease::LeaseState;
use crate::lease::fake::*;
use crate::schedule::RenewalConfig;

#[tokio::test(start_paused = true)]
async fn a_job_that_reports_progress_keeps_its_lease_and_a_stalled_one_is_released() {
    let fake = Fake::new(Duration::from_secs(4));
    let config = RenewalConfig {
        stall_timeout: Some(Duration::from_secs(10)),
        ..no_jitter()
    };
    let lease = hold(&fake, config);
    let start = crate::clock::now();
    // Progress every 2 s for a minute: renewals go on, the lease stays.
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        lease.progress();
    }
    assert_eq!(lease.state(), LeaseState::Active);
    let renewals = fake.calls().len();
    assert!(
        renewals >= 15,
        "{renewals} renewals in a minute of 4 s tokens"
    );
    // Then the job hangs: within the stall timeout (plus nothing) the lease ends.
    let hung = crate::clock::now();
    let end = lease.ended().await;
    let took = crate::clock::now() - hung;
    assert_eq!(end.reason, EndReason::Stalled);
    assert!(end.detail.contains("no progress"), "{}", end.detail);
    assert!(took <= Duration::from_secs(10), "{took:?}");
    assert!(took >= Duration::from_secs(8), "{took:?}");
    // It was released (tokens die at the service), and renewing stopped.
    assert_eq!(fake.releases.load(Ordering::SeqCst), 1);
    let calls = fake.calls().len();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(fake.calls().len(), calls);
    assert!(crate::clock::now() - start > Duration::from_secs(60));
}

#[tokio::test(start_paused = true)]
async fn a_stalled_job_hears_at_once_even_when_the_service_is_away_and_max_means_never() {
    let fake = Fake::new(Duration::from_secs(4));
    let config = RenewalConfig {
        stall_timeout: Some(Duration::from_secs(5)),
        ..no_jitter()
    };
    let lease = hold(&fake, config);
    // Every call from now on hangs (a black-holed connection), the release too.
    fake.hangs.store(usize::MAX, Ordering::SeqCst);
    fake.release_hangs.store(true, Ordering::SeqCst);
    let end = tokio::time::timeout(Duration::from_secs(30), lease.ended())
        .await
        .expect("ended() resolves although the release never answers");
    assert_eq!(end.reason, EndReason::Stalled);

    let fake = Fake::new(Duration::from_secs(4));
    let never = RenewalConfig {
        stall_timeout: Some(Duration::MAX),
        ..no_jitter()
    };
    let lease = hold(&fake, never);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(lease.state(), LeaseState::Active);
    assert!(fake.calls().len() >= 10);
}

#[tokio::test(start_paused = true)]
async fn an_administrators_reason_reaches_the_job_once() {
    use tonic_types::{ErrorDetails, StatusExt};
    let fake = Fake::new(Duration::from_secs(4));
    let metadata = HashMap::from([(END_DETAIL_METADATA.to_owned(), "stolen laptop".to_owned())]);
    fake.then(Err(Status::with_error_details(
        tonic::Code::FailedPrecondition,
        "the lease has ended: revoked by an administrator",
        ErrorDetails::with_error_info(wire::reason::LEASE_REVOKED, wire::ERROR_DOMAIN, metadata),
    )));
    let lease = hold(&fake, no_jitter());
    let end = lease.ended().await;
    assert_eq!(end.reason, EndReason::Revoked);
    assert!(end.detail.contains("stolen laptop"), "{}", end.detail);
    assert_eq!(end.detail.matches("revoked").count(), 1, "{}", end.detail);
}

#[tokio::test(start_paused = true)]
async fn without_a_stall_timeout_progress_does_not_matter() {
    let fake = Fake::new(Duration::from_secs(4));
    let lease = hold(&fake, no_jitter());
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(lease.state(), LeaseState::Active);
    assert_eq!(fake.releases.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn after_a_long_outage_a_fresh_token_comes_within_the_retry_interval() {
    // 2 s tokens, the service gone for 30 s from just before the first renewal.
    let fake = Fake::new(Duration::from_secs(2));
    let start = crate::clock::now();
    let back = start + Duration::from_secs(31);
    *fake.down_until.lock().unwrap() = Some(back);
    let health = Arc::new(Health::new());
    let lease = hold_signalled(&fake, no_jitter(), info(), None, Arc::clone(&health));
    let mut changes = lease.changes();
    let got = next_token(&mut changes).await;
    // No signal here: the schedule alone. The old one waited 5-10 s at this point.
    let late = got - back;
    assert!(late <= Duration::from_millis(1505), "{late:?}");
    let calls = fake.calls();
    let after_expiry: Vec<Duration> = calls
        .windows(2)
        .filter(|w| w[0].0 >= start + Duration::from_secs(2))
        .map(|w| w[1].0 - w[0].0)
        .collect();
    assert!(
        after_expiry
            .iter()
            .all(|g| *g >= Duration::from_millis(500) && *g <= Duration::from_millis(1510)),
        "{after_expiry:?}"
    );
    // The outage and the time with an expired token are on record.
    let stats = health.stats();
    assert_eq!(stats.outages, 1);
    assert_eq!(stats.failures[0].0, tonic::Code::Unavailable);
    assert_eq!(stats.failures[0].1, calls.len() as u64 - 1);
    let expired = stats.expired_token_time;
    assert!(expired >= Duration::from_secs(29) && expired <= Duration::from_secs(31));
}

#[tokio::test(start_paused = true)]
async fn the_service_seen_back_cuts_the_wait_short() {
    let fake = Fake::new(Duration::from_secs(2));
    let start = crate::clock::now();
    let back = start + Duration::from_secs(10);
    *fake.down_until.lock().unwrap() = Some(back);
    let (signal, reconnected) = watch::channel(0u64);
    // A slow schedule, to tell them apart: once the 2 s token has expired, retries come
    // 30-90 s apart (the jitter is random), so none can land near the return at 10 s
    // and answer before the signal does.
    let config = RenewalConfig {
        retry_interval: Duration::from_secs(60),
        ..no_jitter()
    };
    let lease = hold_signalled(
        &fake,
        config,
        info(),
        Some(reconnected),
        Arc::new(Health::new()),
    );
    let mut changes = lease.changes();
    // A return signalled before the renewal starts failing is old news.
    signal.send_replace(1);
    tokio::time::sleep_until(back + Duration::from_millis(20)).await;
    let before = fake.calls().len();
    signal.send_replace(2);
    let got = next_token(&mut changes).await;
    assert!(got - back < Duration::from_millis(40), "{:?}", got - back);
    assert_eq!(fake.calls().len(), before + 1, "one attempt on the signal");
}

#[tokio::test(start_paused = true)]
async fn a_caller_asking_cuts_a_healthy_backoff_short_once() {
    // 300 s tokens: the renewal at 210 s fails for a minute, so backoff is long.
    let fake = Fake::new(Duration::from_secs(300));
    let start = crate::clock::now();
    *fake.down_until.lock().unwrap() = Some(start + Duration::from_secs(270));
    let lease = hold(&fake, no_jitter());
    tokio::time::sleep_until(start + Duration::from_secs(250)).await;
    let failed = fake.calls().len();
    assert!(failed >= 6, "{failed}");
    let asked = tokio::spawn({
        let lease = lease.clone();
        async move { lease.refresh_now().await }
    });
    tokio::time::sleep(Duration::from_millis(1)).await;
    let calls = fake.calls();
    assert_eq!(calls.len(), failed + 1, "asking renews at once");
    assert!(calls.last().unwrap().0 - start < Duration::from_millis(250_002));
    // The ask failed; the same standing request does not retry at once again.
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(fake.calls().len(), failed + 1);
    // ...and many more callers share it.
    for _ in 0..50 {
        let lease = lease.clone();
        tokio::spawn(async move { lease.refresh_now().await });
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(fake.calls().len(), failed + 1);
    let token = asked.await.unwrap().unwrap();
    assert_eq!(token.generation(), 1);
}

#[tokio::test(start_paused = true)]
async fn rate_limited_renewals_wait_as_long_as_the_service_asks() {
    let fake = Fake::new(Duration::from_secs(10));
    let limited = <Status as tonic_types::StatusExt>::with_error_details(
        tonic::Code::ResourceExhausted,
        "slow down",
        tonic_types::ErrorDetails::with_retry_info(Some(Duration::from_secs(3))),
    );
    fake.then(Err(limited));
    // Absurd delays are clamped rather than obeyed.
    let absurd = <Status as tonic_types::StatusExt>::with_error_details(
        tonic::Code::ResourceExhausted,
        "slow down",
        tonic_types::ErrorDetails::with_retry_info(Some(Duration::from_secs(1 << 40))),
    );
    assert_eq!(retry_delay(&absurd), Some(MAX_RETRY_DELAY));
    let lease = hold(&fake, no_jitter());
    let mut changes = lease.changes();
    tokio::time::sleep(Duration::from_millis(7100)).await;
    // Asking does not get round the delay either.
    let asked = tokio::spawn({
        let lease = lease.clone();
        async move { lease.refresh_now().await }
    });
    next_token(&mut changes).await;
    let calls = fake.calls();
    assert_eq!(calls.len(), 2);
    let gap = calls[1].0 - calls[0].0;
    assert!(gap >= Duration::from_secs(3), "{gap:?}");
    assert!(gap < Duration::from_millis(3100), "{gap:?}");
    asked.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn renews_at_seventy_percent_from_durations_chaining_refresh_tokens() {
    let fake = Fake::new(Duration::from_secs(100));
    let start = crate::clock::now();
    let lease = hold(&fake, no_jitter());
    let mut changes = lease.changes();
    for n in 1..=5u64 {
        changes.changed().await.unwrap();
        assert_eq!(lease.access_token().generation(), n);
        assert_eq!(lease.access_token().secret(), format!("access-{n}"));
    }
    let calls = fake.calls();
    for (i, (at, presented)) in calls.iter().enumerate() {
        // Each renewal presents the refresh token of the previous answer...
        assert_eq!(presented, &format!("rt-{i}"));
        // ...70 s after that answer arrived (answers take 5 ms).
        let expected = start + Duration::from_millis(70_000 * (i as u64 + 1) + 5 * i as u64);
        assert_eq!(*at, expected, "renewal {i}");
    }
    assert_eq!(lease.state(), LeaseState::Active);
}

#[tokio::test(start_paused = true)]
async fn transient_failures_retry_the_same_token_with_backoff_inside_the_token_life() {
    let fake = Fake::new(Duration::from_secs(10));
    for _ in 0..4 {
        fake.then(Err(unavailable()));
    }
    let lease = hold(&fake, no_jitter());
    let mut changes = lease.changes();
    changes.changed().await.unwrap();
    let calls = fake.calls();
    assert_eq!(calls.len(), 5);
    assert!(
        calls.iter().all(|(_, t)| t == "rt-0"),
        "retries reuse the token: {calls:?}"
    );
    // The first retry 7 s in; all retries before the 10 s token expires.
    let first = calls[0].0;
    let last = calls[4].0;
    assert!(last - first < Duration::from_secs(3), "{:?}", last - first);
    let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1].0 - w[0].0).collect();
    assert!(
        gaps.iter().all(|g| *g >= crate::schedule::FLOOR),
        "{gaps:?}"
    );
    assert_eq!(lease.state(), LeaseState::Active);
    assert_eq!(lease.access_token().generation(), 1);
}

#[tokio::test(start_paused = true)]
async fn terminal_failures_end_the_lease_with_the_reason() {
    use wire::reason as r;
    for (reason, expected) in [
        (r::LEASE_REVOKED, EndReason::Revoked),
        (r::LEASE_EXPIRED, EndReason::Expired),
        (r::LEASE_IDLE_TIMEOUT, EndReason::IdleTimeout),
        (r::REFRESH_TOKEN_REUSED, EndReason::RefreshTokenReused),
        (r::REFRESH_TOKEN_INVALID, EndReason::Superseded),
        (r::PERMISSIONS_WITHDRAWN, EndReason::PermissionsWithdrawn),
        (r::SUBJECT_DISABLED, EndReason::SubjectDisabled),
        (r::SUBJECT_LOGGED_OUT, EndReason::SubjectLoggedOut),
        (
            r::PERMISSIONS_UNVERIFIABLE,
            EndReason::PermissionsUnverifiable,
        ),
        ("SOMETHING_NEW", EndReason::Rejected),
    ] {
        let fake = Fake::new(Duration::from_secs(10));
        fake.then(Err(terminal(reason)));
        let lease = hold(&fake, no_jitter());
        let end = lease.ended().await;
        assert_eq!(end.reason, expected, "{reason}");
        assert!(end.detail.contains(reason));
        assert!(matches!(lease.state(), LeaseState::Ended(_)));
        // No renewal after a terminal answer.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(fake.calls().len(), 1, "{reason}");
        // The interceptor refuses locally once the lease has ended.
        let err = lease.interceptor().call(Request::new(())).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }
}

#[tokio::test(start_paused = true)]
async fn a_hanging_renewal_times_out_and_is_retried() {
    let fake = Fake::new(Duration::from_secs(60));
    fake.hangs.store(1, Ordering::SeqCst);
    let lease = hold(&fake, no_jitter());
    let mut changes = lease.changes();
    changes.changed().await.unwrap();
    let calls = fake.calls();
    assert_eq!(calls.len(), 2);
    let gap = calls[1].0 - calls[0].0;
    // The timeout (half the 18 s of token life left at the 70% point), then the first
    // backoff (100-200 ms with jitter).
    let timeout = Duration::from_secs(9);
    assert!(gap >= timeout + Duration::from_millis(100), "{gap:?}");
    assert!(gap <= timeout + Duration::from_millis(200), "{gap:?}");
    assert_eq!(calls[1].1, "rt-0", "the retry reuses the refresh token");
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_service_ends_the_lease_locally_at_its_limits() {
    // Hard expiry 30 s away, the service unreachable for good.
    let fake = Fake::new(Duration::from_secs(10));
    for _ in 0..10_000 {
        fake.then(Err(unavailable()));
    }
    let start = crate::clock::now();
    let lease = hold_with(
        &fake,
        no_jitter(),
        info_with(Some(Duration::from_secs(30)), None),
    );
    let end = lease.ended().await;
    assert_eq!(end.reason, EndReason::Expired);
    let took = crate::clock::now() - start;
    assert!(
        took >= Duration::from_secs(30) && took < Duration::from_secs(41),
        "{took:?}"
    );
    // Idle timeout: no successful renewal for 20 s.
    let fake = Fake::new(Duration::from_secs(10));
    for _ in 0..10_000 {
        fake.then(Err(unavailable()));
    }
    let lease = hold_with(
        &fake,
        no_jitter(),
        info_with(None, Some(Duration::from_secs(20))),
    );
    assert_eq!(lease.ended().await.reason, EndReason::IdleTimeout);
}
