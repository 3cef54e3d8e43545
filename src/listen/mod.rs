//! Listeners, the accept loop, TLS handshakes with a timeout, the connection
//! limit, config reloads and graceful shutdown.
//!
//! Shutdown has to track tunnels itself: a WebSocket is either its
//! connection's own task (an upgrade as the first request) or a task spawned
//! when hyper's connection future ended at the upgrade, and hyper's graceful
//! shutdown sees neither. Every connection and tunnel task lives in one
//! [`TaskTracker`]. On shutdown `/readyz` fails at once, listeners keep
//! accepting for `drain_delay` (a load balancer needs a moment to notice),
//! then stop; hyper finishes in-flight requests, and every tunnel gets its
//! Close at its moment in `drain_spread` and is cut at `drain_timeout` if
//! its closing handshake has not ended. The process exits when the last
//! task has.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod accept;
pub(crate) mod first_head;
pub(crate) mod proxy_header;

use crate::config::Config;
use crate::drain::Drain;
use crate::metrics::Metrics;
use crate::state::{BuildError, State};
use accept::{AcceptContext, accept_loop};

/// Why [`Reloader::apply`] refused a config; the running one keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("listener addresses or TLS on/off changed; restart wsgate to apply that")]
    ListenersChanged,
    #[error("cannot build the new configuration: {source}")]
    Build {
        #[from]
        source: BuildError,
    },
    #[error("reload state poisoned")]
    Poisoned,
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
    pub fn apply(&self, config: &Config) -> Result<(), ReloadError> {
        let wanted: Vec<(SocketAddr, bool)> = config
            .listeners
            .iter()
            .map(|l| (l.addr, l.tls.is_some()))
            .collect();
        let current = self
            .config_listeners
            .lock()
            .map_err(|_| ReloadError::Poisoned)?
            .clone();
        if wanted != current {
            return Err(ReloadError::ListenersChanged);
        }
        let state = State::build(config, &self.metrics)?;
        self.state.send_replace(Arc::new(state));
        tracing::info!(listeners = ?self.listener_addrs, "configuration reloaded");
        Ok(())
    }

    /// Reads the config at `path` and applies it (SIGHUP), counting the
    /// result in `wsgate_reloads_total`. Every problem is in the error, on
    /// one line.
    pub fn reload_from(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let outcome = Config::load(path)
            .map_err(|errors| {
                let problems: Vec<String> =
                    errors.problems.iter().map(ToString::to_string).collect();
                anyhow::anyhow!(problems.join("; "))
            })
            .and_then(|config| Ok(self.apply(&config)?));
        self.metrics.reload(outcome.is_ok());
        outcome
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
        let drain = Arc::new(Drain::new());
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
        let server = self.state.borrow().server.clone();
        if !server.drain_delay.is_zero() {
            tracing::info!(
                drain_delay = ?server.drain_delay,
                "shutting down: /readyz fails, still accepting for drain_delay"
            );
            tokio::time::sleep(server.drain_delay).await;
        }
        stop_accepting.cancel();
        for accept_loop in accept_loops {
            let _ = accept_loop.await;
        }
        tracing::info!(
            drain_timeout = ?server.drain_timeout,
            drain_spread = ?server.drain_spread,
            close_code = server.drain_close_code,
            "shutting down: no new connections, closing tunnels"
        );
        drain.begin(
            server.drain_spread,
            server.drain_timeout,
            server.drain_close_code,
        );
        tracker.close();
        // Tunnels cut themselves at drain_timeout; the margin is for the
        // tasks that notice it last.
        let patience = server.drain_timeout + Duration::from_secs(1);
        if tokio::time::timeout(patience, tracker.wait())
            .await
            .is_err()
        {
            tracing::info!(
                remaining = tracker.len(),
                "drain timeout reached; closing the remaining connections"
            );
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

/// A proxy holds two sockets per tunnel; the default soft limit of 1024 would
/// cap it at ~500 WebSockets.
fn raise_open_file_limit() {
    if let Ok((soft, hard)) = rlimit::Resource::NOFILE.get() {
        if soft < hard && rlimit::Resource::NOFILE.set(hard, hard).is_err() {
            tracing::warn!(soft, hard, "could not raise the open-file limit");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_have_nagle_off() -> anyhow::Result<()> {
        let listener = listen("127.0.0.1:0".parse()?)?;
        let _client = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
        let (accepted, _) = listener.accept().await?;
        accept::accepted_nodelay(&accepted);
        assert!(accepted.nodelay()?);
        Ok(())
    }
}
