//! The spliced tunnel: large messages, close codes both ways, half-close, and
//! the idle timeout.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::common::*;

fn config(backend: SocketAddr, route_extra: &str) -> String {
    format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [server]
        drain_timeout = "1s"
        [admin]
        addr = "127.0.0.1:0"
        [upstream.backend]
        servers = ["{backend}"]
        [[route]]
        name = "tunnel"
        path = "/"
        upstream = "backend"
        missing_origin = "allow"
        {route_extra}
        "#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_binary_message_is_echoed_intact() {
    let backend = spawn_ws_echo().await;
    let proxy = start_proxy(&config(backend.addr, "")).await;
    let (mut ws, _) = ws_connect(proxy.addr(), "/big", &[]).await.unwrap();
    let payload: Vec<u8> = (0..16 * 1024 * 1024usize)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 13)) as u8)
        .collect();
    within("sending 16 MiB", ws.send(Message::binary(payload.clone())))
        .await
        .unwrap();
    let echoed = within("the 16 MiB echo", ws.next()).await.unwrap().unwrap();
    match echoed {
        Message::Binary(data) => {
            assert_eq!(data.len(), payload.len());
            assert!(data[..] == payload[..], "the echoed message differs");
        }
        other => panic!("expected a binary echo, got {other:?}"),
    }
    ws.close(None).await.unwrap();
    drain_ws(ws).await;
    proxy.stop().await;
}

#[tokio::test]
async fn client_close_code_reaches_the_backend() {
    let (closes_tx, mut closes) = mpsc::unbounded_channel::<Option<CloseFrame>>();
    let backend = spawn_ws_handler(move |mut ws| {
        let closes_tx = closes_tx.clone();
        async move {
            while let Some(Ok(message)) = ws.next().await {
                if let Message::Close(frame) = message {
                    let _ = closes_tx.send(frame);
                }
            }
        }
    })
    .await;
    let proxy = start_proxy(&config(backend, "")).await;
    let (mut ws, _) = ws_connect(proxy.addr(), "/", &[]).await.unwrap();
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4001),
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    let frame = within("the backend to see the close", closes.recv())
        .await
        .unwrap()
        .expect("close without a code");
    assert_eq!(u16::from(frame.code), 4001);
    assert_eq!(frame.reason.as_str(), "bye");
    drain_ws(ws).await;
    proxy.stop().await;
}

#[tokio::test]
async fn backend_close_code_reaches_the_client() {
    let backend = spawn_ws_handler(|mut ws| async move {
        if let Some(Ok(Message::Text(_))) = ws.next().await {
            let _ = ws
                .close(Some(CloseFrame {
                    code: CloseCode::from(4002),
                    reason: "server bye".into(),
                }))
                .await;
        }
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    let proxy = start_proxy(&config(backend, "")).await;
    let (mut ws, _) = ws_connect(proxy.addr(), "/", &[]).await.unwrap();
    ws.send(Message::text("close me")).await.unwrap();
    match within("the backend's close", ws.next()).await {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 4002);
            assert_eq!(frame.reason.as_str(), "server bye");
        }
        other => panic!("expected a close frame with a code, got {other:?}"),
    }
    drain_ws(ws).await;
    proxy.stop().await;
}

#[tokio::test]
async fn client_half_close_is_passed_on_while_the_backend_keeps_writing() {
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<Vec<u8>>();
    let (backend, _) = spawn_raw_ws(move |mut stream, head| {
        let seen_tx = seen_tx.clone();
        async move {
            stream
                .write_all(switching_protocols(&head, &[]).as_bytes())
                .await
                .unwrap();
            // Everything the client sends, up to its FIN.
            let mut received = Vec::new();
            if within("the client's FIN", stream.read_to_end(&mut received))
                .await
                .is_err()
            {
                return;
            }
            let _ = seen_tx.send(received);
            // The other direction must still be open.
            stream.write_all(b"written after your FIN").await.unwrap();
            stream.shutdown().await.unwrap();
        }
    })
    .await;
    let proxy = start_proxy(&config(backend, "")).await;
    let (head, _, mut stream) = exchange(proxy.addr(), &upgrade_request("/", "x", &[])).await;
    assert_eq!(head.status, 101);
    stream
        .write_all(b"last words from the client")
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let received = within("the backend to see EOF", seen.recv()).await.unwrap();
    assert_eq!(received, b"last words from the client");
    assert_eq!(read_until_eof(&mut stream).await, b"written after your FIN");
    proxy.stop().await;
}

