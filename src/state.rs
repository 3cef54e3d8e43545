//! One generation of runtime state built from a validated [`Config`]: TLS
//! acceptors, upstream pools, routes with their metric handles. A reload
//! builds a new generation; connections keep the one they were accepted under.

use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

use crate::config::{Config, RouteConfig, ServerConfig};
use crate::metrics::{Metrics, RouteMetrics};
use crate::upstream::Upstream;

pub struct Route {
    pub config: Arc<RouteConfig>,
    pub upstream: Arc<Upstream>,
    pub metrics: RouteMetrics,
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
}

impl State {
    pub fn build(config: &Config, metrics: &Arc<Metrics>) -> Result<State, String> {
        let listener_tls = config
            .listeners
            .iter()
            .map(|listener| {
                listener
                    .tls
                    .as_ref()
                    .map(|pairs| crate::tls::server_config(pairs).map(TlsAcceptor::from))
                    .transpose()
            })
            .collect::<Result<Vec<_>, String>>()?;
        let mut pools = std::collections::HashMap::new();
        for (name, upstream) in &config.upstreams {
            pools.insert(name.clone(), Upstream::new(upstream.clone())?);
        }
        let routes = config
            .routes
            .iter()
            .map(|route| {
                let upstream = pools
                    .get(&route.upstream.name)
                    .cloned()
                    .ok_or_else(|| format!("route {:?} names an unknown upstream", route.name))?;
                Ok(Route {
                    config: route.clone(),
                    upstream,
                    metrics: metrics.route(&route.name),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
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
        })
    }
}
