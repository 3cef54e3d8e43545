//! The splice driven over in-memory pipes. Each test holds the two
//! application ends — the client's and the upstream server's — of two
//! `tokio::io::duplex` pairs and splices the proxy ends in a task.

use super::pump::CHUNK;
use super::*;

use std::sync::Arc;
use std::task::Context;

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf, duplex};
use tokio::task::JoinHandle;
use tokio::time::timeout;

impl crate::stream::HoldForFin for DuplexStream {}

/// Bound on every wait for something that should happen promptly.
const DEADLINE: Duration = Duration::from_secs(10);
/// An idle timeout no test reaches.
const NEVER_IDLE: Duration = Duration::from_secs(3600);

struct Tunnel {
    /// The client application's end.
    client: DuplexStream,
    /// The upstream server's end.
    upstream: DuplexStream,
    drain: Arc<Drain>,
    task: JoinHandle<TunnelOutcome>,
}

/// Splices two fresh duplex pairs of `buffer` bytes each in a task; the
/// proxy ends are dropped when `splice` returns.
fn start(buffer: usize, idle_timeout: Duration) -> Tunnel {
    start_with(buffer, TunnelConfig::idle_only(idle_timeout))
}

fn start_with(buffer: usize, rules: TunnelConfig) -> Tunnel {
    let (client, mut client_proxy) = duplex(buffer);
    let (mut upstream_proxy, upstream) = duplex(buffer);
    let drain = Arc::new(Drain::new());
    let shared = drain.clone();
    let task = tokio::spawn(async move {
        let _open = shared.open_tunnel();
        splice(&mut client_proxy, &mut upstream_proxy, &rules, &shared).await
    });
    Tunnel {
        client,
        upstream,
        drain,
        task,
    }
}

/// The cause and byte counts of a finished splice: these tests send
/// bytes that are not WebSocket framing, so the frame facts are
/// asserted by the tests that send frames.
async fn finished(task: JoinHandle<TunnelOutcome>) -> (CloseCause, u64, u64) {
    let outcome = timeout(DEADLINE, task)
        .await
        .expect("splice did not return in time")
        .expect("splice task panicked");
    bytes_and_cause(outcome)
}

fn bytes_and_cause(outcome: TunnelOutcome) -> (CloseCause, u64, u64) {
    (
        outcome.cause,
        outcome.client_to_upstream,
        outcome.upstream_to_client,
    )
}

fn outcome(
    cause: CloseCause,
    client_to_upstream: u64,
    upstream_to_client: u64,
) -> (CloseCause, u64, u64) {
    (cause, client_to_upstream, upstream_to_client)
}

/// Bytes whose period (251, a prime) lines up with no buffer size, so a
/// dropped, repeated or reordered stretch shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i % 251) as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

async fn send<W: AsyncWrite + Unpin>(writer: &mut W, bytes: &[u8]) {
    timeout(DEADLINE, writer.write_all(bytes))
        .await
        .expect("write did not finish in time")
        .expect("write failed");
}

async fn fin<W: AsyncWrite + Unpin>(writer: &mut W) {
    timeout(DEADLINE, writer.shutdown())
        .await
        .expect("shutdown did not finish in time")
        .expect("shutdown failed");
}

async fn receive<R: AsyncRead + Unpin>(reader: &mut R, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    timeout(DEADLINE, reader.read_exact(&mut bytes))
        .await
        .expect("read did not finish in time")
        .expect("read failed");
    bytes
}

async fn receive_to_eof<R: AsyncRead + Unpin>(reader: &mut R) -> Vec<u8> {
    let mut bytes = Vec::new();
    timeout(DEADLINE, reader.read_to_end(&mut bytes))
        .await
        .expect("EOF did not arrive in time")
        .expect("read failed");
    bytes
}

#[test]
fn causes_have_their_metric_labels() {
    let labels = [
        CloseCause::Client,
        CloseCause::Upstream,
        CloseCause::IdleTimeout,
        CloseCause::Drain,
        CloseCause::PingTimeout,
        CloseCause::MessageTooBig,
        CloseCause::Error,
    ]
    .map(CloseCause::as_str);
    assert_eq!(
        labels,
        [
            "client",
            "upstream",
            "idle_timeout",
            "drain",
            "ping_timeout",
            "message_too_big",
            "error"
        ]
    );
    let from = [CloseFrom::Client, CloseFrom::Upstream, CloseFrom::Wsgate].map(CloseFrom::as_str);
    assert_eq!(from, ["client", "upstream", "wsgate"]);
}

