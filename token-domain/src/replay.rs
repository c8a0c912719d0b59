//! Remembers the ids (`jti`) of the logout tokens received, each until the token would be
//! too old to accept anyway, so a replayed logout token is refused.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::SystemTime;

/// Most ids remembered at once. Ids are dropped when their token would be too old
/// (minutes), so this bounds the logouts per few minutes a replica takes, not in total.
pub const MAX_REMEMBERED: usize = 100_000;

/// Why an id was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Seen before, and still within its window.
    Replayed,
    /// As many ids as allowed are within their windows.
    Full,
}

/// The ids seen, by issuer, with when each may be forgotten.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    seen: Mutex<HashMap<(String, String), SystemTime>>,
}

impl ReplayGuard {
    /// Takes `jti` of `issuer`, to be remembered until `until`; refuses one seen before.
    pub fn take(
        &self,
        issuer: &str,
        jti: &str,
        until: SystemTime,
        now: SystemTime,
    ) -> Result<(), Refused> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let key = (issuer.to_owned(), jti.to_owned());
        if seen.get(&key).is_some_and(|forget_at| now < *forget_at) {
            return Err(Refused::Replayed);
        }
        if seen.len() >= MAX_REMEMBERED {
            seen.retain(|_, forget_at| now < *forget_at);
            if seen.len() >= MAX_REMEMBERED {
                return Err(Refused::Full);
            }
        }
        seen.insert(key, until);
        Ok(())
    }

    /// Forgets `jti` (its logout could not be carried out, so the issuer may send it
    /// again).
    pub fn forget(&self, issuer: &str, jti: &str) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.remove(&(issuer.to_owned(), jti.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_id_is_refused_again_until_its_window_ends_and_per_issuer() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let until = t0 + Duration::from_secs(300);
        let guard = ReplayGuard::default();
        assert_eq!(guard.take("kc", "j1", until, t0), Ok(()));
        assert_eq!(guard.take("kc", "j1", until, t0), Err(Refused::Replayed));
        assert_eq!(guard.take("other", "j1", until, t0), Ok(()));
        assert_eq!(
            guard.take("kc", "j1", until, until - Duration::from_secs(1)),
            Err(Refused::Replayed)
        );
        assert_eq!(guard.take("kc", "j1", until, until), Ok(()));
        guard.forget("kc", "j1");
        assert_eq!(guard.take("kc", "j1", until, t0), Ok(()));
    }

    #[test]
    fn the_memory_is_bounded_and_frees_ids_whose_window_ended() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let until = t0 + Duration::from_secs(300);
        let guard = ReplayGuard::default();
        for i in 0..MAX_REMEMBERED {
            assert_eq!(guard.take("kc", &i.to_string(), until, t0), Ok(()));
        }
        assert_eq!(guard.take("kc", "one-more", until, t0), Err(Refused::Full));
        // Once their window has passed, the old ids make room.
        assert_eq!(
            guard.take("kc", "one-more", until + Duration::from_secs(300), until),
            Ok(())
        );
    }
}
