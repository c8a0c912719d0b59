//! Permission names and the grant rule: granted = requested ∩ user's ∩ delegable.

use std::collections::BTreeSet;

use crate::error::{Error, Result};

/// Most permissions one request may name.
pub const MAX_PERMISSIONS: usize = 256;
/// Longest permission name.
pub const MAX_PERMISSION_LEN: usize = 200;

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
pub fn grant(
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
            grant(&vec(&["a.read"]), &user, &delegable).unwrap(),
            vec(&["a.read"])
        );
        assert_eq!(
            grant(&[], &user, &delegable).unwrap(),
            vec(&["a.read", "a.write"])
        );
        match grant(&vec(&["a.read", "c.admin"]), &user, &delegable) {
            Err(Error::PermissionNotHeld(names)) => assert_eq!(names, vec(&["c.admin"])),
            other => panic!("{other:?}"),
        }
        match grant(&vec(&["b.read"]), &user, &delegable) {
            Err(Error::PermissionNotDelegable(names)) => assert_eq!(names, vec(&["b.read"])),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            grant(&[], &set(&["b.read"]), &delegable),
            Err(Error::NoPermissionsGranted)
        ));
        // A literal wildcard the user holds is never granted implicitly.
        assert_eq!(
            grant(&[], &set(&["a.*", "a.read"]), &delegable).unwrap(),
            vec(&["a.read"])
        );
    }

    #[test]
    fn wildcards_and_oversize_requests_are_invalid() {
        let user = set(&["a.read"]);
        let star = grant(&vec(&["a.*"]), &user, &vec(&["*"]));
        assert!(matches!(star, Err(Error::InvalidArgument { .. })));
        let many: Vec<String> = (0..1000).map(|i| format!("p{i}")).collect();
        assert!(matches!(
            grant(&many, &user, &vec(&["*"])),
            Err(Error::InvalidArgument { .. })
        ));
        let long = vec![String::from("x").repeat(500)];
        assert!(matches!(
            grant(&long, &user, &vec(&["*"])),
            Err(Error::InvalidArgument { .. })
        ));
    }
}
