//! The two ways an upgrade is served: directly, when it is a connection's
//! first request (every browser WebSocket), and through hyper, when it
//! follows other requests on a keep-alive connection. Both must forward the
//! same request and relay the backend's answer the same way.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

fn config(backend: SocketAddr) -> String {
    config_for_servers(&format!("\"{backend}\""))
}

/// `servers` is the TOML list's contents.
fn config_for_servers(servers: &str) -> String {
    format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [server]
        drain_timeout = "1s"
        [upstream.backend]
        servers = [{servers}]
        [[route]]
        path = "/"
        upstream = "backend"
        origins = ["https://app.example"]
        missing_origin = "allow"
        "#
    )
}

/// Answers a plain request with `200 ok`; switches an upgrade and echoes one
/// frame back unmasked.
async fn spawn_plain_or_echo_backend() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>)
{
    spawn_raw_ws(|mut stream, head| async move {
        if !head.to_ascii_lowercase().contains("upgrade: websocket") {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
            let _ = read_until_eof(&mut stream).await;
            return;
        }
        stream
            .write_all(switching_protocols(&head, &[]).as_bytes())
            .await
            .unwrap();
        let frame = read_frame(&mut stream).await;
        stream
            .write_all(&ws_frame(0x81, &frame.payload, None))
            .await
            .unwrap();
        let _ = read_until_eof(&mut stream).await;
    })
    .await
}