#[tokio::test]
async fn bytes_cross_both_ways_unchanged_and_counted() {
    // 100 KiB each way, several CHUNKs, through pipes far smaller than one.
    let Tunnel {
        client,
        upstream,
        task,
        ..
    } = start(1000, NEVER_IDLE);
    let request = pattern(100 * 1024, 1);
    let response = pattern(100 * 1024 + 17, 100);
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut upstream_rx, mut upstream_tx) = tokio::io::split(upstream);

    let (_, _, at_upstream, at_client) = tokio::join!(
        send(&mut client_tx, &request),
        send(&mut upstream_tx, &response),
        receive(&mut upstream_rx, request.len()),
        receive(&mut client_rx, response.len()),
    );
    assert!(at_upstream == request, "client→upstream bytes changed");
    assert!(at_client == response, "upstream→client bytes changed");
    assert!(!task.is_finished(), "tunnel ended with both sides open");

    // The client closes first, then the upstream follows.
    fin(&mut client_tx).await;
    assert_eq!(receive_to_eof(&mut upstream_rx).await, b"");
    fin(&mut upstream_tx).await;
    assert_eq!(
        finished(task).await,
        outcome(
            CloseCause::Client,
            request.len() as u64,
            response.len() as u64
        )
    );
    assert_eq!(receive_to_eof(&mut client_rx).await, b"");
}

#[tokio::test]
async fn client_fin_reaches_upstream_while_responses_keep_flowing() {
    let Tunnel {
        mut client,
        mut upstream,
        task,
        ..
    } = start(4096, NEVER_IDLE);
    send(&mut client, b"last request").await;
    fin(&mut client).await;
    // The FIN is passed on right behind the bytes.
    assert_eq!(receive_to_eof(&mut upstream).await, b"last request");
    assert!(!task.is_finished(), "tunnel ended on a half-close");

    // Upstream→client still flows, in several writes, after the FIN.
    let response = pattern(40 * 1024, 3);
    for part in response.chunks(10 * 1024) {
        send(&mut upstream, part).await;
        assert!(receive(&mut client, part.len()).await == part);
    }
    assert!(!task.is_finished(), "tunnel ended on a half-close");

    fin(&mut upstream).await;
    assert_eq!(
        finished(task).await,
        outcome(CloseCause::Client, 12, response.len() as u64)
    );
    assert_eq!(receive_to_eof(&mut client).await, b"");
}

#[tokio::test]
async fn upstream_fin_first_is_an_upstream_close() {
    let Tunnel {
        mut client,
        mut upstream,
        task,
        ..
    } = start(4096, NEVER_IDLE);
    send(&mut upstream, b"bye").await;
    fin(&mut upstream).await;
    assert_eq!(receive_to_eof(&mut client).await, b"bye");

    // Client→upstream still flows after the upstream's FIN.
    send(&mut client, b"still here").await;
    assert_eq!(receive(&mut upstream, 10).await, b"still here");
    assert!(!task.is_finished(), "tunnel ended on a half-close");

    fin(&mut client).await;
    assert_eq!(finished(task).await, outcome(CloseCause::Upstream, 10, 3));
    // Both FINs were sent, so the proxy end is dropped rather than shut
    // down; the upstream sees EOF either way.
    assert_eq!(receive_to_eof(&mut upstream).await, b"");
}

/// An idle tunnel gets Close 1001 both ways (masked toward the backend);
/// with no answer, both connections are closed a second later.
#[tokio::test(start_paused = true)]
async fn silent_tunnel_gets_close_1001_then_is_closed_unanswered() {
    let idle = Duration::from_secs(5);
    let began = Instant::now();
    let Tunnel {
        mut client,
        mut upstream,
        task,
        ..
    } = start(4096, idle);
    let expected = close_with(1001, "idle timeout", None);
    assert_eq!(receive(&mut client, expected.len()).await, expected);
    assert_eq!(began.elapsed(), idle);
    assert_eq!(
        unmask(&receive(&mut upstream, expected.len() + 4).await),
        expected
    );
    let ended = splice_outcome(task).await;
    assert_eq!(
        bytes_and_cause(ended),
        outcome(CloseCause::IdleTimeout, 0, 0)
    );
    assert_eq!(ended.close, Some((CloseFrom::Wsgate, Some(1001))));
    assert_eq!(began.elapsed(), idle + CLOSE_ANSWER_WAIT);
    assert_eq!(receive_to_eof(&mut client).await, b"");
    assert_eq!(receive_to_eof(&mut upstream).await, b"");
}

#[tokio::test]
async fn traffic_either_way_resets_the_idle_clock() {
    // A byte every 50 ms, alternating directions, for over three idle
    // timeouts: the tunnel must outlive them all, then time out once quiet.
    let idle = Duration::from_millis(300);
    let gap = Duration::from_millis(50);
    let rounds = 20;
    let Tunnel {
        mut client,
        mut upstream,
        task,
        ..
    } = start(4096, idle);
    let began = Instant::now();
    let mut last_sent = began;
    for round in 0..rounds {
        last_sent = Instant::now();
        if round % 2 == 0 {
            send(&mut client, &[round]).await;
            assert_eq!(receive(&mut upstream, 1).await, [round]);
        } else {
            send(&mut upstream, &[round]).await;
            assert_eq!(receive(&mut client, 1).await, [round]);
        }
        assert!(
            !task.is_finished(),
            "timed out in round {round} despite traffic"
        );
        tokio::time::sleep(gap).await;
    }
    assert!(!task.is_finished(), "timed out despite traffic");
    assert!(began.elapsed() >= idle * 3);

    let ended = finished(task).await;
    assert!(
        last_sent.elapsed() >= idle,
        "timed out sooner than {idle:?} after the last byte"
    );
    assert_eq!(
        ended,
        outcome(
            CloseCause::IdleTimeout,
            u64::from(rounds / 2),
            u64::from(rounds / 2)
        )
    );
}

