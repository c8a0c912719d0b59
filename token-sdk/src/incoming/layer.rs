//! A tower layer for tonic servers: only calls carrying a valid job token (with the
//! required permissions) get through, with the verified [`Claims`] in the request's
//! extensions.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tonic::Status;
use tower::{Layer, Service};

use super::verifier::{Claims, Verifier, VerifyError};

/// Wraps a tonic service (or a whole server) with token verification.
///
/// ```no_run
/// # async fn serve(verifier: token_sdk::Verifier) {
/// use token_sdk::VerifyLayer;
/// let layer = VerifyLayer::new(verifier).require(["inventory.write"]);
/// // tonic::transport::Server::builder().layer(layer).add_service(...)
/// # let _ = layer;
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct VerifyLayer {
    verifier: Verifier,
    required: Arc<[String]>,
}

impl VerifyLayer {
    /// Requires a valid job token on every call.
    pub fn new(verifier: Verifier) -> Self {
        Self {
            verifier,
            required: Arc::from([]),
        }
    }

    /// Also requires these permissions.
    pub fn require<I, S>(mut self, permissions: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.required = permissions.into_iter().map(Into::into).collect();
        self
    }
}

impl<S> Layer<S> for VerifyLayer {
    type Service = VerifyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        VerifyService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`VerifyLayer`].
#[derive(Debug, Clone)]
pub struct VerifyService<S> {
    inner: S,
    layer: VerifyLayer,
}

fn bearer<B>(request: &Request<B>) -> Option<&str> {
    request
        .headers()
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

fn refusal(e: &VerifyError) -> Status {
    match e {
        VerifyError::MissingPermission(_) => Status::permission_denied(e.to_string()),
        VerifyError::Unavailable => Status::unavailable(e.to_string()),
        _ => Status::unauthenticated(e.to_string()),
    }
}

impl<S, B> Service<Request<B>> for VerifyService<S>
where
    S: Service<Request<B>, Response = Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        // Take the service that was polled ready; leave a fresh clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let token = bearer(&request).map(str::to_owned);
            let verified: Result<Claims, VerifyError> = match token {
                None => Err(VerifyError::Malformed),
                Some(token) => layer.verifier.verify_with(&token, &layer.required).await,
            };
            match verified {
                Ok(claims) => {
                    request.extensions_mut().insert(claims);
                    inner.call(request).await
                }
                Err(e) => Ok(refusal(&e).into_http()),
            }
        })
    }
}
