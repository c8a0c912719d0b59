//! The small HTTP listener: the JWKS document for gateways, Prometheus metrics, liveness.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;
use crate::service::LeaseService;

/// Path of the JWKS document.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";

#[derive(Clone)]
struct HttpState {
    service: Arc<LeaseService>,
    metrics: Arc<Metrics>,
}

/// The routes: `/.well-known/jwks.json`, `/metrics`, `/healthz`.
pub fn router(service: Arc<LeaseService>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route(JWKS_PATH, get(jwks))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(HttpState { service, metrics })
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

async fn metrics_text(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}
