//! The wire vocabulary shared by the service, the SDK and other clients: metadata names,
//! the error domain and the stable machine reasons of `google.rpc.ErrorInfo`. Written
//! once here so the service and its clients cannot drift apart.

/// Metadata entry carrying a module key.
pub const MODULE_KEY_HEADER: &str = "x-module-key";
/// Metadata entry carrying the admin key.
pub const ADMIN_KEY_HEADER: &str = "x-admin-key";
/// `google.rpc.ErrorInfo.domain` of every error the service sends.
pub const ERROR_DOMAIN: &str = "jobtoken.v1";
/// `google.rpc.ErrorInfo.metadata` key naming the offending request field.
pub const FIELD_METADATA: &str = "field";
/// `google.rpc.ErrorInfo.metadata` key of an ended lease's end reason.
pub const END_REASON_METADATA: &str = "end_reason";
/// `google.rpc.ErrorInfo.metadata` key of an ended lease's end detail.
pub const END_DETAIL_METADATA: &str = "end_detail";
/// The `iss` of the service's access tokens unless configured otherwise.
pub const DEFAULT_ISSUER: &str = "jobtoken";

/// The stable machine reasons (`google.rpc.ErrorInfo.reason`).
pub mod reason {
    /// A request field is missing or malformed; metadata `field` names it.
    pub const INVALID_ARGUMENT: &str = "INVALID_ARGUMENT";
    /// No valid module credential.
    pub const MODULE_UNAUTHENTICATED: &str = "MODULE_UNAUTHENTICATED";
    /// No valid admin credential.
    pub const ADMIN_UNAUTHENTICATED: &str = "ADMIN_UNAUTHENTICATED";
    /// The user's token does not verify.
    pub const SUBJECT_TOKEN_INVALID: &str = "SUBJECT_TOKEN_INVALID";
    /// The user's token has expired.
    pub const SUBJECT_TOKEN_EXPIRED: &str = "SUBJECT_TOKEN_EXPIRED";
    /// The user's token is not valid yet.
    pub const SUBJECT_TOKEN_NOT_YET_VALID: &str = "SUBJECT_TOKEN_NOT_YET_VALID";
    /// The user's token is for another audience.
    pub const SUBJECT_TOKEN_AUDIENCE: &str = "SUBJECT_TOKEN_AUDIENCE";
    /// The user's token is from an issuer the service does not trust.
    pub const UNTRUSTED_ISSUER: &str = "UNTRUSTED_ISSUER";
    /// A requested permission is not the user's.
    pub const PERMISSION_NOT_HELD: &str = "PERMISSION_NOT_HELD";
    /// A requested permission may not be delegated to the module.
    pub const PERMISSION_NOT_DELEGABLE: &str = "PERMISSION_NOT_DELEGABLE";
    /// The grant would carry no permission.
    pub const NO_PERMISSIONS_GRANTED: &str = "NO_PERMISSIONS_GRANTED";
    /// The requested lifetime is above the module's cap.
    pub const LIFETIME_EXCEEDS_CAP: &str = "LIFETIME_EXCEEDS_CAP";
    /// The module may not ask for this logout policy.
    pub const LOGOUT_POLICY_NOT_ALLOWED: &str = "LOGOUT_POLICY_NOT_ALLOWED";
    /// A back-channel logout token did not verify (HTTP 400, never sent over gRPC).
    pub const LOGOUT_TOKEN_INVALID: &str = "LOGOUT_TOKEN_INVALID";
    /// No such lease (or not visible to the caller).
    pub const LEASE_NOT_FOUND: &str = "LEASE_NOT_FOUND";
    /// The job already has an active lease.
    pub const LEASE_ALREADY_EXISTS: &str = "LEASE_ALREADY_EXISTS";
    /// The lease is another module's.
    pub const ACTOR_MISMATCH: &str = "ACTOR_MISMATCH";
    /// The lease was released by its holder.
    pub const LEASE_RELEASED: &str = "LEASE_RELEASED";
    /// The lease's maximum lifetime passed.
    pub const LEASE_EXPIRED: &str = "LEASE_EXPIRED";
    /// The lease was not renewed within its idle timeout.
    pub const LEASE_IDLE_TIMEOUT: &str = "LEASE_IDLE_TIMEOUT";
    /// An administrator revoked the lease.
    pub const LEASE_REVOKED: &str = "LEASE_REVOKED";
    /// The lease ended: the user no longer holds a permission it carried.
    pub const PERMISSIONS_WITHDRAWN: &str = "PERMISSIONS_WITHDRAWN";
    /// The lease ended: the user no longer exists or is disabled.
    pub const SUBJECT_DISABLED: &str = "SUBJECT_DISABLED";
    /// The lease ended: the user's session was logged out (policy `end`).
    pub const SUBJECT_LOGGED_OUT: &str = "SUBJECT_LOGGED_OUT";
    /// The lease ended: its permissions could not be confirmed for longer than allowed.
    pub const PERMISSIONS_UNVERIFIABLE: &str = "PERMISSIONS_UNVERIFIABLE";
    /// The refresh token is not the lease's current one.
    pub const REFRESH_TOKEN_INVALID: &str = "REFRESH_TOKEN_INVALID";
    /// An old refresh token was presented again; the lease ended.
    pub const REFRESH_TOKEN_REUSED: &str = "REFRESH_TOKEN_REUSED";
    /// The module does not serve the tenant.
    pub const TENANT_NOT_SERVED: &str = "TENANT_NOT_SERVED";
    /// The module may not mint tokens for the audience.
    pub const AUDIENCE_NOT_ALLOWED: &str = "AUDIENCE_NOT_ALLOWED";
    /// The module's rate was exceeded; RetryInfo says when to retry.
    pub const RATE_LIMITED: &str = "RATE_LIMITED";
    /// The module holds as many revocation streams as it may.
    pub const TOO_MANY_STREAMS: &str = "TOO_MANY_STREAMS";
    /// A request message is larger than the service accepts.
    pub const MESSAGE_TOO_LARGE: &str = "MESSAGE_TOO_LARGE";
    /// The platform's permission service could not be asked; retry.
    pub const PERMISSION_SOURCE_UNAVAILABLE: &str = "PERMISSION_SOURCE_UNAVAILABLE";
    /// The keys of the user token's issuer could not be fetched; retry.
    pub const ISSUER_UNAVAILABLE: &str = "ISSUER_UNAVAILABLE";
    /// Storage is unavailable; retry.
    pub const UNAVAILABLE: &str = "UNAVAILABLE";
    /// A bug; details are in the service's log.
    pub const INTERNAL: &str = "INTERNAL";
}
