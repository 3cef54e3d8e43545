//! The tag each sent message carries, so that an echo is recognised by what
//! it is rather than by when it arrives: backends greet, broadcast and answer
//! out of order, and none of that is a broken tunnel.
//!
//! A message is [`TAG_LEN`] bytes of tag — [`MAGIC`], the connection's number
//! and the message's sequence number on that connection — then padding up to
//! `--message-size`. The padding is fixed, so an echo whose tag matches is
//! also checked byte for byte.

use bytes::{Bytes, BytesMut};

/// Bytes at the front of every message that make up its tag.
pub(super) const TAG_LEN: usize = 16;

/// Starts every tag. 0xF7 can begin no UTF-8 text, so a text greeting sent
/// as binary can never pass for an echo.
const MAGIC: [u8; 4] = [0xf7, b'w', b'g', b'l'];

const CONNECTION: std::ops::Range<usize> = 4..8;
const SEQUENCE: std::ops::Range<usize> = 8..TAG_LEN;

/// What a received data message is, as far as its bytes tell.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Arrival {
    /// Exactly the message this connection sent with this sequence number.
    Echo(u64),
    /// This connection's tag with this sequence number, but the rest differs:
    /// corrupted, truncated or extended on the way.
    Altered(u64),
    /// No tag of this connection: sent by the backend itself, or another
    /// connection's message relayed here.
    Foreign,
}

/// One connection's messages: built once per worker, shared by its sessions.
pub(super) struct Payloads {
    /// The message with sequence number 0; the others differ only there.
    template: Bytes,
    connection: [u8; 4],
}

impl Payloads {
    /// `size` must be at least [`TAG_LEN`]; the flags are checked for that.
    /// Connection numbers wrap at 2³²: only connections open at the same time
    /// need to differ, in case a backend relays one's messages to another.
    pub(super) fn new(size: usize, connection: usize) -> Self {
        let connection = (connection as u32).to_le_bytes();
        let mut template = BytesMut::zeroed(size.max(TAG_LEN));
        template[..MAGIC.len()].copy_from_slice(&MAGIC);
        template[CONNECTION].copy_from_slice(&connection);
        for (i, byte) in template.iter_mut().enumerate().skip(TAG_LEN) {
            // Not constant, so a tunnel that shifts or repeats bytes shows.
            *byte = (i as u8).wrapping_mul(31) ^ connection[i % 4];
        }
        Self {
            template: template.freeze(),
            connection,
        }
    }

    pub(super) fn stamper(&self) -> Stamper<'_> {
        Stamper {
            payloads: self,
            recent: [None, None],
        }
    }

    pub(super) fn classify(&self, data: &[u8]) -> Arrival {
        let Some(tag) = data.get(..TAG_LEN) else {
            return Arrival::Foreign;
        };
        if tag[..MAGIC.len()] != MAGIC || tag[CONNECTION] != self.connection {
            return Arrival::Foreign;
        }
        let mut sequence = [0; 8];
        sequence.copy_from_slice(&tag[SEQUENCE]);
        let sequence = u64::from_le_bytes(sequence);
        if data.len() == self.template.len() && data[TAG_LEN..] == self.template[TAG_LEN..] {
            Arrival::Echo(sequence)
        } else {
            Arrival::Altered(sequence)
        }
    }
}

/// Writes sequence numbers into messages for one sender.
pub(super) struct Stamper<'a> {
    payloads: &'a Payloads,
    /// The two messages handed out last, oldest first. The split sink may
    /// still hold the newest in its slot, but it passes each message on
    /// before it takes the next, and the WebSocket copies it into its write
    /// buffer; so by now the older one's buffer is usually ours alone again,
    /// and is reused rather than copying `--message-size` bytes per send.
    recent: [Option<Bytes>; 2],
}

impl Stamper<'_> {
    pub(super) fn message(&mut self, sequence: u64) -> Bytes {
        let reusable = self.recent[0].take().map(Bytes::try_into_mut);
        let mut buffer = match reusable {
            Some(Ok(buffer)) => buffer,
            Some(Err(_)) | None => BytesMut::from(&self.payloads.template[..]),
        };
        buffer[SEQUENCE].copy_from_slice(&sequence.to_le_bytes());
        let message = buffer.freeze();
        self.recent = [self.recent[1].take(), Some(message.clone())];
        message
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_echo_is_known_by_its_tag_and_keeps_the_requested_size() {
        let payloads = Payloads::new(100, 7);
        let mut stamper = payloads.stamper();
        let first = stamper.message(0);
        let second = stamper.message(41);
        assert_eq!((first.len(), second.len()), (100, 100));
        assert_eq!(payloads.classify(&first), Arrival::Echo(0));
        assert_eq!(payloads.classify(&second), Arrival::Echo(41));
        assert_eq!(first[TAG_LEN..], second[TAG_LEN..]);

        let tag_only = Payloads::new(TAG_LEN, 7).stamper().message(3);
        assert_eq!(tag_only.len(), TAG_LEN);
    }

    #[test]
    fn a_buffer_is_reused_once_its_message_is_released() {
        let payloads = Payloads::new(64, 1);
        let mut stamper = payloads.stamper();
        let first = stamper.message(1);
        let address = first.as_ptr();
        drop(first);
        // The newest message may still be in flight, so it is not reused.
        let second = stamper.message(2);
        assert_ne!(second.as_ptr(), address);
        let third = stamper.message(3);
        assert_eq!(third.as_ptr(), address);
        // Still held elsewhere: a fresh buffer, the held message unchanged.
        let fourth = stamper.message(4);
        assert_ne!(fourth.as_ptr(), second.as_ptr());
        assert_eq!(payloads.classify(&second), Arrival::Echo(2));
        assert_eq!(payloads.classify(&third), Arrival::Echo(3));
        assert_eq!(payloads.classify(&fourth), Arrival::Echo(4));
    }

    #[test]
    fn other_messages_are_foreign_or_altered() {
        let payloads = Payloads::new(64, 1);
        let message = payloads.stamper().message(5);
        assert_eq!(payloads.classify(b"hello"), Arrival::Foreign);
        assert_eq!(payloads.classify(&[0; 64]), Arrival::Foreign);
        assert_eq!(payloads.classify(&message[..TAG_LEN - 1]), Arrival::Foreign);
        // Another connection's message, relayed by a broadcasting backend.
        let other = Payloads::new(64, 2).stamper().message(5);
        assert_eq!(payloads.classify(&other), Arrival::Foreign);

        let mut flipped = message.to_vec();
        flipped[63] ^= 1;
        assert_eq!(payloads.classify(&flipped), Arrival::Altered(5));
        assert_eq!(payloads.classify(&message[..63]), Arrival::Altered(5));
        let longer = [&message[..], b"x"].concat();
        assert_eq!(payloads.classify(&longer), Arrival::Altered(5));
    }
}
