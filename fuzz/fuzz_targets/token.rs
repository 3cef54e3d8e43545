//! Where a bearer token is found (query parameter, then cookie, then
//! `Authorization: Bearer`), how `strip_token` removes it from the query,
//! and how the balancer reads its hash-key cookie and query parameter,
//! each against a plain reading of the rule in the target:
//!
//! - query: `&`-separated pairs, the first whose percent-decoded name is
//!   the parameter's and whose decoded value is not empty (RFC 3986 §2.1);
//! - cookie: `;`-separated `name=value` pairs across every `Cookie` field,
//!   names compared exactly (RFC 6265 §4.2.1, §5.4);
//! - Authorization: scheme `Bearer` in any case, then the token (RFC 6750
//!   §2.1);
//! - stripping keeps every other parameter byte for byte and in order, and
//!   what is left no longer yields a token.
//!
//! Input: lines — query parameter name, cookie name, query, then `Cookie`
//! and `Authorization` values (lines starting `a:` are Authorization).

#![no_main]

use http::{HeaderMap, HeaderValue, Request, Uri};
use libfuzzer_sys::fuzz_target;
use wsgate::fuzzing::{affinity_cookie, affinity_query, find_token, strip_query_param};

fn hex(byte: u8) -> Option<u8> {
    (byte as char).to_digit(16).map(|digit| digit as u8)
}

/// `%XX` decoded; anything else, a malformed escape included, as written.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(high << 4 | low);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_token(query: &str, name: &str) -> Option<String> {
    for pair in query.split('&') {
        let (key, value) = match pair.find('=') {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, ""),
        };
        if percent_decoded(key) == name {
            let value = percent_decoded(value);
            if !value.is_empty() {
                return Some(value);
            }
        }
    }
    None
}

fn cookie_token(headers: &HeaderMap, name: &str) -> Option<String> {
    for field in headers.get_all(http::header::COOKIE) {
        let Ok(text) = field.to_str() else { continue };
        for pair in text.split(';') {
            let Some((key, value)) = pair.trim().split_once('=') else {
                continue;
            };
            let value = value.trim().trim_matches('"');
            if key.trim() == name && !value.is_empty() {
                return Some(value.to_owned());
            }
        }
    }
    None
}

fn bearer_token(headers: &HeaderMap) -> Option<String> {
    for field in headers.get_all(http::header::AUTHORIZATION) {
        let Ok(text) = field.to_str() else { continue };
        let Some((scheme, token)) = text.trim().split_once(' ') else {
            continue;
        };
        let token = token.trim();
        if scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() {
            return Some(token.to_owned());
        }
    }
    None
}

/// The balancer's cookie: bytes, not text, and one pair of quotes unwrapped.
fn balancer_cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    for field in headers.get_all(http::header::COOKIE) {
        for pair in field.as_bytes().split(|&b| b == b';') {
            let Some(at) = pair.iter().position(|&b| b == b'=') else {
                continue;
            };
            if pair[..at].trim_ascii() != name.as_bytes() {
                continue;
            }
            let value = pair[at + 1..].trim_ascii();
            let value = match value {
                [b'"', inner @ .., b'"'] => inner,
                _ => value,
            };
            if !value.is_empty() {
                return Some(value);
            }
        }
    }
    None
}

fn balancer_query<'q>(query: &'q str, name: &str) -> Option<&'q [u8]> {
    for pair in query.split('&') {
        if let Some((key, value)) = pair.split_once('=')
            && key == name
            && !value.is_empty()
        {
            return Some(value.as_bytes());
        }
    }
    None
}

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let mut lines = text.split('\n');
    let query_name = lines.next().unwrap_or("token");
    let cookie_name = lines.next().unwrap_or("session");
    let query = lines.next().unwrap_or("");
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = match line.strip_prefix("a:") {
            Some(value) => (http::header::AUTHORIZATION, value),
            None => (http::header::COOKIE, line),
        };
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.append(name, value);
        }
    }
    // A query the `http` crate would not take cannot reach the token check.
    let Ok(uri) = format!("/ws?{query}").parse::<Uri>() else {
        return;
    };
    let query = uri.query().unwrap_or("");
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.uri = uri.clone();
    parts.headers = headers;

    for (query_location, cookie_location) in [
        (Some(query_name), Some(cookie_name)),
        (None, Some(cookie_name)),
        (Some(query_name), None),
        (None, None),
    ] {
        let expected = query_location
            .and_then(|name| query_token(query, name).map(|token| (token, "query")))
            .or_else(|| {
                cookie_location.and_then(|name| {
                    cookie_token(&parts.headers, name).map(|token| (token, "cookie"))
                })
            })
            .or_else(|| bearer_token(&parts.headers).map(|token| (token, "header")));
        assert_eq!(
            find_token(query_location, cookie_location, &parts),
            expected,
            "token for query {query_location:?}, cookie {cookie_location:?}"
        );
    }

    let stripped = strip_query_param(query, query_name);
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| percent_decoded(pair.split('=').next().unwrap_or("")) != query_name)
        .collect();
    let kept = kept.join("&");
    assert_eq!(
        stripped.as_deref(),
        (!kept.is_empty()).then_some(kept.as_str()),
        "strip of {query_name:?}"
    );
    if let Some(rest) = &stripped {
        assert_eq!(
            query_token(rest, query_name),
            None,
            "a stripped query still names the token"
        );
    }

    assert_eq!(
        affinity_cookie(&parts.headers, cookie_name),
        balancer_cookie(&parts.headers, cookie_name),
        "hash-key cookie {cookie_name:?}"
    );
    assert_eq!(
        affinity_query(query, query_name),
        balancer_query(query, query_name),
        "hash-key query parameter {query_name:?}"
    );
});
