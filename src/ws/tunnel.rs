//! The byte splice behind an upgraded connection.
//!
//! Each direction reads into the worker thread's read buffer and writes it out
//! at once; only bytes the writer could not take yet are copied to the heap. So a
//! tunnel holds no copy buffer while idle — with tens of thousands of idle
//! WebSockets, the two 8 KiB buffers per tunnel of `copy_bidirectional` would
//! dominate memory. A FIN in one direction is passed on as a write shutdown
//! while the other keeps flowing; the tunnel ends when both have finished, when
//! no byte moved either way for `idle_timeout`, or when a drain cuts it.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::stream::HoldForFin;
use crate::ws::frame::{Control, Event, FrameFollower, Violation};

/// `ready!` that also propagates the error as `Poll::Ready(Err)`.
macro_rules! ready_or_return {
    ($poll:expr) => {
        match $poll {
            Poll::Ready(Ok(value)) => value,
            Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
            Poll::Pending => return Poll::Pending,
        }
    };
}
const CHUNK: usize = 16 * 1024;

thread_local! {
    /// One read buffer per worker thread, shared by every tunnel it polls:
    /// tunnels own no buffer while idle, and because it is initialised once,
    /// readers that zero uninitialised buffers (tokio-rustls does, per read)
    /// do not memset 16 KiB per message.
    static READ_BUFFER: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0; CHUNK].into_boxed_slice());
}
/// Reads per direction per poll before yielding, so one busy tunnel cannot
/// starve the others on its worker thread.
const READS_PER_POLL: usize = 16;

/// Why a tunnel ended; the `cause` label of `wsgate_tunnels_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCause {
    Client,
    Upstream,
    IdleTimeout,
    Drain,
    Error,
}

impl CloseCause {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseCause::Client => "client",
            CloseCause::Upstream => "upstream",
            CloseCause::IdleTimeout => "idle_timeout",
            CloseCause::Drain => "drain",
            CloseCause::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelOutcome {
    pub cause: CloseCause,
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
    /// Data messages each way (a message counted at its last frame).
    pub messages_to_upstream: u64,
    pub messages_to_client: u64,
    /// The first Close frame of the closing handshake: who sent it, and its
    /// code (`None`: a Close without one, 1005). `None` when no Close frame
    /// passed either way: what a browser reports as 1006.
    pub close: Option<(Side, Option<u16>)>,
    /// A direction whose bytes stopped being valid framing, and why; its
    /// frames were no longer followed (the bytes still passed).
    pub lost: Option<(Side, Violation)>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Side {
    Client,
    Upstream,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        }
    }

    fn ended(self) -> CloseCause {
        match self {
            Side::Client => CloseCause::Client,
            Side::Upstream => CloseCause::Upstream,
        }
    }
}

/// What one direction's frame headers told us. Following costs a header
/// parse per frame; payloads are skipped by length, never read.
struct Frames {
    follower: FrameFollower,
    messages: u64,
    /// The first Close frame this direction carried, and its code.
    close: Option<Option<u16>>,
    lost: Option<Violation>,
}

impl Frames {
    fn new() -> Frames {
        Frames {
            follower: FrameFollower::new(),
            messages: 0,
            close: None,
            lost: None,
        }
    }

    fn follow(&mut self, data: &[u8]) {
        let Frames {
            follower,
            messages,
            close,
            lost,
        } = self;
        // Every byte goes on whatever the follower makes of it: a stream that
        // is not valid framing only stops being followed.
        let _ = follower.feed(data, |_, event| {
            match event {
                Event::MessageEnd { .. } => *messages += 1,
                Event::Close { code } if close.is_none() => *close = Some(code),
                Event::Lost(violation) => *lost = Some(violation),
                _ => {}
            }
            Control::Continue
        });
    }
}

/// One direction of the splice.
struct Pump {
    /// Bytes read but not yet accepted by the writer.
    backlog: Vec<u8>,
    backlog_written: usize,
    needs_flush: bool,
    read_closed: bool,
    finished: bool,
    bytes: u64,
    frames: Frames,
}

enum PumpError {
    Read(io::Error),
    Write(io::Error),
}

impl Pump {
    fn new() -> Pump {
        Pump {
            backlog: Vec::new(),
            backlog_written: 0,
            needs_flush: false,
            read_closed: false,
            finished: false,
            bytes: 0,
            frames: Frames::new(),
        }
    }

    /// Whether everything read has been written and flushed.
    fn caught_up(&self) -> bool {
        self.backlog_written == self.backlog.len() && !self.needs_flush
    }