#[tokio::test]
async fn upgrade_after_a_plain_request_on_one_connection_is_tunnelled() {
    let (backend, mut seen) = spawn_plain_or_echo_backend().await;
    let proxy = start_proxy(&config(backend)).await;
    let mut stream = connect(proxy.addr()).await;

    stream
        .write_all(b"GET /page HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut stream, "GET").await;
    assert_eq!((head.status, body.as_slice()), (200, &b"ok"[..]));

    let request = upgrade_request("/ws", "x", &[("Origin", "https://App.example")]);
    stream.write_all(request.as_bytes()).await.unwrap();
    let (head, _) = read_response(&mut stream, "GET").await;
    assert_eq!(head.status, 101, "{:?}", head.headers);
    assert_eq!(
        head.get("sec-websocket-accept"),
        Some(accept_key("dGhlIHNhbXBsZSBub25jZQ==").as_str())
    );
    stream
        .write_all(&ws_frame(0x81, b"after keep-alive", Some([1, 2, 3, 4])))
        .await
        .unwrap();
    assert_eq!(read_frame(&mut stream).await.payload, b"after keep-alive");

    // The backend saw the plain request, then the upgrade with what matters intact.
    let first = within("the plain request", seen.recv()).await.unwrap();
    assert!(first.starts_with("GET /page HTTP/1.1\r\n"), "{first:?}");
    let forwarded = Head::parse(&within("the upgrade", seen.recv()).await.unwrap());
    assert_eq!(forwarded.get("origin"), Some("https://App.example"));
    assert_eq!(forwarded.get("upgrade"), Some("websocket"));
    assert_eq!(forwarded.get("x-forwarded-for"), Some("127.0.0.1"));
    drop(stream);
    proxy.stop().await;
}

#[tokio::test]
async fn first_request_upgrade_is_forwarded_with_request_line_and_headers_intact() {
    let (backend, mut seen) = spawn_plain_or_echo_backend().await;
    let proxy = start_proxy(&config(backend)).await;
    let mut stream = connect(proxy.addr()).await;
    let request = upgrade_request(
        "/chat/room?id=7&token=abc",
        "app.example:8080",
        &[
            ("Origin", "https://App.Example"),
            ("Sec-WebSocket-Protocol", "v2.chat, v1.chat"),
            (
                "Sec-WebSocket-Extensions",
                "permessage-deflate; client_max_window_bits",
            ),
            ("Cookie", "a=1; b=2"),
            ("Keep-Alive", "timeout=5"),
        ],
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let (head, _) = read_response(&mut stream, "GET").await;
    assert_eq!(head.status, 101);

    let seen_head = within("the upgrade", seen.recv()).await.unwrap();
    assert!(
        seen_head.starts_with("GET /chat/room?id=7&token=abc HTTP/1.1\r\n"),
        "{seen_head:?}"
    );
    let forwarded = Head::parse(&seen_head);
    for (name, value) in [
        ("host", "app.example:8080"),
        ("origin", "https://App.Example"),
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("sec-websocket-version", "13"),
        ("sec-websocket-protocol", "v2.chat, v1.chat"),
        (
            "sec-websocket-extensions",
            "permessage-deflate; client_max_window_bits",
        ),
        ("cookie", "a=1; b=2"),
        ("x-forwarded-for", "127.0.0.1"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-host", "app.example:8080"),
        ("x-real-ip", "127.0.0.1"),
    ] {
        assert_eq!(forwarded.all(name).collect::<Vec<_>>(), [value], "{name}");
    }
    assert!(
        forwarded.all("keep-alive").next().is_none(),
        "hop-by-hop Keep-Alive forwarded"
    );
    drop(stream);
    proxy.stop().await;
}

#[tokio::test]
async fn backend_101_reaches_the_client_byte_for_byte() {
    let (backend, _) = spawn_raw_ws(|mut stream, head| async move {
        let answer = switching_protocols(&head, &[("X-Backend-Node", "Eu-West-1b")]);
        stream.write_all(answer.as_bytes()).await.unwrap();
        let _ = read_until_eof(&mut stream).await;
    })
    .await;
    let proxy = start_proxy(&config(backend)).await;
    let mut stream = connect(proxy.addr()).await;
    let request = upgrade_request("/", "x", &[]);
    stream.write_all(request.as_bytes()).await.unwrap();
    let head = within("the 101", read_head(&mut stream)).await;
    assert_eq!(
        head,
        switching_protocols(&request, &[("X-Backend-Node", "Eu-West-1b")])
    );
    drop(stream);
    proxy.stop().await;
}

#[tokio::test]
async fn backend_refusal_with_a_chunked_body_is_relayed_whole() {
    let (backend, _) = spawn_raw_backend(
        b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\nWWW-Authenticate: Basic realm=\"ws\"\r\nConnection: keep-alive\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: dropped\r\n\r\n",
    )
    .await;
    let proxy = start_proxy(&config(backend)).await;
    let mut stream = connect(proxy.addr()).await;
    stream
        .write_all(upgrade_request("/", "x", &[]).as_bytes())
        .await
        .unwrap();
    let mut reply = Vec::new();
    within("the refusal and the close", stream.read_to_end(&mut reply))
        .await
        .unwrap();
    let reply = String::from_utf8(reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    let head = Head::parse(head);
    assert_eq!(head.status, 401);
    assert_eq!(head.get("www-authenticate"), Some("Basic realm=\"ws\""));
    assert_eq!(head.get("content-length"), Some("11"));
    assert_eq!(head.get("transfer-encoding"), None);
    assert_eq!(head.get("connection"), Some("close"));
    assert_eq!(head.get("wsgate-reason"), None);
    assert_eq!(body, "hello world");
    proxy.stop().await;
}

/// A refusal far larger than what the proxy holds (64 KiB), framed by
/// `Content-Length` or by chunks: `(the backend's answer, the body)`.
fn large_refusal(chunked: bool) -> (&'static [u8], Vec<u8>) {
    let body: Vec<u8> = (0..210_000).map(big_body_byte).collect();
    let mut wire = b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/html\r\n".to_vec();
    if chunked {
        wire.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
        for chunk in body.chunks(70_000) {
            wire.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            wire.extend_from_slice(chunk);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"0\r\n\r\n");
    } else {
        wire.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
        wire.extend_from_slice(&body);
    }
    (Vec::leak(wire), body)
}

/// What a client must see of `large_refusal(chunked)`, whichever way the
/// upgrade was served.
#[track_caller]
fn assert_relayed_unchanged(head: &Head, body: &[u8], expected: &[u8], chunked: bool) {
    assert_eq!(head.status, 403, "chunked {chunked}: {:?}", head.headers);
    assert_eq!(head.get("content-type"), Some("text/html"));
    assert_eq!(head.get("wsgate-reason"), None);
    // A length the backend announced is passed on; a chunked body is
    // framed by the close (direct) or by hyper's own chunks.
    let length = (!chunked).then(|| expected.len().to_string());
    assert_eq!(head.get("content-length"), length.as_deref());
    assert!(
        body == expected,
        "chunked {chunked}: body of {} bytes differs",
        body.len()
    );
}

#[tokio::test]
async fn backend_refusal_larger_than_what_is_held_streams_to_the_client_unchanged() {
    for chunked in [false, true] {
        let (answer, expected) = large_refusal(chunked);
        let (backend, _) = spawn_raw_backend(answer).await;
        let proxy = start_proxy(&config(backend)).await;

        // Served directly: the connection's first request.
        let mut stream = connect(proxy.addr()).await;
        stream
            .write_all(upgrade_request("/", "x", &[]).as_bytes())
            .await
            .unwrap();
        let head = Head::parse(&read_head(&mut stream).await);
        let body = read_until_eof(&mut stream).await;
        assert_relayed_unchanged(&head, &body, &expected, chunked);
        assert_eq!(head.get("connection"), Some("close"));
        assert_eq!(head.get("transfer-encoding"), None);

        // Through hyper: a first request makes the upgrade hyper's.
        let mut stream = connect(proxy.addr()).await;
        stream
            .write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = read_response(&mut stream, "GET").await;
        assert_eq!((head.status, body.len()), (403, expected.len()));
        stream
            .write_all(upgrade_request("/", "x", &[]).as_bytes())
            .await
            .unwrap();
        let (head, body) = read_response(&mut stream, "GET").await;
        assert_relayed_unchanged(&head, &body, &expected, chunked);
        proxy.stop().await;
    }
}

#[tokio::test]
async fn refusal_cut_short_before_what_is_held_is_502_upstream_unavailable() {
    let (backend, _) =
        spawn_raw_backend(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 70000\r\n\r\nonly this")
            .await;
    let proxy = start_proxy(&config(backend)).await;
    let (head, body, _) = exchange(proxy.addr(), &upgrade_request("/", "x", &[])).await;
    assert_rejected(&head, &body, 502, "upstream-unavailable");
    proxy.stop().await;
}

#[tokio::test]
async fn upgrade_with_bare_lf_line_endings_is_served() {
    // RFC 9112 §2.2 lets a recipient accept a bare LF as a line terminator.
    let (backend, mut seen) = spawn_plain_or_echo_backend().await;
    let proxy = start_proxy(&config(backend)).await;
    let mut stream = connect(proxy.addr()).await;
    let request = upgrade_request("/", "x", &[]).replace("\r\n", "\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let (head, _) = read_response(&mut stream, "GET").await;
    assert_eq!(head.status, 101, "{:?}", head.headers);
    let forwarded = within("the upgrade", seen.recv()).await.unwrap();
    assert!(
        forwarded.starts_with("GET / HTTP/1.1\r\nHost: x\r\n"),
        "{forwarded:?}"
    );
    drop(stream);
    proxy.stop().await;
}

/// The request head leaves with the connect; a server that refuses the
/// connect is still skipped for the next one.
#[tokio::test]
async fn a_refusing_server_is_skipped_for_the_next() {
    let (backend, mut seen) = spawn_plain_or_echo_backend().await;
    let (_dead_socket, dead) = refusing_port();
    let proxy = start_proxy(&config_for_servers(&format!("\"{dead}\", \"{backend}\""))).await;
    // Round robin starts on each server in turn: two upgrades meet the dead one once.
    for attempt in 0..2 {
        let (head, _, mut stream) =
            exchange(proxy.addr(), &upgrade_request("/chat", "app.example", &[])).await;
        assert_eq!(head.status, 101, "attempt {attempt}");
        let request = within("the backend to see the upgrade", seen.recv())
            .await
            .unwrap();
        assert!(request.starts_with("GET /chat HTTP/1.1\r\n"), "{request}");
        stream
            .write_all(&ws_frame(0x81, b"hi", Some([1, 2, 3, 4])))
            .await
            .unwrap();
        let echoed = read_frame(&mut stream).await;
        assert_eq!(echoed.payload, b"hi");
    }
    proxy.stop().await;
}
