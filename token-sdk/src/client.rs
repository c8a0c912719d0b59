//! The leasing client: grants and resumes leases, and shares one connection and one
//! revocation stream among them.

use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tonic::Status;
use tonic::transport::ClientTlsConfig;

use crate::api::Grpc;
use crate::health::{Health, RenewalStats};
use crate::lease::{Lease, LeaseInfo, OnLogout, Renewal};
use crate::schedule::RenewalConfig;
use crate::transport::{self, JobTokenClient, KeyInterceptor};
use crate::watcher::LeaseWatch;
use crate::{Error, proto};

/// How long a grant waits for the revocation stream to open.
const WATCH_READY_WAIT: Duration = Duration::from_secs(2);
/// Configures a [`Client`].
#[derive(Clone)]
pub struct ClientBuilder {
    endpoint: String,
    module_key: Option<String>,
    tls: Option<ClientTlsConfig>,
    renewal: RenewalConfig,
    release_on_drop: bool,
    watch_revocations: bool,
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("endpoint", &self.endpoint)
            .field(
                "module_key",
                &self.module_key.as_ref().map(|_| "<redacted>"),
            )
            .field("tls", &self.tls.is_some())
            .field("renewal", &self.renewal)
            .field("release_on_drop", &self.release_on_drop)
            .field("watch_revocations", &self.watch_revocations)
            .finish()
    }
}

impl ClientBuilder {
    /// Authenticate with a module key (sent under [`crate::MODULE_KEY_HEADER`]).
    pub fn module_key(mut self, key: impl Into<String>) -> Self {
        self.module_key = Some(key.into());
        self
    }

