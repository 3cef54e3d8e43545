//! The HTTP/2 glue: a request's fields put the way an HTTP/1.1 backend
//! expects them (RFC 9113 §8.3.1, §8.2.3), and an RFC 8441 extended CONNECT
//! rewritten into an HTTP/1.1 upgrade. Against the rules written out:
//!
//! - `Host` is the `:authority` exactly, once, when there is one (else the
//!   fields are left as they were); two or more `Cookie` fields become one,
//!   their non-empty values joined with `; ` in order; every other field is
//!   untouched;
//! - the upgrade is a GET HTTP/1.1 with `Upgrade: websocket`, `Connection:
//!   Upgrade` and a `Sec-WebSocket-Key` of 16 random bytes in base64, the
//!   one returned; no `:protocol` left; every other field untouched.
//!
//! Input: the authority, a newline, then one field per line (`name: value`).

#![no_main]

use base64::Engine as _;
use http::header::{CONNECTION, COOKIE, HOST, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};
use libfuzzer_sys::fuzz_target;
use wsgate::fuzzing::{h2_request_fields, h2_upgrade_parts};

fn fields_of(lines: &[&[u8]]) -> HeaderMap {
    let mut fields = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        fields.append(name, value);
    }
    fields
}

fn values<'a>(fields: &'a HeaderMap, name: &HeaderName) -> Vec<&'a [u8]> {
    fields
        .get_all(name)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect()
}

/// Every field but `except`, by name and values in order.
fn others(fields: &HeaderMap, except: &[HeaderName]) -> Vec<(HeaderName, Vec<Vec<u8>>)> {
    let mut names: Vec<&HeaderName> = fields
        .keys()
        .filter(|name| !except.contains(name))
        .collect();
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names
        .into_iter()
        .map(|name| {
            let values = fields
                .get_all(name)
                .iter()
                .map(|v| v.as_bytes().to_vec())
                .collect();
            (name.clone(), values)
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|&b| b == b'\n');
    let authority = lines.next().unwrap_or_default();
    let rest: Vec<&[u8]> = lines.collect();
    let original = fields_of(&rest);
    let uri = std::str::from_utf8(authority)
        .ok()
        .and_then(|authority| {
            Uri::builder()
                .scheme("https")
                .authority(authority)
                .path_and_query("/")
                .build()
                .ok()
        })
        .unwrap_or_else(|| Uri::from_static("/"));

    let mut rewritten = original.clone();
    h2_request_fields(uri.clone(), &mut rewritten);
    match uri.authority().map(|a| HeaderValue::from_str(a.as_str())) {
        Some(Ok(host)) => assert_eq!(values(&rewritten, &HOST), [host.as_bytes()]),
        _ => assert_eq!(values(&rewritten, &HOST), values(&original, &HOST)),
    }
    let cookies = values(&original, &COOKIE);
    let crumbs: Vec<&[u8]> = cookies.iter().copied().filter(|c| !c.is_empty()).collect();
    let joined = crumbs.join(&b"; "[..]);
    if cookies.len() >= 2 && HeaderValue::from_bytes(&joined).is_ok() {
        assert_eq!(values(&rewritten, &COOKIE), [&joined[..]]);
    } else {
        assert_eq!(values(&rewritten, &COOKIE), cookies);
    }
    assert_eq!(
        others(&rewritten, &[HOST, COOKIE]),
        others(&original, &[HOST, COOKIE])
    );

    let mut request = Request::builder()
        .method(Method::CONNECT)
        .version(Version::HTTP_2)
        .uri(uri)
        .body(())
        .expect("a CONNECT with a parsed URI builds");
    *request.headers_mut() = original.clone();
    request
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let (mut parts, ()) = request.into_parts();
    let key = h2_upgrade_parts(&mut parts);
    assert_eq!(parts.method, Method::GET);
    assert_eq!(parts.version, Version::HTTP_11);
    assert!(parts.extensions.get::<hyper::ext::Protocol>().is_none());
    assert_eq!(values(&parts.headers, &UPGRADE), [&b"websocket"[..]]);
    assert_eq!(values(&parts.headers, &CONNECTION), [&b"Upgrade"[..]]);
    let key_name = HeaderName::from_static("sec-websocket-key");
    assert_eq!(values(&parts.headers, &key_name), [key.as_bytes()]);
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(&key)
        .expect("the key is base64");
    assert_eq!(decoded.len(), 16);
    assert_eq!(
        others(&parts.headers, &[UPGRADE, CONNECTION, key_name.clone()]),
        others(&original, &[UPGRADE, CONNECTION, key_name])
    );
});
