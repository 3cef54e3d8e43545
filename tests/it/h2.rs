//! HTTP/2 to clients: ALPN, plain requests to HTTP/1.1 backends, and RFC 8441
//! WebSockets on streams of one connection.

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;

use crate::common::*;

fn h2_config(cert: &TestCert, backend: std::net::SocketAddr) -> String {
    tls_echo_config(cert, backend, "", "[server]\ndrain_timeout = \"1s\"")
}

pub(crate) async fn h2_client(
    proxy: std::net::SocketAddr,
    cert: &TestCert,
) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let mut config = tls_client_config(Some(&cert.cert_pem), &[&rustls::version::TLS13]);
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tls_connect_with(proxy, "localhost", config).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(connection);
    send
}

/// Opens a WebSocket on a new stream of `send`'s connection and returns
/// the stream's bytes once the 200 has arrived.
pub(crate) async fn h2_websocket(
    send: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    path: &str,
) -> TokioIo<hyper::upgrade::Upgraded> {
    let response = within(
        "the 200",
        send.send_request(extended_connect(path, "https://localhost", "13")),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{path}");
    TokioIo::new(
        within("the upgrade", hyper::upgrade::on(response))
            .await
            .unwrap(),
    )
}

pub(crate) fn extended_connect(path: &str, origin: &str, version: &str) -> Request<Empty<Bytes>> {
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("https://localhost{path}"))
        .header("sec-websocket-version", version)
        .header("origin", origin)
        .body(Empty::new())
        .unwrap();
    request
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    request
}

#[tokio::test]
async fn websockets_share_one_h2_connection_and_each_echoes() {
    let cert = test_cert(&["localhost"]);
    let mut backend = spawn_ws_echo().await;
    let proxy = start_proxy(&h2_config(&cert, backend.addr)).await;
    let mut send = h2_client(proxy.addr(), &cert).await;

    let mut sockets = Vec::new();
    for index in 0..5 {
        let response = within(
            "the 200",
            send.send_request(extended_connect(
                &format!("/chat/{index}"),
                "https://localhost",
                "13",
            )),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers().get("sec-websocket-accept").is_none());
        let upgraded = within("the upgrade", hyper::upgrade::on(response))
            .await
            .unwrap();
        sockets.push(TokioIo::new(upgraded));
        let seen = backend.next_request().await;
        assert_eq!(seen.method, "GET");
        assert_eq!(seen.one("origin").as_deref(), Some("https://localhost"));
        assert_eq!(seen.one("host").as_deref(), Some("localhost"));
        assert_eq!(seen.one("x-forwarded-proto").as_deref(), Some("https"));
        assert_eq!(seen.one("upgrade").as_deref(), Some("websocket"));
    }
    // One stream's end does not disturb the others.
    drop(sockets.remove(0));
    for (index, socket) in sockets.iter_mut().enumerate() {
        let text = format!("stream {index}");
        socket
            .write_all(&ws_frame(0x81, text.as_bytes(), Some([9, 8, 7, 6])))
            .await
            .unwrap();
        let echo = read_frame(socket).await;
        assert_eq!((echo.first, echo.payload), (0x81, text.into_bytes()));
    }
    // A 1 MiB message crosses the flow-control windows both ways.
    let big: Vec<u8> = (0..1024 * 1024).map(big_body_byte).collect();
    sockets[0]
        .write_all(&ws_frame(0x82, &big, Some([1, 2, 3, 4])))
        .await
        .unwrap();
    let echo = read_frame(&mut sockets[0]).await;
    assert_eq!(echo.payload.len(), big.len());
    assert!(echo.payload == big, "the 1 MiB echo differs");
    drop(sockets);
    proxy.stop().await;
}

#[tokio::test]
async fn h2_refusals_carry_status_and_reason_without_upgrade() {
    let cert = test_cert(&["localhost"]);
    let backend = spawn_ws_echo().await;
    let proxy = start_proxy(&h2_config(&cert, backend.addr)).await;
    let mut send = h2_client(proxy.addr(), &cert).await;

    let forbidden = send
        .send_request(extended_connect("/chat", "https://evil.example", "13"))
        .await
        .unwrap();
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
    assert_eq!(forbidden.headers()["wsgate-reason"], "origin-forbidden");

    let old = send
        .send_request(extended_connect("/chat", "https://localhost", "8"))
        .await
        .unwrap();
    assert_eq!(old.status(), StatusCode::UPGRADE_REQUIRED);
    assert_eq!(old.headers()["wsgate-reason"], "bad-version");
    assert!(old.headers().get("upgrade").is_none());

    // The connection still serves a WebSocket after both refusals.
    let ok = send
        .send_request(extended_connect("/chat", "https://localhost", "13"))
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    drop(send);
    proxy.stop().await;
}

