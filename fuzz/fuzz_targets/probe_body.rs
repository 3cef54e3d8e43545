//! `wsgate probe`'s decoder of a chunked refusal body, against RFC 9112
//! §7.1 written out in its plain form: hex size, an optional `;extension`
//! without CR or LF, CRLF, that many bytes, CRLF; a `0` size ends it.
//!
//! - whatever the plain form decodes completely, the probe decodes to the
//!   same bytes and says it is over;
//! - where the plain form is cut short, the probe has not ended and has
//!   decoded at least what the plain form had;
//! - it never yields more bytes than it was given.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::fuzzing::probe_dechunk;

enum Plain {
    Complete(Vec<u8>),
    CutShort(Vec<u8>),
    Other,
}

fn plain_decode(mut raw: &[u8]) -> Plain {
    let mut out = Vec::new();
    loop {
        let digits = raw.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        // Longer sizes than any body are no plain form, cut short or not.
        if digits > 15 {
            return Plain::Other;
        }
        if digits == raw.len() {
            return Plain::CutShort(out);
        }
        if digits == 0 {
            return Plain::Other;
        }
        let size = raw[..digits].iter().fold(0usize, |size, &b| {
            size * 16 + (b as char).to_digit(16).unwrap_or(0) as usize
        });
        let mut at = digits;
        if raw[at] == b';' {
            while at < raw.len() && raw[at] != b'\r' && raw[at] != b'\n' {
                at += 1;
            }
        }
        match &raw[at..] {
            [] | [b'\r'] => return Plain::CutShort(out),
            [b'\r', b'\n', ..] => at += 2,
            _ => return Plain::Other,
        }
        if size == 0 {
            return Plain::Complete(out);
        }
        let data = &raw[at..];
        if data.len() < size + 2 {
            if data.len() > size && data[size] != b'\r' {
                return Plain::Other;
            }
            return Plain::CutShort(out);
        }
        if &data[size..size + 2] != b"\r\n" {
            return Plain::Other;
        }
        out.extend_from_slice(&data[..size]);
        raw = &data[size + 2..];
    }
}

fuzz_target!(|data: &[u8]| {
    let (decoded, over) = probe_dechunk(data);
    assert!(decoded.len() <= data.len(), "more out than in");
    match plain_decode(data) {
        Plain::Complete(body) => {
            assert!(over, "a complete body not seen as over");
            assert_eq!(decoded, body);
        }
        Plain::CutShort(so_far) => {
            assert!(!over, "a body cut short seen as over");
            assert!(decoded.starts_with(&so_far), "lost decoded chunks");
        }
        Plain::Other => {}
    }
});
