//! Origin parsing and matching against RFC 6454 written out in the target:
//! an origin is the tuple (scheme, host, port), scheme and host compared
//! case-insensitively, an absent port meaning the scheme's default.
//!
//! - Whatever `Origin::parse` accepts, the reference reads as the same
//!   tuple; re-serialised with other letter case and with the port written
//!   out or left to its default, it parses to the same `Origin`.
//! - `OriginPattern::matches` ⇔ the reference comparison of the two tuples
//!   (for `*.domain`, one or more labels in front of the domain).
//! - `is_allowed` ⇔ `*`, or a parsed origin that the pattern matches.
//!
//! Input: the pattern, a newline, the `Origin` value.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::policy::origin::{Origin, OriginPattern, is_allowed};

/// (scheme, host, port) with scheme and host lower-cased.
type Tuple = (String, String, u16);

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

/// `scheme://host[:port]` as a tuple, without judging whether the host is
/// a valid name (the parser's business); `None` if it is not of that form.
fn reference_tuple(text: &str) -> Option<Tuple> {
    let (scheme, authority) = text.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    // The last colon starts a port, unless it is inside an IPv6 literal.
    let (host, port) = match authority.rfind(':') {
        Some(colon) if !authority[colon..].contains(']') => {
            let digits = &authority[colon + 1..];
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (&authority[..colon], digits.parse::<u16>().ok()?)
        }
        _ => (authority, default_port(&scheme)?),
    };
    Some((scheme, host.to_ascii_lowercase(), port))
}

fn same_origin(a: &Tuple, b: &Tuple) -> bool {
    a.0.eq_ignore_ascii_case(&b.0) && a.1.eq_ignore_ascii_case(&b.1) && a.2 == b.2
}

/// Flips the case of every other ASCII letter.
fn mixed_case(text: &str) -> String {
    text.chars()
        .enumerate()
        .map(|(i, c)| {
            if i % 2 == 0 {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let (pattern_text, origin_text) = text.split_once('\n').unwrap_or((text, text));

    let origin = Origin::parse(origin_text);
    if let Ok(origin) = &origin {
        let tuple = reference_tuple(origin_text).unwrap_or_else(|| {
            panic!("{origin_text:?} parsed as {origin:?} but is not scheme://host[:port]")
        });
        assert_eq!(
            (origin.scheme.clone(), origin.host.clone(), origin.port),
            tuple,
            "the parser's tuple differs from RFC 6454's for {origin_text:?}"
        );
        let explicit = format!(
            "{}://{}:{}",
            mixed_case(&origin.scheme),
            mixed_case(&origin.host),
            origin.port
        );
        assert_eq!(
            Origin::parse(&explicit).as_ref(),
            Ok(origin),
            "{explicit:?} is the same origin as {origin_text:?}"
        );
        if default_port(&origin.scheme) == Some(origin.port) {
            let implicit = format!(
                "{}://{}",
                mixed_case(&origin.scheme),
                mixed_case(&origin.host)
            );
            assert_eq!(
                Origin::parse(&implicit).as_ref(),
                Ok(origin),
                "{implicit:?} is the same origin as {origin_text:?}"
            );
        }
    }

    let Ok(pattern) = OriginPattern::parse(pattern_text) else {
        assert!(
            !is_allowed(&[], origin_text),
            "an empty list allows nothing"
        );
        return;
    };
    let expected = match (&pattern, &origin) {
        (OriginPattern::Any, _) => true,
        (_, Err(_)) => false,
        (OriginPattern::Exact(_), Ok(_)) => {
            let allowed =
                reference_tuple(pattern_text).expect("an exact pattern is scheme://host[:port]");
            let offered = reference_tuple(origin_text).expect("checked above");
            same_origin(&allowed, &offered)
        }
        (OriginPattern::Subdomains { .. }, Ok(_)) => {
            let (scheme, host, port) =
                reference_tuple(pattern_text).expect("a pattern is scheme://host[:port]");
            let domain = host
                .strip_prefix("*.")
                .expect("a subdomain pattern's host starts with *.");
            let offered = reference_tuple(origin_text).expect("checked above");
            let host = offered.1.to_ascii_lowercase();
            let labels = host
                .len()
                .checked_sub(domain.len() + 1)
                .map(|front| &host[..front]);
            scheme.eq_ignore_ascii_case(&offered.0)
                && port == offered.2
                && host.ends_with(&format!(".{}", domain.to_ascii_lowercase()))
                && labels.is_some_and(|labels| !labels.is_empty())
        }
    };
    if let Ok(origin) = &origin {
        assert_eq!(
            pattern.matches(origin),
            expected,
            "{pattern_text:?} against {origin_text:?}"
        );
    }
    assert_eq!(
        is_allowed(std::slice::from_ref(&pattern), origin_text),
        expected,
        "is_allowed({pattern_text:?}, {origin_text:?})"
    );
});
