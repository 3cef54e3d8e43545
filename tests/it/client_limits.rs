//! Per-client limits on a route: open connections per IP, handshakes per IP,
//! and where they sit in the check order; `origin_checks = "all"` on plain
//! requests.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc};

use crate::common::*;

fn config(backend: SocketAddr, route: &str) -> String {
    format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [admin]
        addr = "127.0.0.1:0"
        [server]
        drain_timeout = "1s"
        [upstream.backend]
        servers = ["{backend}"]
        [[route]]
        name = "limited"
        path = "/"
        upstream = "backend"
        missing_origin = "allow"
        {route}
        "#
    )
}

/// Connects from a chosen loopback source address: every address in
/// 127/8 is this machine, so one test can be several clients.
async fn connect_from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(IpAddr::from(source), 0))
        .unwrap();
    within("connect", socket.connect(addr)).await.unwrap()
}

async fn upgrade_from(source: [u8; 4], addr: SocketAddr) -> (Head, String, TcpStream) {
    let mut stream = connect_from(source, addr).await;
    stream
        .write_all(upgrade_request("/", "x", &[]).as_bytes())
        .await
        .unwrap();
    let (head, body) = read_response(&mut stream, "GET").await;
    (head, String::from_utf8_lossy(&body).into_owned(), stream)
}

#[tokio::test]
async fn open_tunnels_per_ip_are_capped_with_429_until_one_closes() {
    let backend = spawn_ws_echo().await;
    let proxy = start_proxy(&config(backend.addr, "max_connections_per_ip = 2")).await;
    let admin = proxy.admin.unwrap();
    let addr = proxy.addr();
    let (first, _, first_stream) = upgrade_from([127, 0, 0, 1], addr).await;
    let (second, _, _second_stream) = upgrade_from([127, 0, 0, 1], addr).await;
    assert_eq!((first.status, second.status), (101, 101));
    let (third, body, _) = upgrade_from([127, 0, 0, 1], addr).await;
    assert_rejected(&third, &body, 429, "too-many-connections");
    assert!(body.contains("already has 2 connections open"), "{body}");
    // Another client address has its own count.
    let (other, _, _other_stream) = upgrade_from([127, 0, 0, 2], addr).await;
    assert_eq!(other.status, 101);
    assert_eq!(
        admin_metric(
            admin,
            "wsgate_rejections_total",
            &[("route", "limited"), ("reason", "too-many-connections")]
        )
        .await,
        1.0
    );
    // Closing a tunnel frees its slot.
    drop(first_stream);
    metric_becomes(admin, "wsgate_tunnels_active", &[("route", "limited")], 2.0).await;
    let (again, _, _again_stream) = upgrade_from([127, 0, 0, 1], addr).await;
    assert_eq!(again.status, 101);
    proxy.stop().await;
}

