//! How a lease ends: why, in the words renewal answers and the revocation stream share,
//! and the one way anything (renewal, release, the revocation stream) ends a lease.

use jobtoken_proto::wire;
use tonic::Status;
use tonic_types::StatusExt;

use crate::proto;

// `google.rpc.ErrorInfo.metadata` key of who ended a lease and why (an administrator's
// reason, say), on the error of a renewal of an ended lease.
pub(crate) use jobtoken_proto::wire::END_DETAIL_METADATA;

/// Why a lease ended: the job's doing ([`Released`](EndReason::Released),
/// [`Stalled`](EndReason::Stalled)), the lease's limits ([`Expired`](EndReason::Expired),
/// [`IdleTimeout`](EndReason::IdleTimeout)), an administrator or a theft
/// ([`Revoked`](EndReason::Revoked), [`RefreshTokenReused`](EndReason::RefreshTokenReused)),
/// another instance ([`Superseded`](EndReason::Superseded)), or the user's standing, which
/// the service re-checks at renewal ([`PermissionsWithdrawn`](EndReason::PermissionsWithdrawn),
/// [`SubjectDisabled`](EndReason::SubjectDisabled),
/// [`SubjectLoggedOut`](EndReason::SubjectLoggedOut),
/// [`PermissionsUnverifiable`](EndReason::PermissionsUnverifiable)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EndReason {
    /// Released by its holder ([`Lease::release`](crate::Lease::release), or every handle dropped).
    Released,
    /// Its hard expiry (maximum lifetime) passed.
    Expired,
    /// Nobody renewed it within the service's idle timeout.
    IdleTimeout,
    /// An administrator revoked it.
    Revoked,
    /// An old refresh token was presented again; the service revoked the lease.
    RefreshTokenReused,
    /// Another instance of this module resumed the job, so this one lost the lease.
    Superseded,
    /// The service refused a renewal for another reason (see the detail).
    Rejected,
    /// A re-check found the user no longer holds a permission the lease carried (module
    /// policy `end`, or policy `narrow` with nothing left).
    PermissionsWithdrawn,
    /// The identity platform says the user no longer exists or is disabled.
    SubjectDisabled,
    /// The user's session was logged out and the lease was granted with
    /// [`OnLogout::End`](crate::OnLogout::End).
    SubjectLoggedOut,
    /// The user's permissions could not be confirmed for longer than the service allows.
    PermissionsUnverifiable,
    /// The job reported no progress within its stall timeout, so the SDK released the
    /// lease (outcome `failed`) instead of renewing it (see
    /// [`RenewalConfig::stall_timeout`](crate::RenewalConfig::stall_timeout)).
    Stalled,
}

impl EndReason {
    /// From the machine reason of a failed renewal.
    pub(crate) fn from_error_reason(reason: &str) -> Self {
        use wire::reason as r;
        match reason {
            r::LEASE_RELEASED => EndReason::Released,
            r::LEASE_EXPIRED => EndReason::Expired,
            r::LEASE_IDLE_TIMEOUT => EndReason::IdleTimeout,
            r::LEASE_REVOKED => EndReason::Revoked,
            r::REFRESH_TOKEN_REUSED => EndReason::RefreshTokenReused,
            r::REFRESH_TOKEN_INVALID => EndReason::Superseded,
            r::PERMISSIONS_WITHDRAWN => EndReason::PermissionsWithdrawn,
            r::SUBJECT_DISABLED => EndReason::SubjectDisabled,
            r::SUBJECT_LOGGED_OUT => EndReason::SubjectLoggedOut,
            r::PERMISSIONS_UNVERIFIABLE => EndReason::PermissionsUnverifiable,
            _ => EndReason::Rejected,
        }
    }

    /// From the reason of a revocation event.
    pub(crate) fn from_proto(reason: proto::EndReason) -> Self {
        match reason {
            proto::EndReason::Released => EndReason::Released,
            proto::EndReason::Expired => EndReason::Expired,
            proto::EndReason::IdleTimeout => EndReason::IdleTimeout,
            proto::EndReason::Revoked => EndReason::Revoked,
            proto::EndReason::RefreshTokenReused => EndReason::RefreshTokenReused,
            proto::EndReason::PermissionsWithdrawn => EndReason::PermissionsWithdrawn,
            proto::EndReason::SubjectDisabled => EndReason::SubjectDisabled,
            proto::EndReason::SubjectLoggedOut => EndReason::SubjectLoggedOut,
            proto::EndReason::PermissionsUnverifiable => EndReason::PermissionsUnverifiable,
            proto::EndReason::Unspecified => EndReason::Rejected,
        }
    }
}

/// How a lease ended: the reason, and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseEnd {
    /// Why.
    pub reason: EndReason,
    /// Details (the service's message, or the operator's reason).
    pub detail: String,
}

impl LeaseEnd {
    /// From the refusal of a renewal.
    pub(crate) fn from_status(status: &Status) -> Self {
        let reason = crate::error_reason(status).unwrap_or_default();
        // Who ended it and why (an administrator's reason, say), when the service says.
        let said = status
            .get_error_details()
            .error_info()
            .and_then(|info| info.metadata.get(END_DETAIL_METADATA).cloned())
            .filter(|d| !d.is_empty());
        let detail = match said {
            Some(said) => format!("{reason}: {}; {said}", status.message()),
            None => format!("{reason}: {}", status.message()),
        };
        LeaseEnd {
            reason: EndReason::from_error_reason(&reason),
            detail,
        }
    }
}

/// Something a lease end can be delivered to: the lease's shared state. The revocation
/// stream routes ends through this, so it needs nothing of the lease but this trait.
pub(crate) trait Ending: Send + Sync + 'static {
    /// Ends the lease (the first end wins).
    fn finish(&self, end: LeaseEnd);
}
