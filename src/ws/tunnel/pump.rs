//! One direction of a tunnel: bytes read from one side and written to the
//! other, their frame headers followed on the way, and wsgate's own frames
//! put in between whole frames when the tunnel asks for them.
//!
//! Each read goes into the worker thread's read buffer and out at once;
//! only bytes the writer could not take yet are copied to the heap, and that
//! copy is freed as soon as it is written. So an idle tunnel holds no
//! buffer. The rare reads where wsgate acts (a frame of its own goes in, a
//! message is over the limit) take the heap path whole, which keeps the
//! common path a single write.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::Instant;

use crate::config::Rate;

use crate::stream::HoldForFin;
use crate::ws::frame::{
    self, Control, Event, Fed, FrameFollower, MAX_HEADER_LEN, Opcode, Violation,
};

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

pub(super) const CHUNK: usize = 16 * 1024;

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

/// A frame of wsgate's own, waiting for the next frame boundary. Kept as
/// what to build rather than the bytes, so a waiting frame costs a tunnel a
/// few bytes, not the 131 of a built one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Own {
    Ping,
    Close { code: u16, reason: &'static str },
}

/// What one direction's frame headers told us. Following costs a header
/// parse per frame; payloads are skipped by length, never read.
pub(super) struct Frames {
    follower: FrameFollower,
    /// Data messages passed on (a message counted at its last frame).
    pub messages: u64,
    /// The first Close frame this direction carried, and its code.
    pub close: Option<Option<u16>>,
    pub lost: Option<Violation>,
}

/// Where and why a feed stopped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Not stopped: everything was followed.
    No,
    /// Before a data frame that takes its message over the limit.
    OverLimit,
    /// At a frame end, where a waiting frame of ours can go in.
    Boundary,
    /// Before a new message, with no token in the client's message bucket.
    NoToken,
}

/// `client_message_rate`: a token bucket on the data messages a client
/// sends, burst N, refilled at N per period. A tunnel out of tokens stops
/// reading until one is free: the client is slowed by TCP backpressure,
/// and nothing is dropped or closed.
pub(super) struct MessageBucket {
    tokens: u32,
    capacity: u32,
    per_token: Duration,
    refilled_at: Instant,
}

impl MessageBucket {
    pub fn new(rate: Rate) -> MessageBucket {
        let capacity = rate.count.max(1);
        MessageBucket {
            tokens: capacity,
            capacity,
            per_token: (rate.period / capacity).max(Duration::from_nanos(1)),
            refilled_at: Instant::now(),
        }
    }

    fn try_take(&mut self, now: Instant) -> bool {
        let earned =
            now.saturating_duration_since(self.refilled_at).as_nanos() / self.per_token.as_nanos();
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(earned).min(self.capacity);
            // A full bucket earns nothing more, so its clock starts now.
            self.refilled_at = if self.tokens == self.capacity {
                now
            } else {
                self.refilled_at + self.per_token * earned
            };
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }

    fn next_token_at(&self) -> Instant {
        self.refilled_at + self.per_token
    }
}

impl Frames {
    fn follow(
        &mut self,
        data: &[u8],
        limit: Option<u64>,
        stop_at_frame_end: bool,
        mut bucket: Option<&mut MessageBucket>,
    ) -> (Fed, Stop) {
        let Frames {
            follower,
            messages,
            close,
            lost,
        } = self;
        let mut stop = Stop::No;
        let mut stop_here = |reason: Stop| {
            stop = reason;
            Control::Stop
        };
        // Every byte goes on whatever the follower makes of it: a stream that
        // is not valid framing only stops being followed.
        let fed = follower.feed(data, |_, event| match event {
            Event::Header(header)
                if !header.opcode.is_control()
                    && limit.is_some_and(|max| header.message_bytes > max) =>
            {
                stop_here(Stop::OverLimit)
            }
            // A message's first frame needs a token; its fragments and the
            // control frames between them do not.
            Event::Header(header) if matches!(header.opcode, Opcode::Text | Opcode::Binary) => {
                let out_of_tokens = bucket
                    .as_deref_mut()
                    .is_some_and(|bucket| !bucket.try_take(Instant::now()));
                if out_of_tokens {
                    stop_here(Stop::NoToken)
                } else {
                    Control::Continue
                }
            }
            Event::Header(_) => Control::Continue,
            Event::MessageEnd { .. } => {
                *messages += 1;
                if stop_at_frame_end {
                    stop_here(Stop::Boundary)
                } else {
                    Control::Continue
                }
            }
            Event::Close { code } => {
                close.get_or_insert(code);
                if stop_at_frame_end {
                    stop_here(Stop::Boundary)
                } else {
                    Control::Continue
                }
            }
            Event::FrameEnd { .. } if stop_at_frame_end => stop_here(Stop::Boundary),
            Event::FrameEnd { .. } => Control::Continue,
            Event::Lost(violation) => {
                *lost = Some(violation);
                Control::Continue
            }
        });
        (fed, stop)
    }

