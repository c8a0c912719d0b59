//! `jobtoken.v1.JobTokenService`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use jobtoken_proto::jobtoken::v1 as pb;
use pb::job_token_service_server::JobTokenService;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status};

use super::{ADMIN_KEY_HEADER, RpcObserver, authenticate, convert, observe};
use crate::auth::Module;
use crate::error::Error;
use crate::quota::{Spend, StreamSlot};
use crate::reload::Live;
use crate::service::revocations::{Next, Revocations, Start, stream_tenants};
use crate::service::{IssueRequest, LeaseService};

/// Whom administrators' revocation streams count against in `streams_per_module`.
const ADMIN_STREAM_HOLDER: &str = "@admin";
/// How often an idle revocation stream sends a heartbeat with its cursor.
const WATCH_HEARTBEAT: Duration = Duration::from_secs(30);

/// A heartbeat: where the stream is, and which tenants it covers.
fn heartbeat(stream: &Revocations) -> pb::WatchRevocationsResponse {
    pb::WatchRevocationsResponse {
        cursor: stream.cursor(),
        heartbeat: true,
        tenants: stream.covered().to_vec(),
        ..Default::default()
    }
}

/// The module-facing API.
#[derive(Debug, Clone)]
pub struct JobTokenApi {
    service: Arc<LeaseService>,
    /// Modules and limits, read at every call (a reload swaps them).
    live: Arc<Live>,
    observer: Arc<RpcObserver>,
    /// How often a revocation stream re-reads the store without a local wake-up (ends
    /// written by other replicas or the sweeper of another process).
    watch_poll: Duration,
    /// Becomes true at shutdown: open revocation streams end, so graceful shutdown does
    /// not wait on watchers that never hang up.
    stop: watch::Receiver<bool>,
}

impl JobTokenApi {
    /// Wires the API to the domain.
    pub fn new(
        service: Arc<LeaseService>,
        live: Arc<Live>,
        observer: Arc<RpcObserver>,
        watch_poll: Duration,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self {
            service,
            live,
            observer,
            watch_poll,
            stop,
        }
    }
}

impl JobTokenApi {
    /// The calling module, if it may make one more call of `spend`.
    fn admit<T>(&self, request: &Request<T>, spend: Spend) -> Result<Arc<Module>, Error> {
        let module = authenticate(&self.live.modules.load(), request)?;
        self.live.limits.load().spend(&module.id, spend)?;
        Ok(module)
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchRevocationsResponse, Status>> + Send>>;

fn outcome_name(outcome: i32) -> Result<&'static str, Error> {
    match pb::JobOutcome::try_from(outcome) {
        Ok(pb::JobOutcome::Unspecified) => Ok("unspecified"),
        Ok(pb::JobOutcome::Succeeded) => Ok("succeeded"),
        Ok(pb::JobOutcome::Failed) => Ok("failed"),
        Ok(pb::JobOutcome::Cancelled) => Ok("cancelled"),
        Err(_) => Err(Error::invalid("outcome", "is not a known JobOutcome")),
    }
}

#[tonic::async_trait]
impl JobTokenService for JobTokenApi {
    async fn issue_job_token(
        &self,
        request: Request<pb::IssueJobTokenRequest>,
    ) -> Result<Response<pb::IssueJobTokenResponse>, Status> {
        observe(
            &self.observer,
            "IssueJobToken",
            request.remote_addr(),
            async {
                let module = self.admit(&request, Spend::Grant)?;
                let r = request.into_inner();
                let issued = self
                    .service
                    .issue(
                        &module,
                        IssueRequest {
                            subject_token: r.subject_token,
                            job_id: r.job_id,
                            permissions: r.permissions,
                            max_lifetime: convert::duration_from_proto(
                                "max_lifetime",
                                r.max_lifetime,
                            )?,
                            audience: convert::non_empty(r.audience),
                            on_logout: convert::on_logout(r.on_logout)?,
                        },
                    )
                    .await?;
                Ok(Response::new(pb::IssueJobTokenResponse {
                    lease: Some(convert::lease(&issued.lease)),
                    tokens: Some(convert::tokens(&issued.tokens)),
                    granted_lifetime: Some(convert::duration(issued.granted_lifetime)),
                    lifetime_clamped: issued.clamped,
                }))
            },
        )
        .await
    }

    async fn refresh_job_token(
        &self,
        request: Request<pb::RefreshJobTokenRequest>,
    ) -> Result<Response<pb::RefreshJobTokenResponse>, Status> {
        observe(
            &self.observer,
            "RefreshJobToken",
            request.remote_addr(),
            async {
                let module = self.admit(&request, Spend::Renewal)?;
                let r = request.into_inner();
                let (lease, tokens) = self
                    .service
                    .refresh(&module, &r.lease_id, &r.refresh_token)
                    .await?;
                Ok(Response::new(pb::RefreshJobTokenResponse {
                    lease: Some(convert::lease(&lease)),
                    tokens: Some(convert::tokens(&tokens)),
                }))
            },
        )
        .await
    }

    async fn resume_job_token(
        &self,
        request: Request<pb::ResumeJobTokenRequest>,
    ) -> Result<Response<pb::ResumeJobTokenResponse>, Status> {
        observe(
            &self.observer,
            "ResumeJobToken",
            request.remote_addr(),
            async {
                let module = self.admit(&request, Spend::Grant)?;
                let r = request.into_inner();
                let tenant = convert::non_empty(r.tenant);
                let (lease, tokens) = self
                    .service
                    .resume(&module, tenant.as_deref(), &r.job_id)
                    .await?;
                Ok(Response::new(pb::ResumeJobTokenResponse {
                    lease: Some(convert::lease(&lease)),
                    tokens: Some(convert::tokens(&tokens)),
                }))
            },
        )
        .await
    }

