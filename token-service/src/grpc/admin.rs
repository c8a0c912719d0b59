//! `jobtoken.v1.AdminService`.

use std::sync::Arc;

use jobtoken_proto::jobtoken::v1 as pb;
use pb::admin_service_server::AdminService;
use tonic::{Request, Response, Status};

use super::{ADMIN_KEY_HEADER, RpcObserver, convert, observe};
use crate::error::Error;
use crate::reload::Live;
use crate::service::LeaseService;
use crate::store::LeaseFilter;

/// The operator-facing API.
#[derive(Debug, Clone)]
pub struct AdminApi {
    service: Arc<LeaseService>,
    /// The admin key is read from here at every call (a reload swaps it).
    live: Arc<Live>,
    observer: Arc<RpcObserver>,
}

impl AdminApi {
    /// Wires the API to the domain.
    pub fn new(service: Arc<LeaseService>, live: Arc<Live>, observer: Arc<RpcObserver>) -> Self {
        Self {
            service,
            live,
            observer,
        }
    }

    fn check<T>(&self, request: &Request<T>) -> Result<(), Error> {
        let key = request
            .metadata()
            .get(ADMIN_KEY_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or(Error::AdminUnauthenticated)?;
        if self.live.admin.load().check(key) {
            Ok(())
        } else {
            Err(Error::AdminUnauthenticated)
        }
    }
}

fn required(field: &'static str, value: String) -> Result<String, Error> {
    if value.is_empty() {
        Err(Error::invalid(field, "is required"))
    } else {
        Ok(value)
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn get_lease(
        &self,
        request: Request<pb::GetLeaseRequest>,
    ) -> Result<Response<pb::GetLeaseResponse>, Status> {
        observe(&self.observer, "GetLease", request.remote_addr(), async {
            self.check(&request)?;
            let (lease, events) = self
                .service
                .get_lease(&request.into_inner().lease_id)
                .await?;
            Ok(Response::new(pb::GetLeaseResponse {
                lease: Some(convert::lease(&lease)),
                refresh_count: lease.refresh_count,
                last_refreshed_at: lease.last_refreshed_at.map(convert::timestamp),
                resume_count: lease.resume_count,
                events: events.into_iter().map(convert::event).collect(),
                permissions_checked_at: lease
                    .standing
                    .permissions_checked_at
                    .map(convert::timestamp),
            }))
        })
        .await
    }

    async fn list_leases(
        &self,
        request: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<pb::ListLeasesResponse>, Status> {
        observe(&self.observer, "ListLeases", request.remote_addr(), async {
            self.check(&request)?;
            let r = request.into_inner();
            let active = match pb::LeaseState::try_from(r.state) {
                Ok(pb::LeaseState::Unspecified) => None,
                Ok(pb::LeaseState::Active) => Some(true),
                Ok(pb::LeaseState::Ended) => Some(false),
                Err(_) => return Err(Error::invalid("state", "is not a known LeaseState")),
            };
            let filter = LeaseFilter {
                tenant: convert::non_empty(r.tenant),
                subject: convert::non_empty(r.subject),
                actor: convert::non_empty(r.actor),
                job_id: convert::non_empty(r.job_id),
                active,
                after: None,
            };
            let page_token = convert::non_empty(r.page_token);
            let page = self
                .service
                .list_leases(filter, r.page_size as usize, page_token.as_deref())
                .await?;
            Ok(Response::new(pb::ListLeasesResponse {
                leases: page.leases.iter().map(convert::lease).collect(),
                next_page_token: page.next_page_token.unwrap_or_default(),
            }))
        })
        .await
    }

    async fn revoke_lease(
        &self,
        request: Request<pb::RevokeLeaseRequest>,
    ) -> Result<Response<pb::RevokeLeaseResponse>, Status> {
        observe(
            &self.observer,
            "RevokeLease",
            request.remote_addr(),
            async {
                self.check(&request)?;
                let r = request.into_inner();
                let lease = self
                    .service
                    .admin_revoke_lease(&r.lease_id, &r.reason)
                    .await?;
                Ok(Response::new(pb::RevokeLeaseResponse {
                    lease: Some(convert::lease(&lease)),
                }))
            },
        )
        .await
    }

    async fn revoke_job(
        &self,
        request: Request<pb::RevokeJobRequest>,
    ) -> Result<Response<pb::RevokeJobResponse>, Status> {
        observe(&self.observer, "RevokeJob", request.remote_addr(), async {
            self.check(&request)?;
            let r = request.into_inner();
            let filter = LeaseFilter {
                tenant: Some(required("tenant", r.tenant)?),
                job_id: Some(required("job_id", r.job_id)?),
                ..LeaseFilter::default()
            };
            let revoked_count = self
                .service
                .admin_revoke_matching(filter, &r.reason)
                .await?;
            Ok(Response::new(pb::RevokeJobResponse { revoked_count }))
        })
        .await
    }

    async fn revoke_subject(
        &self,
        request: Request<pb::RevokeSubjectRequest>,
    ) -> Result<Response<pb::RevokeSubjectResponse>, Status> {
        observe(
            &self.observer,
            "RevokeSubject",
            request.remote_addr(),
            async {
                self.check(&request)?;
                let r = request.into_inner();
                let filter = LeaseFilter {
                    tenant: Some(required("tenant", r.tenant)?),
                    subject: Some(required("subject", r.subject)?),
                    ..LeaseFilter::default()
                };
                let revoked_count = self
                    .service
                    .admin_revoke_matching(filter, &r.reason)
                    .await?;
                Ok(Response::new(pb::RevokeSubjectResponse { revoked_count }))
            },
        )
        .await
    }

    async fn revoke_actor(
        &self,
        request: Request<pb::RevokeActorRequest>,
    ) -> Result<Response<pb::RevokeActorResponse>, Status> {
        observe(
            &self.observer,
            "RevokeActor",
            request.remote_addr(),
            async {
                self.check(&request)?;
                let r = request.into_inner();
                let filter = LeaseFilter {
                    actor: Some(required("actor", r.actor)?),
                    ..LeaseFilter::default()
                };
                let revoked_count = self
                    .service
                    .admin_revoke_matching(filter, &r.reason)
                    .await?;
                Ok(Response::new(pb::RevokeActorResponse { revoked_count }))
            },
        )
        .await
    }

    async fn rotate_signing_key(
        &self,
        request: Request<pb::RotateSigningKeyRequest>,
    ) -> Result<Response<pb::RotateSigningKeyResponse>, Status> {
        observe(
            &self.observer,
            "RotateSigningKey",
            request.remote_addr(),
            async {
                self.check(&request)?;
                let (new_kid, retired_kid, starts) = self.service.rotate_signing_key().await?;
                Ok(Response::new(pb::RotateSigningKeyResponse {
                    new_kid,
                    retired_kid,
                    signing_starts_at: Some(convert::timestamp(starts)),
                }))
            },
        )
        .await
    }
}
