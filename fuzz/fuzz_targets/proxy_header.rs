//! The PROXY v1/v2 header reader on a real loopback connection (it peeks,
//! so it takes a `TcpStream`), the client's bytes written in arbitrary
//! pieces. Against the spec (haproxy's proxy-protocol.txt) written out:
//!
//! - the header is consumed exactly: after a header is taken, the bytes
//!   left on the connection are the input after the header's end (v1: the
//!   first LF; v2: 16 bytes plus the length in bytes 15-16);
//! - the client address returned is the one the header names: v1's
//!   source field and port, v2's source address and port for TCP/UDP over
//!   IPv4 (family 0x1) or IPv6 (0x2), none for LOCAL or UNSPEC;
//! - input that is neither `PROXY ` nor the v2 signature is refused.
//!
//! Input: a cut byte (see `cuts`), then the bytes the client sends.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wsgate::fuzzing::{ProxyHeaderError, read_proxy_header};
use wsgate_fuzz::{cuts, runtime};

const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// Where the header ends, as the spec frames it; `None` if the input is
/// not long enough to tell.
fn header_end(data: &[u8]) -> Option<usize> {
    if data.starts_with(V2_SIGNATURE) {
        let len = data.get(14..16)?;
        Some(16 + usize::from(u16::from_be_bytes([len[0], len[1]])))
    } else {
        data.iter().position(|&b| b == b'\n').map(|lf| lf + 1)
    }
}

/// The client a v1 line names: `PROXY TCP4|TCP6 src dst sport dport`.
fn v1_client(line: &[u8]) -> Option<SocketAddr> {
    let text = std::str::from_utf8(line).ok()?.strip_suffix("\r\n")?;
    let words: Vec<&str> = text.split(' ').collect();
    match words.as_slice() {
        ["PROXY", "TCP4" | "TCP6", source, _, port, _] => {
            Some(SocketAddr::new(source.parse().ok()?, port.parse().ok()?))
        }
        _ => None,
    }
}

/// The client a v2 header names, from the fixed offsets of its address block.
fn v2_client(header: &[u8]) -> Option<SocketAddr> {
    if header[12] & 0x0F == 0 {
        return None; // LOCAL
    }
    let block = &header[16..];
    let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
    match header[13] >> 4 {
        0x1 => {
            let ip = Ipv4Addr::new(block[0], block[1], block[2], block[3]);
            Some(SocketAddr::new(IpAddr::V4(ip), port(8)))
        }
        0x2 => {
            let octets: [u8; 16] = block[..16].try_into().ok()?;
            Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(octets)),
                port(32),
            ))
        }
        _ => None,
    }
}

fn listener() -> &'static std::net::TcpListener {
    static LISTENER: OnceLock<std::net::TcpListener> = OnceLock::new();
    LISTENER.get_or_init(|| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        listener
    })
}

fuzz_target!(|input: &[u8]| {
    let [cut, data @ ..] = input else {
        return;
    };
    let (result, left) = runtime().block_on(async {
        let listener = TcpListener::from_std(listener().try_clone().expect("clone the listener"))
            .expect("register the listener");
        let addr = listener.local_addr().expect("listener address");
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let mut client = client.expect("connect over loopback");
        let (mut server, _) = server.expect("accept over loopback");
        client.set_nodelay(true).expect("nodelay");
        let pieces = cuts(*cut, data.len());
        let writing = async move {
            let mut at = 0;
            for piece in pieces {
                // Nothing to do if the reader refused and closed early.
                if client.write_all(&data[at..at + piece]).await.is_err() {
                    return;
                }
                at += piece;
                // Gives the reader a turn, so it meets the pieces one by one.
                tokio::task::yield_now().await;
            }
            let _ = client.shutdown().await;
        };
        let reading = async {
            let result = read_proxy_header(&mut server, Duration::from_secs(10)).await;
            let mut left = Vec::new();
            if result.is_ok() {
                server
                    .read_to_end(&mut left)
                    .await
                    .expect("read what follows the header");
            }
            // Closing with a reset leaves no TIME_WAIT socket behind: a
            // long run makes more connections than there are ports.
            let _ = server.set_zero_linger();
            drop(server);
            (result, left)
        };
        let ((), outcome) = tokio::join!(writing, reading);
        outcome
    });

    match result {
        Ok(client) => {
            let end = header_end(data).expect("a header was taken, so the input frames one");
            assert_eq!(
                left,
                &data[end..],
                "the header was not consumed exactly ({end} bytes)"
            );
            let header = &data[..end];
            let expected = if header.starts_with(V2_SIGNATURE) {
                v2_client(header)
            } else {
                v1_client(header)
            };
            if header.starts_with(b"PROXY UNKNOWN") {
                assert_eq!(client, None, "UNKNOWN names no client");
            } else {
                assert_eq!(
                    client,
                    expected,
                    "client address of {:?}",
                    String::from_utf8_lossy(header)
                );
            }
        }
        Err(ProxyHeaderError::Timeout(_)) => {
            panic!("timed out though the client wrote everything and closed")
        }
        Err(ProxyHeaderError::NotProxy) => {
            assert!(
                !data.starts_with(b"PROXY ") && !data.starts_with(V2_SIGNATURE),
                "a header with the right start was called not PROXY"
            );
        }
        Err(_) => {}
    }
});
