//! The service's own credential at the platform, for calls made with no user token at
//! hand (re-checking a lease's permissions at renewal): an OAuth2 client-credentials
//! token from the issuer's token endpoint (RFC 6749 §4.4), or a fixed header.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use http::{HeaderName, HeaderValue};
use serde::Deserialize;

use crate::config::{ServiceCredentialConfig, StartupError};
use crate::idp::{GetRequest, HttpGet};

/// Largest token-endpoint answer read.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;
/// Lifetime assumed for a token whose answer gives no `expires_in`.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Most tenants whose tokens are cached at once.
const MAX_CACHED_TENANTS: usize = 10_000;

/// A credential that puts one header on the platform call.
pub enum ServiceCredential {
    /// A fixed header; the value is secret.
    Header(HeaderName, HeaderValue),
    /// Client credentials, with tokens cached per tenant.
    ClientCredentials(ClientCredentials),
}

impl fmt::Debug for ServiceCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceCredential::Header(name, _) => f
                .debug_tuple("Header")
                .field(name)
                .field(&"<redacted>")
                .finish(),
            ServiceCredential::ClientCredentials(c) => f
                .debug_struct("ClientCredentials")
                .field("token_endpoint", &c.token_endpoint)
                .field("client_id", &c.client_id)
                .finish_non_exhaustive(),
        }
    }
}

/// OAuth2 client credentials at a token endpoint (`{tenant}` in the endpoint, client id
/// and secret file name is the tenant's).
pub struct ClientCredentials {
    token_endpoint: String,
    client_id: String,
    secret_file: PathBuf,
    scope: Option<String>,
    /// tenant → (reuse until, `Bearer …` value).
    tokens: Mutex<HashMap<String, (SystemTime, HeaderValue)>>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl ServiceCredential {
    /// From config. A header value is read from its file now (start-up fails if it
    /// can't be); client secrets are read when a token is fetched (one file per tenant).
    pub fn from_config(c: &ServiceCredentialConfig) -> Result<Self, StartupError> {
        match c {
            ServiceCredentialConfig::Header { name, value_file } => {
                let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                    StartupError::Invalid(format!("service_credential: {name:?} is not a header"))
                })?;
                let text =
                    std::fs::read_to_string(value_file).map_err(|source| StartupError::Io {
                        path: value_file.clone(),
                        source,
                    })?;
                let mut value =
                    HeaderValue::from_str(text.trim()).map_err(|_| StartupError::Key {
                        path: value_file.clone(),
                        problem: "is not a valid header value".into(),
                    })?;
                value.set_sensitive(true);
                Ok(ServiceCredential::Header(name, value))
            }
            ServiceCredentialConfig::ClientCredentials {
                token_endpoint,
                client_id,
                client_secret_file,
                scope,
            } => Ok(ServiceCredential::ClientCredentials(ClientCredentials {
                token_endpoint: token_endpoint.clone(),
                client_id: client_id.clone(),
                secret_file: client_secret_file.clone(),
                scope: scope.clone(),
                tokens: Mutex::new(HashMap::new()),
            })),
        }
    }

    /// The header for a call about `tenant`, fetching a token when none is cached.
    /// The error says why, without any secret.
    pub async fn header(
        &self,
        tenant: &str,
        http: &dyn HttpGet,
        timeout: Duration,
        now: SystemTime,
    ) -> Result<(HeaderName, HeaderValue), String> {
        match self {
            ServiceCredential::Header(name, value) => Ok((name.clone(), value.clone())),
            ServiceCredential::ClientCredentials(c) => Ok((
                http::header::AUTHORIZATION,
                c.token(tenant, http, timeout, now).await?,
            )),
        }
    }
}

