//! The grant rules, as pure functions: which permissions a lease carries (requested ∩
//! user's ∩ delegable), how long it may live, and which logout policy it may have.
//! `service/grant.rs` applies them to a verified user and writes the lease.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::lease::OnLogout;
use crate::limits::{ABSURD_LIFETIME, MAX_PERMISSION_LEN, MAX_PERMISSIONS};
use crate::module::Module;
use crate::ports::Subject;
use crate::settings::OverCap;

/// Checks a requested permission name: 1–200 characters of `A-Za-z0-9._:/-`.
pub fn validate_name(p: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "._:/-".contains(c);
    if p.is_empty() || p.len() > MAX_PERMISSION_LEN || !p.chars().all(ok_char) {
        return Err(Error::invalid(
            "permissions",
            format!(
                "each permission must be 1-{MAX_PERMISSION_LEN} characters of A-Z a-z 0-9 . _ : / -"
            ),
        ));
    }
    Ok(())
}

/// Why a module's `delegable` pattern could never match a permission, if it couldn't:
/// a pattern is `*`, `prefix.*`, or an exact name without `*`.
pub fn pattern_problem(pattern: &str) -> Option<&'static str> {
    if pattern.is_empty() {
        return Some("is empty: it matches nothing");
    }
    if pattern.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some("holds white space or control characters: no permission name does");
    }
    if pattern == "*" {
        return None;
    }
    let prefix = pattern.strip_suffix(".*").unwrap_or(pattern);
    if prefix.contains('*') {
        return Some(
            "can never match: `*` works only alone or after a dot at the end (`*`, \
             `inventory.*`); suffix and partial wildcards such as `*.write` or \
             `inventory*` are not supported",
        );
    }
    if prefix.is_empty() || prefix.ends_with('.') {
        return Some("can never match: a dotted prefix needs a name before `.*`");
    }
    None
}

/// Whether a module pattern (`name`, `prefix.*`, `*`) covers `permission`.
pub fn pattern_covers(pattern: &str, permission: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => {
            (prefix.is_empty() || prefix.ends_with('.')) && permission.starts_with(prefix)
        }
        None => pattern == permission,
    }
}

/// The permissions to grant. An empty request means everything the user holds that the
/// module may delegate. A named permission that cannot be granted is refused by name.
pub fn permissions(
    requested: &[String],
    user: &BTreeSet<String>,
    delegable: &[String],
) -> Result<Vec<String>> {
    let may_delegate = |p: &String| delegable.iter().any(|pat| pattern_covers(pat, p));
    if requested.is_empty() {
        // A name the user holds but nobody could request (a literal `a.*`, say) is not
        // granted implicitly either.
        let granted: Vec<String> = user
            .iter()
            .filter(|p| validate_name(p).is_ok() && may_delegate(p))
            .cloned()
            .collect();
        if granted.is_empty() {
            return Err(Error::NoPermissionsGranted);
        }
        return Ok(granted);
    }
    if requested.len() > MAX_PERMISSIONS {
        return Err(Error::invalid(
            "permissions",
            format!("at most {MAX_PERMISSIONS} may be requested"),
        ));
    }
    for p in requested {
        validate_name(p)?;
    }
    let requested: BTreeSet<&String> = requested.iter().collect();
    let not_held: Vec<String> = requested
        .iter()
        .filter(|p| !user.contains(**p))
        .map(|p| (*p).clone())
        .collect();
    if !not_held.is_empty() {
        return Err(Error::PermissionNotHeld(not_held));
    }
    let not_delegable: Vec<String> = requested
        .iter()
        .filter(|p| !may_delegate(p))
        .map(|p| (*p).clone())
        .collect();
    if !not_delegable.is_empty() {
        return Err(Error::PermissionNotDelegable(not_delegable));
    }
    Ok(requested.into_iter().cloned().collect())
}

/// A lease's lifetime, and whether it was clamped to the module's cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    /// Hard expiry minus creation.
    pub granted: Duration,
    /// Whether the request was above the cap and `over_cap = clamp` cut it.
    pub clamped: bool,
}

