//! The admin listener: `/metrics` counts what happened with exact values,
//! `/healthz` and `/readyz` answer.

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

/// A masked client text frame "hello": 2 header + 4 mask + 5 payload bytes.
const CLIENT_FRAME_LEN: u64 = 11;
/// The backend's unmasked reply "hello, you": 2 header + 10 payload bytes.
const SERVER_FRAME_LEN: u64 = 12;

#[tokio::test]
async fn metrics_count_upgrades_rejections_tunnel_bytes_and_http_statuses() {
    let (backend, _) = spawn_raw_ws(|mut stream, head| async move {
        stream
            .write_all(switching_protocols(&head, &[]).as_bytes())
            .await
            .unwrap();
        let frame = read_frame(&mut stream).await;
        assert_eq!(frame.payload, b"hello");
        stream
            .write_all(&ws_frame(0x81, b"hello, you", None))
            .await
            .unwrap();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
    })
    .await;
    let origin = spawn_http_origin().await;
    let proxy = start_proxy(&format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [admin]
        addr = "127.0.0.1:0"
        [server]
        drain_timeout = "1s"
        [upstream.ws]
        servers = ["{backend}"]
        [upstream.web]
        servers = ["{}"]
        [[route]]
        name = "chat"
        path = "/ws"
        upstream = "ws"
        origins = ["https://app.example.com"]
        [[route]]
        name = "page"
        path = "/page"
        upstream = "web"
        "#,
        origin.addr
    ))
    .await;
    let admin = proxy.admin.unwrap();
    let chat = ("route", "chat");

    // One upgrade with a known frame exchange.
    let (head, _, mut stream) = exchange(
        proxy.addr(),
        &upgrade_request("/ws", "x", &[("Origin", "https://app.example.com")]),
    )
    .await;
    assert_eq!(head.status, 101);
    metric_becomes(admin, "wsgate_tunnels_active", &[chat], 1.0).await;
    let client_frame = ws_frame(0x81, b"hello", Some([1, 2, 3, 4]));
    assert_eq!(client_frame.len() as u64, CLIENT_FRAME_LEN);
    stream.write_all(&client_frame).await.unwrap();
    let reply = read_frame(&mut stream).await;
    assert_eq!(reply.payload, b"hello, you");
    stream.shutdown().await.unwrap();
    assert!(read_until_eof(&mut stream).await.is_empty());
    metric_becomes(admin, "wsgate_tunnels_active", &[chat], 0.0).await;

    // One rejection.
    let (head, body, _) = exchange(
        proxy.addr(),
        &upgrade_request("/ws", "x", &[("Origin", "https://evil.test")]),
    )
    .await;
    assert_rejected(&head, &body, 403, "origin-forbidden");

    // One plain request, and one that matches no route.
    let (head, _, _) = exchange(
        proxy.addr(),
        "GET /page HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(head.status, 200);
    let (head, body, _) = exchange(
        proxy.addr(),
        "GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_rejected(&head, &body, 404, "no-route");

    let (status, text) = admin_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    let value = |name: &str, labels: &[(&str, &str)]| {
        metric(&text, name, labels)
            .unwrap_or_else(|| panic!("no series {name}{labels:?} in\n{text}"))
    };
    assert_eq!(
        value("wsgate_handshakes_total", &[chat, ("outcome", "upgraded")]),
        1.0
    );
    assert_eq!(
        value("wsgate_handshakes_total", &[chat, ("outcome", "rejected")]),
        1.0
    );
    assert_eq!(
        value(
            "wsgate_handshakes_total",
            &[chat, ("outcome", "upstream_error")]
        ),
        0.0
    );
    assert_eq!(
        value(
            "wsgate_rejections_total",
            &[chat, ("reason", "origin-forbidden")]
        ),
        1.0
    );
    assert_eq!(
        value(
            "wsgate_rejections_total",
            &[("route", "-"), ("reason", "no-route")]
        ),
        1.0
    );
    assert_eq!(value("wsgate_tunnels_active", &[chat]), 0.0);
    assert_eq!(
        value("wsgate_tunnels_closed_total", &[chat, ("cause", "client")]),
        1.0
    );
    assert_eq!(
        value(
            "wsgate_tunnel_bytes_total",
            &[chat, ("direction", "client_to_upstream")]
        ),
        CLIENT_FRAME_LEN as f64
    );
    assert_eq!(
        value(
            "wsgate_tunnel_bytes_total",
            &[chat, ("direction", "upstream_to_client")]
        ),
        SERVER_FRAME_LEN as f64
    );
    assert_eq!(
        value("wsgate_handshake_duration_seconds_count", &[chat]),
        1.0
    );
    assert_eq!(
        value(
            "wsgate_http_requests_total",
            &[("route", "page"), ("status", "200")]
        ),
        1.0
    );
    assert_eq!(
        value(
            "wsgate_http_requests_total",
            &[("route", "-"), ("status", "404")]
        ),
        1.0
    );
    // Upgrades are counted as handshakes, not as HTTP requests.
    assert_eq!(metric(&text, "wsgate_http_requests_total", &[chat]), None);
    proxy.stop().await;
}

#[tokio::test]
async fn health_and_readiness_answer_200() {
    let backend = spawn_ws_echo().await;
    let proxy = start_proxy(&admin_config(backend.addr, "")).await;
    let admin = proxy.admin.unwrap();
    assert_eq!(admin_get(admin, "/healthz").await, (200, "ok\n".to_owned()));
    assert_eq!(
        admin_get(admin, "/readyz").await,
        (200, "ready\n".to_owned())
    );
    assert_eq!(admin_get(admin, "/nope").await.0, 404);
    proxy.stop().await;
}

/// On shutdown /readyz fails at once while the listener still accepts for
/// `drain_delay`; then every tunnel gets Close 1012 and the proxy exits as
/// soon as the closing handshakes end, long before `drain_timeout`.
#[tokio::test]
async fn readiness_fails_during_drain_delay_then_tunnels_get_close_1012() {
    let backend = spawn_ws_echo().await;
    let server = "drain_timeout = \"20s\"\ndrain_delay = \"1s\"";
    let proxy = start_proxy(&admin_config(backend.addr, server)).await;
    let admin = proxy.admin.unwrap();
    let addr = proxy.addr();
    let (early, _) = ws_connect(addr, "/", &[]).await.unwrap();
    let started = std::time::Instant::now();
    let stopped = proxy.begin_shutdown();
    until("/readyz to answer 503", || async {
        admin_get(admin, "/readyz").await == (503, "draining\n".to_owned())
    })
    .await;
    // A client the load balancer sent before it noticed is still served.
    let (late, _) = ws_connect(addr, "/", &[]).await.unwrap();
    for ws in [early, late] {
        assert_eq!(next_close_code(ws).await, Some(1012));
    }
    within("the proxy to stop", stopped).await.unwrap().unwrap();
    let elapsed = started.elapsed();
    assert!(
        elapsed >= std::time::Duration::from_millis(900),
        "listeners closed before drain_delay: {elapsed:?}"
    );
    assert!(
        elapsed < std::time::Duration::from_secs(10),
        "waited for drain_timeout although every tunnel closed: {elapsed:?}"
    );
}

/// A client that never answers the drain's Close is cut at `drain_timeout`.
#[tokio::test]
async fn an_unanswered_drain_close_is_cut_at_drain_timeout() {
    // Neither end answers: the backend switches, then only reads.
    let (backend, _) = spawn_raw_ws(|mut stream, head| async move {
        let switched = switching_protocols(&head, &[]);
        if stream.write_all(switched.as_bytes()).await.is_ok() {
            let mut sink = Vec::new();
            let wait = std::time::Duration::from_secs(30);
            let _ = tokio::time::timeout(wait, stream.read_to_end(&mut sink)).await;
        }
    })
    .await;
    let proxy = start_proxy(&admin_config(backend, "drain_timeout = \"1s\"")).await;
    let (head, _, mut stream) = exchange(proxy.addr(), &upgrade_request("/", "x", &[])).await;
    assert_eq!(head.status, 101);
    let started = std::time::Instant::now();
    let stopped = proxy.begin_shutdown();
    let close = read_frame(&mut stream).await;
    assert_eq!((close.first, close.masked), (0x88, false));
    assert_eq!(close.payload, b"\x03\xf4service restart");
    assert_eq!(read_until_eof(&mut stream).await, b"");
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(900),
        "cut after {:?}",
        started.elapsed()
    );
    within("the proxy to stop", stopped).await.unwrap().unwrap();
}

