//! Following RFC 6455 frame headers in a byte stream that is spliced, not
//! parsed.
//!
//! wsgate forwards WebSocket bytes unchanged in both directions, yet it must
//! know where frames begin and end:
//!
//! - it injects its own control frames (Ping for liveness, Close on shutdown
//!   or a policy breach). A frame's bytes are contiguous on the wire (§5.2),
//!   so an injected frame can only go *between* two frames; between the
//!   fragments of a message is fine: "Control frames (see Section 5.5) MAY be
//!   injected in the middle of a fragmented message" (§5.4);
//! - it enforces a message size limit, which has to be decided before the
//!   payload that breaks it is forwarded, not after;
//! - it records how a connection was closed (the Close status code).
//!
//! Decoding and re-encoding frames is not an option, and not only for cost:
//! "An intermediary MUST NOT change the fragmentation of a message if any
//! reserved bit values are used and the meaning of these values is not known
//! to the intermediary" (§5.4), and permessage-deflate (RFC 7692) sets RSV1.
//! So [`FrameFollower`] reads headers only (2 to 14 bytes a frame), skips
//! payloads by their length without touching them, and keeps a few dozen
//! bytes of state per direction. The one exception is a Close frame, whose
//! first two payload bytes, the status code (§5.5.1), are unmasked for the
//! record.
//!
//! Reads split the stream anywhere, including inside a header. A follower
//! either remembers the start of a split header itself ([`FrameFollower::new`])
//! or leaves those bytes unconsumed for the caller to present again with the
//! next read ([`FrameFollower::holding`]); see [`Fed::partial_header`] for why
//! a caller would choose the second.
//!
//! # Use
//!
//! The callback decides, event by event, whether the bytes so far may go
//! on; what it stops at is a point where the proxy can act without having
//! forwarded a byte too many. A splice loop (the test `caller_loop` runs
//! this shape):
//!
//! ```ignore
//! let mut f = FrameFollower::holding();
//! // `buf`: bytes read from this direction and not forwarded yet.
//! let fed = f.feed(&buf, |_, ev| match ev {
//!     // Limit: refuse before any of the crossing frame's payload passes.
//!     Event::Header(h) if !h.opcode.is_control() && h.message_bytes > max => {
//!         too_big = true;
//!         Control::Stop // consumed = where this frame starts
//!     }
//!     // Backpressure: pause at a message end when there is no token.
//!     Event::MessageEnd { .. } if !limiter.try_take() => Control::Stop,
//!     // Shutdown: let the current frame finish, then inject.
//!     ev if closing && ev.is_frame_end() => Control::Stop,
//!     _ => Control::Continue,
//! });
//! peer.write_all(&buf[..fed.consumed]).await?;
//! buf.drain(..fed.consumed); // a stop's rest, or a held partial header
//! if f.at_boundary() && (too_big || closing) {
//!     peer.write_all(&encode_close(1009, "message too big", mask)).await?;
//! }
//! ```

use core::ops::Deref;

/// The longest header: 2 fixed bytes, an 8-byte extended length and a
/// 4-byte masking key (§5.2).
pub const MAX_HEADER_LEN: usize = 14;

/// "All control frames MUST have a payload length of 125 bytes or less"
/// (§5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// The frame types the follower accepts. There is no variant for a reserved
/// opcode: the follower cannot know a reserved frame's rules (is it
/// control? may it fragment?), so one makes the stream [`Event::Lost`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Opcode {
    /// The 4-bit value on the wire (§5.2), for logs and metrics labels.
    pub fn to_u8(self) -> u8 {
        match self {
            Opcode::Continuation => 0x0,
            Opcode::Text => 0x1,
            Opcode::Binary => 0x2,
            Opcode::Close => 0x8,
            Opcode::Ping => 0x9,
            Opcode::Pong => 0xA,
        }
    }

    /// Control frames may sit between the fragments of a message and are
    /// never counted in its size (§5.4, §5.5).
    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// Why a stream became unfollowable. Each breaks a rule the follower needs
/// to keep finding frame boundaries or to keep message accounting honest;
/// an endpoint seeing any of them "MUST _Fail the WebSocket Connection_".
/// When a header breaks several rules, the first in this order is reported
/// (the order its bytes arrive in).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Violation {
    /// "%x3-7 are reserved for further non-control frames", "%xB-F are
    /// reserved for further control frames" (§5.2). Carries the opcode.
    ReservedOpcode(u8),
    /// A continuation frame with no fragmented message open: §5.4 has a
    /// message start with a Text or Binary frame, so there is nothing for it
    /// to continue.
    UnexpectedContinuation,
    /// A Text or Binary frame while a fragmented message is open: "The
    /// fragments of one message MUST NOT be interleaved between the fragments
    /// of another message unless an extension has been negotiated that can
    /// interpret the interleaving" (§5.4). No registered extension does.
    InterruptedMessage,
    /// A control frame with FIN clear: "Control frames themselves MUST NOT be
    /// fragmented" (§5.4).
    FragmentedControl,
    /// A control frame longer than 125 bytes (§5.5).
    ControlTooLong,
    /// A 64-bit payload length with its top bit set: "the most significant
    /// bit MUST be 0" (§5.2).
    LengthTopBit,
}

/// A complete frame header, reported once its last byte has been seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub opcode: Opcode,
    pub fin: bool,
    /// RSV1..RSV3 as the low three bits, RSV1 = `0b100`. Not judged:
    /// whether they may be set depends on the extensions negotiated in the
    /// handshake (§5.2, RFC 7692 §6), which the caller knows and we don't.
    pub rsv: u8,
    /// The masking key, if the MASK bit is set. Not judged either: whether a
    /// frame must be masked depends on its direction (§5.1: a client "MUST
    /// mask all frames that it sends", a server "MUST NOT mask any").
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    /// 2..=14 bytes.
    pub header_len: u8,
    /// Offset in the current chunk where the header started; 0 when it
    /// started in an earlier chunk (then `carried > 0`).
    pub header_start: usize,
    /// How many of the header's bytes came in earlier chunks and so were
    /// already consumed (and probably forwarded). Always 0 for a follower
    /// made with [`FrameFollower::holding`].
    pub carried: u8,
    /// Offset in the current chunk where the payload starts; the event's
    /// offset too.
    pub payload_start: usize,
    /// For a data frame: the size of its message so far, *including* this
    /// frame's payload, so a limit can be checked before any of it passes.
    /// For a control frame: the open message's size, unchanged.
    pub message_bytes: u64,
}

impl FrameHeader {
    /// permessage-deflate marks a compressed message with RSV1 on its first
    /// frame (RFC 7692 §6).
    pub fn rsv1(&self) -> bool {
        self.rsv & 0b100 != 0
    }
}

/// What the follower reports. Every frame gives one [`Event::Header`] and,
/// once its last payload byte has passed, exactly one of
/// [`Event::FrameEnd`], [`Event::MessageEnd`] or [`Event::Close`]: the
/// offset of that second event is always a frame boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// At the first payload byte. Returning [`Control::Stop`] here rewinds
    /// to the *start* of this frame (see [`FrameFollower::feed`]).
    Header(FrameHeader),
    /// A Ping, a Pong or a non-final data fragment ended.
    FrameEnd { opcode: Opcode },
    /// The final fragment of a data message ended. `opcode` is the
    /// message's (Text or Binary, from its first frame, §5.4); `bytes` is
    /// the sum of its fragments' payload lengths.
    MessageEnd { opcode: Opcode, bytes: u64 },
    /// A Close frame ended. `None` when it had no status code, which
    /// "is considered to be 1005" (§7.1.5); also `None` for a 1-byte body,
    /// which §5.5.1 does not allow ("If there is a body, the first two bytes
    /// of the body MUST be a 2-byte unsigned integer") but which does not
    /// stop us following frames.
    Close { code: Option<u16> },
    /// The stream broke a framing rule; at the offset where the offending
    /// header starts (0 if it started in an earlier chunk). Reported once;
    /// after it the follower reports nothing and consumes everything.
    Lost(Violation),
}

