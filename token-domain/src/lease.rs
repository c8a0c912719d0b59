//! The lease and its life: plain data, no I/O.

use std::fmt;
use std::time::{Duration, SystemTime};

/// Why a lease ended. The string forms are stored and must not change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndReason {
    /// The holder released it.
    Released,
    /// Its hard expiry passed.
    Expired,
    /// Nobody renewed it within the idle timeout.
    IdleTimeout,
    /// An administrator revoked it.
    Revoked,
    /// An old refresh token was presented again.
    RefreshTokenReused,
    /// A re-check found a granted permission withdrawn (policy `end`, or `narrow` with
    /// nothing left).
    PermissionsWithdrawn,
    /// The platform says the user no longer exists or is disabled.
    SubjectDisabled,
    /// The user's session was logged out and the lease's policy is `end`.
    SubjectLoggedOut,
    /// The permission source could not confirm the lease's permissions for longer than
    /// the configured bound.
    PermissionsUnverifiable,
}

impl EndReason {
    /// Every reason, for exhaustive tests.
    pub const ALL: [EndReason; 9] = [
        EndReason::Released,
        EndReason::Expired,
        EndReason::IdleTimeout,
        EndReason::Revoked,
        EndReason::RefreshTokenReused,
        EndReason::PermissionsWithdrawn,
        EndReason::SubjectDisabled,
        EndReason::SubjectLoggedOut,
        EndReason::PermissionsUnverifiable,
    ];

    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Released => "released",
            EndReason::Expired => "expired",
            EndReason::IdleTimeout => "idle_timeout",
            EndReason::Revoked => "revoked",
            EndReason::RefreshTokenReused => "refresh_token_reused",
            EndReason::PermissionsWithdrawn => "permissions_withdrawn",
            EndReason::SubjectDisabled => "subject_disabled",
            EndReason::SubjectLoggedOut => "subject_logged_out",
            EndReason::PermissionsUnverifiable => "permissions_unverifiable",
        }
    }

    /// Parses the stored form.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The machine reason a renewal of a lease that ended this way fails with.
    pub fn error_reason(self) -> &'static str {
        use jobtoken_wire::reason as r;
        match self {
            EndReason::Released => r::LEASE_RELEASED,
            EndReason::Expired => r::LEASE_EXPIRED,
            EndReason::IdleTimeout => r::LEASE_IDLE_TIMEOUT,
            EndReason::Revoked => r::LEASE_REVOKED,
            EndReason::RefreshTokenReused => r::REFRESH_TOKEN_REUSED,
            EndReason::PermissionsWithdrawn => r::PERMISSIONS_WITHDRAWN,
            EndReason::SubjectDisabled => r::SUBJECT_DISABLED,
            EndReason::SubjectLoggedOut => r::SUBJECT_LOGGED_OUT,
            EndReason::PermissionsUnverifiable => r::PERMISSIONS_UNVERIFIABLE,
        }
    }

    /// A phrase for people.
    pub fn describe(self) -> &'static str {
        match self {
            EndReason::Released => "released by its holder",
            EndReason::Expired => "its maximum lifetime has passed",
            EndReason::IdleTimeout => "not renewed within its idle timeout",
            EndReason::Revoked => "revoked by an administrator",
            EndReason::RefreshTokenReused => "revoked because an old refresh token was reused",
            EndReason::PermissionsWithdrawn => "the user no longer holds its permissions",
            EndReason::SubjectDisabled => "the user no longer exists or is disabled",
            EndReason::SubjectLoggedOut => "the user logged out and the lease ends on logout",
            EndReason::PermissionsUnverifiable => {
                "the user's permissions could not be confirmed for too long"
            }
        }
    }
}

/// What a logout of the user's session does to a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnLogout {
    /// The lease outlives the session: the point of a lease.
    #[default]
    Survive,
    /// The lease ends with [`EndReason::SubjectLoggedOut`].
    End,
}

impl OnLogout {
    /// The stored and configured form.
    pub fn as_str(self) -> &'static str {
        match self {
            OnLogout::Survive => "survive",
            OnLogout::End => "end",
        }
    }

    /// Parses the stored form.
    pub fn parse(s: &str) -> Option<Self> {
        [OnLogout::Survive, OnLogout::End]
            .into_iter()
            .find(|p| p.as_str() == s)
    }
}

