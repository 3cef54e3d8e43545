//! The frame follower against a plain RFC 6455 §5.2 decoder that sees the
//! whole input at once: for any cut of the input into reads, in both
//! follower modes, and with the callback stopping now and then (the
//! rest fed again, as a splice loop does), the follower must report the
//! same frames at the same stream offsets — opcode, FIN, RSV, mask,
//! length, message size, Close code — and go Lost at the same header for
//! the same rule.
//!
//! Input: a cut byte (its low 7 bits for `cuts`, bit 7 picks holding
//! mode), a stop byte (bit `i % 8` set: stop at the `i`th event, unless
//! the event before was a stop), then the stream.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::fuzzing::{Control, Event, FrameFollower, Opcode, Violation};
use wsgate_fuzz::cuts;

/// An event at an absolute stream offset, in the terms the reference
/// decoder can compute without knowing how the stream was read.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Header {
        start: usize,
        opcode: Opcode,
        fin: bool,
        rsv: u8,
        mask: Option<[u8; 4]>,
        len: u64,
        header_len: u8,
        message_bytes: u64,
    },
    FrameEnd(usize, Opcode),
    MessageEnd(usize, Opcode, u64),
    Close(usize, Option<u16>),
    Lost(usize, Violation),
}

/// Where the reference decoder stopped.
#[derive(Debug, PartialEq, Eq)]
enum Tail {
    Boundary,
    InHeader,
    InPayload,
    Lost,
}

/// Decodes frames front to back, judging each rule on the byte that
/// decides it, as §5.2, §5.4 and §5.5 state them.
fn reference(data: &[u8]) -> (Vec<Seen>, Tail) {
    let mut seen = Vec::new();
    let mut at = 0;
    // The open data message's type and size.
    let mut message: Option<(Opcode, u64)> = None;
    loop {
        if at == data.len() {
            return (seen, Tail::Boundary);
        }
        let start = at;
        let b0 = data[at];
        let fin = b0 & 0x80 != 0;
        let rsv = (b0 >> 4) & 0x7;
        let op = b0 & 0x0F;
        let lost = |seen: &mut Vec<Seen>, violation| {
            seen.push(Seen::Lost(start, violation));
        };
        let opcode = match op {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            other => {
                lost(&mut seen, Violation::ReservedOpcode(other));
                return (seen, Tail::Lost);
            }
        };
        let control = matches!(opcode, Opcode::Close | Opcode::Ping | Opcode::Pong);
        if opcode == Opcode::Continuation && message.is_none() {
            lost(&mut seen, Violation::UnexpectedContinuation);
            return (seen, Tail::Lost);
        }
        if matches!(opcode, Opcode::Text | Opcode::Binary) && message.is_some() {
            lost(&mut seen, Violation::InterruptedMessage);
            return (seen, Tail::Lost);
        }
        if control && !fin {
            lost(&mut seen, Violation::FragmentedControl);
            return (seen, Tail::Lost);
        }
        let Some(&b1) = data.get(at + 1) else {
            return (seen, Tail::InHeader);
        };
        let masked = b1 & 0x80 != 0;
        let len7 = b1 & 0x7F;
        if control && len7 > 125 {
            lost(&mut seen, Violation::ControlTooLong);
            return (seen, Tail::Lost);
        }
        let mut header_len = 2;
        let len = match len7 {
            126 => {
                let Some(bytes) = data.get(at + 2..at + 4) else {
                    return (seen, Tail::InHeader);
                };
                header_len += 2;
                u64::from(bytes[0]) << 8 | u64::from(bytes[1])
            }
            127 => {
                if data.get(at + 2).is_some_and(|&b| b >= 0x80) {
                    lost(&mut seen, Violation::LengthTopBit);
                    return (seen, Tail::Lost);
                }
                let Some(bytes) = data.get(at + 2..at + 10) else {
                    return (seen, Tail::InHeader);
                };
                header_len += 8;
                bytes.iter().fold(0u64, |len, &b| len << 8 | u64::from(b))
            }
            short => u64::from(short),
        };
        let mask = if masked {
            let Some(key) = data.get(at + header_len..at + header_len + 4) else {
                return (seen, Tail::InHeader);
            };
            header_len += 4;
            Some([key[0], key[1], key[2], key[3]])
        } else {
            None
        };
        let message_bytes = match opcode {
            Opcode::Text | Opcode::Binary => len,
            Opcode::Continuation => message.map_or(0, |(_, size)| size).saturating_add(len),
            _ => message.map_or(0, |(_, size)| size),
        };
        seen.push(Seen::Header {
            start,
            opcode,
            fin,
            rsv,
            mask,
            len,
            header_len: header_len as u8,
            message_bytes,
        });
        match opcode {
            Opcode::Text | Opcode::Binary => message = Some((opcode, message_bytes)),
            Opcode::Continuation => {
                message = message.map(|(first, _)| (first, message_bytes));
            }
            _ => {}
        }
        let payload = at + header_len;
        let left = data.len() - payload;
        if (left as u64) < len {
            return (seen, Tail::InPayload);
        }
        let end = payload + len as usize;
        match opcode {
            Opcode::Close => {
                let code = (len >= 2).then(|| {
                    let key = mask.unwrap_or([0; 4]);
                    u16::from(data[payload] ^ key[0]) << 8 | u16::from(data[payload + 1] ^ key[1])
                });
                seen.push(Seen::Close(end, code));
            }
            Opcode::Ping | Opcode::Pong => seen.push(Seen::FrameEnd(end, opcode)),
            _ if fin => {
                let (first, size) = message.take().unwrap_or((opcode, 0));
                seen.push(Seen::MessageEnd(end, first, size));
            }
            _ => seen.push(Seen::FrameEnd(end, opcode)),
        }
        at = end;
    }
}