impl Event {
    /// Whether the event's offset is a frame boundary, where a frame may be
    /// injected.
    pub fn is_frame_end(&self) -> bool {
        matches!(
            self,
            Event::FrameEnd { .. } | Event::MessageEnd { .. } | Event::Close { .. }
        )
    }
}

/// The callback's answer to each event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Consume nothing past this point: the event's offset, except for a
    /// header, where it is the start of the frame. [`FrameFollower::feed`]
    /// returns at once and the follower's state is that at
    /// [`Fed::consumed`], so feeding the unconsumed rest later carries on
    /// exactly (a stopped-at header is reported again).
    Stop,
}

/// What one [`FrameFollower::feed`] did with a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct Fed {
    /// Bytes of the chunk followed: forward `chunk[..consumed]`; keep the
    /// rest for a later feed (there is a rest only after a stop, or with
    /// [`FrameFollower::holding`]).
    pub consumed: usize,
    /// Whether the callback returned [`Control::Stop`].
    pub stopped: bool,
    /// The last frame boundary in `chunk[..consumed]`, offset 0 and
    /// `consumed` included; `None` if there was none, e.g. inside one long
    /// payload, or once lost.
    pub last_boundary: Option<usize>,
    /// The chunk ended inside a header, this many of the chunk's last bytes
    /// into it. With [`FrameFollower::new`] those bytes are consumed (and
    /// remembered), so they are the end of `chunk[..consumed]`; if the
    /// caller forwards them and that header turns out to cross a limit, it
    /// has already sent part of the frame it wanted to refuse. With
    /// [`FrameFollower::holding`] they are left unconsumed, `chunk[consumed..]`
    /// (at most 13 bytes), and the caller presents them again in front of its
    /// next read, which makes a stop at a header exact.
    pub partial_header: usize,
}

/// Follows the frames of one direction of a WebSocket connection. See the
/// module docs for why it exists; one per direction, fed every byte of that
/// direction in order.
#[derive(Clone, Debug)]
pub struct FrameFollower {
    /// Payload bytes of the current frame still to pass; 0 between frames
    /// (an empty payload ends within the feed that completed its header).
    remaining: u64,
    /// Size of the open data message (0 when none is open).
    message_bytes: u64,
    /// The bytes of a header split across chunks (never used when holding).
    stash: [u8; MAX_HEADER_LEN],
    stash_len: u8,
    /// The open data message's opcode, Text or Binary.
    message: Option<Opcode>,
    /// The frame whose payload is passing.
    opcode: Opcode,
    fin: bool,
    /// A Close frame's masking key (zero if unmasked) and status code bytes:
    /// `close_need` of them still to come, out of 2 when `close_has_code`.
    close_key: [u8; 4],
    close_code: [u8; 2],
    close_need: u8,
    close_has_code: bool,
    lost: bool,
    hold: bool,
}

impl Default for FrameFollower {
    fn default() -> Self {
        Self::new()
    }
}

/// The outcome of reading a header from the bytes available so far.
enum Parse {
    Incomplete,
    Invalid(Violation),
    Complete(Raw),
}

#[derive(Clone, Copy)]
struct Raw {
    opcode: Opcode,
    fin: bool,
    rsv: u8,
    mask: Option<[u8; 4]>,
    len: u64,
    header_len: u8,
}

/// Reads a header from the start of `b`, judging each rule as soon as the
/// byte it needs is there, so a bad stream goes Lost at its first bad byte
/// rather than when a header that will never make sense completes.
#[inline(always)]
fn parse(b: &[u8], message_open: bool) -> Parse {
    let Some(&b0) = b.first() else {
        return Parse::Incomplete;
    };
    let fin = b0 & 0x80 != 0;
    let opcode = match b0 & 0x0F {
        0x0 if message_open => Opcode::Continuation,
        0x0 => return Parse::Invalid(Violation::UnexpectedContinuation),
        0x1 | 0x2 if message_open => return Parse::Invalid(Violation::InterruptedMessage),
        0x1 => Opcode::Text,
        0x2 => Opcode::Binary,
        0x8 => Opcode::Close,
        0x9 => Opcode::Ping,
        0xA => Opcode::Pong,
        op => return Parse::Invalid(Violation::ReservedOpcode(op)),
    };
    // Of the accepted opcodes, exactly the control ones have bit 3 set.
    let control = b0 & 0x08 != 0;
    if control && !fin {
        return Parse::Invalid(Violation::FragmentedControl);
    }
    let Some(&b1) = b.get(1) else {
        return Parse::Incomplete;
    };
    let code = b1 & 0x7F;
    if control && code as usize > MAX_CONTROL_PAYLOAD {
        return Parse::Invalid(Violation::ControlTooLong);
    }
    // §5.2: "If 0-125, that is the payload length. If 126, the following 2
    // bytes interpreted as a 16-bit unsigned integer are the payload length.
    // If 127, the following 8 bytes [...]". Non-minimal encodings ("the
    // minimal number of bytes MUST be used") are accepted: they do not stop
    // us following the stream, and judging endpoints is not our job.
    let (len, ext) = match code {
        126 => match b.get(2..).and_then(<[u8]>::first_chunk::<2>) {
            Some(x) => (u64::from(u16::from_be_bytes(*x)), 2),
            None => return Parse::Incomplete,
        },
        127 => {
            if b.get(2).is_some_and(|&x| x & 0x80 != 0) {
                return Parse::Invalid(Violation::LengthTopBit);
            }
            match b.get(2..).and_then(<[u8]>::first_chunk::<8>) {
                Some(x) => (u64::from_be_bytes(*x), 8),
                None => return Parse::Incomplete,
            }
        }
        n => (u64::from(n), 0),
    };
    let mask = if b1 & 0x80 != 0 {
        match b.get(2 + ext..).and_then(<[u8]>::first_chunk::<4>) {
            Some(k) => Some(*k),
            None => return Parse::Incomplete,
        }
    } else {
        None
    };
    Parse::Complete(Raw {
        opcode,
        fin,
        rsv: (b0 >> 4) & 0b111,
        mask,
        len,
        header_len: (2 + ext + if mask.is_some() { 4 } else { 0 }) as u8,
    })
}

impl FrameFollower {
    /// A follower that remembers a header split across chunks, so every
    /// chunk is consumed whole unless the caller stops. Simplest for a
    /// caller that forwards each read as it comes; see
    /// [`Fed::partial_header`] for the one inexactness that brings.
    pub fn new() -> Self {
        FrameFollower {
            remaining: 0,
            message_bytes: 0,
            stash: [0; MAX_HEADER_LEN],
            stash_len: 0,
            message: None,
            opcode: Opcode::Binary,
            fin: true,
            close_key: [0; 4],
            close_code: [0; 2],
            close_need: 0,
            close_has_code: false,
            lost: false,
            hold: false,
        }
    }

    /// A follower that never consumes an incomplete header: a chunk ending
    /// inside one is consumed up to where that header starts, and the
    /// caller feeds those bytes (at most 13) again in front of its next
    /// read. Every header then completes within one chunk, so a stop at a
    /// header never leaves part of it forwarded. The caller's buffer must
    /// hold at least [`MAX_HEADER_LEN`] bytes or it may never progress.
    pub fn holding() -> Self {
        FrameFollower {
            hold: true,
            ..Self::new()
        }
    }

    /// Whether the stream sits between two frames, where the proxy may
    /// inject one of its own. False once lost: nothing is known then.
    pub fn at_boundary(&self) -> bool {
        !self.lost && self.remaining == 0 && self.stash_len == 0
    }

    pub fn is_lost(&self) -> bool {
        self.lost
    }

    /// The size of the open data message so far, including the whole
    /// payload of its latest fragment as soon as that fragment's header is
    /// complete; 0 when no message is open.
    pub fn message_bytes(&self) -> u64 {
        self.message_bytes
    }

    /// The open data message's type (Text or Binary), if one is open: from
    /// its first frame's header until its final frame's last byte.
    pub fn open_message(&self) -> Option<Opcode> {
        self.message
    }

    /// Bytes of an incomplete header the follower is remembering from
    /// earlier chunks (always 0 when holding). While non-zero the stream is
    /// not at a boundary, though those bytes were consumed.
    pub fn pending_header_len(&self) -> usize {
        usize::from(self.stash_len)
    }

