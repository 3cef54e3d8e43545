//! wsgate: a WebSocket-aware reverse proxy.
//!
//! It terminates TLS, forwards the HTTP/1.1 upgrade handshake (and plain
//! HTTP) with the headers backends rely on intact, enforces per-route origin
//! and IP policy at the edge with an exact status and reason, then splices
//! the two byte streams until either side closes or the tunnel idles out.
//!
//! # Layout
//!
//! A request's path through the code, in order:
//!
//! - [`server`]: listeners, accept loop, TLS handshake, connection limit,
//!   reload and graceful drain.
//! - [`head`]: the connection's first request head, read before anyone
//!   parses it; a WebSocket upgrade there ([`upgrade_request`]) goes to
//!   [`upgrade`], anything else to hyper.
//! - [`proxy`]: the per-request pipeline (admission) and hyper's entry
//!   point; where a refused request is logged and counted.
//! - [`router`]: host + longest path prefix → route.
//! - [`policy`]: IP, handshake shape, origin and subprotocol checks.
//! - [`headers`]: hop-by-hop stripping, upgrade detection, client IP;
//!   [`forwarding`]: the `X-Forwarded-*`, `X-Real-IP` and `Forwarded` headers.
//! - [`upstream`]: backend pools, balancing, connects.
//! - [`upgrade`]: the exchange with the backend, the 101 and the tunnel's
//!   start; [`wire`] reads and writes its HTTP/1.1 heads.
//! - [`tunnel`]: the byte splice with idle timeout.
//!
//! Around it: [`config`] (TOML → validated types), [`state`] (one runtime
//! generation per config), [`tls`], [`metrics`] and [`admin`], and the tools
//! [`demo`], [`echo`] and [`load`].

pub mod admin;
pub mod config;
pub mod demo;
pub mod echo;
pub mod error;
pub mod forwarding;
pub mod head;
pub mod headers;
pub mod health;
pub mod load;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod proxy_protocol;
pub(crate) mod refusal;
pub mod router;
pub mod server;
pub mod state;
pub mod tls;
pub mod tunnel;
pub mod upgrade;
pub mod upgrade_request;
pub mod upgraded;
pub mod upstream;
pub mod wire;

pub use config::Config;
pub use server::{Proxy, Reloader};

/// Binds every listener of `config` and serves until `shutdown` completes.
pub async fn run(
    config: &Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    Proxy::bind(config).await?.serve(shutdown).await
}