fuzz_target!(|input: &[u8]| {
    let [cut, stops, data @ ..] = input else {
        return;
    };
    let holding = cut & 0x80 != 0;
    let (expected, tail) = reference(data);

    let mut follower = if holding {
        FrameFollower::holding()
    } else {
        FrameFollower::new()
    };
    let mut seen = Vec::new();
    let mut event_index = 0usize;
    // After a stop the next event goes on, or a stop at a header (which is
    // reported again) would repeat for ever.
    let mut just_stopped = false;
    // Bytes not yet consumed, from stream offset `base` on.
    let mut base = 0;
    let mut pending: Vec<u8> = Vec::new();
    let mut offered = 0;
    for piece in cuts(cut & 0x7F, data.len()) {
        pending.extend_from_slice(&data[offered..offered + piece]);
        offered += piece;
        // A stop leaves a rest; feed it again, as the splice loop does
        // once it has acted, until a feed takes what it can.
        loop {
            let carried = follower.pending_header_len();
            let fed = follower.feed(&pending, |offset, event| {
                let index = event_index;
                event_index += 1;
                let stop = !just_stopped && stops & (1 << (index % 8)) != 0;
                just_stopped = stop;
                let at = base + offset;
                match event {
                    Event::Header(h) => {
                        assert_eq!(h.header_start + usize::from(h.header_len) - usize::from(h.carried), h.payload_start,
                            "a header's start, length and carried bytes must add up to its payload start");
                        if !stop {
                            seen.push(Seen::Header {
                                start: at - usize::from(h.header_len),
                                opcode: h.opcode,
                                fin: h.fin,
                                rsv: h.rsv,
                                mask: h.mask,
                                len: h.payload_len,
                                header_len: h.header_len,
                                message_bytes: h.message_bytes,
                            });
                        }
                    }
                    Event::FrameEnd { opcode } => seen.push(Seen::FrameEnd(at, opcode)),
                    Event::MessageEnd { opcode, bytes } => {
                        seen.push(Seen::MessageEnd(at, opcode, bytes))
                    }
                    Event::Close { code } => seen.push(Seen::Close(at, code)),
                    Event::Lost(violation) => {
                        // A header begun in an earlier chunk is reported at 0.
                        let start = if offset == 0 { at - carried } else { at };
                        seen.push(Seen::Lost(start, violation));
                    }
                }
                if stop { Control::Stop } else { Control::Continue }
            });
            assert!(fed.consumed <= pending.len(), "consumed more than was fed");
            if let Some(boundary) = fed.last_boundary {
                assert!(
                    boundary <= fed.consumed,
                    "a boundary past what was consumed"
                );
            }
            if holding {
                assert!(
                    fed.partial_header < wsgate::fuzzing::MAX_HEADER_LEN,
                    "held 14 bytes or more"
                );
            }
            pending.drain(..fed.consumed);
            base += fed.consumed;
            if !fed.stopped {
                break;
            }
        }
    }

    assert_eq!(
        seen, expected,
        "the follower and the reference decoder disagree"
    );
    let at_boundary = match tail {
        Tail::Boundary => true,
        // Held, not consumed: the follower is still between frames.
        Tail::InHeader => holding,
        Tail::InPayload | Tail::Lost => false,
    };
    assert_eq!(
        follower.at_boundary(),
        at_boundary,
        "at_boundary disagrees with where the stream ended ({tail:?})"
    );
    assert_eq!(follower.is_lost(), tail == Tail::Lost, "is_lost disagrees");
});
