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
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Client,
    Upstream,
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
        }
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
    // Whoever sends the first FIN closed the tunnel; the other side only followed.
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
        for (result, read_side, write_side) in [
            (&upward, Side::Client, Side::Upstream),
            (&downward, Side::Upstream, Side::Client),
        ] {
            match result {
                Poll::Ready(Err(PumpError::Read(error))) => {
                    return Poll::Ready(cause_of(error, read_side));
                }
                Poll::Ready(Err(PumpError::Write(error))) => {
                    return Poll::Ready(cause_of(error, write_side));
                }
                _ => {}
            }
        }
        if to_upstream.read_closed && first_eof.is_none() {
            first_eof = Some(Side::Client);
        }
        if to_client.read_closed && first_eof.is_none() {
            first_eof = Some(Side::Upstream);
        }
        if upward.is_ready() && downward.is_ready() {
            return Poll::Ready(match first_eof {
                Some(Side::Upstream) => CloseCause::Upstream,
                _ => CloseCause::Client,
            });
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

    TunnelOutcome {
        cause,
        client_to_upstream: to_upstream.bytes,
        upstream_to_client: to_client.bytes,
    }
}
