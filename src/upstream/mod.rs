//! Backend pools: the server for each connection or request (round robin,
//! least connections, consistent hashing, a sticky cookie: [`balance`],
//! [`affinity`]), connects with a timeout that fall through to the next
//! server (as nginx's `proxy_next_upstream error timeout` does; `connect.rs`),
//! optional verified TLS, a keep-alive pool per server for plain requests
//! (`pool.rs`), and health, active and passive ([`health`]).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use hyper_util::client::legacy::Client;
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;

pub(crate) mod affinity;
mod balance;
mod connect;
pub(crate) mod health;
mod pool;

pub(crate) use affinity::Affinity;
pub use connect::UpstreamStream;
use connect::{Lease, StreamKind, tcp_connect};
pub(crate) use pool::SendError;

use crate::config::{Balance, UpstreamConfig};
use crate::error::Rejection;
use crate::metrics::Metrics;

/// Why no backend connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("could not connect to upstream {upstream:?} ({server}): {source}")]
    Unavailable {
        upstream: String,
        server: String,
        #[source]
        source: io::Error,
    },
    #[error("upstream {upstream:?} ({server}) did not accept the connection within {timeout:?}")]
    Timeout {
        upstream: String,
        server: String,
        timeout: std::time::Duration,
    },
}

impl ConnectError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, ConnectError::Timeout { .. })
    }
}

/// A connect failure is the upstream's: a timeout is 504, the rest 502.
impl From<&ConnectError> for Rejection {
    fn from(error: &ConnectError) -> Rejection {
        if error.is_timeout() {
            Rejection::UpstreamTimeout {
                detail: error.to_string(),
            }
        } else {
            Rejection::UpstreamUnavailable {
                detail: error.to_string(),
            }
        }
    }
}

/// One configured backend pool and the live state around it.
pub struct Upstream {
    pub config: Arc<UpstreamConfig>,
    next: AtomicUsize,
    /// Per server: open tunnels plus plain requests waiting for their
    /// response head — the load `least_conn` and hash's bound compare.
    /// Idle pooled connections are no load, so they are not counted.
    active: Arc<[AtomicUsize]>,
    /// Per server: [`balance::server_id`] of its `host:port`, what hashing
    /// and the sticky cookie know it by.
    ids: Vec<u64>,
    /// Present with `sticky_cookie`: the cookie's name and each server's
    /// `Set-Cookie` values.
    sticky: Option<affinity::Sticky>,
    health: Arc<health::Health>,
    tls: Option<TlsConnector>,
    /// Plain HTTP; its pool is keyed per server (see `pool.rs`).
    http: Client<pool::Connector, pool::Resendable>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.config.name)
            .finish()
    }
}

/// A connection made for an upgrade, and which server it went to.
pub(crate) struct Connected {
    pub stream: UpstreamStream,
    /// How many bytes of the first bytes went out with the connect.
    pub sent: usize,
    pub server: usize,
}

impl Upstream {
    pub fn new(
        config: Arc<UpstreamConfig>,
        metrics: &Metrics,
    ) -> Result<Arc<Upstream>, crate::tls::TlsError> {
        let tls = match &config.tls {
            Some(tls) => Some(TlsConnector::from(crate::tls::upstream_client_config(
                &tls.extra_roots,
            )?)),
            None => None,
        };
        let ids: Vec<u64> = config
            .servers
            .iter()
            .map(|server| balance::server_id(server))
            .collect();
        let upstream = Arc::new_cyclic(|weak| Upstream {
            active: config.servers.iter().map(|_| AtomicUsize::new(0)).collect(),
            sticky: config
                .sticky_cookie
                .as_deref()
                .map(|name| affinity::Sticky::new(name, &ids)),
            ids,
            health: health::Health::new(config.clone(), metrics),
            config,
            next: AtomicUsize::new(0),
            tls,
            http: pool::client(weak.clone()),
        });
        if let Some(check) = upstream.config.health_check.clone() {
            tokio::spawn(health::check_forever(Arc::downgrade(&upstream), check));
        }
        Ok(upstream)
    }

    /// Passive health: how a server's answer to an upgrade went. Failures
    /// are answers of 500 or more, none in time, or none that is HTTP.
    pub(crate) fn answered(&self, server: usize, ok: bool) {
        if ok {
            self.health.succeeded(server);
        } else {
            self.health.failed(server);
        }
    }

    /// The server for one attempt under the upstream's `balance`, among
    /// those `eligible` allows; a valid sticky cookie's server first.
    /// `start` is the round-robin position, taken once per request.
    fn choose(
        &self,
        affinity: &Affinity,
        start: &mut Option<usize>,
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        if let Some(server) = affinity.sticky.filter(|&server| eligible(server)) {
            return Some(server);
        }
        let count = self.config.servers.len();
        let load = |index: usize| self.active[index].load(Ordering::Relaxed);
        // `max(1)`: config validation refuses an empty pool, but a zero
        // here must not divide; the scans then find nothing.
        let mut start = || {
            *start.get_or_insert_with(|| self.next.fetch_add(1, Ordering::Relaxed) % count.max(1))
        };
        match (self.config.balance, affinity.key) {
            (Balance::RoundRobin, _) => balance::round_robin(count, start(), eligible),
            (Balance::Hash, Some(key)) => {
                balance::rendezvous_bounded(key, &self.ids, load, eligible)
            }
            (Balance::LeastConn, _) | (Balance::Hash, None) => {
                balance::least_loaded(count, start(), load, eligible)
            }
        }
    }