#[tokio::test]
async fn stalled_reader_stops_the_splice_reading() {
    const PIPE: usize = 64;
    let Tunnel {
        mut client,
        mut upstream,
        task,
        ..
    } = start(PIPE, NEVER_IDLE);
    let data = pattern(1024 * 1024, 9);

    // The upstream reads nothing: the client's writes must stall once the
    // two pipes and at most one CHUNK held by the splice are full.
    let mut accepted = 0;
    let stalled = timeout(Duration::from_millis(500), async {
        while accepted < data.len() {
            accepted += client.write(&data[accepted..]).await.expect("write failed");
        }
    })
    .await;
    assert!(
        stalled.is_err(),
        "1 MiB went in with nobody reading upstream"
    );
    assert!(accepted > 0, "the splice read nothing");
    assert!(
        accepted <= PIPE + CHUNK + PIPE,
        "the splice took {accepted} bytes for a reader that reads none"
    );

    // Once the upstream reads, the rest follows, whole and in order.
    let (_, at_upstream) = tokio::join!(
        async {
            send(&mut client, &data[accepted..]).await;
            fin(&mut client).await;
        },
        receive_to_eof(&mut upstream),
    );
    assert_eq!(at_upstream.len(), data.len());
    assert!(
        at_upstream == data,
        "bytes lost or reordered under backpressure"
    );

    fin(&mut upstream).await;
    assert_eq!(
        finished(task).await,
        outcome(CloseCause::Client, data.len() as u64, 0)
    );
}

/// Bytes that are not WebSocket framing leave no frame boundary for a
/// Close: the drain cuts the tunnel at once.
#[tokio::test]
async fn drain_cuts_a_tunnel_whose_frames_are_not_followed() {
    let Tunnel {
        mut client,
        mut upstream,
        drain,
        task,
    } = start(4096, NEVER_IDLE);
    send(&mut client, b"ping").await;
    assert_eq!(receive(&mut upstream, 4).await, b"ping");
    send(&mut upstream, b"pong!").await;
    assert_eq!(receive(&mut client, 5).await, b"pong!");
    assert!(!task.is_finished());

    drain.begin(Duration::ZERO, DEADLINE, 1012);
    assert_eq!(finished(task).await, outcome(CloseCause::Drain, 4, 5));
    assert_eq!(receive_to_eof(&mut client).await, b"");
    assert_eq!(receive_to_eof(&mut upstream).await, b"");
}

/// A tunnel that opens during a drain gets its Close at once, and is cut
/// at the drain's end when nobody answers.
#[tokio::test(start_paused = true)]
async fn a_tunnel_opened_during_a_drain_is_closed_then_cut() {
    let drain = Drain::new();
    drain.begin(Duration::ZERO, Duration::from_secs(3), 1012);
    let (mut client, mut client_proxy) = duplex(64);
    let (mut upstream_proxy, mut upstream) = duplex(64);
    let started = Instant::now();
    let rules = TunnelConfig::idle_only(NEVER_IDLE);
    let splicing = splice(&mut client_proxy, &mut upstream_proxy, &rules, &drain);
    let reading = async {
        let to_client = receive(&mut client, 4 + 15).await;
        let to_upstream = receive(&mut upstream, 8 + 15).await;
        (to_client, to_upstream)
    };
    let (ended, (to_client, to_upstream)) = tokio::join!(splicing, reading);
    assert_eq!(to_client, close_with(1012, "service restart", None));
    assert_eq!(
        unmask(&to_upstream),
        close_with(1012, "service restart", None)
    );
    assert_eq!(bytes_and_cause(ended), outcome(CloseCause::Drain, 0, 0));
    assert_eq!(ended.close, Some((CloseFrom::Wsgate, Some(1012))));
    assert_eq!(started.elapsed(), Duration::from_secs(3));
}

#[tokio::test]
async fn upstream_gone_ends_the_tunnel_as_upstream() {
    let Tunnel {
        mut client,
        upstream,
        task,
        ..
    } = start(4096, NEVER_IDLE);
    send(&mut client, b"hello").await;
    let mut upstream = upstream;
    assert_eq!(receive(&mut upstream, 5).await, b"hello");
    drop(upstream);

    // The client never sends a FIN: the broken pipe on the next write
    // ends the tunnel, naming the upstream.
    send(&mut client, b"more").await;
    assert_eq!(finished(task).await, outcome(CloseCause::Upstream, 9, 0));
    assert_eq!(receive_to_eof(&mut client).await, b"");
}

#[tokio::test]
async fn client_gone_ends_the_tunnel_as_client() {
    let Tunnel {
        client,
        mut upstream,
        task,
        ..
    } = start(4096, NEVER_IDLE);
    let mut client = client;
    send(&mut upstream, b"welcome").await;
    assert_eq!(receive(&mut client, 7).await, b"welcome");
    drop(client);

    // The upstream never sends a FIN: the broken pipe on the next write
    // ends the tunnel, naming the client.
    send(&mut upstream, b"news").await;
    assert_eq!(finished(task).await, outcome(CloseCause::Client, 0, 11));
    assert_eq!(receive_to_eof(&mut upstream).await, b"");
}