    /// Drives this direction as far as it can go; `Ready` once the reader hit
    /// EOF and the writer has been shut down. `moved` is set when any byte
    /// was read, for the idle clock. `writer_sent_fin`: the side we write to
    /// has finished sending.
    fn poll_pump<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        writer_sent_fin: bool,
        moved: &mut bool,
    ) -> Poll<Result<(), PumpError>>
    where
        R: AsyncRead + ?Sized,
        W: HoldForFin + ?Sized,
    {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        for _ in 0..READS_PER_POLL {
            while self.backlog_written < self.backlog.len() {
                match writer
                    .as_mut()
                    .poll_write(cx, &self.backlog[self.backlog_written..])
                {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(PumpError::Write(io::ErrorKind::WriteZero.into())));
                    }
                    Poll::Ready(Ok(written)) => {
                        self.backlog_written += written;
                        self.needs_flush = true;
                    }
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(PumpError::Write(error))),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if !self.backlog.is_empty() {
                // Give the memory back: an idle tunnel should own no buffer.
                self.backlog = Vec::new();
                self.backlog_written = 0;
            }
            if self.read_closed {
                if self.needs_flush {
                    ready_or_return!(writer.as_mut().poll_flush(cx).map_err(PumpError::Write));
                    self.needs_flush = false;
                }
                // Once both sides have sent their FIN nothing is left to pass
                // on: dropping the socket sends ours, so a shutdown first
                // would be a syscall per connection for nothing.
                if !writer_sent_fin {
                    ready_or_return!(writer.as_mut().poll_shutdown(cx).map_err(PumpError::Write));
                }
                self.finished = true;
                return Poll::Ready(Ok(()));
            }
            let outcome = READ_BUFFER.with_borrow_mut(|chunk| {
                let mut buf = ReadBuf::new(&mut chunk[..]);
                let end = gather(reader.as_mut(), cx, &mut buf);
                self.pass_on(
                    cx,
                    end,
                    buf.filled(),
                    writer.as_mut(),
                    writer_sent_fin,
                    moved,
                )
            });
            match outcome {
                Step::Continue => {}
                Step::Return(poll) => return poll,
            }
        }
        // Budget used up with data still coming: yield, but ask to be polled again.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Passes on what one [`gather`] read, keeping on the heap only what the
    /// writer cannot take yet.
    fn pass_on<W: HoldForFin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        end: ReadEnd,
        data: &[u8],
        mut writer: Pin<&mut W>,
        writer_sent_fin: bool,
        moved: &mut bool,
    ) -> Step {
        if !data.is_empty() {
            *moved = true;
            self.bytes += data.len() as u64;
            self.frames.follow(data);
            // Our FIN goes out right after these bytes: let it ride with them.
            let fin_follows = matches!(end, ReadEnd::Eof) && !writer_sent_fin;
            let mut written = 0;
            while written < data.len() {
                let rest = &data[written..];
                let write = if fin_follows {
                    writer.as_mut().poll_write_held(cx, rest)
                } else {
                    writer.as_mut().poll_write(cx, rest)
                };
                match write {
                    Poll::Ready(Ok(0)) => {
                        return Step::failed_write(io::ErrorKind::WriteZero.into());
                    }
                    Poll::Ready(Ok(count)) => written += count,
                    Poll::Ready(Err(error)) => return Step::failed_write(error),
                    Poll::Pending => break,
                }
            }
            self.needs_flush = true;
            if written < data.len() {
                self.backlog.extend_from_slice(&data[written..]);
                match end {
                    ReadEnd::Eof => self.read_closed = true,
                    ReadEnd::Failed(error) => {
                        return Step::Return(Poll::Ready(Err(PumpError::Read(error))));
                    }
                    ReadEnd::Pending | ReadEnd::Full => {}
                }
                return Step::Return(Poll::Pending);
            }
        }
        match end {
            ReadEnd::Eof => {
                self.read_closed = true;
                Step::Continue
            }
            ReadEnd::Full => Step::Continue,
            ReadEnd::Failed(error) => Step::Return(Poll::Ready(Err(PumpError::Read(error)))),
            ReadEnd::Pending => {
                if self.needs_flush {
                    match writer.as_mut().poll_flush(cx) {
                        Poll::Ready(Ok(())) => self.needs_flush = false,
                        Poll::Ready(Err(error)) => return Step::failed_write(error),
                        Poll::Pending => {}
                    }
                }
                Step::Return(Poll::Pending)
            }
        }
    }
}

