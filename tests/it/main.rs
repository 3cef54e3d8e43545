//! Integration tests: the proxy in-process on port 0 with real backends, real
//! TLS and real WebSocket clients on loopback. One binary, so one link.

#[path = "../common/mod.rs"]
mod common;

mod balancing;
mod cli;
mod client_limits;
mod forwarding;
mod h2;
mod h2_conn;
mod h2_tunnel;
mod handshake;
mod limits;
mod logging;
mod metrics;
mod ops_metrics;
mod origin_attacks;
mod origin_property;
mod plain_http;
mod routing;
mod smoke;
mod tls;
mod tunnel;
mod upgrade_paths;
mod wsgate_closes;