impl ClientCredentials {
    async fn token(
        &self,
        tenant: &str,
        http: &dyn HttpGet,
        timeout: Duration,
        now: SystemTime,
    ) -> Result<HeaderValue, String> {
        if let Some((until, value)) = self.lock().get(tenant)
            && now < *until
        {
            return Ok(value.clone());
        }
        let fill = |s: &str| s.replace("{tenant}", tenant);
        let secret_file = PathBuf::from(fill(&self.secret_file.to_string_lossy()));
        let secret = std::fs::read_to_string(&secret_file)
            .map_err(|e| format!("client secret file {}: {e}", secret_file.display()))?;
        let client_id = fill(&self.client_id);
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", client_id.as_str()),
            ("client_secret", secret.trim()),
        ];
        if let Some(scope) = &self.scope {
            form.push(("scope", scope.as_str()));
        }
        let endpoint = fill(&self.token_endpoint);
        let answer = http
            .post_form(
                GetRequest {
                    url: &endpoint,
                    headers: &[],
                    timeout,
                    max_bytes: MAX_TOKEN_RESPONSE,
                },
                &form,
            )
            .await
            .map_err(|e| format!("token endpoint: {e}"))?;
        if answer.status != 200 {
            return Err(format!(
                "token endpoint refused the client credentials (HTTP {})",
                answer.status
            ));
        }
        let parsed: TokenAnswer = serde_json::from_slice(&answer.body)
            .map_err(|_| "token endpoint answered without an access_token".to_owned())?;
        let mut value = HeaderValue::from_str(&format!("Bearer {}", parsed.access_token))
            .map_err(|_| "token endpoint answered a token that is not a header value")?;
        value.set_sensitive(true);
        // Reuse for 90% of its life, so it never reaches the platform expired.
        let life = parsed
            .expires_in
            .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
        let mut tokens = self.lock();
        if tokens.len() >= MAX_CACHED_TENANTS {
            tokens.retain(|_, (until, _)| now < *until);
            if tokens.len() >= MAX_CACHED_TENANTS {
                tokens.clear();
            }
        }
        tokens.insert(tenant.to_owned(), (now + life.mul_f64(0.9), value.clone()));
        Ok(value)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (SystemTime, HeaderValue)>> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idp::{FetchError, Fetched};

    /// A token endpoint: counts requests, answers a token that lives 100 s.
    struct Endpoint {
        forms: Mutex<Vec<Vec<(String, String)>>>,
    }

    #[async_trait::async_trait]
    impl HttpGet for Endpoint {
        async fn get(&self, _: GetRequest<'_>) -> Result<Fetched, FetchError> {
            Err(FetchError::Transport("GET not expected".into()))
        }
        async fn post_form(
            &self,
            r: GetRequest<'_>,
            form: &[(&str, &str)],
        ) -> Result<Fetched, FetchError> {
            let mut recorded: Vec<(String, String)> = form
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            recorded.push(("url".into(), r.url.to_owned()));
            self.forms.lock().unwrap().push(recorded);
            Ok(Fetched {
                status: 200,
                cache_control: None,
                body: br#"{"access_token":"svc-token","expires_in":100}"#.to_vec().into(),
            })
        }
    }

    #[tokio::test]
    async fn client_credentials_are_fetched_per_tenant_and_reused_until_near_expiry() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("diku.secret"), "s3cret\n").unwrap();
        let credential =
            ServiceCredential::from_config(&ServiceCredentialConfig::ClientCredentials {
                token_endpoint: "https://kc/realms/{tenant}/token".into(),
                client_id: "jobtoken-{tenant}".into(),
                client_secret_file: dir.path().join("{tenant}.secret"),
                scope: None,
            })
            .unwrap();
        let endpoint = Endpoint {
            forms: Mutex::new(Vec::new()),
        };
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let second = Duration::from_secs(1);
        let (name, value) = credential
            .header("diku", &endpoint, second, t0)
            .await
            .unwrap();
        assert_eq!(name, http::header::AUTHORIZATION);
        assert_eq!(value.to_str().unwrap(), "Bearer svc-token");
        assert!(value.is_sensitive());
        // Reused within 90% of its life, fetched again after.
        credential
            .header("diku", &endpoint, second, t0 + Duration::from_secs(89))
            .await
            .unwrap();
        assert_eq!(endpoint.forms.lock().unwrap().len(), 1);
        credential
            .header("diku", &endpoint, second, t0 + Duration::from_secs(91))
            .await
            .unwrap();
        let forms = endpoint.forms.lock().unwrap().clone();
        assert_eq!(forms.len(), 2);
        let field = |name: &str| {
            forms[0]
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(field("grant_type").as_deref(), Some("client_credentials"));
        assert_eq!(field("client_id").as_deref(), Some("jobtoken-diku"));
        assert_eq!(field("client_secret").as_deref(), Some("s3cret"));
        assert_eq!(
            field("url").as_deref(),
            Some("https://kc/realms/diku/token")
        );
        // No secret in Debug; a tenant without a secret file is an error naming the file.
        assert!(!format!("{credential:?}").contains("s3cret"));
        let missing = credential.header("other", &endpoint, second, t0).await;
        assert!(missing.unwrap_err().contains("other.secret"));
    }
}
