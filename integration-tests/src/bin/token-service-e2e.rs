//! The service's binary, built again as a binary of this package so the end-to-end tests
//! can SIGKILL and restart the real process (`CARGO_BIN_EXE_token-service-e2e`; cargo
//! offers no stable way to depend on another package's binary). The same code as
//! `token-service`: both only call `token_service::cli::main`.

use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    token_service::cli::main()
}
