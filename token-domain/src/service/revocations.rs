//! The revocation stream, as the domain sees it: where a stream starts, which tenants'
//! ends it carries, and when it says it has caught up. The transport (gRPC server
//! streaming) drives it: it calls [`Revocations::next`] when woken (an end here, an end
//! on another replica, a poll tick), sends what it gets, and sends a heartbeat with
//! [`Revocations::cursor`] and [`Revocations::covered`] when the stream has been quiet.

use std::collections::HashSet;

use super::*;

/// Ends read per store query.
pub const BATCH: usize = 500;

/// Where a revocation stream starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// After this cursor (a reconnecting watcher's last one).
    After(u64),
    /// At the oldest end whose tokens may still be valid (a watcher with no state).
    LiveEnds,
    /// After the newest event: only ends from now on.
    Newest,
}

/// What a stream has to say next.
#[derive(Debug)]
pub enum Next {
    /// Ends after the cursor that the stream carries, oldest first (maybe none, when
    /// every end read was another tenant's); read again at once.
    Ends(Vec<LeaseEvent>),
    /// Nothing more to read, for the first time: the backlog has been sent. Say so with
    /// a heartbeat.
    CaughtUp,
    /// Nothing new: wait to be woken.
    Quiet,
}

/// One open revocation stream.
#[derive(Debug)]
pub struct Revocations {
    service: Arc<LeaseService>,
    cursor: u64,
    /// `None`: every tenant.
    tenants: Option<HashSet<String>>,
    /// The tenants it carries, sorted, as heartbeats name them.
    covered: Vec<String>,
    caught_up: bool,
}

/// Which tenants' ends a stream carries: those `asked` for (each must be `served`), else
/// every tenant served (`None`: all).
pub fn stream_tenants(
    served: Option<&HashSet<String>>,
    asked: Vec<String>,
) -> Result<Option<HashSet<String>>> {
    if asked.is_empty() {
        return Ok(served.cloned());
    }
    if asked.len() > MAX_STREAM_TENANTS {
        return Err(Error::invalid(
            "tenants",
            format!("names more than {MAX_STREAM_TENANTS} tenants"),
        ));
    }
    for t in &asked {
        crate::ident::check(t, MAX_ID_LEN).map_err(|p| Error::invalid("tenants", p.to_string()))?;
        if served.is_some_and(|served| !served.contains(t)) {
            return Err(Error::TenantNotServed(t.clone()));
        }
    }
    Ok(Some(asked.into_iter().collect()))
}

impl Revocations {
    /// Opens a stream of the ends of `tenants` (from [`stream_tenants`]) from `start`.
    /// A cursor beyond the newest event is refused: it would wait silently forever.
    pub async fn open(
        service: Arc<LeaseService>,
        start: Start,
        tenants: Option<HashSet<String>>,
    ) -> Result<Self> {
        let cursor = match start {
            Start::After(cursor) => {
                let head = service.last_sequence().await?;
                if cursor > head {
                    return Err(Error::invalid(
                        "after_cursor",
                        format!("is beyond the newest event ({head}); start over without it"),
                    ));
                }
                cursor
            }
            Start::LiveEnds => service.live_ends_cursor().await?,
            Start::Newest => service.last_sequence().await?,
        };
        let mut covered: Vec<String> = tenants.iter().flatten().cloned().collect();
        covered.sort();
        Ok(Self {
            service,
            cursor,
            tenants,
            covered,
            caught_up: false,
        })
    }

    /// The position of the last end read: a reconnecting watcher passes it back.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// The tenants carried, sorted; empty for every tenant. Heartbeats name them, so
    /// verifiers know what their revocation set can vouch for.
    pub fn covered(&self) -> &[String] {
        &self.covered
    }

    /// Changes whenever a lease ends (here, or on another replica once told).
    pub fn wake(&self) -> watch::Receiver<u64> {
        self.service.ends.subscribe()
    }

    /// Reads on from the cursor. The cursor passes every end read, carried or not.
    pub async fn next(&mut self) -> Result<Next> {
        let events = self.service.ends_after(self.cursor, BATCH).await?;
        let Some(last) = events.last() else {
            return Ok(if std::mem::replace(&mut self.caught_up, true) {
                Next::Quiet
            } else {
                Next::CaughtUp
            });
        };
        self.cursor = last.sequence;
        let tenants = &self.tenants;
        Ok(Next::Ends(
            events
                .into_iter()
                .filter(|e| tenants.as_ref().is_none_or(|t| t.contains(&e.tenant)))
                .collect(),
        ))
    }
}

impl LeaseService {
    /// Lease ends after `cursor`, oldest first.
    pub async fn ends_after(&self, cursor: u64, limit: usize) -> Result<Vec<LeaseEvent>> {
        Ok(self.store.end_events_after(cursor, limit).await?)
    }

    /// Where a watcher that wants every end whose tokens may still be valid begins.
    pub async fn live_ends_cursor(&self) -> Result<u64> {
        match self.store.earliest_live_end(self.clock.now()).await? {
            Some(seq) => Ok(seq.saturating_sub(1)),
            None => self.last_sequence().await,
        }
    }

    /// The newest event sequence, where a watcher starting "from now" begins.
    pub async fn last_sequence(&self) -> Result<u64> {
        Ok(self.store.last_event_sequence().await?)
    }

    /// Wakes revocation streams: another replica recorded a lease end.
    pub fn notify_ends(&self) {
        self.ends.send_modify(|n| *n = n.wrapping_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(tenants: &[&str]) -> HashSet<String> {
        tenants.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn a_stream_carries_what_it_asks_for_within_what_is_served() {
        let served = set(&["acme", "diku"]);
        // Nothing asked: everything served; a module serving all tenants gets all.
        assert_eq!(
            stream_tenants(Some(&served), vec![]).unwrap(),
            Some(served.clone())
        );
        assert_eq!(stream_tenants(None, vec![]).unwrap(), None);
        assert_eq!(
            stream_tenants(Some(&served), vec!["diku".into()]).unwrap(),
            Some(set(&["diku"]))
        );
        assert_eq!(
            stream_tenants(None, vec!["any".into()]).unwrap(),
            Some(set(&["any"]))
        );
        let e = stream_tenants(Some(&served), vec!["college".into()]).unwrap_err();
        assert!(
            matches!(&e, Error::TenantNotServed(t) if t == "college"),
            "{e:?}"
        );
    }

    #[test]
    fn asked_tenants_are_bounded_identifiers() {
        let too_many = (0..=MAX_STREAM_TENANTS).map(|i| format!("t{i}")).collect();
        let mut bad = vec![
            stream_tenants(None, too_many).unwrap_err(),
            stream_tenants(None, vec!["acme\u{200B}".into()]).unwrap_err(),
            stream_tenants(None, vec![String::new()]).unwrap_err(),
        ];
        bad.push(stream_tenants(None, vec!["x".repeat(MAX_ID_LEN + 1)]).unwrap_err());
        for e in bad {
            assert!(
                matches!(
                    e,
                    Error::InvalidArgument {
                        field: "tenants",
                        ..
                    }
                ),
                "{e:?}"
            );
        }
    }
}