#[tokio::test]
async fn a_wrong_accept_from_the_backend_is_a_502_never_a_200() {
    let cert = test_cert(&["localhost"]);
    let (backend, _seen) = spawn_raw_ws(|mut stream, _head| async move {
        let _ = stream
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
            )
            .await;
        let _ = read_until_eof(&mut stream).await;
    })
    .await;
    let proxy = start_proxy(&h2_config(&cert, backend)).await;
    let mut send = h2_client(proxy.addr(), &cert).await;
    let response = send
        .send_request(extended_connect("/chat", "https://localhost", "13"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(response.headers()["wsgate-reason"], "upstream-protocol");
    drop(send);
    proxy.stop().await;
}

#[tokio::test]
async fn plain_get_over_h2_reaches_the_http11_backend_with_host_from_authority() {
    let cert = test_cert(&["localhost"]);
    let (backend, mut seen) = spawn_raw_ws(|mut stream, _head| async move {
        let _ = stream
            .write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello",
            )
            .await;
        let _ = read_until_eof(&mut stream).await;
    })
    .await;
    let proxy = start_proxy(&h2_config(&cert, backend)).await;
    let mut send = h2_client(proxy.addr(), &cert).await;
    let request = Request::builder()
        .uri("https://localhost/page?x=1")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(Empty::new())
        .unwrap();
    let response = send.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().get("connection").is_none());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hello");
    let raw = within("the forwarded request", seen.recv()).await.unwrap();
    assert!(raw.starts_with("GET /page?x=1 HTTP/1.1\r\n"), "{raw:?}");
    let head = Head::parse(&raw);
    assert_eq!(head.get("host"), Some("localhost"));
    assert_eq!(head.get("cookie"), Some("a=1; b=2"));
    assert_eq!(head.get("x-forwarded-proto"), Some("https"));
    drop(send);
    proxy.stop().await;
}

#[tokio::test]
async fn http2_false_offers_only_http11() {
    let cert = test_cert(&["localhost"]);
    let backend = spawn_ws_echo().await;
    let config =
        h2_config(&cert, backend.addr).replace("tls = {", "http2 = false\n        tls = {");
    let proxy = start_proxy(&config).await;
    let mut client = tls_client_config(Some(&cert.cert_pem), &[&rustls::version::TLS13]);
    client.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tls = tls_connect_with(proxy.addr(), "localhost", client)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    drop(tls);
    proxy.stop().await;
}

