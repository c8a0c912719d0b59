//! The small HTTP listener: the JWKS document for gateways, Prometheus metrics, liveness.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};

use crate::limits::MAX_LOGOUT_BODY;
use crate::metrics::{Format, Metrics};
use crate::ports::Observer as _;
use crate::ready::Readiness;
use crate::service::LeaseService;

/// Path of the JWKS document.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";
/// Where identity providers send OpenID Connect back-channel logout tokens.
pub const BACKCHANNEL_LOGOUT_PATH: &str = "/backchannel-logout";

#[derive(Clone)]
struct HttpState {
    service: Arc<LeaseService>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

/// The routes: `/.well-known/jwks.json`, `/metrics`, `/healthz` (liveness: the process
/// answers), `/readyz` (readiness: 503 while the store or the keys fail) and
/// `POST /backchannel-logout` (OpenID Connect Back-Channel Logout 1.0).
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
        .route(
            BACKCHANNEL_LOGOUT_PATH,
            post(backchannel_logout).layer(DefaultBodyLimit::max(MAX_LOGOUT_BODY)),
        )
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

/// The answer to a logout request: `error` and a description, as OAuth 2.0 errors are
/// (§2.8 of the spec), and never cached.
fn logout_answer(status: StatusCode, error: Option<(&str, String)>) -> axum::response::Response {
    let body = match error {
        None => String::new(),
        Some((code, description)) => {
            serde_json::json!({"error": code, "error_description": description}).to_string()
        }
    };
    (
        status,
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_TYPE, "application/json"),
        ],
        body,
    )
        .into_response()
}

/// `POST /backchannel-logout`: a form with `logout_token` (§2.5). 200 when the token
/// verified (whether or not a lease ended), 400 when it did not, 503 when the issuer's
/// keys could not be fetched or the store failed (the issuer may send it again).
async fn backchannel_logout(
    State(s): State<HttpState>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let bad = |description: String| {
        s.metrics.logout("invalid");
        logout_answer(
            StatusCode::BAD_REQUEST,
            Some(("invalid_request", description)),
        )
    };
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !form {
        return bad("the body must be application/x-www-form-urlencoded".into());
    }
    let mut tokens = form_urlencoded::parse(&body).filter(|(k, _)| k == "logout_token");
    let token = match (tokens.next(), tokens.next()) {
        (Some((_, token)), None) => token,
        (None, _) => return bad("the logout_token parameter is missing".into()),
        (Some(_), Some(_)) => return bad("logout_token is given more than once".into()),
    };
    // The service counts and logs the outcome of a request that reached it.
    match s.service.backchannel_logout(&token).await {
        Ok(_) => logout_answer(StatusCode::OK, None),
        Err(crate::error::Error::LogoutTokenInvalid(problem)) => {
            logout_answer(StatusCode::BAD_REQUEST, Some(("invalid_request", problem)))
        }
        Err(e) => logout_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(("temporarily_unavailable", e.to_string())),
        ),
    }
}
