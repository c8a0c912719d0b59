//! The lease follows its user's standing: what a re-check of the user's permissions at
//! renewal decides. Pure rules; the service asks the platform and applies the verdict.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use crate::lease::{EndReason, Lease};
use crate::ports::{Recheck, RecheckPolicy};
use crate::settings::OnWithdrawn;

/// What a renewal does after a re-check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The user still holds every permission of the lease.
    Confirmed,
    /// Renew with `remaining`; `withdrawn` are gone (policy `narrow`).
    Narrow {
        /// What the lease keeps.
        remaining: Vec<String>,
        /// What the user lost.
        withdrawn: Vec<String>,
    },
    /// End the lease.
    End(EndReason, String),
    /// The source did not answer: renew with the current grant. `unverified_for` is how
    /// long the permissions have gone unconfirmed.
    Unverified {
        /// Since the last successful check.
        unverified_for: Duration,
        /// Why the source did not answer.
        problem: String,
    },
}

impl Verdict {
    /// The metric label of the verdict.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Confirmed => "confirmed",
            Verdict::Narrow { .. } => "narrowed",
            Verdict::End(EndReason::SubjectDisabled, _) => "disabled",
            Verdict::End(EndReason::PermissionsUnverifiable, _) => "unverifiable",
            Verdict::End(..) => "withdrawn",
            Verdict::Unverified { .. } => "unverified",
        }
    }
}

/// Whether a renewal of `lease` at `now` re-checks first: its permissions come from a
/// source that re-checks, and the last check is older than the interval.
pub fn due(lease: &Lease, policy: &RecheckPolicy, now: SystemTime) -> bool {
    lease.standing.permission_source.is_some()
        && lease
            .standing
            .permissions_checked_at
            .is_none_or(|at| now >= at + policy.interval)
}

/// What the answer `found` means for `lease` at `now`.
pub fn decide(lease: &Lease, found: &Recheck, policy: &RecheckPolicy, now: SystemTime) -> Verdict {
    match found {
        Recheck::Holds(held) => withdrawn(&lease.permissions, held, policy.on_withdrawn),
        Recheck::Gone(why) => Verdict::End(EndReason::SubjectDisabled, (*why).to_owned()),
        Recheck::Unanswered(problem) => {
            // Never checked counts from the grant.
            let since = lease
                .standing
                .permissions_checked_at
                .unwrap_or(lease.created_at);
            let unverified_for = now.duration_since(since).unwrap_or_default();
            match policy.max_unverified {
                // The detail reaches the module and the lease's story: it says how
                // long, not why (the problem names the service's own files and
                // endpoints; it is in the service's log).
                Some(bound) if unverified_for > bound => Verdict::End(
                    EndReason::PermissionsUnverifiable,
                    format!(
                        "the permission source could not confirm the permissions for {}s \
                         (bound {}s)",
                        unverified_for.as_secs(),
                        bound.as_secs()
                    ),
                ),
                _ => Verdict::Unverified {
                    unverified_for,
                    problem: problem.clone(),
                },
            }
        }
    }
}

