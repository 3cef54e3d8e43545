//! A `proxy_protocol = true` listener through a running proxy: the PROXY
//! header's source (v1 text, v2 binary, IPv4 and IPv6) is the client IP for
//! the backend's headers and for `allow_ips`; a connection without a valid
//! header, or from a sender not in `trusted_proxies`, is closed unanswered.

use std::net::SocketAddr;

use ppp::v2::{Builder, Command, IPv4, IPv6, Protocol, Version};
use tokio::io::AsyncWriteExt;

use crate::support::*;

fn config(backend: SocketAddr, trusted: &str) -> String {
    format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        proxy_protocol = true
        [server]
        drain_timeout = "1s"
        header_timeout = "5s"
        trusted_proxies = [{trusted}]
        [upstream.echo]
        servers = ["{backend}"]
        [[route]]
        path = "/ws"
        upstream = "echo"
        missing_origin = "allow"
        [[route]]
        path = "/doc"
        upstream = "echo"
        missing_origin = "allow"
        allow_ips = ["203.0.113.0/24", "2001:db8:1::/48"]
        "#
    )
}

fn v2_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    Builder::with_addresses(
        Version::Two | Command::Proxy,
        Protocol::Stream,
        (source, destination),
    )
    .build()
    .unwrap()
}

/// Writes the PROXY header and the request in one segment, so the proxy must
/// consume the header exactly and leave the request intact.
async fn through(addr: SocketAddr, preamble: &[u8], request: &str) -> (Head, String) {
    let mut stream = connect(addr).await;
    let mut bytes = preamble.to_vec();
    bytes.extend_from_slice(request.as_bytes());
    send_on(&mut stream, &bytes).await
}

#[tokio::test]
async fn proxy_v1_source_is_the_client_ip() {
    let mut backend = spawn_ws_echo().await;
    let proxy = start_proxy(&config(backend.addr, "\"127.0.0.1/32\"")).await;
    let addr = proxy.addr();
    let v1 = b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 80\r\n";

    // A client behind the balancer also sends X-Forwarded-For; the source
    // 203.0.113.7 is not a trusted proxy, so that header is not believed.
    let request = upgrade_request("/ws", "edge.test", &[("X-Forwarded-For", "198.51.100.1")]);
    let (head, body) = through(addr, v1, &request).await;
    assert_eq!(head.status, 101, "{body}");
    let seen = backend.next_request().await;
    assert_eq!(seen.one("x-real-ip").as_deref(), Some("203.0.113.7"));
    assert_eq!(seen.one("x-forwarded-for").as_deref(), Some("203.0.113.7"));
    assert_eq!(
        seen.one("forwarded").as_deref(),
        Some("for=203.0.113.7;proto=http;host=edge.test")
    );
    assert_eq!(seen.uri, "/ws");

    // The header and request arriving in separate writes work too.
    let mut stream = connect(addr).await;
    stream.write_all(v1).await.unwrap();
    stream.flush().await.unwrap();
    let (head, _) = send_on(
        &mut stream,
        upgrade_request("/doc", "edge.test", &[]).as_bytes(),
    )
    .await;
    assert_eq!(head.status, 101);
    let seen = backend.next_request().await;
    assert_eq!(seen.one("x-real-ip").as_deref(), Some("203.0.113.7"));
    drop(stream);

    // Keep-alive: every request on the connection is from the PROXY source.
    let mut stream = connect(addr).await;
    let (head, body) = send_on(
        &mut stream,
        &[
            b"PROXY TCP4 192.0.2.1 127.0.0.1 5555 80\r\n".as_slice(),
            plain_request("GET", "/doc", &[]).as_bytes(),
        ]
        .concat(),
    )
    .await;
    assert_reject(&head, &body, 403, "ip-forbidden");
    let (head, body) = send_on(
        &mut stream,
        plain_request("GET", "/doc/again", &[]).as_bytes(),
    )
    .await;
    assert_reject(&head, &body, 403, "ip-forbidden");
    assert!(body.contains("192.0.2.1"), "{body}");
    assert_backend_idle(&mut backend);
    proxy.stop().await;
}

