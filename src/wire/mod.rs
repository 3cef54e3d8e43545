//! HTTP/1.1 heads as bytes, for the WebSocket upgrade path.
//!
//! An upgrade is one bodiless GET and one answer, after which the connection
//! stops being HTTP. Taking that through hyper's server and client cost more
//! CPU than everything else in a plaintext handshake (a dispatcher and its
//! channels per side, the head parsed twice, header-case maps, the upgrade
//! hand-over), so the upgrade path reads and writes its heads with
//! `httparse`: the client's request in [`crate::wire::request`], the rest
//! here. Plain HTTP stays with hyper, and so does any first request the
//! upgrade path declines to parse: hyper then answers it as it would have
//! anyway.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::headers;

pub(crate) mod malformed;
pub(crate) mod request;

/// The most fields hyper takes in a request head (`max_headers`); beyond it
/// hyper answers 431, so [`malformed`] leaves such heads to it.
pub(crate) const MAX_REQUEST_FIELDS: usize = 512;

/// More fields than this in one head is left to hyper (request) or refused
/// (an upstream's answer). The slots are left uninitialised: filling 4 KiB
/// of empty fields per head costs more than parsing a browser's handshake.
pub(crate) const MAX_HEADERS: usize = 128;
/// An upstream answer head larger than this is not HTTP we want to relay.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// The fields as a map whose values share the buffer they were read into,
/// with room for `extra` more.
pub(crate) fn field_map<'f>(
    fields: impl ExactSizeIterator<Item = (&'f [u8], Bytes)>,
    extra: usize,
) -> Result<HeaderMap, AnswerError> {
    let mut map = HeaderMap::with_capacity(fields.len() + extra);
    for (name, value) in fields {
        let name =
            HeaderName::from_bytes(name).map_err(|_| AnswerError::Malformed("bad header name"))?;
        let value = HeaderValue::from_maybe_shared(value)
            .map_err(|_| AnswerError::Malformed("bad header value"))?;
        map.append(name, value);
    }
    Ok(map)
}

/// [`field_map`] of httparse's fields, parsed from `source`.
fn parsed_field_map(
    fields: &[httparse::Header<'_>],
    source: &Bytes,
) -> Result<HeaderMap, AnswerError> {
    field_map(
        fields
            .iter()
            .map(|field| (field.name.as_bytes(), source.slice_ref(field.value))),
        0,
    )
}

/// Writes the head of `parts` as an HTTP/1.1 request in origin form.
pub(crate) fn encode_request_head(parts: &http::request::Parts, out: &mut Vec<u8>) {
    let target = parts
        .uri
        .path_and_query()
        .map(|target| target.as_str())
        .unwrap_or("/");
    out.reserve(64 + target.len() + parts.headers.len() * 48);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    encode_fields(&parts.headers, out);
    out.extend_from_slice(b"\r\n");
}

fn encode_fields<'h>(
    fields: impl IntoIterator<Item = (&'h HeaderName, &'h HeaderValue)>,
    out: &mut Vec<u8>,
) {
    for (name, value) in fields {
        push_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
}

/// One `name: value` line of a head.
pub(crate) fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes a response that ends the connection, then closes it; a client that
/// stops reading gets two seconds.
pub(crate) async fn write_final_response<IO: AsyncWrite + Unpin>(
    io: &mut IO,
    response: &Response<Bytes>,
) {
    let mut bytes = Vec::with_capacity(256 + response.body().len());
    encode_final_response(response, &mut bytes);
    let write = async {
        io.write_all(&bytes).await?;
        io.shutdown().await
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), write).await;
}

/// A complete response that ends the connection: status line, headers, an
/// exact `content-length` and `connection: close`, then the body.
fn encode_final_response(response: &Response<Bytes>, out: &mut Vec<u8>) {
    let body = response.body();
    encode_closing_head(response, Some(body.len() as u64), out);
    out.extend_from_slice(body);
}

