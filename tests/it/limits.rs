//! Connection-level limits: request head size, slow heads, connection count.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::common::*;

fn config(backend: SocketAddr, server: &str) -> String {
    format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [admin]
        addr = "127.0.0.1:0"
        [server]
        drain_timeout = "1s"
        {server}
        [upstream.echo]
        servers = ["{backend}"]
        [[route]]
        path = "/"
        upstream = "echo"
        missing_origin = "allow"
        "#
    )
}

#[tokio::test]
async fn head_larger_than_max_header_bytes_is_431() {
    let backend = spawn_ws_echo().await;
    let proxy = start_proxy(&config(backend.addr, "max_header_bytes = 2048")).await;
    let cookie = "c".repeat(4096);
    let (head, body, _) = exchange(
        proxy.addr(),
        &upgrade_request("/", "x", &[("Cookie", &cookie)]),
    )
    .await;
    assert_rejected(&head, &body, 431, "header-too-large");
    let (head, body, _) = exchange(
        proxy.addr(),
        &format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {cookie}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_rejected(&head, &body, 431, "header-too-large");
    // Just under the limit still passes.
    let (head, _, stream) = exchange(
        proxy.addr(),
        &upgrade_request("/", "x", &[("Cookie", &"c".repeat(1500))]),
    )
    .await;
    assert_eq!(head.status, 101);
    drop(stream);
    proxy.stop().await;
}

#[tokio::test]
async fn head_far_larger_than_max_header_bytes_is_still_431_with_reason() {
    let backend = spawn_ws_echo().await;
    let proxy = start_proxy(&config(backend.addr, "max_header_bytes = 2048")).await;
    let huge = "c".repeat(32 * 1024);
    let (head, body, _) = exchange(
        proxy.addr(),
        &format!("GET / HTTP/1.1\r\nHost: x\r\nCookie: {huge}\r\n\r\n"),
    )
    .await;
    assert_rejected(&head, &body, 431, "header-too-large");
    proxy.stop().await;
}

#[tokio::test]
async fn huge_second_head_on_a_keep_alive_connection_is_431_with_reason() {
    let origin = spawn_http_origin().await;
    let proxy = start_proxy(&config(origin.addr, "max_header_bytes = 2048")).await;
    let mut stream = connect(proxy.addr()).await;
    stream
        .write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut stream, "GET").await.0.status, 200);
    let huge = "c".repeat(32 * 1024);
    stream
        .write_all(format!("GET /second HTTP/1.1\r\nHost: x\r\nCookie: {huge}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (head, body) = read_response(&mut stream, "GET").await;
    assert_rejected(
        &head,
        &String::from_utf8_lossy(&body),
        431,
        "header-too-large",
    );
    drop(stream);
    proxy.stop().await;
}

#[tokio::test]
async fn slow_head_is_cut_after_header_timeout() {
    let backend = spawn_ws_echo().await;
    let proxy = start_proxy(&config(backend.addr, r#"header_timeout = "500ms""#)).await;
    let mut stream = connect(proxy.addr()).await;
    let started = Instant::now();
    // Half a head, never finished.
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let reply = read_until_eof(&mut stream).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(400),
        "cut after only {elapsed:?}"
    );
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 408"),
        "unexpected reply {reply:?}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn connection_over_max_connections_gets_503_overloaded() {
    let backend = spawn_ws_echo().await;
    let proxy = start_proxy(&config(backend.addr, "max_connections = 2")).await;
    let admin = proxy.admin.unwrap();
    // Two open connections: one idle, one tunnel.
    let idle = connect(proxy.addr()).await;
    let (head, _, tunnel) = exchange(proxy.addr(), &upgrade_request("/", "x", &[])).await;
    assert_eq!(head.status, 101);
    let (head, body, _) = exchange(proxy.addr(), "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_rejected(&head, &body, 503, "overloaded");
    assert_eq!(
        admin_metric(
            admin,
            "wsgate_rejections_total",
            &[("reason", "overloaded")]
        )
        .await,
        1.0
    );
    // Slots come back when connections close.
    drop(idle);
    drop(tunnel);
    until("a slot to free up", || async {
        let (head, _, stream) = exchange(proxy.addr(), &upgrade_request("/", "x", &[])).await;
        drop(stream);
        head.status == 101
    })
    .await;
    proxy.stop().await;
}

fn tls_config(backend: SocketAddr, cert: &TestCert, max_connections: usize) -> String {
    format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        tls = {{ certs = [ {{ cert = "{}", key = "{}" }} ] }}
        [admin]
        addr = "127.0.0.1:0"
        [server]
        drain_timeout = "1s"
        max_connections = {max_connections}
        [upstream.echo]
        servers = ["{backend}"]
        [[route]]
        path = "/"
        upstream = "echo"
        missing_origin = "allow"
        "#,
        cert.cert_path.display(),
        cert.key_path.display(),
    )
}

/// Asks for an upgrade over `tls` and expects the proxy's 503 `overloaded`.
async fn assert_told_overloaded<S: AsyncRead + AsyncWrite + Unpin>(tls: &mut S) {
    tls.write_all(upgrade_request("/", "a.test", &[]).as_bytes())
        .await
        .unwrap();
    let (head, body) = read_response(tls, "GET").await;
    assert_rejected(&head, &String::from_utf8_lossy(&body), 503, "overloaded");
}

#[tokio::test]
async fn tls_connection_over_max_connections_gets_503_overloaded_over_tls() {
    let backend = spawn_ws_echo().await;
    let cert = test_cert(&["a.test"]);
    let proxy = start_proxy(&tls_config(backend.addr, &cert, 1)).await;
    let admin = proxy.admin.unwrap();
    let held = tls_connect(proxy.addr(), "a.test", &cert.cert_pem).await;
    let mut refused = tls_connect(proxy.addr(), "a.test", &cert.cert_pem).await;
    assert_told_overloaded(&mut refused).await;
    assert_eq!(
        admin_metric(
            admin,
            "wsgate_rejections_total",
            &[("reason", "overloaded")]
        )
        .await,
        1.0
    );
    drop(held);
    proxy.stop().await;
}

#[tokio::test]
async fn tls_refusals_past_their_margin_are_closed_at_accept() {
    const MARGIN: usize = 64;
    let backend = spawn_ws_echo().await;
    let cert = test_cert(&["a.test"]);
    let proxy = start_proxy(&tls_config(backend.addr, &cert, 1)).await;
    let admin = proxy.admin.unwrap();
    let _held = tls_connect(proxy.addr(), "a.test", &cert.cert_pem).await;
    // Connections that never send a ClientHello stay in their refusal
    // handshake, each one past the limit.
    let mut waiting = Vec::with_capacity(MARGIN);
    for _ in 0..MARGIN {
        waiting.push(connect(proxy.addr()).await);
    }
    metric_becomes(
        admin,
        "wsgate_rejections_total",
        &[("reason", "overloaded")],
        MARGIN as f64,
    )
    .await;
    let mut flood = connect(proxy.addr()).await;
    assert_eq!(
        read_until_eof(&mut flood).await,
        b"",
        "closed without a byte"
    );
    // One within the margin, though older than the flood's, was not cut:
    // its handshake still completes and it is told why.
    let name = rustls_pki_types::ServerName::try_from("a.test").unwrap();
    let mut within_margin = within(
        "TLS handshake",
        tls_connector(&cert.cert_pem).connect(name, waiting.swap_remove(0)),
    )
    .await
    .unwrap();
    assert_told_overloaded(&mut within_margin).await;
    metric_becomes(
        admin,
        "wsgate_rejections_total",
        &[("reason", "overloaded")],
        MARGIN as f64 + 1.0,
    )
    .await;
    drop(waiting);
    proxy.stop().await;
}