    /// Follows bytes that are not passed on, for the Close that answers
    /// ours.
    fn follow_discarded(&mut self, data: &[u8]) -> Fed {
        let Frames {
            follower,
            close,
            lost,
            ..
        } = self;
        follower.feed(data, |_, event| {
            match event {
                Event::Close { code } => {
                    close.get_or_insert(code);
                }
                Event::Lost(violation) => *lost = Some(violation),
                _ => {}
            }
            Control::Continue
        })
    }

    pub fn is_lost(&self) -> bool {
        self.follower.is_lost()
    }
}

/// One direction of the splice.
pub(super) struct Pump {
    /// Bytes read but not yet accepted by the writer.
    backlog: Vec<u8>,
    backlog_written: usize,
    needs_flush: bool,
    pub read_closed: bool,
    pub finished: bool,
    /// wsgate wrote a Close of its own this way (or gave up on this side):
    /// what still arrives is followed, for the answering Close, but no
    /// longer passed on.
    pub sealed: bool,
    /// This direction carried a message over the limit: the frame that
    /// crossed it was not passed on, a Close 1009 went in its place.
    pub over_limit: bool,
    /// This pump writes to the backend, so its own frames are masked (§5.1).
    toward_backend: bool,
    pub outbox: Option<Own>,
    /// The start of a header the read ended inside, presented again in
    /// front of the next read (a holding follower only: with a limit, a
    /// frame must be judged before any of it passes).
    held: [u8; MAX_HEADER_LEN - 1],
    held_len: u8,
    limit: Option<u64>,
    /// The client's message bucket (the client's direction only).
    bucket: Option<MessageBucket>,
    /// Bytes read while out of tokens, passed on when one is free.
    paused_input: Vec<u8>,
    paused_eof: bool,
    /// When the next token is free; no reading until the tunnel clears it.
    pub resume_at: Option<Instant>,
    /// Bytes passed on (wsgate's own frames not counted).
    pub bytes: u64,
    pub frames: Frames,
}

/// Whether this direction's FIN still needs a shutdown of the writer.
#[derive(Clone, Copy)]
pub(super) struct FinDue {
    /// The side we write to has finished sending: our FIN goes with the
    /// socket's close.
    pub writer_sent_fin: bool,
    /// The other direction carried a Close and our writer is a TCP socket
    /// whose close sends the FIN: once this direction's Close has passed
    /// too, the closing handshake is over and no shutdown is needed.
    pub by_drop_after_close: bool,
}

pub(super) enum PumpError {
    Read(io::Error),
    Write(io::Error),
}

impl Pump {
    pub fn new(toward_backend: bool, limit: Option<u64>, bucket: Option<MessageBucket>) -> Pump {
        Pump {
            backlog: Vec::new(),
            backlog_written: 0,
            needs_flush: false,
            read_closed: false,
            finished: false,
            sealed: false,
            over_limit: false,
            toward_backend,
            outbox: None,
            held: [0; MAX_HEADER_LEN - 1],
            held_len: 0,
            limit,
            bucket,
            paused_input: Vec::new(),
            paused_eof: false,
            resume_at: None,
            bytes: 0,
            frames: Frames {
                follower: match limit {
                    Some(_) => FrameFollower::holding(),
                    None => FrameFollower::new(),
                },
                messages: 0,
                close: None,
                lost: None,
            },
        }
    }

    /// Whether everything read has been written and flushed.
    pub fn caught_up(&self) -> bool {
        self.backlog_written == self.backlog.len() && !self.needs_flush
    }

    /// Whether a frame of wsgate's can still go this way: the stream's
    /// frames are known, nothing of ours closed it, and it is not shut.
    pub fn can_carry(&self) -> bool {
        !self.finished && !self.sealed && !self.frames.is_lost()
    }

    /// Asks for a Close of ours this way at the next frame boundary; false
    /// when it cannot go (see [`Pump::can_carry`]) or a Close already
    /// passed this way, so there is no answer to wait for.
    pub fn queue_close(&mut self, code: u16, reason: &'static str) -> bool {
        if !self.can_carry() || self.frames.close.is_some() {
            return false;
        }
        self.outbox = Some(Own::Close { code, reason });
        true
    }

    /// Stops passing bytes this way, without a frame: the side it writes
    /// to is gone.
    pub fn seal(&mut self) {
        self.sealed = true;
        self.outbox = None;
    }

