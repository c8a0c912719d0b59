//! End-to-end tests: the real service, in-process on 127.0.0.1:0, over real gRPC and
//! HTTP. One test binary (each extra test file is another slow link).

mod flow;
mod jwks;
mod load;
mod malformed;
mod outage;
mod postgres;
mod reflection;
mod sdk;
mod support;
mod tls;
mod verify;
mod watch;
