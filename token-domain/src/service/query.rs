//! Reading leases: introspection, one lease and its story, pages of leases.

use super::*;

fn encode_page_token(lease: &Lease) -> String {
    B64.encode(format!("{}:{}", to_millis(lease.created_at), lease.id))
}

fn decode_page_token(token: &str) -> Result<(SystemTime, String)> {
    let bad = || Error::invalid("page_token", "is not a token from a previous page");
    let text = String::from_utf8(B64.decode(token).map_err(|_| bad())?).map_err(|_| bad())?;
    let (ms, id) = text.split_once(':').ok_or_else(bad)?;
    Ok((from_millis(ms.parse().map_err(|_| bad())?), id.to_owned()))
}

impl LeaseService {
    /// RFC 7662 introspection for `module`: the claims if the token is valid now, its
    /// lease active and its tenant one the module serves (others look inactive, so a
    /// module learns nothing about tenants it does not serve).
    pub async fn introspect(&self, module: &Module, token: &str) -> Result<Option<AccessClaims>> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(Error::invalid(
                "token",
                format!("is longer than {MAX_TOKEN_LEN} bytes"),
            ));
        }
        let now = self.clock.now();
        let Some(claims) = self
            .keys
            .verify(token, &self.settings.issuer, now, Duration::ZERO)
        else {
            return Ok(None);
        };
        if !module.serves(&claims.tenant) {
            return Ok(None);
        }
        let lease = self.store.get_lease(&claims.lease_id).await?;
        // A token minted before a narrowing carries permissions the lease no longer has:
        // inactive from the narrowing on, though its signature still verifies.
        let active = lease.is_some_and(|l| {
            l.tenant == claims.tenant
                && l.is_active()
                && l.due_end(now).is_none()
                && claims.permissions.iter().all(|p| l.permissions.contains(p))
        });
        Ok(active.then_some(claims))
    }

    /// One lease and its events.
    pub async fn get_lease(&self, lease_id: &str) -> Result<(Lease, Vec<LeaseEvent>)> {
        check_id("lease_id", lease_id)?;
        let lease = self
            .store
            .get_lease(lease_id)
            .await?
            .ok_or(Error::LeaseNotFound)?;
        let events = self.store.lease_events(lease_id).await?;
        Ok((lease, events))
    }

    /// A page of leases matching `filter` (its `after` is taken from `page_token`).
    pub async fn list_leases(
        &self,
        mut filter: LeaseFilter,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<LeasePage> {
        for (field, value) in [
            ("tenant", &filter.tenant),
            ("subject", &filter.subject),
            ("actor", &filter.actor),
            ("job_id", &filter.job_id),
        ] {
            if let Some(v) = value {
                check_text(field, v, MAX_ID_LEN)?;
            }
        }
        let size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        filter.after = page_token.map(decode_page_token).transpose()?;
        let mut leases = self.store.list_leases(&filter, size + 1).await?;
        let next_page_token = if leases.len() > size {
            leases.truncate(size);
            leases.last().map(encode_page_token)
        } else {
            None
        };
        Ok(LeasePage {
            leases,
            next_page_token,
        })
    }

    /// Counts the active leases and publishes the number as a metric.
    pub async fn count_active_leases(&self) -> Result<u64> {
        let n = self.store.count_active_leases().await?;
        self.metrics.set_active_leases(n);
        Ok(n)
    }
}
