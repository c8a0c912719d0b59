//! Following the service's revocation stream: ends that the service records (an
//! administrator's revoke, say) reach leases and verifiers within a second, not at the
//! next renewal.
//!
//! The stream runs on a connection of its own (see [`crate::Client`]), reconnects on
//! its own fast schedule ([`reconnect_in`]) from its cursor, so nothing ended while it was
//! down is missed, and reports whether it is live ([`RevocationFeed`]). Its reopening is
//! the client's signal that the service is back. If the follower dies (a panic), it is
//! restarted from the same cursor; it never goes blind silently.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::watch;

use crate::end::{EndReason, Ending, LeaseEnd};
use crate::error::retry_delay;
use crate::health::{Feed, RevocationFeed, millis};
use crate::schedule::{RenewalConfig, reconnect_in};
use crate::{JobTokenClient, proto};

/// The service sends a heartbeat every 30 s; a stream silent for longer than this is
/// presumed dead (a half-open connection) and reopened from its cursor. The stream's
/// connection also sends HTTP/2 pings, which notice a dead peer much sooner.
const SILENCE: Duration = Duration::from_secs(75);

/// Shortest wait for the stream to open.
const MIN_OPEN_TIMEOUT: Duration = Duration::from_secs(1);

/// Receives the lease ends of a revocation stream. Only the fields every event carries
/// for verification are read: tenant, lease id, reason, `tokens_valid_until`, cursor.
pub(crate) trait EndSink: Send + Sync + 'static {
    /// One lease ended.
    fn on_end(&self, event: &proto::WatchRevocationsResponse);

    /// A heartbeat: the stream is live and covers `event.tenants` (empty: all).
    fn on_heartbeat(&self, _event: &proto::WatchRevocationsResponse) {}
}

/// The revocation stream's events.
pub(crate) type Events =
    futures::stream::BoxStream<'static, Result<proto::WatchRevocationsResponse, tonic::Status>>;

/// Opens the revocation stream; behind a trait so tests can script it.
#[async_trait::async_trait]
pub(crate) trait Source: Send + Sync + 'static {
    async fn open(&self, request: proto::WatchRevocationsRequest) -> Result<Events, tonic::Status>;
}

#[async_trait::async_trait]
impl Source for JobTokenClient {
    async fn open(&self, request: proto::WatchRevocationsRequest) -> Result<Events, tonic::Status> {
        let events = self.clone().watch_revocations(request).await?.into_inner();
        Ok(Box::pin(events))
    }
}

/// A running revocation stream. Dropping it stops the stream.
pub(crate) struct Subscription {
    _stop: watch::Sender<()>,
    feed: Arc<Feed>,
}

/// Where a (re)started follower resumes.
type Cursor = Arc<Mutex<Option<u64>>>;

