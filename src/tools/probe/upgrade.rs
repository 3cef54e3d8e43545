//! One upgrade attempt on the wire, written and read by hand rather than by
//! a WebSocket client library: the probe must see exactly what a refusing
//! server or intermediary answered — status, `wsgate-reason`,
//! `WWW-Authenticate`, the body — and judge a 101 itself.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::{HeaderName, HeaderValue};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::net::show;

/// Larger answers heads than this are not a WebSocket server's.
const MAX_HEAD: usize = 64 * 1024;
/// How much of a refusal's body is read for the report.
const MAX_BODY: usize = 2048;
/// How much of it is shown.
const SHOWN_BODY: usize = 200;

/// The headers that vary between attempts, plus the user's `--header`s.
pub(super) struct Ask<'a> {
    pub request_target: &'a str,
    /// `Host`: the URL's authority.
    pub host: &'a str,
    pub origin: Option<&'a str>,
    pub cookie: Option<String>,
    pub authorization: Option<String>,
    pub extra: &'a [(HeaderName, HeaderValue)],
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes, base64 (RFC 6455 §4.1).
pub(super) fn new_key() -> std::io::Result<String> {
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).map_err(|error| std::io::Error::other(error.to_string()))?;
    Ok(STANDARD.encode(nonce))
}