#[tokio::test]
async fn a_drain_sends_close_1012_on_every_h2_stream_and_the_proxy_exits() {
    let cert = test_cert(&["localhost"]);
    let backend = spawn_ws_echo().await;
    let proxy = start_proxy(&h2_config(&cert, backend.addr)).await;
    let mut send = h2_client(proxy.addr(), &cert).await;
    let mut sockets = Vec::new();
    for _ in 0..3 {
        let response = send
            .send_request(extended_connect("/chat", "https://localhost", "13"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        sockets.push(TokioIo::new(
            within("the upgrade", hyper::upgrade::on(response))
                .await
                .unwrap(),
        ));
    }
    let stopped = proxy.begin_shutdown();
    for socket in &mut sockets {
        let close = read_frame(socket).await;
        assert_eq!(close.first, 0x88);
        assert!(!close.masked, "toward the client frames are unmasked");
        assert_eq!(&close.payload[..2], &1012u16.to_be_bytes());
        socket
            .write_all(&ws_frame(0x88, &1012u16.to_be_bytes(), Some([5, 6, 7, 8])))
            .await
            .unwrap();
    }
    within("the proxy to exit", stopped).await.unwrap().unwrap();
}

/// One HTTP/2 frame: 9-byte header, then `payload`.
pub(crate) fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend_from_slice(&[kind, flags]);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

#[tokio::test]
async fn rapid_reset_ends_the_connection_with_enhance_your_calm() {
    let cert = test_cert(&["localhost"]);
    let backend = spawn_ws_echo().await;
    let proxy = start_proxy(&h2_config(&cert, backend.addr)).await;
    let mut config = tls_client_config(Some(&cert.cert_pem), &[&rustls::version::TLS13]);
    config.alpn_protocols = vec![b"h2".to_vec()];
    let mut tls = tls_connect_with(proxy.addr(), "localhost", config)
        .await
        .unwrap();
    let mut flood = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    flood.extend(h2_frame(0x4, 0, 0, &[]));
    // HPACK: GET, https, /, then :authority localhost as a literal.
    let mut block = vec![0x82, 0x87, 0x84, 0x41, 9];
    block.extend_from_slice(b"localhost");
    for index in 0..200u32 {
        let stream = 1 + 2 * index;
        flood.extend(h2_frame(0x1, 0x4 | 0x1, stream, &block));
        flood.extend(h2_frame(0x3, 0, stream, &8u32.to_be_bytes()));
    }
    tls.write_all(&flood).await.unwrap();
    let goaway = read_goaway(&mut tls).await;
    assert_eq!(goaway, 0xb, "ENHANCE_YOUR_CALM");
    // Other clients are served as before.
    let mut send = h2_client(proxy.addr(), &cert).await;
    let ok = send
        .send_request(extended_connect("/chat", "https://localhost", "13"))
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    drop(send);
    proxy.stop().await;
}

/// Reads frames until a GOAWAY and returns its error code.
pub(crate) async fn read_goaway<S: tokio::io::AsyncRead + Unpin>(tls: &mut S) -> u32 {
    use tokio::io::AsyncReadExt;
    within("a GOAWAY", async {
        let mut received = Vec::new();
        let mut buf = [0u8; 16384];
        loop {
            let mut at = 0;
            while received.len() >= at + 9 {
                let len = u32::from_be_bytes([0, received[at], received[at + 1], received[at + 2]])
                    as usize;
                if received.len() < at + 9 + len {
                    break;
                }
                if received[at + 3] == 0x7 {
                    // Last stream id, then the error code.
                    let payload = &received[at + 9..at + 9 + len];
                    return u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                }
                at += 9 + len;
            }
            let read = tls.read(&mut buf).await.unwrap_or(0);
            assert!(read > 0, "the connection closed without a GOAWAY");
            received.extend_from_slice(&buf[..read]);
        }
    })
    .await
}

#[tokio::test]
async fn a_continuation_flood_ends_the_connection_with_enhance_your_calm() {
    let cert = test_cert(&["localhost"]);
    let backend = spawn_ws_echo().await;
    let proxy = start_proxy(&h2_config(&cert, backend.addr)).await;
    let mut config = tls_client_config(Some(&cert.cert_pem), &[&rustls::version::TLS13]);
    config.alpn_protocols = vec![b"h2".to_vec()];
    let mut tls = tls_connect_with(proxy.addr(), "localhost", config)
        .await
        .unwrap();
    let mut flood = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    flood.extend(h2_frame(0x4, 0, 0, &[]));
    // A HEADERS frame that never ends (no END_HEADERS), then CONTINUATIONs
    // of one small `user-agent` field each: tiny frames, so only their
    // count is abuse.
    flood.extend(h2_frame(0x1, 0x1, 1, &[0x82, 0x87, 0x84]));
    for _ in 0..2000 {
        flood.extend(h2_frame(0x9, 0, 1, &[0x0f, 0x2b, 0x01, b'a']));
    }
    // The server may close mid-write; what it answered is what counts.
    let _ = tls.write_all(&flood).await;
    assert_eq!(read_goaway(&mut tls).await, 0xb, "ENHANCE_YOUR_CALM");
    proxy.stop().await;
}

/// The metrics of requests over h2 are exactly those of HTTP/1.1: plain
/// requests by route and status, WebSockets as handshakes by outcome,
/// refusals by reason.
#[tokio::test]
async fn requests_over_h2_are_counted_as_over_http11() {
    let cert = test_cert(&["localhost"]);
    let ws = spawn_ws_echo().await;
    let origin = spawn_http_origin().await;
    let proxy = start_proxy(&format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        tls = {{ certs = [ {{ cert = "{}", key = "{}" }} ] }}
        [admin]
        addr = "127.0.0.1:0"
        [server]
        drain_timeout = "1s"
        [upstream.ws]
        servers = ["{}"]
        [upstream.web]
        servers = ["{}"]
        [[route]]
        name = "chat"
        path = "/ws"
        upstream = "ws"
        origins = ["https://localhost"]
        [[route]]
        name = "page"
        path = "/"
        upstream = "web"
        websocket = "forbidden"
        "#,
        cert.cert_path.display(),
        cert.key_path.display(),
        ws.addr,
        origin.addr,
    ))
    .await;
    let admin = proxy.admin.unwrap();
    let mut send = h2_client(proxy.addr(), &cert).await;
    let page = Request::builder()
        .uri("https://localhost/page")
        .body(Empty::new())
        .unwrap();
    let response = within("the page", send.send_request(page)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.unwrap();
    for (origin, version, status) in [
        ("https://evil.example", "13", StatusCode::FORBIDDEN),
        ("https://localhost", "8", StatusCode::UPGRADE_REQUIRED),
    ] {
        let refused = within(
            "the refusal",
            send.send_request(extended_connect("/ws", origin, version)),
        )
        .await
        .unwrap();
        assert_eq!(refused.status(), status);
    }
    let socket = h2_websocket(&mut send, "/ws").await;
    for (name, labels) in [
        (
            "wsgate_http_requests_total",
            [("route", "page"), ("status", "200")],
        ),
        (
            "wsgate_rejections_total",
            [("route", "chat"), ("reason", "origin-forbidden")],
        ),
        (
            "wsgate_rejections_total",
            [("route", "chat"), ("reason", "bad-version")],
        ),
        (
            "wsgate_handshakes_total",
            [("route", "chat"), ("outcome", "upgraded")],
        ),
    ] {
        metric_becomes(admin, name, &labels, 1.0).await;
    }
    metric_becomes(
        admin,
        "wsgate_handshakes_total",
        &[("route", "chat"), ("outcome", "rejected")],
        2.0,
    )
    .await;
    drop(socket);
    drop(send);
    proxy.stop().await;
}