fn withdrawn(granted: &[String], held: &BTreeSet<String>, policy: OnWithdrawn) -> Verdict {
    let (remaining, withdrawn): (Vec<String>, Vec<String>) =
        granted.iter().cloned().partition(|p| held.contains(p));
    if withdrawn.is_empty() {
        return Verdict::Confirmed;
    }
    let named = withdrawn.join(", ");
    match policy {
        OnWithdrawn::Narrow if !remaining.is_empty() => Verdict::Narrow {
            remaining,
            withdrawn,
        },
        OnWithdrawn::Narrow => Verdict::End(
            EndReason::PermissionsWithdrawn,
            format!("the user no longer holds any permission of the lease (withdrawn: {named})"),
        ),
        OnWithdrawn::End => Verdict::End(
            EndReason::PermissionsWithdrawn,
            format!("the user no longer holds {named}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::Standing;

    const HOUR: Duration = Duration::from_secs(3600);

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    fn lease(permissions: &[&str], checked_at: Option<SystemTime>) -> Lease {
        Lease {
            id: "l".into(),
            tenant: "diku".into(),
            subject: "alice".into(),
            actor: "importer".into(),
            job_id: "j".into(),
            permissions: permissions.iter().map(|p| (*p).to_owned()).collect(),
            audience: "api".into(),
            created_at: t(0),
            expires_at: t(8 * 3600),
            idle_timeout: HOUR,
            last_active_at: t(0),
            end: None,
            generation: 0,
            seed: vec![0; 32],
            rotated_at: t(0),
            refresh_count: 0,
            last_refreshed_at: None,
            resume_count: 0,
            standing: Standing {
                permission_source: Some("https://kc/realms/{tenant}".into()),
                permissions_checked_at: checked_at,
                ..Standing::default()
            },
            version: 0,
        }
    }

    fn policy(on_withdrawn: OnWithdrawn, max_unverified: Option<Duration>) -> RecheckPolicy {
        RecheckPolicy {
            interval: Duration::from_secs(300),
            on_withdrawn,
            max_unverified,
        }
    }

    fn holds(names: &[&str]) -> Recheck {
        Recheck::Holds(names.iter().map(|p| (*p).to_owned()).collect())
    }

    #[test]
    fn a_recheck_is_due_once_the_interval_has_passed_and_only_with_a_source() {
        let p = policy(OnWithdrawn::End, None);
        let checked = lease(&["a"], Some(t(0)));
        assert!(!due(&checked, &p, t(299)));
        assert!(due(&checked, &p, t(300)));
        assert!(due(&lease(&["a"], None), &p, t(0)));
        let mut from_token = checked.clone();
        from_token.standing.permission_source = None;
        assert!(!due(&from_token, &p, t(10_000)));
    }

    #[test]
    fn withdrawn_permissions_end_or_narrow_by_policy() {
        let l = lease(&["a", "b", "c"], Some(t(0)));
        let end = policy(OnWithdrawn::End, None);
        let narrow = policy(OnWithdrawn::Narrow, None);
        // More held than granted: nothing withdrawn, nothing added.
        assert_eq!(
            decide(&l, &holds(&["a", "b", "c", "d"]), &end, t(400)),
            Verdict::Confirmed
        );
        match decide(&l, &holds(&["a", "c"]), &end, t(400)) {
            Verdict::End(EndReason::PermissionsWithdrawn, detail) => {
                assert!(detail.contains('b') && !detail.contains("a,"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            decide(&l, &holds(&["a", "c"]), &narrow, t(400)),
            Verdict::Narrow {
                remaining: vec!["a".into(), "c".into()],
                withdrawn: vec!["b".into()],
            }
        );
        assert!(matches!(
            decide(&l, &holds(&["x"]), &narrow, t(400)),
            Verdict::End(EndReason::PermissionsWithdrawn, _)
        ));
    }

    #[test]
    fn a_user_gone_from_the_platform_ends_the_lease() {
        let l = lease(&["a"], Some(t(0)));
        for p in [
            policy(OnWithdrawn::End, None),
            policy(OnWithdrawn::Narrow, None),
        ] {
            assert_eq!(
                decide(&l, &Recheck::Gone("disabled"), &p, t(400)),
                Verdict::End(EndReason::SubjectDisabled, "disabled".into())
            );
        }
    }

    #[test]
    fn an_outage_renews_until_the_optional_bound() {
        let l = lease(&["a"], Some(t(100)));
        let down = Recheck::Unanswered("connection refused".into());
        // No bound: never ends, however long.
        let verdict = decide(&l, &down, &policy(OnWithdrawn::End, None), t(100 + 86_400));
        assert_eq!(
            verdict,
            Verdict::Unverified {
                unverified_for: Duration::from_secs(86_400),
                problem: "connection refused".into()
            }
        );
        let bounded = policy(OnWithdrawn::End, Some(HOUR));
        assert!(matches!(
            decide(&l, &down, &bounded, t(100 + 3600)),
            Verdict::Unverified { .. }
        ));
        let Verdict::End(EndReason::PermissionsUnverifiable, detail) =
            decide(&l, &down, &bounded, t(100 + 3601))
        else {
            panic!("the bound has passed")
        };
        // How long, not why: the problem stays in the service's log.
        assert!(detail.contains("3601s"), "{detail}");
        assert!(!detail.contains("connection refused"), "{detail}");
        // Never confirmed: counted from the grant.
        let never = lease(&["a"], None);
        assert!(matches!(
            decide(&never, &down, &bounded, t(3601)),
            Verdict::End(EndReason::PermissionsUnverifiable, _)
        ));
    }
}
