//! Edge policy through a running proxy (issue 3, "How it is checked"): JWT and
//! forward auth, IP allow/deny lists with IPv4, IPv6 and v4-mapped peers,
//! trusted `X-Forwarded-For`, PROXY protocol v1/v2, subprotocol narrowing,
//! report-only origins and the check order. Real sockets on loopback, port 0,
//! keys generated at run time; every wait has a deadline.

#[path = "../common/mod.rs"]
mod common;

mod support;

mod check_order;
mod forward_auth;
mod ip;
mod jwt;
mod proxy_protocol;
mod refusals;
mod report_origins;
mod subprotocols;