    /// Follows `chunk`, the next bytes of this direction, calling
    /// `on_event(offset, event)` for each event in stream order, `offset`
    /// being where in `chunk` the event holds (see [`Event`]). The callback
    /// can stop the feed ([`Control::Stop`]); the result tells how much of
    /// the chunk was followed, which is what the caller may forward.
    ///
    /// Cost: per frame a header parse and two callback calls, plus a copy of
    /// at most 14 bytes when a header straddles chunks; payload bytes are
    /// never read, except a Close frame's first two.
    pub fn feed<F>(&mut self, chunk: &[u8], mut on_event: F) -> Fed
    where
        F: FnMut(usize, Event) -> Control,
    {
        let len = chunk.len();
        if self.lost {
            return Fed {
                consumed: len,
                stopped: false,
                last_boundary: None,
                partial_header: 0,
            };
        }
        let mut last_boundary = if self.at_boundary() { Some(0) } else { None };
        let mut pos = 0;
        loop {
            if self.remaining == 0 {
                // Between frames, or inside a header that began earlier.
                if pos == len {
                    break;
                }
                let rest = chunk.get(pos..).unwrap_or_default();
                let carried = usize::from(self.stash_len);
                let open = self.message.is_some();
                let parsed = if carried == 0 {
                    parse(rest, open)
                } else {
                    // Only at pos 0: a header that completes in this chunk
                    // clears the stash. The stash length is updated only
                    // once we know the outcome, so a stop leaves it as was.
                    let take = rest.len().min(MAX_HEADER_LEN - carried);
                    let mut joined = self.stash;
                    joined[carried..carried + take].copy_from_slice(&rest[..take]);
                    parse(&joined[..carried + take], open)
                };
                let raw = match parsed {
                    Parse::Complete(raw) => raw,
                    Parse::Incomplete => {
                        let n = rest.len();
                        if self.hold {
                            return Fed {
                                consumed: pos,
                                stopped: false,
                                last_boundary,
                                partial_header: n,
                            };
                        }
                        // Incomplete means fewer than 14 bytes in all, so
                        // they fit.
                        let end = carried + n;
                        if let Some(dst) = self.stash.get_mut(carried..end) {
                            dst.copy_from_slice(rest);
                            self.stash_len = end as u8;
                        }
                        return Fed {
                            consumed: len,
                            stopped: false,
                            last_boundary,
                            partial_header: n,
                        };
                    }
                    Parse::Invalid(v) => {
                        self.lose();
                        let stopped = on_event(pos, Event::Lost(v)) == Control::Stop;
                        return Fed {
                            consumed: if stopped { pos } else { len },
                            stopped,
                            last_boundary,
                            partial_header: 0,
                        };
                    }
                };
                let payload_start = pos + usize::from(raw.header_len) - carried;
                let message_bytes = match raw.opcode {
                    Opcode::Text | Opcode::Binary => raw.len,
                    Opcode::Continuation => self.message_bytes.saturating_add(raw.len),
                    _ => self.message_bytes,
                };
                let header = FrameHeader {
                    opcode: raw.opcode,
                    fin: raw.fin,
                    rsv: raw.rsv,
                    mask: raw.mask,
                    payload_len: raw.len,
                    header_len: raw.header_len,
                    header_start: pos,
                    carried: carried as u8,
                    payload_start,
                    message_bytes,
                };
                if on_event(payload_start, Event::Header(header)) == Control::Stop {
                    return Fed {
                        consumed: pos,
                        stopped: true,
                        last_boundary,
                        partial_header: 0,
                    };
                }
                self.begin_frame(raw, message_bytes);
                pos = payload_start;
            }
            // Inside a payload (possibly empty).
            let avail = len - pos;
            if self.close_need > 0 && avail > 0 {
                self.take_close_code(chunk.get(pos..).unwrap_or_default());
            }
            if (avail as u64) < self.remaining {
                self.remaining -= avail as u64;
                return Fed {
                    consumed: len,
                    stopped: false,
                    last_boundary,
                    partial_header: 0,
                };
            }
            // Fits in usize: it is at most `avail`.
            pos += self.remaining as usize;
            self.remaining = 0;
            let event = self.end_frame();
            last_boundary = Some(pos);
            if on_event(pos, event) == Control::Stop {
                return Fed {
                    consumed: pos,
                    stopped: true,
                    last_boundary,
                    partial_header: 0,
                };
            }
        }
        Fed {
            consumed: len,
            stopped: false,
            last_boundary,
            partial_header: 0,
        }
    }

    /// Commits a header the caller let pass.
    fn begin_frame(&mut self, raw: Raw, message_bytes: u64) {
        self.stash_len = 0;
        self.remaining = raw.len;
        self.opcode = raw.opcode;
        self.fin = raw.fin;
        match raw.opcode {
            Opcode::Text | Opcode::Binary => {
                self.message = Some(raw.opcode);
                self.message_bytes = message_bytes;
            }
            Opcode::Continuation => self.message_bytes = message_bytes,
            Opcode::Close => {
                self.close_has_code = raw.len >= 2;
                self.close_need = if self.close_has_code { 2 } else { 0 };
                self.close_key = raw.mask.unwrap_or([0; 4]);
            }
            Opcode::Ping | Opcode::Pong => {}
        }
    }

    /// Unmasks the status code bytes at the start of `payload`, the bytes of
    /// the Close frame from where it was left: "j = i MOD 4,
    /// transformed-octet-i = original-octet-i XOR masking-key-octet-j"
    /// (§5.3), and the code is at payload offsets 0 and 1.
    #[cold]
    fn take_close_code(&mut self, payload: &[u8]) {
        let first = usize::from(2 - self.close_need.min(2));
        for (i, &b) in (first..2).zip(payload) {
            self.close_code[i] = b ^ self.close_key[i];
            self.close_need -= 1;
        }
    }

    /// The end event of the frame whose last byte just passed.
    fn end_frame(&mut self) -> Event {
        match self.opcode {
            Opcode::Close => Event::Close {
                code: self
                    .close_has_code
                    .then(|| u16::from_be_bytes(self.close_code)),
            },
            Opcode::Ping | Opcode::Pong => Event::FrameEnd {
                opcode: self.opcode,
            },
            Opcode::Text | Opcode::Binary | Opcode::Continuation if self.fin => {
                let opcode = self.message.take().unwrap_or(self.opcode);
                let bytes = core::mem::take(&mut self.message_bytes);
                Event::MessageEnd { opcode, bytes }
            }
            Opcode::Text | Opcode::Binary | Opcode::Continuation => Event::FrameEnd {
                opcode: self.opcode,
            },
        }
    }

    fn lose(&mut self) {
        self.lost = true;
        self.remaining = 0;
        self.stash_len = 0;
        self.message = None;
        self.message_bytes = 0;
    }
}

/// A control frame built on the stack: the proxy sends one now and then, and
/// 131 bytes (6 of header, 125 of payload) cover any.
#[derive(Clone, Copy, Debug)]
pub struct ControlFrame {
    buf: [u8; 6 + MAX_CONTROL_PAYLOAD],
    len: u8,
}

impl ControlFrame {
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }

    /// `payload` is `head` then `tail`, together at most 125 bytes (the
    /// callers make sure).
    fn build(opcode: Opcode, head: &[u8], tail: &[u8], mask: Option<[u8; 4]>) -> Self {
        let mut buf = [0; 6 + MAX_CONTROL_PAYLOAD];
        let n = (head.len() + tail.len()).min(MAX_CONTROL_PAYLOAD);
        buf[0] = 0x80 | opcode.to_u8();
        buf[1] = n as u8;
        let mut at = 2;
        if let Some(key) = mask {
            buf[1] |= 0x80;
            buf[2..6].copy_from_slice(&key);
            at = 6;
        }
        let payload = &mut buf[at..at + n];
        for (dst, &src) in payload.iter_mut().zip(head.iter().chain(tail)) {
            *dst = src;
        }
        if let Some(key) = mask {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= key[i & 3];
            }
        }
        ControlFrame {
            buf,
            len: (at + n) as u8,
        }
    }
}

