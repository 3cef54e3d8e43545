//! The accept loop and a connection's life up to its first request: the
//! connection limit, the PROXY header, the TLS handshake, the first head —
//! then a first-request upgrade to [`crate::ws::upgrade`], anything else to
//! [`crate::http`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::first_head::{self, FirstHead};
use crate::admit::{self, ClientProtocol, Connection, ConnectionSlot};
use crate::drain::Drain;
use crate::error::Rejection;
use crate::state::State;
use crate::stream::{ClientConn, Prefixed};
use crate::wire;
use crate::wire::request::UpgradeRequest;
use crate::ws::upgrade::Tunnel;

pub(super) struct AcceptContext {
    pub listener_index: usize,
    pub state: watch::Receiver<Arc<State>>,
    pub tracker: TaskTracker,
    pub stop_accepting: CancellationToken,
    pub drain: Arc<Drain>,
    pub open_connections: Arc<AtomicUsize>,
}

pub(super) async fn accept_loop(listener: TcpListener, context: AcceptContext) {
    let local = listener.local_addr().ok();
    // One waiter for the loop's life: a fresh one per accept would lock and
    // relink the token's waiter list twice per connection.
    let stopped = context.stop_accepting.cancelled();
    tokio::pin!(stopped);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut stopped => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let state = context.state.borrow().clone();
                let (slot, count) = ConnectionSlot::take(&context.open_connections);
                let connection = ConnectionTask {
                    tcp,
                    peer,
                    over_limit_by: count.saturating_sub(state.server.max_connections),
                    state,
                    slot,
                    listener_index: context.listener_index,
                    tracker: context.tracker.clone(),
                    stop_accepting: context.stop_accepting.clone(),
                    drain: context.drain.clone(),
                };
                context.tracker.spawn(connection.run());
            }
            Err(error) => handle_accept_error(error, local).await,
        }
    }
}

/// Per-connection failures (a client that reset before we accepted) are
/// nobody's problem; running out of descriptors or memory is, and spinning
/// on it would burn a core, so back off.
async fn handle_accept_error(error: io::Error, local: Option<SocketAddr>) {
    let resource_exhausted = matches!(
        error.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    );
    if resource_exhausted {
        tracing::error!(?local, %error, "accept failed: out of resources; backing off 100ms");
        tokio::time::sleep(Duration::from_millis(100)).await;
    } else {
        tracing::debug!(?local, %error, "accept failed for one connection");
    }
}

struct ConnectionTask {
    tcp: TcpStream,
    peer: SocketAddr,
    state: Arc<State>,
    slot: ConnectionSlot,
    /// How many connections past `max_connections` this one is; 0 within it.
    over_limit_by: usize,
    listener_index: usize,
    tracker: TaskTracker,
    stop_accepting: CancellationToken,
    drain: Arc<Drain>,
}

impl ConnectionTask {
    /// The task's future. Everything before a tunnel is boxed and freed when
    /// it ends, so a connection that became a WebSocket keeps, for the
    /// tunnel's whole life, only the tunnel's own small state. The tunnel is
    /// boxed too: inline, it would make the task's future (which tokio moves
    /// into the task and overwrites when it ends) most of a KiB for every
    /// connection, a tunnel or not.
    fn run(self) -> impl Future<Output = ()> + Send + 'static {
        let serving = Box::pin(self.serve());
        async move {
            if let Some(tunnel) = serving.await {
                Box::pin(tunnel.run()).await;
            }
        }
    }

    async fn serve(mut self) -> Option<Tunnel> {
        accepted_nodelay(&self.tcp);
        let acceptor = self
            .state
            .listener_tls
            .get(self.listener_index)
            .cloned()
            .flatten();
        if self.over_limit_by > 0 {
            // Rare paths are boxed so they do not enlarge the serving future
            // that every connection allocates.
            Box::pin(self.refuse_overloaded(acceptor)).await;
            return None;
        }
        if self
            .state
            .listener_proxy_protocol
            .get(self.listener_index)
            .copied()
            .unwrap_or(false)
        {
            match Box::pin(self.read_proxy_header()).await {
                Some(client) => self.peer = client,
                None => return None,
            }
        }
        let peer = self.peer;
        let mut h2 = false;
        let io = match acceptor {
            None => ClientConn::Plain(self.tcp),
            Some(acceptor) => {
                let listener = self.listener_index;
                let tls = tls_handshake(&acceptor, self.tcp, peer, listener, &self.state).await?;
                h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                ClientConn::Tls(Box::new(tls))
            }
        };
        let connection = Connection {
            peer,
            tls: matches!(io, ClientConn::Tls(_)),
            protocol: if h2 {
                ClientProtocol::H2
            } else {
                ClientProtocol::Http1
            },
            state: self.state,
            tunnels: self.tracker,
            drain: self.drain,
            _slot: self.slot,
        };
        if h2 {
            // Boxed like hyper's HTTP/1.1 connection: only h2 clients pay
            // for its size.
            Box::pin(crate::http::h2::serve(
                io,
                Arc::new(connection),
                self.stop_accepting,
            ))
            .await;
            return None;
        }
        serve_http(io, connection, self.stop_accepting).await
    }

    /// The client address a PROXY header vouches for (the TCP peer for a
    /// LOCAL health check), or `None` when the connection must be closed: no
    /// valid header, or a sender we do not trust to speak for clients.
    async fn read_proxy_header(&mut self) -> Option<SocketAddr> {
        let peer = self.peer;
        if !crate::headers::is_trusted(peer.ip(), &self.state.server.trusted_proxies) {
            tracing::warn!(%peer, "PROXY header from a peer not in trusted_proxies; closing");
            return None;
        }
        match super::proxy_header::read_proxy_header(
            &mut self.tcp,
            self.state.server.header_timeout,
        )
        .await
        {
            Ok(Some(client)) => Some(client),
            Ok(None) => Some(peer),
            Err(error) => {
                tracing::warn!(%peer, %error, "invalid PROXY header; closing");
                None
            }
        }
    }

    /// A 503 `overloaded`, over TLS too: an operator reading the client's
    /// error should see why, as on plaintext. But a TLS refusal costs a full
    /// handshake, so past [`TLS_REFUSALS_BEYOND_LIMIT`] a flood is met by
    /// closing at accept, which spends nothing.
    async fn refuse_overloaded(mut self, acceptor: Option<TlsAcceptor>) {
        let rejection = Rejection::Overloaded;
        admit::report_unrouted(&self.state, self.peer, &rejection);
        match acceptor {
            None => wire::write_final_response(&mut self.tcp, &rejection.into_response()).await,
            Some(acceptor) if self.over_limit_by <= TLS_REFUSALS_BEYOND_LIMIT => {
                if let Some(mut tls) = tls_handshake(
                    &acceptor,
                    self.tcp,
                    self.peer,
                    self.listener_index,
                    &self.state,
                )
                .await
                {
                    wire::write_final_response(&mut tls, &rejection.into_response()).await;
                }
            }
            Some(_) => {}
        }
    }
}

