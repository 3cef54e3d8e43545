//! The two sides of a tunnel as concrete stream types.
//!
//! hyper hands over an upgraded connection as `Upgraded`: a boxed, type-erased
//! stream behind two layers of read-buffer conversion that forget a buffer was
//! already initialised — so tokio-rustls zero-fills 16 KiB on every read. The
//! tunnel instead downcasts to the client connection type it knows, keeping
//! the bytes hyper had read past the HTTP head in front of them, and splices
//! that directly. Upgrades served without hyper
//! ([`crate::upgrade::serve_direct`]) have their streams already.

use bytes::{Bytes, BytesMut};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::head::Prefixed;
use crate::upstream::UpstreamStream;

/// Implements `AsyncRead` and `AsyncWrite` for an enum whose variants each
/// hold one stream, by delegating to the variant's stream.
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
    };
}
pub(crate) use delegate_async_io;

/// A client connection as accepted: plain TCP, or a TLS session boxed once
/// (over a KiB) so the futures it passes through stay small.
pub enum ClientConn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

delegate_async_io!(ClientConn { Plain, Tls });

impl crate::tunnel::HoldForFin for ClientConn {
    fn poll_write_held(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ClientConn::Plain(tcp) => crate::tunnel::tcp_write_held(tcp, cx, buf),
            // The session's close_notify is written between the two anyway.
            ClientConn::Tls(tls) => {
                tokio::io::AsyncWrite::poll_write(std::pin::Pin::new(tls), cx, buf)
            }
        }
    }
}

/// The upstream side of a tunnel: the connection the upgrade was sent on,
/// with whatever the backend sent behind its 101 in front.
pub type UpstreamIo = Prefixed<UpstreamStream>;

/// The client connection hyper hands back after an upgrade, with the bytes
/// hyper had read past the head in front. hyper only ever serves
/// `Prefixed<ClientConn>` here, so the downcast fails only if its internals
/// change; that connection is then dropped.
pub fn client_from_upgraded(upgraded: Upgraded) -> Option<Prefixed<ClientConn>> {
    match upgraded.downcast::<TokioIo<Prefixed<ClientConn>>>() {
        Ok(parts) => Some(parts.io.into_inner().with_more_in_front(parts.read_buf)),
        Err(_) => {
            tracing::warn!("upgraded client stream is not the type wsgate serves; closing it");
            None
        }
    }
}

impl<S> Prefixed<S> {
    /// Puts `earlier` in front of what is still unread: hyper read those bytes
    /// (from this stream) before the upgrade, so they come first.
    pub fn with_more_in_front(self, earlier: Bytes) -> Prefixed<S> {
        let (rest, inner) = self.into_parts();
        let prefix = match (earlier.is_empty(), rest.is_empty()) {
            (_, true) => earlier,
            (true, false) => rest,
            (false, false) => {
                let mut joined = BytesMut::with_capacity(earlier.len() + rest.len());
                joined.extend_from_slice(&earlier);
                joined.extend_from_slice(&rest);
                joined.freeze()
            }
        };
        Prefixed::new(prefix, inner)
    }
}
