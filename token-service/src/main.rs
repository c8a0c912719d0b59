//! `token-service`: run the job token service, administer it, or mint dev tokens for
//! trying it (`token_service::cli`).

use std::process::ExitCode;

// A renewal allocates a few dozen small buffers across two threads (the gRPC task and
// the store's writer); mimalloc's per-thread free lists make that measurably cheaper
// than glibc's malloc (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    token_service::cli::main()
}
