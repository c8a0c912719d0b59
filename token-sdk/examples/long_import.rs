//! A long import that holds a job lease: it processes records for minutes while the SDK
//! renews the job's token in the background, printing each renewal.
//!
//! Against a dev-mode service with short tokens (from the repository root):
//!
//! ```sh
//! JOBTOKEN_ACCESS_TOKEN_TTL=5s cargo run -p token-service -- serve      # terminal 1
//! cargo run -p token-sdk --example resource_server                     # terminal 2 (optional)
//! SUBJECT_TOKEN=$(cargo run -q -p token-service -- dev-token --user alice --tenant diku \
//!     --permissions inventory.write) \
//!   cargo run -p token-sdk --example long_import -- 600 100            # terminal 3
//! ```
//!
//! Arguments: number of records (default 600) and milliseconds per record (default 100).
//! Environment: `SUBJECT_TOKEN` (required), `JOBTOKEN_ENDPOINT` (default
//! `http://127.0.0.1:50051`), `MODULE_KEY_FILE` (default `data/dev-module.key`),
//! `RESOURCE_ENDPOINT` (default `http://127.0.0.1:50061`; calls it per record if it runs).

use std::time::Duration;

use token_sdk::{Client, LeaseState, Outcome};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let records: u64 = args.next().map_or(Ok(600), |a| a.parse())?;
    let per_record = Duration::from_millis(args.next().map_or(Ok(100), |a| a.parse())?);
    let subject_token = std::env::var("SUBJECT_TOKEN")
        .map_err(|_| "set SUBJECT_TOKEN (see `token-service dev-token --help`)")?;
    let module_key = std::fs::read_to_string(env_or("MODULE_KEY_FILE", "data/dev-module.key"))?;

    let client = Client::builder(env_or("JOBTOKEN_ENDPOINT", "http://127.0.0.1:50051"))
        .module_key(module_key.trim())
        .connect()
        .await?;
    let lease = client
        .lease(format!("import-{}", std::process::id()), subject_token)
        .permissions(["inventory.write"])
        .max_lifetime(Duration::from_secs(3600))
        .start()
        .await?;
    println!(
        "lease {} granted to {} for {} in {}: {:?}",
        lease.info().lease_id,
        lease.info().actor,
        lease.info().subject,
        lease.info().tenant,
        lease.info().permissions
    );

    // Print every renewal as it happens.
    let mut changes = lease.changes();
    tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            let token = changes.borrow_and_update().clone();
            println!(
                "  renewed: token #{} valid for {:.1}s",
                token.generation(),
                token.remaining().as_secs_f64()
            );
        }
    });

    // The resource server is optional: the import works without it.
    let resource = tonic::transport::Endpoint::from_shared(env_or(
        "RESOURCE_ENDPOINT",
        "http://127.0.0.1:50061",
    ))?
    .connect()
    .await
    .ok()
    .map(|channel| HealthClient::with_interceptor(channel, lease.interceptor()));

    for n in 1..=records {
        if let LeaseState::Ended(end) = lease.state() {
            println!(
                "lease ended ({:?}: {}); checkpoint at record {n} and stop",
                end.reason, end.detail
            );
            return Ok(());
        }
        if let Some(resource) = &resource {
            let mut resource = resource.clone();
            let request = HealthCheckRequest {
                service: String::new(),
            };
            if let Err(status) = resource.check(request).await {
                println!("record {n}: resource server refused: {}", status.message());
            }
        }
        tokio::time::sleep(per_record).await;
        if n % 50 == 0 {
            println!("{n}/{records} records imported");
        }
    }
    lease.release(Outcome::Succeeded).await?;
    println!("done; lease released");
    Ok(())
}
