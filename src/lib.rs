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
//! meets them; a module only uses the ones below it.
//!
//! - [`listen`]: listeners, the accept loop, TLS handshakes, the PROXY
//!   header, the connection limit, the first request head, reload and drain.
//!   An upgrade as the first request goes to [`ws`], anything else to [`http`].
//! - [`http`]: hyper's service: plain requests forwarded with the upstream's
//!   pooled client, and upgrades that follow other requests on a keep-alive
//!   connection (handed to [`ws`]).
//! - [`ws`]: the upgrade request read off the wire, the exchange with the
//!   backend, the relay of a backend's refusal, and the tunnel.
//! - [`admit`]: the one admission function every request goes through, in
//!   the contract's order, and where a refusal is logged and counted.
//! - [`router`] (host + longest path prefix → route) and [`policy`] (the pure
//!   checks admission calls: IP, request shape, origin, token, scope,
//!   subprotocol).
//! - [`headers`]: hop-by-hop stripping, client IP, and the forwarding headers.
//! - [`upstream`]: backend pools, balancing, connects, health checks.
//!
//! Beneath them: [`config`] (TOML → validated types; nothing else reads
//! TOML), [`state`] (one runtime generation per config), [`error`] (every
//! refusal's status and reason), [`wire`] (HTTP/1.1 heads as bytes),
//! [`stream`] (the connection types), [`body`], [`tls`], [`metrics`] and
//! [`admin`]. The tools in [`tools`] (`demo`, `echo`, `load`) use the
//! library like any client; the proxy never calls them.

pub(crate) mod admin;
pub(crate) mod admit;
pub(crate) mod body;
pub mod config;
pub(crate) mod error;
pub mod headers;
pub(crate) mod http;
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