#[tokio::test]
async fn backend_half_close_is_passed_on_while_the_client_keeps_writing() {
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<Vec<u8>>();
    let (backend, _) = spawn_raw_ws(move |mut stream, head| {
        let seen_tx = seen_tx.clone();
        async move {
            stream
                .write_all(switching_protocols(&head, &[]).as_bytes())
                .await
                .unwrap();
            stream.write_all(b"backend is done talking").await.unwrap();
            stream.shutdown().await.unwrap();
            let mut received = Vec::new();
            if within("the client's FIN", stream.read_to_end(&mut received))
                .await
                .is_ok()
            {
                let _ = seen_tx.send(received);
            }
        }
    })
    .await;
    let proxy = start_proxy(&config(backend, "")).await;
    let (head, _, mut stream) = exchange(proxy.addr(), &upgrade_request("/", "x", &[])).await;
    assert_eq!(head.status, 101);
    // The backend's FIN reaches us as EOF...
    let mut from_backend = Vec::new();
    within("the backend's FIN", stream.read_to_end(&mut from_backend))
        .await
        .unwrap();
    assert_eq!(from_backend, b"backend is done talking");
    // ...and our direction still flows.
    stream.write_all(b"but the client is not").await.unwrap();
    stream.shutdown().await.unwrap();
    assert_eq!(
        within("the backend to see our bytes", seen.recv())
            .await
            .unwrap(),
        b"but the client is not"
    );
    proxy.stop().await;
}

/// A backend's Close frame and FIN, which the proxy sends on in one segment,
/// are still a half-close: the client's reply and whatever follows it get
/// through.
#[tokio::test]
async fn backend_close_and_fin_before_the_clients_close_leave_the_client_direction_open() {
    let server_close = ws_frame(0x88, &[0x03, 0xe9], None);
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<Vec<u8>>();
    let (backend, _) = spawn_raw_ws({
        let server_close = server_close.clone();
        move |mut stream, head| {
            let (seen_tx, server_close) = (seen_tx.clone(), server_close.clone());
            async move {
                stream
                    .write_all(switching_protocols(&head, &[]).as_bytes())
                    .await
                    .unwrap();
                stream.write_all(&server_close).await.unwrap();
                stream.shutdown().await.unwrap();
                let _ = seen_tx.send(read_until_eof(&mut stream).await);
            }
        }
    })
    .await;
    let proxy = start_proxy(&config(backend, "")).await;
    let (head, _, mut stream) = exchange(proxy.addr(), &upgrade_request("/", "x", &[])).await;
    assert_eq!(head.status, 101);
    assert_eq!(read_until_eof(&mut stream).await, server_close);
    let mut reply = ws_frame(0x82, b"late but legal", Some([1, 2, 3, 4]));
    reply.extend(ws_frame(0x88, &[0x03, 0xe9], Some([5, 6, 7, 8])));
    stream.write_all(&reply).await.unwrap();
    stream.shutdown().await.unwrap();
    let received = within("the backend to see the client's bytes", seen.recv())
        .await
        .unwrap();
    assert_eq!(received, reply);
    proxy.stop().await;
}

