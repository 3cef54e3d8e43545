//! A backend's refusal of an upgrade (any final answer but a 101), relayed
//! to the client with its status and body unchanged.
//!
//! WebSocket backends refuse with a line or two, so the body is normally
//! held whole and sent with an exact length. A body longer than
//! [`MAX_HELD_BODY`] — a framework's debug error page, say — is not held:
//! what was read goes out, then the rest streams from the backend's
//! connection as it arrives, so no refusal costs the proxy more than that
//! much memory, and none is turned into a 502 for its size.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::StreamExt;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::body::{self, BoxError, ProxyBody};
use crate::headers;
use crate::wire::{self, AnswerError, ResponseHead};

/// Body bytes held before a refusal is streamed instead.
pub(crate) const MAX_HELD_BODY: usize = 64 * 1024;
/// Longest chunk-size or trailer line accepted in a chunked body.
const MAX_CHUNK_LINE: usize = 4096;
/// Bytes asked of the backend per read while streaming.
const READ_SIZE: usize = 16 * 1024;

/// Where a body is, for [`BodyDecoder::next`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    /// `Content-Length` bytes still to come.
    Length(u64),
    UntilClose,
    ChunkSize,
    /// Bytes of the current chunk still to come.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    Trailers,
    Done,
}

/// Decodes a response body as its framing says (RFC 9112 §6.3, §7.1),
/// piece by piece, from bytes already read and then from the connection.
#[derive(Debug)]
pub(crate) struct BodyDecoder {
    buffer: BytesMut,
    position: Position,
    /// The head's `Content-Length`, when that is how the body is framed.
    announced_length: Option<u64>,
}

impl BodyDecoder {
    /// The decoder for `head`'s body, whose first bytes are in `buffer`.
    pub(crate) fn new(head: &ResponseHead, buffer: BytesMut) -> Result<BodyDecoder, AnswerError> {
        let position = framing(head)?;
        let announced_length = match position {
            Position::Length(length) => Some(length),
            _ => None,
        };
        Ok(BodyDecoder {
            buffer,
            position,
            announced_length,
        })
    }

    pub(crate) fn is_done(&self) -> bool {
        self.position == Position::Done
    }

    /// The next piece of the decoded body; `None` once it has ended.
    pub(crate) async fn next<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
    ) -> Result<Option<Bytes>, AnswerError> {
        loop {
            match self.position {
                Position::Done => return Ok(None),
                Position::Length(0) => self.position = Position::Done,
                Position::Length(left) => {
                    self.fill_if_empty(stream).await?;
                    let piece = self.take(left);
                    self.position = Position::Length(left - piece.len() as u64);
                    return Ok(Some(piece));
                }
                Position::UntilClose => {
                    if self.buffer.is_empty() && self.read(stream).await? == 0 {
                        self.position = Position::Done;
                        return Ok(None);
                    }
                    return Ok(Some(self.buffer.split().freeze()));
                }
                Position::ChunkSize => match httparse::parse_chunk_size(&self.buffer) {
                    Ok(httparse::Status::Complete((line_len, size))) => {
                        self.buffer.advance(line_len);
                        self.position = match size {
                            0 => Position::Trailers,
                            size => Position::ChunkData(size),
                        };
                    }
                    Ok(httparse::Status::Partial) => self.fill_line(stream).await?,
                    Err(_) => return Err(AnswerError::Malformed("bad chunk size")),
                },
                Position::ChunkData(left) => {
                    self.fill_if_empty(stream).await?;
                    let piece = self.take(left);
                    self.position = match left - piece.len() as u64 {
                        0 => Position::ChunkEnd,
                        left => Position::ChunkData(left),
                    };
                    return Ok(Some(piece));
                }
                Position::ChunkEnd => {
                    if self.buffer.len() < 2 {
                        self.fill(stream).await?;
                    } else if &self.buffer[..2] == b"\r\n" {
                        self.buffer.advance(2);
                        self.position = Position::ChunkSize;
                    } else {
                        return Err(AnswerError::Malformed("chunk not ended by CRLF"));
                    }
                }
                // Trailer fields are dropped: the relayed body is framed afresh.
                Position::Trailers => match self.buffer.windows(2).position(|pair| pair == b"\r\n")
                {
                    Some(0) => {
                        self.buffer.advance(2);
                        self.position = Position::Done;
                    }
                    Some(end) => self.buffer.advance(end + 2),
                    None => self.fill_line(stream).await?,
                },
            }
        }
    }

    /// Decoded pieces joined until the body ends or more than `limit` bytes
    /// are in hand; `is_done` tells which.
    pub(crate) async fn read_up_to<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        limit: usize,
    ) -> Result<Bytes, AnswerError> {
        let mut held = BytesMut::new();
        while held.len() <= limit {
            match self.next(stream).await? {
                Some(piece) => held.extend_from_slice(&piece),
                None => break,
            }
        }
        Ok(held.freeze())
    }

    /// Up to `left` bytes from the buffer, which is not empty.
    fn take(&mut self, left: u64) -> Bytes {
        let count =
            usize::try_from(left).map_or(self.buffer.len(), |left| left.min(self.buffer.len()));
        self.buffer.split_to(count).freeze()
    }

    async fn read<S: AsyncRead + Unpin>(&mut self, stream: &mut S) -> std::io::Result<usize> {
        self.buffer.reserve(READ_SIZE);
        stream.read_buf(&mut self.buffer).await
    }

    /// More bytes, which the framing says must come.
    async fn fill<S: AsyncRead + Unpin>(&mut self, stream: &mut S) -> Result<(), AnswerError> {
        match self.read(stream).await? {
            0 => Err(AnswerError::Closed),
            _ => Ok(()),
        }
    }

    async fn fill_if_empty<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
    ) -> Result<(), AnswerError> {
        if self.buffer.is_empty() {
            self.fill(stream).await?;
        }
        Ok(())
    }

    /// More of a line that has no end in the buffer yet.
    async fn fill_line<S: AsyncRead + Unpin>(&mut self, stream: &mut S) -> Result<(), AnswerError> {
        if self.buffer.len() > MAX_CHUNK_LINE {
            return Err(AnswerError::TooLarge(
                "chunk-size or trailer line",
                MAX_CHUNK_LINE,
            ));
        }
        self.fill(stream).await
    }
}