    /// Connects to a server of the pool for an upgrade, trying each at most
    /// once from the balancer's choice, and sends `first` on a plaintext
    /// connection as soon as the kernel takes it. The last error is returned
    /// when all fail.
    pub(crate) async fn connect_sending(
        self: &Arc<Self>,
        first: &[u8],
        affinity: &Affinity,
    ) -> Result<Connected, ConnectError> {
        let mut picker = Picker::new(affinity);
        let mut last_error = None;
        while let Some(index) = picker.next(self) {
            // Counted from the choice, not from the connect: concurrent
            // handshakes must see each other's picks.
            let lease = Lease::take(&self.active, index);
            match self.connect_to(index, first).await {
                Ok((mut stream, sent)) => {
                    stream._lease = Some(lease);
                    return Ok(Connected {
                        stream,
                        sent,
                        server: index,
                    });
                }
                Err(error) => {
                    self.health.failed(index);
                    tracing::warn!(upstream = %self.config.name, %error, "upstream connect failed");
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| self.none_in_rotation()))
    }

    fn none_in_rotation(&self) -> ConnectError {
        ConnectError::Unavailable {
            upstream: self.config.name.clone(),
            server: "-".to_owned(),
            source: io::Error::other("no server passed its last health check"),
        }
    }

    /// A connection to server `index`, counted against no load: the caller
    /// leases it for as long as it is load.
    pub(crate) async fn connect_to(
        self: &Arc<Self>,
        index: usize,
        first: &[u8],
    ) -> Result<(UpstreamStream, usize), ConnectError> {
        let server = &self.config.servers[index];
        let unavailable = |source: io::Error| ConnectError::Unavailable {
            upstream: self.config.name.clone(),
            server: server.clone(),
            source,
        };
        let timeout = self.config.connect_timeout;
        let attempt = async {
            let first = if self.tls.is_some() { &[][..] } else { first };
            let (tcp, sent) = tcp_connect(server, first).await.map_err(unavailable)?;
            let io = match &self.tls {
                None => StreamKind::Plain(tcp),
                Some(connector) => {
                    let host = server
                        .rsplit_once(':')
                        .map(|(host, _)| host)
                        .unwrap_or(server);
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    let name = ServerName::try_from(host.to_owned()).map_err(|error| {
                        unavailable(io::Error::new(io::ErrorKind::InvalidInput, error))
                    })?;
                    // Boxed: the handshake future is large, and plaintext
                    // connects should not carry its size.
                    StreamKind::Tls(Box::new(
                        Box::pin(connector.connect(name, tcp))
                            .await
                            .map_err(unavailable)?,
                    ))
                }
            };
            Ok((io, sent))
        };
        // Pinned in place: handing the future itself to `timeout` would copy it.
        let attempt = std::pin::pin!(attempt);
        let (io, sent) =
            tokio::time::timeout(timeout, attempt)
                .await
                .map_err(|_| ConnectError::Timeout {
                    upstream: self.config.name.clone(),
                    server: server.clone(),
                    timeout,
                })??;
        let stream = UpstreamStream { _lease: None, io };
        Ok((stream, sent))
    }
}

/// One request's walk through the servers: the balancer's choice, then,
/// after each failed attempt, what it would choose without the servers
/// already tried — so a hashed key falls through to its next-ranked server.
/// At most one attempt per server.
struct Picker<'a> {
    affinity: &'a Affinity,
    start: Option<usize>,
    /// The server of the attempt in progress; asked again, it failed.
    current: Option<usize>,
    /// Allocated only once an attempt failed.
    tried: Vec<usize>,
    /// Every server that passes its active checks is out by passive health
    /// alone: try them anyway. A whole fleet failing at once is likelier a
    /// blip (or wsgate's own network) than every backend down, and refusing
    /// all for `fail_timeout` would turn the blip into an outage (nginx never
    /// takes out a lone server for the same reason).
    relaxed: Option<bool>,
}

impl<'a> Picker<'a> {
    fn new(affinity: &'a Affinity) -> Picker<'a> {
        Picker {
            affinity,
            start: None,
            current: None,
            tried: Vec::new(),
            relaxed: None,
        }
    }

    fn next(&mut self, upstream: &Upstream) -> Option<usize> {
        if let Some(failed) = self.current.take() {
            self.tried.push(failed);
        }
        let count = upstream.config.servers.len();
        if self.tried.len() >= count {
            return None;
        }
        let health = &upstream.health;
        let relaxed = *self
            .relaxed
            .get_or_insert_with(|| !(0..count).any(|index| health.in_rotation(index)));
        let tried = &self.tried;
        let eligible = |index: usize| {
            !tried.contains(&index)
                && if relaxed {
                    health.passes_checks(index)
                } else {
                    health.in_rotation(index)
                }
        };
        self.current = upstream.choose(self.affinity, &mut self.start, eligible);
        self.current
    }
}
