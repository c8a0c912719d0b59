//! The job token service: the adapters around the domain (`token-domain`) and the
//! binary. The domain ([`service::LeaseService`] and its rules) knows nothing of gRPC,
//! SQL or HTTP; here [`grpc`] converts messages and maps [`error::Error`] to
//! `tonic::Status` in one place, [`store`] keeps data behind the domain's store port,
//! [`subject`], [`idp`] and [`platform`] implement its identity and permission ports, and
//! [`metrics`] its observer. The domain's modules are re-exported here
//! (`token_service::lease`, `::service`, …), so tools and tests need one dependency.
//! [`server::Server`] wires it all and is what tests start in-process:
//!
//! ```no_run
//! # async fn run() -> Result<(), token_service::config::StartupError> {
//! use token_service::{config::Config, server::Server};
//! let dir = std::path::Path::new("/tmp/jobtoken-example");
//! let running = Server::start(Config::for_test(dir)).await?;
//! println!("gRPC on {}", running.grpc_addr());
//! running.shutdown().await;
//! # Ok(()) }
//! ```

pub mod auth;
pub mod cli;
pub mod config;
pub mod credential;
pub mod dev;
pub mod grpc;
pub mod http;
pub mod idp;
pub mod metrics;
pub mod platform;
pub mod quota;
pub mod ready;
pub mod reload;
pub mod server;
pub mod store;
pub mod subject;
pub mod testing;

// The domain's modules, for the adapters here and for tools and tests.
pub use token_domain::crypto::{keys, secrets};
pub use token_domain::{
    clock, error, grant, ident, lease, limits, module, ports, recheck, replay, service, settings,
};

#[cfg(test)]
mod service_tests;
