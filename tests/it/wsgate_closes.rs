//! What wsgate closes itself, end to end on real sockets: a dead client
//! found by pings, a message over the limit, a drain with its code and
//! spread; each with the exact frames both ends get, and the metrics.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

/// A backend that reports every frame it receives (unmasked), echoes data
/// frames, answers a Close with the same code and then closes.
pub(crate) async fn recording_backend() -> (SocketAddr, mpsc::UnboundedReceiver<Frame>) {
    let (frames, received) = mpsc::unbounded_channel();
    let (addr, _) = spawn_raw_ws(move |mut stream, head| {
        let frames = frames.clone();
        async move {
            let switched = switching_protocols(&head, &[]);
            if stream.write_all(switched.as_bytes()).await.is_err() {
                return;
            }
            for _ in 0..1000 {
                let frame = read_frame(&mut stream).await;
                let (first, payload) = (frame.first, frame.payload.clone());
                let _ = frames.send(frame);
                let answer = match first & 0x0f {
                    0x1 | 0x2 => ws_frame(first, &payload, None),
                    0x8 => ws_frame(0x88, payload.get(..2).unwrap_or_default(), None),
                    _ => continue,
                };
                if stream.write_all(&answer).await.is_err() {
                    return;
                }
                if first & 0x0f == 0x8 {
                    // The server closes the TCP connection first (RFC 6455
                    // §7.1.1).
                    return;
                }
            }
        }
    })
    .await;
    (addr, received)
}

fn config(backend: SocketAddr, server: &str, route: &str) -> String {
    format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [server]
        {server}
        [admin]
        addr = "127.0.0.1:0"
        [upstream.backend]
        servers = ["{backend}"]
        [[route]]
        name = "chat"
        path = "/"
        upstream = "backend"
        missing_origin = "allow"
        {route}
        "#
    )
}

pub(crate) async fn next_frame(received: &mut mpsc::UnboundedReceiver<Frame>) -> Frame {
    within("a frame at the backend", received.recv())
        .await
        .expect("the backend stopped reporting")
}

pub(crate) fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    payload
}

/// Reads a tungstenite stream to its Close; `None` if it ended without one.
async fn close_of<S>(ws: &mut Ws<S>) -> Option<(u16, String)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    within("a Close frame", async {
        for _ in 0..100 {
            match ws.next().await {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return Some((u16::from(frame.code), frame.reason.as_str().to_owned()));
                }
                Some(Ok(Message::Close(None))) => return Some((1005, String::new())),
                Some(Ok(_)) => {}
                _ => return None,
            }
        }
        None
    })
    .await
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_is_dead_and_the_backend_gets_close_1001() {
    let (backend, mut received) = recording_backend().await;
    let route = "ping_interval = \"300ms\"\nping_timeout = \"300ms\"";
    let proxy = start_proxy(&config(backend, "", route)).await;
    let admin = proxy.admin.unwrap();
    let (head, _, mut client) = exchange(proxy.addr(), &upgrade_request("/", "x", &[])).await;
    assert_eq!(head.status, 101);
    let upgraded = Instant::now();
    // A Ping, unmasked and empty, once the client has been silent long
    // enough; answered with a Pong, the client is alive.
    let ping = read_frame(&mut client).await;
    assert_eq!(
        (ping.first, ping.masked, ping.payload.len()),
        (0x89, false, 0)
    );
    assert!(upgraded.elapsed() >= Duration::from_millis(250));
    client
        .write_all(&ws_frame(0x8A, b"", Some([9, 8, 7, 6])))
        .await
        .unwrap();
    let pong = next_frame(&mut received).await;
    assert_eq!(
        (pong.first, pong.masked),
        (0x8A, true),
        "the Pong passed on"
    );
    // Then silence: after the next Ping and its timeout the backend is
    // told, masked, and the dead client's connection is closed.
    let ping = read_frame(&mut client).await;
    assert_eq!(ping.first, 0x89);
    let close = next_frame(&mut received).await;
    assert_eq!((close.first, close.masked), (0x88, true));
    assert_eq!(close.payload, close_payload(1001, "ping timeout"));
    assert_eq!(
        read_until_eof(&mut client).await,
        b"",
        "nothing after the Ping"
    );
    metric_becomes(
        admin,
        "wsgate_tunnels_closed_total",
        &[("route", "chat"), ("cause", "ping_timeout")],
        1.0,
    )
    .await;
    metric_becomes(
        admin,
        "wsgate_tunnel_closes_total",
        &[("route", "chat"), ("from", "wsgate"), ("code", "1001")],
        1.0,
    )
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn a_client_that_answers_pings_stays_past_many_ping_timeouts() {
    let (backend, mut received) = recording_backend().await;
    let route = "ping_interval = \"200ms\"\nping_timeout = \"200ms\"";
    let proxy = start_proxy(&config(backend, "", route)).await;
    let admin = proxy.admin.unwrap();
    let (mut ws, _) = ws_connect(proxy.addr(), "/", &[]).await.unwrap();
    // tungstenite answers each Ping with a Pong as it reads.
    for round in 0..4 {
        match within("a Ping", ws.next()).await {
            Some(Ok(Message::Ping(payload))) => assert!(payload.is_empty()),
            other => panic!("round {round}: expected a Ping, got {other:?}"),
        }
    }
    ws.send(Message::text("still here")).await.unwrap();
    let echo = within("the echo", async {
        for _ in 0..10 {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => return text.to_string(),
                Some(Ok(_)) => {}
                other => panic!("tunnel ended: {other:?}"),
            }
        }
        panic!("no echo among 10 messages")
    })
    .await;
    assert_eq!(echo, "still here");
    let mut pongs = 0;
    while let Ok(frame) = received.try_recv() {
        pongs += usize::from(frame.first == 0x8A);
    }
    assert!(pongs >= 3, "the backend saw {pongs} Pongs");
    assert_eq!(
        admin_metric(
            admin,
            "wsgate_tunnels_closed_total",
            &[("route", "chat"), ("cause", "ping_timeout")]
        )
        .await,
        0.0
    );
    ws.close(None).await.unwrap();
    drain_ws(ws).await;
    proxy.stop().await;
}

