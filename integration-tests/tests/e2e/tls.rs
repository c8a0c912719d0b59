//! TLS, and modules authenticated by their mTLS client certificate.

use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
};
use token_sdk::proto::IssueJobTokenRequest;
use token_sdk::proto::job_token_service_client::JobTokenServiceClient;
use token_service::config::{ModuleConfig, TlsConfig};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::support::{IMPORTER_KEY, TestServer, reason};

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
    stranger: (String, String),
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name = DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test CA");
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |sans: &[&str], cn: &str| {
        let key = KeyPair::generate().unwrap();
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    // A self-signed certificate the server's CA did not issue.
    let stranger_key = KeyPair::generate().unwrap();
    let mut stranger = CertificateParams::new(Vec::<String>::new()).unwrap();
    stranger
        .distinguished_name
        .push(DnType::CommonName, "importer.mtls");
    let stranger_pem = stranger.self_signed(&stranger_key).unwrap().pem();
    Pki {
        server: leaf(&["localhost"], "token-service"),
        client: leaf(&["importer.mtls"], "importer-mtls-client"),
        stranger: (stranger_pem, stranger_key.serialize_pem()),
        ca_pem,
    }
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

async fn client(
    addr: std::net::SocketAddr,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<JobTokenServiceClient<tonic::transport::Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(JobTokenServiceClient::new(channel))
}

#[tokio::test]
async fn modules_authenticate_by_client_certificate_or_key_over_tls() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let tls = TlsConfig {
        cert_file: write(dir.path(), "server.pem", &pki.server.0),
        key_file: write(dir.path(), "server.key", &pki.server.1),
        client_ca_file: Some(write(dir.path(), "ca.pem", &pki.ca_pem)),
    };
    let server = TestServer::start_with(|c| {
        c.tls = Some(tls);
        c.modules.push(ModuleConfig {
            mtls_subject: Some("importer.mtls".into()),
            delegable: vec!["inventory.*".into()],
            max_lifetime: Duration::from_secs(3600),
            default_lifetime: Duration::from_secs(3600),
            ..ModuleConfig::new("mtls-importer", None)
        });
    })
    .await;
    let addr: std::net::SocketAddr = server
        .endpoint()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let request = |job: &str| IssueJobTokenRequest {
        subject_token: server.user_token(&["inventory.read"]),
        job_id: job.into(),
        permissions: vec!["inventory.read".into()],
        max_lifetime: None,
        audience: String::new(),
        ..Default::default()
    };

    // The certificate alone identifies the module.
    let mut by_cert = client(addr, &pki.ca_pem, Some(&pki.client)).await.unwrap();
    let lease = by_cert
        .issue_job_token(request("by-cert"))
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(lease.actor, "mtls-importer");

    // Without a certificate, a module key still works over TLS; with neither, refused.
    let mut no_cert = client(addr, &pki.ca_pem, None).await.unwrap();
    let err = no_cert.issue_job_token(request("anon")).await.unwrap_err();
    assert_eq!(reason(&err), "MODULE_UNAUTHENTICATED");
    let mut keyed = tonic::Request::new(request("by-key"));
    keyed
        .metadata_mut()
        .insert("x-module-key", IMPORTER_KEY.parse().unwrap());
    let lease = no_cert
        .issue_job_token(keyed)
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(lease.actor, "importer");

    // A certificate from another CA does not get through the handshake.
    // (rustls may fail the connect, or the first call, depending on TLS 1.3 timing.)
    let refused = match client(addr, &pki.ca_pem, Some(&pki.stranger)).await {
        Err(e) => format!("{e:?}"),
        Ok(mut c) => format!(
            "{:?}",
            c.issue_job_token(request("stranger")).await.unwrap_err()
        ),
    };
    assert!(refused.contains("UnknownCA"), "{refused}");

    // Plaintext to a TLS port fails.
    let plain = token_sdk::connect(&server.endpoint(), IMPORTER_KEY).await;
    if let Ok(mut plain) = plain {
        assert!(plain.issue_job_token(request("plain")).await.is_err());
    }
    server.stop().await;
}
