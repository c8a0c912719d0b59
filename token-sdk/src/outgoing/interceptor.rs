//! Putting the lease's current token on outgoing gRPC calls.

use std::fmt;

use http::{HeaderName, HeaderValue};
use tonic::metadata::MetadataMap;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::end::LeaseEnd;
use crate::lease::{Lease, LeaseState};

/// The lease whose token goes out, and which header carries it in which form. Shared by
/// [`BearerInterceptor`] and [`crate::AuthLayer`].
#[derive(Debug, Clone)]
pub(crate) struct TokenHeader {
    pub(crate) lease: Lease,
    pub(crate) name: HeaderName,
    bearer: bool,
}

impl TokenHeader {
    /// `authorization: Bearer <token>`.
    pub(crate) fn authorization(lease: Lease) -> Self {
        Self {
            lease,
            name: http::header::AUTHORIZATION,
            bearer: true,
        }
    }

    /// `<name>: <token>`; fails if `name` is not a valid header name.
    pub(crate) fn raw(lease: Lease, name: &str) -> Result<Self, crate::Error> {
        let name = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            .map_err(|_| crate::Error::InvalidKey)?;
        Ok(Self {
            lease,
            name,
            bearer: false,
        })
    }

    /// The (sensitive) header value for the lease's current token, and that token's
    /// generation. Refuses locally, as UNAUTHENTICATED, once the lease has ended.
    pub(crate) fn value(&self) -> Result<(HeaderValue, u64), Status> {
        if let LeaseState::Ended(end) = self.lease.state() {
            return Err(ended(&end));
        }
        let token = self.lease.access_token();
        let text = if self.bearer {
            format!("Bearer {}", token.secret())
        } else {
            token.secret().to_owned()
        };
        let mut value = HeaderValue::from_str(&text)
            .map_err(|_| Status::internal("the access token is not valid header text"))?;
        value.set_sensitive(true);
        Ok((value, token.generation()))
    }
}

/// The local refusal of a call once the job's lease has ended.
fn ended(end: &LeaseEnd) -> Status {
    Status::unauthenticated(format!("the job's lease has ended ({:?})", end.reason))
}

/// Adds the lease's current access token to every request: `authorization: Bearer …` by
/// default, or the raw token under a header of your choice (for platforms that expect
/// their own token header). Refuses locally, as UNAUTHENTICATED, once the lease has ended.
/// A small `Clone` struct; it does not log.
#[derive(Clone)]
pub struct BearerInterceptor {
    header: TokenHeader,
}

impl fmt::Debug for BearerInterceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerInterceptor")
            .field("lease_id", &self.header.lease.info().lease_id)
            .field("header", &self.header.name)
            .finish_non_exhaustive()
    }
}

impl BearerInterceptor {
    /// `authorization: Bearer <token>`.
    pub fn new(lease: Lease) -> Self {
        Self {
            header: TokenHeader::authorization(lease),
        }
    }

    /// `<header>: <token>` (no `Bearer` prefix), such as `x-okapi-token`. Fails with
    /// [`crate::Error::InvalidKey`] if `header` is not a valid metadata key.
    pub fn with_header(lease: Lease, header: &str) -> Result<Self, crate::Error> {
        Ok(Self {
            header: TokenHeader::raw(lease, header)?,
        })
    }
}

impl Interceptor for BearerInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let (value, _) = self.header.value()?;
        let mut headers = std::mem::take(request.metadata_mut()).into_headers();
        headers.insert(self.header.name.clone(), value);
        *request.metadata_mut() = MetadataMap::from_headers(headers);
        Ok(request)
    }
}

impl Lease {
    /// An interceptor that puts this lease's token on every outgoing request.
    pub fn interceptor(&self) -> BearerInterceptor {
        BearerInterceptor::new(self.clone())
    }