    /// TLS settings; with a client identity, the module authenticates by certificate.
    pub fn tls(mut self, tls: ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Renewal timing. Default: [`RenewalConfig::default`].
    pub fn renewal(mut self, renewal: RenewalConfig) -> Self {
        self.renewal = renewal;
        self
    }

    /// Release a lease when its last handle is dropped. Default true.
    pub fn release_on_drop(mut self, release: bool) -> Self {
        self.release_on_drop = release;
        self
    }

    /// Follow the service's revocation stream, so revocations reach leases within a
    /// second. Default true.
    pub fn watch_revocations(mut self, watch: bool) -> Self {
        self.watch_revocations = watch;
        self
    }

    /// Connects.
    pub async fn connect(self) -> Result<Client, Error> {
        let interceptor = match &self.module_key {
            Some(key) => KeyInterceptor::module_key(key)?,
            None => KeyInterceptor::none(),
        };
        let (channel, watch_channel) = transport::channels(self.endpoint, self.tls).await?;
        let client = |channel| transport::job_token_client(channel, interceptor.clone());
        Ok(Client {
            inner: Arc::new(Inner {
                grpc: client(channel),
                watch_grpc: client(watch_channel),
                health: Arc::new(Health::new()),
                renewal: self.renewal,
                release_on_drop: self.release_on_drop,
                watch_revocations: self.watch_revocations,
                watcher: Mutex::new(Weak::new()),
            }),
        })
    }
}

struct Inner {
    grpc: JobTokenClient,
    /// On a connection of its own, for revocation streams.
    watch_grpc: JobTokenClient,
    health: Arc<Health>,
    renewal: RenewalConfig,
    release_on_drop: bool,
    watch_revocations: bool,
    watcher: Mutex<Weak<LeaseWatch>>,
}

/// Holds leases for a module. Cheap to clone; clones share one connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("renewal", &self.inner.renewal)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Starts configuring a client for the service at `endpoint`
    /// (e.g. `http://127.0.0.1:50051`).
    pub fn builder(endpoint: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            endpoint: endpoint.into(),
            module_key: None,
            tls: None,
            renewal: RenewalConfig::default(),
            release_on_drop: true,
            watch_revocations: true,
        }
    }

    /// The generated client, for calls this type does not wrap.
    pub fn grpc(&self) -> JobTokenClient {
        self.inner.grpc.clone()
    }

    /// The client on the revocation stream's own connection.
    pub(crate) fn watch_grpc(&self) -> JobTokenClient {
        self.inner.watch_grpc.clone()
    }

    /// The configured renewal timing.
    pub(crate) fn renewal_config(&self) -> &RenewalConfig {
        &self.inner.renewal
    }

    /// Renewal counters of every lease this client has held: failures by code, time
    /// spent holding an expired token, outages. Cheap; for an application's metrics.
    pub fn renewal_stats(&self) -> RenewalStats {
        self.inner.health.stats()
    }

    /// Asks for a lease for `job_id` on behalf of the user whose access token is
    /// `subject_token`. Set permissions and lifetime on the request, then `start()` it.
    pub fn lease(
        &self,
        job_id: impl Into<String>,
        subject_token: impl Into<String>,
    ) -> LeaseRequest {
        LeaseRequest {
            client: self.clone(),
            request: proto::IssueJobTokenRequest {
                subject_token: subject_token.into(),
                job_id: job_id.into(),
                ..Default::default()
            },
            stall_timeout: None,
        }
    }

    /// Re-attaches to this module's lease for `job_id` of `tenant` after a restart (a
    /// lease is identified by tenant, module and job). The refresh token the previous
    /// instance held stops working.
    pub async fn resume(
        &self,
        tenant: impl Into<String>,
        job_id: impl Into<String>,
    ) -> Result<Lease, Error> {
        let watcher = self.watcher().await;
        let response = self
            .grpc()
            .resume_job_token(proto::ResumeJobTokenRequest {
                job_id: job_id.into(),
                tenant: tenant.into(),
            })
            .await
            .map_err(Error::Rejected)?
            .into_inner();
        self.hold(
            response.lease,
            response.tokens,
            watcher,
            self.inner.renewal.clone(),
        )
    }

    /// The shared revocation stream, started if no lease holds it; open (or given up on
    /// after a short wait) before it returns, so an end right after a grant is not missed.
    async fn watcher(&self) -> Option<Arc<LeaseWatch>> {
        if !self.inner.watch_revocations {
            return None;
        }
        let watcher = {
            let mut slot = self.inner.watcher.lock().unwrap_or_else(|e| e.into_inner());
            match slot.upgrade() {
                Some(watcher) => watcher,
                None => {
                    let watcher = LeaseWatch::start(self.watch_grpc(), self.inner.renewal.clone());
                    *slot = Arc::downgrade(&watcher);
                    watcher
                }
            }
        };
        watcher.wait_ready(WATCH_READY_WAIT).await;
        Some(watcher)
    }

    fn hold(
        &self,
        lease: Option<proto::Lease>,
        tokens: Option<proto::TokenPair>,
        watcher: Option<Arc<LeaseWatch>>,
        config: RenewalConfig,
    ) -> Result<Lease, Error> {
        let (Some(lease), Some(tokens)) = (lease, tokens) else {
            return Err(Error::Rejected(Status::internal(
                "the service answered without a lease or tokens",
            )));
        };
        let expires_at = lease
            .expires_at
            .and_then(|t| std::time::SystemTime::try_from(t).ok());
        // The service's "now", from its own answer: token expiry minus token life. Time
        // left on the lease is then a difference of two service timestamps, immune to
        // this machine's clock being wrong.
        let service_now = tokens
            .access_token_expires_at
            .and_then(|t| std::time::SystemTime::try_from(t).ok())
            .zip(
                tokens
                    .access_token_expires_in
                    .and_then(|d| Duration::try_from(d).ok()),
            )
            .and_then(|(at, life)| at.checked_sub(life));
        let remaining = expires_at
            .zip(service_now)
            .map(|(end, now)| end.duration_since(now).unwrap_or_default());
        let on_logout = OnLogout::from_proto(lease.on_logout());
        let info = LeaseInfo {
            lease_id: lease.lease_id,
            job_id: lease.job_id,
            tenant: lease.tenant,
            subject: lease.subject,
            actor: lease.actor,
            permissions: lease.granted_permissions,
            expires_at,
            idle_timeout: lease.idle_timeout.and_then(|d| Duration::try_from(d).ok()),
            remaining,
            on_logout,
        };
        let renewal = Renewal {
            api: Arc::new(Grpc(self.grpc())),
            config,
            release_on_drop: self.inner.release_on_drop,
            reconnected: watcher.as_ref().map(|w| w.feed().reconnected.subscribe()),
            watcher,
            health: Arc::clone(&self.inner.health),
        };
        Ok(Lease::start(info, tokens, renewal))
    }
}

/// A lease being asked for; see [`Client::lease`].
pub struct LeaseRequest {
    client: Client,
    request: proto::IssueJobTokenRequest,
    stall_timeout: Option<Duration>,
}

impl fmt::Debug for LeaseRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The generated request's Debug redacts the subject token.
        f.debug_struct("LeaseRequest")
            .field("request", &self.request)
            .finish_non_exhaustive()
    }
}