/// How many connections past `max_connections` may be in a TLS handshake
/// just to be told 503: enough that clients arriving at a full proxy learn
/// why, few enough that a flood cannot buy much CPU with it.
const TLS_REFUSALS_BEYOND_LIMIT: usize = 64;

/// The server side of a TLS handshake, within `tls_handshake_timeout`; `None`
/// (logged) when it failed or timed out.
async fn tls_handshake(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    listener: usize,
    state: &State,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let handshake_timeout = state.server.tls_handshake_timeout;
    let label = || {
        state
            .listener_labels
            .get(listener)
            .cloned()
            .unwrap_or_default()
    };
    // Logged at info, as nginx does: a browser that does not trust the
    // certificate fails here and nowhere else.
    match Box::pin(tokio::time::timeout(
        handshake_timeout,
        acceptor.accept(tcp),
    ))
    .await
    {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(error)) => {
            tracing::info!(%peer, listener = %label(), %error, "TLS handshake failed");
            state.metrics.tls_handshake_failed(label());
            None
        }
        Err(_) => {
            tracing::info!(%peer, listener = %label(), ?handshake_timeout, "TLS handshake timed out");
            state.metrics.tls_handshake_failed(label());
            None
        }
    }
}

/// Serves one client connection: a WebSocket upgrade as its first request is
/// handled directly and becomes a [`Tunnel`]; anything else goes to hyper.
async fn serve_http(
    mut io: ClientConn,
    connection: Connection,
    stop_accepting: CancellationToken,
) -> Option<Tunnel> {
    let server = &connection.state.server;
    let peer = connection.peer;
    let first_head = match first_head::read_first_head(
        &mut io,
        server.max_header_bytes,
        server.header_timeout,
    )
    .await
    {
        FirstHead::Complete(bytes) => bytes,
        FirstHead::TooLarge => {
            let rejection = Rejection::HeaderTooLarge {
                limit: server.max_header_bytes,
            };
            admit::report_unrouted(&connection.state, peer, &rejection);
            wire::write_final_response(&mut io, &rejection.into_response()).await;
            return None;
        }
        FirstHead::TimedOut => {
            tracing::debug!(%peer, timeout = ?server.header_timeout, "no complete request head in time; closing");
            return None;
        }
        FirstHead::Closed => return None,
    };
    if let Some(upgrade) = UpgradeRequest::parse(&first_head) {
        // The request holds its own reference; this one need not live in
        // the serving future through the exchange.
        drop(first_head);
        return crate::ws::upgrade::serve_direct(io, upgrade, connection).await;
    }
    if let Some(detail) = wire::malformed::problem(&first_head) {
        let rejection = Rejection::BadRequest { detail };
        admit::report_unrouted(&connection.state, peer, &rejection);
        wire::write_final_response(&mut io, &rejection.into_response()).await;
        return None;
    }
    // Boxed: hyper's connection future is several KiB, and inline it would
    // enlarge the serving future of every connection, upgrades included.
    // Only hyper's service shares the connection, so only it gets an `Arc`.
    Box::pin(crate::http::serve(
        Prefixed::new(first_head, io),
        Arc::new(connection),
        stop_accepting,
    ))
    .await;
    None
}

/// A tunnel relays small WebSocket frames as they come; Nagle's algorithm
/// would hold each behind the previous one's ACK. On Linux the accepted
/// socket already has the listener's `TCP_NODELAY`; elsewhere it is set.
pub(super) fn accepted_nodelay(tcp: &TcpStream) {
    if !cfg!(target_os = "linux") {
        let _ = tcp.set_nodelay(true);
    }
}