/// How `head`'s body ends (RFC 9112 §6.3).
fn framing(head: &ResponseHead) -> Result<Position, AnswerError> {
    // A `Final` head is never 1xx: interim answers are skipped, 101 is a `Switch`.
    let status = head.status;
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Position::Done);
    }
    if head.headers.contains_key(TRANSFER_ENCODING) {
        let last = headers::list_tokens(&head.headers, &TRANSFER_ENCODING).last();
        return Ok(match last {
            Some(coding) if coding.eq_ignore_ascii_case("chunked") => Position::ChunkSize,
            _ => Position::UntilClose,
        });
    }
    let mut lengths = head.headers.get_all(CONTENT_LENGTH).iter();
    match lengths.next() {
        None => Ok(Position::UntilClose),
        Some(first) => {
            if lengths.any(|other| other != first) {
                return Err(AnswerError::Malformed("conflicting Content-Length"));
            }
            std::str::from_utf8(first.as_bytes())
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
                .map(Position::Length)
                .ok_or(AnswerError::Malformed("bad Content-Length"))
        }
    }
}

/// The rest of a refusal's body, still on the backend's connection.
struct BodyRest<S> {
    decoder: BodyDecoder,
    stream: S,
    /// How long the backend may go quiet mid-body (the route's
    /// `handshake_timeout`, as for the rest of its answer).
    read_timeout: Duration,
}

impl<S: AsyncRead + Unpin> BodyRest<S> {
    /// The next piece; a backend quiet for `read_timeout` is an error.
    async fn next(&mut self) -> Result<Option<Bytes>, AnswerError> {
        match tokio::time::timeout(self.read_timeout, self.decoder.next(&mut self.stream)).await {
            Ok(piece) => piece,
            Err(_) => Err(AnswerError::Io(std::io::ErrorKind::TimedOut.into())),
        }
    }
}

/// A refusal to relay: the answer with the body bytes held, and the rest of
/// the body when it was too long to hold.
pub(crate) struct Refusal<S> {
    response: Response<Bytes>,
    /// The backend's `Content-Length`, kept when the body streams.
    announced_length: Option<u64>,
    rest: Option<BodyRest<S>>,
}

impl<S> Refusal<S> {
    /// `response` carries the body bytes `decoder` produced so far; the rest,
    /// if any, is still on `stream`.
    pub(crate) fn new(
        mut response: Response<Bytes>,
        decoder: BodyDecoder,
        stream: S,
        read_timeout: Duration,
    ) -> Refusal<S> {
        // The relayed body is framed afresh: it was decoded and may have been chunked.
        response.headers_mut().remove(CONTENT_LENGTH);
        Refusal {
            response,
            announced_length: decoder.announced_length,
            rest: (!decoder.is_done()).then_some(BodyRest {
                decoder,
                stream,
                read_timeout,
            }),
        }
    }
}

