//! A connection to one backend server: the TCP connect that sends the
//! first bytes at once, and the stream type counted against its server.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::{Connected, Connection};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Counts one unit of load against its server until dropped: an upgrade's
/// connection, or a plain request waiting for its response. It holds the
/// counters, not the [`Upstream`](super::Upstream): a connection that
/// held its upstream would keep the pool it sits in alive, and with it every
/// generation's pools and health checks after a reload.
pub(super) struct Lease {
    active: Arc<[AtomicUsize]>,
    server: usize,
}

impl Lease {
    pub(super) fn take(active: &Arc<[AtomicUsize]>, server: usize) -> Lease {
        active[server].fetch_add(1, Ordering::Relaxed);
        Lease {
            active: active.clone(),
            server,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.active[self.server].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connects to `server` and sends `first` as soon as the kernel takes it. On
/// a fast path (loopback, a LAN) the TCP handshake is over by the time
/// `connect` returns, so the bytes leave at once, without a reactor round to
/// learn the socket is writable and the `SO_ERROR` check behind it. Returns
/// how many bytes of `first` were sent.
pub(super) async fn tcp_connect(server: &str, first: &[u8]) -> io::Result<(TcpStream, usize)> {
    use socket2::{Domain, Protocol, Socket, Type};

    let Ok(addr) = server.parse::<std::net::SocketAddr>() else {
        // A name: resolved, and tried address by address, by tokio.
        let tcp = TcpStream::connect(server).await?;
        tcp.set_nodelay(true)?;
        return Ok((tcp, 0));
    };
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    // Frames must not wait for Nagle: WebSocket traffic is small and latency-bound.
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(error) if error.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(error) => return Err(error),
    }
    // Still connecting is `WouldBlock`; a refused connect is its error.
    let sent = match first {
        [] => 0,
        bytes => match socket.send_with_flags(bytes, libc::MSG_NOSIGNAL) {
            Ok(sent) => sent,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => 0,
            Err(error) => return Err(error),
        },
    };
    let tcp = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    if sent == 0 {
        tcp.writable().await?;
        if let Some(error) = tcp.take_error()? {
            return Err(error);
        }
    }
    Ok((tcp, sent))
}

pub(super) enum StreamKind {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// A connection to one backend server, counted against it while it is load
/// (an upgrade's, for the tunnel's life; a pooled plain connection is not).
pub struct UpstreamStream {
    /// Declared first, so it is released before the socket closes: once the
    /// backend sees the connection end, wsgate no longer counts it.
    pub(super) _lease: Option<Lease>,
    pub(super) io: StreamKind,
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

crate::stream::delegate_async_io!(StreamKind { Plain, Tls });

impl crate::stream::HoldForFin for UpstreamStream {
    fn poll_write_held(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        crate::stream::HoldForFin::poll_write_held(Pin::new(&mut self.get_mut().io), cx, buf)
    }
}