    async fn revoke_job_token(
        &self,
        request: Request<pb::RevokeJobTokenRequest>,
    ) -> Result<Response<pb::RevokeJobTokenResponse>, Status> {
        observe(
            &self.observer,
            "RevokeJobToken",
            request.remote_addr(),
            async {
                // Releases share the large renewal bucket, so batch releases pass.
                let module = self.admit(&request, Spend::Renewal)?;
                let r = request.into_inner();
                let outcome = outcome_name(r.outcome)?;
                let lease = self
                    .service
                    .release(&module, &r.lease_id, outcome, &r.detail)
                    .await?;
                Ok(Response::new(pb::RevokeJobTokenResponse {
                    lease: Some(convert::lease(&lease)),
                }))
            },
        )
        .await
    }

    async fn introspect_token(
        &self,
        request: Request<pb::IntrospectTokenRequest>,
    ) -> Result<Response<pb::IntrospectTokenResponse>, Status> {
        observe(
            &self.observer,
            "IntrospectToken",
            request.remote_addr(),
            async {
                let module = self.admit(&request, Spend::Introspection)?;
                let claims = self
                    .service
                    .introspect(&module, &request.into_inner().token)
                    .await?;
                Ok(Response::new(pb::IntrospectTokenResponse {
                    active: claims.is_some(),
                    claims: claims.map(convert::claims),
                }))
            },
        )
        .await
    }

    async fn get_jwks(
        &self,
        request: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
        observe(&self.observer, "GetJwks", request.remote_addr(), async {
            let keys = self.service.keys();
            Ok(Response::new(pb::GetJwksResponse {
                keys: keys
                    .jwks()
                    .into_iter()
                    .map(|k| pb::JsonWebKey {
                        kid: k.kid,
                        kty: k.kty.into(),
                        crv: k.crv.into(),
                        x: k.x,
                        alg: k.alg.into(),
                        r#use: k.use_.into(),
                    })
                    .collect(),
                jwks_json: keys.jwks_json(),
            }))
        })
        .await
    }

    type WatchRevocationsStream = WatchStream;

    async fn watch_revocations(
        &self,
        request: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        let service = Arc::clone(&self.service);
        let poll = self.watch_poll;
        let peer = request.remote_addr();
        let (mut revocations, slot) = observe(&self.observer, "WatchRevocations", peer, async {
            // An administrator (x-admin-key) may watch every tenant's ends; the streams
            // of all administrators share one module's cap.
            let (holder, served) = match request.metadata().get(ADMIN_KEY_HEADER) {
                Some(key) => {
                    let key = key.to_str().map_err(|_| Error::AdminUnauthenticated)?;
                    if !self.live.admin.load().check(key) {
                        return Err(Error::AdminUnauthenticated);
                    }
                    (ADMIN_STREAM_HOLDER.to_owned(), None)
                }
                None => {
                    // Each open reads the store: opens count as grants.
                    let module = self.admit(&request, Spend::Grant)?;
                    (module.id.clone(), module.tenants.clone())
                }
            };
            let request = request.into_inner();
            let tenants = stream_tenants(served.as_ref(), request.tenants)?;
            let slot: StreamSlot = self.live.limits.load_full().open_stream(&holder)?;
            let start = match request.after_cursor {
                Some(cursor) => Start::After(cursor),
                None if request.replay_live => Start::LiveEnds,
                None => Start::Newest,
            };
            Ok((Revocations::open(service, start, tenants).await?, slot))
        })
        .await?;
        let (tx, rx) = mpsc::channel(64);
        let mut stop = self.stop.clone();
        // The credentials and tenants were checked against this configuration; a reload
        // (a rotated admin key, a removed module, fewer tenants) ends the stream.
        let live = Arc::clone(&self.live);
        let generation = live.generation.load(std::sync::atomic::Ordering::SeqCst);
        tokio::spawn(async move {
            // Held for the stream's life: its module's slot is free again when it ends.
            let _slot = slot;
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            tokio::pin!(stopped);
            let mut wake = revocations.wake();
            let mut beat = tokio::time::interval(WATCH_HEARTBEAT);
            beat.tick().await; // the first tick is immediate
            loop {
                if live.generation.load(std::sync::atomic::Ordering::SeqCst) != generation {
                    let _ = tx
                        .send(Err(Status::unavailable(
                            "the configuration was reloaded; reconnect with your cursor",
                        )))
                        .await;
                    return;
                }
                match revocations.next().await {
                    Ok(Next::Ends(events)) => {
                        for event in events {
                            if tx.send(Ok(convert::revocation(event))).await.is_err() {
                                return;
                            }
                            // Only what was sent postpones the heartbeat: a stream whose
                            // tenants are quiet still hears one (with the advanced cursor).
                            beat.reset();
                        }
                        continue;
                    }
                    Ok(Next::CaughtUp) => {
                        if tx.send(Ok(heartbeat(&revocations))).await.is_err() {
                            return;
                        }
                    }
                    Ok(Next::Quiet) => {}
                    Err(e) => {
                        let _ = tx.send(Err(super::status::to_status(&e))).await;
                        return;
                    }
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = &mut stopped => {
                        let _ = tx.send(Err(Status::unavailable("the server is shutting down; reconnect with your cursor"))).await;
                        return;
                    }
                    _ = wake.changed() => {}
                    _ = tokio::time::sleep(poll) => {}
                    _ = beat.tick() => {
                        if tx.send(Ok(heartbeat(&revocations))).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }
}