    /// Appends `own`, built, to the backlog.
    fn put_own(&mut self, own: Own) {
        let mask = self.toward_backend.then(mask_key);
        let built = match own {
            Own::Ping => frame::encode_ping(&[], mask),
            Own::Close { code, reason } => {
                self.sealed = true;
                // A Close already passed this way; a second is not ours to
                // send, but nothing more may follow the first.
                (self.frames.close.is_none()).then(|| frame::encode_close(code, reason, mask))
            }
        };
        if let Some(built) = built {
            self.backlog.extend_from_slice(built.as_bytes());
        }
    }

    fn hold(&mut self, bytes: &[u8]) {
        let len = bytes.len().min(self.held.len());
        self.held[..len].copy_from_slice(&bytes[..len]);
        self.held_len = len as u8;
    }

    /// Drives this direction as far as it can go; `Ready` once the reader hit
    /// EOF and the writer has been shut down. `moved` is set when any byte
    /// was read, for the idle clock.
    pub fn poll_pump<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        fin: FinDue,
        moved: &mut bool,
    ) -> Poll<Result<(), PumpError>>
    where
        R: AsyncRead + ?Sized,
        W: HoldForFin + ?Sized,
    {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        let writer_sent_fin = fin.writer_sent_fin;
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
            if !self.sealed && self.frames.follower.at_boundary() {
                if let Some(own) = self.outbox.take() {
                    self.put_own(own);
                    continue;
                }
            }
            if self.resume_at.is_some() {
                // Out of tokens: the tunnel's timer wakes us when one is free.
                return Poll::Pending;
            }
            if !self.paused_input.is_empty() {
                let input = std::mem::take(&mut self.paused_input);
                let end = if std::mem::take(&mut self.paused_eof) {
                    ReadEnd::Eof
                } else {
                    ReadEnd::Full
                };
                match self.pass_on(
                    cx,
                    end,
                    &input,
                    input.len(),
                    writer.as_mut(),
                    writer_sent_fin,
                ) {
                    Step::Continue => continue,
                    Step::Return(poll) => return poll,
                }
            }
            if self.read_closed {
                if self.needs_flush {
                    ready_or_return!(writer.as_mut().poll_flush(cx).map_err(PumpError::Write));
                    self.needs_flush = false;
                }
                // Once both sides have sent their FIN nothing is left to pass
                // on: dropping the socket sends ours, so a shutdown first
                // would be a syscall per connection for nothing. So too once
                // Close frames have passed both ways: this FIN ends the
                // tunnel, and closing a TCP socket sends the FIN (with any
                // bytes held for it).
                let closes_passed = fin.by_drop_after_close && self.frames.close.is_some();
                if !writer_sent_fin && !closes_passed {
                    ready_or_return!(writer.as_mut().poll_shutdown(cx).map_err(PumpError::Write));
                }
                self.finished = true;
                return Poll::Ready(Ok(()));
            }
            let outcome = READ_BUFFER.with_borrow_mut(|chunk| {
                let held = usize::from(self.held_len);
                chunk[..held].copy_from_slice(&self.held[..held]);
                self.held_len = 0;
                let mut buf = ReadBuf::new(&mut chunk[..]);
                buf.set_filled(held);
                let end = gather(reader.as_mut(), cx, &mut buf);
                let read = buf.filled().len() - held;
                if read > 0 {
                    *moved = true;
                }
                self.pass_on(
                    cx,
                    end,
                    buf.filled(),
                    read,
                    writer.as_mut(),
                    writer_sent_fin,
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

    /// Passes on what one [`gather`] read (`data`: any held header bytes,
    /// then `read` new ones), keeping on the heap only what the writer
    /// cannot take yet.
    fn pass_on<W: HoldForFin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        end: ReadEnd,
        data: &[u8],
        read: usize,
        mut writer: Pin<&mut W>,
        writer_sent_fin: bool,
    ) -> Step {
        let eof = matches!(end, ReadEnd::Eof);
        if read == 0 && !eof {
            // Nothing new: any held bytes stay held.
            self.hold(data);
        } else if !data.is_empty() {
            if self.sealed {
                let fed = self.frames.follow_discarded(data);
                self.hold(&data[fed.consumed..]);
            } else {
                let (fed, stop) = self.frames.follow(
                    data,
                    self.limit,
                    self.outbox.is_some(),
                    self.bucket.as_mut(),
                );
                if fed.stopped {
                    return self.pass_on_acting(end, data, fed, stop);
                }
                // At EOF a held header will never complete: its bytes go on.
                let forward = if eof { data } else { &data[..fed.consumed] };
                self.hold(&data[forward.len()..]);
                // Our FIN goes out right after these bytes: let it ride with them.
                let fin_follows = eof && !writer_sent_fin;
                match self.write_through(cx, forward, writer.as_mut(), fin_follows) {
                    Err(failed) => return failed,
                    Ok(true) => {}
                    Ok(false) => {
                        return match end {
                            ReadEnd::Eof => {
                                self.read_closed = true;
                                Step::Return(Poll::Pending)
                            }
                            ReadEnd::Failed(error) => {
                                Step::Return(Poll::Ready(Err(PumpError::Read(error))))
                            }
                            ReadEnd::Pending | ReadEnd::Full => Step::Return(Poll::Pending),
                        };
                    }
                }
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

    /// Writes `forward` straight from the read buffer; what the writer does
    /// not take goes to the backlog (then `Ok(false)`).
    fn write_through<W: HoldForFin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        forward: &[u8],
        mut writer: Pin<&mut W>,
        fin_follows: bool,
    ) -> Result<bool, Step> {
        if forward.is_empty() {
            return Ok(true);
        }
        self.bytes += forward.len() as u64;
        let mut written = 0;
        while written < forward.len() {
            let rest = &forward[written..];
            let write = if fin_follows {
                writer.as_mut().poll_write_held(cx, rest)
            } else {
                writer.as_mut().poll_write(cx, rest)
            };
            match write {
                Poll::Ready(Ok(0)) => {
                    return Err(Step::failed_write(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(count)) => written += count,
                Poll::Ready(Err(error)) => return Err(Step::failed_write(error)),
                Poll::Pending => break,
            }
        }
        self.needs_flush = true;
        if written == forward.len() {
            return Ok(true);
        }
        self.backlog.extend_from_slice(&forward[written..]);
        Ok(false)
    }

    /// The rare read where wsgate acts: the follower stopped at a frame
    /// boundary, before a frame that takes its message over the limit,
    /// where a waiting frame of ours can go in, or before a message the
    /// client has no token for. Everything goes to the backlog, which the
    /// read loop writes next; after a missing token, the rest waits.
    fn pass_on_acting(&mut self, end: ReadEnd, data: &[u8], fed: Fed, stop: Stop) -> Step {
        let eof = matches!(end, ReadEnd::Eof);
        self.forward_to_backlog(&data[..fed.consumed]);
        let mut rest = &data[fed.consumed..];
        let mut stop = stop;
        loop {
            match stop {
                Stop::OverLimit => {
                    self.over_limit = true;
                    self.put_own(Own::Close {
                        code: 1009,
                        reason: "message too big",
                    });
                }
                Stop::Boundary => {
                    if let Some(own) = self.outbox.take() {
                        self.put_own(own);
                    }
                }
                Stop::NoToken => {
                    self.paused_input.extend_from_slice(rest);
                    self.paused_eof = eof;
                    self.resume_at = self.bucket.as_ref().map(MessageBucket::next_token_at);
                    return match end {
                        ReadEnd::Failed(error) => {
                            Step::Return(Poll::Ready(Err(PumpError::Read(error))))
                        }
                        _ => Step::Continue,
                    };
                }
                Stop::No => {}
            }
            if self.sealed {
                let fed = self.frames.follow_discarded(rest);
                if !eof {
                    self.hold(&rest[fed.consumed..]);
                }
                break;
            }
            let (fed, next) = self
                .frames
                .follow(rest, self.limit, false, self.bucket.as_mut());
            self.forward_to_backlog(&rest[..fed.consumed]);
            rest = &rest[fed.consumed..];
            if !fed.stopped {
                if eof {
                    self.forward_to_backlog(rest);
                } else {
                    self.hold(rest);
                }
                break;
            }
            stop = next;
        }
        match end {
            ReadEnd::Eof => {
                self.read_closed = true;
                Step::Continue
            }
            ReadEnd::Failed(error) => Step::Return(Poll::Ready(Err(PumpError::Read(error)))),
            ReadEnd::Pending | ReadEnd::Full => Step::Continue,
        }
    }

    fn forward_to_backlog(&mut self, bytes: &[u8]) {
        self.bytes += bytes.len() as u64;
        self.backlog.extend_from_slice(bytes);
    }
}

/// RFC 6455 §5.3: "The masking key needs to be unpredictable; thus, the
/// masking key MUST be derived from a strong source of entropy". If the
/// system cannot give one, a key of zeros still makes a well-formed frame.
fn mask_key() -> [u8; 4] {
    let mut key = [0; 4];
    if getrandom::fill(&mut key).is_err() {
        tracing::warn!("no entropy for a WebSocket masking key; sending a zero key");
    }
    key
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
