//! OpenID Connect Back-Channel Logout 1.0 §2.6: verifying a logout token. The token is
//! parsed once and its signature checked with the issuer's keys exactly as a subject
//! token is; then the logout token's own rules decide.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use super::LogoutClaims;
use super::{Keys, Resolved, SubjectVerifier, TrustedIssuer, header_kid};
use super::{identifier, invalid, numeric_date};
use crate::clock::to_unix_secs;
use crate::error::{Error, Result};

/// The `events` member a logout token must carry (§2.4).
pub const BACKCHANNEL_LOGOUT_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";

impl TrustedIssuer {
    /// The logout token's claims, read from the verified payload at `now`.
    fn decide_logout(
        &self,
        resolved: &Resolved<'_, '_>,
        claims: &Map<String, Value>,
        now: SystemTime,
    ) -> Result<LogoutClaims> {
        let Some(config) = &self.logout else {
            return Err(invalid("this issuer's logouts are not received here"));
        };
        let Some(iss) = resolved.iss else {
            return Err(invalid("a logout token needs an iss claim"));
        };
        let ours = |v: &Value| v.as_str() == Some(config.client_id.as_str());
        let audience = match claims.get("aud") {
            Some(aud @ Value::String(_)) => ours(aud),
            Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
                items.iter().any(ours)
            }
            _ => false,
        };
        if !audience {
            return Err(invalid(
                "the aud claim does not name this service's client id",
            ));
        }
        let iat = numeric_date(claims, "iat", f64::ceil)?
            .ok_or_else(|| invalid("the iat claim is missing"))?;
        let exp = numeric_date(claims, "exp", f64::floor)?;
        let jti = identifier(claims, "jti")?;
        match claims.get("events") {
            Some(Value::Object(events)) => match events.get(BACKCHANNEL_LOGOUT_EVENT) {
                Some(Value::Object(_)) => {}
                _ => {
                    return Err(invalid(
                        "the events claim does not hold the back-channel logout event",
                    ));
                }
            },
            _ => return Err(invalid("the events claim is missing or not an object")),
        }
        // A nonce marks an ID token: one must never pass for a logout token (§2.4).
        if claims.contains_key("nonce") {
            return Err(invalid("a logout token must not carry a nonce"));
        }
        let optional = |name: &str| match claims.get(name) {
            None => Ok(None),
            Some(_) => identifier(claims, name).map(|v| Some(v.to_owned())),
        };
        let session_id = optional("sid")?;
        let sub = optional("sub")?;
        if session_id.is_none() && sub.is_none() {
            return Err(invalid("a logout token names a sid, a sub, or both"));
        }
        let now_secs = to_unix_secs(now);
        let leeway = i64::try_from(self.leeway.as_secs()).unwrap_or(i64::MAX);
        let max_age = i64::try_from(config.max_age.as_secs()).unwrap_or(i64::MAX);
        if iat > now_secs.saturating_add(leeway) {
            return Err(invalid("the iat claim is in the future"));
        }
        if now_secs > iat.saturating_add(max_age).saturating_add(leeway) {
            return Err(invalid("the logout token is too old (iat)"));
        }
        if exp.is_some_and(|exp| now_secs > exp.saturating_add(leeway)) {
            return Err(invalid("the logout token has expired"));
        }
        let at = |secs: i64| UNIX_EPOCH + Duration::from_secs(secs.max(0).unsigned_abs());
        Ok(LogoutClaims {
            issuer: iss.to_owned(),
            session_id,
            sub,
            jti: jti.to_owned(),
            issued_at: at(iat),
            remember_until: at(iat.saturating_add(max_age).saturating_add(leeway)),
        })
    }
}

impl SubjectVerifier {
    /// Verifies a back-channel logout token at `now`, fetching the issuer's keys when
    /// needed. Every refusal is [`Error::LogoutTokenInvalid`], except keys that cannot be
    /// fetched ([`Error::IssuerUnavailable`]).
    pub async fn verify_logout(&self, token: &str, now: SystemTime) -> Result<LogoutClaims> {
        let refused = |e: Error| match e {
            Error::IssuerUnavailable(_) => e,
            Error::SubjectTokenInvalid(problem) => Error::LogoutTokenInvalid(problem),
            Error::UntrustedIssuer(iss) => {
                Error::LogoutTokenInvalid(format!("issuer {iss:?} is not trusted"))
            }
            Error::InvalidArgument { problem, .. } => {
                Error::LogoutTokenInvalid(format!("logout_token {problem}"))
            }
            other => Error::LogoutTokenInvalid(other.to_string()),
        };
        let token = Self::parse(token).map_err(refused)?;
        let resolved = self.resolve(&token).map_err(refused)?;
        let keys = match &resolved.issuer.keys {
            Keys::Static(keys) => std::sync::Arc::clone(keys),
            Keys::Remote(remote) => {
                let kid = header_kid(&token.header).map_err(refused)?;
                remote
                    .keys_for(resolved.issuer_name(), resolved.tenant, kid, now)
                    .await
                    .map_err(refused)?
            }
        };
        resolved
            .issuer
            .verify_signature(&token, &keys)
            .map_err(refused)?;
        resolved
            .issuer
            .decide_logout(&resolved, &token.claims, now)
            .map_err(refused)
    }
}