/// The request head a browser would send, in its order; a `--header` of
/// the same name replaces the probe's own, except `Cookie`, whose values
/// are joined into the one header RFC 6265 §5.4 allows.
pub(super) fn request_head(ask: &Ask<'_>, key: &str) -> Vec<u8> {
    let mut fields: Vec<(String, Vec<u8>)> = vec![
        ("Host".into(), ask.host.as_bytes().to_vec()),
        ("Upgrade".into(), b"websocket".to_vec()),
        ("Connection".into(), b"Upgrade".to_vec()),
        ("Sec-WebSocket-Key".into(), key.as_bytes().to_vec()),
        ("Sec-WebSocket-Version".into(), b"13".to_vec()),
        (
            "User-Agent".into(),
            format!("wsgate-probe/{}", env!("CARGO_PKG_VERSION")).into_bytes(),
        ),
    ];
    if let Some(origin) = ask.origin {
        fields.push(("Origin".into(), origin.as_bytes().to_vec()));
    }
    if let Some(authorization) = &ask.authorization {
        fields.push(("Authorization".into(), authorization.as_bytes().to_vec()));
    }
    let mut cookie = ask.cookie.clone().map(String::into_bytes);
    let overridden = |name: &str| {
        ask.extra
            .iter()
            .any(|(extra, _)| extra.as_str().eq_ignore_ascii_case(name))
    };
    fields.retain(|(name, _)| !overridden(name));
    for (name, value) in ask.extra {
        if name == http::header::COOKIE {
            let joined = match cookie.take() {
                Some(ours) => [value.as_bytes(), b"; ", &ours].concat(),
                None => value.as_bytes().to_vec(),
            };
            fields.push(("Cookie".into(), joined));
        } else {
            fields.push((name.as_str().to_owned(), value.as_bytes().to_vec()));
        }
    }
    if let Some(ours) = cookie {
        fields.push(("Cookie".into(), ours));
    }
    let mut head = format!("GET {} HTTP/1.1\r\n", ask.request_target).into_bytes();
    for (name, value) in fields {
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(&value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// A response head as received.
#[derive(Debug)]
pub(super) struct Answer {
    pub status: u16,
    pub status_text: String,
    pub headers: Vec<(String, String)>,
    /// Bytes that came after the head: body, or WebSocket frames after a 101.
    pub rest: Vec<u8>,
}

impl Answer {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name`, joined as one list (RFC 9110 §5.3).
    pub fn joined(&self, name: &str) -> Option<String> {
        let values: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    }

    /// Why a 101 does not complete a WebSocket handshake (RFC 6455 §4.1,
    /// the client's checks), or `None` when it does.
    pub fn switch_problem(&self, key: &str) -> Option<String> {
        let has_token = |name: &str, token: &str| {
            self.headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .flat_map(|(_, v)| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case(token))
        };
        if !has_token("upgrade", "websocket") {
            return Some("no `Upgrade: websocket` in the 101".to_owned());
        }
        if !has_token("connection", "upgrade") {
            return Some("no `Connection: Upgrade` in the 101".to_owned());
        }
        match self.get("sec-websocket-accept") {
            None => Some("no Sec-WebSocket-Accept in the 101".to_owned()),
            Some(accept) if accept.trim() != derive_accept_key(key.as_bytes()) => Some(format!(
                "wrong Sec-WebSocket-Accept {accept:?}: something rewrote the key or the answer"
            )),
            Some(_) => None,
        }
    }
}

/// Sends `head` and reads the answer's head, each within `timeout`.
pub(super) async fn exchange<S>(
    stream: &mut S,
    head: &[u8],
    timeout: Duration,
) -> Result<Answer, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let send = async {
        stream.write_all(head).await?;
        stream.flush().await
    };
    match tokio::time::timeout(timeout, send).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => return Err(format!("sending the upgrade request: {error}")),
        Err(_) => {
            return Err(format!(
                "could not send the request within {}",
                show(timeout)
            ));
        }
    }
    match tokio::time::timeout(timeout, read_answer(stream)).await {
        Ok(answer) => answer,
        Err(_) => Err(format!("no answer within {}", show(timeout))),
    }
}

async fn read_answer<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Answer, String> {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    // Interim answers (100 Continue, 103 Early Hints) are skipped; a few at most.
    for _ in 0..8 {
        loop {
            match parse_head(&buf)? {
                Some(answer) if (100..200).contains(&answer.status) && answer.status != 101 => {
                    buf = answer.rest;
                    break;
                }
                Some(answer) => return Ok(answer),
                None if buf.len() >= MAX_HEAD => {
                    return Err(format!("answer head longer than {MAX_HEAD} bytes"));
                }
                None => {}
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) if buf.is_empty() => {
                    return Err("the server closed the connection without answering".to_owned());
                }
                Ok(0) => return Err("the server closed the connection mid-answer".to_owned()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(error) => return Err(format!("reading the answer: {error}")),
            }
        }
    }
    Err("more than 8 interim (1xx) answers".to_owned())
}

/// `Ok(None)` while the head is incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Answer>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(buf) {
        Ok(httparse::Status::Partial) => Ok(None),
        Ok(httparse::Status::Complete(len)) => {
            let headers = response
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).trim().to_owned(),
                    )
                })
                .collect();
            Ok(Some(Answer {
                status: response.code.unwrap_or(0),
                status_text: response.reason.unwrap_or("").to_owned(),
                headers,
                rest: buf[len..].to_vec(),
            }))
        }
        Err(error) => {
            let looks_like_tls = matches!(buf.first(), Some(0x15 | 0x16));
            let hint = if looks_like_tls {
                " (it looks like TLS: try wss://)"
            } else {
                ""
            };
            let start = String::from_utf8_lossy(&buf[..buf.len().min(40)]).into_owned();
            Err(format!(
                "the answer is not HTTP/1.1: {error}{hint}; it starts {start:?}"
            ))
        }
    }
}

/// The start of a refusal's body as one line of text (tags dropped), read
/// as far as its framing allows within `timeout`; whatever arrived by then
/// is shown.
pub(super) async fn body_excerpt<S: AsyncRead + Unpin>(
    stream: &mut S,
    answer: &Answer,
    timeout: Duration,
) -> Option<String> {
    if matches!(answer.status, 204 | 304) {
        return None;
    }
    let chunked = answer
        .joined("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    let length = answer
        .get("content-length")
        .and_then(|n| n.parse::<usize>().ok());
    let want = match (chunked, length) {
        (true, _) => MAX_BODY,
        (false, Some(length)) => length.min(MAX_BODY),
        (false, None) => MAX_BODY,
    };
    let mut raw = answer.rest.clone();
    let deadline = Instant::now() + timeout;
    // Bounded by size and by the deadline.
    loop {
        let have = if chunked {
            let (decoded, complete) = dechunk(&raw);
            if complete {
                break;
            }
            decoded.len()
        } else {
            raw.len()
        };
        if have >= want {
            break;
        }
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => raw.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    let body = if chunked { dechunk(&raw).0 } else { raw };
    let text = one_line(&String::from_utf8_lossy(&body[..body.len().min(want)]));
    (!text.is_empty()).then_some(text)
}

/// Decodes as much of a chunked body as has arrived; `true` once the last
/// chunk was seen, or the framing broke (nothing after that is body).
pub(crate) fn dechunk(mut raw: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    // A chunk per round, each consuming at least its size line: bounded by
    // the input's length.
    loop {
        let (data_start, size) = match httparse::parse_chunk_size(raw) {
            Ok(httparse::Status::Complete(found)) => found,
            Ok(httparse::Status::Partial) => return (out, false),
            Err(_) => return (out, true),
        };
        if size == 0 {
            return (out, true);
        }
        let data = &raw[data_start..];
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        if data.len() < size {
            out.extend_from_slice(data);
            return (out, false);
        }
        out.extend_from_slice(&data[..size]);
        let Some(rest) = data.get(size..) else {
            return (out, false);
        };
        match rest {
            [b'\r', b'\n', after @ ..] => raw = after,
            [] | [b'\r'] => return (out, false),
            _ => return (out, true),
        }
    }
}

/// Markup removed, whitespace collapsed, cut to a line's length: nginx's
/// `<html><head><title>403 Forbidden</title>…` reads as `403 Forbidden …`.
fn one_line(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut in_tag = false;
    for c in text.chars() {
        match c {
            '<' => {
                in_tag = true;
                plain.push(' ');
            }
            '>' if in_tag => in_tag = false,
            c if !in_tag => plain.push(c),
            _ => {}
        }
    }
    let words: Vec<&str> = plain.split_whitespace().collect();
    let line = words.join(" ");
    match line.char_indices().nth(SHOWN_BODY) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_is_a_browser_upgrade_and_flags_replace_or_join() {
        let extra = vec![
            (
                HeaderName::from_static("user-agent"),
                HeaderValue::from_static("test"),
            ),
            (
                HeaderName::from_static("cookie"),
                HeaderValue::from_static("a=1"),
            ),
        ];
        let ask = Ask {
            request_target: "/ws?x=1",
            host: "example.com:8080",
            origin: Some("http://example.com:8080"),
            cookie: Some("session=t".into()),
            authorization: None,
            extra: &extra,
        };
        let head = String::from_utf8(request_head(&ask, "KEY")).unwrap();
        assert_eq!(
            head,
            "GET /ws?x=1 HTTP/1.1\r\nHost: example.com:8080\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: KEY\r\nSec-WebSocket-Version: 13\r\n\
             Origin: http://example.com:8080\r\nuser-agent: test\r\nCookie: a=1; session=t\r\n\r\n"
        );
    }

    #[test]
    fn a_101_needs_upgrade_connection_and_the_right_accept() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let answer = |accept: &str| {
            let text = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\
                 Sec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            parse_head(text.as_bytes()).unwrap().unwrap()
        };
        assert_eq!(
            answer("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=").switch_problem(key),
            None
        );
        assert!(
            answer("wrong")
                .switch_problem(key)
                .unwrap()
                .contains("wrong")
        );
    }

    #[test]
    fn bodies_are_dechunked_and_shown_as_one_line() {
        assert_eq!(
            dechunk(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            (b"hello world".to_vec(), true)
        );
        assert_eq!(dechunk(b"5\r\nhel"), (b"hel".to_vec(), false));
        assert_eq!(dechunk(b"5;ext=1\r\nhello\r\n"), (b"hello".to_vec(), false));
        // A size is hex digits only: `from_str_radix` would have read `+5`.
        assert_eq!(dechunk(b"+5\r\nhello\r\n0\r\n\r\n"), (Vec::new(), true));
        // Chunk data not followed by CRLF ends the body there.
        assert_eq!(dechunk(b"2\r\nhiXX"), (b"hi".to_vec(), true));
        let nginx = "<html>\r\n<head><title>403 Forbidden</title></head>\r\n<body>\r\n\
                     <center><h1>403 Forbidden</h1></center>\r\n<hr><center>nginx/1.22.1</center>\r\n";
        assert_eq!(one_line(nginx), "403 Forbidden 403 Forbidden nginx/1.22.1");
    }

    #[test]
    fn a_non_http_answer_says_so_and_spots_tls() {
        let error = parse_head(&[0x15, 0x03, 0x03, 0x00, 0x02]).unwrap_err();
        assert!(error.contains("try wss://"), "{error}");
    }
}
