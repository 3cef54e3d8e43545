//! The connection types: the client connection as accepted, a stream with
//! bytes already read in front of it ([`Prefixed`]), and the writer
//! capability a tunnel's closing direction uses ([`HoldForFin`]).
//!
//! The two sides of a tunnel are concrete stream types.
//!
//! hyper hands over an upgraded connection as `Upgraded`: a boxed, type-erased
//! stream behind two layers of read-buffer conversion that forget a buffer was
//! already initialised — so tokio-rustls zero-fills 16 KiB on every read. The
//! tunnel instead downcasts to the client connection type it knows, keeping
//! the bytes hyper had read past the HTTP head in front of them, and splices
//! that directly. Upgrades served without hyper
//! ([`crate::ws::upgrade::serve_direct`]) have their streams already.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Implements `AsyncRead`, `AsyncWrite` and the tunnel's `HoldForFin` for an
/// enum whose variants each hold one stream, by delegating to the variant's
/// stream.
macro_rules! delegate_async_io {
    ($name:ident { $($variant:ident),+ $(,)? }) => {
        impl tokio::io::AsyncRead for $name {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $($name::$variant(io) => std::pin::Pin::new(io).poll_read(cx, buf),)+
                }
            }
        }

        impl tokio::io::AsyncWrite for $name {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $($name::$variant(io) => std::pin::Pin::new(io).poll_write(cx, buf),)+
                }
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $($name::$variant(io) => std::pin::Pin::new(io).poll_flush(cx),)+
                }
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $($name::$variant(io) => std::pin::Pin::new(io).poll_shutdown(cx),)+
                }
            }
        }

        impl crate::stream::HoldForFin for $name {
            fn poll_write_held(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $($name::$variant(io) => crate::stream::HoldForFin::poll_write_held(std::pin::Pin::new(io), cx, buf),)+
                }
            }

            fn drop_sends_fin(&self) -> bool {
                match self {
                    $($name::$variant(io) => crate::stream::HoldForFin::drop_sends_fin(io),)+
                }
            }
        }
    };
}
pub(crate) use delegate_async_io;

/// A client connection as accepted: plain TCP, or a TLS session boxed once
/// (over a KiB) so the futures it passes through stay small.
pub(crate) enum ClientConn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

delegate_async_io!(ClientConn { Plain, Tls });

/// The client connection hyper hands back after an upgrade, with the bytes
/// hyper had read past the head in front. hyper only ever serves
/// `Prefixed<ClientConn>` here, so the downcast fails only if its internals
/// change; that connection is then dropped.
pub(crate) fn client_from_upgraded(upgraded: Upgraded) -> Option<Prefixed<ClientConn>> {
    match upgraded.downcast::<TokioIo<Prefixed<ClientConn>>>() {
        Ok(parts) => Some(parts.io.into_inner().with_more_in_front(parts.read_buf)),
        Err(_) => {
            tracing::warn!("upgraded client stream is not the type wsgate serves; closing it");
            None
        }
    }
}

/// A stream that yields `prefix` before reading from `inner`.
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, inner: S) -> Prefixed<S> {
        // An empty `Bytes` can still hold its whole buffer alive (hyper's
        // read buffer, say): keep none for the life of a tunnel.
        let prefix = if prefix.is_empty() {
            Bytes::new()
        } else {
            prefix
        };
        Prefixed { prefix, inner }
    }

    /// Puts `earlier` in front of what is still unread: hyper read those bytes
    /// (from this stream) before the upgrade, so they come first.
    pub(crate) fn with_more_in_front(self, earlier: Bytes) -> Prefixed<S> {
        let (rest, inner) = (self.prefix, self.inner);
        let prefix = match (earlier.is_empty(), rest.is_empty()) {
            (_, true) => earlier,
            (true, false) => rest,
            (false, false) => {
                let mut joined = bytes::BytesMut::with_capacity(earlier.len() + rest.len());
                joined.extend_from_slice(&earlier);
                joined.extend_from_slice(&rest);
                joined.freeze()
            }
        };
        Prefixed::new(prefix, inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let count = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix[..count]);
        this.prefix.advance(count);
        if this.prefix.is_empty() {
            // Release the head buffer now, not when the connection ends.
            this.prefix = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: HoldForFin + Unpin> HoldForFin for Prefixed<S> {
    fn poll_write_held(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_held(cx, buf)
    }

    fn drop_sends_fin(&self) -> bool {
        self.inner.drop_sends_fin()
    }
}

/// A writer that can hold bytes for a FIN that follows at once, so both
/// leave in one segment. On loopback every segment costs the sender the
/// receiver's processing too, so a closing direction costs several µs less.
pub trait HoldForFin: AsyncWrite {
    /// Writes `buf`, to be followed by `poll_shutdown` without any other write.
    fn poll_write_held(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write(cx, buf)
    }

    /// Closing this stream sends the same FIN a shutdown would, so once a
    /// tunnel is over the shutdown's syscall can be spared. Not so for TLS
    /// (its close_notify comes with the shutdown) or an HTTP/2 stream
    /// (dropped, it is reset rather than ended).
    fn drop_sends_fin(&self) -> bool {
        false
    }
}

/// `MSG_MORE` keeps the bytes queued (despite `TCP_NODELAY`) until the
/// shutdown pushes them out with the FIN.
impl HoldForFin for tokio::net::TcpStream {
    fn poll_write_held(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let tcp = self.get_mut();
        let socket: &tokio::net::TcpStream = tcp;
        let held = socket.try_io(tokio::io::Interest::WRITABLE, || {
            socket2::SockRef::from(socket).send_with_flags(buf, libc::MSG_MORE | libc::MSG_NOSIGNAL)
        });
        match held {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                Pin::new(tcp).poll_write(cx, buf)
            }
            done => Poll::Ready(done),
        }
    }

    fn drop_sends_fin(&self) -> bool {
        true
    }
}

// An HTTP/2 stream's END_STREAM is a frame of its own.
impl HoldForFin for TokioIo<Upgraded> {}

// A TLS session writes its close_notify between the bytes and the FIN anyway.
impl<S: AsyncRead + AsyncWrite + Unpin> HoldForFin for tokio_rustls::server::TlsStream<S> {}
impl<S: AsyncRead + AsyncWrite + Unpin> HoldForFin for tokio_rustls::client::TlsStream<S> {}
impl<T: HoldForFin + Unpin + ?Sized> HoldForFin for Box<T> {
    fn poll_write_held(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut **self.get_mut()).poll_write_held(cx, buf)
    }

    fn drop_sends_fin(&self) -> bool {
        (**self).drop_sends_fin()
    }
}
