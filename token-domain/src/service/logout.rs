//! OpenID Connect back-channel logout: the leases it ends.

use super::*;

impl LeaseService {
    /// OpenID Connect back-channel logout: verifies `logout_token` and ends every active
    /// lease with policy `end` it reaches (granted from the session it names, or of the
    /// user it names, before the logout). Returns how many it ended.
    pub async fn backchannel_logout(&self, logout_token: &str) -> Result<usize> {
        let outcome = self.log_out(logout_token).await;
        let result = match &outcome {
            Ok(_) => "accepted",
            Err(Error::LogoutTokenInvalid(problem)) => {
                tracing::warn!(error = %problem, "back-channel logout refused");
                "invalid"
            }
            Err(e) => {
                tracing::warn!(error = %e, "back-channel logout could not be carried out");
                "unavailable"
            }
        };
        self.metrics.logout(result);
        outcome
    }

    pub(super) async fn log_out(&self, logout_token: &str) -> Result<usize> {
        const PAGE: usize = 500;
        if logout_token.is_empty() {
            return Err(Error::LogoutTokenInvalid("logout_token is required".into()));
        }
        let now = self.clock.now();
        let subjects = self.subjects.load_full();
        let claims = subjects.verify_logout(logout_token, now).await?;
        match self
            .logouts
            .take(&claims.issuer, &claims.jti, claims.remember_until, now)
        {
            Ok(()) => {}
            Err(Refused::Replayed) => {
                return Err(Error::LogoutTokenInvalid(
                    "the logout token was already received (jti)".into(),
                ));
            }
            // Refusing would leave the user's leases running. A replay is harmless (ending
            // is idempotent and later leases are untouched), so carry it out unremembered.
            Err(Refused::Full) => tracing::warn!(
                limit = crate::replay::MAX_REMEMBERED,
                "logout token ids not remembered: too many logouts within max_age"
            ),
        }
        let logout = Logout {
            issuer: claims.issuer.clone(),
            session_id: claims.session_id.clone(),
            sub: claims.sub.clone(),
        };
        // `iat` is in whole seconds: a lease granted within its second predates it.
        let logged_out_at = claims.issued_at + Duration::from_secs(1);
        let detail = "the user's session was logged out at the identity provider";
        let mut ended = 0;
        let outcome: Result<()> = async {
            loop {
                let page = self.store.leases_to_log_out(&logout, PAGE).await?;
                let mut ended_now = 0;
                for lease in page.iter().filter(|l| l.created_at < logged_out_at) {
                    let (_, by_this_call) = self
                        .end_lease(
                            &lease.id,
                            EndReason::SubjectLoggedOut,
                            "system",
                            detail,
                            |_| Ok(()),
                        )
                        .await?;
                    ended_now += usize::from(by_this_call);
                }
                ended += ended_now;
                // Leases granted after the logout stay in the answer: stop once a page
                // ends nothing or is the last.
                if page.len() < PAGE || ended_now == 0 {
                    return Ok(());
                }
            }
        }
        .await;
        if let Err(e) = outcome {
            // Not carried out in full: let the issuer send it again.
            self.logouts.forget(&claims.issuer, &claims.jti);
            return Err(e);
        }
        crate::audit::logged_out(&claims, ended);
        Ok(ended)
    }
}