/// Reads a tungstenite stream to its Close and returns the code; answers
/// it, as tungstenite does.
async fn next_close_code<S>(mut ws: Ws<S>) -> Option<u16>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    within("a Close frame", async {
        for _ in 0..100 {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => {
                    return frame.map(|frame| u16::from(frame.code));
                }
                Some(Ok(_)) => {}
                _ => return None,
            }
        }
        None
    })
    .await
}

/// One echo route that lets Origin-less clients in, plus the admin listener;
/// `server` goes into `[server]`.
fn admin_config(backend: std::net::SocketAddr, server: &str) -> String {
    format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [admin]
        addr = "127.0.0.1:0"
        [server]
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

/// The frame-following counters: the first Close frame's code and sender
/// per tunnel, `from="none", code="1006"` for a tunnel with no Close at all,
/// and data messages each way.
#[tokio::test]
async fn tunnel_closes_count_close_codes_senders_and_messages() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let backend = spawn_ws_echo().await;
    let proxy = start_proxy(&format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [admin]
        addr = "127.0.0.1:0"
        [upstream.ws]
        servers = ["{}"]
        [[route]]
        name = "chat"
        path = "/ws"
        upstream = "ws"
        missing_origin = "allow"
        "#,
        backend.addr
    ))
    .await;
    let admin = proxy.admin.unwrap();
    let chat = ("route", "chat");

    // A clean close with an application code after three echoed messages.
    let (mut ws, response) = ws_connect(proxy.addr(), "/ws", &[]).await.unwrap();
    assert_eq!(response.status(), 101);
    for text in ["one", "two", "three"] {
        ws.send(Message::text(text)).await.unwrap();
        let echoed = within("an echo", ws.next()).await.unwrap().unwrap();
        assert_eq!(echoed, Message::text(text));
    }
    ws.close(Some(CloseFrame {
        code: CloseCode::Library(4001),
        reason: "done".into(),
    }))
    .await
    .unwrap();
    drain_ws(ws).await;
    metric_becomes(
        admin,
        "wsgate_tunnel_closes_total",
        &[chat, ("from", "client"), ("code", "4001")],
        1.0,
    )
    .await;
    metric_becomes(
        admin,
        "wsgate_tunnels_closed_total",
        &[chat, ("cause", "client")],
        1.0,
    )
    .await;
    let messages = |direction| [chat, ("direction", direction)];
    assert_eq!(
        admin_metric(
            admin,
            "wsgate_messages_total",
            &messages("client_to_upstream")
        )
        .await,
        3.0
    );
    assert_eq!(
        admin_metric(
            admin,
            "wsgate_messages_total",
            &messages("upstream_to_client")
        )
        .await,
        3.0
    );

    // A client that vanishes without a Close: what a browser calls 1006.
    let (head, _, stream) = exchange(proxy.addr(), &upgrade_request("/ws", "x", &[])).await;
    assert_eq!(head.status, 101);
    drop(stream);
    metric_becomes(
        admin,
        "wsgate_tunnel_closes_total",
        &[chat, ("from", "none"), ("code", "1006")],
        1.0,
    )
    .await;
    assert_eq!(
        admin_metric(admin, "wsgate_frame_tracking_lost_total", &[chat]).await,
        0.0
    );
}
