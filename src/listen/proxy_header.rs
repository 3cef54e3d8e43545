//! The PROXY protocol (HAProxy, v1 text and v2 binary): a load balancer in
//! front of us opens each connection with a header naming the real client.
//!
//! The header is consumed exactly — never a byte of what follows — because the
//! TLS handshake or HTTP request that comes next must reach its parser intact.
//! `TcpStream::peek` shows what has arrived without taking it; only bytes known
//! to belong to the header are then read.

use std::net::SocketAddr;
use std::time::Duration;

use ppp::v2;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// v2 headers start with this 12-byte signature, v1 headers with `PROXY `.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version/command, family/protocol, and the 2-byte payload length.
const V2_FIXED_LEN: usize = 16;
/// The spec's limit for a v1 line, `\r\n` included.
const V1_MAX_LEN: usize = 107;

/// Why a connection's PROXY header was refused; the caller closes the connection.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no complete PROXY header arrived within {0:?}")]
    Timeout(Duration),
    #[error("the connection closed before a complete PROXY header arrived")]
    Closed,
    #[error("the connection does not start with a PROXY protocol header")]
    NotProxy,
    #[error("the PROXY v1 header is longer than {V1_MAX_LEN} bytes")]
    TooLong,
    #[error("invalid PROXY v1 header")]
    V1(#[source] ppp::v1::BinaryParseError),
    #[error("invalid PROXY v2 header")]
    V2(#[source] ppp::v2::ParseError),
    #[error("reading the PROXY header failed")]
    Io(#[source] std::io::Error),
}

/// Reads the PROXY v1 or v2 header that starts `stream` and returns the client
/// address it names: `None` for a v2 `LOCAL` command (a health check from the
/// balancer itself), v1 `UNKNOWN`, or a v2 header without an IP family — the
/// spec says to use the real peer address then. Bytes after the header are
/// left unread.
pub async fn read_proxy_header(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    tokio::time::timeout(timeout, read_header(stream))
        .await
        .unwrap_or(Err(ProxyHeaderError::Timeout(timeout)))
}

async fn read_header(stream: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut first = [0u8; 1];
    // `peek` waits until at least one byte is there, so no busy loop.
    if stream
        .peek(&mut first)
        .await
        .map_err(ProxyHeaderError::Io)?
        == 0
    {
        return Err(ProxyHeaderError::Closed);
    }
    match first[0] {
        b'\r' => read_v2(stream).await,
        b'P' => read_v1(stream).await,
        _ => Err(ProxyHeaderError::NotProxy),
    }
}

/// v2 announces its own length in the fixed part, so after those 16 bytes we
/// know exactly how many more belong to the header and can `read_exact` them.
async fn read_v2(stream: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut header = vec![0u8; V2_FIXED_LEN];
    read_exact(stream, &mut header).await?;
    if !header.starts_with(V2_SIGNATURE) {
        return Err(ProxyHeaderError::NotProxy);
    }
    let payload_len = usize::from(u16::from_be_bytes([header[14], header[15]]));
    header.resize(V2_FIXED_LEN + payload_len, 0);
    read_exact(stream, &mut header[V2_FIXED_LEN..]).await?;

    let parsed = v2::Header::try_from(header.as_slice()).map_err(ProxyHeaderError::V2)?;
    if parsed.command == v2::Command::Local {
        return Ok(None);
    }
    Ok(match parsed.addresses {
        v2::Addresses::IPv4(ip) => Some(SocketAddr::new(ip.source_address.into(), ip.source_port)),
        v2::Addresses::IPv6(ip) => Some(SocketAddr::new(ip.source_address.into(), ip.source_port)),
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    })
}

/// v1 ends at the first `\n`. Peek, take only the bytes up to and including it
/// (or all peeked bytes when it has not arrived — they are header bytes too),
/// and repeat; after taking everything peeked, the next peek waits for new data.
async fn read_v1(stream: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut header = Vec::with_capacity(V1_MAX_LEN);
    let mut window = [0u8; V1_MAX_LEN];
    while !header.ends_with(b"\n") {
        let room = V1_MAX_LEN - header.len();
        if room == 0 {
            return Err(ProxyHeaderError::TooLong);
        }
        let seen = stream
            .peek(&mut window[..room])
            .await
            .map_err(ProxyHeaderError::Io)?;
        if seen == 0 {
            return Err(ProxyHeaderError::Closed);
        }
        let take = window[..seen]
            .iter()
            .position(|&byte| byte == b'\n')
            .map_or(seen, |end| end + 1);
        let start = header.len();
        header.resize(start + take, 0);
        read_exact(stream, &mut header[start..]).await?;
    }

    // ppp takes a line ended by a bare LF after a space; the spec ends every
    // v1 line with CRLF, so such a line is not a header.
    if !header.ends_with(b"\r\n") {
        return Err(ProxyHeaderError::V1(
            ppp::v1::ParseError::MissingNewLine.into(),
        ));
    }
    let parsed = ppp::v1::Header::try_from(header.as_slice()).map_err(ProxyHeaderError::V1)?;
    // The parser stops at the first `\r`; a header with bytes after it is not one.
    if parsed.header.len() != header.len() {
        return Err(ProxyHeaderError::V1(
            ppp::v1::ParseError::InvalidSuffix.into(),
        ));
    }
    Ok(match parsed.addresses {
        ppp::v1::Addresses::Tcp4(ip) => {
            Some(SocketAddr::new(ip.source_address.into(), ip.source_port))
        }
        ppp::v1::Addresses::Tcp6(ip) => {
            Some(SocketAddr::new(ip.source_address.into(), ip.source_port))
        }
        ppp::v1::Addresses::Unknown => None,
    })
}

async fn read_exact(stream: &mut TcpStream, buffer: &mut [u8]) -> Result<(), ProxyHeaderError> {
    match stream.read_exact(buffer).await {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(ProxyHeaderError::Closed)
        }
        Err(error) => Err(ProxyHeaderError::Io(error)),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    const APP_BYTES: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    /// Sends `chunks` from a real client socket (each its own write, to split
    /// the header across segments) and runs `read_proxy_header` on the server side.
    async fn receive(
        chunks: Vec<Vec<u8>>,
    ) -> (Result<Option<SocketAddr>, ProxyHeaderError>, Vec<u8>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut client = TcpStream::connect(addr).await.unwrap();
            client.set_nodelay(true).unwrap();
            for chunk in chunks {
                client.write_all(&chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            client.shutdown().await.unwrap();
            // Keep the socket open until the server has read what it needs.
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
        });
        let (mut server, _) = listener.accept().await.unwrap();
        let result = read_proxy_header(&mut server, Duration::from_secs(2)).await;
        let mut rest = Vec::new();
        if result.is_ok() {
            server.read_to_end(&mut rest).await.unwrap();
        }
        drop(server);
        client.await.unwrap();
        (result, rest)
    }

    fn with_app_bytes(header: &[u8]) -> Vec<Vec<u8>> {
        vec![[header, APP_BYTES].concat()]
    }

    #[tokio::test]
    async fn v1_tcp4_source_is_returned_and_the_request_is_untouched() {
        let header = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n";
        let (result, rest) = receive(with_app_bytes(header)).await;
        assert_eq!(
            result.unwrap(),
            Some(SocketAddr::from((Ipv4Addr::new(203, 0, 113, 7), 51234)))
        );
        assert_eq!(rest, APP_BYTES);
    }

    #[tokio::test]
    async fn v1_tcp6_source_is_returned() {
        let header = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 8443\r\n";
        let (result, rest) = receive(with_app_bytes(header)).await;
        let expected: Ipv6Addr = "2001:db8::7".parse().unwrap();
        assert_eq!(result.unwrap(), Some(SocketAddr::from((expected, 40000))));
        assert_eq!(rest, APP_BYTES);
    }

    #[tokio::test]
    async fn v1_unknown_means_use_the_peer() {
        let (result, rest) = receive(with_app_bytes(b"PROXY UNKNOWN\r\n")).await;
        assert_eq!(result.unwrap(), None);
        assert_eq!(rest, APP_BYTES);
    }

    #[tokio::test]
    async fn v1_header_split_across_writes_is_assembled() {
        let chunks = vec![
            b"PROXY TCP4 198.51".to_vec(),
            b".100.9 10.0.0.1 1 2\r".to_vec(),
            [b"\n", APP_BYTES].concat(),
        ];
        let (result, rest) = receive(chunks).await;
        assert_eq!(
            result.unwrap(),
            Some(SocketAddr::from((Ipv4Addr::new(198, 51, 100, 9), 1)))
        );
        assert_eq!(rest, APP_BYTES);
    }

    fn v2_header(command: v2::Command, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
        let version_command = v2::Version::Two as u8 | command as u8;
        v2::Builder::with_addresses(version_command, v2::Protocol::Stream, (source, destination))
            .write_tlv(v2::Type::NoOp, b"pad")
            .unwrap()
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn v2_tcp4_source_is_returned_and_tlvs_are_consumed() {
        let source: SocketAddr = "192.0.2.44:6000".parse().unwrap();
        let header = v2_header(v2::Command::Proxy, source, "10.0.0.1:443".parse().unwrap());
        let (result, rest) = receive(with_app_bytes(&header)).await;
        assert_eq!(result.unwrap(), Some(source));
        assert_eq!(rest, APP_BYTES);
    }

    #[tokio::test]
    async fn v2_tcp6_source_is_returned_even_when_split() {
        let source: SocketAddr = "[2001:db8::44]:6001".parse().unwrap();
        let header = v2_header(
            v2::Command::Proxy,
            source,
            "[2001:db8::1]:443".parse().unwrap(),
        );
        let chunks = vec![
            header[..10].to_vec(),
            header[10..20].to_vec(),
            [&header[20..], APP_BYTES].concat(),
        ];
        let (result, rest) = receive(chunks).await;
        assert_eq!(result.unwrap(), Some(source));
        assert_eq!(rest, APP_BYTES);
    }

    #[tokio::test]
    async fn v2_local_means_use_the_peer() {
        let header = v2_header(
            v2::Command::Local,
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        let (result, rest) = receive(with_app_bytes(&header)).await;
        assert_eq!(result.unwrap(), None);
        assert_eq!(rest, APP_BYTES);
    }

    #[tokio::test]
    async fn garbage_is_refused() {
        let (result, _) = receive(vec![APP_BYTES.to_vec()]).await;
        assert!(
            matches!(result, Err(ProxyHeaderError::NotProxy)),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn malformed_v1_is_refused() {
        let (result, _) = receive(with_app_bytes(b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n")).await;
        assert!(matches!(result, Err(ProxyHeaderError::V1(_))), "{result:?}");
        let (result, _) = receive(vec![
            [b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2".as_slice(), &[b'x'; 100]].concat(),
        ])
        .await;
        assert!(
            matches!(result, Err(ProxyHeaderError::TooLong)),
            "{result:?}"
        );
    }

    /// Found by the `proxy_header` fuzz target.
    #[tokio::test]
    async fn v1_line_ended_by_space_and_bare_lf_is_refused() {
        let (result, _) = receive(with_app_bytes(b"PROXY TCP6 2::1 00::2 2 4001 \n\r\n")).await;
        assert!(matches!(result, Err(ProxyHeaderError::V1(_))), "{result:?}");
        let (result, _) = receive(with_app_bytes(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n")).await;
        assert!(matches!(result, Err(ProxyHeaderError::V1(_))), "{result:?}");
    }

    #[tokio::test]
    async fn bad_v2_signature_is_refused() {
        let (result, _) = receive(vec![b"\r\n\r\nnot the signature at all".to_vec()]).await;
        assert!(
            matches!(result, Err(ProxyHeaderError::NotProxy)),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn early_close_is_refused() {
        let (result, _) = receive(vec![b"PROXY TCP4 1.2.3.4".to_vec()]).await;
        assert!(
            matches!(result, Err(ProxyHeaderError::Closed)),
            "{result:?}"
        );
        let (result, _) = receive(vec![]).await;
        assert!(
            matches!(result, Err(ProxyHeaderError::Closed)),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn a_silent_client_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let result = read_proxy_header(&mut server, Duration::from_millis(100)).await;
        assert!(
            matches!(result, Err(ProxyHeaderError::Timeout(_))),
            "{result:?}"
        );
    }
}
