//! The small HTTP listener: the JWKS document for gateways, Prometheus metrics, liveness.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::{Format, Metrics};
use crate::ready::Readiness;
use crate::service::LeaseService;

/// Path of the JWKS document.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";

#[derive(Clone)]
struct HttpState {
    service: Arc<LeaseService>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

/// The routes: `/.well-known/jwks.json`, `/metrics`, `/healthz` (liveness: the process
/// answers) and `/readyz` (readiness: 503 while the store or the keys fail).
pub fn router(
    service: Arc<LeaseService>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
) -> Router {
    Router::new()
        .route(JWKS_PATH, get(jwks))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(HttpState {
            service,
            metrics,
            readiness,
        })
}

async fn ready(State(s): State<HttpState>) -> impl IntoResponse {
    let problems = s.readiness.problems();
    if problems.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", problems.join(", ")),
        )
    }
}

async fn jwks(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "application/jwk-set+json"),
            // Short, so a rotation is picked up promptly; old keys stay published anyway.
            (header::CACHE_CONTROL, "max-age=60"),
        ],
        s.service.keys().jwks_json(),
    )
}

async fn metrics_text(State(s): State<HttpState>, headers: HeaderMap) -> impl IntoResponse {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = Format::negotiate(accept);
    (
        [
            (header::CONTENT_TYPE, format.content_type()),
            (header::VARY, "Accept"),
        ],
        s.metrics.encode(format),
    )
}
