//! Renewal and resume: rotating refresh tokens, grace retries, reuse detection, and
//! following the user's standing (permission re-checks) before new tokens are minted.

use super::*;

impl LeaseService {
    /// Renews a lease: rotates the refresh token and mints a new access token.
    pub async fn refresh(
        &self,
        module: &Module,
        lease_id: &str,
        refresh_token: &str,
    ) -> Result<(Lease, TokenPair)> {
        check_id("lease_id", lease_id)?;
        if refresh_token.is_empty() {
            return Err(Error::invalid("refresh_token", "is required"));
        }
        if refresh_token.len() > MAX_ID_LEN {
            return Err(Error::RefreshTokenInvalid);
        }
        let presented = RefreshToken::parse(refresh_token).ok_or(Error::RefreshTokenInvalid)?;
        // The user's standing, asked once however often the write below is retried.
        let mut found = None;
        with_cas!(self, |now| {
            let mut lease = self
                .store
                .get_lease(lease_id)
                .await?
                .ok_or(Error::LeaseNotFound)?;
            check_holder(module, &lease)?;
            if !self.renewable(module, &lease, now).await? {
                return Ok(Cas::Retry);
            }
            if !self
                .master
                .verify_refresh_token(&lease.id, &lease.seed, &presented)
            {
                return Err(Error::RefreshTokenInvalid);
            }
            let current = lease.generation;
            match lease.renewal(presented.generation, now, self.settings.refresh_grace) {
                Renewal::Rotate => {
                    let AfterStanding::Renews(narrowed) =
                        self.before_renewal(&mut lease, &mut found, now).await?
                    else {
                        return Ok(Cas::Retry);
                    };
                    let event = narrowed.as_deref().map(|withdrawn| {
                        let detail = narrowing_detail(withdrawn);
                        LeaseEvent::new(&lease, EventKind::Narrowed, now, "system", &detail)
                    });
                    lease.rotate(now);
                    match self.store.update_lease(&lease, event.as_ref()).await? {
                        Some(version) => lease.version = version,
                        None => return Ok(Cas::Retry),
                    }
                    if let Some(withdrawn) = &narrowed {
                        crate::audit::narrowed(&lease, withdrawn);
                    }
                    crate::audit::renewed("lease.refreshed", &lease);
                    let tokens = self.mint(&lease, now)?;
                    return Ok(Cas::Done((lease, tokens)));
                }
                Renewal::GraceRetry => {
                    crate::audit::renewed("lease.refresh_retry", &lease);
                    let tokens = self.mint(&lease, now)?;
                    return Ok(Cas::Done((lease, tokens)));
                }
                Renewal::Reused => {}
            }
            lease.finish(
                EndReason::RefreshTokenReused,
                now,
                "system",
                &format!(
                    "refresh token generation {} presented after generation {} was issued",
                    presented.generation, current
                ),
            );
            if self.write_end(&lease).await?.is_none() {
                return Ok(Cas::Retry);
            }
            crate::audit::reuse_detected(&lease, presented.generation, current);
            return Err(Error::RefreshTokenReused);
        })
    }

    /// Re-attaches `module` to its active lease for `job_id` in `tenant`; earlier refresh
    /// tokens die. `tenant` may be left out only by a module that serves one tenant.
    pub async fn resume(
        &self,
        module: &Module,
        tenant: Option<&str>,
        job_id: &str,
    ) -> Result<(Lease, TokenPair)> {
        check_id("job_id", job_id)?;
        let tenant = match tenant {
            Some(t) => {
                check_id("tenant", t)?;
                t
            }
            None => module.only_tenant().ok_or_else(|| {
                Error::invalid(
                    "tenant",
                    "is required: a lease is identified by tenant, module and job",
                )
            })?,
        };
        if !module.serves(tenant) {
            return Err(Error::TenantNotServed(tenant.to_owned()));
        }
        let mut found = None;
        with_cas!(self, |now| {
            let mut lease = self
                .store
                .find_active_lease(tenant, &module.id, job_id)
                .await?
                .ok_or(Error::LeaseNotFound)?;
            if !self.renewable(module, &lease, now).await? {
                return Ok(Cas::Retry);
            }
            let AfterStanding::Renews(narrowed) =
                self.before_renewal(&mut lease, &mut found, now).await?
            else {
                return Ok(Cas::Retry);
            };
            lease.resume(now, random_bytes::<32>().to_vec());
            // One event per write: a narrowing found at resume is told in its detail.
            let detail = narrowed
                .as_deref()
                .map(narrowing_detail)
                .unwrap_or_default();
            let event = LeaseEvent::new(
                &lease,
                EventKind::Resumed,
                now,
                &module.principal(),
                &detail,
            );
            match self.store.update_lease(&lease, Some(&event)).await? {
                Some(version) => lease.version = version,
                None => return Ok(Cas::Retry),
            }
            if let Some(withdrawn) = &narrowed {
                crate::audit::narrowed(&lease, withdrawn);
            }
            crate::audit::renewed("lease.resumed", &lease);
            let tokens = self.mint(&lease, now)?;
            return Ok(Cas::Done((lease, tokens)));
        })
    }

