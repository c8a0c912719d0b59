//! The store contract, written once and held against both stores.

use std::time::{Duration, SystemTime};

use crate::lease::{EventKind, Lease, LeaseEvent};

/// An active lease for `job` of tenant `t`, actor `importer`, with a fresh id.
pub(crate) fn lease(job: &str) -> Lease {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    Lease {
        id: uuid::Uuid::new_v4().to_string(),
        tenant: "t".into(),
        subject: "alice".into(),
        actor: "importer".into(),
        job_id: job.into(),
        permissions: vec!["records:write".into()],
        audience: "api".into(),
        created_at: now,
        expires_at: now + Duration::from_secs(3600),
        idle_timeout: Duration::from_secs(600),
        last_active_at: now,
        end: None,
        generation: 0,
        seed: vec![7; 32],
        rotated_at: now,
        refresh_count: 0,
        last_refreshed_at: None,
        resume_count: 0,
        standing: Default::default(),
        version: 0,
    }
}

/// The `Issued` event of `l`.
pub(crate) fn issued(l: &Lease) -> LeaseEvent {
    LeaseEvent::new(l, EventKind::Issued, l.created_at, "module:importer", "")
}
