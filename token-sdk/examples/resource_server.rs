//! A resource server that accepts only valid job tokens carrying `inventory.write`: a
//! gRPC health service (standing in for any API) behind the SDK's `VerifyLayer`.
//!
//! ```sh
//! cargo run -p token-sdk --example resource_server
//! ```
//!
//! Environment: `JOBTOKEN_ENDPOINT` (default `http://127.0.0.1:50051`), `MODULE_KEY_FILE`
//! (default `data/dev-module.key`: the verifier follows the revocation stream, which
//! needs a module credential), `LISTEN` (default `127.0.0.1:50061`).

use token_sdk::{Client, VerifyLayer};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let module_key = std::fs::read_to_string(env_or("MODULE_KEY_FILE", "data/dev-module.key"))?;
    let client = Client::builder(env_or("JOBTOKEN_ENDPOINT", "http://127.0.0.1:50051"))
        .module_key(module_key.trim())
        .connect()
        .await?;
    let verifier = client.verifier().build().await?;
    let (_, health) = tonic_health::server::health_reporter();
    let listen = env_or("LISTEN", "127.0.0.1:50061").parse()?;
    println!("resource server on {listen}: requires a job token with inventory.write");
    tonic::transport::Server::builder()
        .layer(VerifyLayer::new(verifier).require(["inventory.write"]))
        .add_service(health)
        .serve(listen)
        .await?;
    Ok(())
}
