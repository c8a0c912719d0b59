//! The resource server's side: verifying the job tokens that incoming calls carry,
//! directly ([`verifier`]) or as a tower layer ([`layer`]). One parser ([`jwt`]) decodes
//! a token into one typed value that every check reads.

pub(crate) mod jwt;
pub(crate) mod layer;
pub(crate) mod verifier;