    /// Whether `module` may have new tokens of `lease` at `now`: refused when the
    /// module's `audiences` no longer include the lease's (it may still release it) or
    /// the lease has ended (ending it if its time ran out); `false` when that end lost a
    /// race, so the caller reads the lease again.
    pub(super) async fn renewable(
        &self,
        module: &Module,
        lease: &Lease,
        now: SystemTime,
    ) -> Result<bool> {
        if !module.may_address(&lease.audience) {
            return Err(Error::AudienceNotAllowed(lease.audience.clone()));
        }
        match self.end_if_due(lease, now).await? {
            Liveness::Active => Ok(true),
            Liveness::Ended(reason, detail) => Err(Error::LeaseEnded(reason, detail)),
            Liveness::LostRace => Ok(false),
        }
    }

    /// Asks the platform for the user's standing when a re-check of `lease` is due.
    pub(super) async fn recheck_if_due(
        &self,
        lease: &Lease,
        now: SystemTime,
    ) -> Option<(RecheckPolicy, Recheck)> {
        let source = lease.standing.permission_source.as_deref()?;
        let sources = self.permission_source.load_full();
        let policy = sources.recheck_policy(source)?;
        if !recheck::due(lease, &policy, now) {
            return None;
        }
        let found = sources
            .recheck(&RecheckQuery {
                source,
                tenant: &lease.tenant,
                user_id: &lease.subject,
                sub: lease.standing.sub.as_deref(),
            })
            .await;
        Some((policy, found))
    }

    /// Follows the user's standing before `lease` renews or resumes at `now`: asks the
    /// platform when a re-check is due (once per call: `found` keeps the answer across
    /// compare-and-set retries) and applies the answer. Ends the lease, and returns
    /// [`Error::LeaseEnded`], when the answer says so.
    pub(super) async fn before_renewal(
        &self,
        lease: &mut Lease,
        found: &mut Option<Option<(RecheckPolicy, Recheck)>>,
        now: SystemTime,
    ) -> Result<AfterStanding> {
        if found.is_none() {
            let answer = self.recheck_if_due(lease, now).await;
            if let Some((policy, answer)) = &answer {
                self.report_recheck(lease, policy, answer, now);
            }
            *found = Some(answer);
        }
        let Some(Some((policy, answer))) = found.as_ref() else {
            return Ok(AfterStanding::Renews(None));
        };
        match self.follow_standing(lease, policy, answer, now) {
            Ok(narrowed) => Ok(AfterStanding::Renews(narrowed)),
            Err((reason, detail)) => {
                lease.finish(reason, now, "system", &detail);
                if self.write_end(lease).await?.is_none() {
                    return Ok(AfterStanding::LostRace);
                }
                Err(Error::LeaseEnded(reason, detail))
            }
        }
    }

    /// Measures what a re-check found, once per call (not per compare-and-set attempt).
    fn report_recheck(
        &self,
        lease: &Lease,
        policy: &RecheckPolicy,
        answer: &Recheck,
        now: SystemTime,
    ) {
        let verdict = recheck::decide(lease, answer, policy, now);
        let source = lease
            .standing
            .permission_source
            .as_deref()
            .unwrap_or_default();
        let unverified = match &verdict {
            Verdict::Unverified {
                unverified_for,
                problem,
            } => {
                // At DEBUG: the source's failure is logged once each way by its adapter.
                tracing::debug!(
                    lease_id = %lease.id,
                    tenant = %lease.tenant,
                    issuer = %source,
                    unverified_secs = unverified_for.as_secs(),
                    error = %problem,
                    "permission re-check failed: the lease renews with what it holds"
                );
                Some(*unverified_for)
            }
            _ => None,
        };
        self.metrics.recheck(source, verdict.label(), unverified);
    }

    /// Applies what a re-check found to `lease`: `Ok` with what a narrowing withdrew, if
    /// anything; `Err` with the reason the lease must end. Reports nothing: the caller
    /// audits a narrowing once it is written.
    pub(super) fn follow_standing(
        &self,
        lease: &mut Lease,
        policy: &RecheckPolicy,
        answer: &Recheck,
        now: SystemTime,
    ) -> std::result::Result<Option<Vec<String>>, (EndReason, String)> {
        match recheck::decide(lease, answer, policy, now) {
            Verdict::Confirmed => {
                lease.standing.permissions_checked_at = Some(now);
                Ok(None)
            }
            Verdict::Narrow {
                remaining,
                withdrawn,
            } => {
                lease.permissions = remaining;
                lease.standing.permissions_checked_at = Some(now);
                Ok(Some(withdrawn))
            }
            Verdict::End(reason, detail) => Err((reason, detail)),
            Verdict::Unverified { .. } => Ok(None),
        }
    }
}

/// The story's detail of a narrowing.
fn narrowing_detail(withdrawn: &[String]) -> String {
    format!("permissions withdrawn: {}", withdrawn.join(", "))
}
