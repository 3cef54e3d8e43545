//! A WebSocket on an HTTP/2 stream is the same tunnel as one on an HTTP/1.1
//! connection: the same frames come back byte for byte (Autobahn's client
//! speaks only HTTP/1.1, so these frame-level cases stand in for it over
//! RFC 8441), and the idle timeout, pings and message limit end it the same
//! way — each on its own stream, the others undisturbed.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::common::*;
use crate::h2::{h2_client, h2_websocket};
use crate::wsgate_closes::{close_payload, next_frame, recording_backend};

/// A backend that sends every frame back as it came, whatever its opcode or
/// reserved bits, unmasked; after a Close it closes the connection.
async fn mirror_backend() -> SocketAddr {
    let (addr, _) = spawn_raw_ws(|mut stream, head| async move {
        if stream
            .write_all(switching_protocols(&head, &[]).as_bytes())
            .await
            .is_err()
        {
            return;
        }
        for _ in 0..100 {
            let frame = read_frame(&mut stream).await;
            let answer = ws_frame(frame.first, &frame.payload, None);
            if stream.write_all(&answer).await.is_err() || frame.first & 0x0f == 0x8 {
                return;
            }
        }
    })
    .await;
    addr
}

/// What a client sends in the frame-level cases: data of every length
/// encoding, a fragmented message with a Ping between its fragments, a
/// permessage-deflate frame (RSV1, passed untouched), a Pong, then Close.
fn script() -> Vec<(u8, Vec<u8>)> {
    vec![
        (0x81, b"hello".to_vec()),
        (0x82, Vec::new()),
        (0x82, vec![1; 125]),
        (0x82, vec![2; 126]),
        (0x82, (0..65_535).map(big_body_byte).collect()),
        (0x82, (0..65_536).map(big_body_byte).collect()),
        (0x01, b"frag".to_vec()),
        (0x89, b"between".to_vec()),
        (0x00, b"men".to_vec()),
        (0x80, b"ted".to_vec()),
        (0xC1, vec![0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]),
        (0x8A, b"unsolicited".to_vec()),
        (0x88, close_payload(1000, "bye")),
    ]
}

/// Data messages in [`script`]: each whole message once.
const SCRIPT_MESSAGES: f64 = 8.0;

/// Sends the script one frame at a time and records each answer; then the
/// connection must end.
async fn run_script<S: AsyncRead + AsyncWrite + Unpin>(socket: &mut S) -> Vec<(u8, bool, Vec<u8>)> {
    let mut answers = Vec::new();
    for (index, (first, payload)) in script().into_iter().enumerate() {
        let mask = [index as u8, 0x5a, 0xa5, 0x3c];
        socket
            .write_all(&ws_frame(first, &payload, Some(mask)))
            .await
            .unwrap();
        let answer = read_frame(socket).await;
        answers.push((answer.first, answer.masked, answer.payload));
    }
    assert_eq!(read_until_eof(socket).await, b"", "nothing after the Close");
    answers
}

/// A WebSocket over TLS with ALPN `http/1.1`, upgraded on `path`.
async fn http11_websocket(
    proxy: SocketAddr,
    cert: &TestCert,
    path: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut config = tls_client_config(Some(&cert.cert_pem), &[&rustls::version::TLS13]);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut http11 = tls_connect_with(proxy, "localhost", config).await.unwrap();
    let request = upgrade_request(path, "localhost", &[("Origin", "https://localhost")]);
    http11.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut http11, "GET").await.0.status, 101);
    http11
}

fn config(cert: &TestCert, mirror: SocketAddr, recorder: SocketAddr) -> String {
    format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        tls = {{ certs = [ {{ cert = "{}", key = "{}" }} ] }}
        [admin]
        addr = "127.0.0.1:0"
        [upstream.mirror]
        servers = ["{mirror}"]
        [upstream.recorder]
        servers = ["{recorder}"]
        [[route]]
        name = "h1"
        path = "/h1"
        upstream = "mirror"
        origins = ["https://localhost"]
        [[route]]
        name = "h2"
        path = "/h2"
        upstream = "mirror"
        origins = ["https://localhost"]
        [[route]]
        name = "limit"
        path = "/limit"
        upstream = "recorder"
        origins = ["https://localhost"]
        max_message_bytes = 1000
        [[route]]
        name = "ping"
        path = "/ping"
        upstream = "recorder"
        origins = ["https://localhost"]
        ping_interval = "300ms"
        ping_timeout = "300ms"
        [[route]]
        name = "idle"
        path = "/idle"
        upstream = "recorder"
        origins = ["https://localhost"]
        idle_timeout = "1s"
        "#,
        cert.cert_path.display(),
        cert.key_path.display(),
    )
}

