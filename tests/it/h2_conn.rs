//! HTTP/2 connections as a whole: closed when nothing is in progress, as an
//! idle HTTP/1.1 keep-alive connection is; PING and SETTINGS floods answered
//! one for one without queueing (h2 holds one pending PING ACK and one
//! SETTINGS ACK and reads nothing more until it is written), so a flooder
//! that reads nothing stalls only itself and is cut like any idle client.

use std::net::SocketAddr;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::common::*;
use crate::h2::{h2_client, h2_frame, h2_websocket, read_goaway};

const PING: u8 = 0x6;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;

fn config(cert: &TestCert, backend: SocketAddr) -> String {
    let server = "[server]\nheader_timeout = \"1s\"\ndrain_timeout = \"2s\"";
    tls_echo_config(cert, backend, "", server)
}

/// A TLS connection that has sent the HTTP/2 preface and an empty SETTINGS.
async fn raw_h2(
    proxy: SocketAddr,
    cert: &TestCert,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut config = tls_client_config(Some(&cert.cert_pem), &[&rustls::version::TLS13]);
    config.alpn_protocols = vec![b"h2".to_vec()];
    let mut tls = tls_connect_with(proxy, "localhost", config).await.unwrap();
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend(h2_frame(SETTINGS, 0, 0, &[]));
    tls.write_all(&preface).await.unwrap();
    tls
}

/// Reads HTTP/2 frames off a connection one at a time.
struct FrameReader {
    buffered: Vec<u8>,
}

impl FrameReader {
    fn new() -> FrameReader {
        FrameReader {
            buffered: Vec::new(),
        }
    }

    /// The next frame's type, flags and payload; `None` at the end of the
    /// connection.
    async fn next<S: AsyncRead + Unpin>(&mut self, from: &mut S) -> Option<(u8, u8, Vec<u8>)> {
        let mut chunk = [0u8; 16384];
        for _ in 0..100_000 {
            if self.buffered.len() >= 9 {
                let len =
                    u32::from_be_bytes([0, self.buffered[0], self.buffered[1], self.buffered[2]])
                        as usize;
                if self.buffered.len() >= 9 + len {
                    let frame: Vec<u8> = self.buffered.drain(..9 + len).collect();
                    return Some((frame[3], frame[4], frame[9..].to_vec()));
                }
            }
            let read = within("an HTTP/2 frame", from.read(&mut chunk))
                .await
                .unwrap_or(0);
            if read == 0 {
                return None;
            }
            self.buffered.extend_from_slice(&chunk[..read]);
        }
        panic!("no whole frame in 100000 reads");
    }
}

#[tokio::test]
async fn an_h2_connection_with_nothing_in_progress_gets_goaway_after_header_timeout() {
    let cert = test_cert(&["localhost"]);
    let backend = spawn_ws_echo().await;
    let proxy = start_proxy(&config(&cert, backend.addr)).await;
    // A WebSocket holds its connection open however long it is quiet.
    let mut send = h2_client(proxy.addr(), &cert).await;
    let mut websocket = h2_websocket(&mut send, "/chat").await;

    let connected = Instant::now();
    let mut idle = raw_h2(proxy.addr(), &cert).await;
    assert_eq!(read_goaway(&mut idle).await, 0, "GOAWAY NO_ERROR");
    assert!(
        connected.elapsed() >= std::time::Duration::from_millis(900),
        "closed after {:?}, before header_timeout",
        connected.elapsed()
    );
    assert_eq!(read_until_eof(&mut idle).await, b"");

    // Quiet for longer than the idle connection lived, and still served.
    websocket
        .write_all(&ws_frame(0x81, b"after", Some([1, 2, 3, 4])))
        .await
        .unwrap();
    let echo = read_frame(&mut websocket).await;
    assert_eq!((echo.first, echo.payload), (0x81, b"after".to_vec()));
    drop(websocket);
    proxy.stop().await;
}

