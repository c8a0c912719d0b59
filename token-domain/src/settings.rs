//! The settings the domain runs with, and the policies it applies.

use std::time::Duration;

use serde::Deserialize;

/// The settings the domain needs, taken from the service's configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `iss` of access tokens.
    pub issuer: String,
    /// `aud` when a request names none.
    pub default_audience: String,
    /// Access-token lifetime.
    pub access_token_ttl: Duration,
    /// Idle timeout of leases.
    pub idle_timeout: Duration,
    /// Grace window of the previous refresh token.
    pub refresh_grace: Duration,
    /// Over-cap lifetime policy.
    pub over_cap: OverCap,
}

/// Over-cap policy.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OverCap {
    /// Grant the cap and say so in the response (`lifetime_clamped`).
    #[default]
    Clamp,
    /// Refuse with `LIFETIME_EXCEEDS_CAP`.
    Refuse,
}

/// What a re-check does when a granted permission was withdrawn.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnWithdrawn {
    /// The lease ends with `PERMISSIONS_WITHDRAWN`.
    #[default]
    End,
    /// New tokens carry what remains (an event records it); with nothing left, the lease
    /// ends with `PERMISSIONS_WITHDRAWN`.
    Narrow,
}