/// A stream that fails reads and/or writes with a given error kind; a
/// read that does not fail stays pending, a write that does not fail
/// takes everything.
struct Failing {
    read: Option<io::ErrorKind>,
    write: Option<io::ErrorKind>,
}

impl AsyncRead for Failing {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.read {
            Some(kind) => Poll::Ready(Err(kind.into())),
            None => Poll::Pending,
        }
    }
}

impl AsyncWrite for Failing {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.write {
            Some(kind) => Poll::Ready(Err(kind.into())),
            None => Poll::Ready(Ok(buf.len())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl crate::stream::HoldForFin for Failing {}

#[tokio::test]
async fn io_errors_name_the_side_or_count_as_errors() {
    use io::ErrorKind::{
        BrokenPipe, ConnectionAborted, ConnectionReset, InvalidData, Other, UnexpectedEof,
    };
    // (failing side is the client, read error, write error, expected cause)
    let cases = [
        (true, Some(ConnectionReset), None, CloseCause::Client),
        (true, Some(UnexpectedEof), None, CloseCause::Client),
        (true, Some(InvalidData), None, CloseCause::Error),
        (false, Some(ConnectionAborted), None, CloseCause::Upstream),
        (false, Some(Other), None, CloseCause::Error),
        (false, None, Some(BrokenPipe), CloseCause::Upstream),
        (false, None, Some(ConnectionReset), CloseCause::Upstream),
        (false, None, Some(Other), CloseCause::Error),
        (true, None, Some(ConnectionAborted), CloseCause::Client),
        (true, None, Some(InvalidData), CloseCause::Error),
    ];
    for (client_fails, read, write, cause) in cases {
        let mut failing = Failing { read, write };
        // The healthy side has sent 3 bytes, so a failing writer is
        // written to at once.
        let (mut app, mut proxy) = duplex(64);
        send(&mut app, b"abc").await;
        let ended = if client_fails {
            timeout(
                DEADLINE,
                splice(
                    &mut failing,
                    &mut proxy,
                    &TunnelConfig::idle_only(NEVER_IDLE),
                    &Drain::new(),
                ),
            )
            .await
        } else {
            timeout(
                DEADLINE,
                splice(
                    &mut proxy,
                    &mut failing,
                    &TunnelConfig::idle_only(NEVER_IDLE),
                    &Drain::new(),
                ),
            )
            .await
        };
        let ended = ended.unwrap_or_else(|_| {
            panic!("no end for client_fails={client_fails} read={read:?} write={write:?}")
        });
        // Both directions are polled before either's result is looked
        // at, so the healthy side's 3 bytes are read and counted — passed
        // to the failing writer — whichever of the two fails.
        let (to_upstream, to_client) = if client_fails { (0, 3) } else { (3, 0) };
        assert_eq!(
            bytes_and_cause(ended),
            outcome(cause, to_upstream, to_client),
            "client_fails={client_fails} read={read:?} write={write:?}"
        );
    }
}

/// One data or control frame with a payload under 126 bytes; masked
/// when it goes upstream, as a client's must be.
fn frame(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut bytes = vec![first];
    match mask {
        None => {
            bytes.push(payload.len() as u8);
            bytes.extend_from_slice(payload);
        }
        Some(key) => {
            bytes.push(0x80 | payload.len() as u8);
            bytes.extend_from_slice(&key);
            bytes.extend(payload.iter().zip(key.iter().cycle()).map(|(b, k)| b ^ k));
        }
    }
    bytes
}

const MASK: Option<[u8; 4]> = Some([0x37, 0xfa, 0x21, 0x3d]);

fn close(code: u16, mask: Option<[u8; 4]>) -> Vec<u8> {
    close_with(code, "", mask)
}

fn close_with(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Vec<u8> {
    crate::ws::frame::encode_close(code, reason, mask).to_vec()
}

/// A masked frame of ours (under 126 bytes of payload) as it would be
/// unmasked: the key is random, so tests compare the frame without it.
fn unmask(masked: &[u8]) -> Vec<u8> {
    assert!(
        masked.len() >= 6,
        "too short for a masked frame: {masked:?}"
    );
    assert_eq!(masked[1] & 0x80, 0x80, "not masked: {masked:?}");
    let key = [masked[2], masked[3], masked[4], masked[5]];
    let mut plain = vec![masked[0], masked[1] & 0x7f];
    plain.extend(
        masked[6..]
            .iter()
            .zip(key.iter().cycle())
            .map(|(b, k)| b ^ k),
    );
    plain
}

async fn splice_outcome(task: JoinHandle<TunnelOutcome>) -> TunnelOutcome {
    timeout(DEADLINE, task)
        .await
        .expect("splice did not return in time")
        .expect("splice task panicked")
}

/// RFC 6455 §7.1.1: after Close frames both ways the first FIN ends the
/// tunnel, even while the client keeps its socket open; the client
/// started the closing handshake, so the cause is the client's although
/// the backend's FIN came first.
#[tokio::test]
async fn closing_handshake_then_one_fin_ends_the_tunnel() {
    let mut tunnel = start(4096, NEVER_IDLE);
    let hello = frame(0x81, b"hello", MASK);
    let client_close = close(1000, MASK);
    let mut sent = hello.clone();
    sent.extend_from_slice(&client_close);
    send(&mut tunnel.client, &sent).await;
    assert_eq!(receive(&mut tunnel.upstream, sent.len()).await, sent);

    let reply = frame(0x81, b"bye", None);
    let server_close = close(1000, None);
    let mut answered = reply.clone();
    answered.extend_from_slice(&server_close);
    send(&mut tunnel.upstream, &answered).await;
    fin(&mut tunnel.upstream).await;
    // The client neither reads nor closes: the tunnel ends anyway.
    let outcome = splice_outcome(tunnel.task).await;
    assert_eq!(outcome.cause, CloseCause::Client);
    assert_eq!(outcome.close, Some((CloseFrom::Client, Some(1000))));
    assert_eq!(
        (outcome.client_to_upstream, outcome.upstream_to_client),
        (sent.len() as u64, answered.len() as u64)
    );
    assert_eq!(
        (outcome.messages_to_upstream, outcome.messages_to_client),
        (1, 1)
    );
    assert_eq!(outcome.lost, None);
    // Everything the backend sent still reached the client, then EOF.
    assert_eq!(receive_to_eof(&mut tunnel.client).await, answered);
}

/// The backend's Close starts the handshake; the client answers and
/// sends the first FIN: the cause is still the backend's.
#[tokio::test]
async fn the_side_whose_close_came_first_ended_it() {
    let mut tunnel = start(4096, NEVER_IDLE);
    let server_close = close(1001, None);
    send(&mut tunnel.upstream, &server_close).await;
    assert_eq!(
        receive(&mut tunnel.client, server_close.len()).await,
        server_close
    );
    let client_close = close(1001, MASK);
    send(&mut tunnel.client, &client_close).await;
    fin(&mut tunnel.client).await;
    let outcome = splice_outcome(tunnel.task).await;
    assert_eq!(outcome.cause, CloseCause::Upstream);
    assert_eq!(outcome.close, Some((CloseFrom::Upstream, Some(1001))));
    assert_eq!(
        receive_to_eof(&mut tunnel.upstream).await,
        client_close,
        "the client's Close and FIN reach the backend"
    );
}

/// Fragments count as one message, control frames as none, a Close
/// without a code is recorded as such, and frames split across reads
/// anywhere are followed.
#[tokio::test]
async fn messages_are_counted_once_each_across_fragments_and_splits() {
    let mut tunnel = start(4096, NEVER_IDLE);
    let mut stream = Vec::new();
    stream.extend(frame(0x01, b"frag", MASK)); // Text, FIN clear
    stream.extend(frame(0x89, b"ping", MASK)); // a Ping between fragments
    stream.extend(frame(0x00, b"ment", MASK)); // continuation, FIN clear
    stream.extend(frame(0x80, b"ed", MASK)); // last fragment
    stream.extend(frame(0x82, &[1, 2, 3], MASK)); // one Binary message
    stream.extend(frame(0x88, b"", MASK)); // Close without a code
    for piece in stream.chunks(3) {
        send(&mut tunnel.client, piece).await;
        assert_eq!(receive(&mut tunnel.upstream, piece.len()).await, piece);
    }
    fin(&mut tunnel.client).await;
    assert_eq!(receive_to_eof(&mut tunnel.upstream).await, b"");
    fin(&mut tunnel.upstream).await;
    let outcome = splice_outcome(tunnel.task).await;
    assert_eq!(
        (outcome.messages_to_upstream, outcome.messages_to_client),
        (2, 0)
    );
    assert_eq!(outcome.close, Some((CloseFrom::Client, None)));
    assert_eq!(outcome.cause, CloseCause::Client);
}

/// Bytes that are not valid framing pass unchanged; the follower gives
/// up on that direction and says why, and nothing is closed for it.
#[tokio::test]
async fn invalid_framing_passes_through_and_is_reported() {
    let mut tunnel = start(4096, NEVER_IDLE);
    let mut garbage = frame(0x83, b"reserved opcode", MASK);
    garbage.extend(frame(0x81, b"after", MASK));
    send(&mut tunnel.client, &garbage).await;
    assert_eq!(receive(&mut tunnel.upstream, garbage.len()).await, garbage);
    let reply = frame(0x81, b"still here", None);
    send(&mut tunnel.upstream, &reply).await;
    assert_eq!(receive(&mut tunnel.client, reply.len()).await, reply);
    fin(&mut tunnel.upstream).await;
    // The upstream's FIN has been passed on before the client's is sent.
    assert_eq!(receive_to_eof(&mut tunnel.client).await, b"");
    fin(&mut tunnel.client).await;
    let outcome = splice_outcome(tunnel.task).await;
    assert_eq!(
        outcome.lost,
        Some((Side::Client, Violation::ReservedOpcode(3)))
    );
    assert_eq!(outcome.messages_to_client, 1);
    assert_eq!(outcome.close, None);
    assert_eq!(outcome.cause, CloseCause::Upstream);
}

/// A Close one way only is no finished handshake: the tunnel waits for
/// both FINs as before.
#[tokio::test]
async fn a_close_one_way_only_keeps_the_old_half_close_rule() {
    let mut tunnel = start(4096, NEVER_IDLE);
    let client_close = close(1000, MASK);
    send(&mut tunnel.client, &client_close).await;
    fin(&mut tunnel.client).await;
    assert_eq!(receive_to_eof(&mut tunnel.upstream).await, client_close);
    // The backend still talks and the tunnel is still open.
    let late = frame(0x81, b"late", None);
    send(&mut tunnel.upstream, &late).await;
    assert_eq!(receive(&mut tunnel.client, late.len()).await, late);
    assert!(!tunnel.task.is_finished());
    fin(&mut tunnel.upstream).await;
    let outcome = splice_outcome(tunnel.task).await;
    assert_eq!(outcome.cause, CloseCause::Client);
    assert_eq!(outcome.close, Some((CloseFrom::Client, Some(1000))));
}

fn rules(idle: Duration) -> TunnelConfig {
    TunnelConfig::idle_only(idle)
}

/// Answers wsgate's Close from both ends: the tunnel ends at once, without
/// the second's wait, and the answers are not passed on (each side has had
/// its Close).
#[tokio::test(start_paused = true)]
async fn answered_idle_close_ends_the_tunnel_at_once() {
    let idle = Duration::from_secs(5);
    let began = Instant::now();
    let mut tunnel = start(4096, idle);
    let expected = close_with(1001, "idle timeout", None);
    assert_eq!(receive(&mut tunnel.client, expected.len()).await, expected);
    assert_eq!(
        unmask(&receive(&mut tunnel.upstream, expected.len() + 4).await),
        expected
    );
    send(&mut tunnel.client, &close_with(1001, "", MASK)).await;
    send(&mut tunnel.upstream, &close_with(1001, "", None)).await;
    let ended = splice_outcome(tunnel.task).await;
    assert_eq!(began.elapsed(), idle, "no wait once both answered");
    assert_eq!(ended.cause, CloseCause::IdleTimeout);
    assert_eq!(ended.close, Some((CloseFrom::Wsgate, Some(1001))));
    assert_eq!(receive_to_eof(&mut tunnel.client).await, b"");
    assert_eq!(receive_to_eof(&mut tunnel.upstream).await, b"");
}

/// A silent client gets a Ping after `ping_interval`; its Pong (passed on)
/// keeps it alive. Silent again and deaf, it is declared dead
/// `ping_timeout` after the next Ping: the backend gets Close 1001.
#[tokio::test(start_paused = true)]
async fn pings_keep_a_live_client_and_find_a_dead_one() {
    let interval = Duration::from_secs(3);
    let ping_timeout = Duration::from_secs(2);
    let began = Instant::now();
    let mut tunnel = start_with(
        4096,
        TunnelConfig {
            ping: Some(crate::config::Liveness {
                interval,
                timeout: ping_timeout,
            }),
            ..rules(NEVER_IDLE)
        },
    );
    let ping = [0x89, 0x00];
    assert_eq!(receive(&mut tunnel.client, 2).await, ping);
    assert_eq!(began.elapsed(), interval);
    let pong = frame(0x8A, b"", MASK);
    send(&mut tunnel.client, &pong).await;
    assert_eq!(receive(&mut tunnel.upstream, pong.len()).await, pong);

    // Backend traffic does not count as the client being alive.
    let news = frame(0x81, b"news", None);
    send(&mut tunnel.upstream, &news).await;
    assert_eq!(receive(&mut tunnel.client, news.len()).await, news);
    assert_eq!(receive(&mut tunnel.client, 2).await, ping);
    assert_eq!(began.elapsed(), interval * 2);

    let expected = close_with(1001, "ping timeout", None);
    assert_eq!(
        unmask(&receive(&mut tunnel.upstream, expected.len() + 4).await),
        expected
    );
    assert_eq!(began.elapsed(), interval * 2 + ping_timeout);
    send(&mut tunnel.upstream, &close_with(1001, "", None)).await;
    let ended = splice_outcome(tunnel.task).await;
    assert_eq!(ended.cause, CloseCause::PingTimeout);
    assert_eq!(ended.close, Some((CloseFrom::Wsgate, Some(1001))));
    assert_eq!(
        (ended.messages_to_upstream, ended.messages_to_client),
        (0, 1)
    );
    // The dead client got nothing more, not even the backend's Close.
    assert_eq!(receive_to_eof(&mut tunnel.client).await, b"");
}

/// A Ping waits for the end of a frame in flight toward the client.
#[tokio::test(start_paused = true)]
async fn a_ping_waits_for_the_frame_in_flight() {
    let interval = Duration::from_secs(3);
    let mut tunnel = start_with(
        1 << 20,
        TunnelConfig {
            ping: Some(crate::config::Liveness {
                interval,
                timeout: Duration::from_secs(2),
            }),
            ..rules(NEVER_IDLE)
        },
    );
    // A 1000-byte Binary frame, of which the first half now and the rest
    // after the Ping is due.
    let mut big = vec![0x82, 126, 0x03, 0xE8];
    big.extend(pattern(1000, 3));
    send(&mut tunnel.upstream, &big[..500]).await;
    assert_eq!(receive(&mut tunnel.client, 500).await, big[..500]);
    tokio::time::sleep(interval * 2).await;
    send(&mut tunnel.upstream, &big[500..]).await;
    let mut expected = big[500..].to_vec();
    expected.extend([0x89, 0x00]);
    assert_eq!(receive(&mut tunnel.client, expected.len()).await, expected);
    fin(&mut tunnel.client).await;
    fin(&mut tunnel.upstream).await;
    assert_eq!(splice_outcome(tunnel.task).await.cause, CloseCause::Client);
}

/// The fragment that takes a message over the limit is not passed on: the
/// backend gets what came before it and a Close 1009, the client a Close
/// 1009; their answers end the tunnel.
#[tokio::test]
async fn a_message_over_the_limit_is_replaced_by_close_1009_both_ways() {
    let mut tunnel = start_with(
        1 << 16,
        TunnelConfig {
            max_message_bytes: Some(100),
            ..rules(NEVER_IDLE)
        },
    );
    let small = frame(0x82, &[7; 100], MASK); // exactly the limit: fine
    let first = frame(0x01, &[1; 60], MASK); // Text, FIN clear
    let crossing = frame(0x80, &[2; 60], MASK); // takes it to 120
    let mut sent = small.clone();
    sent.extend(&first);
    sent.extend(&crossing);
    // The crossing frame's header split across writes, as reads may split it.
    send(&mut tunnel.client, &sent[..small.len() + first.len() + 1]).await;
    send(&mut tunnel.client, &sent[small.len() + first.len() + 1..]).await;
    let mut upstream_expected = small.clone();
    upstream_expected.extend(&first);
    let too_big = close_with(1009, "message too big", None);
    let got = receive(
        &mut tunnel.upstream,
        upstream_expected.len() + too_big.len() + 4,
    )
    .await;
    assert_eq!(got[..upstream_expected.len()], upstream_expected[..]);
    assert_eq!(unmask(&got[upstream_expected.len()..]), too_big);
    assert_eq!(receive(&mut tunnel.client, too_big.len()).await, too_big);
    send(&mut tunnel.upstream, &close_with(1009, "", None)).await;
    send(&mut tunnel.client, &close_with(1009, "", MASK)).await;
    let ended = splice_outcome(tunnel.task).await;
    assert_eq!(ended.cause, CloseCause::MessageTooBig);
    assert_eq!(ended.close, Some((CloseFrom::Wsgate, Some(1009))));
    assert_eq!(ended.client_to_upstream, upstream_expected.len() as u64);
    assert_eq!(ended.messages_to_upstream, 1);
    assert_eq!(receive_to_eof(&mut tunnel.client).await, b"");
    assert_eq!(receive_to_eof(&mut tunnel.upstream).await, b"");
}

/// A backend's message over the limit: the client gets the Close instead.
#[tokio::test]
async fn a_backend_message_over_the_limit_closes_too() {
    let mut tunnel = start_with(
        1 << 16,
        TunnelConfig {
            max_message_bytes: Some(10),
            ..rules(NEVER_IDLE)
        },
    );
    send(&mut tunnel.upstream, &frame(0x81, &[b'x'; 11], None)).await;
    let too_big = close_with(1009, "message too big", None);
    assert_eq!(receive(&mut tunnel.client, too_big.len()).await, too_big);
    assert_eq!(
        unmask(&receive(&mut tunnel.upstream, too_big.len() + 4).await),
        too_big
    );
    fin(&mut tunnel.client).await;
    fin(&mut tunnel.upstream).await;
    let ended = splice_outcome(tunnel.task).await;
    assert_eq!(ended.cause, CloseCause::MessageTooBig);
    assert_eq!(ended.upstream_to_client, 0);
}

/// A drain's Close goes in right after the frame in flight, not inside it;
/// both ends answer and the tunnel ends before the drain's cut.
#[tokio::test(start_paused = true)]
async fn a_drain_close_follows_the_frame_in_flight_and_ends_on_answers() {
    let mut tunnel = start(1 << 20, NEVER_IDLE);
    let mut big = vec![0x82, 127, 0, 0, 0, 0, 0, 0x01, 0, 0]; // 64 KiB
    big.extend(pattern(65536, 9));
    send(&mut tunnel.upstream, &big[..1000]).await;
    assert_eq!(receive(&mut tunnel.client, 1000).await, big[..1000]);
    let began = Instant::now();
    tunnel
        .drain
        .begin(Duration::ZERO, Duration::from_secs(30), 1012);
    let restart = close_with(1012, "service restart", None);
    assert_eq!(
        unmask(&receive(&mut tunnel.upstream, restart.len() + 4).await),
        restart
    );
    send(&mut tunnel.upstream, &big[1000..]).await;
    let mut expected = big[1000..].to_vec();
    expected.extend(&restart);
    assert_eq!(receive(&mut tunnel.client, expected.len()).await, expected);
    send(&mut tunnel.client, &close_with(1012, "", MASK)).await;
    send(&mut tunnel.upstream, &close_with(1012, "", None)).await;
    let ended = splice_outcome(tunnel.task).await;
    assert_eq!(began.elapsed(), Duration::ZERO);
    assert_eq!(ended.cause, CloseCause::Drain);
    assert_eq!(ended.close, Some((CloseFrom::Wsgate, Some(1012))));
    assert_eq!(ended.messages_to_client, 1);
}

/// Tunnels open when a drain begins get their Close at evenly spread
/// moments, and one that does not answer is cut at the drain's timeout.
#[tokio::test(start_paused = true)]
async fn drain_closes_are_spread_over_the_window() {
    let drain = Arc::new(Drain::new());
    let spread = Duration::from_secs(4);
    let mut ends = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (client, mut client_proxy) = duplex(1024);
        let (mut upstream_proxy, upstream) = duplex(1024);
        let shared = drain.clone();
        let (registered, is_registered) = tokio::sync::oneshot::channel();
        tasks.push(tokio::spawn(async move {
            let _open = shared.open_tunnel();
            let _ = registered.send(());
            let rules = TunnelConfig::idle_only(NEVER_IDLE);
            splice(&mut client_proxy, &mut upstream_proxy, &rules, &shared).await
        }));
        timeout(DEADLINE, is_registered)
            .await
            .expect("tunnel task did not start")
            .expect("tunnel task ended");
        ends.push((client, upstream));
    }
    let began = Instant::now();
    drain.begin(spread, Duration::from_secs(10), 1001);
    let going_away = close_with(1001, "going away", None);
    let mut arrivals: Vec<(usize, Duration)> = Vec::new();
    for _ in 0..4 {
        let reads = ends
            .iter_mut()
            .enumerate()
            .filter(|(index, _)| !arrivals.iter().any(|(done, _)| done == index))
            .map(|(index, (client, _))| {
                let len = going_away.len();
                Box::pin(async move {
                    let mut got = vec![0; len];
                    client.read_exact(&mut got).await.map(|_| (index, got))
                })
            });
        let (result, _, _) = timeout(DEADLINE, futures_util::future::select_all(reads))
            .await
            .expect("no Close in time");
        let (index, got) = result.expect("read failed");
        assert_eq!(got, going_away);
        arrivals.push((index, began.elapsed()));
        // Answer from both ends, except the last tunnel's client.
        let (client, upstream) = &mut ends[index];
        if arrivals.len() < 4 {
            send(client, &close_with(1001, "", MASK)).await;
        }
        let mut masked = vec![0; going_away.len() + 4];
        timeout(DEADLINE, upstream.read_exact(&mut masked))
            .await
            .expect("no Close to the backend in time")
            .expect("backend's Close");
        assert_eq!(unmask(&masked), going_away);
        send(upstream, &close_with(1001, "", None)).await;
    }
    let moments: Vec<u64> = arrivals.iter().map(|(_, at)| at.as_secs()).collect();
    assert_eq!(moments, [0, 1, 2, 3]);
    for task in tasks {
        assert_eq!(splice_outcome(task).await.cause, CloseCause::Drain);
    }
    assert_eq!(began.elapsed(), Duration::from_secs(10), "the last was cut");
}

/// A client over `client_message_rate` is slowed, not cut: the burst passes
/// at once, then one message per token, in order, with nothing dropped;
/// a fragmented message takes one token, the control frames none.
#[tokio::test(start_paused = true)]
async fn a_client_over_its_message_rate_is_slowed_by_backpressure() {
    let mut tunnel = start_with(
        1 << 16,
        TunnelConfig {
            client_message_rate: Some(crate::config::Rate {
                count: 2,
                period: Duration::from_secs(1),
            }),
            ..rules(NEVER_IDLE)
        },
    );
    let began = Instant::now();
    let mut messages: Vec<Vec<u8>> = (0..5u8)
        .map(|n| frame(0x81, &[b'a' + n; 3], MASK))
        .collect();
    // The third message in two fragments with a Ping between them.
    let mut fragmented = frame(0x01, b"fr", MASK);
    fragmented.extend(frame(0x89, b"", MASK));
    fragmented.extend(frame(0x80, b"ag", MASK));
    messages[2] = fragmented;
    let all: Vec<u8> = messages.concat();
    send(&mut tunnel.client, &all).await;
    let mut arrivals = Vec::new();
    for message in &messages {
        let got = receive(&mut tunnel.upstream, message.len()).await;
        assert_eq!(&got, message);
        arrivals.push(began.elapsed());
    }
    // Tokens: two at once, then one per 500 ms.
    let millis: Vec<u128> = arrivals.iter().map(Duration::as_millis).collect();
    assert_eq!(millis, [0, 0, 500, 1000, 1500]);
    fin(&mut tunnel.client).await;
    fin(&mut tunnel.upstream).await;
    let ended = splice_outcome(tunnel.task).await;
    assert_eq!(ended.messages_to_upstream, 5);
    assert_eq!(ended.client_to_upstream, all.len() as u64);
    assert_eq!(ended.cause, CloseCause::Client);
}
