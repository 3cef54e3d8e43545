//! The checks hyper would fail a connection's first request head on, made
//! before the head is handed to it. hyper answers a head it cannot parse,
//! or whose body framing is ambiguous, with a bare 400 of its own: no
//! `wsgate-reason`, no body, no log line, no count. The contract wants every
//! refusal explained, so wsgate refuses such a head itself, by the same
//! rules (RFC 9112 §6.1 and §6.3, as hyper applies them to requests).

use std::mem::MaybeUninit;

use http::Uri;

use super::MAX_REQUEST_FIELDS;

/// Why hyper would refuse `head` with a bare 400, or `None` when it would
/// not. `head` holds a complete head (it ends in a blank line).
pub(crate) fn problem(head: &[u8]) -> Option<&'static str> {
    let mut slots = [const { MaybeUninit::uninit() }; MAX_REQUEST_FIELDS];
    let mut request = httparse::Request::new(&mut []);
    match request.parse_with_uninit_headers(head, &mut slots) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => return None,
        Err(_) => return Some("the request head is not HTTP/1.x"),
    }
    if request
        .path
        .is_some_and(|path| Uri::try_from(path).is_err())
    {
        return Some("the request target is not a URI");
    }
    let http11 = request.version == Some(1);
    let mut transfer_encoding = false;
    let mut chunked_last = false;
    let mut content_length: Option<u64> = None;
    for field in request.headers.iter() {
        if field.name.eq_ignore_ascii_case("transfer-encoding") {
            if !http11 {
                return Some("HTTP/1.0 has no Transfer-Encoding");
            }
            transfer_encoding = true;
            chunked_last = final_coding_is_chunked(field.value);
        } else if field.name.eq_ignore_ascii_case("content-length") && !transfer_encoding {
            // Once Transfer-Encoding has been seen it decides the framing and
            // any later length is ignored (§6.3).
            let Some(length) = digits(field.value) else {
                return Some("Content-Length is not a number");
            };
            if content_length.is_some_and(|earlier| earlier != length) {
                return Some("two different Content-Length values");
            }
            content_length = Some(length);
        }
    }
    if transfer_encoding && !chunked_last {
        return Some("Transfer-Encoding does not end in chunked");
    }
    None
}

/// RFC 9112 §6.3: in a request, chunked must be the final coding.
fn final_coding_is_chunked(value: &[u8]) -> bool {
    let last = value
        .rsplit(|&byte| byte == b',')
        .next()
        .unwrap_or_default();
    last.trim_ascii().eq_ignore_ascii_case(b"chunked")
}

/// A Content-Length value: one or more ASCII digits, nothing else, within
/// u64 (no sign, no spaces, no list).
fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |total, &byte| {
        if !byte.is_ascii_digit() {
            return None;
        }
        total.checked_mul(10)?.checked_add(u64::from(byte - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(fields: &str) -> Vec<u8> {
        format!("POST /x HTTP/1.1\r\nHost: a\r\n{fields}\r\n").into_bytes()
    }

    #[test]
    fn well_framed_heads_pass() {
        for fields in [
            "",
            "Content-Length: 5\r\n",
            "Content-Length: 5\r\nContent-Length: 5\r\n",
            "Transfer-Encoding: chunked\r\n",
            "Transfer-Encoding: gzip, chunked\r\n",
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: nonsense\r\n",
        ] {
            assert_eq!(problem(&head(fields)), None, "{fields:?}");
        }
    }

    #[test]
    fn what_hyper_refuses_is_named() {
        for (fields, expected) in [
            (
                "Content-Length: 0\r\nContent-Length: 5\r\n",
                "two different Content-Length values",
            ),
            ("Content-Length: +5\r\n", "Content-Length is not a number"),
            ("Content-Length: 5, 5\r\n", "Content-Length is not a number"),
            ("Content-Length: \r\n", "Content-Length is not a number"),
            (
                "Content-Length: 99999999999999999999\r\n",
                "Content-Length is not a number",
            ),
            (
                "Transfer-Encoding: xchunked\r\n",
                "Transfer-Encoding does not end in chunked",
            ),
            (
                "Transfer-Encoding: chunked, identity\r\n",
                "Transfer-Encoding does not end in chunked",
            ),
            (
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n",
                "Transfer-Encoding does not end in chunked",
            ),
        ] {
            assert_eq!(problem(&head(fields)), Some(expected), "{fields:?}");
        }
        assert_eq!(
            problem(b"POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Some("HTTP/1.0 has no Transfer-Encoding")
        );
        assert_eq!(
            problem(b"\x16\x03\x01\x02\x00\x01\r\n\r\n"),
            Some("the request head is not HTTP/1.x")
        );
        assert_eq!(
            problem(b"GET /a b HTTP/1.1\r\n\r\n"),
            Some("the request head is not HTTP/1.x")
        );
    }
}
