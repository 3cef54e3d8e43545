//! The backend's answer to an upgrade, read off the wire in arbitrary
//! pieces: the answer head (`read_response_head`, interim answers
//! skipped), then for a refusal its body through `BodyDecoder`. Against
//! httparse reading the same bytes whole, and RFC 9112 §6.3 / §7.1
//! written out:
//!
//! - the answer taken is httparse's first non-1xx (or 101) head, same
//!   status; a 101 is relayed byte for byte, and the bytes kept after it
//!   are what followed it on the wire;
//! - a `Content-Length` body is exactly that many bytes (an error if the
//!   connection ends sooner), a close-delimited body is everything after
//!   the head, and a chunked body in plain form (hex size CRLF, data CRLF,
//!   `0` CRLF CRLF) decodes to its chunks joined.
//!
//! Input: a cut byte (see `cuts`), then the bytes the backend sends.

#![no_main]

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use libfuzzer_sys::fuzz_target;
use wsgate::fuzzing::{Answer, read_answer};
use wsgate_fuzz::{Pieces, reference_head_end, runtime};

/// What httparse makes of the answer heads in `data`.
enum Head {
    /// No complete answer: not enough bytes, or a head httparse refuses.
    None,
    Switch {
        raw: std::ops::Range<usize>,
    },
    Final {
        status: u16,
        body_start: usize,
    },
}

fn reference_head(data: &[u8]) -> Head {
    let mut at = 0;
    loop {
        let Some(len) = reference_head_end(&data[at..]) else {
            return Head::None;
        };
        let mut fields = [httparse::EMPTY_HEADER; 128];
        let mut response = httparse::Response::new(&mut fields);
        match response.parse(&data[at..at + len]) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return Head::None,
        }
        let (Some(1), Some(code)) = (response.version, response.code) else {
            return Head::None;
        };
        match code {
            0..=99 => return Head::None,
            101 => return Head::Switch { raw: at..at + len },
            100..=199 => at += len,
            _ => {
                return Head::Final {
                    status: code,
                    body_start: at + len,
                };
            }
        }
    }
}

/// Visible ASCII, space and tab: what a field value's tokens are read from.
fn is_text(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// The body as RFC 9112 frames it; `None` where this plain reading does
/// not decide (chunk extensions, trailers, odd spacing, binary field
/// values), which the comparison skips.
fn reference_body(
    status: StatusCode,
    headers: &HeaderMap,
    rest: &[u8],
) -> Option<Result<Vec<u8>, ()>> {
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Some(Ok(Vec::new()));
    }
    let codings = headers.get_all(http::header::TRANSFER_ENCODING);
    if codings.iter().next().is_some() {
        if !codings.iter().all(|value| is_text(value.as_bytes())) {
            return None;
        }
        let last = codings
            .iter()
            .flat_map(|value| value.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .rfind(|token| !token.is_empty());
        return match last {
            Some(coding) if coding.eq_ignore_ascii_case(b"chunked") => plain_chunked(rest),
            _ => Some(Ok(rest.to_vec())),
        };
    }
    let lengths: Vec<&[u8]> = headers
        .get_all(http::header::CONTENT_LENGTH)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    let Some(first) = lengths.first() else {
        return Some(Ok(rest.to_vec()));
    };
    if lengths.iter().any(|other| other != first) {
        return Some(Err(()));
    }
    let Some(length) = std::str::from_utf8(first)
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
    else {
        return Some(Err(()));
    };
    Some(match usize::try_from(length) {
        Ok(length) if length <= rest.len() => Ok(rest[..length].to_vec()),
        _ => Err(()),
    })
}

fn plain_chunked(mut rest: &[u8]) -> Option<Result<Vec<u8>, ()>> {
    let mut body = Vec::new();
    loop {
        let digits = rest.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        if digits == 0 || digits > 15 || rest.get(digits..digits + 2) != Some(b"\r\n") {
            return None;
        }
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..digits]).ok()?, 16).ok()?;
        rest = &rest[digits + 2..];
        if size == 0 {
            return (rest.get(..2) == Some(b"\r\n")).then_some(Ok(body));
        }
        if rest.len() < size + 2 || &rest[size..size + 2] != b"\r\n" {
            return None;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

fuzz_target!(|input: &[u8]| {
    let [cut, data @ ..] = input else {
        return;
    };
    let mut reader = Pieces::new(data, *cut);
    let answer = runtime().block_on(read_answer(&mut reader, 1 << 20));
    match (reference_head(data), answer) {
        (Head::None, Err(_)) => {}
        (
            Head::Switch { raw },
            Ok(Answer::Switch {
                raw: relayed,
                after,
                ..
            }),
        ) => {
            assert_eq!(
                &relayed[..],
                &data[raw.clone()],
                "the 101 is not relayed as it came"
            );
            assert!(
                data[raw.end..].starts_with(&after),
                "the bytes after the 101 are not what followed it"
            );
        }
        (
            Head::Final { status, body_start },
            Ok(Answer::Final {
                status: got,
                headers,
                body,
                done,
            }),
        ) => {
            assert_eq!(got.as_u16(), status, "status differs from httparse's");
            let rest = &data[body_start..];
            match (reference_body(got, &headers, rest), body) {
                (None, _) => {}
                (Some(Ok(expected)), Ok(decoded)) => {
                    assert_eq!(decoded, Bytes::from(expected), "decoded body differs");
                    assert!(done, "the whole body was read but the decoder is not done");
                }
                (Some(Err(())), Err(_)) => {}
                (expected, got) => panic!("body: expected {expected:?}, decoded {got:?}"),
            }
        }
        // A head over the size limit is refused though httparse reads it.
        (_, Err(error)) if data.len() >= 64 * 1024 => drop(error),
        (_, answer) => panic!("head: wsgate read {answer:?}, httparse disagrees"),
    }
});
