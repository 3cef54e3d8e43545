//! `wsgate load` against real servers on loopback: the echo backend, a
//! server that refuses every upgrade, a closed port, a TLS front,
//! deliberately broken WebSocket peers, and backends that talk on their own
//! or close with a code of their choosing. With `--h2`: wsgate itself
//! (in-process, real TLS, ALPN h2) in front of the echo backend, and an
//! HTTP/2 server that does not enable RFC 8441.

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use wsgate::tools::load::{LoadArgs, LoadReport, execute};

fn args(flags: &[&str]) -> LoadArgs {
    let argv = std::iter::once("wsgate-load").chain(flags.iter().copied());
    match LoadArgs::try_parse_from(argv) {
        Ok(args) => args,
        Err(error) => panic!("flags {flags:?} rejected: {error}"),
    }
}

/// Runs `wsgate load` with `flags` written as on a command line.
async fn run(flags: &str) -> LoadReport {
    let flags: Vec<&str> = flags.split_whitespace().collect();
    execute(&args(&flags)).await.expect("load run")
}

async fn listen() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    (listener, addr)
}

async fn spawn_echo() -> SocketAddr {
    let (listener, addr) = listen().await;
    tokio::spawn(wsgate::tools::echo::serve(listener));
    addr
}

/// Answers every request with `response` and hands each request head to the test.
async fn spawn_raw(response: &'static str) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    let (listener, addr) = listen().await;
    let (heads_tx, heads_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let heads_tx = heads_tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = heads_tx.send(String::from_utf8_lossy(&head).into_owned());
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (addr, heads_rx)
}

/// A WebSocket peer that upgrades, then runs `behave` on each connection.
async fn spawn_ws<F, Fut>(behave: F) -> SocketAddr
where
    F: Fn(tokio_tungstenite::WebSocketStream<TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (listener, addr) = listen().await;
    let behave = Arc::new(behave);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let behave = behave.clone();
            tokio::spawn(async move {
                if let Ok(ws) = tokio_tungstenite::accept_async(stream).await {
                    behave(ws).await;
                }
            });
        }
    });
    addr
}

/// A WebSocket server that answers each binary message with `answer(message)`.
async fn spawn_answering<F, Fut>(answer: F) -> SocketAddr
where
    F: Fn(Bytes) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = Bytes> + Send,
{
    spawn_ws(move |mut ws| async move {
        while let Some(Ok(Message::Binary(data))) = ws.next().await {
            if ws.send(Message::Binary(answer(data).await)).await.is_err() {
                return;
            }
        }
    })
    .await
}

/// TLS in front of `backend` with a fresh self-signed certificate for localhost.
async fn spawn_tls_front(backend: SocketAddr) -> SocketAddr {
    spawn_counting_tls_front(backend).await.0
}

/// As [`spawn_tls_front`], also counting the handshakes that were resumed.
async fn spawn_counting_tls_front(
    backend: SocketAddr,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let resumed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = resumed.clone();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (listener, addr) = listen().await;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let Ok(mut upstream) = TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
            });
        }
    });
    (addr, resumed)
}

/// Per connection: a text greeting first; each pair of messages echoed the
/// other way round; after every fourth message an untagged broadcast, and the
/// fourth message's echo a second time.
async fn spawn_chatty() -> SocketAddr {
    spawn_ws(|mut ws| async move {
        if ws.send(Message::text(GREETING)).await.is_err() {
            return;
        }
        let mut held = None;
        let mut count = 0u64;
        while let Some(Ok(message)) = ws.next().await {
            // A Close is answered by tungstenite on the next read.
            let Message::Binary(data) = message else {
                continue;
            };
            count += 1;
            let Some(first) = held.take() else {
                held = Some(data);
                continue;
            };
            let mut out = vec![data.clone(), first];
            if count % 4 == 0 {
                out.extend([Bytes::from_static(BROADCAST), data]);
            }
            for message in out {
                if ws.send(Message::Binary(message)).await.is_err() {
                    return;
                }
            }
        }
    })
    .await
}

const GREETING: &str = "welcome";
const BROADCAST: &[u8] = b"news for everyone";

fn codes(pairs: &[(u16, u64)]) -> BTreeMap<u16, u64> {
    pairs.iter().copied().collect()
}