/// The head of a response that ends the connection: `content-length` when
/// `length` is known, else the body is delimited by the close.
pub(crate) fn encode_closing_head<B>(
    response: &Response<B>,
    length: Option<u64>,
    out: &mut Vec<u8>,
) {
    let status = response.status();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // Framing and persistence are this response's own, whatever the source said.
    let own = [CONTENT_LENGTH, http::header::CONNECTION, TRANSFER_ENCODING];
    encode_fields(
        response
            .headers()
            .iter()
            .filter(|(name, _)| !own.contains(name)),
        out,
    );
    if let Some(length) = length {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(length.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"connection: close\r\n\r\n");
}

/// An upstream's answer head.
#[derive(Debug)]
pub(crate) enum AnswerHead {
    Switch(SwitchHead),
    Final(ResponseHead),
}

/// A 101: checked on the two facts below, then sent on as it came, so no
/// header map is built for it.
#[derive(Debug)]
pub(crate) struct SwitchHead {
    /// The head exactly as it arrived, status line to blank line.
    pub raw: Bytes,
    /// An `Upgrade` field names the `websocket` token.
    pub upgrades_to_websocket: bool,
    /// Each `Sec-WebSocket-Protocol` field's value, as sent.
    pub selected_protocols: Vec<Bytes>,
    /// Each `Sec-WebSocket-Accept` field's value: only checked when wsgate
    /// made the key itself (an HTTP/2 WebSocket's HTTP/1.1 leg).
    pub accepts: Vec<Bytes>,
}

impl SwitchHead {
    /// The 101 as a response, for hyper to write.
    pub fn into_response<B>(self, body: B) -> Result<Response<B>, AnswerError> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut fields);
        parsed
            .parse(&self.raw)
            .map_err(|_| AnswerError::Malformed("bad status line or header field"))?;
        let mut response = Response::new(body);
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *response.headers_mut() = parsed_field_map(parsed.headers, &self.raw)?;
        Ok(response)
    }
}

/// A final answer other than a 101: a refusal, relayed with its body.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub status: StatusCode,
    pub headers: HeaderMap,
}

impl ResponseHead {
    /// The answer as a response carrying `body`.
    pub fn into_response<B>(self, body: B) -> Response<B> {
        let mut response = Response::new(body);
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        response
    }
}

/// Why an upstream's answer could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AnswerError {
    #[error("the connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the connection closed before a complete answer")]
    Closed,
    #[error("the answer is not valid HTTP/1.1: {0}")]
    Malformed(&'static str),
    #[error("the answer's {0} is larger than {1} bytes")]
    TooLarge(&'static str, usize),
}

/// Reads the next final (non-1xx, or 101) answer head from `stream`. Bytes
/// read past the head stay in `buffer`: they are the start of the body, or
/// of the backend's first WebSocket frames after a 101.
pub(crate) async fn read_response_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buffer: &mut BytesMut,
) -> Result<AnswerHead, AnswerError> {
    let mut scanned = 0;
    loop {
        // Found by its blank line first, so a head is parsed once, whole.
        if let Some(head_len) = blank_line_end(buffer, scanned) {
            scanned = 0;
            let raw = buffer.split_to(head_len).freeze();
            match parse_response_head(raw)? {
                Some(head) => return Ok(head),
                // Interim answers (100, 102, 103) precede the real one (RFC 9110 §15.2).
                None => continue,
            }
        }
        if buffer.len() >= MAX_RESPONSE_HEAD {
            return Err(AnswerError::TooLarge("head", MAX_RESPONSE_HEAD));
        }
        scanned = buffer.len();
        if stream.read_buf(buffer).await? == 0 {
            return Err(AnswerError::Closed);
        }
    }
}

/// Offset just past the first empty line, CRLF or bare LF (RFC 9112 §2.2
/// lets a recipient accept a bare LF as a line terminator). Bytes before
/// `scanned` were searched already; the search resumes a little before them,
/// since a terminator may straddle two reads.
pub(crate) fn blank_line_end(bytes: &[u8], scanned: usize) -> Option<usize> {
    let mut from = scanned.saturating_sub(2);
    while let Some(at) = bytes[from..].iter().position(|&byte| byte == b'\n') {
        let newline = from + at;
        match &bytes[newline + 1..] {
            [b'\n', ..] => return Some(newline + 2),
            [b'\r', b'\n', ..] => return Some(newline + 3),
            _ => from = newline + 1,
        }
    }
    None
}

/// The head in `raw`; `None` for an interim (1xx but 101) answer.
fn parse_response_head(raw: Bytes) -> Result<Option<AnswerHead>, AnswerError> {
    let mut fields = [MaybeUninit::uninit(); MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        &raw,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => {
            return Err(AnswerError::TooLarge("field count", MAX_HEADERS));
        }
        _ => return Err(AnswerError::Malformed("bad status line or header field")),
    }
    if response.version != Some(1) {
        return Err(AnswerError::Malformed("not HTTP/1.1"));
    }
    let status = response
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(AnswerError::Malformed("bad status code"))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Some(AnswerHead::Switch(switch_head(
            response.headers,
            &raw,
        ))));
    }
    if status.is_informational() {
        return Ok(None);
    }
    let headers = parsed_field_map(response.headers, &raw)?;
    Ok(Some(AnswerHead::Final(ResponseHead { status, headers })))
}

