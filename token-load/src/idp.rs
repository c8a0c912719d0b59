//! The `issue-idp` scenario's identity provider, served by `token-load` itself on
//! `--idp-listen`: Keycloak-shaped realms (`/realms/<tenant>`) with OIDC discovery and a
//! JWKS (`Cache-Control: max-age=300`), and a platform-shaped permission endpoint
//! (`/permissions/users/<user_id>`, like mod-roles-keycloak). It signs with the dev
//! issuer key of `--data-dir`, and its tokens carry `user_id` and no permissions, like
//! FOLIO Eureka's. The service under test trusts it through an `issuer_pattern` with
//! `discovery` and an `http` permission source (see `scripts/bench.sh`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Path as UrlPath;
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::json;
use token_service::clock::to_unix_secs;
use token_service::clock::{Clock, SystemClock};
use token_service::dev::{ensure_issuer_key, sign_with_dev_issuer};

use crate::{LoadError, setup};

/// Tenants (realms) the subject tokens come from.
pub const TENANTS: [&str; 2] = ["diku", "college"];
/// Users per tenant: few, so the service's permission cache is warm after the warm-up.
pub const USERS: usize = 8;

/// The dev issuer's public key as an Ed25519 JWK: the last 32 bytes of its SPKI.
fn dev_issuer_jwk(data_dir: &Path) -> Result<serde_json::Value, LoadError> {
    let path = data_dir.join("dev-issuer-pub.pem");
    let pem = std::fs::read_to_string(&path).map_err(setup("reading the dev issuer key"))?;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = STANDARD.decode(body).map_err(setup("dev issuer key"))?;
    let x = der
        .get(der.len().saturating_sub(32)..)
        .filter(|x| x.len() == 32)
        .ok_or_else(|| LoadError("dev issuer key: not Ed25519".into()))?;
    Ok(
        json!({"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig",
              "kid": "load-1", "x": URL_SAFE_NO_PAD.encode(x)}),
    )
}

/// Starts the provider on `listen` and returns the issuer pattern's base
/// (`http://<listen>/realms/`).
pub async fn serve(listen: SocketAddr, data_dir: &Path) -> Result<String, LoadError> {
    ensure_issuer_key(data_dir).map_err(setup("dev issuer key"))?;
    let jwks = Arc::new(json!({ "keys": [dev_issuer_jwk(data_dir)?] }));
    let base = format!("http://{listen}/realms/");
    let discovery_base = base.clone();
    let app = axum::Router::new()
        .route(
            "/realms/{tenant}/.well-known/openid-configuration",
            get(move |UrlPath(tenant): UrlPath<String>| {
                let iss = format!("{discovery_base}{tenant}");
                async move { axum::Json(json!({"issuer": iss, "jwks_uri": format!("{iss}/certs")})) }
            }),
        )
        .route(
            "/realms/{tenant}/certs",
            get(move || {
                let jwks = Arc::clone(&jwks);
                async move {
                    (
                        [("cache-control", "max-age=300")],
                        axum::Json(jwks.as_ref().clone()),
                    )
                }
            }),
        )
        .route(
            "/permissions/users/{user_id}",
            get(|UrlPath(user): UrlPath<String>| async move {
                axum::Json(json!({"userId": user, "permissions": ["load.run", "load.report"]}))
            }),
        );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(setup("binding the identity provider"))?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(base)
}

/// A Eureka-shaped subject token of worker `id`: realm and user picked from `id`.
pub fn subject_token(
    data_dir: &Path,
    base: &str,
    id: usize,
    ttl: Duration,
) -> Result<Arc<str>, LoadError> {
    let now = to_unix_secs(SystemClock.now());
    let tenant = TENANTS[id % TENANTS.len()];
    let claims = json!({
        "iss": format!("{base}{tenant}"),
        "sub": format!("kc-{tenant}-{}", id % USERS),
        "user_id": format!("user-{}", id % USERS),
        "sid": "load",
        "iat": now,
        "exp": now + i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2),
    });
    Ok(sign_with_dev_issuer(data_dir, &claims)
        .map_err(setup("signing a subject token"))?
        .into())
}