#[tokio::test]
async fn proxy_v2_sources_ipv4_and_ipv6_are_the_client_ip() {
    let mut backend = spawn_ws_echo().await;
    let proxy = start_proxy(&config(backend.addr, "\"127.0.0.1/32\"")).await;
    let addr = proxy.addr();
    let destination6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();

    let v6 = v2_header("[2001:db8:1::7]:40000".parse().unwrap(), destination6);
    let (head, body) = through(addr, &v6, &upgrade_request("/doc", "edge.test", &[])).await;
    assert_eq!(head.status, 101, "{body}");
    let seen = backend.next_request().await;
    assert_eq!(seen.one("x-real-ip").as_deref(), Some("2001:db8:1::7"));
    assert_eq!(
        seen.one("x-forwarded-for").as_deref(),
        Some("2001:db8:1::7")
    );
    assert_eq!(
        seen.one("forwarded").as_deref(),
        Some("for=\"[2001:db8:1::7]\";proto=http;host=edge.test")
    );

    let v4: Vec<u8> = Builder::with_addresses(
        Version::Two | Command::Proxy,
        Protocol::Stream,
        IPv4::new([203, 0, 113, 8], [127, 0, 0, 1], 40001, 80),
    )
    .build()
    .unwrap();
    let (head, _) = through(addr, &v4, &upgrade_request("/doc", "edge.test", &[])).await;
    assert_eq!(head.status, 101);
    assert_eq!(
        backend.next_request().await.one("x-real-ip").as_deref(),
        Some("203.0.113.8")
    );

    // A v6 source outside the allowlist is refused, naming the PROXY source.
    let outside = Builder::with_addresses(
        Version::Two | Command::Proxy,
        Protocol::Stream,
        IPv6::new(
            "2001:db8:2::9".parse::<std::net::Ipv6Addr>().unwrap(),
            "2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap(),
            40002,
            443,
        ),
    )
    .build()
    .unwrap();
    let (head, body) = through(addr, &outside, &upgrade_request("/doc", "edge.test", &[])).await;
    assert_reject(&head, &body, 403, "ip-forbidden");
    assert!(body.contains("2001:db8:2::9"), "{body}");

    // v2 LOCAL (the balancer's own health check): the TCP peer is the client.
    let local = Builder::with_addresses(
        Version::Two | Command::Local,
        Protocol::Unspecified,
        ppp::v2::Addresses::Unspecified,
    )
    .build()
    .unwrap();
    let (head, _) = through(addr, &local, &upgrade_request("/ws", "edge.test", &[])).await;
    assert_eq!(head.status, 101);
    assert_eq!(
        backend.next_request().await.one("x-real-ip").as_deref(),
        Some("127.0.0.1")
    );
    assert_backend_idle(&mut backend);
    proxy.stop().await;
}

#[tokio::test]
async fn proxy_source_is_checked_against_allow_ips() {
    let mut backend = spawn_ws_echo().await;
    let proxy = start_proxy(&config(backend.addr, "\"127.0.0.1/32\"")).await;
    let addr = proxy.addr();
    let allowed = b"PROXY TCP4 203.0.113.200 127.0.0.1 5555 80\r\n";
    let (head, _) = through(addr, allowed, &upgrade_request("/doc", "edge.test", &[])).await;
    assert_eq!(head.status, 101);
    backend.next_request().await;

    // The real TCP peer (127.0.0.1) is not in the list either: only the
    // PROXY source is looked at, and 192.0.2.50 is outside.
    let refused = b"PROXY TCP4 192.0.2.50 127.0.0.1 5555 80\r\n";
    let (head, body) = through(addr, refused, &upgrade_request("/doc", "edge.test", &[])).await;
    assert_reject(&head, &body, 403, "ip-forbidden");
    assert!(body.contains("client address 192.0.2.50 "), "{body}");
    // Nor can the client behind the balancer talk its way in with XFF.
    let spoof = upgrade_request("/doc", "edge.test", &[("X-Forwarded-For", "203.0.113.1")]);
    let (head, body) = through(addr, refused, &spoof).await;
    assert_reject(&head, &body, 403, "ip-forbidden");
    assert_backend_idle(&mut backend);
    proxy.stop().await;
}

#[tokio::test]
async fn proxy_header_missing_or_invalid_closes_without_a_response() {
    let mut backend = spawn_ws_echo().await;
    let proxy = start_proxy(&config(backend.addr, "\"127.0.0.1/32\"")).await;
    let addr = proxy.addr();
    let upgrade_head = upgrade_request("/ws", "edge.test", &[]);
    let cases: [(&str, Vec<u8>); 4] = [
        ("no PROXY header", Vec::new()),
        (
            "malformed v1",
            b"PROXY TCP4 not-an-ip 127.0.0.1 5555 80\r\n".to_vec(),
        ),
        (
            "v1 with the wrong family",
            b"PROXY TCP6 203.0.113.7 127.0.0.1 5555 80\r\n".to_vec(),
        ),
        ("v2 signature, then garbage", {
            let mut bytes = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
            bytes.extend_from_slice(&[0x99, 0x11, 0x00, 0x0c]);
            bytes.extend_from_slice(&[0u8; 12]);
            bytes
        }),
    ];
    for (label, preamble) in cases {
        let mut stream = connect(addr).await;
        let mut bytes = preamble;
        bytes.extend_from_slice(upgrade_head.as_bytes());
        // The proxy may close first; a failed write is as good as a close.
        let _ = stream.write_all(&bytes).await;
        assert_closed_silently(&mut stream, label).await;
    }
    assert_backend_idle(&mut backend);
    proxy.stop().await;
}

#[tokio::test]
async fn proxy_header_from_an_untrusted_sender_is_closed() {
    let mut backend = spawn_ws_echo().await;
    for trusted in ["", "\"10.0.0.0/8\", \"::1/128\""] {
        let proxy = start_proxy(&config(backend.addr, trusted)).await;
        let mut stream = connect(proxy.addr()).await;
        let mut bytes = b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 80\r\n".to_vec();
        bytes.extend_from_slice(upgrade_request("/ws", "edge.test", &[]).as_bytes());
        let _ = stream.write_all(&bytes).await;
        assert_closed_silently(&mut stream, &format!("trusted_proxies = [{trusted}]")).await;
        proxy.stop().await;
    }
    assert_backend_idle(&mut backend);
}
