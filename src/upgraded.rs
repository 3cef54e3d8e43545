//! Getting our own sockets back out of hyper's upgrade.
//!
//! hyper hands over an upgraded connection as `Upgraded`: a boxed, type-erased
//! stream behind two layers of read-buffer conversion that forget a buffer was
//! already initialised — so tokio-rustls zero-fills 16 KiB on every read. The
//! tunnel instead downcasts to the concrete stream types it knows (plain or
//! TLS client, upstream connection), keeping the bytes hyper had read past the
//! HTTP head in front of them, and splices those directly.

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

type ClientTls = tokio_rustls::server::TlsStream<TcpStream>;

/// The client side of a tunnel.
pub enum ClientIo {
    Plain(Prefixed<TcpStream>),
    Tls(Box<Prefixed<ClientTls>>),
    /// A stream type this module does not know; spliced through hyper's wrapper.
    Other(TokioIo<Upgraded>),
}

delegate_async_io!(ClientIo { Plain, Tls, Other });

/// The upstream side of a tunnel.
pub enum UpstreamIo {
    Direct(Prefixed<UpstreamStream>),
    Other(TokioIo<Upgraded>),
}

delegate_async_io!(UpstreamIo { Direct, Other });

impl ClientIo {
    pub fn from_upgraded(upgraded: Upgraded) -> ClientIo {
        let upgraded = match upgraded.downcast::<TokioIo<Prefixed<TcpStream>>>() {
            Ok(parts) => {
                return ClientIo::Plain(parts.io.into_inner().with_more_in_front(parts.read_buf));
            }
            Err(upgraded) => upgraded,
        };
        match upgraded.downcast::<TokioIo<Prefixed<ClientTls>>>() {
            Ok(parts) => ClientIo::Tls(Box::new(
                parts.io.into_inner().with_more_in_front(parts.read_buf),
            )),
            Err(upgraded) => {
                tracing::debug!(
                    "client stream type not recognised; splicing through hyper's wrapper"
                );
                ClientIo::Other(TokioIo::new(upgraded))
            }
        }
    }
}

impl UpstreamIo {
    pub fn from_upgraded(upgraded: Upgraded) -> UpstreamIo {
        match upgraded.downcast::<TokioIo<UpstreamStream>>() {
            Ok(parts) => UpstreamIo::Direct(Prefixed::new(parts.read_buf, parts.io.into_inner())),
            Err(upgraded) => {
                tracing::debug!(
                    "upstream stream type not recognised; splicing through hyper's wrapper"
                );
                UpstreamIo::Other(TokioIo::new(upgraded))
            }
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
