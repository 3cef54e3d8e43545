//! Reading a connection's first request head before anyone parses it.
//!
//! hyper answers a head larger than its read buffer with a bare 431 of its
//! own, without our `wsgate-reason` or body; reading the first head ourselves
//! lets us refuse it properly, enforces `header_timeout` on it exactly, and
//! lets a WebSocket upgrade be served from these bytes without hyper
//! ([`crate::wire`]). Otherwise they are replayed to hyper through
//! [`Prefixed`]. Later requests on a keep-alive connection are bounded by
//! hyper's buffer and the proxy's own head-size check.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

pub enum FirstHead {
    /// Everything read so far: the head and possibly the start of a body.
    Complete(Bytes),
    TooLarge,
    /// The client closed (or reset) before finishing the head.
    Closed,
    TimedOut,
}

/// Reads until the blank line that ends the head, at most `limit` bytes of head.
pub async fn read_first_head<S: AsyncRead + Unpin>(
    io: &mut S,
    limit: usize,
    timeout: Duration,
) -> FirstHead {
    let reading = async {
        let mut buffer = BytesMut::with_capacity(2048);
        let mut scanned: usize = 0;
        loop {
            if buffer.len() > limit + 4 {
                return FirstHead::TooLarge;
            }
            match io.read_buf(&mut buffer).await {
                Ok(0) | Err(_) => return FirstHead::Closed,
                Ok(_) => {}
            }
            if let Some(end) = crate::wire::blank_line_end(&buffer, scanned) {
                return if end > limit {
                    FirstHead::TooLarge
                } else {
                    FirstHead::Complete(buffer.freeze())
                };
            }
            scanned = buffer.len();
        }
    };
    tokio::time::timeout(timeout, reading)
        .await
        .unwrap_or(FirstHead::TimedOut)
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

impl<S: crate::tunnel::HoldForFin + Unpin> crate::tunnel::HoldForFin for Prefixed<S> {
    fn poll_write_held(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_held(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn head_split_across_reads_is_found_and_replayed() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for part in [&b"GET / HTTP/1.1\r\nHost: a\r"[..], b"\n\r", b"\nBODY"] {
                client.write_all(part).await.unwrap();
            }
            client
        });
        let FirstHead::Complete(bytes) =
            read_first_head(&mut server, 1024, Duration::from_secs(5)).await
        else {
            panic!("head not found");
        };
        let _client = writer.await.unwrap();
        let mut replay = Prefixed::new(bytes, server);
        let mut text = vec![0u8; 29];
        replay.read_exact(&mut text).await.unwrap();
        assert_eq!(&text, b"GET / HTTP/1.1\r\nHost: a\r\n\r\nBO");
    }

    #[tokio::test]
    async fn bare_lf_head_is_found() {
        let (mut client, mut server) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        client
            .write_all(b"GET / HTTP/1.1\nHost: a\n\n")
            .await
            .unwrap();
        let FirstHead::Complete(bytes) =
            read_first_head(&mut server, 1024, Duration::from_secs(5)).await
        else {
            panic!("bare-LF head not found");
        };
        assert_eq!(&bytes[..], b"GET / HTTP/1.1\nHost: a\n\n");
    }

    #[tokio::test]
    async fn oversized_head_is_refused() {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        use tokio::io::AsyncWriteExt;
        client
            .write_all(format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(3000)).as_bytes())
            .await
            .unwrap();
        assert!(matches!(
            read_first_head(&mut server, 2048, Duration::from_secs(5)).await,
            FirstHead::TooLarge
        ));
    }

    #[tokio::test]
    async fn silence_times_out() {
        let (_client, mut server) = tokio::io::duplex(64);
        assert!(matches!(
            read_first_head(&mut server, 2048, Duration::from_millis(50)).await,
            FirstHead::TimedOut
        ));
    }
}
