//! Connections to the service: endpoints, the credential a module or an administrator
//! sends on every call, and the generated clients that carry it.

use std::fmt;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

pub use jobtoken_proto::wire::{ADMIN_KEY_HEADER, MODULE_KEY_HEADER};

use crate::Error;
use crate::proto;

/// Connect timeout of the main connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 ping interval of the main connection.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long the main connection waits for a ping's answer.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 ping interval and timeout of the revocation stream's connection: a stalled
/// connection is given up within about twice this.
const WATCH_KEEPALIVE: Duration = Duration::from_secs(2);
/// Connect timeout of the revocation stream's connection, short so that a partition
/// does not leave it waiting on a connection attempt made while it lasted.
const WATCH_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Adds a credential header to every request. The value is marked sensitive, so it is
/// redacted from tonic's and this type's `Debug` output.
#[derive(Clone)]
pub struct KeyInterceptor {
    header: &'static str,
    value: Option<MetadataValue<Ascii>>,
}

impl fmt::Debug for KeyInterceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyInterceptor")
            .field("header", &self.header)
            .field("value", &"<redacted>")
            .finish()
    }
}

impl KeyInterceptor {
    /// Sends `key` as the module key.
    pub fn module_key(key: &str) -> Result<Self, Error> {
        Self::new(MODULE_KEY_HEADER, key)
    }

    /// Sends `key` as the admin key.
    pub fn admin_key(key: &str) -> Result<Self, Error> {
        Self::new(ADMIN_KEY_HEADER, key)
    }

    /// Sends no key (the module authenticates by mTLS certificate).
    pub fn none() -> Self {
        Self {
            header: MODULE_KEY_HEADER,
            value: None,
        }
    }

    fn new(header: &'static str, key: &str) -> Result<Self, Error> {
        let mut value: MetadataValue<Ascii> = key.parse().map_err(|_| Error::InvalidKey)?;
        value.set_sensitive(true);
        Ok(Self {
            header,
            value: Some(value),
        })
    }
}

impl Interceptor for KeyInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.value {
            request.metadata_mut().insert(self.header, value.clone());
        }
        Ok(request)
    }
}

/// A `JobTokenService` client that authenticates as a module.
pub type JobTokenClient = proto::job_token_service_client::JobTokenServiceClient<
    InterceptedService<Channel, KeyInterceptor>,
>;

/// An `AdminService` client that authenticates with the admin key.
pub type AdminClient =
    proto::admin_service_client::AdminServiceClient<InterceptedService<Channel, KeyInterceptor>>;

/// Connects to the service at `endpoint` (e.g. `http://127.0.0.1:50051`) as the module
/// whose key is `module_key`.
pub async fn connect(endpoint: &str, module_key: &str) -> Result<JobTokenClient, Error> {
    let interceptor = KeyInterceptor::module_key(module_key)?;
    let channel = Endpoint::from_shared(endpoint.to_owned())?
        .connect()
        .await?;
    Ok(job_token_client(channel, interceptor))
}

/// Connects to the admin service at `endpoint` with the admin key.
pub async fn connect_admin(endpoint: &str, admin_key: &str) -> Result<AdminClient, Error> {
    let interceptor = KeyInterceptor::admin_key(admin_key)?;
    let channel = Endpoint::from_shared(endpoint.to_owned())?
        .connect()
        .await?;
    Ok(proto::admin_service_client::AdminServiceClient::with_interceptor(channel, interceptor))
}

/// A `JobTokenService` client on `channel` sending `interceptor`'s credential.
pub(crate) fn job_token_client(channel: Channel, interceptor: KeyInterceptor) -> JobTokenClient {
    proto::job_token_service_client::JobTokenServiceClient::with_interceptor(channel, interceptor)
}

/// The two connections of a [`crate::Client`]: one for calls, connected before this
/// returns, and one of its own for the revocation stream, connected lazily.
///
/// Both notice dead connections (a replica gone, a half-open socket) within seconds.
/// The revocation stream's connection does not share the fate of renewals (a connection
/// closed over a burst of cancelled calls, say), and pings more often: its reopening is
/// how leases learn the service is back.
pub(crate) async fn channels(
    endpoint: String,
    tls: Option<ClientTlsConfig>,
) -> Result<(Channel, Channel), Error> {
    let mut endpoint = Endpoint::from_shared(endpoint)?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    let watch_channel = endpoint
        .clone()
        .connect_timeout(WATCH_CONNECT_TIMEOUT)
        .http2_keep_alive_interval(WATCH_KEEPALIVE)
        .keep_alive_timeout(WATCH_KEEPALIVE)
        .connect_lazy();
    let channel = endpoint.connect().await?;
    Ok((channel, watch_channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interceptor_sets_the_header_and_hides_the_key() {
        let mut i = KeyInterceptor::module_key("mk_secret").unwrap();
        let req = i.call(Request::new(())).unwrap();
        assert_eq!(req.metadata().get(MODULE_KEY_HEADER).unwrap(), "mk_secret");
        assert!(!format!("{i:?}").contains("mk_secret"));
        assert!(!format!("{:?}", req.metadata()).contains("mk_secret"));
        assert!(matches!(
            KeyInterceptor::module_key("bad\nkey"),
            Err(Error::InvalidKey)
        ));
    }
}