#[tokio::test]
async fn idle_tunnel_is_closed_after_idle_timeout() {
    let backend = spawn_ws_echo().await;
    let proxy = start_proxy(&config(backend.addr, r#"idle_timeout = "1s""#)).await;
    let admin = proxy.admin.unwrap();
    let (head, _, mut stream) = exchange(proxy.addr(), &upgrade_request("/", "x", &[])).await;
    assert_eq!(head.status, 101);
    let upgraded_at = Instant::now();
    metric_becomes(admin, "wsgate_tunnels_active", &[("route", "tunnel")], 1.0).await;
    // Not a 1006: a Close 1001 at the timeout; the echo backend answers
    // it and closes, and its FIN is passed on.
    let close = read_frame(&mut stream).await;
    let at_close = upgraded_at.elapsed();
    assert_eq!((close.first, close.masked), (0x88, false));
    assert_eq!(close.payload, b"\x03\xe9idle timeout");
    assert!(
        at_close >= Duration::from_millis(900),
        "closed after only {at_close:?}"
    );
    let leftover = read_until_eof(&mut stream).await;
    assert!(leftover.is_empty(), "unexpected bytes {leftover:?}");
    metric_becomes(
        admin,
        "wsgate_tunnel_closes_total",
        &[("route", "tunnel"), ("from", "wsgate"), ("code", "1001")],
        1.0,
    )
    .await;
    metric_becomes(
        admin,
        "wsgate_tunnels_closed_total",
        &[("route", "tunnel"), ("cause", "idle_timeout")],
        1.0,
    )
    .await;
    metric_becomes(admin, "wsgate_tunnels_active", &[("route", "tunnel")], 0.0).await;
    proxy.stop().await;
}

#[tokio::test]
async fn traffic_keeps_an_idle_timeout_tunnel_alive() {
    let backend = spawn_ws_echo().await;
    let proxy = start_proxy(&config(backend.addr, r#"idle_timeout = "1s""#)).await;
    let admin = proxy.admin.unwrap();
    let (mut ws, _) = ws_connect(proxy.addr(), "/", &[]).await.unwrap();
    let started = Instant::now();
    // Pacing, not synchronisation: one echo every 250 ms for 2.5 idle timeouts.
    let mut ticks = tokio::time::interval(Duration::from_millis(250));
    for round in 0..10 {
        ticks.tick().await;
        let text = format!("keepalive {round}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let echoed = within("an echo", ws.next())
            .await
            .expect("tunnel closed")
            .expect("tunnel failed");
        assert_eq!(echoed, Message::text(text));
    }
    assert!(started.elapsed() >= Duration::from_millis(2000));
    assert_eq!(
        admin_metric(admin, "wsgate_tunnels_active", &[("route", "tunnel")]).await,
        1.0
    );
    assert_eq!(
        admin_metric(
            admin,
            "wsgate_tunnels_closed_total",
            &[("route", "tunnel"), ("cause", "idle_timeout")]
        )
        .await,
        0.0
    );
    ws.close(None).await.unwrap();
    drain_ws(ws).await;
    metric_becomes(admin, "wsgate_tunnels_active", &[("route", "tunnel")], 0.0).await;
    assert_eq!(
        admin_metric(
            admin,
            "wsgate_tunnels_closed_total",
            &[("route", "tunnel"), ("cause", "idle_timeout")]
        )
        .await,
        0.0
    );
    proxy.stop().await;
}

#[tokio::test]
async fn single_bytes_cross_without_buffering() {
    let (backend, _) = spawn_raw_ws(|mut stream, head| async move {
        stream
            .write_all(switching_protocols(&head, &[]).as_bytes())
            .await
            .unwrap();
        // Answer each byte with the next one: neither side writes again until
        // it has read, so any buffering in the proxy would stall this.
        let mut byte = [0u8; 1];
        while stream.read_exact(&mut byte).await.is_ok() {
            if stream.write_all(&[byte[0] + 1]).await.is_err() {
                return;
            }
        }
    })
    .await;
    let proxy = start_proxy(&config(backend, "")).await;
    let (head, _, mut stream) = exchange(proxy.addr(), &upgrade_request("/", "x", &[])).await;
    assert_eq!(head.status, 101);
    for value in (0u8..40).step_by(2) {
        stream.write_all(&[value]).await.unwrap();
        let mut byte = [0u8; 1];
        within("one byte back", stream.read_exact(&mut byte))
            .await
            .unwrap();
        assert_eq!(byte[0], value + 1);
    }
    drop(stream);
    proxy.stop().await;
}

#[tokio::test]
async fn bytes_sent_right_behind_either_head_are_not_lost() {
    // The backend writes its 101 and its first frame in one write.
    let (backend, _) = spawn_raw_ws(|mut stream, head| async move {
        let mut answer = switching_protocols(&head, &[]).into_bytes();
        answer.extend_from_slice(&ws_frame(0x81, b"welcome", None));
        stream.write_all(&answer).await.unwrap();
        let frame = read_frame(&mut stream).await;
        stream
            .write_all(&ws_frame(0x81, &frame.payload, None))
            .await
            .unwrap();
        let _ = read_until_eof(&mut stream).await;
    })
    .await;
    let proxy = start_proxy(&config(backend, "")).await;
    let mut stream = connect(proxy.addr()).await;
    // The client pipelines its first frame behind the upgrade request.
    let mut request = upgrade_request("/", "x", &[]).into_bytes();
    request.extend_from_slice(&ws_frame(0x81, b"early bird", Some([9, 8, 7, 6])));
    stream.write_all(&request).await.unwrap();
    let (head, _) = read_response(&mut stream, "GET").await;
    assert_eq!(head.status, 101);
    assert_eq!(read_frame(&mut stream).await.payload, b"welcome");
    assert_eq!(read_frame(&mut stream).await.payload, b"early bird");
    drop(stream);
    proxy.stop().await;
}
