//! The job token service: grants, renews, revokes and introspects **job leases**, and
//! signs the short-lived access tokens that long-running jobs use on a user's behalf.
//!
//! The domain ([`service::LeaseService`]) knows nothing of gRPC; [`grpc`] converts messages
//! and maps [`error::Error`] to `tonic::Status` in one place; [`store`] keeps data behind a
//! trait with no business rules. [`server::Server`] wires it all and is what tests start
//! in-process:
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
pub mod clock;
pub mod config;
pub mod credential;
pub mod dev;
pub mod error;
pub mod grpc;
pub mod http;
pub mod ident;
pub mod idp;
pub mod keys;
pub mod lease;
pub mod limits;
pub mod metrics;
pub mod permissions;
pub mod platform;
pub mod ready;
pub mod recheck;
pub mod reload;
pub mod replay;
pub mod secrets;
pub mod server;
pub mod service;
pub mod store;
pub mod subject;
pub mod testing;
