//! Granting a lease from the user's token.

use super::*;

impl LeaseService {
    /// Grants a lease to `module` from the user's token.
    pub async fn issue(&self, module: &Module, req: IssueRequest) -> Result<Issued> {
        check_id("job_id", &req.job_id)?;
        let audience = match req.audience {
            Some(aud) => {
                check_id("audience", &aud)?;
                aud
            }
            None => self.settings.default_audience.clone(),
        };
        if !module.may_address(&audience) {
            return Err(Error::AudienceNotAllowed(audience));
        }
        let on_logout = module.logout_policy(req.on_logout).ok_or_else(|| {
            Error::LogoutPolicyNotAllowed(format!(
                "module {:?} may not ask for on_logout = {}",
                module.id,
                req.on_logout.unwrap_or_default().as_str()
            ))
        })?;
        let now = self.clock.now();
        // A snapshot: a reload during this grant does not change its issuer midway.
        let subjects = self.subjects.load_full();
        let subject = subjects.verify_fetching(&req.subject_token, now).await?;
        if !module.serves(&subject.tenant) {
            return Err(Error::TenantNotServed(subject.tenant));
        }
        if on_logout == OnLogout::End {
            // A policy that could never take effect is refused, not silently kept.
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
        }
        let held = match &subject.permission_source {
            None => None,
            Some(source) => Some(
                self.permission_source
                    .load_full()
                    .permissions(&PermissionQuery {
                        source,
                        tenant: &subject.tenant,
                        user_id: &subject.subject,
                        sub: subject.sub.as_deref(),
                        token: &req.subject_token,
                    })
                    .await?,
            ),
        };
        let held = held.as_ref().unwrap_or(&subject.permissions);
        let granted = permissions::grant(&req.permissions, held, &module.delegable)?;
        let (lifetime, clamped) = match req.max_lifetime {
            None => (module.default_lifetime, false),
            // A lease shorter than one access token would mint tokens born expired.
            Some(d) if d < self.settings.access_token_ttl => {
                return Err(Error::invalid(
                    "max_lifetime",
                    format!(
                        "must be at least the access-token lifetime, {}s",
                        self.settings.access_token_ttl.as_secs_f64()
                    ),
                ));
            }
            Some(d) if d > ABSURD_LIFETIME => {
                return Err(Error::invalid("max_lifetime", "must be at most 366 days"));
            }
            Some(d) if d > module.max_lifetime => match self.settings.over_cap {
                OverCap::Clamp => (module.max_lifetime, true),
                OverCap::Refuse => {
                    return Err(Error::LifetimeExceedsCap {
                        requested_secs: d.as_secs(),
                        cap_secs: module.max_lifetime.as_secs(),
                    });
                }
            },
            Some(d) => (d, false),
        };
        let standing = Standing {
            issuer: subject.issuer.clone(),
            sub: subject.sub.clone(),
            session_id: subject.session_id.clone(),
            on_logout,
            permission_source: subject.permission_source.clone(),
            permissions_checked_at: subject.permission_source.is_some().then_some(now),
        };
        let lease = Lease {
            // Time-ordered (v7), so new leases append to the id index instead of
            // dirtying a random page of it on every grant.
            id: lease_id(now),
            tenant: subject.tenant,
            subject: subject.subject,
            actor: module.id.clone(),
            job_id: req.job_id,
            permissions: granted,
            audience,
            created_at: now,
            expires_at: now + lifetime,
            idle_timeout: self.settings.idle_timeout,
            last_active_at: now,
            end: None,
            generation: 0,
            seed: random_bytes::<32>().to_vec(),
            rotated_at: now,
            refresh_count: 0,
            last_refreshed_at: None,
            resume_count: 0,
            standing,
            version: 0,
        };
        let event = LeaseEvent::new(&lease, EventKind::Issued, now, &module.principal(), "");
        match self.store.insert_lease(&lease, &event).await {
            Err(StoreError::Conflict) => return Err(Error::LeaseAlreadyExists(lease.job_id)),
            other => other?,
        }
        let tokens = self.mint(&lease, now)?;
        tracing::info!(
            target: "audit",
            event = "lease.issued",
            lease_id = %lease.id,
            job_id = %lease.job_id,
            tenant = %lease.tenant,
            actor = %lease.actor,
            subject = %lease.subject,
            issuer = %subject.issuer,
            permissions = ?lease.permissions,
            lifetime_secs = lifetime.as_secs(),
            clamped,
        );
        Ok(Issued {
            lease,
            tokens,
            granted_lifetime: lifetime,
            clamped,
        })
    }
}