#[tokio::test]
async fn frames_cross_an_h2_stream_exactly_as_they_cross_http11_and_direct() {
    let cert = test_cert(&["localhost"]);
    let mirror = mirror_backend().await;
    let (recorder, _) = recording_backend().await;
    let proxy = start_proxy(&config(&cert, mirror, recorder)).await;
    let admin = proxy.admin.unwrap();

    let mut direct = connect(mirror).await;
    let request = upgrade_request("/", "localhost", &[]);
    direct.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut direct, "GET").await.0.status, 101);
    let expected = run_script(&mut direct).await;
    let echoed: Vec<(u8, bool, Vec<u8>)> = script()
        .into_iter()
        .map(|(first, payload)| (first, false, payload))
        .collect();
    assert_eq!(expected, echoed, "the mirror sends every frame back");

    let mut http11 = http11_websocket(proxy.addr(), &cert, "/h1").await;
    assert_eq!(run_script(&mut http11).await, expected, "HTTP/1.1 tunnel");

    let mut send = h2_client(proxy.addr(), &cert).await;
    let mut stream = h2_websocket(&mut send, "/h2").await;
    assert_eq!(run_script(&mut stream).await, expected, "HTTP/2 stream");

    for route in ["h1", "h2"] {
        for direction in ["client_to_upstream", "upstream_to_client"] {
            metric_becomes(
                admin,
                "wsgate_messages_total",
                &[("route", route), ("direction", direction)],
                SCRIPT_MESSAGES,
            )
            .await;
        }
        metric_becomes(
            admin,
            "wsgate_tunnel_closes_total",
            &[("route", route), ("from", "client"), ("code", "1000")],
            1.0,
        )
        .await;
    }
    proxy.stop().await;
}

#[tokio::test]
async fn invalid_framing_passes_h2_and_http11_unchanged_and_only_stops_the_following() {
    let cert = test_cert(&["localhost"]);
    let mirror = mirror_backend().await;
    let (recorder, _) = recording_backend().await;
    let proxy = start_proxy(&config(&cert, mirror, recorder)).await;
    let admin = proxy.admin.unwrap();
    let http11 = http11_websocket(proxy.addr(), &cert, "/h1").await;
    let mut send = h2_client(proxy.addr(), &cert).await;
    let stream = h2_websocket(&mut send, "/h2").await;
    let mut sockets: [Box<dyn Duplex>; 2] = [Box::new(http11), Box::new(stream)];
    for socket in &mut sockets {
        // A reserved opcode: passed on and mirrored back unchanged, and so
        // is what follows it.
        for (first, payload) in [(0x83, &b"reserved"[..]), (0x81, &b"after"[..])] {
            socket
                .write_all(&ws_frame(first, payload, Some([1, 2, 3, 4])))
                .await
                .unwrap();
            let answer = read_frame(socket).await;
            assert_eq!((answer.first, answer.payload), (first, payload.to_vec()));
        }
    }
    drop(sockets);
    for route in ["h1", "h2"] {
        metric_becomes(
            admin,
            "wsgate_frame_tracking_lost_total",
            &[("route", route)],
            1.0,
        )
        .await;
    }
    proxy.stop().await;
}

trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Duplex for S {}

#[tokio::test]
async fn idle_timeout_pings_and_the_message_limit_end_h2_streams_and_spare_the_rest() {
    let cert = test_cert(&["localhost"]);
    let mirror = mirror_backend().await;
    let (recorder, mut received) = recording_backend().await;
    let proxy = start_proxy(&config(&cert, mirror, recorder)).await;
    let admin = proxy.admin.unwrap();
    let mut send = h2_client(proxy.addr(), &cert).await;
    let mut spared = h2_websocket(&mut send, "/limit").await;
    let mut too_big = h2_websocket(&mut send, "/limit").await;
    let mut silent = h2_websocket(&mut send, "/ping").await;
    let mut idle = h2_websocket(&mut send, "/idle").await;

    too_big
        .write_all(&ws_frame(0x82, &[7; 1001], Some([4, 3, 2, 1])))
        .await
        .unwrap();
    let close = read_frame(&mut too_big).await;
    assert_eq!(
        (close.first, close.masked, close.payload),
        (0x88, false, close_payload(1009, "message too big"))
    );

    // The dead-peer check: a Ping, then nothing answered; the backend is
    // told and the stream ends.
    let ping = read_frame(&mut silent).await;
    assert_eq!(
        (ping.first, ping.masked, ping.payload.len()),
        (0x89, false, 0)
    );
    assert_eq!(read_until_eof(&mut silent).await, b"");

    let close = read_frame(&mut idle).await;
    assert_eq!(
        (close.first, close.payload),
        (0x88, close_payload(1001, "idle timeout"))
    );

    // What the backend was sent, by the three closing tunnels, in any order.
    let mut closes = Vec::new();
    for _ in 0..3 {
        let frame = next_frame(&mut received).await;
        assert_eq!((frame.first, frame.masked), (0x88, true));
        closes.push(frame.payload);
    }
    closes.sort();
    let mut expected = vec![
        close_payload(1009, "message too big"),
        close_payload(1001, "ping timeout"),
        close_payload(1001, "idle timeout"),
    ];
    expected.sort();
    assert_eq!(closes, expected);

    for (route, cause) in [
        ("limit", "message_too_big"),
        ("ping", "ping_timeout"),
        ("idle", "idle_timeout"),
    ] {
        metric_becomes(
            admin,
            "wsgate_tunnels_closed_total",
            &[("route", route), ("cause", cause)],
            1.0,
        )
        .await;
    }
    // The connection and its first stream are untouched by all of it.
    spared
        .write_all(&ws_frame(0x81, b"still here", Some([5, 6, 7, 8])))
        .await
        .unwrap();
    let echo = read_frame(&mut spared).await;
    assert_eq!((echo.first, echo.payload), (0x81, b"still here".to_vec()));
    let echoed = next_frame(&mut received).await;
    assert_eq!(echoed.payload, b"still here");
    drop(spared);
    proxy.stop().await;
}
