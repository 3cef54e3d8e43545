//! One generation of runtime state built from a validated [`Config`]: TLS
//! acceptors, upstream pools, routes with their metric handles. A reload
//! builds a new generation; connections keep the one they were accepted under.

use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

use crate::config::{Config, RouteConfig, ServerConfig};
use crate::limits::ClientLimiter;
use crate::metrics::{Metrics, RouteMetrics};
use crate::tls::TlsError;
use crate::upstream::Upstream;

/// Why a validated config could not become runtime state.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("listener[{index}].tls: {source}")]
    ListenerTls {
        index: usize,
        #[source]
        source: TlsError,
    },
    #[error("upstream.{name}: {source}")]
    Upstream {
        name: String,
        #[source]
        source: TlsError,
    },
    #[error("route {route:?} names an unknown upstream")]
    UnknownUpstream { route: String },
}

pub struct Route {
    pub config: Arc<RouteConfig>,
    pub upstream: Arc<Upstream>,
    pub metrics: RouteMetrics,
    /// `None` when the route sets no per-client limit.
    pub limits: Option<ClientLimiter>,
}

pub struct State {
    pub server: ServerConfig,
    pub routes: Vec<Route>,
    /// Series for requests no route matched (`route="-"`).
    pub unrouted_metrics: RouteMetrics,
    /// Per listener, in config order; `None` for plaintext listeners.
    pub listener_tls: Vec<Option<TlsAcceptor>>,
    /// Per listener, in config order: connections start with a PROXY header.
    pub listener_proxy_protocol: Vec<bool>,
    /// Per listener, in config order: its address as configured, the
    /// `listener` label of its metrics.
    pub listener_labels: Vec<String>,
    pub metrics: Arc<Metrics>,
}

impl State {
    pub fn build(config: &Config, metrics: &Arc<Metrics>) -> Result<State, BuildError> {
        let listener_tls = config
            .listeners
            .iter()
            .enumerate()
            .map(|(index, listener)| {
                listener
                    .tls
                    .as_ref()
                    .map(|pairs| {
                        crate::tls::server_config(pairs, listener.http2).map(TlsAcceptor::from)
                    })
                    .transpose()
                    .map_err(|source| BuildError::ListenerTls { index, source })
            })
            .collect::<Result<Vec<_>, BuildError>>()?;
        let mut pools = std::collections::HashMap::new();
        for (name, upstream) in &config.upstreams {
            let pool = Upstream::new(upstream.clone(), metrics).map_err(|source| {
                BuildError::Upstream {
                    name: name.clone(),
                    source,
                }
            })?;
            pools.insert(name.clone(), pool);
        }
        let routes = config
            .routes
            .iter()
            .map(|route| {
                let upstream = pools.get(&route.upstream.name).cloned().ok_or_else(|| {
                    BuildError::UnknownUpstream {
                        route: route.name.clone(),
                    }
                })?;
                Ok(Route {
                    config: route.clone(),
                    upstream,
                    metrics: metrics.route(&route.name),
                    limits: ClientLimiter::new(&route.limits),
                })
            })
            .collect::<Result<Vec<_>, BuildError>>()?;
        // The last step that can fail is behind us: this config is the one
        // that will serve, and servers it no longer lists lose their series.
        metrics.retain_upstream_servers(|upstream, server| {
            config
                .upstreams
                .get(upstream)
                .is_some_and(|config| config.servers.iter().any(|listed| listed == server))
        });
        Ok(State {
            server: config.server.clone(),
            routes,
            unrouted_metrics: metrics.route("-"),
            listener_tls,
            listener_proxy_protocol: config
                .listeners
                .iter()
                .map(|listener| listener.proxy_protocol)
                .collect(),
            listener_labels: config
                .listeners
                .iter()
                .map(|listener| listener.addr.to_string())
                .collect(),
            metrics: metrics.clone(),
        })
    }
}
