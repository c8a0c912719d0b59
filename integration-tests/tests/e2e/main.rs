//! End-to-end tests: the real service, in-process on 127.0.0.1:0, over real gRPC and
//! HTTP. One test binary (each extra test file is another slow link).

mod flow;
mod forged;
mod identity;
mod jwks;
mod limits;
mod load;
mod malformed;
mod outage;
mod pg_tls;
mod postgres;
mod reflection;
mod sdk;
mod standing;
mod support;
mod tenants;
mod tls;
mod verify;
mod watch;