/// How long a lease of `module` lives when `requested` (`None`: the module's default):
/// at least one access token's life (`access_token_ttl`: shorter would mint tokens born
/// expired), at most [`ABSURD_LIFETIME`], and above the module's cap clamped or refused
/// as `over_cap` says.
pub fn lifetime(
    requested: Option<Duration>,
    module: &Module,
    access_token_ttl: Duration,
    over_cap: OverCap,
) -> Result<Lifetime> {
    let granted = |granted, clamped| Ok(Lifetime { granted, clamped });
    match requested {
        None => granted(module.default_lifetime, false),
        Some(d) if d < access_token_ttl => Err(Error::invalid(
            "max_lifetime",
            format!(
                "must be at least the access-token lifetime, {}s",
                access_token_ttl.as_secs_f64()
            ),
        )),
        Some(d) if d > ABSURD_LIFETIME => {
            Err(Error::invalid("max_lifetime", "must be at most 366 days"))
        }
        Some(d) if d > module.max_lifetime => match over_cap {
            OverCap::Clamp => granted(module.max_lifetime, true),
            OverCap::Refuse => Err(Error::LifetimeExceedsCap {
                requested_secs: d.as_secs(),
                cap_secs: module.max_lifetime.as_secs(),
            }),
        },
        Some(d) => granted(d, false),
    }
}

/// The logout policy of a grant that asks for `requested` (`None`: the module's
/// default): one the module may ask for.
pub fn logout_policy(module: &Module, requested: Option<OnLogout>) -> Result<OnLogout> {
    module.logout_policy(requested).ok_or_else(|| {
        Error::LogoutPolicyNotAllowed(format!(
            "module {:?} may not ask for on_logout = {}",
            module.id,
            requested.unwrap_or_default().as_str()
        ))
    })
}

