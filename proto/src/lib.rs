//! Generated types, clients and servers of the `jobtoken.v1` gRPC API.
//!
//! The `.proto` files beside this crate are the API; this crate only compiles them. It
//! also exports [`FILE_DESCRIPTOR_SET`] so a server can offer reflection.
//!
//! ```
//! use jobtoken_proto::jobtoken::v1::RefreshJobTokenRequest;
//! let request = RefreshJobTokenRequest { lease_id: "l-1".into(), refresh_token: String::new() };
//! assert_eq!(request.lease_id, "l-1");
//! ```

/// The `jobtoken` proto package.
pub mod jobtoken {
    /// Version 1 of the API.
    #[allow(missing_docs, unreachable_pub, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("jobtoken.v1");
    }
}

pub mod codec;
mod redact;
pub use jobtoken_wire as wire;

/// Encoded `FileDescriptorSet` of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("jobtoken_descriptor");
