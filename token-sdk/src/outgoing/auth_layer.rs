//! A tower layer for outgoing gRPC calls: puts the lease's current token on every
//! request and, when a call is rejected as UNAUTHENTICATED because the token expired in
//! flight, renews once and retries it (requests whose whole body was at hand: unary calls).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::FutureExt as _;
use http::{HeaderName, HeaderValue, Request, Response};
use http_body::Frame;
use http_body_util::BodyExt as _;
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service, ServiceExt as _};

use super::interceptor::TokenHeader;
use crate::lease::Lease;

/// Largest request body kept for a retry.
const MAX_REPLAY_BYTES: usize = 64 * 1024;

/// Wraps a tonic `Channel` (or any service of `http::Request<tonic::body::Body>`):
///
/// ```no_run
/// # async fn f(lease: token_sdk::Lease, channel: tonic::transport::Channel) {
/// use tonic_health::pb::health_client::HealthClient;
/// let channel = tower::ServiceBuilder::new()
///     .layer(token_sdk::AuthLayer::new(lease))
///     .service(channel);
/// let client = HealthClient::new(channel);
/// # let _ = client; }
/// ```
#[derive(Debug, Clone)]
pub struct AuthLayer {
    header: TokenHeader,
}

impl AuthLayer {
    /// `authorization: Bearer <token>` on every request.
    pub fn new(lease: Lease) -> Self {
        Self {
            header: TokenHeader::authorization(lease),
        }
    }

    /// The raw token under `header` instead (e.g. `x-okapi-token`).
    pub fn with_header(lease: Lease, header: &str) -> Result<Self, crate::Error> {
        Ok(Self {
            header: TokenHeader::raw(lease, header)?,
        })
    }

    /// The header value for the current token, and its generation.
    fn value(&self) -> Result<(HeaderValue, u64), Status> {
        self.header.value()
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    layer: AuthLayer,
}

/// A body made of frames already read, then whatever the original body still has.
struct Replay {
    frames: VecDeque<Frame<Bytes>>,
    rest: Option<Pin<Box<Body>>>,
}

impl http_body::Body for Replay {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(frame) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        match self.rest.as_mut() {
            Some(rest) => rest.as_mut().poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }
}

fn copy_frame(frame: &Frame<Bytes>) -> Option<Frame<Bytes>> {
    if let Some(data) = frame.data_ref() {
        Some(Frame::data(data.clone()))
    } else {
        frame.trailers_ref().map(|t| Frame::trailers(t.clone()))
    }
}

/// Reads the frames the body has ready right now. For a unary call that is the whole
/// body; a streaming body stops at its first pending frame and is not replayable.
fn drain_ready(mut body: Body) -> (Vec<Frame<Bytes>>, Option<Body>) {
    let mut frames = Vec::new();
    let mut size = 0;
    loop {
        match body.frame().now_or_never() {
            Some(Some(Ok(frame))) => {
                size += frame.data_ref().map_or(0, Bytes::len);
                frames.push(frame);
                if size > MAX_REPLAY_BYTES {
                    return (frames, Some(body));
                }
            }
            Some(None) => return (frames, None),
            // An error or a frame not ready yet: hand the rest over untouched.
            Some(Some(Err(_))) | None => return (frames, Some(body)),
        }
    }
}

fn rebuild(
    parts: &http::request::Parts,
    header: &HeaderName,
    value: HeaderValue,
    frames: VecDeque<Frame<Bytes>>,
    rest: Option<Body>,
) -> Request<Body> {
    let mut builder = Request::builder()
        .method(parts.method.clone())
        .uri(parts.uri.clone())
        .version(parts.version);
    if let Some(headers) = builder.headers_mut() {
        *headers = parts.headers.clone();
        headers.insert(header.clone(), value);
    }
    let body = Body::new(Replay {
        frames,
        rest: rest.map(Box::pin),
    });
    builder
        .body(body)
        .unwrap_or_else(|_| Request::new(Body::empty()))
}

/// `grpc-status` of a trailers-only response (how servers answer a refused call).
fn refused_unauthenticated<B>(response: &Response<B>) -> bool {
    response
        .headers()
        .get("grpc-status")
        .is_some_and(|s| s.as_bytes() == b"16")
}

impl<S> Service<Request<Body>> for AuthService<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let (value, sent) = match layer.value() {
                Ok(v) => v,
                Err(status) => return Ok(status.into_http()),
            };
            let (parts, body) = request.into_parts();
            let (frames, rest) = drain_ready(body);
            let replayable = rest.is_none();
            let kept: VecDeque<Frame<Bytes>> = if replayable {
                frames.iter().filter_map(copy_frame).collect()
            } else {
                VecDeque::new()
            };
            let first = rebuild(&parts, &layer.header.name, value, frames.into(), rest);
            let response = inner.call(first).await?;
            if !(replayable && refused_unauthenticated(&response)) {
                return Ok(response);
            }
            // The token expired in flight: renew (once, shared with other callers that
            // found this generation stale) and send the same request again.
            if layer.header.lease.refresh_if_stale(sent).await.is_err() {
                return Ok(response);
            }
            let (value, _) = match layer.value() {
                Ok(v) => v,
                Err(status) => return Ok(status.into_http()),
            };
            let retry = rebuild(&parts, &layer.header.name, value, kept, None);
            inner.ready().await?.call(retry).await
        })
    }
}