impl<S: AsyncRead + Unpin + Send + Sync + 'static> Refusal<S> {
    /// Writes the refusal to a client whose connection it then ends.
    pub(crate) async fn write_to<IO: AsyncWrite + Unpin>(self, io: &mut IO) {
        let Some(mut rest) = self.rest else {
            return wire::write_final_response(io, &self.response).await;
        };
        let mut head = Vec::with_capacity(512);
        wire::encode_closing_head(&self.response, self.announced_length, &mut head);
        // A client that stops reading gets as long as a backend that stops writing.
        let patience = rest.read_timeout;
        let relay = async {
            write_within(patience, io, &head).await?;
            write_within(patience, io, self.response.body()).await?;
            while let Some(piece) = rest.next().await? {
                write_within(patience, io, &piece).await?;
            }
            Ok::<_, AnswerError>(tokio::time::timeout(patience, io.shutdown()).await)
        };
        if let Err(error) = relay.await {
            // The client sees the body end early: short of its length, or
            // without the close a complete one would have had.
            tracing::debug!(%error, "refusal body cut short");
        }
    }

    /// The refusal as hyper's response: the held bytes, then the rest as it
    /// comes. An error mid-body reaches hyper, which then ends the
    /// connection rather than the body, so the client cannot mistake the
    /// cut for the end.
    pub(crate) fn into_response(self) -> Response<ProxyBody> {
        let (mut parts, held) = self.response.into_parts();
        let Some(rest) = self.rest else {
            return Response::from_parts(parts, body::full(held));
        };
        if let Some(length) = self.announced_length {
            parts
                .headers
                .insert(CONTENT_LENGTH, HeaderValue::from(length));
        }
        let first = futures_util::stream::once(async move { Ok(Frame::data(held)) });
        let later = futures_util::stream::unfold(Some(rest), |rest| async move {
            let mut rest = rest?;
            match rest.next().await {
                Ok(Some(piece)) => Some((Ok(Frame::data(piece)), Some(rest))),
                Ok(None) => None,
                Err(error) => Some((Err(BoxError::from(error)), None)),
            }
        });
        let body = StreamBody::new(first.chain(later));
        Response::from_parts(parts, BodyExt::boxed(body))
    }
}

async fn write_within<IO: AsyncWrite + Unpin>(
    patience: Duration,
    io: &mut IO,
    bytes: &[u8],
) -> Result<(), AnswerError> {
    match tokio::time::timeout(patience, io.write_all(bytes)).await {
        Ok(written) => Ok(written?),
        Err(_) => Err(AnswerError::Io(std::io::ErrorKind::TimedOut.into())),
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::ReadBuf;

    use super::*;

    /// Hands out its bytes one per read, so every state of the decoder
    /// meets a boundary.
    struct Trickle<'a>(&'a [u8]);

    impl AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if let Some((&first, rest)) = self.0.split_first() {
                buf.put_slice(&[first]);
                self.0 = rest;
            }
            Poll::Ready(Ok(()))
        }
    }

    fn head(fields: &[(&'static str, &'static str)]) -> ResponseHead {
        let mut headers = http::HeaderMap::new();
        for (name, value) in fields {
            headers.append(*name, HeaderValue::from_static(value));
        }
        ResponseHead {
            status: StatusCode::FORBIDDEN,
            headers,
        }
    }

    async fn decode(
        head: &ResponseHead,
        wire: &[u8],
        limit: usize,
    ) -> Result<(Bytes, bool), AnswerError> {
        let mut decoder = BodyDecoder::new(head, BytesMut::new())?;
        let held = decoder.read_up_to(&mut Trickle(wire), limit).await?;
        Ok((held, decoder.is_done()))
    }

    #[tokio::test]
    async fn bodies_decode_across_one_byte_reads() {
        let chunked = head(&[("transfer-encoding", "gzip, chunked")]);
        let cases: [(ResponseHead, &[u8], &[u8]); 4] = [
            (head(&[("content-length", "5")]), b"helloEXTRA", b"hello"),
            (head(&[]), b"until the close", b"until the close"),
            (
                chunked,
                b"3\r\nabc\r\n2;x=\"y\"\r\nde\r\n0\r\nT: 1\r\n\r\nEXTRA",
                b"abcde",
            ),
            (head(&[("content-length", "0")]), b"", b""),
        ];
        for (head, wire, body) in cases {
            let (held, done) = decode(&head, wire, usize::MAX).await.unwrap();
            assert_eq!(
                (&held[..], done),
                (body, true),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
    }

    #[tokio::test]
    async fn past_the_limit_the_rest_is_left_on_the_stream() {
        let body: Vec<u8> = (0..=255).collect();
        let mut wire = &body[..];
        let mut decoder =
            BodyDecoder::new(&head(&[("content-length", "256")]), BytesMut::new()).unwrap();
        let held = decoder.read_up_to(&mut wire, 100).await.unwrap();
        assert!(
            held.len() > 100 && !decoder.is_done(),
            "held {}",
            held.len()
        );
        let mut all = held.to_vec();
        while let Some(piece) = decoder.next(&mut wire).await.unwrap() {
            all.extend_from_slice(&piece);
        }
        assert_eq!(all, body);
        assert!(decoder.is_done());
    }

    #[tokio::test]
    async fn broken_bodies_are_errors() {
        let chunked = || head(&[("transfer-encoding", "chunked")]);
        let long_line = format!(
            "5;{}\r\nhello\r\n0\r\n\r\n",
            "x".repeat(MAX_CHUNK_LINE + 10)
        );
        let cases: [(ResponseHead, &[u8]); 5] = [
            (head(&[("content-length", "9")]), b"short"),
            (chunked(), b"zz\r\n"),
            (chunked(), b"3\r\nabcXY0\r\n\r\n"),
            (chunked(), b"3\r\nabc\r\n"),
            (chunked(), long_line.as_bytes()),
        ];
        for (head, wire) in cases {
            assert!(
                decode(&head, wire, usize::MAX).await.is_err(),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let conflicting = head(&[("content-length", "1"), ("content-length", "2")]);
        assert!(BodyDecoder::new(&conflicting, BytesMut::new()).is_err());
    }
}