/// Who the user is at their identity provider, kept so the lease can follow the user's
/// standing: re-checks of permissions and back-channel logout.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Standing {
    /// The trusted issuer that vouched for the user (its `iss`, or the entry's name for
    /// tokens without one).
    pub issuer: String,
    /// The subject token's `sub`, by which logout tokens name users.
    pub sub: Option<String>,
    /// The session the lease was granted from (the subject token's `sid`).
    pub session_id: Option<String>,
    /// What a logout does to the lease.
    pub on_logout: OnLogout,
    /// The trusted-issuer entry whose permission source holds the user's permissions;
    /// `None` when the token carried them (nothing to re-check).
    pub permission_source: Option<String>,
    /// When the permission source last confirmed the lease's permissions.
    pub permissions_checked_at: Option<SystemTime>,
}

/// What a renewal with a genuine refresh token does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// The current token: rotate to the next generation.
    Rotate,
    /// The previous token within the grace window (a lost answer, racing callers): answer
    /// with the current generation again, so both converge.
    GraceRetry,
    /// A superseded token outside the grace window: a replayed stolen token or a cloned
    /// holder. The lease can no longer be trusted.
    Reused,
}

/// How and when a lease ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseEnd {
    /// Why.
    pub reason: EndReason,
    /// When.
    pub at: SystemTime,
    /// Who: `module:<id>`, `admin` or `system`.
    pub by: String,
    /// Free text: outcome, admin's reason.
    pub detail: String,
}

/// A job's right to hold tokens, as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct Lease {
    /// Server-assigned id.
    pub id: String,
    /// Tenant of the subject.
    pub tenant: String,
    /// The user.
    pub subject: String,
    /// The module id holding the lease.
    pub actor: String,
    /// The module's job id.
    pub job_id: String,
    /// Granted permissions, sorted.
    pub permissions: Vec<String>,
    /// Audience of its access tokens.
    pub audience: String,
    /// Granted at.
    pub created_at: SystemTime,
    /// Hard expiry.
    pub expires_at: SystemTime,
    /// Ends if not renewed for this long.
    pub idle_timeout: Duration,
    /// Last grant, renewal or resume: the idle timeout counts from here.
    pub last_active_at: SystemTime,
    /// Set once the lease has ended.
    pub end: Option<LeaseEnd>,
    /// Number of the current refresh token; it is derived from this and the seed.
    pub generation: u64,
    /// Random per-lease input of refresh-token derivation; replaced at every resume, which
    /// is what kills the tokens from before it. Useless without the server's secret.
    pub seed: Vec<u8>,
    /// When the current generation was issued (start of the grace window).
    pub rotated_at: SystemTime,
    /// Renewals so far.
    pub refresh_count: u64,
    /// Last renewal.
    pub last_refreshed_at: Option<SystemTime>,
    /// Resumes so far.
    pub resume_count: u64,
    /// The user at their identity provider, and the lease's logout policy.
    pub standing: Standing,
    /// Optimistic-concurrency version, bumped by the store on every update.
    pub version: i64,
}

impl Lease {
    /// Whether the lease can still renew (ignoring time; see [`Lease::due_end`]).
    pub fn is_active(&self) -> bool {
        self.end.is_none()
    }

    /// The instant after which the lease ends by itself unless renewed: the earlier of the
    /// hard expiry and the idle deadline. Stores index it to find leases to sweep.
    pub fn deadline(&self) -> SystemTime {
        self.expires_at.min(self.last_active_at + self.idle_timeout)
    }

    /// If the active lease has run out at `now`, the reason it did.
    pub fn due_end(&self, now: SystemTime) -> Option<EndReason> {
        if !self.is_active() {
            return None;
        }
        if now >= self.expires_at {
            Some(EndReason::Expired)
        } else if now >= self.last_active_at + self.idle_timeout {
            Some(EndReason::IdleTimeout)
        } else {
            None
        }
    }