impl LeaseRequest {
    /// The permissions the job needs. Default: everything the user holds that this
    /// module may delegate. Any that cannot be granted fails the request by name.
    pub fn permissions<I, S>(mut self, permissions: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.request.permissions = permissions.into_iter().map(Into::into).collect();
        self
    }

    /// How long the job may hold the lease at most. Default: the module's default.
    pub fn max_lifetime(mut self, lifetime: Duration) -> Self {
        self.request.max_lifetime = prost_types::Duration::try_from(lifetime).ok();
        self
    }

    /// The audience of the job's tokens. Default: the service's.
    pub fn audience(mut self, audience: impl Into<String>) -> Self {
        self.request.audience = audience.into();
        self
    }

    /// What the user's logout does to the lease (see [`OnLogout`]). Default: the
    /// module's configured default, `Survive` unless configured otherwise. The service
    /// refuses a policy the module may not ask for (`LOGOUT_POLICY_NOT_ALLOWED`).
    pub fn on_logout(mut self, on_logout: OnLogout) -> Self {
        self.request.set_on_logout(on_logout.to_proto());
        self
    }

    /// Ends the lease when the job reports no [`Lease::progress`] for this long (see
    /// [`RenewalConfig::stall_timeout`]). Default: the client's `RenewalConfig`.
    pub fn stall_timeout(mut self, timeout: Duration) -> Self {
        self.stall_timeout = Some(timeout);
        self
    }

    /// Grants the lease and starts renewing it in the background.
    pub async fn start(self) -> Result<Lease, Error> {
        let watcher = self.client.watcher().await;
        let response = self
            .client
            .grpc()
            .issue_job_token(self.request)
            .await
            .map_err(Error::Rejected)?
            .into_inner();
        let mut config = self.client.inner.renewal.clone();
        if self.stall_timeout.is_some() {
            config.stall_timeout = self.stall_timeout;
        }
        self.client
            .hold(response.lease, response.tokens, watcher, config)
    }
}

#[cfg(test)]
mod tests {
    use tonic::transport::Endpoint;

    use super::*;

    /// A client whose connection is never used (it connects lazily, to nowhere).
    fn unconnected() -> Client {
        let grpc = || {
            let channel = Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
            transport::job_token_client(channel, KeyInterceptor::none())
        };
        Client {
            inner: Arc::new(Inner {
                grpc: grpc(),
                watch_grpc: grpc(),
                health: Arc::new(Health::new()),
                renewal: RenewalConfig::default(),
                release_on_drop: false,
                watch_revocations: false,
                watcher: Mutex::new(Weak::new()),
            }),
        }
    }

    #[tokio::test]
    async fn the_grant_request_carries_the_logout_policy_asked_for() {
        let client = unconnected();
        let request = client.lease("job-1", "user-token");
        assert_eq!(request.request.on_logout(), proto::OnLogout::Unspecified);
        for (asked, sent) in [
            (OnLogout::Survive, proto::OnLogout::Survive),
            (OnLogout::End, proto::OnLogout::End),
        ] {
            let request = client.lease("job-1", "user-token").on_logout(asked);
            assert_eq!(request.request.on_logout(), sent, "{asked:?}");
        }
    }

    #[tokio::test]
    async fn a_granted_lease_reports_its_permissions_and_logout_policy() {
        let client = unconnected();
        let granted = vec!["a.read".to_owned(), "a.write".to_owned()];
        let lease = proto::Lease {
            lease_id: "lease-1".into(),
            granted_permissions: granted.clone(),
            on_logout: proto::OnLogout::End as i32,
            ..Default::default()
        };
        let tokens = proto::TokenPair {
            access_token: "access-0".into(),
            access_token_expires_in: prost_types::Duration::try_from(Duration::from_secs(300)).ok(),
            ..Default::default()
        };
        let renewal = client.inner.renewal.clone();
        let held = client
            .hold(
                Some(lease.clone()),
                Some(tokens.clone()),
                None,
                renewal.clone(),
            )
            .unwrap();
        assert_eq!(*held.permissions(), *granted);
        assert_eq!(held.info().permissions, granted);
        assert_eq!(held.info().on_logout, Some(OnLogout::End));
        // A service that does not say reports no policy.
        let unsaid = proto::Lease {
            on_logout: proto::OnLogout::Unspecified as i32,
            ..lease
        };
        let held = client
            .hold(Some(unsaid), Some(tokens), None, renewal)
            .unwrap();
        assert_eq!(held.info().on_logout, None);
    }
}
