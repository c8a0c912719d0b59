//! The service's own secrets: refresh tokens and the master key (`secrets`), and the
//! signing keys of access tokens with their rotation (`keys`).

pub mod keys;
pub mod secrets;
