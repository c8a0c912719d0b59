//! A scripted service for the lease's tests: renewals answered from a script, then with
//! fresh tokens; every call recorded with its time. Used with paused tokio time.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use jobtoken_proto::wire;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Status;

use super::{AccessToken, Lease, LeaseInfo, Renewal};
use crate::api::{Api, Renewed};
use crate::health::Health;
use crate::proto;
use crate::schedule::RenewalConfig;

/// A scripted service: answers renewals from a script, then with fresh tokens of
/// `life`; records every call.
pub(crate) struct Fake {
    pub(crate) life: Duration,
    pub(crate) script: Mutex<VecDeque<Result<(), Status>>>,
    /// Answers that never come (a black-holed connection), before the script.
    pub(crate) hangs: AtomicUsize,
    pub(crate) presented: Mutex<Vec<(Instant, String)>>,
    pub(crate) releases: AtomicUsize,
    pub(crate) issued: AtomicUsize,
    /// An outage: every renewal before this instant fails with UNAVAILABLE.
    pub(crate) down_until: Mutex<Option<Instant>>,
    /// Releases never answer.
    pub(crate) release_hangs: AtomicBool,
    /// The lease's permissions stated by successful renewals; `None`: answers carry no
    /// lease.
    pub(crate) granted: Mutex<Option<Vec<String>>>,
}

impl Fake {
    pub(crate) fn new(life: Duration) -> Arc<Fake> {
        Arc::new(Fake {
            life,
            script: Mutex::new(VecDeque::new()),
            hangs: AtomicUsize::new(0),
            presented: Mutex::new(Vec::new()),
            releases: AtomicUsize::new(0),
            issued: AtomicUsize::new(0),
            down_until: Mutex::new(None),
            release_hangs: AtomicBool::new(false),
            granted: Mutex::new(Some(info().permissions)),
        })
    }

    pub(crate) fn then(&self, answer: Result<(), Status>) {
        self.script.lock().unwrap().push_back(answer);
    }

    fn pair(&self) -> proto::TokenPair {
        let n = self.issued.fetch_add(1, Ordering::SeqCst);
        proto::TokenPair {
            access_token: format!("access-{n}"),
            access_token_expires_in: prost_types::Duration::try_from(self.life).ok(),
            // Deliberately absurd: the SDK must schedule from the duration only.
            access_token_expires_at: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: 0,
            }),
            refresh_token: format!("rt-{n}"),
            token_type: "Bearer".into(),
        }
    }

    pub(crate) fn calls(&self) -> Vec<(Instant, String)> {
        self.presented.lock().unwrap().clone()
    }
}

#[async_trait]
impl Api for Fake {
    async fn refresh(&self, _: &str, refresh_token: &str) -> Result<Renewed, Status> {
        self.presented
            .lock()
            .unwrap()
            .push((crate::clock::now(), refresh_token.to_owned()));
        if self
            .hangs
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            std::future::pending::<()>().await;
        }
        // A round trip takes a moment, so racing callers overlap.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let down = *self.down_until.lock().unwrap();
        if down.is_some_and(|until| crate::clock::now() < until) {
            return Err(Status::unavailable("connection refused"));
        }
        let next = self.script.lock().unwrap().pop_front();
        match next {
            Some(Err(status)) => Err(status),
            _ => Ok(Renewed {
                tokens: self.pair(),
                permissions: self.granted.lock().unwrap().clone(),
            }),
        }
    }

    async fn release(&self, _: &str, _: proto::JobOutcome, _: &str) -> Result<(), Status> {
        self.releases.fetch_add(1, Ordering::SeqCst);
        if self.release_hangs.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

pub(crate) fn info() -> LeaseInfo {
    info_with(None, None)
}

pub(crate) fn info_with(remaining: Option<Duration>, idle_timeout: Option<Duration>) -> LeaseInfo {
    LeaseInfo {
        lease_id: "lease-1".into(),
        job_id: "job-1".into(),
        tenant: "acme".into(),
        subject: "alice".into(),
        actor: "importer".into(),
        permissions: vec!["a.read".into()],
        expires_at: None,
        idle_timeout,
        remaining,
        on_logout: None,
    }
}

pub(crate) fn no_jitter() -> RenewalConfig {
    RenewalConfig {
        jitter: 0.0,
        ..RenewalConfig::default()
    }
}

pub(crate) fn hold(fake: &Arc<Fake>, config: RenewalConfig) -> Lease {
    hold_with(fake, config, info())
}

pub(crate) fn hold_with(fake: &Arc<Fake>, config: RenewalConfig, info: LeaseInfo) -> Lease {
    hold_signalled(fake, config, info, None, Arc::new(Health::new()))
}

pub(crate) fn hold_signalled(
    fake: &Arc<Fake>,
    config: RenewalConfig,
    info: LeaseInfo,
    reconnected: Option<watch::Receiver<u64>>,
    health: Arc<Health>,
) -> Lease {
    let first = fake.pair();
    Lease::start(
        info,
        first,
        Renewal {
            api: Arc::clone(fake) as Arc<dyn Api>,
            config,
            release_on_drop: true,
            watcher: None,
            health,
            reconnected,
        },
    )
}

/// Waits for the next token and returns when it arrived.
pub(crate) async fn next_token(changes: &mut watch::Receiver<Arc<AccessToken>>) -> Instant {
    changes.changed().await.unwrap();
    crate::clock::now()
}

pub(crate) fn unavailable() -> Status {
    Status::unavailable("connection reset")
}

pub(crate) fn terminal(reason: &str) -> Status {
    <Status as tonic_types::StatusExt>::with_error_details(
        tonic::Code::FailedPrecondition,
        "the lease has ended",
        tonic_types::ErrorDetails::with_error_info(
            reason,
            wire::ERROR_DOMAIN,
            std::collections::HashMap::new(),
        ),
    )
}
