//! The `tether` binary's library: the server wiring, the pingora proxy that
//! drives the filter chain, the admin listener, telemetry, and the demo.

pub mod admin;
pub mod app;
pub mod certs;
pub mod check;
pub mod client;
pub mod demo;
pub mod echo;
pub mod explain;
pub mod jwks;
pub mod otlp;
pub mod proxy;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod upstreams;
pub mod watch;