/// How a [`gather`] ended, after the bytes it read.
enum ReadEnd {
    /// The reader has nothing more at hand; its waker is registered.
    Pending,
    /// The buffer is full; the reader may have more.
    Full,
    Eof,
    Failed(io::Error),
}

/// Reads until the reader has nothing more at hand, so a burst leaves in one
/// write and a FIN that arrived right behind the last bytes is known before
/// they are written. Costs no syscall over reading once: after a short read
/// the reactor has already marked the socket drained.
fn gather<R: AsyncRead + ?Sized>(
    mut reader: Pin<&mut R>,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> ReadEnd {
    loop {
        let before = buf.filled().len();
        match reader.as_mut().poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() == before => return ReadEnd::Eof,
            Poll::Ready(Ok(())) if buf.remaining() == 0 => return ReadEnd::Full,
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(error)) => return ReadEnd::Failed(error),
            Poll::Pending => return ReadEnd::Pending,
        }
    }
}

/// What [`Pump::pass_on`] tells the read loop.
enum Step {
    Continue,
    Return(Poll<Result<(), PumpError>>),
}

impl Step {
    fn failed_write(error: io::Error) -> Step {
        Step::Return(Poll::Ready(Err(PumpError::Write(error))))
    }
}

/// A reset or broken pipe is that side going away, not a proxy error.
fn cause_of(error: &io::Error, side: Side) -> CloseCause {
    match error.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionAborted => match side {
            Side::Client => CloseCause::Client,
            Side::Upstream => CloseCause::Upstream,
        },
        _ => CloseCause::Error,
    }
}

/// Splices `client` and `upstream` until both directions end, the tunnel sits
/// idle for `idle_timeout`, or `drain` is cancelled. The streams are
/// borrowed so they are held once, by the caller, for the tunnel's life.
pub async fn splice<C, U>(
    client: &mut C,
    upstream: &mut U,
    idle_timeout: Duration,
    drain: CancellationToken,
) -> TunnelOutcome
where
    C: AsyncRead + HoldForFin + Unpin,
    U: AsyncRead + HoldForFin + Unpin,
{
    let mut to_upstream = Pump::new();
    let mut to_client = Pump::new();
    // Whoever sent the first Close frame closed the tunnel, or without one,
    // whoever sent the first FIN; the other side only followed.
    let mut first_close: Option<Side> = None;
    let mut first_eof: Option<Side> = None;
    let mut last_activity = Instant::now();
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    let cancelled = drain.cancelled();
    tokio::pin!(cancelled);

    let cause = poll_fn(|cx| {
        let mut moved = false;
        let upward = to_upstream.poll_pump(
            cx,
            Pin::new(&mut *client),
            Pin::new(&mut *upstream),
            to_client.read_closed,
            &mut moved,
        );
        let downward = to_client.poll_pump(
            cx,
            Pin::new(&mut *upstream),
            Pin::new(&mut *client),
            to_upstream.read_closed,
            &mut moved,
        );
        // Upward is pumped first, so when both Closes were read in one
        // poll the backend's can be an answer to the client's, never the
        // other way round.
        if first_close.is_none() {
            if to_upstream.frames.close.is_some() {
                first_close = Some(Side::Client);
            } else if to_client.frames.close.is_some() {
                first_close = Some(Side::Upstream);
            }
        }
        for (result, read_side, write_side) in [
            (&upward, Side::Client, Side::Upstream),
            (&downward, Side::Upstream, Side::Client),
        ] {
            let cause = match result {
                Poll::Ready(Err(PumpError::Read(error))) => cause_of(error, read_side),
                Poll::Ready(Err(PumpError::Write(error))) => cause_of(error, write_side),
                _ => continue,
            };
            return Poll::Ready(match (cause, first_close) {
                (CloseCause::Client | CloseCause::Upstream, Some(closer)) => closer.ended(),
                (cause, _) => cause,
            });
        }
        if to_upstream.read_closed && first_eof.is_none() {
            first_eof = Some(Side::Client);
        }
        if to_client.read_closed && first_eof.is_none() {
            first_eof = Some(Side::Upstream);
        }
        let ended_by = first_close.or(first_eof).unwrap_or(Side::Client).ended();
        if upward.is_ready() && downward.is_ready() {
            return Poll::Ready(ended_by);
        }
        // RFC 6455 §7.1.1: once Close frames have passed both ways the
        // connection is done, so the first FIN (passed on) ends the tunnel;
        // a peer that keeps its socket open must not hold it, nor a drain.
        let handshake_done = to_upstream.frames.close.is_some() && to_client.frames.close.is_some();
        if handshake_done
            && ((upward.is_ready() && to_client.caught_up())
                || (downward.is_ready() && to_upstream.caught_up()))
        {
            return Poll::Ready(ended_by);
        }
        if cancelled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(CloseCause::Drain);
        }
        if moved {
            last_activity = Instant::now();
        }
        // The timer is re-armed lazily: only when it fires early is it moved,
        // so a busy tunnel does not touch the timer wheel per message.
        while idle.as_mut().poll(cx).is_ready() {
            let deadline = last_activity + idle_timeout;
            if Instant::now() >= deadline {
                return Poll::Ready(CloseCause::IdleTimeout);
            }
            idle.as_mut().reset(deadline);
        }
        Poll::Pending
    })
    .await;

    let close = first_close.map(|side| {
        let frames = match side {
            Side::Client => &to_upstream.frames,
            Side::Upstream => &to_client.frames,
        };
        (side, frames.close.flatten())
    });
    let lost = match (to_upstream.frames.lost, to_client.frames.lost) {
        (Some(violation), _) => Some((Side::Client, violation)),
        (None, Some(violation)) => Some((Side::Upstream, violation)),
        (None, None) => None,
    };
    TunnelOutcome {
        cause,
        client_to_upstream: to_upstream.bytes,
        upstream_to_client: to_client.bytes,
        messages_to_upstream: to_upstream.frames.messages,
        messages_to_client: to_client.frames.messages,
        close,
        lost,
    }
}

