//! The calls the background tasks make, behind a trait so timing tests can script them.

use async_trait::async_trait;
use tonic::Status;

use crate::{JobTokenClient, proto};

/// Renewal and release of one lease.
#[async_trait]
pub(crate) trait Api: Send + Sync + 'static {
    /// `RefreshJobToken`.
    async fn refresh(
        &self,
        lease_id: &str,
        refresh_token: &str,
    ) -> Result<proto::TokenPair, Status>;
    /// `RevokeJobToken` by the holder.
    async fn release(
        &self,
        lease_id: &str,
        outcome: proto::JobOutcome,
        detail: &str,
    ) -> Result<(), Status>;
}

/// The real service over gRPC.
pub(crate) struct Grpc(pub(crate) JobTokenClient);

#[async_trait]
impl Api for Grpc {
    async fn refresh(
        &self,
        lease_id: &str,
        refresh_token: &str,
    ) -> Result<proto::TokenPair, Status> {
        let response = self
            .0
            .clone()
            .refresh_job_token(proto::RefreshJobTokenRequest {
                lease_id: lease_id.to_owned(),
                refresh_token: refresh_token.to_owned(),
            })
            .await?
            .into_inner();
        response
            .tokens
            .ok_or_else(|| Status::internal("the service sent no tokens"))
    }

    async fn release(
        &self,
        lease_id: &str,
        outcome: proto::JobOutcome,
        detail: &str,
    ) -> Result<(), Status> {
        self.0
            .clone()
            .revoke_job_token(proto::RevokeJobTokenRequest {
                lease_id: lease_id.to_owned(),
                outcome: outcome as i32,
                detail: detail.to_owned(),
            })
            .await?;
        Ok(())
    }
}