impl Deref for ControlFrame {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl AsRef<[u8]> for ControlFrame {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

/// A Close frame with status `code` and as much of `reason` as fits.
/// The reason is cut at a character boundary, not at byte 123: it "MAY
/// contain UTF-8-encoded data" (§5.5.1) and a peer that "finds that the byte
/// stream is not, in fact, a valid UTF-8 stream [...] MUST _Fail the
/// WebSocket Connection_" (§8.1), which would turn our orderly close into a
/// failure. The caller picks the code (§7.4.1; e.g. 1009 for a message
/// "too big for it to process") and the mask: a proxy masks what it sends
/// to the backend and not what it sends to the client (§5.1).
pub fn encode_close(code: u16, reason: &str, mask: Option<[u8; 4]>) -> ControlFrame {
    let mut cut = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let reason = reason.as_bytes().get(..cut).unwrap_or_default();
    ControlFrame::build(Opcode::Close, &code.to_be_bytes(), reason, mask)
}

/// A Ping carrying `payload`, or `None` if that is over 125 bytes (§5.5).
/// Not truncated: the Pong must echo "the exact Application data" (§5.5.3),
/// and a caller matching Pongs to its Pings would be misled.
pub fn encode_ping(payload: &[u8], mask: Option<[u8; 4]>) -> Option<ControlFrame> {
    (payload.len() <= MAX_CONTROL_PAYLOAD)
        .then(|| ControlFrame::build(Opcode::Ping, payload, &[], mask))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // ---- helpers -------------------------------------------------------

    /// How a test frame's length is written: minimally, or wider than
    /// needed (accepted, see `parse`).
    #[derive(Clone, Copy, Debug)]
    enum Width {
        Minimal,
        Ext16,
        Ext64,
    }

    /// Encodes one frame, simply and separately from the code under test.
    fn frame_w(
        op: u8,
        fin: bool,
        rsv: u8,
        mask: Option<[u8; 4]>,
        payload: &[u8],
        width: Width,
    ) -> Vec<u8> {
        let mut out = vec![(u8::from(fin) << 7) | (rsv << 4) | op];
        let m = if mask.is_some() { 0x80 } else { 0 };
        let n = payload.len();
        let width = match width {
            Width::Minimal if n < 126 => None,
            Width::Minimal if n <= 0xFFFF => Some(2),
            Width::Minimal => Some(8),
            Width::Ext16 if n <= 0xFFFF => Some(2),
            Width::Ext16 | Width::Ext64 => Some(8),
        };
        match width {
            None => out.push(m | n as u8),
            Some(2) => {
                out.push(m | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            Some(_) => {
                out.push(m | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if let Some(k) = mask {
            out.extend_from_slice(&k);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        } else {
            out.extend_from_slice(payload);
        }
        out
    }

    fn frame(op: u8, fin: bool, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
        frame_w(op, fin, 0, mask, payload, Width::Minimal)
    }

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// Feeds `chunks` in turn, continuing at every event; returns the events
    /// with offsets made absolute, and each feed's result.
    fn run(f: &mut FrameFollower, chunks: &[&[u8]]) -> (Vec<(usize, Event)>, Vec<Fed>) {
        let mut events = Vec::new();
        let mut feds = Vec::new();
        let mut base = 0;
        for c in chunks {
            let fed = f.feed(c, |at, e| {
                events.push((base + at, e));
                Control::Continue
            });
            base += fed.consumed;
            feds.push(fed);
        }
        (events, feds)
    }

    fn events_of(bytes: &[u8]) -> Vec<(usize, Event)> {
        run(&mut FrameFollower::new(), &[bytes]).0
    }

    fn header(e: &Event) -> FrameHeader {
        match e {
            Event::Header(h) => *h,
            other => panic!("expected a header, got {other:?}"),
        }
    }

    fn lost_with(bytes: &[u8]) -> Violation {
        let ev = events_of(bytes);
        let lost: Vec<_> = ev
            .iter()
            .filter_map(|(_, e)| match e {
                Event::Lost(v) => Some(*v),
                _ => None,
            })
            .collect();
        assert_eq!(lost.len(), 1, "{ev:?}");
        lost[0]
    }

    // ---- unit tests ------------------------------------------------------

    #[test]
    fn single_text_frame() {
        let bytes = frame(0x1, true, None, b"hello");
        let ev = events_of(&bytes);
        assert_eq!(ev.len(), 2);
        let h = header(&ev[0].1);
        assert_eq!(ev[0].0, 2);
        assert_eq!(
            h,
            FrameHeader {
                opcode: Opcode::Text,
                fin: true,
                rsv: 0,
                mask: None,
                payload_len: 5,
                header_len: 2,
                header_start: 0,
                carried: 0,
                payload_start: 2,
                message_bytes: 5,
            }
        );
        assert_eq!(
            ev[1],
            (
                7,
                Event::MessageEnd {
                    opcode: Opcode::Text,
                    bytes: 5
                }
            )
        );
    }

    #[test]
    fn masked_binary_frame_reports_key() {
        let bytes = frame(0x2, true, Some(KEY), &[1, 2, 3]);
        let ev = events_of(&bytes);
        let h = header(&ev[0].1);
        assert_eq!(h.mask, Some(KEY));
        assert_eq!(h.header_len, 6);
        assert_eq!(h.payload_start, 6);
        assert_eq!(
            ev[1],
            (
                9,
                Event::MessageEnd {
                    opcode: Opcode::Binary,
                    bytes: 3
                }
            )
        );
    }

    #[test]
    fn extended_lengths() {
        for (n, header_len) in [(125, 2), (126, 4), (65535, 4), (65536, 10)] {
            for mask in [None, Some(KEY)] {
                let bytes = frame(0x2, true, mask, &vec![7; n]);
                let ev = events_of(&bytes);
                let h = header(&ev[0].1);
                let hl = header_len + if mask.is_some() { 4 } else { 0 };
                assert_eq!((h.payload_len, h.header_len), (n as u64, hl));
                assert_eq!(ev[1].0, bytes.len());
            }
        }
    }

    #[test]
    fn non_minimal_lengths_are_followed() {
        let bytes = [
            frame_w(0x2, true, 0, None, b"ab", Width::Ext16),
            frame_w(0x2, true, 0, Some(KEY), b"cd", Width::Ext64),
        ]
        .concat();
        let ev = events_of(&bytes);
        assert_eq!(ev.len(), 4);
        assert_eq!(header(&ev[0].1).header_len, 4);
        assert_eq!(header(&ev[2].1).header_len, 14);
        assert_eq!(ev[3].0, bytes.len());
    }

    #[test]
    fn huge_length_is_skipped_without_reading() {
        let mut bytes = vec![0x82, 127];
        bytes.extend_from_slice(&(u64::MAX >> 1).to_be_bytes());
        bytes.extend_from_slice(&[0; 100]);
        let mut f = FrameFollower::new();
        let (ev, feds) = run(&mut f, &[&bytes]);
        assert_eq!(ev.len(), 1);
        assert_eq!(header(&ev[0].1).payload_len, u64::MAX >> 1);
        assert_eq!(feds[0].consumed, bytes.len());
        assert_eq!(feds[0].last_boundary, Some(0));
        assert!(!f.at_boundary());
    }

    #[test]
    fn fragmented_message_with_interleaved_ping() {
        let bytes = [
            frame(0x1, false, None, b"ab"),
            frame(0x9, true, None, b"p"),
            frame(0x0, false, None, b"cde"),
            frame(0xA, true, None, b""),
            frame(0x0, true, None, b"f"),
        ]
        .concat();
        let mut f = FrameFollower::new();
        let (ev, _) = run(&mut f, &[&bytes]);
        let kinds: Vec<_> = ev
            .iter()
            .map(|(_, e)| *e)
            .filter(Event::is_frame_end)
            .collect();
        assert_eq!(
            kinds,
            [
                Event::FrameEnd {
                    opcode: Opcode::Text
                },
                Event::FrameEnd {
                    opcode: Opcode::Ping
                },
                Event::FrameEnd {
                    opcode: Opcode::Continuation
                },
                Event::FrameEnd {
                    opcode: Opcode::Pong
                },
                Event::MessageEnd {
                    opcode: Opcode::Text,
                    bytes: 6
                },
            ]
        );
        let sizes: Vec<_> = ev
            .iter()
            .filter_map(|(_, e)| match e {
                Event::Header(h) => Some(h.message_bytes),
                _ => None,
            })
            .collect();
        assert_eq!(sizes, [2, 2, 5, 5, 6]);
        assert_eq!(f.message_bytes(), 0);
        assert_eq!(f.open_message(), None);
    }

    #[test]
    fn message_bytes_while_open() {
        let mut f = FrameFollower::new();
        let first = frame(0x2, false, None, &[0; 10]);
        let _ = f.feed(&first, |_, _| Control::Continue);
        assert_eq!(f.message_bytes(), 10);
        assert_eq!(f.open_message(), Some(Opcode::Binary));
        let ping = frame(0x9, true, None, b"x");
        let _ = f.feed(&ping, |_, _| Control::Continue);
        assert_eq!(f.message_bytes(), 10);
        // Counted at the header, before its payload arrives.
        let next = frame(0x0, true, None, &[0; 20]);
        let _ = f.feed(&next[..2], |_, _| Control::Continue);
        assert_eq!(f.message_bytes(), 30);
    }

    #[test]
    fn close_with_code_unmasked_and_masked() {
        for mask in [None, Some(KEY)] {
            let mut payload = 1001u16.to_be_bytes().to_vec();
            payload.extend_from_slice(b"bye");
            let bytes = frame(0x8, true, mask, &payload);
            let ev = events_of(&bytes);
            assert_eq!(ev[1], (bytes.len(), Event::Close { code: Some(1001) }));
        }
    }

    #[test]
    fn close_code_split_across_chunks() {
        let bytes = frame(0x8, true, Some(KEY), &4000u16.to_be_bytes());
        // Header is 6 bytes; cut between the two code bytes, and before them.
        for cut in 0..=bytes.len() {
            let (ev, _) = run(&mut FrameFollower::new(), &[&bytes[..cut], &bytes[cut..]]);
            assert_eq!(ev.last(), Some(&(8, Event::Close { code: Some(4000) })));
        }
        let one_by_one: Vec<&[u8]> = bytes.chunks(1).collect();
        let (ev, _) = run(&mut FrameFollower::new(), &one_by_one);
        assert_eq!(ev.last(), Some(&(8, Event::Close { code: Some(4000) })));
    }

    #[test]
    fn close_without_code() {
        for mask in [None, Some(KEY)] {
            let ev = events_of(&frame(0x8, true, mask, b""));
            assert_eq!(ev[1].1, Event::Close { code: None });
            // A 1-byte body is malformed (§5.5.1) but still followed.
            let ev = events_of(&frame(0x8, true, mask, b"x"));
            assert_eq!(ev[1].1, Event::Close { code: None });
        }
    }

    #[test]
    fn rsv_bits_pass_and_are_reported() {
        for rsv in 0..8 {
            let bytes = frame_w(0x1, true, rsv, None, b"z", Width::Minimal);
            let ev = events_of(&bytes);
            let h = header(&ev[0].1);
            assert_eq!(h.rsv, rsv);
            assert_eq!(h.rsv1(), rsv & 0b100 != 0);
            assert!(matches!(ev[1].1, Event::MessageEnd { .. }));
        }
    }

    #[test]
    fn reserved_opcodes_are_lost() {
        for op in (0x3..=0x7).chain(0xB..=0xF) {
            assert_eq!(
                lost_with(&frame(op, true, None, b"")),
                Violation::ReservedOpcode(op)
            );
        }
    }

    #[test]
    fn control_too_long_is_lost() {
        for op in [0x8, 0x9, 0xA] {
            assert_eq!(
                lost_with(&frame(op, true, None, &[0; 126])),
                Violation::ControlTooLong
            );
            assert_eq!(
                lost_with(&frame_w(op, true, 0, None, b"", Width::Ext64)),
                Violation::ControlTooLong
            );
            // 125 is fine.
            assert!(
                events_of(&frame(op, true, None, &[0; 125]))[1]
                    .1
                    .is_frame_end()
            );
        }
    }

    #[test]
    fn fragmented_control_is_lost() {
        for op in [0x8, 0x9, 0xA] {
            assert_eq!(
                lost_with(&frame(op, false, None, b"")),
                Violation::FragmentedControl
            );
        }
    }

    #[test]
    fn length_top_bit_is_lost_at_its_byte() {
        let bytes = [0x82, 0x7F, 0x80];
        let mut f = FrameFollower::new();
        let (ev, _) = run(&mut f, &[&bytes[..2], &bytes[2..]]);
        // Offset 0 of the second chunk: the header began in the first.
        assert_eq!(ev, [(2, Event::Lost(Violation::LengthTopBit))]);
        assert!(f.is_lost());
    }

    #[test]
    fn unexpected_continuation_is_lost() {
        assert_eq!(
            lost_with(&frame(0x0, true, None, b"x")),
            Violation::UnexpectedContinuation
        );
        let after_end = [frame(0x1, true, None, b"a"), frame(0x0, true, None, b"b")].concat();
        assert_eq!(lost_with(&after_end), Violation::UnexpectedContinuation);
    }

    #[test]
    fn interrupted_message_is_lost() {
        for op in [0x1, 0x2] {
            let bytes = [frame(0x2, false, None, b"a"), frame(op, true, None, b"b")].concat();
            assert_eq!(lost_with(&bytes), Violation::InterruptedMessage);
        }
    }

    #[test]
    fn lost_is_reported_once_and_then_silent() {
        let good = frame(0x1, true, None, b"ok");
        let bytes = [good.clone(), vec![0x83, 0x00], good.clone()].concat();
        let mut f = FrameFollower::new();
        let (ev, feds) = run(&mut f, &[&bytes, &good, &[0xFF; 3]]);
        assert_eq!(ev.len(), 3);
        assert_eq!(ev[2], (4, Event::Lost(Violation::ReservedOpcode(3))));
        assert_eq!(feds[0].consumed, bytes.len());
        assert_eq!(feds[0].last_boundary, Some(4));
        assert_eq!(feds[1].consumed, good.len());
        assert_eq!(feds[1].last_boundary, None);
        assert!(f.is_lost() && !f.at_boundary());
    }

    #[test]
    fn stop_at_lost_consumes_up_to_the_bad_header() {
        let bytes = [frame(0x2, true, None, b"abc"), vec![0x8F, 0]].concat();
        let mut f = FrameFollower::new();
        let fed = f.feed(&bytes, |_, e| match e {
            Event::Lost(_) => Control::Stop,
            _ => Control::Continue,
        });
        assert_eq!((fed.consumed, fed.stopped), (5, true));
        assert_eq!(fed.last_boundary, Some(5));
    }

    #[test]
    fn header_split_at_every_point() {
        let bytes = [
            frame(0x2, false, Some(KEY), &[9; 300]),
            frame(0x0, true, Some(KEY), &[9; 70000]),
        ]
        .concat();
        let whole = events_of(&bytes);
        for cut in 0..bytes.len().min(400) {
            let (ev, feds) = run(&mut FrameFollower::new(), &[&bytes[..cut], &bytes[cut..]]);
            let abs: Vec<_> = ev
                .iter()
                .map(|&(at, e)| match e {
                    Event::Header(h) => {
                        let base = at - h.payload_start;
                        let start = base + h.header_start - usize::from(h.carried);
                        let mut h = h;
                        h.header_start = start;
                        h.payload_start = at;
                        h.carried = 0;
                        (at, Event::Header(h))
                    }
                    other => (at, other),
                })
                .collect();
            assert_eq!(abs, whole, "cut at {cut}");
            assert_eq!(feds[0].consumed, cut);
        }
    }

    #[test]
    fn partial_header_is_remembered_by_default() {
        let bytes = frame(0x2, true, Some(KEY), &[1; 200]); // 8-byte header
        let mut f = FrameFollower::new();
        let fed = f.feed(&bytes[..3], |_, _| Control::Continue);
        assert_eq!((fed.consumed, fed.partial_header), (3, 3));
        assert_eq!(f.pending_header_len(), 3);
        assert!(!f.at_boundary());
        let fed = f.feed(&bytes[3..5], |_, _| Control::Continue);
        assert_eq!((fed.consumed, fed.partial_header), (2, 2));
        assert_eq!(f.pending_header_len(), 5);
        let mut seen = None;
        let fed = f.feed(&bytes[5..], |_, e| {
            if let Event::Header(h) = e {
                seen = Some(h);
            }
            Control::Continue
        });
        let h = seen.expect("header");
        assert_eq!((h.carried, h.header_start, h.payload_start), (5, 0, 3));
        assert_eq!(fed.consumed, bytes.len() - 5);
        assert!(f.at_boundary());
    }

    #[test]
    fn holding_leaves_partial_header_unconsumed() {
        let bytes = frame(0x2, true, Some(KEY), &[1; 200]);
        let mut f = FrameFollower::holding();
        let fed = f.feed(&bytes[..7], |_, _| Control::Continue);
        assert_eq!((fed.consumed, fed.partial_header), (0, 7));
        assert_eq!(fed.last_boundary, Some(0));
        assert!(f.at_boundary());
        assert_eq!(f.pending_header_len(), 0);
        let mut headers = 0;
        let fed = f.feed(&bytes, |_, e| {
            if let Event::Header(h) = e {
                assert_eq!(h.carried, 0);
                headers += 1;
            }
            Control::Continue
        });
        assert_eq!(
            (fed.consumed, fed.partial_header, headers),
            (bytes.len(), 0, 1)
        );
    }

    #[test]
    fn stop_at_header_rewinds_to_frame_start() {
        // Limit 100: the second fragment takes the message to 150.
        let bytes = [
            frame(0x2, false, None, &[0; 60]),
            frame(0x9, true, None, b"p"),
            frame(0x0, true, None, &[0; 90]),
        ]
        .concat();
        let second_start = 62 + 3;
        let mut f = FrameFollower::new();
        let limit = 100;
        let fed = f.feed(&bytes, |_, e| match e {
            Event::Header(h) if h.message_bytes > limit => Control::Stop,
            _ => Control::Continue,
        });
        assert_eq!((fed.consumed, fed.stopped), (second_start, true));
        assert_eq!(fed.last_boundary, Some(second_start));
        assert!(f.at_boundary());
        assert_eq!(f.message_bytes(), 60);
        // Feeding the rest again reports the same header again.
        let (ev, _) = run(&mut f, &[&bytes[second_start..]]);
        assert_eq!(header(&ev[0].1).message_bytes, 150);
        assert_eq!(
            ev[1].1,
            Event::MessageEnd {
                opcode: Opcode::Binary,
                bytes: 150
            }
        );
    }

    #[test]
    fn stop_at_header_with_carried_bytes_keeps_them() {
        let bytes = frame(0x1, true, Some(KEY), b"hi");
        let mut f = FrameFollower::new();
        let _ = f.feed(&bytes[..4], |_, _| Control::Continue);
        let fed = f.feed(&bytes[4..], |_, e| match e {
            Event::Header(_) => Control::Stop,
            _ => Control::Continue,
        });
        assert_eq!(
            (fed.consumed, fed.stopped, fed.last_boundary),
            (0, true, None)
        );
        assert_eq!(f.pending_header_len(), 4);
        let (ev, _) = run(&mut f, &[&bytes[4..]]);
        assert_eq!(header(&ev[0].1).carried, 4);
        assert_eq!(
            ev[1].1,
            Event::MessageEnd {
                opcode: Opcode::Text,
                bytes: 2
            }
        );
    }

    #[test]
    fn stop_at_message_end_then_resume() {
        let bytes = [
            frame(0x1, true, None, b"one"),
            frame(0x1, true, None, b"two"),
        ]
        .concat();
        let mut f = FrameFollower::new();
        let fed = f.feed(&bytes, |_, e| match e {
            Event::MessageEnd { .. } => Control::Stop,
            _ => Control::Continue,
        });
        assert_eq!((fed.consumed, fed.stopped), (5, true));
        assert!(f.at_boundary());
        let (ev, feds) = run(&mut f, &[&bytes[5..]]);
        assert_eq!(ev.len(), 2);
        assert_eq!(feds[0].consumed, 5);
    }

    #[test]
    fn stop_at_next_boundary_inside_a_long_frame() {
        let bytes = [
            frame(0x2, true, None, &[0; 1000]),
            frame(0x9, true, None, b""),
        ]
        .concat();
        let mut f = FrameFollower::new();
        // Mid-payload: no boundary in this chunk.
        let fed = f.feed(&bytes[..500], |_, _| Control::Continue);
        assert_eq!(fed.last_boundary, Some(0));
        let fed = f.feed(&bytes[500..700], |_, _| Control::Continue);
        assert_eq!(fed.last_boundary, None);
        let fed = f.feed(&bytes[700..], |_, e| {
            if e.is_frame_end() {
                Control::Stop
            } else {
                Control::Continue
            }
        });
        assert_eq!((fed.consumed, fed.last_boundary), (1004 - 700, Some(304)));
        assert!(f.at_boundary());
    }

    /// The loop of the module docs, run over reads cut at awkward places:
    /// the limit stop leaves exactly the frames before the crossing one
    /// forwarded, and the Close goes right after them.
    #[test]
    fn caller_loop() {
        let max = 100;
        let stream = [
            frame(0x1, true, Some(KEY), b"small"),
            frame(0x2, false, Some(KEY), &[0; 60]),
            frame(0x9, true, Some(KEY), b""),
            frame(0x0, true, Some(KEY), &[0; 60]), // message reaches 120
            frame(0x1, true, Some(KEY), b"never sent"),
        ];
        let allowed: usize = stream[..3].iter().map(Vec::len).sum();
        let stream = stream.concat();
        for read_size in [1, 3, 7, 13, 14, 64, 1000] {
            let mut f = FrameFollower::holding();
            let mut buf = Vec::new();
            let mut sent = Vec::new();
            let mut reads = stream.chunks(read_size);
            let mut too_big = false;
            while !too_big {
                let Some(read) = reads.next() else { break };
                buf.extend_from_slice(read);
                let fed = f.feed(&buf, |_, ev| match ev {
                    Event::Header(h) if !h.opcode.is_control() && h.message_bytes > max => {
                        too_big = true;
                        Control::Stop
                    }
                    _ => Control::Continue,
                });
                sent.extend_from_slice(&buf[..fed.consumed]);
                buf.drain(..fed.consumed);
                if f.at_boundary() && too_big {
                    sent.extend_from_slice(&encode_close(1009, "message too big", None));
                }
            }
            assert!(too_big, "read size {read_size}");
            assert_eq!(sent[..allowed], stream[..allowed], "read size {read_size}");
            assert_eq!(
                sent[allowed..],
                *encode_close(1009, "message too big", None),
                "read size {read_size}"
            );
        }
    }

    #[test]
    fn empty_chunk_is_harmless() {
        let mut f = FrameFollower::new();
        let fed = f.feed(&[], |_, _| Control::Continue);
        assert_eq!(
            fed,
            Fed {
                consumed: 0,
                stopped: false,
                last_boundary: Some(0),
                partial_header: 0
            }
        );
    }

    #[test]
    fn follower_is_small() {
        assert!(core::mem::size_of::<FrameFollower>() <= 48);
    }

    #[test]
    fn encode_close_round_trips() {
        for mask in [None, Some(KEY)] {
            let c = encode_close(1009, "message too big", mask);
            let mut payload = 1009u16.to_be_bytes().to_vec();
            payload.extend_from_slice(b"message too big");
            assert_eq!(c.as_bytes(), frame(0x8, true, mask, &payload));
            let ev = events_of(&c);
            assert_eq!(header(&ev[0].1).mask, mask);
            assert_eq!(ev[1].1, Event::Close { code: Some(1009) });
        }
    }

    #[test]
    fn encode_close_truncates_at_char_boundary() {
        let reason = "é".repeat(100); // 200 bytes of 2-byte characters
        let c = encode_close(1000, &reason, None);
        let payload = &c[2..];
        assert_eq!(payload.len(), 124); // 2 + 122: 123 would split an 'é'
        assert!(core::str::from_utf8(&payload[2..]).is_ok());
        let ascii = "a".repeat(300);
        assert_eq!(encode_close(1000, &ascii, Some(KEY)).len(), 6 + 125);
    }

    #[test]
    fn encode_ping_round_trips_and_refuses_long_payloads() {
        for mask in [None, Some(KEY)] {
            let p = encode_ping(b"123", mask).expect("short ping");
            assert_eq!(p.as_bytes(), frame(0x9, true, mask, b"123"));
            assert!(encode_ping(&[0; 125], mask).is_some());
            assert!(encode_ping(&[0; 126], mask).is_none());
        }
        assert_eq!(encode_ping(b"", None).expect("empty").as_bytes(), [0x89, 0]);
    }

    // ---- the reference decoder and property tests ------------------------

    /// An event with its positions made absolute in the stream.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Abs {
        Header {
            start: usize,
            payload_start: usize,
            opcode: Opcode,
            fin: bool,
            rsv: u8,
            mask: Option<[u8; 4]>,
            len: u64,
            message_bytes: u64,
        },
        End(usize, Event),
        Lost(usize, Violation),
    }

    #[derive(Default, Debug)]
    struct Reference {
        events: Vec<Abs>,
        /// 0 and every frame end, before any loss.
        boundaries: Vec<usize>,
        /// (start, payload_start) of each complete header.
        headers: Vec<(usize, usize)>,
        /// Start of a header the stream ends inside of.
        tail_header: Option<usize>,
        /// A header that breaks a rule: its start, and the index of the
        /// byte that shows it. Until that byte arrives, it looks like any
        /// other incomplete header.
        bad_header: Option<(usize, usize)>,
    }

    impl Reference {
        /// If `pos` is strictly inside a header, where that header starts.
        fn header_around(&self, pos: usize) -> Option<usize> {
            self.headers
                .iter()
                .find(|&&(s, p)| s < pos && pos < p)
                .map(|&(s, _)| s)
                .or(self.tail_header.filter(|&t| t < pos))
                .or(self
                    .bad_header
                    .filter(|&(s, d)| s < pos && pos <= d)
                    .map(|(s, _)| s))
        }

        fn is_boundary(&self, pos: usize) -> bool {
            self.boundaries.contains(&pos)
        }

        fn last_boundary_in(&self, from: usize, to: usize) -> Option<usize> {
            self.boundaries
                .iter()
                .copied()
                .filter(|&b| from <= b && b <= to)
                .max()
        }
    }

    /// Decodes a whole buffer at once, byte by byte with an index: the
    /// straightforward way, to check the incremental one against.
    fn reference(s: &[u8]) -> Reference {
        let mut r = Reference {
            boundaries: vec![0],
            ..Reference::default()
        };
        let mut i = 0;
        let mut open: Option<Opcode> = None;
        let mut total: u64 = 0;
        while i < s.len() {
            let start = i;
            let b0 = s[i];
            let fin = b0 & 0x80 == 0x80;
            let op = b0 & 0xF;
            let opcode = match op {
                0 => Opcode::Continuation,
                1 => Opcode::Text,
                2 => Opcode::Binary,
                8 => Opcode::Close,
                9 => Opcode::Ping,
                10 => Opcode::Pong,
                _ => {
                    r.events
                        .push(Abs::Lost(start, Violation::ReservedOpcode(op)));
                    r.bad_header = Some((start, start));
                    return r;
                }
            };
            let is_control = op >= 8;
            let bad = if opcode == Opcode::Continuation && open.is_none() {
                Some(Violation::UnexpectedContinuation)
            } else if (opcode == Opcode::Text || opcode == Opcode::Binary) && open.is_some() {
                Some(Violation::InterruptedMessage)
            } else if is_control && !fin {
                Some(Violation::FragmentedControl)
            } else {
                None
            };
            if let Some(v) = bad {
                r.events.push(Abs::Lost(start, v));
                r.bad_header = Some((start, start));
                return r;
            }
            if i + 1 >= s.len() {
                r.tail_header = Some(start);
                return r;
            }
            let b1 = s[i + 1];
            let masked = b1 >= 0x80;
            let code = b1 & 0x7F;
            if is_control && code > 125 {
                r.events.push(Abs::Lost(start, Violation::ControlTooLong));
                r.bad_header = Some((start, start + 1));
                return r;
            }
            let mut p = i + 2;
            let len: u64 = if code == 126 {
                if p + 2 > s.len() {
                    r.tail_header = Some(start);
                    return r;
                }
                p += 2;
                u64::from(s[p - 2]) * 256 + u64::from(s[p - 1])
            } else if code == 127 {
                if p < s.len() && s[p] >= 0x80 {
                    r.events.push(Abs::Lost(start, Violation::LengthTopBit));
                    r.bad_header = Some((start, p));
                    return r;
                }
                if p + 8 > s.len() {
                    r.tail_header = Some(start);
                    return r;
                }
                let mut v = 0u64;
                for k in 0..8 {
                    v = (v << 8) | u64::from(s[p + k]);
                }
                p += 8;
                v
            } else {
                u64::from(code)
            };
            let mut mask = None;
            if masked {
                if p + 4 > s.len() {
                    r.tail_header = Some(start);
                    return r;
                }
                mask = Some([s[p], s[p + 1], s[p + 2], s[p + 3]]);
                p += 4;
            }
            r.headers.push((start, p));
            match opcode {
                Opcode::Text | Opcode::Binary => {
                    open = Some(opcode);
                    total = len;
                }
                Opcode::Continuation => total = total.saturating_add(len),
                _ => {}
            }
            r.events.push(Abs::Header {
                start,
                payload_start: p,
                opcode,
                fin,
                rsv: (b0 >> 4) & 7,
                mask,
                len,
                message_bytes: total,
            });
            if ((s.len() - p) as u64) < len {
                return r;
            }
            let end = p + len as usize;
            let ev = if opcode == Opcode::Close {
                let code = (len >= 2).then(|| {
                    let k = mask.unwrap_or([0; 4]);
                    u16::from(s[p] ^ k[0]) << 8 | u16::from(s[p + 1] ^ k[1])
                });
                Event::Close { code }
            } else if is_control || !fin {
                Event::FrameEnd { opcode }
            } else {
                let ev = Event::MessageEnd {
                    opcode: open.unwrap_or(opcode),
                    bytes: total,
                };
                open = None;
                total = 0;
                ev
            };
            r.events.push(Abs::End(end, ev));
            r.boundaries.push(end);
            i = end;
        }
        r
    }

    /// Plays a caller: the stream arrives cut at `cuts`; the caller keeps
    /// what a feed did not consume and presents it again with the next
    /// bytes, stops at events as `stops` says (never twice at the same
    /// header), and checks everything the follower says against the
    /// reference decoding of the whole stream.
    fn check_stream(stream: &[u8], cuts: &[usize], stops: &[bool], hold: bool) {
        let r = reference(stream);
        let mut f = if hold {
            FrameFollower::holding()
        } else {
            FrameFollower::new()
        };
        let mut cuts: Vec<usize> = cuts.iter().map(|&c| c % (stream.len() + 1)).collect();
        cuts.push(stream.len());
        cuts.sort_unstable();
        let mut events = Vec::new();
        let mut stops = stops.iter().copied();
        let mut stopped_header = None;
        let mut buf: Vec<u8> = Vec::new();
        let mut base = 0; // stream position of buf[0]
        let mut arrived = 0;
        for cut in cuts {
            buf.extend_from_slice(&stream[arrived..cut]);
            arrived = cut;
            loop {
                let lost_before = f.is_lost();
                let carried_before = f.pending_header_len();
                let fed = f.feed(&buf, |at, e| {
                    let stop = stops.next().unwrap_or(false);
                    match e {
                        Event::Header(h) => {
                            assert!(!hold || h.carried == 0);
                            assert_eq!(h.payload_start, at);
                            assert_eq!(
                                at - h.header_start + usize::from(h.carried),
                                usize::from(h.header_len)
                            );
                            let start = base + h.header_start - usize::from(h.carried);
                            if stop && stopped_header != Some(start) {
                                stopped_header = Some(start);
                                return Control::Stop;
                            }
                            events.push(Abs::Header {
                                start,
                                payload_start: base + at,
                                opcode: h.opcode,
                                fin: h.fin,
                                rsv: h.rsv,
                                mask: h.mask,
                                len: h.payload_len,
                                message_bytes: h.message_bytes,
                            });
                            // A header is stopped at once at most, or
                            // the caller would never progress.
                            return Control::Continue;
                        }
                        Event::Lost(v) => {
                            // At 0 when the bad header began in an earlier
                            // chunk: the stash held its first bytes.
                            let carried = if at == 0 { carried_before } else { 0 };
                            events.push(Abs::Lost(base + at - carried, v));
                        }
                        e => events.push(Abs::End(base + at, e)),
                    }
                    if stop {
                        Control::Stop
                    } else {
                        Control::Continue
                    }
                });
                assert!(fed.consumed <= buf.len());
                let end = base + fed.consumed;
                if lost_before {
                    assert_eq!(
                        fed,
                        Fed {
                            consumed: buf.len(),
                            stopped: false,
                            last_boundary: None,
                            partial_header: 0
                        }
                    );
                } else {
                    assert_eq!(
                        fed.last_boundary.map(|b| base + b),
                        r.last_boundary_in(base, end)
                    );
                }
                if !f.is_lost() {
                    assert_eq!(f.at_boundary(), r.is_boundary(end), "at {end}");
                    let pending = r.header_around(end).map_or(0, |s| end - s);
                    assert_eq!(f.pending_header_len(), pending, "at {end}");
                    if hold {
                        assert_eq!(pending, 0);
                    }
                    if !fed.stopped {
                        let buf_end = base + buf.len();
                        let around = r.header_around(buf_end);
                        let expect = around.map_or(0, |s| buf_end - s.max(base));
                        assert_eq!(fed.partial_header, expect, "at {buf_end}");
                        let expect_consumed = if hold { buf.len() - expect } else { buf.len() };
                        assert_eq!(fed.consumed, expect_consumed);
                    }
                }
                buf.drain(..fed.consumed);
                base = end;
                if !fed.stopped {
                    break;
                }
            }
        }
        assert_eq!(events, r.events);
        let lost = events.iter().filter(|e| matches!(e, Abs::Lost(..))).count();
        assert!(lost <= 1);
        assert_eq!(f.is_lost(), lost == 1);
        if lost == 1 {
            assert!(matches!(events.last(), Some(Abs::Lost(..))));
        }
    }

    /// One frame of a generated stream, before the rules are applied.
    #[derive(Clone, Debug)]
    struct Spec {
        kind: u8,
        fin: bool,
        text: bool,
        len_choice: u8,
        len_random: u16,
        width: u8,
        mask: Option<[u8; 4]>,
        rsv: u8,
        code: u16,
        fill: u8,
    }

    fn spec() -> impl Strategy<Value = Spec> {
        (
            0u8..4,
            any::<bool>(),
            any::<bool>(),
            0u8..10,
            any::<u16>(),
            0u8..6,
            proptest::option::of(any::<[u8; 4]>()),
            0u8..8,
            any::<u16>(),
            any::<u8>(),
        )
            .prop_map(
                |(kind, fin, text, len_choice, len_random, width, mask, rsv, code, fill)| Spec {
                    kind,
                    fin,
                    text,
                    len_choice,
                    len_random,
                    width,
                    mask,
                    rsv,
                    code,
                    fill,
                },
            )
    }

    /// Turns specs into a valid stream: data frames follow §5.4 (a message
    /// starts with Text or Binary, continues with Continuation), control
    /// frames are final and at most 125 bytes; pings and pongs and closes
    /// land anywhere, including between fragments.
    fn encode_specs(specs: &[Spec]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut open = false;
        for s in specs {
            let control = s.kind > 0;
            let len = if control {
                [0, 1, 2, 125, usize::from(s.len_random) % 126][usize::from(s.len_choice % 5)]
            } else {
                [
                    0,
                    1,
                    125,
                    126,
                    127,
                    65535,
                    65536,
                    usize::from(s.len_random) % 300,
                    usize::from(s.len_random),
                    usize::from(s.len_random) % 20,
                ][usize::from(s.len_choice)]
            };
            let mut payload: Vec<u8> = (0..len).map(|i| s.fill.wrapping_add(i as u8)).collect();
            let (op, fin) = match s.kind {
                1 => (0x9, true),
                2 => (0xA, true),
                3 => {
                    if len >= 2 {
                        payload[..2].copy_from_slice(&s.code.to_be_bytes());
                    }
                    (0x8, true)
                }
                _ => {
                    let op = if open {
                        0x0
                    } else if s.text {
                        0x1
                    } else {
                        0x2
                    };
                    open = !s.fin;
                    (op, s.fin)
                }
            };
            let width = match (control, s.width) {
                (false, 4) => Width::Ext16,
                (false, 5) => Width::Ext64,
                _ => Width::Minimal,
            };
            out.extend(frame_w(op, fin, s.rsv, s.mask, &payload, width));
        }
        out
    }

    proptest! {
        // No failure file: it would land beside this source, in the tree of
        // whoever runs the tests; a failing case prints its minimal input.
        #![proptest_config(ProptestConfig {
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn valid_streams_match_reference(
            specs in proptest::collection::vec(spec(), 0..12),
            cuts in proptest::collection::vec(any::<usize>(), 0..24),
            stops in proptest::collection::vec(proptest::bool::weighted(0.2), 0..64),
            hold in any::<bool>(),
        ) {
            let stream = encode_specs(&specs);
            let r = reference(&stream);
            // The generator makes valid streams only: nothing lost, and
            // every frame ends.
            prop_assert!(!r.events.iter().any(|e| matches!(e, Abs::Lost(..))));
            prop_assert_eq!(r.boundaries.last().copied(), Some(stream.len()));
            check_stream(&stream, &cuts, &stops, hold);
        }

        #[test]
        fn mutated_streams_match_reference(
            specs in proptest::collection::vec(spec(), 1..8),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            cuts in proptest::collection::vec(any::<usize>(), 0..24),
            stops in proptest::collection::vec(proptest::bool::weighted(0.2), 0..64),
            hold in any::<bool>(),
        ) {
            let mut stream = encode_specs(&specs);
            if !stream.is_empty() {
                for (at, x) in flips {
                    let n = stream.len();
                    stream[at % n] ^= x;
                }
            }
            check_stream(&stream, &cuts, &stops, hold);
        }

        #[test]
        fn random_bytes_never_panic_and_lose_at_most_once(
            stream in proptest::collection::vec(any::<u8>(), 0..200),
            cuts in proptest::collection::vec(any::<usize>(), 0..40),
            stops in proptest::collection::vec(proptest::bool::weighted(0.2), 0..64),
            hold in any::<bool>(),
        ) {
            check_stream(&stream, &cuts, &stops, hold);
        }

        #[test]
        fn encoders_are_followed(
            code in any::<u16>(),
            reason in ".{0,80}",
            ping in proptest::collection::vec(any::<u8>(), 0..200),
            mask in proptest::option::of(any::<[u8; 4]>()),
        ) {
            let close = encode_close(code, &reason, mask);
            prop_assert!(close.len() <= 6 + 125);
            let kept = &reason.as_bytes()[..close.len() - if mask.is_some() { 8 } else { 4 }];
            prop_assert!(reason.as_bytes().starts_with(kept));
            prop_assert!(core::str::from_utf8(kept).is_ok());
            let ev = events_of(&close);
            prop_assert_eq!(ev.len(), 2);
            prop_assert_eq!(ev[1], (close.len(), Event::Close { code: Some(code) }));
            match encode_ping(&ping, mask) {
                Some(p) => {
                    prop_assert!(ping.len() <= 125);
                    prop_assert_eq!(p.as_bytes(), &frame(0x9, true, mask, &ping)[..]);
                }
                None => prop_assert!(ping.len() > 125),
            }
        }
    }
}