fn only_status(report: &LoadReport, status: u16, count: u64) {
    let expected = [(status, count)].into_iter().collect();
    assert_eq!(report.statuses, expected, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_mode_checks_every_message_and_reconnects() {
    let addr = spawn_echo().await;
    let url = format!("ws://{addr}/echo");
    let report = run(&format!(
        "--url {url} --mode echo --connections 4 --messages 10 --duration 700ms"
    ))
    .await;
    let h = &report.handshakes;
    assert!(h.succeeded >= 4, "{report}");
    assert_eq!(h.attempted, h.succeeded, "{report}");
    assert_eq!((h.failed, h.unfinished), (0, 0), "{report}");
    only_status(&report, 101, h.succeeded);
    let m = &report.messages;
    assert!(m.sent >= 40, "{report}");
    assert_eq!(m.received, m.sent, "{report}");
    assert_eq!(m.bytes_sent, m.sent * 128, "{report}");
    assert_eq!(m.bytes_received, m.bytes_sent, "{report}");
    let rtt = report.echo_rtt_ms.as_ref().expect("rtt samples");
    assert_eq!(rtt.count, m.received);
    assert!(rtt.p50 <= rtt.p99 && rtt.p99 <= rtt.max, "{report}");
    assert_eq!(report.errors.total(), 0, "{report}");
    assert_eq!(m.received_unsolicited, 0, "{report}");
    // The client closes with 1000 and the echo backend answers in kind.
    assert_eq!(
        report.close_codes,
        codes(&[(1000, h.succeeded)]),
        "{report}"
    );
    assert!(report.passed());
    // Reconnecting means more sessions than connections in 700 ms.
    assert!(h.succeeded > 4, "{report}");

    let json = serde_json::to_value(&report).expect("json");
    assert_eq!(json["mode"], "echo");
    assert_eq!(json["statuses"]["101"], h.succeeded);
    assert_eq!(json["messages"]["received"], m.received);
    assert_eq!(json["messages"]["received_unsolicited"], 0);
    assert_eq!(json["close_codes"]["1000"], h.succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backends_own_messages_and_swapped_echoes_are_no_errors() {
    let addr = spawn_chatty().await;
    let url = format!("ws://{addr}/");
    // Hold mode sends each connection's messages exactly once, so the
    // backend's extras are known in advance; two in flight let it swap.
    let report = run(&format!(
        "--url {url} --mode hold --connections 3 --messages 12 --in-flight 2 --duration 500ms"
    ))
    .await;
    assert_eq!(report.handshakes.succeeded, 3, "{report}");
    assert_eq!(report.errors.total(), 0, "{report}");
    let m = &report.messages;
    assert_eq!((m.sent, m.received), (36, 36), "{report}");
    assert_eq!(m.bytes_received, 36 * 128, "{report}");
    let rtt = report.echo_rtt_ms.as_ref().expect("rtt samples");
    assert_eq!(rtt.count, 36, "{report}");
    // Per connection: the greeting, then after messages 4, 8 and 12 a
    // broadcast and a repeated echo.
    assert_eq!(m.received_unsolicited, 3 * (1 + 3 * 2), "{report}");
    let extra_bytes = GREETING.len() + 3 * (BROADCAST.len() + 128);
    assert_eq!(
        m.bytes_received_unsolicited,
        3 * extra_bytes as u64,
        "{report}"
    );
    assert_eq!(report.close_codes, codes(&[(1000, 3)]), "{report}");
    assert!(report.passed(), "{report}");
    let text = report.to_string();
    assert!(text.contains("\nunsolicited     21 msgs"), "{text}");
    assert!(text.contains("\nclose codes     1000: 3\n"), "{text}");
    let json = serde_json::to_value(&report).expect("json");
    assert_eq!(json["messages"]["received_unsolicited"], 21);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_codes_are_counted_per_connection() {
    // By upgrade order: Close 1012, Close 1001, a Close without a code, and
    // a dropped TCP connection with no Close at all; twice each.
    let upgraded = Arc::new(AtomicUsize::new(0));
    let addr = spawn_ws(move |mut ws| {
        let nth = upgraded.fetch_add(1, Ordering::Relaxed);
        async move {
            let frame = |code: u16, reason: &'static str| {
                Some(CloseFrame {
                    code: CloseCode::from(code),
                    reason: reason.into(),
                })
            };
            let close = match nth % 4 {
                0 => frame(1012, "service restart"),
                1 => frame(1001, "going away"),
                2 => None,
                _ => return,
            };
            if ws.close(close).await.is_err() {
                return;
            }
            // Until the client's answer ends the closing handshake.
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
    let url = format!("ws://{addr}/");
    let report = run(&format!("--url {url} --connections 8 --duration 500ms")).await;
    assert_eq!(report.handshakes.succeeded, 8, "{report}");
    let expected = codes(&[(1001, 2), (1005, 2), (1006, 2), (1012, 2)]);
    assert_eq!(report.close_codes, expected, "{report}");
    // The server ended every connection before the client was done.
    assert_eq!(report.errors.closed_early, 8, "{report}");
    assert_eq!(report.messages.received_unsolicited, 0, "{report}");
    let text = report.to_string();
    assert!(
        text.contains("\nclose codes     1001: 2  1005: 2  1006: 2  1012: 2\n"),
        "{text}"
    );
    let json = serde_json::to_value(&report).expect("json");
    assert_eq!(json["close_codes"]["1012"], 2);
    assert_eq!(json["close_codes"]["1006"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_with_messages_in_flight() {
    let addr = spawn_echo().await;
    let url = format!("ws://{addr}/");
    let report = run(&format!("--url {url} --mode bulk --connections 2 --messages 8 --in-flight 4 --message-size 300000 --duration 700ms"))
    .await;
    let m = &report.messages;
    assert!(m.sent >= 16, "{report}");
    assert_eq!(m.received, m.sent, "{report}");
    assert_eq!(m.bytes_received, m.sent * 300_000, "{report}");
    assert!(report.passed(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_mode_opens_each_connection_once() {
    let addr = spawn_echo().await;
    let url = format!("ws://{addr}");
    let report = run(&format!(
        "--url {url} --connections 20 --messages 3 --mode hold --duration 500ms"
    ))
    .await;
    assert_eq!(report.handshakes.attempted, 20, "{report}");
    assert_eq!(report.handshakes.succeeded, 20, "{report}");
    assert_eq!(report.peak_open_connections, 20, "{report}");
    assert_eq!(report.messages.sent, 60, "{report}");
    assert_eq!(report.messages.received, 60, "{report}");
    assert_eq!(report.close_codes, codes(&[(1000, 20)]), "{report}");
    assert!(report.passed(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_mode_respects_rate() {
    let addr = spawn_echo().await;
    let url = format!("ws://{addr}/");
    let report = run(&format!(
        "--url {url} --mode handshake --connections 4 --rate 50 --duration 1s"
    ))
    .await;
    // 50/s over one second: slots at 0, 20 ms, … 980 ms.
    let h = &report.handshakes;
    assert!((40..=50).contains(&h.attempted), "{report}");
    assert_eq!(h.succeeded, h.attempted, "{report}");
    assert!(report.handshake_latency_ms.is_some());
    assert_eq!(report.messages.sent, 0);
    assert_eq!(
        report.close_codes,
        codes(&[(1000, h.succeeded)]),
        "{report}"
    );
    assert!(report.passed(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_status_is_counted_and_headers_are_sent() {
    let (addr, mut heads) = spawn_raw("HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n").await;
    let url = format!("ws://{addr}/chat?room=1");
    let report = execute(&args(&[
        "--url",
        &url,
        "--connections",
        "3",
        "--duration",
        "300ms",
        "--origin",
        "https://app.example.com",
        "-H",
        "X-Test: yes",
        "--header",
        "Sec-WebSocket-Version: 8",
    ]))
    .await
    .expect("load run");
    assert_eq!(report.handshakes.attempted, 3, "{report}");
    assert_eq!(report.handshakes.succeeded, 0, "{report}");
    assert_eq!(report.failures.http_status, 3, "{report}");
    assert_eq!(report.handshakes.failed, 3, "{report}");
    only_status(&report, 403, 3);
    assert!(!report.passed());

    let head = heads
        .recv()
        .await
        .expect("a request head")
        .to_ascii_lowercase();
    assert!(head.starts_with("get /chat?room=1 http/1.1\r\n"), "{head}");
    assert!(
        head.contains("\r\norigin: https://app.example.com\r\n"),
        "{head}"
    );
    assert!(head.contains("\r\nx-test: yes\r\n"), "{head}");
    assert!(head.contains("\r\nsec-websocket-version: 8\r\n"), "{head}");
    assert_eq!(head.matches("sec-websocket-version").count(), 1, "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_port_counts_connect_refused() {
    let (listener, addr) = listen().await;
    drop(listener);
    let url = format!("ws://{addr}/");
    let report = run(&format!("--url {url} --connections 2 --duration 300ms")).await;
    assert_eq!(report.handshakes.attempted, 2, "{report}");
    assert_eq!(report.failures.connect_refused, 2, "{report}");
    assert_eq!(report.handshakes.succeeded, 0, "{report}");
    assert!(report.statuses.is_empty(), "{report}");
    assert!(!report.passed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_server_is_a_timeout_and_the_run_still_ends() {
    // Never accepted: the kernel completes the TCP handshake, nobody answers the upgrade.
    let (_listener, addr) = listen().await;
    let url = format!("ws://{addr}/");
    let started = std::time::Instant::now();
    let report = run(&format!(
        "--url {url} --connections 2 --duration 300ms --timeout 500ms"
    ))
    .await;
    assert_eq!(report.failures.timeout, 2, "{report}");
    assert_eq!(report.handshakes.succeeded, 0, "{report}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_with_insecure_accepts_a_self_signed_certificate() {
    let front = spawn_tls_front(spawn_echo().await).await;
    let url = format!("wss://localhost:{}/", front.port());
    let report = run(&format!(
        "--url {url} --insecure --mode echo --connections 2 --messages 5 --duration 500ms"
    ))
    .await;
    assert!(report.handshakes.succeeded >= 2, "{report}");
    assert_eq!(report.handshakes.failed, 0, "{report}");
    assert!(report.messages.sent >= 10, "{report}");
    assert_eq!(report.messages.received, report.messages.sent, "{report}");
    assert!(report.passed(), "{report}");

    // Without --insecure the unknown issuer is a TLS failure.
    let report = run(&format!("--url {url} --connections 2 --duration 300ms")).await;
    assert_eq!(report.failures.tls, 2, "{report}");
    assert_eq!(report.handshakes.succeeded, 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_echo_is_a_mismatch() {
    // The last byte: with the first, the tag up front, it would be no echo of
    // that message at all, but unsolicited, and the real echo a timeout.
    let addr = spawn_answering(|data| async move {
        let mut data = data.to_vec();
        if let Some(last) = data.last_mut() {
            *last ^= 0xff;
        }
        data.into()
    })
    .await;
    let url = format!("ws://{addr}/");
    let report = run(&format!(
        "--url {url} --connections 2 --messages 5 --duration 300ms"
    ))
    .await;
    assert!(report.errors.echo_mismatch >= 2, "{report}");
    assert_eq!(report.messages.received, 0, "{report}");
    assert!(!report.passed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_tunnel_is_closed_early() {
    let addr = spawn_ws(|ws| async move { drop(ws) }).await;
    let url = format!("ws://{addr}/");
    let report = run(&format!("--url {url} --connections 3 --duration 500ms")).await;
    assert_eq!(report.handshakes.succeeded, 3, "{report}");
    assert_eq!(report.errors.closed_early, 3, "{report}");
    assert_eq!(report.close_codes, codes(&[(1006, 3)]), "{report}");
    assert!(!report.passed());
}

#[test]
fn flags_are_validated() {
    let parse = |flags: &[&str]| {
        LoadArgs::try_parse_from(std::iter::once("x").chain(flags.iter().copied()))
    };
    assert!(parse(&[]).is_err(), "--url is required");
    assert!(parse(&["--url", "http://localhost/"]).is_err());
    assert!(parse(&["--url", "ws://localhost/", "--connections", "0"]).is_err());
    assert!(parse(&["--url", "ws://localhost/", "--rate", "-1"]).is_err());
    assert!(parse(&["--url", "ws://localhost/", "--header", "no colon"]).is_err());
    assert!(parse(&["--url", "ws://localhost/", "--mode", "sideways"]).is_err());
    let args = parse(&["--url", "wss://localhost:8443/ws", "--duration", "1m 30s"]).expect("valid");
    assert_eq!(args.duration, std::time::Duration::from_secs(90));
    assert_eq!((args.connections, args.messages, args.in_flight), (1, 0, 1));
}

/// main.rs embeds the flags as `Load(LoadArgs)` in its subcommand enum.
#[test]
fn flags_work_as_a_subcommand() {
    #[derive(clap::Parser)]
    enum Cli {
        Load(LoadArgs),
    }
    let parsed = Cli::try_parse_from(["wsgate", "load", "--url", "ws://localhost/", "--json"]);
    let Ok(Cli::Load(args)) = parsed else {
        panic!("subcommand parse failed");
    };
    assert!(args.json);
}

#[tokio::test]
async fn contradictory_modes_are_refused() {
    let echo_without_messages = args(&["--url", "ws://127.0.0.1:9/", "--mode", "echo"]);
    assert!(execute(&echo_without_messages).await.is_err());
    let handshake_with_messages = args(&[
        "--url",
        "ws://127.0.0.1:9/",
        "--mode",
        "handshake",
        "--messages",
        "3",
    ]);
    assert!(execute(&handshake_with_messages).await.is_err());
    // Each message carries a 16-byte tag; one that cannot hold it is refused.
    let too_small = "--url ws://127.0.0.1:9/ --messages 3 --message-size 15";
    let too_small = args(&too_small.split_whitespace().collect::<Vec<_>>());
    let error = match execute(&too_small).await {
        Ok(report) => panic!("--message-size 15 ran: {report}"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("--message-size"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_rate_caps_echoes_on_connections_that_stay_open() {
    let addr = spawn_echo().await;
    let url = format!("ws://{addr}/");
    let report = run(&format!("--url {url} --mode echo --connections 4 --message-rate 200 --messages 1000000000 --duration 1s"))
    .await;
    // 200/s for 1 s; each connection may be one slot and one in-flight echo
    // off at the edges.
    let m = &report.messages;
    assert!((50..=200 + 4 + 1).contains(&m.received), "{report}");
    assert_eq!(m.received, m.sent, "{report}");
    assert_eq!(report.errors.total(), 0, "{report}");
    let h = &report.handshakes;
    assert_eq!((h.attempted, h.succeeded, h.failed), (4, 4, 0), "{report}");
    let rtt = report.echo_rtt_ms.as_ref().expect("rtt samples");
    assert_eq!(rtt.count, m.received, "{report}");
    assert!(report.passed(), "{report}");
    assert_eq!(report.message_rate, Some(200.0));
    let json = serde_json::to_value(&report).expect("json");
    assert_eq!(json["message_rate"], 200.0);
    assert!(
        report.to_string().contains("message rate 200/s"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_rate_holds_across_reconnects() {
    let addr = spawn_echo().await;
    let url = format!("ws://{addr}/");
    let report = run(&format!(
        "--url {url} --connections 4 --message-rate 200 --messages 5 --duration 500ms"
    ))
    .await;
    let m = &report.messages;
    assert!((25..=100 + 4 + 1).contains(&m.received), "{report}");
    assert_eq!(m.received, m.sent, "{report}");
    // Each connection reconnects once its 5 messages are used up.
    assert!(report.handshakes.succeeded > 4, "{report}");
    assert!(report.passed(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_round_trip_counts_from_the_slot_a_slow_echo_held_back() {
    const ECHO_DELAY: std::time::Duration = std::time::Duration::from_millis(50);
    let addr = spawn_answering(|data| async move {
        tokio::time::sleep(ECHO_DELAY).await;
        data
    })
    .await;
    let url = format!("ws://{addr}/");
    // One slot every 20 ms, one message in flight, each echo takes 50 ms: every
    // send waits for the window, past its slot and the next. Timed from the
    // actual send a round trip would be ~50 ms; from when the sender woke for
    // the slot ~100 ms (the window counted, the missed slot not); from the
    // scheduled slot 130-150 ms.
    let report = run(&format!(
        "--url {url} --message-rate 50 --messages 1000000000 --duration 800ms"
    ))
    .await;
    let rtt = report.echo_rtt_ms.as_ref().expect("rtt samples");
    assert!(rtt.p50 >= 115.0, "{report}");
    assert!(report.messages.received <= 40 + 1, "{report}");
    assert_eq!(report.errors.total(), 0, "{report}");
}

#[tokio::test]
async fn message_rate_is_refused_without_echo_messages() {
    let refused = [
        &["--mode", "hold", "--messages", "3"][..],
        &["--mode", "handshake"],
        &["--mode", "echo", "--messages", "0"],
        &["--messages", "0"],
    ];
    for flags in refused {
        let all = [
            &["--url", "ws://127.0.0.1:9/", "--message-rate", "100"][..],
            flags,
        ]
        .concat();
        let error = match execute(&args(&all)).await {
            Ok(report) => panic!("{flags:?} ran: {report}"),
            Err(error) => format!("{error:#}"),
        };
        assert!(error.contains("--message-rate"), "{flags:?}: {error}");
    }
    let parse = |rate: &str| {
        LoadArgs::try_parse_from(["x", "--url", "ws://localhost/", "--message-rate", rate])
    };
    for bad in ["0", "-5", "NaN", "inf", "fast"] {
        assert!(parse(bad).is_err(), "--message-rate {bad} accepted");
    }
    assert_eq!(parse("0.5").expect("valid").message_rate, Some(0.5));
}

#[test]
fn the_binary_exits_with_an_error_naming_message_rate() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["load", "--url", "ws://127.0.0.1:9/", "--mode", "hold"])
        .args(["--message-rate", "100"])
        .output()
        .expect("run wsgate");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--message-rate"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_tls_resume_makes_every_handshake_a_full_one() {
    let (front, resumed) = spawn_counting_tls_front(spawn_echo().await).await;
    let url = format!("wss://localhost:{}/", front.port());
    let flags = format!("--url {url} --insecure --mode handshake --duration 400ms");
    let report = run(&flags).await;
    assert!(report.handshakes.succeeded >= 3, "{report}");
    let resumed_by_default = resumed.swap(0, std::sync::atomic::Ordering::Relaxed);
    assert!(
        resumed_by_default >= 1,
        "the client never resumed: {report}"
    );

    let report = run(&format!("{flags} --no-tls-resume")).await;
    assert!(report.handshakes.succeeded >= 3, "{report}");
    assert_eq!(
        resumed.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "{report}"
    );
}

// ---------------------------------------------------------------------------
// --h2: WebSockets as RFC 8441 streams on shared HTTP/2 connections.
// ---------------------------------------------------------------------------

/// wsgate with a TLS listener (HTTP/2 on unless `http2` is false) in front
/// of `backend`, allowing the origin `https://localhost`, with an admin listener.
fn h2_proxy_config(cert: &common::TestCert, backend: SocketAddr, http2: bool) -> String {
    common::tls_echo_config(
        cert,
        backend,
        &format!("http2 = {http2}"),
        "[admin]\naddr = \"127.0.0.1:0\"\n[server]\ndrain_timeout = \"1s\"",
    )
}

async fn h2_proxy(http2: bool) -> (common::TestProxy, SocketAddr) {
    let cert = common::test_cert(&["localhost"]);
    let proxy = common::start_proxy(&h2_proxy_config(&cert, spawn_echo().await, http2)).await;
    let admin = proxy.admin.expect("admin listener");
    // The certificate's files are read at start; the folder may go now.
    drop(cert);
    (proxy, admin)
}

/// A plain TCP relay to `target` that counts the connections it accepted:
/// what the load tool says about its TCP connections is checked from outside.
async fn spawn_counting_relay(target: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    let (listener, addr) = listen().await;
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut upstream) = TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    (addr, accepted)
}

/// wsgate's own count of upgrades, with the whole exposition for a failure message.
async fn upgraded_by_wsgate(admin: SocketAddr) -> (f64, String) {
    let (status, text) = common::admin_get(admin, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    let upgraded = common::metric(
        &text,
        "wsgate_handshakes_total",
        &[("route", "/"), ("outcome", "upgraded")],
    );
    (upgraded.unwrap_or(0.0), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_echo_on_two_connections_of_five_streams_each() {
    let (proxy, admin) = h2_proxy(true).await;
    let url = format!("wss://localhost:{}/echo", proxy.addr().port());
    // Hold mode sends each WebSocket's messages exactly once: exact counts.
    let report = run(&format!(
        "--url {url} --insecure --origin https://localhost --h2 --streams-per-connection 5 \
         --connections 10 --mode hold --messages 7 --in-flight 2 --duration 500ms"
    ))
    .await;
    assert_eq!(report.protocol, "h2", "{report}");
    assert_eq!(report.streams_per_connection, Some(5), "{report}");
    assert_eq!(report.tcp_connections, 2, "{report}");
    let h = &report.handshakes;
    assert_eq!((h.attempted, h.succeeded), (10, 10), "{report}");
    assert_eq!((h.failed, h.unfinished), (0, 0), "{report}");
    // RFC 8441: a 200 opens the stream where HTTP/1.1 has a 101.
    only_status(&report, 200, 10);
    let m = &report.messages;
    assert_eq!((m.sent, m.received), (70, 70), "{report}");
    assert_eq!(
        (m.bytes_sent, m.bytes_received),
        (70 * 128, 70 * 128),
        "{report}"
    );
    assert_eq!(m.received_unsolicited, 0, "{report}");
    assert_eq!(
        report.echo_rtt_ms.as_ref().map(|l| l.count),
        Some(70),
        "{report}"
    );
    assert_eq!(report.errors.total(), 0, "{report}");
    assert_eq!(report.close_codes, codes(&[(1000, 10)]), "{report}");
    assert_eq!(report.peak_open_connections, 10, "{report}");
    assert!(report.passed(), "{report}");
    let (upgraded, metrics) = upgraded_by_wsgate(admin).await;
    assert_eq!(upgraded, 10.0, "{metrics}");

    let json = serde_json::to_value(&report).expect("json");
    assert_eq!(json["protocol"], "h2");
    assert_eq!(json["streams_per_connection"], 5);
    assert_eq!(json["tcp_connections"], 2);
    assert_eq!(json["statuses"]["200"], 10);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_handshakes_are_new_streams_on_the_same_connections() {
    let (proxy, admin) = h2_proxy(true).await;
    let (relay, accepted) = spawn_counting_relay(proxy.addr()).await;
    let url = format!("wss://localhost:{}/", relay.port());
    let report = run(&format!(
        "--url {url} --insecure --origin https://localhost --h2 --streams-per-connection 4 \
         --connections 6 --mode handshake --duration 500ms"
    ))
    .await;
    let h = &report.handshakes;
    // Six workers reconnecting for 500 ms: many more streams than workers.
    assert!(h.succeeded > 6, "{report}");
    assert_eq!(h.attempted, h.succeeded, "{report}");
    assert_eq!((h.failed, h.unfinished), (0, 0), "{report}");
    only_status(&report, 200, h.succeeded);
    assert_eq!(
        report.close_codes,
        codes(&[(1000, h.succeeded)]),
        "{report}"
    );
    assert!(report.passed(), "{report}");
    // ceil(6 / 4) TLS connections carried every one of them.
    assert_eq!(report.tcp_connections, 2, "{report}");
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "{report}");
    let (upgraded, metrics) = upgraded_by_wsgate(admin).await;
    assert_eq!(upgraded, h.succeeded as f64, "{report}\n{metrics}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_refusal_counts_the_status() {
    let (proxy, admin) = h2_proxy(true).await;
    let url = format!("wss://localhost:{}/", proxy.addr().port());
    let report = run(&format!(
        "--url {url} --insecure --origin https://evil.example --h2 --streams-per-connection 2 \
         --connections 4 --duration 300ms"
    ))
    .await;
    let h = &report.handshakes;
    assert_eq!((h.attempted, h.succeeded, h.failed), (4, 0, 4), "{report}");
    assert_eq!(report.failures.http_status, 4, "{report}");
    assert_eq!(report.failures.total(), 4, "{report}");
    only_status(&report, 403, 4);
    assert_eq!(report.tcp_connections, 2, "{report}");
    assert!(report.close_codes.is_empty(), "{report}");
    assert!(!report.passed());
    let refused = common::admin_metric(
        admin,
        "wsgate_rejections_total",
        &[("route", "/"), ("reason", "origin-forbidden")],
    )
    .await;
    assert_eq!(refused, 4.0);
    proxy.stop().await;
}

fn load_error(result: anyhow::Result<LoadReport>) -> String {
    match result {
        Ok(report) => panic!("the run should have been refused: {report}"),
        Err(error) => format!("{error:#}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_against_an_http1_only_listener_fails_clearly() {
    let (proxy, _admin) = h2_proxy(false).await;
    let url = format!("wss://localhost:{}/", proxy.addr().port());
    let flags = ["--url", &url, "--insecure", "--h2", "--duration", "300ms"];
    let error = load_error(execute(&args(&flags)).await);
    assert_eq!(
        error,
        "--h2: the server chose ALPN http/1.1, not h2: HTTP/2 is off on that listener \
         (wsgate: `http2 = false`)"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_streams_beyond_the_servers_limit_fail_clearly() {
    let (proxy, _admin) = h2_proxy(true).await;
    let url = format!("wss://localhost:{}/", proxy.addr().port());
    let flags = [
        "--url",
        &url,
        "--insecure",
        "--h2",
        "--streams-per-connection",
        "200",
        "--duration",
        "300ms",
    ];
    let error = load_error(execute(&args(&flags)).await);
    assert_eq!(
        error,
        "--h2: the server allows 128 concurrent streams per connection \
         (SETTINGS_MAX_CONCURRENT_STREAMS), fewer than --streams-per-connection 200"
    );
    proxy.stop().await;
}

/// An HTTP/2 server (ALPN h2) that never enables the extended CONNECT.
async fn spawn_h2_without_connect_protocol() -> SocketAddr {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .expect("server config");
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (listener, addr) = listen().await;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_request| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Empty::<Bytes>::new(),
                    ))
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_without_the_connect_protocol_setting_fails_clearly() {
    let addr = spawn_h2_without_connect_protocol().await;
    let url = format!("wss://localhost:{}/", addr.port());
    let flags = ["--url", &url, "--insecure", "--h2", "--duration", "300ms"];
    let error = load_error(execute(&args(&flags)).await);
    assert_eq!(
        error,
        "--h2: the server did not send SETTINGS_ENABLE_CONNECT_PROTOCOL = 1, so it cannot \
         carry WebSockets over HTTP/2 (RFC 8441)"
    );
}

#[tokio::test]
async fn h2_flags_are_validated() {
    let error = load_error(execute(&args(&["--url", "ws://127.0.0.1:9/", "--h2"])).await);
    assert_eq!(
        error,
        "--h2 needs a wss:// URL: HTTP/2 is chosen by ALPN in the TLS handshake"
    );
    let without_h2 = LoadArgs::try_parse_from([
        "x",
        "--url",
        "wss://localhost/",
        "--streams-per-connection",
        "5",
    ]);
    assert!(
        without_h2.is_err(),
        "--streams-per-connection accepted without --h2"
    );
    let zero = LoadArgs::try_parse_from([
        "x",
        "--url",
        "wss://localhost/",
        "--h2",
        "--streams-per-connection",
        "0",
    ]);
    assert!(zero.is_err(), "--streams-per-connection 0 accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_echo_and_bulk_reconnect_as_new_streams() {
    let (proxy, _admin) = h2_proxy(true).await;
    let url = format!("wss://localhost:{}/", proxy.addr().port());
    let flags = format!("--url {url} --insecure --origin https://localhost --h2");
    let report = run(&format!(
        "{flags} --streams-per-connection 2 --connections 4 --mode echo --messages 5 --duration 500ms"
    ))
    .await;
    let (h, m) = (&report.handshakes, &report.messages);
    // Reconnecting: more WebSockets than workers, on the same two connections.
    assert!(h.succeeded > 4, "{report}");
    assert_eq!(
        (h.attempted, h.failed, h.unfinished),
        (h.succeeded, 0, 0),
        "{report}"
    );
    assert_eq!(report.tcp_connections, 2, "{report}");
    assert!(m.sent >= 20, "{report}");
    assert_eq!(m.received, m.sent, "{report}");
    assert_eq!(m.bytes_received, m.sent * 128, "{report}");
    assert_eq!(report.errors.total(), 0, "{report}");
    assert_eq!(
        report.close_codes,
        codes(&[(1000, h.succeeded)]),
        "{report}"
    );

    // 1 MiB messages cross both flow-control windows of each stream.
    let report = run(&format!(
        "{flags} --streams-per-connection 2 --connections 2 --mode bulk --messages 3 --in-flight 2 \
         --duration 500ms"
    ))
    .await;
    let (h, m) = (&report.handshakes, &report.messages);
    assert!(h.succeeded >= 2, "{report}");
    assert_eq!(
        (h.attempted, h.failed, h.unfinished),
        (h.succeeded, 0, 0),
        "{report}"
    );
    assert_eq!(report.tcp_connections, 1, "{report}");
    assert!(m.sent >= 6, "{report}");
    assert_eq!(m.received, m.sent, "{report}");
    assert_eq!(m.bytes_received, m.sent * (1 << 20), "{report}");
    assert_eq!(report.errors.total(), 0, "{report}");
    proxy.stop().await;
}