impl Subscription {
    /// Follows the revocation stream into `sink` until dropped, reporting its state in
    /// `feed`. With `replay_live`, starts with every end whose tokens may still be valid;
    /// otherwise from now.
    pub(crate) fn start(
        source: Arc<dyn Source>,
        sink: Arc<dyn EndSink>,
        replay_live: bool,
        config: RenewalConfig,
        feed: Arc<Feed>,
    ) -> Subscription {
        let (stop, mut stopped) = watch::channel(());
        feed.connecting();
        let follower = Follower {
            source,
            sink,
            replay_live,
            config,
            feed: Arc::clone(&feed),
            cursor: Cursor::default(),
        };
        tokio::spawn(async move {
            let mut restarts = 0u32;
            loop {
                let task = tokio::spawn(follower.clone().follow());
                let abort = task.abort_handle();
                tokio::select! {
                    // The owner dropped the subscription.
                    _ = stopped.changed() => {
                        abort.abort();
                        return;
                    }
                    joined = task => match joined {
                        Err(e) if e.is_panic() => {
                            follower.feed.blind();
                            tracing::error!(
                                restarts,
                                "the revocation stream follower panicked; restarting it from its cursor"
                            );
                        }
                        _ => return,
                    },
                }
                let wait = reconnect_in(restarts, &follower.config, fastrand::f64());
                restarts = restarts.saturating_add(1);
                tokio::select! {
                    _ = stopped.changed() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        });
        Subscription { _stop: stop, feed }
    }

    /// Waits (at most `limit`) until the stream is open and caught up (its first
    /// heartbeat follows the backlog), so every end it replays has been seen.
    pub(crate) async fn wait_ready(&self, limit: Duration) {
        let mut state = self.feed.state.subscribe();
        let _ = tokio::time::timeout(limit, async {
            let _ = state.wait_for(|s| *s == RevocationFeed::Live).await;
        })
        .await;
    }
}

#[derive(Clone)]
struct Follower {
    source: Arc<dyn Source>,
    sink: Arc<dyn EndSink>,
    replay_live: bool,
    config: RenewalConfig,
    feed: Arc<Feed>,
    cursor: Cursor,
}

impl Follower {
    fn cursor(&self) -> Option<u64> {
        *self.cursor.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn follow(self) {
        let open_timeout = (self.config.retry_interval * 2).max(MIN_OPEN_TIMEOUT);
        let mut attempt = 0u32;
        loop {
            let request = proto::WatchRevocationsRequest {
                after_cursor: self.cursor(),
                replay_live: self.replay_live,
                ..Default::default()
            };
            let opened = tokio::time::timeout(open_timeout, self.source.open(request)).await;
            let mut at_least = Duration::ZERO;
            let failure = match opened {
                Ok(Ok(mut events)) => {
                    loop {
                        match tokio::time::timeout(SILENCE, events.next()).await {
                            Ok(Some(Ok(event))) => {
                                attempt = 0;
                                if event.heartbeat {
                                    self.sink.on_heartbeat(&event);
                                    self.feed.live();
                                } else {
                                    self.sink.on_end(&event);
                                }
                                // After the sink: an end is never skipped by a restart.
                                *self.cursor.lock().unwrap_or_else(|e| e.into_inner()) =
                                    Some(event.cursor);
                            }
                            Ok(None) => break "closed by the service".to_owned(),
                            Ok(Some(Err(status))) => break format!("{:?}", status.code()),
                            Err(_) => break "silent too long".to_owned(),
                        }
                    }
                }
                Ok(Err(status)) => {
                    // A cursor beyond the service's newest event: its store was replaced
                    // (restored or recreated). Waiting for that cursor would be blind
                    // forever; start over from what the service has.
                    if status.code() == tonic::Code::InvalidArgument
                        && crate::error::error_field(&status).as_deref() == Some("after_cursor")
                    {
                        tracing::warn!(
                            "the revocation stream's cursor is ahead of the service; starting over"
                        );
                        *self.cursor.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    }
                    // A stream cap or rate limit: never sooner than the service asked.
                    at_least = retry_delay(&status).unwrap_or_default();
                    format!("{:?}", status.code())
                }
                Err(_) => "open timed out".to_owned(),
            };
            self.feed.blind();
            let wait = reconnect_in(attempt, &self.config, fastrand::f64()).max(at_least);
            attempt = attempt.saturating_add(1);
            tracing::debug!(
                attempt,
                failure,
                retry_in_ms = millis(wait),
                "revocation stream reconnecting"
            );
            tokio::time::sleep(wait).await;
        }
    }
}

/// Lease ends are routed by tenant, then lease id.
type LeaseKey = (String, String);

/// Routes revocation events to the leases of this process.
pub(crate) struct Watcher {
    leases: Mutex<HashMap<LeaseKey, Weak<dyn Ending>>>,
}

/// The lease router and its stream; leases hold it, and the stream stops with the last.
pub(crate) struct LeaseWatch {
    router: Arc<Watcher>,
    subscription: Subscription,
}

impl EndSink for Watcher {
    fn on_end(&self, event: &proto::WatchRevocationsResponse) {
        let lease = {
            let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            leases.remove(&(event.tenant.clone(), event.lease_id.clone()))
        };
        if let Some(lease) = lease.and_then(|l| l.upgrade()) {
            lease.finish(LeaseEnd {
                reason: EndReason::from_proto(event.reason()),
                detail: "reported by the revocation stream (the reason an administrator gave is in GetLease)".into(),
            });
        }
    }
}

impl LeaseWatch {
    /// Starts routing lease ends from the service's stream.
    pub(crate) fn start(client: JobTokenClient, config: RenewalConfig) -> Arc<LeaseWatch> {
        let feed = Arc::new(Feed::new(true));
        let router = Arc::new(Watcher {
            leases: Mutex::new(HashMap::new()),
        });
        let subscription =
            Subscription::start(Arc::new(client), router.clone(), false, config, feed);
        Arc::new(LeaseWatch {
            router,
            subscription,
        })
    }

    pub(crate) async fn wait_ready(&self, limit: Duration) {
        self.subscription.wait_ready(limit).await;
    }

    /// The stream's state and its "service is back" signal.
    pub(crate) fn feed(&self) -> &Arc<Feed> {
        &self.subscription.feed
    }

    /// Routes the ends of lease `lease_id` of `tenant` to `lease` while it lives.
    pub(crate) fn register(&self, tenant: &str, lease_id: &str, lease: Weak<dyn Ending>) {
        let mut leases = self.router.leases.lock().unwrap_or_else(|e| e.into_inner());
        leases.retain(|_, lease| lease.strong_count() > 0);
        leases.insert((tenant.to_owned(), lease_id.to_owned()), lease);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicBool, Ordering};

    use futures::stream;
    use tokio::time::Instant;
    use tonic::Status;

    use super::*;

    /// A scripted service: each open takes the next answer, and is recorded with its
    /// cursor and time. Streams stay open after their events (no end).
    #[derive(Default)]
    struct Script {
        answers: Mutex<VecDeque<Result<Vec<proto::WatchRevocationsResponse>, Status>>>,
        opens: Mutex<Vec<(Instant, Option<u64>)>>,
    }

    #[async_trait::async_trait]
    impl Source for Script {
        async fn open(&self, request: proto::WatchRevocationsRequest) -> Result<Events, Status> {
            self.opens
                .lock()
                .unwrap()
                .push((crate::clock::now(), request.after_cursor));
            let next = self.answers.lock().unwrap().pop_front();
            match next {
                Some(Ok(events)) => Ok(Box::pin(
                    stream::iter(events.into_iter().map(Ok)).chain(stream::pending()),
                )),
                Some(Err(status)) => Err(status),
                None => Ok(Box::pin(stream::pending())),
            }
        }
    }

    fn end(lease: &str, cursor: u64) -> proto::WatchRevocationsResponse {
        proto::WatchRevocationsResponse {
            tenant: "acme".into(),
            lease_id: lease.into(),
            cursor,
            ..Default::default()
        }
    }

    fn heartbeat(cursor: u64) -> proto::WatchRevocationsResponse {
        proto::WatchRevocationsResponse {
            heartbeat: true,
            cursor,
            ..Default::default()
        }
    }

    /// Records ends; panics on the first sight of lease "poison".
    #[derive(Default)]
    struct Sink {
        seen: Mutex<Vec<String>>,
        panicked: AtomicBool,
    }

    impl EndSink for Sink {
        fn on_end(&self, event: &proto::WatchRevocationsResponse) {
            if event.lease_id == "poison" && !self.panicked.swap(true, Ordering::SeqCst) {
                panic!("a sink bug");
            }
            self.seen.lock().unwrap().push(event.lease_id.clone());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_that_dies_is_restarted_from_its_cursor() {
        let script = Arc::new(Script::default());
        script.answers.lock().unwrap().extend([
            Ok(vec![
                heartbeat(1),
                end("a", 2),
                end("poison", 3),
                end("b", 4),
            ]),
            Ok(vec![end("poison", 3), end("b", 4), heartbeat(5)]),
        ]);
        let sink = Arc::new(Sink::default());
        let feed = Arc::new(Feed::new(true));
        let _subscription = Subscription::start(
            script.clone(),
            sink.clone(),
            true,
            RenewalConfig::default(),
            Arc::clone(&feed),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Died on "poison": blind, and nothing after it was taken as seen.
        assert!(matches!(feed.get(), RevocationFeed::Blind { .. }));
        assert_eq!(*sink.seen.lock().unwrap(), ["a"]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(*sink.seen.lock().unwrap(), ["a", "poison", "b"]);
        assert_eq!(feed.get(), RevocationFeed::Live);
        let opens = script.opens.lock().unwrap().clone();
        assert_eq!(
            opens.iter().map(|(_, c)| *c).collect::<Vec<_>>(),
            [None, Some(2)],
            "resumed after the last end it delivered"
        );
        let gap = opens[1].0 - opens[0].0;
        assert!(gap >= Duration::from_millis(125) && gap <= Duration::from_millis(250));
    }

    #[tokio::test(start_paused = true)]
    async fn reconnects_fast_but_never_sooner_than_the_service_asks() {
        let script = Arc::new(Script::default());
        let limited = <Status as tonic_types::StatusExt>::with_error_details(
            tonic::Code::ResourceExhausted,
            "too many streams",
            tonic_types::ErrorDetails::with_retry_info(Some(Duration::from_secs(3))),
        );
        script.answers.lock().unwrap().extend([
            Ok(vec![heartbeat(1)]),
            Err(Status::unavailable("connection refused")),
            Err(limited),
            Ok(vec![end("x", 2), heartbeat(3)]),
        ]);
        // The first stream breaks right after its heartbeat (see `Breaking`).
        let sink = Arc::new(Sink::default());
        let feed = Arc::new(Feed::new(true));
        let mut back = feed.reconnected.subscribe();
        let broken: Arc<dyn Source> = Arc::new(Breaking(script.clone()));
        let _subscription = Subscription::start(
            broken,
            sink.clone(),
            false,
            RenewalConfig::default(),
            Arc::clone(&feed),
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        back.borrow_and_update();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let opens = script.opens.lock().unwrap().clone();
        assert_eq!(opens.len(), 4, "{opens:?}");
        let gaps: Vec<Duration> = opens.windows(2).map(|w| w[1].0 - w[0].0).collect();
        assert!(gaps[0] <= Duration::from_millis(250), "{gaps:?}");
        assert!(gaps[1] <= Duration::from_millis(500), "{gaps:?}");
        assert!(
            gaps[2] >= Duration::from_secs(3),
            "RetryInfo honoured: {gaps:?}"
        );
        assert!(
            opens.iter().skip(1).all(|(_, c)| *c == Some(1)),
            "{opens:?}"
        );
        assert_eq!(*sink.seen.lock().unwrap(), ["x"]);
        assert_eq!(feed.get(), RevocationFeed::Live);
        assert!(back.has_changed().unwrap(), "the return was signalled");
    }

    /// The first stream it opens ends right after its events, as a dropped connection.
    struct Breaking(Arc<Script>);

    #[async_trait::async_trait]
    impl Source for Breaking {
        async fn open(&self, request: proto::WatchRevocationsRequest) -> Result<Events, Status> {
            let first = self.0.opens.lock().unwrap().is_empty();
            let events = self.0.open(request).await?;
            if first {
                Ok(Box::pin(events.take(1).chain(stream::once(async {
                    Err(Status::unavailable("reset"))
                }))))
            } else {
                Ok(events)
            }
        }
    }
}