#[cfg(test)]
mod tests {
    //! The splice driven over in-memory pipes. Each test holds the two
    //! application ends — the client's and the upstream server's — of two
    //! `tokio::io::duplex` pairs and splices the proxy ends in a task.

    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, duplex};
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
        drain: CancellationToken,
        task: JoinHandle<TunnelOutcome>,
    }

    /// Splices two fresh duplex pairs of `buffer` bytes each in a task; the
    /// proxy ends are dropped when `splice` returns.
    fn start(buffer: usize, idle_timeout: Duration) -> Tunnel {
        let (client, mut client_proxy) = duplex(buffer);
        let (mut upstream_proxy, upstream) = duplex(buffer);
        let drain = CancellationToken::new();
        let token = drain.clone();
        let task = tokio::spawn(async move {
            splice(&mut client_proxy, &mut upstream_proxy, idle_timeout, token).await
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
            CloseCause::Error,
        ]
        .map(CloseCause::as_str);
        assert_eq!(
            labels,
            ["client", "upstream", "idle_timeout", "drain", "error"]
        );
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

    #[tokio::test]
    async fn silent_tunnel_ends_on_idle_timeout() {
        let idle = Duration::from_millis(100);
        let began = Instant::now();
        let Tunnel {
            mut client,
            mut upstream,
            task,
            ..
        } = start(4096, idle);
        assert_eq!(finished(task).await, outcome(CloseCause::IdleTimeout, 0, 0));
        assert!(began.elapsed() >= idle, "ended before the idle timeout");
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

    #[tokio::test]
    async fn drain_cuts_an_open_tunnel() {
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

        drain.cancel();
        assert_eq!(finished(task).await, outcome(CloseCause::Drain, 4, 5));
        assert_eq!(receive_to_eof(&mut client).await, b"");
        assert_eq!(receive_to_eof(&mut upstream).await, b"");
    }

    #[tokio::test]
    async fn drain_cancelled_before_the_start_ends_at_once() {
        let drain = CancellationToken::new();
        drain.cancel();
        let (_client, mut client_proxy) = duplex(64);
        let (mut upstream_proxy, _upstream) = duplex(64);
        let ended = timeout(
            DEADLINE,
            splice(&mut client_proxy, &mut upstream_proxy, NEVER_IDLE, drain),
        )
        .await
        .expect("splice did not return in time");
        assert_eq!(bytes_and_cause(ended), outcome(CloseCause::Drain, 0, 0));
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
                        NEVER_IDLE,
                        CancellationToken::new(),
                    ),
                )
                .await
            } else {
                timeout(
                    DEADLINE,
                    splice(
                        &mut proxy,
                        &mut failing,
                        NEVER_IDLE,
                        CancellationToken::new(),
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
        crate::ws::frame::encode_close(code, "", mask).to_vec()
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
        assert_eq!(outcome.close, Some((Side::Client, Some(1000))));
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
        assert_eq!(outcome.close, Some((Side::Upstream, Some(1001))));
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
        assert_eq!(outcome.close, Some((Side::Client, None)));
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
        assert_eq!(outcome.close, Some((Side::Client, Some(1000))));
    }
}
