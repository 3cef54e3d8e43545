//! Backend pools: server choice (round robin or least connections), connects
//! with a timeout (falling through to the next server, as nginx's
//! `proxy_next_upstream error timeout` does), optional verified TLS, and a
//! pooled HTTP/1.1 client for plain requests.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;

mod connect;
pub(crate) mod health;

pub use connect::UpstreamStream;
use connect::{Lease, StreamKind, tcp_connect};

use crate::config::{Balance, UpstreamConfig};
use crate::error::Rejection;

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
    /// Open connections per server, for `least_conn`.
    active: Arc<[AtomicUsize]>,
    /// Per server; only the health checker clears it. Without checks all stay true.
    healthy: Vec<AtomicBool>,
    tls: Option<TlsConnector>,
    http: Client<Connector, Incoming>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.config.name)
            .finish()
    }
}

/// The hyper client's connector: every request to this upstream goes through
/// [`Upstream::connect`], whatever its URI says.
#[derive(Clone)]
pub struct Connector {
    upstream: std::sync::Weak<Upstream>,
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = TokioIo<UpstreamStream>;
    type Error = ConnectError;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let upstream = self.upstream.upgrade();
        Box::pin(async move {
            match upstream {
                Some(upstream) => upstream.connect().await.map(TokioIo::new),
                None => Err(ConnectError::Unavailable {
                    upstream: String::new(),
                    server: String::new(),
                    source: io::Error::other("the upstream was removed by a reload"),
                }),
            }
        })
    }
}

impl Upstream {
    pub fn new(config: Arc<UpstreamConfig>) -> Result<Arc<Upstream>, crate::tls::TlsError> {
        let tls = match &config.tls {
            Some(tls) => Some(TlsConnector::from(crate::tls::upstream_client_config(
                &tls.extra_roots,
            )?)),
            None => None,
        };
        let upstream = Arc::new_cyclic(|weak| {
            let http = Client::builder(TokioExecutor::new())
                .pool_idle_timeout(std::time::Duration::from_secs(90))
                .pool_max_idle_per_host(64)
                // Without a timer hyper-util never reaps idle pooled
                // connections: they would outlive `pool_idle_timeout`.
                .pool_timer(TokioTimer::new())
                // Host must reach the backend exactly as the client sent it.
                .set_host(false)
                .http1_preserve_header_case(true)
                .build(Connector {
                    upstream: weak.clone(),
                });
            Upstream {
                active: config.servers.iter().map(|_| AtomicUsize::new(0)).collect(),
                healthy: config
                    .servers
                    .iter()
                    .map(|_| AtomicBool::new(true))
                    .collect(),
                config,
                next: AtomicUsize::new(0),
                tls,
                http,
            }
        });
        if let Some(check) = upstream.config.health_check.clone() {
            tokio::spawn(health::check_forever(Arc::downgrade(&upstream), check));
        }
        Ok(upstream)
    }

    /// Records a health check result; logs only transitions.
    pub(crate) fn set_healthy(&self, index: usize, healthy: bool) {
        let was = self.healthy[index].swap(healthy, Ordering::AcqRel);
        if was != healthy {
            let server = &self.config.servers[index];
            if healthy {
                tracing::info!(upstream = %self.config.name, %server, "server passed its health check again");
            } else {
                tracing::warn!(upstream = %self.config.name, %server, "server failed its health check; no new connections");
            }
        }
    }

    /// The pooled client for plain HTTP requests to this upstream.
    pub fn http_client(&self) -> &Client<Connector, Incoming> {
        &self.http
    }

    fn first_choice(&self) -> usize {
        // `max(1)`: config validation refuses an empty pool, but a zero here
        // must not divide; the connect loop then finds no server to try.
        let count = self.config.servers.len().max(1);
        let start = self.next.fetch_add(1, Ordering::Relaxed) % count;
        match self.config.balance {
            Balance::RoundRobin => start,
            // Scan from the round-robin position so ties spread out.
            // TODO(issue 14): Hash picks by key; until then, least_conn.
            Balance::LeastConn | Balance::Hash => (0..count)
                .map(|offset| (start + offset) % count)
                .filter(|&index| index < self.active.len())
                .min_by_key(|&index| self.active[index].load(Ordering::Relaxed))
                .unwrap_or(start),
        }
    }

    /// Connects to a server of the pool, trying each once from the balancer's
    /// choice; the last error is returned when all fail.
    pub async fn connect(self: &Arc<Self>) -> Result<UpstreamStream, ConnectError> {
        self.connect_sending(&[]).await.map(|(stream, _)| stream)
    }

    /// [`Upstream::connect`], sending `first` on a plaintext connection as
    /// soon as the kernel takes it; returns how many of its bytes were sent.
    pub async fn connect_sending(
        self: &Arc<Self>,
        first: &[u8],
    ) -> Result<(UpstreamStream, usize), ConnectError> {
        let count = self.config.servers.len();
        let start = self.first_choice();
        let mut last_error = None;
        for offset in 0..count {
            let index = (start + offset) % count;
            if !self.healthy[index].load(Ordering::Acquire) {
                continue;
            }
            match self.connect_to(index, first).await {
                Ok(connected) => return Ok(connected),
                Err(error) => {
                    tracing::warn!(upstream = %self.config.name, %error, "upstream connect failed");
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| ConnectError::Unavailable {
            upstream: self.config.name.clone(),
            server: "-".to_owned(),
            source: io::Error::other("no server passed its last health check"),
        }))
    }

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
        let stream = UpstreamStream {
            io,
            _lease: Lease::take(&self.active, index),
        };
        Ok((stream, sent))
    }
}