#[tokio::test]
async fn a_message_over_max_message_bytes_never_reaches_the_backend_and_both_get_close_1009() {
    let (backend, mut received) = recording_backend().await;
    let proxy = start_proxy(&config(backend, "", "max_message_bytes = 1000")).await;
    let admin = proxy.admin.unwrap();
    let (mut ws, _) = ws_connect(proxy.addr(), "/", &[]).await.unwrap();
    let fits = "x".repeat(1000);
    ws.send(Message::text(fits.clone())).await.unwrap();
    match within("the echo", ws.next()).await {
        Some(Ok(Message::Text(text))) => assert_eq!(text.as_str(), fits),
        other => panic!("expected the echo, got {other:?}"),
    }
    ws.send(Message::binary(vec![7u8; 1001])).await.unwrap();
    assert_eq!(
        close_of(&mut ws).await,
        Some((1009, "message too big".to_owned()))
    );
    let text = next_frame(&mut received).await;
    assert_eq!((text.first, text.payload.len()), (0x81, 1000));
    let close = next_frame(&mut received).await;
    assert_eq!((close.first, close.masked), (0x88, true));
    assert_eq!(close.payload, close_payload(1009, "message too big"));
    metric_becomes(
        admin,
        "wsgate_tunnels_closed_total",
        &[("route", "chat"), ("cause", "message_too_big")],
        1.0,
    )
    .await;
    metric_becomes(
        admin,
        "wsgate_tunnel_closes_total",
        &[("route", "chat"), ("from", "wsgate"), ("code", "1009")],
        1.0,
    )
    .await;
    assert_eq!(
        admin_metric(
            admin,
            "wsgate_messages_total",
            &[("route", "chat"), ("direction", "client_to_upstream")]
        )
        .await,
        1.0,
        "the refused message is not counted as passed"
    );
    drain_ws(ws).await;
    proxy.stop().await;
}

/// `drain_close_code = 1001`, spread over a second: each tunnel gets its
/// Close at its own moment, the backend a masked copy, and the proxy exits
/// once the handshakes are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_spreads_its_close_frames_with_the_configured_code() {
    let (backend, mut received) = recording_backend().await;
    let server = "drain_timeout = \"10s\"\ndrain_spread = \"1s\"\ndrain_close_code = 1001";
    let proxy = start_proxy(&config(backend, server, "")).await;
    let admin = proxy.admin.unwrap();
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(ws_connect(proxy.addr(), "/", &[]).await.unwrap().0);
    }
    metric_becomes(admin, "wsgate_tunnels_active", &[("route", "chat")], 8.0).await;
    let began = Instant::now();
    let stopped = proxy.begin_shutdown();
    let arrivals = futures_util::future::join_all(clients.into_iter().map(|mut ws| async move {
        let close = close_of(&mut ws).await;
        let at = began.elapsed();
        drain_ws(ws).await;
        (close, at)
    }))
    .await;
    for (close, _) in &arrivals {
        assert_eq!(close, &Some((1001, "going away".to_owned())));
    }
    let mut times: Vec<Duration> = arrivals.iter().map(|(_, at)| *at).collect();
    times.sort();
    let (first, last) = (times[0], times[7]);
    assert!(
        last - first >= Duration::from_millis(500),
        "not spread: {times:?}"
    );
    assert!(last < Duration::from_millis(1500), "late: {times:?}");
    within("the proxy to stop", stopped).await.unwrap().unwrap();
    assert!(began.elapsed() < Duration::from_secs(5));
    let mut closes = 0;
    while let Ok(frame) = received.try_recv() {
        if frame.first == 0x88 {
            assert!(frame.masked);
            assert_eq!(frame.payload, close_payload(1001, "going away"));
            closes += 1;
        }
    }
    assert_eq!(closes, 8);
}