#[tokio::test]
async fn ping_and_settings_floods_are_answered_in_order_while_other_clients_echo() {
    const PINGS: u64 = 5000;
    const SETTINGS_FRAMES: usize = 500;
    let cert = test_cert(&["localhost"]);
    let backend = spawn_ws_echo().await;
    let proxy = start_proxy(&config(&cert, backend.addr)).await;
    let tls = raw_h2(proxy.addr(), &cert).await;
    let (mut reading, mut writing) = tokio::io::split(tls);
    let flood = tokio::spawn(async move {
        let mut frames = Vec::new();
        for index in 0..PINGS {
            frames.extend(h2_frame(PING, 0, 0, &index.to_be_bytes()));
            if index % 10 == 0 {
                frames.extend(h2_frame(SETTINGS, 0, 0, &[]));
            }
        }
        writing.write_all(&frames).await.unwrap();
        writing
    });

    let mut send = h2_client(proxy.addr(), &cert).await;
    let mut websocket = h2_websocket(&mut send, "/chat").await;
    websocket
        .write_all(&ws_frame(0x81, b"meanwhile", Some([1, 2, 3, 4])))
        .await
        .unwrap();
    let echo = read_frame(&mut websocket).await;
    assert_eq!(echo.payload, b"meanwhile");

    let mut reader = FrameReader::new();
    let (mut acked_pings, mut acked_settings) = (0u64, 0usize);
    while acked_pings < PINGS {
        let (kind, flags, payload) = reader
            .next(&mut reading)
            .await
            .expect("the connection ended during the flood");
        assert_ne!(kind, GOAWAY, "a GOAWAY during a flood that is read");
        match (kind, flags) {
            (PING, ACK) => {
                assert_eq!(payload, acked_pings.to_be_bytes(), "ACKs in order");
                acked_pings += 1;
            }
            (SETTINGS, ACK) => acked_settings += 1,
            _ => {}
        }
    }
    let mut writing = within("the flood written", flood).await.unwrap();
    // The initial SETTINGS plus one per ten PINGs; all acknowledged.
    for _ in 0..10 {
        if acked_settings == SETTINGS_FRAMES + 1 {
            break;
        }
        match reader.next(&mut reading).await {
            Some((SETTINGS, ACK, _)) => acked_settings += 1,
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(acked_settings, SETTINGS_FRAMES + 1);
    // The flooded connection still works.
    writing
        .write_all(&h2_frame(PING, 0, 0, b"thereaft"))
        .await
        .unwrap();
    let mut answer = None;
    for _ in 0..10 {
        match reader.next(&mut reading).await {
            Some((PING, ACK, payload)) => {
                answer = Some(payload);
                break;
            }
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(answer.as_deref(), Some(&b"thereaft"[..]));
    drop((reading, writing, websocket));
    proxy.stop().await;
}

#[tokio::test]
async fn a_flood_from_a_client_that_reads_nothing_stalls_only_itself_and_is_cut() {
    // Far more than every socket buffer on the way holds: wsgate's ACKs
    // fill the client's receive buffer, then wsgate stops reading, so the
    // write can only end when wsgate cuts the connection.
    const PINGS: u64 = 3_000_000;
    let cert = test_cert(&["localhost"]);
    let backend = spawn_ws_echo().await;
    let proxy = start_proxy(&config(&cert, backend.addr)).await;
    let mut tls = raw_h2(proxy.addr(), &cert).await;
    let flood = tokio::spawn(async move {
        let mut frames = Vec::with_capacity(PINGS as usize * 17);
        for index in 0..PINGS {
            frames.extend(h2_frame(PING, 0, 0, &index.to_be_bytes()));
        }
        let written = tls.write_all(&frames).await;
        (written, tls)
    });
    let mut send = h2_client(proxy.addr(), &cert).await;
    let mut websocket = h2_websocket(&mut send, "/chat").await;
    websocket
        .write_all(&ws_frame(0x81, b"unaffected", Some([1, 2, 3, 4])))
        .await
        .unwrap();
    assert_eq!(read_frame(&mut websocket).await.payload, b"unaffected");
    let (written, _tls) = within("the flooder to be cut", flood).await.unwrap();
    assert!(
        written.is_err(),
        "all {PINGS} PINGs were taken without their ACKs being read"
    );
    drop(websocket);
    proxy.stop().await;
}

#[tokio::test]
async fn a_drain_sends_goaway_no_error_covering_the_open_streams() {
    let cert = test_cert(&["localhost"]);
    // The backend never answers: the GET stays open until the drain ends it.
    let (backend, mut heads) = spawn_silent_backend().await;
    let server = "[server]\ndrain_timeout = \"1s\"";
    let proxy = start_proxy(&tls_echo_config(&cert, backend, "", server)).await;
    let mut tls = raw_h2(proxy.addr(), &cert).await;
    // HPACK: GET, https, /, then :authority localhost as a literal.
    let mut block = vec![0x82, 0x87, 0x84, 0x41, 9];
    block.extend_from_slice(b"localhost");
    tls.write_all(&h2_frame(0x1, 0x4 | 0x1, 1, &block))
        .await
        .unwrap();
    let head = within("the GET at the backend", heads.recv())
        .await
        .unwrap();
    assert!(head.starts_with("GET / HTTP/1.1\r\n"), "{head}");

    let stopping = proxy.begin_shutdown();
    let mut reader = FrameReader::new();
    let mut goaway = None;
    for _ in 0..20 {
        match reader.next(&mut tls).await {
            Some((GOAWAY, _, payload)) => {
                goaway = Some(payload);
                break;
            }
            Some(_) => {}
            None => break,
        }
    }
    let payload = goaway.expect("a GOAWAY before the connection ended");
    let last_stream =
        u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & !(1 << 31);
    let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
    assert_eq!(code, 0, "NO_ERROR");
    assert!(
        last_stream >= 1,
        "the open stream 1 is covered: {last_stream}"
    );
    // The client leaves; its stream's reset ends the connection, and the
    // in-flight GET with it.
    drop(tls);
    within("the proxy to stop", stopping)
        .await
        .unwrap()
        .unwrap();
}