/// A policy that could never take effect is refused, not silently kept: `end` needs an
/// issuer whose back-channel logouts arrive, and a token naming a session or user that
/// a logout could match.
pub fn check_logout_policy(policy: OnLogout, subject: &Subject) -> Result<()> {
    if policy != OnLogout::End {
        return Ok(());
    }
    if !subject.logout_received {
        return Err(Error::LogoutPolicyNotAllowed(format!(
            "issuer {:?} sends no back-channel logouts to this service",
            subject.issuer
        )));
    }
    if subject.sub.is_none() && subject.session_id.is_none() {
        return Err(Error::LogoutPolicyNotAllowed(
            "the user's token names no sid or sub that a logout could match".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }
    fn vec(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn patterns_that_can_never_match_are_named() {
        for ok in [
            "*",
            "inventory.*",
            "inventory.items.*",
            "inventory.read",
            "a",
        ] {
            assert_eq!(pattern_problem(ok), None, "{ok}");
        }
        for bad in [
            "",
            "inventory*",
            "*.write",
            "inv*.read",
            ".*",
            "a..*",
            "a b",
            "**",
        ] {
            let problem = pattern_problem(bad);
            assert!(problem.is_some(), "{bad:?} was accepted");
            assert!(!pattern_covers(bad, "inventory.read") && !pattern_covers(bad, "a.write"));
        }
    }

    #[test]
    fn patterns() {
        assert!(pattern_covers("inventory.*", "inventory.read"));
        assert!(pattern_covers("inventory.*", "inventory.items.write"));
        assert!(!pattern_covers("inventory.*", "inventoryx.read"));
        assert!(!pattern_covers("inventory.*", "inventory"));
        assert!(pattern_covers("*", "anything"));
        assert!(pattern_covers("users.read", "users.read"));
        assert!(!pattern_covers("users.read", "users.readx"));
        // A bare trailing star without a dot is not a prefix wildcard.
        assert!(!pattern_covers("inv*", "inventory.read"));
    }

    #[test]
    fn grant_is_the_intersection_and_refuses_by_name() {
        let user = set(&["a.read", "a.write", "b.read"]);
        let delegable = vec(&["a.*"]);
        assert_eq!(
            permissions(&vec(&["a.read"]), &user, &delegable).unwrap(),
            vec(&["a.read"])
        );
        assert_eq!(
            permissions(&[], &user, &delegable).unwrap(),
            vec(&["a.read", "a.write"])
        );
        match permissions(&vec(&["a.read", "c.admin"]), &user, &delegable) {
            Err(Error::PermissionNotHeld(names)) => assert_eq!(names, vec(&["c.admin"])),
            other => panic!("{other:?}"),
        }
        match permissions(&vec(&["b.read"]), &user, &delegable) {
            Err(Error::PermissionNotDelegable(names)) => assert_eq!(names, vec(&["b.read"])),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            permissions(&[], &set(&["b.read"]), &delegable),
            Err(Error::NoPermissionsGranted)
        ));
        // A literal wildcard the user holds is never granted implicitly.
        assert_eq!(
            permissions(&[], &set(&["a.*", "a.read"]), &delegable).unwrap(),
            vec(&["a.read"])
        );
    }

    #[test]
    fn wildcards_and_oversize_requests_are_invalid() {
        let user = set(&["a.read"]);
        let star = permissions(&vec(&["a.*"]), &user, &vec(&["*"]));
        assert!(matches!(star, Err(Error::InvalidArgument { .. })));
        let many: Vec<String> = (0..1000).map(|i| format!("p{i}")).collect();
        assert!(matches!(
            permissions(&many, &user, &vec(&["*"])),
            Err(Error::InvalidArgument { .. })
        ));
        let long = vec![String::from("x").repeat(500)];
        assert!(matches!(
            permissions(&long, &user, &vec(&["*"])),
            Err(Error::InvalidArgument { .. })
        ));
    }

    fn module(on_logout: crate::module::OnLogoutConfig) -> Module {
        Module {
            id: "importer".into(),
            delegable: vec!["*".into()],
            max_lifetime: Duration::from_secs(6 * 3600),
            default_lifetime: Duration::from_secs(3600),
            tenants: None,
            audiences: vec!["platform".into()],
            on_logout,
        }
    }

    #[test]
    fn lifetime_is_the_default_the_request_or_the_cap() {
        let m = module(Default::default());
        let ttl = Duration::from_secs(300);
        let hours = |h: u64| Duration::from_secs(h * 3600);
        let life = |requested, over_cap| lifetime(requested, &m, ttl, over_cap);
        let granted = |granted, clamped| Lifetime { granted, clamped };
        assert_eq!(
            life(None, OverCap::Refuse).unwrap(),
            granted(hours(1), false)
        );
        assert_eq!(
            life(Some(hours(2)), OverCap::Refuse).unwrap(),
            granted(hours(2), false)
        );
        assert_eq!(
            life(Some(ttl), OverCap::Refuse).unwrap(),
            granted(ttl, false)
        );
        assert_eq!(
            life(Some(hours(6)), OverCap::Refuse).unwrap(),
            granted(hours(6), false)
        );
        assert_eq!(
            life(Some(hours(7)), OverCap::Clamp).unwrap(),
            granted(hours(6), true)
        );
        assert!(matches!(
            life(Some(hours(7)), OverCap::Refuse),
            Err(Error::LifetimeExceedsCap {
                requested_secs: 25_200,
                cap_secs: 21_600
            })
        ));
        // Shorter than one access token, or absurd, is a mistake whatever the policy.
        for bad in [
            ttl - Duration::from_millis(1),
            ABSURD_LIFETIME + Duration::from_secs(1),
        ] {
            for over_cap in [OverCap::Clamp, OverCap::Refuse] {
                let e = life(Some(bad), over_cap).unwrap_err();
                assert!(
                    matches!(
                        e,
                        Error::InvalidArgument {
                            field: "max_lifetime",
                            ..
                        }
                    ),
                    "{bad:?}: {e:?}"
                );
            }
        }
    }

    #[test]
    fn a_logout_policy_is_one_the_module_may_ask_for_and_could_take_effect() {
        let survive_only = crate::module::OnLogoutConfig {
            default: OnLogout::Survive,
            allowed: vec![OnLogout::Survive],
        };
        let m = module(survive_only);
        assert_eq!(logout_policy(&m, None).unwrap(), OnLogout::Survive);
        let e = logout_policy(&m, Some(OnLogout::End)).unwrap_err();
        assert!(matches!(e, Error::LogoutPolicyNotAllowed(_)), "{e:?}");
        let subject = Subject {
            issuer: "https://kc/realms/acme".into(),
            subject: "u1".into(),
            sub: Some("u1".into()),
            session_id: None,
            logout_received: true,
            tenant: "acme".into(),
            permissions: BTreeSet::new(),
            permission_source: None,
        };
        check_logout_policy(OnLogout::End, &subject).unwrap();
        check_logout_policy(OnLogout::Survive, &subject).unwrap();
        let unheard = Subject {
            logout_received: false,
            ..subject.clone()
        };
        let unnamed = Subject {
            sub: None,
            ..subject.clone()
        };
        for s in [&unheard, &unnamed] {
            check_logout_policy(OnLogout::Survive, s).unwrap();
            let e = check_logout_policy(OnLogout::End, s).unwrap_err();
            assert!(matches!(e, Error::LogoutPolicyNotAllowed(_)), "{e:?}");
        }
        let by_session = Subject {
            session_id: Some("s1".into()),
            ..unnamed
        };
        check_logout_policy(OnLogout::End, &by_session).unwrap();
    }
}
