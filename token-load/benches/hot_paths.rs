//! Micro-benchmarks of the hot paths: signing an access token, verifying one in the
//! SDK's `Verifier` (cached keys) against the raw Ed25519 check, reading the SDK's
//! current token, and computing the next renewal point.
//!
//! `cargo bench -p token-load --bench hot_paths`

#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use criterion::{Criterion, criterion_group, criterion_main};
use token_sdk::{Client, RenewalConfig, refresh_in};
use token_service::config::{Config, ModuleConfig};
use token_service::keys::{AccessClaims, Actor, KeyRing};
use token_service::secrets::{MasterKey, key_hash};
use token_service::server::Server;
use token_service::store::{SqliteStore, Store};

const KEY: &str = "mk_bench-module-key-0123456789abcdefghijklmnopqr";

fn claims(now: SystemTime) -> AccessClaims {
    let now = now.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    AccessClaims {
        iss: "jobtoken".into(),
        sub: "alice".into(),
        aud: "jobtoken".into(),
        exp: now + 300,
        iat: now,
        nbf: now,
        jti: "7f9c2f5e-3a53-4a43-9d67-6d1b6bbd1d3c".into(),
        tenant: "acme".into(),
        permissions: vec!["inventory.read".into(), "inventory.write".into()],
        job_id: "import-2024-05-01".into(),
        lease_id: "0d0b3f0e-1c1e-4f7e-8a55-3f6d3b3e2a11".into(),
        act: Actor {
            sub: "importer".into(),
        },
    }
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    #[allow(clippy::disallowed_methods)] // benchmark set-up, not service logic
    let now = SystemTime::now();

    // Signing, as the service does on every grant and renewal.
    let store: Arc<dyn Store> = Arc::new(SqliteStore::temporary().unwrap());
    let master = MasterKey::from_bytes(&[7u8; 32]);
    let keys = rt
        .block_on(KeyRing::load(
            store,
            master,
            Duration::from_secs(600),
            Duration::ZERO,
            now,
        ))
        .unwrap();
    let access = claims(now);
    c.bench_function("service: sign access token (EdDSA)", |b| {
        b.iter(|| keys.sign(black_box(&access), now).unwrap())
    });

    // A real service in-process, for a real lease and a real verifier.
    let dir = tempfile::tempdir().unwrap();
    let (lease, verifier, token, jwks) = rt.block_on(async {
        token_service::dev::ensure_issuer_key(dir.path()).unwrap();
        let mut config = Config::for_test(dir.path());
        config.modules = vec![ModuleConfig {
            delegable: vec!["*".into()],
            max_lifetime: Duration::from_secs(3600),
            default_lifetime: Duration::from_secs(3600),
            ..ModuleConfig::new("bench", Some(key_hash(KEY)))
        }];
        config.trusted_issuers = vec![token_service::dev::dev_issuer_config(dir.path())];
        let server = Server::start(config).await.unwrap();
        let endpoint = format!("http://{}", server.grpc_addr());
        let request = token_service::dev::DevTokenRequest {
            user: "alice".into(),
            tenant: "acme".into(),
            permissions: ["inventory.read".to_owned()].into(),
            ttl: Duration::from_secs(3600),
        };
        let subject = token_service::dev::mint_dev_token(dir.path(), &request, now).unwrap();
        let client = Client::builder(endpoint)
            .module_key(KEY)
            .connect()
            .await
            .unwrap();
        let lease = client.lease("bench", subject).start().await.unwrap();
        let verifier = client.verifier().build().await.unwrap();
        let token = lease.access_token().secret().to_owned();
        let jwks = client
            .grpc()
            .get_jwks(token_sdk::proto::GetJwksRequest {})
            .await
            .unwrap()
            .into_inner()
            .jwks_json;
        std::mem::forget(server); // keep serving for the whole benchmark run
        (lease, verifier, token, jwks)
    });

    c.bench_function("sdk: lease.access_token()", |b| {
        b.iter(|| black_box(lease.access_token()))
    });

    c.bench_function("sdk: Verifier::verify (cached key)", |b| {
        b.to_async(&rt)
            .iter(|| async { verifier.verify(black_box(&token)).await.unwrap() })
    });

    // The raw signature check the verifier cannot avoid: Ed25519 over header.payload.
    let (signing_input, signature) = token.rsplit_once('.').unwrap();
    let signature = URL_SAFE_NO_PAD.decode(signature).unwrap();
    let jwks: serde_json::Value = serde_json::from_str(&jwks).unwrap();
    let x = URL_SAFE_NO_PAD
        .decode(jwks["keys"][0]["x"].as_str().unwrap())
        .unwrap();
    let public = aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ED25519, x);
    c.bench_function("raw: Ed25519 verify of the same token", |b| {
        b.iter(|| {
            public
                .verify(black_box(signing_input.as_bytes()), black_box(&signature))
                .unwrap()
        })
    });

    let config = RenewalConfig::default();
    c.bench_function("sdk: refresh_in (next renewal point)", |b| {
        b.iter(|| {
            refresh_in(
                black_box(Duration::from_secs(300)),
                &config,
                black_box(0.37),
            )
        })
    });
}

criterion_group!(hot_paths, benches);
criterion_main!(hot_paths);