    /// Runs a call that sends this lease's token (through [`Lease::interceptor`]); if the
    /// callee rejects it as UNAUTHENTICATED (the token expired in flight), renews once and
    /// runs the call again. `call` must be safe to run twice: build the request inside it.
    ///
    /// ```no_run
    /// # async fn f(lease: token_sdk::Lease, channel: tonic::transport::Channel) -> Result<(), tonic::Status> {
    /// use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    /// let api = HealthClient::with_interceptor(channel, lease.interceptor());
    /// let answer = lease
    ///     .with_retry(|| {
    ///         let mut api = api.clone();
    ///         async move { api.check(HealthCheckRequest::default()).await }
    ///     })
    ///     .await?;
    /// # let _ = answer; Ok(()) }
    /// ```
    pub async fn with_retry<T, F, Fut>(&self, mut call: F) -> Result<T, Status>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let sent = self.access_token().generation();
        match call().await {
            Err(status) if status.code() == tonic::Code::Unauthenticated => {
                // Renew only if nobody has since the call read its token.
                if let Err(end) = self.refresh_if_stale(sent).await {
                    return Err(ended(&end));
                }
                call().await
            }
            other => other,
        }
    }

    /// The current `Authorization` header value (`Bearer …`), for HTTP clients.
    pub fn authorization_header(&self) -> String {
        format!("Bearer {}", self.access_token().secret())
    }
}

#[cfg(feature = "reqwest")]
impl Lease {
    /// Adds `Authorization: Bearer <current token>` to a reqwest request (feature
    /// `reqwest`). The header is marked sensitive.
    pub fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match http::HeaderValue::from_str(&self.authorization_header()) {
            Ok(mut value) => {
                value.set_sensitive(true);
                request.header(http::header::AUTHORIZATION, value)
            }
            Err(_) => request,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::lease::fake::*;

    #[tokio::test(start_paused = true)]
    async fn with_retry_renews_once_after_an_unauthenticated_answer() {
        let fake = Fake::new(Duration::from_secs(300));
        let lease = hold(&fake, no_jitter());
        let seen = Mutex::new(Vec::new());
        // The callee refuses the first token (expired in flight), accepts the renewed one.
        let answer = lease
            .with_retry(|| {
                let token = lease.access_token();
                seen.lock().unwrap().push(token.generation());
                async move {
                    if token.generation() == 0 {
                        Err(Status::unauthenticated("token expired"))
                    } else {
                        Ok(token.generation())
                    }
                }
            })
            .await;
        assert_eq!(answer.unwrap(), 1);
        assert_eq!(*seen.lock().unwrap(), vec![0, 1]);
        // A second refusal is returned, not retried again.
        let calls = AtomicUsize::new(0);
        let err = lease
            .with_retry(|| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), _>(Status::unauthenticated("no")) }
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // Other errors are not retried.
        let calls = AtomicUsize::new(0);
        let err = lease
            .with_retry(|| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), _>(Status::not_found("x")) }
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[cfg(feature = "reqwest")]
    #[tokio::test(start_paused = true)]
    async fn reqwest_requests_carry_the_current_token() {
        let fake = Fake::new(Duration::from_secs(10));
        let lease = hold(&fake, no_jitter());
        let request = lease
            .authorize(reqwest::Client::new().get("http://127.0.0.1:9/records"))
            .build()
            .unwrap();
        let value = request.headers().get("authorization").unwrap();
        assert_eq!(value, "Bearer access-0");
        assert!(value.is_sensitive());
    }

    #[tokio::test(start_paused = true)]
    async fn the_interceptor_sends_the_current_token() {
        let fake = Fake::new(Duration::from_secs(10));
        let lease = hold(&fake, no_jitter());
        let mut interceptor = lease.interceptor();
        let request = interceptor.call(Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer access-0"
        );
        lease.refresh_now().await.unwrap();
        let mut custom =
            crate::BearerInterceptor::with_header(lease.clone(), "X-Okapi-Token").unwrap();
        assert!(crate::BearerInterceptor::with_header(lease.clone(), "bad header").is_err());
        let request = custom.call(Request::new(())).unwrap();
        assert_eq!(request.metadata().get("x-okapi-token").unwrap(), "access-1");
        assert_eq!(lease.authorization_header(), "Bearer access-1");
    }
}
