//! Granting a lease from the user's token: verify the user, apply the grant rules
//! ([`crate::grant`]), write the lease, mint its first tokens.

use super::*;
use crate::grant::{self, Lifetime};

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
        let on_logout = grant::logout_policy(module, req.on_logout)?;
        let now = self.clock.now();
        // A snapshot: a reload during this grant does not change its issuer midway.
        let subjects = self.subjects.load_full();
        let subject = subjects.verify(&req.subject_token, now).await?;
        if !module.serves(&subject.tenant) {
            return Err(Error::TenantNotServed(subject.tenant));
        }
        grant::check_logout_policy(on_logout, &subject)?;
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
        let granted = grant::permissions(&req.permissions, held, &module.delegable)?;
        let Lifetime {
            granted: lifetime,
            clamped,
        } = grant::lifetime(
            req.max_lifetime,
            module,
            self.settings.access_token_ttl,
            self.settings.over_cap,
        )?;
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
        crate::audit::issued(&lease, &subject.issuer, lifetime, clamped);
        Ok(Issued {
            lease,
            tokens,
            granted_lifetime: lifetime,
            clamped,
        })
    }
}