/// A backend that answers each plain request only when the test releases
/// a permit: a long poll in flight.
async fn spawn_held_backend(
    release: Arc<Semaphore>,
) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (heads, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let release = release.clone();
            let heads = heads.clone();
            tokio::spawn(async move {
                for _ in 0..16 {
                    let head = read_head(&mut stream).await;
                    if head.is_empty() {
                        return;
                    }
                    let _ = heads.send(head);
                    let Ok(permit) = release.acquire().await else {
                        return;
                    };
                    permit.forget();
                    let answer = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, received)
}

#[tokio::test]
async fn a_request_in_flight_holds_a_slot_until_its_response() {
    let release = Arc::new(Semaphore::new(0));
    let (backend, mut received) = spawn_held_backend(release.clone()).await;
    let proxy = start_proxy(&config(backend, "max_connections_per_ip = 1")).await;
    let addr = proxy.addr();
    let polling = tokio::spawn(async move {
        exchange(
            addr,
            "GET /poll HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
    });
    let held = within("the long poll at the backend", received.recv())
        .await
        .unwrap();
    assert!(held.starts_with("GET /poll "), "{held}");
    let (head, body, _) = exchange(
        addr,
        "GET /other HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_rejected(&head, &body, 429, "too-many-connections");
    release.add_permits(1);
    let (head, body, _) = within("the long poll's answer", polling).await.unwrap();
    assert_eq!((head.status, body.as_str()), (200, "ok"));
    release.add_permits(1);
    let (head, _, _) = exchange(
        addr,
        "GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(head.status, 200, "the answered request freed its slot");
    proxy.stop().await;
}

#[tokio::test]
async fn handshakes_over_the_rate_get_429_with_retry_after_in_whole_seconds() {
    let backend = spawn_ws_echo().await;
    let proxy = start_proxy(&config(backend.addr, "handshake_rate = \"2/m\"")).await;
    let admin = proxy.admin.unwrap();
    let addr = proxy.addr();
    for _ in 0..2 {
        let (head, _, _) = upgrade_from([127, 0, 0, 1], addr).await;
        assert_eq!(head.status, 101);
    }
    let (head, body, _) = upgrade_from([127, 0, 0, 1], addr).await;
    assert_rejected(&head, &body, 429, "rate-limited");
    // One token per 30 s, the burst spent a moment ago.
    assert_eq!(head.get("retry-after"), Some("30"));
    let (other, _, _) = upgrade_from([127, 0, 0, 3], addr).await;
    assert_eq!(other.status, 101, "another address has its own bucket");
    // Plain requests are not handshakes.
    let (plain, _, _) = exchange(
        addr,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_ne!(plain.status, 429);
    assert_eq!(
        admin_metric(
            admin,
            "wsgate_rejections_total",
            &[("route", "limited"), ("reason", "rate-limited")]
        )
        .await,
        1.0
    );
    proxy.stop().await;
}

/// Check order: client IP, then the limits, then the rest — a flood is
/// refused before any token is verified, a denied IP before any limit.
#[tokio::test]
async fn limits_come_after_the_ip_check_and_before_the_token() {
    let backend = spawn_ws_echo().await;
    let route = r#"
        handshake_rate = "1/m"
        deny_ips = ["127.0.0.9/32"]
        [route.auth]
        jwt_secret_file = "secret.txt"
        "#;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret.txt"), "limits-test-secret").unwrap();
    let proxy = start_proxy_in(&config(backend.addr, route), dir.path()).await;
    let addr = proxy.addr();
    let (head, body, _) = upgrade_from([127, 0, 0, 1], addr).await;
    assert_rejected(&head, &body, 401, "token-missing");
    let (head, body, _) = upgrade_from([127, 0, 0, 1], addr).await;
    assert_rejected(&head, &body, 429, "rate-limited");
    for _ in 0..3 {
        let (head, body, _) = upgrade_from([127, 0, 0, 9], addr).await;
        assert_rejected(&head, &body, 403, "ip-forbidden");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn origin_checks_all_refuses_plain_requests_from_forbidden_origins() {
    let origin = spawn_http_origin().await;
    let route = r#"origins = ["https://app.example.com"]
        origin_checks = "all""#;
    let proxy = start_proxy(&config(origin.addr, route)).await;
    let addr = proxy.addr();
    let get = |origin: Option<&str>| {
        let origin = origin
            .map(|o| format!("Origin: {o}\r\n"))
            .unwrap_or_default();
        format!(
            "GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n{origin}Connection: close\r\n\r\n"
        )
    };
    let (head, body, _) = exchange(addr, &get(Some("https://evil.example"))).await;
    assert_rejected(&head, &body, 403, "origin-forbidden");
    let (head, _, _) = exchange(addr, &get(Some("https://app.example.com"))).await;
    assert_eq!(head.status, 200);
    let (head, _, _) = exchange(addr, &get(None)).await;
    assert_eq!(head.status, 200, "no Origin: a same-origin GET");
    proxy.stop().await;

    // The default checks upgrades only: the same forbidden page gets through.
    let route = r#"origins = ["https://app.example.com"]"#;
    let proxy = start_proxy(&config(origin.addr, route)).await;
    let (head, _, _) = exchange(proxy.addr(), &get(Some("https://evil.example"))).await;
    assert_eq!(head.status, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn a_client_over_its_message_rate_is_slowed_and_loses_nothing() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let backend = spawn_ws_echo().await;
    let proxy = start_proxy(&config(backend.addr, "client_message_rate = \"4/s\"")).await;
    let (mut ws, _) = ws_connect(proxy.addr(), "/", &[]).await.unwrap();
    let started = std::time::Instant::now();
    for n in 0..8 {
        ws.send(Message::text(format!("message {n}")))
            .await
            .unwrap();
    }
    for n in 0..8 {
        match within("an echo", ws.next()).await {
            Some(Ok(Message::Text(text))) => assert_eq!(text.as_str(), format!("message {n}")),
            other => panic!("expected echo {n}, got {other:?}"),
        }
    }
    // A burst of 4, then one per 250 ms: the eighth a second in.
    let elapsed = started.elapsed();
    assert!(
        elapsed >= std::time::Duration::from_millis(950),
        "not slowed: {elapsed:?}"
    );
    ws.close(None).await.unwrap();
    drain_ws(ws).await;
    proxy.stop().await;
}
