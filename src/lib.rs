//! wsgate: a WebSocket-aware reverse proxy.
//!
//! It terminates TLS, forwards the HTTP/1.1 upgrade handshake (and plain
//! HTTP) with the headers backends rely on intact, enforces per-route origin,
//! auth and IP policy at the edge with an exact status and reason, then
//! splices the two byte streams until either side closes or the tunnel idles
//! out.
//!
//! # Layout
//!
//! One folder per stage of a connection's path, in the order a connection
//! meets them; a module uses only the ones listed after it.
//!
//! - [`listen`]: listeners, reload and drain (`mod.rs`); the accept loop,
//!   the connection limit, TLS handshakes and the first request head
//!   (`accept.rs`, `first_head.rs`); the PROXY header (`proxy_header.rs`).
//!   An upgrade as a connection's first request goes to `ws`, anything
//!   else to `http`.
//! - `http`: hyper's service (`mod.rs`) and plain requests forwarded with
//!   the upstream's pooled client (`forward.rs`); an upgrade that follows
//!   other requests on a keep-alive connection is handed to `ws`. HTTP/2
//!   client connections (`h2/`: hyper's server, streams as HTTP/1.1
//!   requests, `activity.rs` for the idle close).
//! - `ws`: the switch on either path (`upgrade.rs`), RFC 8441 streams
//!   (`extended_connect.rs`), the exchange with the
//!   backend (`exchange.rs`), the relay of a backend's refusal
//!   (`refusal.rs`), the tunnel (`tunnel/`: the splice and what wsgate
//!   does after the 101 in `mod.rs`, one direction in `pump.rs`) and the
//!   frame follower (`frame.rs`).
//! - `admit`: the one admission function every request goes through, in
//!   the contract's order (route, client IP, shape, origin, token, scope,
//!   subprotocol), and the one place a refusal is logged and counted.
//! - `limits`: a route's per-client-IP limits (open connections,
//!   handshake rate), the only admission check that keeps state.
//! - [`router`]: host + longest path prefix → route.
//! - `state`: one runtime generation per config; a reload swaps it, and
//!   the old one is freed with its last connection.
//! - `upstream`: choice of server (`mod.rs`), balancers (`balance.rs`),
//!   hash key and sticky cookie (`affinity.rs`), per-server plain-HTTP pools
//!   (`pool.rs`), connects and the upstream stream (`connect.rs`), active
//!   and passive health (`health.rs`).
//! - [`config`]: TOML → validated types (`raw.rs` is the serde shape,
//!   `auth.rs` builds the auth policies); nothing else reads TOML.
//! - [`policy`]: the checks admission calls, pure functions of a route's
//!   [`policy::RoutePolicy`] and the request head; `policy/auth/` verifies
//!   tokens and asks forward-auth services.
//! - Beneath them all: `wire` (HTTP/1.1 heads as bytes, the upgrade request
//!   read off the wire, the framing checks of a first head for hyper), [`headers`] (hop-by-hop stripping, client IP, the
//!   forwarding headers), `error` (every refusal's status, reason and who
//!   failed), `stream` (the connection types), `drain` (each tunnel's
//!   moment in a drain), `body`, [`tls`],
//!   `metrics` and `admin`.
//!
//! The tools in [`tools`] (`demo`, `echo`, `load`, `probe`) use the library
//! like any client; the proxy never calls them.

pub(crate) mod admin;
pub(crate) mod admit;
pub(crate) mod body;
pub mod config;
pub(crate) mod drain;
pub(crate) mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod headers;
pub(crate) mod http;
pub(crate) mod limits;
pub mod listen;
pub(crate) mod metrics;
pub mod policy;
pub mod router;
pub(crate) mod state;
pub(crate) mod stream;
pub mod tls;
pub mod tools;
pub(crate) mod upstream;
pub(crate) mod wire;
pub(crate) mod ws;

pub use config::Config;
pub use listen::{Proxy, Reloader};

/// Binds every listener of `config` and serves until `shutdown` completes.
pub async fn run(
    config: &Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    Proxy::bind(config).await?.serve(shutdown).await
}
