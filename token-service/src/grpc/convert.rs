//! Conversions between protobuf messages and domain types.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jobtoken_proto::jobtoken::v1 as pb;

use crate::error::Error;
use crate::keys::AccessClaims;
use crate::lease::{EndReason, Lease, LeaseEvent, OnLogout};
use crate::service::TokenPair;

pub(super) fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

fn unix_timestamp(secs: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: secs,
        nanos: 0,
    }
}

pub(super) fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A request duration: `None` if unset; negative or malformed ones are refused.
pub(super) fn duration_from_proto(
    field: &'static str,
    d: Option<prost_types::Duration>,
) -> Result<Option<Duration>, Error> {
    let Some(d) = d else { return Ok(None) };
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(Error::invalid(
            field,
            "must be a non-negative, normalised duration",
        ));
    }
    Ok(Some(
        Duration::from_secs(d.seconds.unsigned_abs())
            + Duration::from_nanos(d.nanos.unsigned_abs().into()),
    ))
}

/// Empty strings mean "not set" in proto3.
pub(super) fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

pub(super) fn end_reason(r: EndReason) -> pb::EndReason {
    match r {
        EndReason::Released => pb::EndReason::Released,
        EndReason::Expired => pb::EndReason::Expired,
        EndReason::IdleTimeout => pb::EndReason::IdleTimeout,
        EndReason::Revoked => pb::EndReason::Revoked,
        EndReason::RefreshTokenReused => pb::EndReason::RefreshTokenReused,
        EndReason::PermissionsWithdrawn => pb::EndReason::PermissionsWithdrawn,
        EndReason::SubjectDisabled => pb::EndReason::SubjectDisabled,
        EndReason::SubjectLoggedOut => pb::EndReason::SubjectLoggedOut,
        EndReason::PermissionsUnverifiable => pb::EndReason::PermissionsUnverifiable,
    }
}

/// The logout policy a grant asks for; unspecified is the module's default.
pub(super) fn on_logout(value: i32) -> Result<Option<OnLogout>, Error> {
    match pb::OnLogout::try_from(value) {
        Ok(pb::OnLogout::Unspecified) => Ok(None),
        Ok(pb::OnLogout::Survive) => Ok(Some(OnLogout::Survive)),
        Ok(pb::OnLogout::End) => Ok(Some(OnLogout::End)),
        Err(_) => Err(Error::invalid(
            "on_logout",
            format!("{value} is not a logout policy"),
        )),
    }
}

pub(super) fn lease(l: &Lease) -> pb::Lease {
    let end = l.end.as_ref();
    pb::Lease {
        lease_id: l.id.clone(),
        job_id: l.job_id.clone(),
        tenant: l.tenant.clone(),
        subject: l.subject.clone(),
        actor: l.actor.clone(),
        granted_permissions: l.permissions.clone(),
        audience: l.audience.clone(),
        created_at: Some(timestamp(l.created_at)),
        expires_at: Some(timestamp(l.expires_at)),
        idle_timeout: Some(duration(l.idle_timeout)),
        state: if l.is_active() {
            pb::LeaseState::Active
        } else {
            pb::LeaseState::Ended
        } as i32,
        end_reason: end.map_or(pb::EndReason::Unspecified, |e| end_reason(e.reason)) as i32,
        ended_at: end.map(|e| timestamp(e.at)),
        ended_by: end.map(|e| e.by.clone()).unwrap_or_default(),
        end_detail: end.map(|e| e.detail.clone()).unwrap_or_default(),
        on_logout: match l.standing.on_logout {
            OnLogout::Survive => pb::OnLogout::Survive,
            OnLogout::End => pb::OnLogout::End,
        } as i32,
    }
}

pub(super) fn tokens(t: &TokenPair) -> pb::TokenPair {
    pb::TokenPair {
        access_token: t.access_token.clone(),
        access_token_expires_in: Some(duration(t.expires_in)),
        access_token_expires_at: Some(timestamp(t.expires_at)),
        refresh_token: t.refresh_token.expose().to_owned(),
        token_type: "Bearer".to_owned(),
    }
}

pub(super) fn claims(c: AccessClaims) -> pb::TokenClaims {
    pb::TokenClaims {
        iss: c.iss,
        sub: c.sub,
        aud: c.aud,
        exp: Some(unix_timestamp(c.exp)),
        iat: Some(unix_timestamp(c.iat)),
        nbf: Some(unix_timestamp(c.nbf)),
        jti: c.jti,
        tenant: c.tenant,
        permissions: c.permissions,
        job_id: c.job_id,
        lease_id: c.lease_id,
        actor: c.act.sub,
    }
}

pub(super) fn event(e: LeaseEvent) -> pb::LeaseEvent {
    pb::LeaseEvent {
        sequence: e.sequence,
        kind: e.kind.as_str().to_owned(),
        at: Some(timestamp(e.at)),
        by: e.by,
        detail: match e.reason {
            Some(r) if e.detail.is_empty() => r.as_str().to_owned(),
            Some(r) => format!("{}: {}", r.as_str(), e.detail),
            None => e.detail,
        },
    }
}

pub(super) fn revocation(e: LeaseEvent) -> pb::WatchRevocationsResponse {
    pb::WatchRevocationsResponse {
        cursor: e.sequence,
        lease_id: e.lease_id,
        tenant: e.tenant,
        reason: e.reason.map_or(pb::EndReason::Unspecified, end_reason) as i32,
        ended_at: Some(timestamp(e.at)),
        tokens_valid_until: Some(timestamp(e.tokens_valid_until.unwrap_or(UNIX_EPOCH))),
        heartbeat: false,
        tenants: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_durations_are_checked() {
        let d = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
        assert_eq!(duration_from_proto("f", None).unwrap(), None);
        assert_eq!(
            duration_from_proto("f", d(90, 5)).unwrap(),
            Some(Duration::new(90, 5))
        );
        for bad in [d(-1, 0), d(1, -1), d(1, 1_000_000_000)] {
            assert!(matches!(
                duration_from_proto("f", bad),
                Err(Error::InvalidArgument { field: "f", .. })
            ));
        }
        // Absurd but well-formed durations pass here; the domain refuses them.
        assert!(duration_from_proto("f", d(i64::MAX, 0)).is_ok());
    }

    #[test]
    fn revocation_events_carry_no_personal_data() {
        use prost::Message as _;
        let event = LeaseEvent {
            sequence: 7,
            lease_id: "lease-1".into(),
            tenant: "acme".into(),
            subject: "alice.secret-user".into(),
            actor: "importer-module".into(),
            job_id: "import-payroll-of-bob".into(),
            kind: crate::lease::EventKind::Ended,
            reason: Some(crate::lease::EndReason::Revoked),
            at: UNIX_EPOCH + Duration::from_secs(100),
            by: "admin".into(),
            detail: "stolen laptop of alice".into(),
            tokens_valid_until: Some(UNIX_EPOCH + Duration::from_secs(400)),
        };
        let message = revocation(event);
        assert_eq!(message.lease_id, "lease-1");
        assert_eq!(message.tenant, "acme");
        let bytes = message.encode_to_vec();
        for private in [
            "alice",
            "importer-module",
            "import-payroll-of-bob",
            "stolen",
        ] {
            assert!(
                !bytes
                    .windows(private.len())
                    .any(|w| w == private.as_bytes()),
                "{private} is on the wire"
            );
        }
    }
}
