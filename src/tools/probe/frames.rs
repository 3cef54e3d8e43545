//! Just enough of RFC 6455 framing for a client that listens: read the
//! server's frames (payloads of data frames skipped, not kept), answer
//! Pings, and close politely.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub(super) const OP_CLOSE: u8 = 0x8;
pub(super) const OP_PING: u8 = 0x9;
pub(super) const OP_PONG: u8 = 0xA;

/// A frame from the server, as far as a listener cares.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Frame {
    /// A data frame (text, binary or continuation); `fin` ends a message.
    Data {
        fin: bool,
    },
    Ping(Vec<u8>),
    Pong,
    /// `code` is `None` for a Close without a body (reported as 1005).
    Close {
        code: Option<u16>,
        reason: String,
    },
}

/// Reads frames off a stream, starting with bytes already read past the
/// 101's head.
pub(super) struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    pub fn new(already_read: Vec<u8>) -> Self {
        FrameReader { buf: already_read }
    }

    /// The next frame; `Ok(None)` when the stream ended between frames.
    pub async fn next<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
    ) -> io::Result<Option<Frame>> {
        if !self.fill(stream, 2).await? {
            return Ok(None);
        }
        let (first, second) = (self.buf[0], self.buf[1]);
        let fin = first & 0x80 != 0;
        let opcode = first & 0x0f;
        let masked = second & 0x80 != 0;
        let (len, mut at) = match second & 0x7f {
            126 => {
                self.need(stream, 4).await?;
                (u64::from(u16::from_be_bytes([self.buf[2], self.buf[3]])), 4)
            }
            127 => {
                self.need(stream, 10).await?;
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(&self.buf[2..10]);
                (u64::from_be_bytes(bytes), 10)
            }
            len => (u64::from(len), 2),
        };
        let mask = if masked {
            self.need(stream, at + 4).await?;
            let mut mask = [0u8; 4];
            mask.copy_from_slice(&self.buf[at..at + 4]);
            at += 4;
            Some(mask)
        } else {
            None
        };
        self.buf.drain(..at);
        if opcode >= 0x8 {
            if len > 125 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("control frame of {len} bytes (at most 125 allowed)"),
                ));
            }
            let len = len as usize;
            self.need(stream, len).await?;
            let mut payload: Vec<u8> = self.buf.drain(..len).collect();
            if let Some(mask) = mask {
                for (i, byte) in payload.iter_mut().enumerate() {
                    *byte ^= mask[i % 4];
                }
            }
            return match opcode {
                OP_CLOSE => Ok(Some(close_frame(&payload))),
                OP_PING => Ok(Some(Frame::Ping(payload))),
                OP_PONG => Ok(Some(Frame::Pong)),
                other => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("reserved control opcode {other:#x}"),
                )),
            };
        }
        self.skip(stream, len).await?;
        Ok(Some(Frame::Data { fin }))
    }

    /// Reads until `n` bytes are buffered; `false` on a clean end before any.
    async fn fill<S: AsyncRead + Unpin>(&mut self, stream: &mut S, n: usize) -> io::Result<bool> {
        while self.buf.len() < n {
            let mut chunk = [0u8; 4096];
            let read = stream.read(&mut chunk).await?;
            if read == 0 {
                if self.buf.is_empty() {
                    return Ok(false);
                }
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..read]);
        }
        Ok(true)
    }

    async fn need<S: AsyncRead + Unpin>(&mut self, stream: &mut S, n: usize) -> io::Result<()> {
        if self.fill(stream, n).await? {
            Ok(())
        } else {
            Err(io::ErrorKind::UnexpectedEof.into())
        }
    }

    /// Discards `len` payload bytes, buffered or still to come.
    async fn skip<S: AsyncRead + Unpin>(&mut self, stream: &mut S, mut len: u64) -> io::Result<()> {
        let buffered = self
            .buf
            .len()
            .min(usize::try_from(len).unwrap_or(usize::MAX));
        self.buf.drain(..buffered);
        len -= buffered as u64;
        let mut chunk = [0u8; 8192];
        while len > 0 {
            let want = chunk.len().min(usize::try_from(len).unwrap_or(usize::MAX));
            let read = stream.read(&mut chunk[..want]).await?;
            if read == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            len -= read as u64;
        }
        Ok(())
    }
}

fn close_frame(payload: &[u8]) -> Frame {
    match payload {
        [high, low, reason @ ..] => Frame::Close {
            code: Some(u16::from_be_bytes([*high, *low])),
            reason: String::from_utf8_lossy(reason).into_owned(),
        },
        _ => Frame::Close {
            code: None,
            reason: String::new(),
        },
    }
}

/// A masked client frame (RFC 6455 §5.3: every client frame is masked).
pub(super) fn client_frame(opcode: u8, payload: &[u8]) -> io::Result<Vec<u8>> {
    let mut mask = [0u8; 4];
    getrandom::fill(&mut mask).map_err(|error| io::Error::other(error.to_string()))?;
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        len @ 0..=125 => frame.push(0x80 | len as u8),
        len @ 126..=0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    Ok(frame)
}

/// The payload of a Close with `code`.
pub(super) fn close_payload(code: Option<u16>) -> Vec<u8> {
    code.map(|code| code.to_be_bytes().to_vec())
        .unwrap_or_default()
}

/// Ends an upgraded connection the way a well-behaved client does: Close
/// 1000, then wait (at most `wait`) for the server's Close or its FIN, so
/// the probe never shows up in the server's 1006 counts.
pub(super) async fn close_politely<S>(stream: &mut S, reader: &mut FrameReader, wait: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let closing = async {
        let frame = client_frame(OP_CLOSE, &close_payload(Some(1000)))?;
        stream.write_all(&frame).await?;
        stream.flush().await?;
        // Frames already in flight come first; the server's Close ends it.
        for _ in 0..1000 {
            match reader.next(stream).await? {
                Some(Frame::Close { .. }) | None => break,
                Some(_) => {}
            }
        }
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(wait, closing).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_are_read_across_reads_and_data_payloads_skipped() {
        let mut wire = vec![0x81, 126, 0x01, 0x00];
        wire.extend(std::iter::repeat_n(b'x', 256));
        wire.extend([0x89, 2, b'h', b'i']);
        wire.extend([0x88, 0x02, 0x03, 0xE9]);
        let (first, rest) = wire.split_at(3);
        let mut reader = FrameReader::new(first.to_vec());
        let mut stream = rest;
        assert_eq!(
            reader.next(&mut stream).await.unwrap(),
            Some(Frame::Data { fin: true })
        );
        assert_eq!(
            reader.next(&mut stream).await.unwrap(),
            Some(Frame::Ping(b"hi".to_vec()))
        );
        assert_eq!(
            reader.next(&mut stream).await.unwrap(),
            Some(Frame::Close {
                code: Some(1001),
                reason: String::new()
            })
        );
        assert_eq!(reader.next(&mut stream).await.unwrap(), None);
    }

    #[test]
    fn client_frames_are_masked() {
        let frame = client_frame(OP_PONG, b"abc").unwrap();
        assert_eq!(frame[0], 0x8A);
        assert_eq!(frame[1], 0x80 | 3);
        let mask = &frame[2..6];
        let payload: Vec<u8> = frame[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        assert_eq!(payload, b"abc");
    }
}
