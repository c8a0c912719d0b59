//! A service started for one test, with two modules and an admin key.

use std::collections::BTreeSet;
use std::time::Duration;

use token_sdk::proto::{IssueJobTokenRequest, IssueJobTokenResponse};
use token_sdk::{AdminClient, JobTokenClient};
use token_service::clock::{Clock, SystemClock};
use token_service::config::{Config, ModuleConfig};
use token_service::dev::{self, DevTokenRequest};
use token_service::secrets::key_hash;
use token_service::server::{RunningServer, Server};

pub(crate) const IMPORTER_KEY: &str = "mk_importer-test-key-0123456789abcdefghijklmnop";
pub(crate) const OTHER_KEY: &str = "mk_other-test-key-0123456789abcdefghijklmnopqrs";
pub(crate) const ADMIN_KEY: &str = "ak_admin-test-key-0123456789abcdefghijklmnopqrs";

pub(crate) struct TestServer {
    running: RunningServer,
    dir: tempfile::TempDir,
}

fn module(id: &str, key: &str, delegable: &[&str]) -> ModuleConfig {
    ModuleConfig {
        id: id.into(),
        key_sha256: Some(key_hash(key)),
        mtls_subject: None,
        delegable: delegable.iter().map(|s| s.to_string()).collect(),
        max_lifetime: Duration::from_secs(6 * 3600),
        default_lifetime: Duration::from_secs(3600),
    }
}

impl TestServer {
    pub(crate) async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub(crate) async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        dev::ensure_issuer_key(dir.path()).unwrap();
        let mut config = Config::for_test(dir.path());
        config.modules = vec![
            module("importer", IMPORTER_KEY, &["inventory.*"]),
            module("other", OTHER_KEY, &["*"]),
        ];
        config.admin_key_sha256 = Some(key_hash(ADMIN_KEY));
        config.trusted_issuers = vec![dev::dev_issuer_config(dir.path())];
        adjust(&mut config);
        let running = Server::start(config).await.unwrap();
        Self { running, dir }
    }

    pub(crate) fn endpoint(&self) -> String {
        format!("http://{}", self.running.grpc_addr())
    }

    pub(crate) fn http_addr(&self) -> std::net::SocketAddr {
        self.running.http_addr()
    }

    pub(crate) fn user_token(&self, permissions: &[&str]) -> String {
        self.user_token_for(permissions, Duration::from_secs(600))
    }

    /// A user token that lives `ttl`.
    pub(crate) fn user_token_for(&self, permissions: &[&str], ttl: Duration) -> String {
        let request = DevTokenRequest {
            user: "alice".into(),
            tenant: "acme".into(),
            permissions: permissions
                .iter()
                .map(|s| s.to_string())
                .collect::<BTreeSet<_>>(),
            ttl,
        };
        dev::mint_dev_token(self.dir.path(), &request, SystemClock.now()).unwrap()
    }

    pub(crate) async fn client(&self) -> JobTokenClient {
        token_sdk::connect(&self.endpoint(), IMPORTER_KEY)
            .await
            .unwrap()
    }

    pub(crate) async fn client_with_key(&self, key: &str) -> JobTokenClient {
        token_sdk::connect(&self.endpoint(), key).await.unwrap()
    }

    pub(crate) async fn admin(&self) -> AdminClient {
        token_sdk::connect_admin(&self.endpoint(), ADMIN_KEY)
            .await
            .unwrap()
    }

    pub(crate) async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.endpoint())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Grants a lease for `job` to the importer module.
    pub(crate) async fn issue(&self, job: &str) -> IssueJobTokenResponse {
        self.client()
            .await
            .issue_job_token(IssueJobTokenRequest {
                subject_token: self.user_token(&["inventory.read", "inventory.write"]),
                job_id: job.into(),
                permissions: vec!["inventory.read".into()],
                max_lifetime: Some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                }),
                audience: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    pub(crate) async fn stop(self) {
        self.running.shutdown().await;
    }
}

/// The machine reason of a failed call.
pub(crate) fn reason(status: &tonic::Status) -> String {
    token_sdk::error_reason(status).unwrap_or_else(|| format!("<no ErrorInfo: {status:?}>"))
}

/// A minimal HTTP/1.1 GET over a plain TCP socket: the status line and the body.
pub(crate) async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}
