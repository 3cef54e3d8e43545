//! The two sides of a tunnel as concrete stream types.
//!
//! hyper hands over an upgraded connection as `Upgraded`: a boxed, type-erased
//! stream behind two layers of read-buffer conversion that forget a buffer was
//! already initialised — so tokio-rustls zero-fills 16 KiB on every read. The
//! tunnel instead downcasts to the client connection type it knows, keeping
//! the bytes hyper had read past the HTTP head in front of them, and splices
//! that directly. Upgrades served without hyper
//! ([`crate::upgrade::serve_direct`]) have their streams already.

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::head::Prefixed;
use crate::upstream::UpstreamStream;

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

        impl crate::tunnel::HoldForFin for $name {
            fn poll_write_held(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $($name::$variant(io) => crate::tunnel::HoldForFin::poll_write_held(std::pin::Pin::new(io), cx, buf),)+
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

/// The upstream side of a tunnel: the connection the upgrade was sent on,
/// with whatever the backend sent behind its 101 in front.
pub(crate) type UpstreamIo = Prefixed<UpstreamStream>;

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
