//! Every way a lease ends: its time running out, its holder, an administrator, the
//! sweeper; and the purge of long-ended leases.

use super::*;

impl LeaseService {
    /// Ends `lease` if its time has run out at `now`: whether it is (now) active.
    pub(super) async fn end_if_due(&self, lease: &Lease, now: SystemTime) -> Result<Liveness> {
        if let Some(end) = &lease.end {
            return Ok(Liveness::Ended(end.reason, end.detail.clone()));
        }
        let Some(reason) = lease.due_end(now) else {
            return Ok(Liveness::Active);
        };
        let mut ended = lease.clone();
        let at = now.min(lease.deadline());
        ended.finish(reason, at, "system", reason.describe());
        Ok(match self.write_end(&ended).await? {
            Some(_) => Liveness::Ended(reason, reason.describe().to_owned()),
            None => Liveness::LostRace,
        })
    }

    /// Writes an ended lease with its event: its new version, or `None` if someone else
    /// wrote first.
    pub(super) async fn write_end(&self, ended: &Lease) -> Result<Option<i64>> {
        let event = LeaseEvent::ended(
            ended,
            self.settings.access_token_ttl,
            self.settings.refresh_grace,
        );
        let written = self.store.update_lease(ended, event.as_ref()).await?;
        if written.is_some() {
            if let Some(end) = &ended.end {
                self.metrics.lease_ended(end.reason.as_str());
                crate::audit::ended(ended, end);
            }
            self.ends.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(written)
    }

    /// Ends a lease; idempotent. `check` refuses before writing (e.g. wrong actor).
    /// Returns the lease as it stands and whether this call ended it.
    pub(super) async fn end_lease(
        &self,
        lease_id: &str,
        reason: EndReason,
        by: &str,
        detail: &str,
        check: impl Fn(&Lease) -> Result<()>,
    ) -> Result<(Lease, bool)> {
        // Callers check `detail` against their own field's limit.
        check_id("lease_id", lease_id)?;
        with_cas!(self, |now| {
            let mut lease = self
                .store
                .get_lease(lease_id)
                .await?
                .ok_or(Error::LeaseNotFound)?;
            check(&lease)?;
            match self.end_if_due(&lease, now).await? {
                Liveness::Active => {}
                Liveness::Ended(..) => {
                    let lease = self.store.get_lease(lease_id).await?;
                    return Ok(Cas::Done((lease.ok_or(Error::LeaseNotFound)?, false)));
                }
                Liveness::LostRace => return Ok(Cas::Retry),
            }
            lease.finish(reason, now, by, detail);
            if let Some(version) = self.write_end(&lease).await? {
                lease.version = version;
                return Ok(Cas::Done((lease, true)));
            }
            Ok(Cas::Retry)
        })
    }

    /// The holder ends its lease (job done, failed, cancelled).
    pub async fn release(
        &self,
        module: &Module,
        lease_id: &str,
        outcome: &str,
        detail: &str,
    ) -> Result<Lease> {
        check_text("detail", detail, MAX_DETAIL_LEN)?;
        let text = if detail.is_empty() {
            format!("outcome: {outcome}")
        } else {
            format!("outcome: {outcome}; {detail}")
        };
        let (lease, _) = self
            .end_lease(
                lease_id,
                EndReason::Released,
                &module.principal(),
                &text,
                |l| check_holder(module, l),
            )
            .await?;
        Ok(lease)
    }

    /// An administrator ends one lease.
    pub async fn admin_revoke_lease(&self, lease_id: &str, reason: &str) -> Result<Lease> {
        check_text("reason", reason, MAX_DETAIL_LEN)?;
        let (lease, _) = self
            .end_lease(lease_id, EndReason::Revoked, "admin", reason, |_| Ok(()))
            .await?;
        Ok(lease)
    }

    /// An administrator ends every active lease matching `filter`; returns how many.
    pub async fn admin_revoke_matching(&self, filter: LeaseFilter, reason: &str) -> Result<u32> {
        check_text("reason", reason, MAX_DETAIL_LEN)?;
        let requested = filter.clone();
        let mut filter = LeaseFilter {
            active: Some(true),
            ..filter
        };
        let mut count = 0u32;
        loop {
            let page = self.store.list_leases(&filter, MAX_PAGE_SIZE).await?;
            let Some(last) = page.last() else { break };
            filter.after = Some((last.created_at, last.id.clone()));
            for lease in &page {
                let (_, by_this_call) = self
                    .end_lease(&lease.id, EndReason::Revoked, "admin", reason, |_| Ok(()))
                    .await?;
                if by_this_call {
                    count = count.saturating_add(1);
                }
            }
        }
        crate::audit::revoked_matching(&requested, count, reason);
        Ok(count)
    }

    /// Ends every lease whose deadline has passed; returns how many it ended.
    pub async fn sweep(&self) -> Result<usize> {
        let now = self.clock.now();
        let mut ended = 0;
        for lease in self.store.leases_due(now, 1000).await? {
            if let Liveness::Ended(..) = self.end_if_due(&lease, now).await? {
                ended += 1;
            }
        }
        Ok(ended)
    }

    /// Deletes leases that ended more than `retention` ago, in batches; returns how many.
    pub async fn purge_ended(&self, retention: Duration) -> Result<usize> {
        const BATCH: usize = 1000;
        let before = self.clock.now() - retention;
        let mut total = 0;
        loop {
            let n = self.store.purge_ended(before, BATCH).await?;
            total += n;
            if n < BATCH {
                return Ok(total);
            }
        }
    }
}
