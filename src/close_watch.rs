//! Follows the WebSocket frame boundaries (RFC 6455 §5.2) in one direction of
//! a tunnel for a single fact: whether a Close frame has passed.
//!
//! Once Close frames have passed both ways the WebSocket is closed (§7.1.1):
//! neither side may send another frame, and the server is expected to close
//! TCP first. A FIN after that point ends the whole tunnel, as nginx and
//! HAProxy end theirs, instead of holding the other direction half-open until
//! the client's own FIN arrives — a wake-up, a read and a teardown the
//! proxy would pay for per connection. Before that point, or on any stream
//! this cannot follow, a FIN is passed on as a half-close and the other
//! direction keeps flowing. Bytes are only looked at, never changed or held.

/// What one direction's frames have shown so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseWatch {
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// `at` bytes into a frame header that is `header_len` bytes long; its
    /// extended payload length ends at `length_end`.
    Header {
        at: u8,
        length_end: u8,
        header_len: u8,
        opcode: u8,
        payload: u64,
    },
    Payload(u64),
    ClosePassed,
    /// Not a frame stream this can follow; stays so for the tunnel's life.
    Lost,
}

const OPCODE_CLOSE: u8 = 0x8;
/// Control frames (§5.5) carry at most 125 bytes and are never fragmented.
const MAX_CONTROL_PAYLOAD: u8 = 125;

impl State {
    fn frame_start() -> State {
        State::Header {
            at: 0,
            length_end: 2,
            header_len: 2,
            opcode: 0,
            payload: 0,
        }
    }
}

impl Default for CloseWatch {
    fn default() -> Self {
        CloseWatch::new()
    }
}

impl CloseWatch {
    pub fn new() -> CloseWatch {
        CloseWatch {
            state: State::frame_start(),
        }
    }

    pub fn close_passed(&self) -> bool {
        self.state == State::ClosePassed
    }

    /// Takes the next bytes of this direction, in order.
    pub fn observe(&mut self, mut bytes: &[u8]) {
        while let Some((&byte, rest)) = bytes.split_first() {
            match self.state {
                State::ClosePassed | State::Lost => return,
                State::Payload(remaining) => {
                    let skipped = remaining.min(bytes.len() as u64);
                    bytes = &bytes[skipped as usize..];
                    self.state = match remaining - skipped {
                        0 => State::frame_start(),
                        left => State::Payload(left),
                    };
                }
                State::Header {
                    at,
                    length_end,
                    header_len,
                    opcode,
                    payload,
                } => {
                    bytes = rest;
                    self.state = header_byte(at, length_end, header_len, opcode, payload, byte);
                }
            }
        }
    }
}

/// The state after header byte number `at`.
fn header_byte(
    at: u8,
    mut length_end: u8,
    mut header_len: u8,
    mut opcode: u8,
    mut payload: u64,
    byte: u8,
) -> State {
    match at {
        0 => {
            opcode = byte & 0x0f;
            let fin = byte & 0x80 != 0;
            let known = matches!(opcode, 0x0..=0x2 | 0x8..=0xa);
            if !known || (is_control(opcode) && !fin) {
                return State::Lost;
            }
        }
        1 => {
            let masked = byte & 0x80 != 0;
            let length = byte & 0x7f;
            if is_control(opcode) && length > MAX_CONTROL_PAYLOAD {
                return State::Lost;
            }
            length_end = match length {
                126 => 4,
                127 => 10,
                _ => {
                    payload = u64::from(length);
                    2
                }
            };
            header_len = length_end + if masked { 4 } else { 0 };
        }
        // §5.2: the most significant bit of a 64-bit length must be 0.
        2 if length_end == 10 && byte & 0x80 != 0 => return State::Lost,
        _ if at < length_end => payload = payload << 8 | u64::from(byte),
        // A masking-key byte: nothing to learn from it.
        _ => {}
    }
    let at = at + 1;
    if at < header_len {
        return State::Header {
            at,
            length_end,
            header_len,
            opcode,
            payload,
        };
    }
    match (opcode, payload) {
        (OPCODE_CLOSE, _) => State::ClosePassed,
        (_, 0) => State::frame_start(),
        (_, length) => State::Payload(length),
    }
}

fn is_control(opcode: u8) -> bool {
    opcode & 0x8 != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as a client (`mask` = Some) or a server writes it.
    fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        let mask_bit = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            len @ 0..=125 => out.push(mask_bit | len as u8),
            len @ 126..=0xffff => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        match mask {
            Some(key) => {
                out.extend_from_slice(&key);
                out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            }
            None => out.extend_from_slice(payload),
        }
        out
    }

    fn watched(chunks: &[&[u8]]) -> CloseWatch {
        let mut watch = CloseWatch::new();
        for chunk in chunks {
            watch.observe(chunk);
        }
        watch
    }

    #[test]
    fn close_after_messages_of_every_length_form_is_seen_at_any_split() {
        let key = Some([0x37, 0xfa, 0x21, 0x3d]);
        let mut stream = Vec::new();
        stream.extend(frame(true, 0x1, b"hello", key));
        stream.extend(frame(true, 0x2, &[7; 300], None));
        stream.extend(frame(true, 0x2, &[9; 70_000], key));
        stream.extend(frame(false, 0x1, b"frag", None));
        stream.extend(frame(true, 0x9, b"ping", key));
        stream.extend(frame(true, 0x0, b"ment", None));
        stream.extend(frame(true, 0x2, b"", None));
        let close_at = stream.len();
        stream.extend(frame(true, 0x8, &[0x03, 0xe8, b'b', b'y', b'e'], key));
        for split in (0..stream.len())
            .step_by(97)
            .chain(close_at - 3..close_at + 3)
        {
            let watch = watched(&[&stream[..split], &stream[split..]]);
            assert!(watch.close_passed(), "split at {split}");
            let before = watched(&[&stream[..close_at.min(split)]]);
            assert!(!before.close_passed(), "only data before {split}");
        }
        let byte_by_byte = stream.chunks(1).collect::<Vec<_>>();
        assert!(watched(&byte_by_byte).close_passed());
    }

    #[test]
    fn close_frame_is_seen_once_its_header_passed() {
        let close = frame(true, 0x8, &[0x03, 0xe8], Some([1, 2, 3, 4]));
        assert!(!watched(&[&close[..5]]).close_passed());
        assert!(watched(&[&close[..6]]).close_passed());
        assert!(watched(&[&frame(true, 0x8, b"", None)]).close_passed());
    }

    #[test]
    fn a_close_code_inside_a_payload_is_not_a_close() {
        let inner = frame(true, 0x8, b"", None);
        assert!(!watched(&[&frame(true, 0x2, &inner, None)]).close_passed());
    }

    #[test]
    fn streams_that_are_not_frames_are_given_up_on() {
        for bytes in [
            &b"last words from the client"[..],
            &[0x83, 0x00],                            // reserved opcode
            &[0x08, 0x00],                            // fragmented control frame
            &[0x89, 0x7e, 0x00, 0x7e],                // control frame over 125 bytes
            &[0x82, 0x7f, 0x80, 0, 0, 0, 0, 0, 0, 1], // 64-bit length with its top bit set
        ] {
            let mut watch = CloseWatch::new();
            watch.observe(bytes);
            assert_eq!(watch.state, State::Lost, "{bytes:?}");
            watch.observe(&frame(true, 0x8, b"", None));
            assert!(!watch.close_passed(), "{bytes:?}");
        }
    }
}
