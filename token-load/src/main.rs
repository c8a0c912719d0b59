//! `token-load`: drive a running token-service and report throughput and latency.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use token_load::{Load, Scale, Scenario};

/// Drives a running token-service over gRPC with one scenario and reports requests/s,
/// latency percentiles (p50/p90/p99/max) and errors by reason, as text or JSON. Needs the
/// service's dev-mode data directory (its dev issuer signs the subject tokens).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// What each client does.
    #[arg(long, value_enum, default_value = "refresh")]
    scenario: Scenario,
    /// The service.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    endpoint: String,
    /// The service's dev-mode data directory.
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// Module key file (default: <data-dir>/dev-module.key).
    #[arg(long)]
    module_key_file: Option<PathBuf>,
    /// Concurrent virtual clients.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections the clients share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Measured duration.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured warm-up before it.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Lifetime requested for each lease granted (the access-token TTL is the
    /// service's `access_token_ttl`).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    lease_lifetime: Duration,
    /// scale: leases held at once, each renewing on the SDK's schedule.
    #[arg(long, default_value_t = 100_000)]
    leases: usize,
    /// scale: spread the grants evenly over this long (0: as fast as possible).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    grant_over: Duration,
    /// scale: the service's process id, to report its resident memory.
    #[arg(long)]
    service_pid: Option<u32>,
    /// issue-idp: where to serve the identity provider (discovery, JWKS, permissions).
    #[arg(long, default_value = "127.0.0.1:50070")]
    idp_listen: std::net::SocketAddr,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let key_file = args
        .module_key_file
        .clone()
        .unwrap_or_else(|| args.data_dir.join("dev-module.key"));
    let module_key = match std::fs::read_to_string(&key_file) {
        Ok(k) => k.trim().to_owned(),
        Err(e) => {
            eprintln!("token-load: {}: {e}", key_file.display());
            return ExitCode::FAILURE;
        }
    };
    if args.scenario == Scenario::Scale {
        let scale = Scale {
            endpoint: args.endpoint,
            module_key,
            data_dir: args.data_dir,
            leases: args.leases,
            connections: args.connections,
            grant_concurrency: args.concurrency,
            grant_over: args.grant_over,
            duration: args.duration,
            lease_lifetime: args.lease_lifetime,
            service_pid: args.service_pid,
        };
        return print(scale.run().await, args.json);
    }
    let load = Load {
        endpoint: args.endpoint,
        module_key,
        data_dir: args.data_dir,
        scenario: args.scenario,
        concurrency: args.concurrency,
        connections: args.connections,
        duration: args.duration,
        warmup: args.warmup,
        lease_lifetime: args.lease_lifetime,
        idp_listen: args.idp_listen,
    };
    print(load.run().await, args.json)
}

fn print<R: std::fmt::Display + serde::Serialize>(
    result: Result<R, token_load::LoadError>,
    json: bool,
) -> ExitCode {
    let text = match result {
        Ok(report) if json => serde_json::to_string_pretty(&report).map_err(|e| e.to_string()),
        Ok(report) => Ok(report.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match text {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("token-load: {e}");
            ExitCode::FAILURE
        }
    }
}