    /// What presenting a genuine refresh token of generation `presented` at `now` means
    /// (genuine: its MAC verified, so it is never from a generation not yet issued).
    pub fn renewal(&self, presented: u64, now: SystemTime, grace: Duration) -> Renewal {
        if presented == self.generation {
            Renewal::Rotate
        } else if presented.saturating_add(1) == self.generation && now < self.rotated_at + grace {
            Renewal::GraceRetry
        } else {
            Renewal::Reused
        }
    }

    /// Records a rotation at `now`: the next generation is current.
    pub fn rotate(&mut self, now: SystemTime) {
        self.generation += 1;
        self.rotated_at = now;
        self.last_active_at = now;
        self.refresh_count += 1;
        self.last_refreshed_at = Some(now);
    }

    /// Records a resume at `now` with a fresh `seed`: every refresh token issued before
    /// dies (each was derived from the old seed), and the next generation is current.
    pub fn resume(&mut self, now: SystemTime, seed: Vec<u8>) {
        self.seed = seed;
        self.generation += 1;
        self.rotated_at = now;
        self.last_active_at = now;
        self.resume_count += 1;
    }

    /// Ends the lease (no-op if it already ended).
    pub fn finish(&mut self, reason: EndReason, at: SystemTime, by: &str, detail: &str) {
        if self.end.is_none() {
            self.end = Some(LeaseEnd {
                reason,
                at,
                by: by.to_owned(),
                detail: detail.to_owned(),
            });
        }
    }

    /// The latest instant any access token of this lease can be valid. Tokens are minted
    /// at grant, renewal and resume (all recorded in `last_active_at`/`rotated_at`) and by
    /// grace retries up to `grace` later; none lives past `ttl` (rounded up to a whole
    /// second) or the hard expiry.
    pub fn tokens_valid_until(&self, ttl: Duration, grace: Duration) -> SystemTime {
        self.expires_at
            .min(self.last_active_at.max(self.rotated_at) + token_reach(ttl, grace))
    }
}

impl fmt::Debug for Lease {
    // Hand-written so the seed never reaches a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("id", &self.id)
            .field("tenant", &self.tenant)
            .field("subject", &self.subject)
            .field("actor", &self.actor)
            .field("job_id", &self.job_id)
            .field("permissions", &self.permissions)
            .field("standing", &self.standing)
            .field("expires_at", &self.expires_at)
            .field("end", &self.end)
            .field("generation", &self.generation)
            .field("seed", &"<redacted>")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// How long after a lease's last grant, renewal or resume one of its access tokens can
/// still be valid: a grace retry may mint one up to `grace` later, it lives `ttl`, and
/// its `exp` is rounded up to a whole second.
pub fn token_reach(ttl: Duration, grace: Duration) -> Duration {
    grace + ttl + Duration::from_secs(1)
}

/// What happened to a lease, for its story and the revocation stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Granted.
    Issued,
    /// Re-attached by its module.
    Resumed,
    /// A re-check withdrew some of its permissions (policy `narrow`).
    Narrowed,
    /// Ended.
    Ended,
}