fn switch_head(fields: &[httparse::Header<'_>], raw: &Bytes) -> SwitchHead {
    let mut upgrades_to_websocket = false;
    let mut selected_protocols = Vec::new();
    let mut accepts = Vec::new();
    for field in fields {
        if field.name.eq_ignore_ascii_case("upgrade") {
            upgrades_to_websocket |= headers::split_tokens(field.value)
                .any(|token| token.eq_ignore_ascii_case(b"websocket"));
        } else if field.name.eq_ignore_ascii_case("sec-websocket-protocol") {
            selected_protocols.push(raw.slice_ref(field.value));
        } else if field.name.eq_ignore_ascii_case("sec-websocket-accept") {
            accepts.push(raw.slice_ref(field.value));
        }
    }
    SwitchHead {
        raw: raw.clone(),
        upgrades_to_websocket,
        selected_protocols,
        accepts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_response_has_exact_framing() {
        let mut response = Response::new(Bytes::from_static(b"no"));
        *response.status_mut() = StatusCode::FORBIDDEN;
        response
            .headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from_static("99"));
        response
            .headers_mut()
            .insert("x-why", HeaderValue::from_static("origin"));
        let mut out = Vec::new();
        encode_final_response(&response, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 403 Forbidden\r\nx-why: origin\r\ncontent-length: 2\r\nconnection: close\r\n\r\nno"
        );
    }

    async fn answer(wire: &[u8]) -> Result<(AnswerHead, Bytes, BytesMut), AnswerError> {
        let mut stream = wire;
        let mut buffer = BytesMut::new();
        match read_response_head(&mut stream, &mut buffer).await? {
            AnswerHead::Switch(head) => Ok((AnswerHead::Switch(head), Bytes::new(), buffer)),
            AnswerHead::Final(head) => {
                let mut decoder = crate::ws::refusal::BodyDecoder::new(&head, buffer)?;
                let body = decoder.read_up_to(&mut stream, usize::MAX).await?;
                Ok((AnswerHead::Final(head), body, BytesMut::new()))
            }
        }
    }

    async fn refusal(wire: &[u8]) -> Result<(ResponseHead, Bytes), AnswerError> {
        match answer(wire).await? {
            (AnswerHead::Final(head), body, _) => Ok((head, body)),
            (other, ..) => panic!("not a refusal: {other:?}"),
        }
    }

    #[tokio::test]
    async fn switching_protocols_keeps_raw_head_and_early_frames() {
        let head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        let mut wire = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
        wire.extend_from_slice(head);
        wire.extend_from_slice(b"\x81\x02hi");
        let (AnswerHead::Switch(parsed), _, early) = answer(&wire).await.unwrap() else {
            panic!("the 101 is the answer");
        };
        assert_eq!(&parsed.raw[..], &head[..]);
        assert!(parsed.upgrades_to_websocket);
        assert!(parsed.selected_protocols.is_empty());
        assert_eq!(&early[..], b"\x81\x02hi");
        let response = parsed.into_response(()).unwrap();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(response.headers()["upgrade"], "websocket");
        assert_eq!(response.headers()["connection"], "Upgrade");
    }

    #[tokio::test]
    async fn switch_facts_come_from_every_field_of_their_name() {
        let wire = b"HTTP/1.1 101 Switching Protocols\r\nUPGRADE: h2c, WebSocket \r\nSec-WebSocket-Protocol: chat\r\nsec-websocket-protocol:  v2\r\n\r\n";
        let (AnswerHead::Switch(head), ..) = answer(wire).await.unwrap() else {
            panic!("the 101 is the answer");
        };
        assert!(head.upgrades_to_websocket);
        assert_eq!(head.selected_protocols, [&b"chat"[..], &b"v2"[..]]);
        let wire = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websockets\r\nX-Upgrade: websocket\r\n\r\n";
        let (AnswerHead::Switch(head), ..) = answer(wire).await.unwrap() else {
            panic!("the 101 is the answer");
        };
        assert!(!head.upgrades_to_websocket);
    }

    #[tokio::test]
    async fn refusal_bodies_are_decoded_per_framing() {
        let cases: [(&[u8], &[u8]); 5] = [
            (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnopeEXTRA", b"nope"),
            (b"HTTP/1.1 403 Forbidden\nContent-Length: 2\n\nno", b"no"),
            (
                b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nbad\r\n5;x=y\r\n req.\r\n0\r\nX-T: 1\r\n\r\n",
                b"bad req.",
            ),
            (b"HTTP/1.1 404 Not Found\r\n\r\nuntil close", b"until close"),
            (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", b""),
        ];
        for (wire, body) in cases {
            let (_, got) = refusal(wire).await.unwrap();
            assert_eq!(&got[..], body, "{:?}", String::from_utf8_lossy(wire));
        }
    }

    #[tokio::test]
    async fn broken_answers_are_errors() {
        // Broken bodies: `refusal`'s tests.
        let cases: [&[u8]; 3] = [
            b"HTTP/1.0 101 Switching Protocols\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 101 Switching",
        ];
        for wire in cases {
            assert!(
                answer(wire).await.is_err(),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
    }
}
