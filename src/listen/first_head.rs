//! Reading a connection's first request head before anyone parses it.
//!
//! hyper answers a head larger than its read buffer with a bare 431 of its
//! own, without our `wsgate-reason` or body; reading the first head ourselves
//! lets us refuse it properly, enforces `header_timeout` on it exactly, and
//! lets a WebSocket upgrade be served from these bytes without hyper
//! ([`crate::wire`]). Otherwise they are replayed to hyper through
//! [`crate::stream::Prefixed`]. Later requests on a keep-alive connection are bounded by
//! hyper's buffer and the proxy's own head-size check.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::Prefixed;

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
