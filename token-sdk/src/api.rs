//! The calls the background tasks make, behind a trait so timing tests can script them.

use async_trait::async_trait;
use tonic::Status;

use crate::{JobTokenClient, proto};

/// A renewal's answer.
pub(crate) struct Renewed {
    /// The new token pair.
    pub(crate) tokens: proto::TokenPair,
    /// The lease's permissions as they now stand (fewer than before when the service
    /// narrowed the lease to the user's standing); `None` when the answer carried no
    /// lease, which leaves them as they were.
    pub(crate) permissions: Option<Vec<String>>,
}

/// Renewal and release of one lease.
#[async_trait]
pub(crate) trait Api: Send + Sync + 'static {
    /// `RefreshJobToken`.
    async fn refresh(&self, lease_id: &str, refresh_token: &str) -> Result<Renewed, Status>;
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
    async fn refresh(&self, lease_id: &str, refresh_token: &str) -> Result<Renewed, Status> {
        let response = self
            .0
            .clone()
            .refresh_job_token(proto::RefreshJobTokenRequest {
                lease_id: lease_id.to_owned(),
                refresh_token: refresh_token.to_owned(),
            })
            .await?
            .into_inner();
        let tokens = response
            .tokens
            .ok_or_else(|| Status::internal("the service sent no tokens"))?;
        Ok(Renewed {
            tokens,
            permissions: response.lease.map(|lease| lease.granted_permissions),
        })
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
