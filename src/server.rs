//! Listeners, the accept loop, TLS handshakes with a timeout, the connection
//! limit, config reloads and graceful shutdown.
//!
//! Shutdown has to track tunnels itself: a WebSocket is either its
//! connection's own task (an upgrade as the first request) or a task spawned
//! when hyper's connection future ended at the upgrade, and hyper's graceful
//! shutdown sees neither. Every connection and tunnel task lives in one
//! [`TaskTracker`]; on shutdown we stop accepting, let hyper finish in-flight
//! requests, give tunnels `drain_timeout` to end by themselves, then cancel
//! `drain` to cut the rest.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::error::Rejection;
use crate::head::{self, FirstHead, Prefixed};
use crate::metrics::Metrics;
use crate::proxy::{self, Connection};
use crate::state::State;
use crate::upgrade::Tunnel;
use crate::upgrade_request::UpgradeRequest;
use crate::upgraded::ClientConn;
use crate::wire;

/// Holds one unit of `max_connections` until dropped.
pub(crate) struct ConnectionSlot(Arc<AtomicUsize>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Applies new configs to a running proxy (SIGHUP, or tests).
#[derive(Clone)]
pub struct Reloader {
    state: Arc<watch::Sender<Arc<State>>>,
    metrics: Arc<Metrics>,
    listener_addrs: Arc<Vec<SocketAddr>>,
    config_listeners: Arc<Mutex<Vec<(SocketAddr, bool)>>>,
}

impl Reloader {
    /// Swaps in `config` for new connections; established ones keep theirs.
    /// Listener addresses cannot change while running: that needs a restart.
    pub fn apply(&self, config: &Config) -> Result<(), String> {
        let wanted: Vec<(SocketAddr, bool)> = config
            .listeners
            .iter()
            .map(|l| (l.addr, l.tls.is_some()))
            .collect();
        let current = self
            .config_listeners
            .lock()
            .map_err(|_| "reload state poisoned")?
            .clone();
        if wanted != current {
            return Err(
                "listener addresses or TLS on/off changed; restart wsgate to apply that".to_owned(),
            );
        }
        let state = State::build(config, &self.metrics)?;
        self.state.send_replace(Arc::new(state));
        tracing::info!(listeners = ?self.listener_addrs, "configuration reloaded");
        Ok(())
    }
}

/// A bound, not yet serving proxy. Binding first lets callers (and tests)
/// learn the real addresses of port-0 listeners before traffic starts.
pub struct Proxy {
    listeners: Vec<(usize, TcpListener)>,
    admin: Option<TcpListener>,
    state: Arc<watch::Sender<Arc<State>>>,
    metrics: Arc<Metrics>,
    reloader: Reloader,
}

impl Proxy {
    pub async fn bind(config: &Config) -> anyhow::Result<Proxy> {
        raise_open_file_limit();
        let metrics = Metrics::new();
        let state = State::build(config, &metrics).map_err(anyhow::Error::msg)?;
        let mut listeners = Vec::new();
        for (index, listener) in config.listeners.iter().enumerate() {
            let bound = listen(listener.addr).map_err(|error| {
                anyhow::anyhow!(
                    "cannot listen on {} (listener[{index}]): {error}",
                    listener.addr
                )
            })?;
            listeners.push((index, bound));
        }
        let admin = match config.admin {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|error| {
                anyhow::anyhow!("cannot listen on {addr} (admin.addr): {error}")
            })?),
            None => None,
        };
        let state = Arc::new(watch::Sender::new(Arc::new(state)));
        let listener_addrs = Arc::new(
            listeners
                .iter()
                .filter_map(|(_, l)| l.local_addr().ok())
                .collect(),
        );
        let reloader = Reloader {
            state: state.clone(),
            metrics: metrics.clone(),
            listener_addrs,
            config_listeners: Arc::new(Mutex::new(
                config
                    .listeners
                    .iter()
                    .map(|l| (l.addr, l.tls.is_some()))
                    .collect(),
            )),
        };
        Ok(Proxy {
            listeners,
            admin,
            state,
            metrics,
            reloader,
        })
    }

    /// Actual listener addresses, in config order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|(_, listener)| listener.local_addr().ok())
            .collect()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
            .as_ref()
            .and_then(|listener| listener.local_addr().ok())
    }

    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// Serves until `shutdown` completes, then drains.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let stop_accepting = CancellationToken::new();
        let drain = CancellationToken::new();
        let tracker = TaskTracker::new();
        let open_connections = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(true));

        let mut accept_loops = Vec::new();
        for (index, listener) in self.listeners {
            let context = AcceptContext {
                listener_index: index,
                state: self.state.subscribe(),
                tracker: tracker.clone(),
                stop_accepting: stop_accepting.clone(),
                drain: drain.clone(),
                open_connections: open_connections.clone(),
            };
            accept_loops.push(tokio::spawn(accept_loop(listener, context)));
        }
        let stopped = CancellationToken::new();
        let _stop_admin = stopped.clone().drop_guard();
        let _tick =
            tokio_util::task::AbortOnDropHandle::new(tokio::spawn(keep_timer_wakeups_near()));
        if let Some(admin) = self.admin {
            tokio::spawn(crate::admin::serve(
                admin,
                self.metrics.clone(),
                ready.clone(),
                stopped,
            ));
        }

        shutdown.await;
        ready.store(false, Ordering::Release);
        let drain_timeout = self.state.borrow().server.drain_timeout;
        tracing::info!(
            ?drain_timeout,
            "shutting down: no new connections, draining"
        );
        stop_accepting.cancel();
        for accept_loop in accept_loops {
            let _ = accept_loop.await;
        }
        tracker.close();
        if tokio::time::timeout(drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            tracing::info!(
                remaining = tracker.len(),
                "drain timeout reached; closing the remaining connections"
            );
            drain.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// tokio's timer driver interrupts its own `epoll_wait` (an eventfd write,
/// then an extra turn of the loop) whenever a timer is armed earlier than the
/// wake-up it planned when it last parked. With nothing due soon, that is
/// every new connection's first timeout: two extra syscalls per handshake. A
/// one-second tick keeps the planned wake-up at most a second away, so
/// arming the per-connection timeouts, all a second or longer, never does.
async fn keep_timer_wakeups_near() {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// Binds with a deep accept backlog: a burst of handshakes (a fleet of
/// clients reconnecting after a deploy) must queue, not be refused, and std's
/// default of 128 is shallower than nginx's 511.
///
/// `TCP_NODELAY` is set here once: Linux copies it to every accepted socket,
/// which saves a `setsockopt` per connection (see [`accepted_nodelay`]).
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// A tunnel relays small WebSocket frames as they come; Nagle's algorithm
/// would hold each behind the previous one's ACK. On Linux the accepted
/// socket already has the listener's `TCP_NODELAY`; elsewhere it is set.
fn accepted_nodelay(tcp: &TcpStream) {
    if !cfg!(target_os = "linux") {
        let _ = tcp.set_nodelay(true);
    }
}

/// A proxy holds two sockets per tunnel; the default soft limit of 1024 would
/// cap it at ~500 WebSockets.
fn raise_open_file_limit() {
    if let Ok((soft, hard)) = rlimit::Resource::NOFILE.get() {
        if soft < hard && rlimit::Resource::NOFILE.set(hard, hard).is_err() {
            tracing::warn!(soft, hard, "could not raise the open-file limit");
        }
    }
}

struct AcceptContext {
    listener_index: usize,
    state: watch::Receiver<Arc<State>>,
    tracker: TaskTracker,
    stop_accepting: CancellationToken,
    drain: CancellationToken,
    open_connections: Arc<AtomicUsize>,
}

async fn accept_loop(listener: TcpListener, context: AcceptContext) {
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
                let count = context.open_connections.fetch_add(1, Ordering::AcqRel) + 1;
                let slot = ConnectionSlot(context.open_connections.clone());
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
    drain: CancellationToken,
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
        let io = match acceptor {
            None => ClientConn::Plain(self.tcp),
            Some(acceptor) => {
                let tls = tls_handshake(&acceptor, self.tcp, peer, &self.state).await?;
                ClientConn::Tls(Box::new(tls))
            }
        };
        let connection = Connection {
            peer,
            tls: matches!(io, ClientConn::Tls(_)),
            state: self.state,
            tunnels: self.tracker,
            drain: self.drain,
            _slot: self.slot,
        };
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
        match crate::proxy_protocol::read_proxy_header(
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
        report_unrouted(&self.state, self.peer, &rejection);
        match acceptor {
            None => wire::write_rejection(&mut self.tcp, rejection).await,
            Some(acceptor) if self.over_limit_by <= TLS_REFUSALS_BEYOND_LIMIT => {
                if let Some(mut tls) =
                    tls_handshake(&acceptor, self.tcp, self.peer, &self.state).await
                {
                    wire::write_rejection(&mut tls, rejection).await;
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
    state: &State,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let handshake_timeout = state.server.tls_handshake_timeout;
    match Box::pin(tokio::time::timeout(
        handshake_timeout,
        acceptor.accept(tcp),
    ))
    .await
    {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, ?handshake_timeout, "TLS handshake timed out");
            None
        }
    }
}

/// Logs and counts a refusal of a connection before any request was parsed
/// (no route, no client IP beyond the peer), under route "-".
fn report_unrouted(state: &State, peer: SocketAddr, rejection: &Rejection) {
    tracing::info!(
        %peer,
        status = rejection.status().as_u16(),
        reason = rejection.reason(),
        detail = %rejection.detail(),
        "request rejected"
    );
    state.unrouted_metrics.rejection(rejection.reason());
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
    let first_head = match head::read_first_head(
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
            report_unrouted(&connection.state, peer, &rejection);
            wire::write_rejection(&mut io, rejection).await;
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
        return crate::upgrade::serve_direct(io, upgrade, connection).await;
    }
    // Boxed: hyper's connection future is several KiB, and inline it would
    // enlarge the serving future of every connection, upgrades included.
    // Only hyper's service shares the connection, so only it gets an `Arc`.
    Box::pin(serve_with_hyper(
        Prefixed::new(first_head, io),
        Arc::new(connection),
        stop_accepting,
    ))
    .await;
    None
}

/// Serves requests with hyper until the connection ends: plain HTTP, and
/// upgrades that follow other requests on a keep-alive connection.
async fn serve_with_hyper(
    io: Prefixed<ClientConn>,
    connection: Arc<Connection>,
    stop_accepting: CancellationToken,
) {
    let server = &connection.state.server;
    let peer = connection.peer;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_timeout)
        // hyper refuses a head larger than its buffer with a bare 431 (no
        // reason). The first head of a connection is read by `head.rs`; for
        // later keep-alive heads, a buffer well above the limit lets the
        // proxy's own check answer instead. The buffer grows only as bytes
        // arrive, so the cap costs nothing for ordinary requests.
        .max_buf_size((server.max_header_bytes * 4).max(64 * 1024))
        .max_headers(512)
        .preserve_header_case(true)
        .keep_alive(true);
    let for_service = connection.clone();
    let service = service_fn(move |request| proxy::handle(request, for_service.clone()));
    let serving = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(serving);
    let result = tokio::select! {
        result = serving.as_mut() => result,
        _ = stop_accepting.cancelled() => {
            serving.as_mut().graceful_shutdown();
            serving.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "client connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_have_nagle_off() -> anyhow::Result<()> {
        let listener = listen("127.0.0.1:0".parse()?)?;
        let _client = TcpStream::connect(listener.local_addr()?).await?;
        let (accepted, _) = listener.accept().await?;
        accepted_nodelay(&accepted);
        assert!(accepted.nodelay()?);
        Ok(())
    }
}
