//! Compiles the jobtoken.v1 protos in pure Rust (protox), so no system `protoc` is needed.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &["jobtoken/v1/jobtoken.proto", "jobtoken/v1/admin.proto"];

/// Messages that carry secrets: their `Debug` is written by hand (src/redact.rs).
const SECRET_BEARING: &[&str] = &[
    ".jobtoken.v1.IssueJobTokenRequest",
    ".jobtoken.v1.RefreshJobTokenRequest",
    ".jobtoken.v1.IntrospectTokenRequest",
    ".jobtoken.v1.TokenPair",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // Reflection needs the encoded descriptors; `compile_fds` does not write them itself.
    std::fs::write(
        out.join("jobtoken_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .codec_path("crate::codec::ValidatingCodec")
        .skip_debug(SECRET_BEARING)
        .compile_fds(fds)?;
    Ok(())
}