impl EventKind {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Issued => "issued",
            EventKind::Resumed => "resumed",
            EventKind::Narrowed => "narrowed",
            EventKind::Ended => "ended",
        }
    }

    /// Parses the stored form.
    pub fn parse(s: &str) -> Option<Self> {
        [
            EventKind::Issued,
            EventKind::Resumed,
            EventKind::Narrowed,
            EventKind::Ended,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// One entry of the event log. `sequence` is assigned by the store, increasing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseEvent {
    /// Position in the log (0 before it is stored).
    pub sequence: u64,
    /// The lease.
    pub lease_id: String,
    /// Its tenant.
    pub tenant: String,
    /// Its subject.
    pub subject: String,
    /// Its actor.
    pub actor: String,
    /// Its job.
    pub job_id: String,
    /// What happened.
    pub kind: EventKind,
    /// For `Ended`: why.
    pub reason: Option<EndReason>,
    /// When.
    pub at: SystemTime,
    /// Who.
    pub by: String,
    /// Free text.
    pub detail: String,
    /// For `Ended`: tokens of the lease may be valid until then.
    pub tokens_valid_until: Option<SystemTime>,
}

impl LeaseEvent {
    /// An event about `lease`, not yet stored.
    pub fn new(lease: &Lease, kind: EventKind, at: SystemTime, by: &str, detail: &str) -> Self {
        Self {
            sequence: 0,
            lease_id: lease.id.clone(),
            tenant: lease.tenant.clone(),
            subject: lease.subject.clone(),
            actor: lease.actor.clone(),
            job_id: lease.job_id.clone(),
            kind,
            reason: None,
            at,
            by: by.to_owned(),
            detail: detail.to_owned(),
            tokens_valid_until: None,
        }
    }

    /// The `Ended` event of an ended lease.
    pub fn ended(lease: &Lease, ttl: Duration, grace: Duration) -> Option<Self> {
        let end = lease.end.as_ref()?;
        let mut event = Self::new(lease, EventKind::Ended, end.at, &end.by, &end.detail);
        event.reason = Some(end.reason);
        event.tokens_valid_until = Some(lease.tokens_valid_until(ttl, grace));
        Some(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_reasons_round_trip_and_have_distinct_machine_reasons() {
        // Does not compile when a reason is added: give it its place in `ALL` too.
        let place = |r: EndReason| match r {
            EndReason::Released => 0,
            EndReason::Expired => 1,
            EndReason::IdleTimeout => 2,
            EndReason::Revoked => 3,
            EndReason::RefreshTokenReused => 4,
            EndReason::PermissionsWithdrawn => 5,
            EndReason::SubjectDisabled => 6,
            EndReason::SubjectLoggedOut => 7,
            EndReason::PermissionsUnverifiable => 8,
        };
        assert_eq!(EndReason::ALL.len(), 9);
        for (i, r) in EndReason::ALL.into_iter().enumerate() {
            assert_eq!(place(r), i, "{r:?}");
        }
        let mut seen = std::collections::HashSet::new();
        for r in EndReason::ALL {
            assert_eq!(EndReason::parse(r.as_str()), Some(r));
            assert!(seen.insert(r.error_reason()));
        }
        assert_eq!(EndReason::parse("nope"), None);
    }

    #[test]
    fn a_renewal_rotates_retries_within_grace_or_detects_reuse() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let grace = Duration::from_secs(10);
        let mut lease = Lease {
            id: "l".into(),
            tenant: "t".into(),
            subject: "s".into(),
            actor: "a".into(),
            job_id: "j".into(),
            permissions: vec![],
            audience: "api".into(),
            created_at: t0,
            expires_at: t0 + Duration::from_secs(3600),
            idle_timeout: Duration::from_secs(600),
            last_active_at: t0,
            end: None,
            generation: 0,
            seed: vec![],
            rotated_at: t0,
            refresh_count: 0,
            last_refreshed_at: None,
            resume_count: 0,
            standing: Standing::default(),
            version: 0,
        };
        assert_eq!(lease.renewal(0, t0, grace), Renewal::Rotate);
        let t1 = t0 + Duration::from_secs(5);
        lease.rotate(t1);
        assert_eq!(
            (
                lease.generation,
                lease.refresh_count,
                lease.rotated_at,
                lease.last_active_at
            ),
            (1, 1, t1, t1)
        );
        assert_eq!(lease.renewal(1, t1, grace), Renewal::Rotate);
        assert_eq!(
            lease.renewal(0, t1 + grace - Duration::from_millis(1), grace),
            Renewal::GraceRetry
        );
        assert_eq!(lease.renewal(0, t1 + grace, grace), Renewal::Reused);
        lease.rotate(t1);
        assert_eq!(
            lease.renewal(0, t1, grace),
            Renewal::Reused,
            "two generations old"
        );
        assert_eq!(lease.renewal(u64::MAX, t1, grace), Renewal::Reused);
        // A resume moves to the next generation with a new seed; renewals go on from it.
        let t2 = t1 + Duration::from_secs(60);
        let before = lease.clone();
        lease.resume(t2, vec![7; 32]);
        assert_eq!(
            (
                lease.generation,
                lease.resume_count,
                lease.refresh_count,
                lease.rotated_at,
                lease.last_active_at
            ),
            (before.generation + 1, 1, before.refresh_count, t2, t2)
        );
        assert_eq!(lease.seed, [7; 32]);
        assert_eq!(lease.renewal(lease.generation, t2, grace), Renewal::Rotate);
    }
}
