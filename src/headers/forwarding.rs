//! The forwarding headers the proxy sets on every request it passes on:
//! `X-Forwarded-For/Proto/Host`, `X-Real-IP` and RFC 7239 `Forwarded`.
//!
//! The rules are written once, against a [`FieldSink`]: hyper's path applies
//! them to its `HeaderMap` ([`set_forwarding_headers`]); the WebSocket
//! upgrade path writes them straight into the head it sends upstream
//! ([`crate::wire::request`]), which costs a fraction of the map edits.

use std::net::IpAddr;

use http::header::HOST;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::headers::{
    FORWARDED, Fields, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, X_REAL_IP,
    is_token_byte, visible_ascii,
};

/// The fields whose fate [`apply_forwarding`] decides: a sink sees every one
/// of them set, kept or removed, so a writer of a fresh head leaves the
/// incoming copies out and lets the sink put back what stays.
pub(crate) const FORWARDING: [HeaderName; 5] = [
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    X_REAL_IP,
    FORWARDED,
];

/// What the forwarding headers are computed from.
pub struct Hop {
    /// The TCP peer (or the PROXY header's source).
    pub peer: IpAddr,
    pub peer_trusted: bool,
    pub client_ip: IpAddr,
    pub tls: bool,
}

/// Where [`apply_forwarding`] puts its verdict on each of [`FORWARDING`].
pub(crate) trait FieldSink {
    /// Every incoming `name` field is replaced by one holding `value`.
    fn set(&mut self, name: &HeaderName, value: &[u8]);
    /// The incoming `name` fields stay as they are.
    fn keep(&mut self, name: &HeaderName);
    /// Every incoming `name` field goes.
    fn remove(&mut self, name: &HeaderName);
}

/// From a trusted peer the incoming chains (`X-Forwarded-For`, `Forwarded`)
/// are extended and its proto and host kept; from anyone else the incoming
/// values are lies or noise and are replaced. `incoming` must already be
/// without hop-by-hop fields.
pub(crate) fn apply_forwarding<F: Fields + ?Sized, S: FieldSink>(
    incoming: &F,
    hop: &Hop,
    sink: &mut S,
) {
    let peer = hop.peer.to_canonical();
    // The peer's address is formatted by hand, once: `fmt` cost more than
    // the rest of the headers.
    let mut peer_text = String::with_capacity(40);
    push_ip(&mut peer_text, peer);
    let proto = if hop.tls { "https" } else { "http" };
    let host = incoming.first(&HOST);
    let kept = |name: &HeaderName| hop.peer_trusted && incoming.first(name).is_some();
    let mut value = String::with_capacity(128);

    if hop.peer_trusted {
        push_chain(&mut value, incoming, &X_FORWARDED_FOR);
    }
    value.push_str(&peer_text);
    sink.set(&X_FORWARDED_FOR, value.as_bytes());

    if kept(&X_FORWARDED_PROTO) {
        sink.keep(&X_FORWARDED_PROTO);
    } else {
        sink.set(&X_FORWARDED_PROTO, proto.as_bytes());
    }
    match host {
        _ if kept(&X_FORWARDED_HOST) => sink.keep(&X_FORWARDED_HOST),
        Some(host) => sink.set(&X_FORWARDED_HOST, host),
        None => sink.remove(&X_FORWARDED_HOST),
    }

    let client = hop.client_ip.to_canonical();
    if client == peer {
        sink.set(&X_REAL_IP, peer_text.as_bytes());
    } else {
        value.clear();
        push_ip(&mut value, client);
        sink.set(&X_REAL_IP, value.as_bytes());
    }

    value.clear();
    if hop.peer_trusted {
        push_chain(&mut value, incoming, &FORWARDED);
    }
    value.push_str("for=");
    // RFC 7239 §6: IPv6 nodes are bracketed, and then must be a quoted-string.
    match peer {
        IpAddr::V4(_) => value.push_str(&peer_text),
        IpAddr::V6(_) => {
            value.push_str("\"[");
            value.push_str(&peer_text);
            value.push_str("]\"");
        }
    }
    value.push_str(";proto=");
    value.push_str(proto);
    if let Some(host) = host.and_then(visible_ascii) {
        value.push_str(";host=");
        push_forwarded_value(&mut value, host);
    }
    sink.set(&FORWARDED, value.as_bytes());
}

/// Appends every instance of `name` joined with ", " (RFC 9110 §5.3 list
/// semantics), and a ", " to go on from, when there is any.
fn push_chain<F: Fields + ?Sized>(out: &mut String, incoming: &F, name: &HeaderName) {
    for value in incoming.values(name).filter_map(visible_ascii) {
        if !value.is_empty() {
            out.push_str(value);
            out.push_str(", ");
        }
    }
}

/// The verdicts, collected so they can be applied to the map they were read
/// from.
struct MapEdits(Vec<(HeaderName, Option<HeaderValue>)>);

impl FieldSink for MapEdits {
    fn set(&mut self, name: &HeaderName, value: &[u8]) {
        // A value that is not a valid field is never forwarded in its place.
        self.0
            .push((name.clone(), HeaderValue::from_bytes(value).ok()));
    }

    fn keep(&mut self, _: &HeaderName) {}

    fn remove(&mut self, name: &HeaderName) {
        self.0.push((name.clone(), None));
    }
}

/// [`apply_forwarding`] to a `HeaderMap` stripped of hop-by-hop fields.
pub fn set_forwarding_headers(headers: &mut HeaderMap, hop: &Hop) {
    let mut edits = MapEdits(Vec::with_capacity(FORWARDING.len()));
    apply_forwarding(&*headers, hop, &mut edits);
    for (name, value) in edits.0 {
        match value {
            Some(value) => {
                headers.insert(name, value);
            }
            None => {
                headers.remove(name);
            }
        }
    }
}

/// Appends `ip` in its usual text form.
fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (index, octet) in v4.octets().into_iter().enumerate() {
                if index > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
        }
        IpAddr::V6(v6) => {
            use std::fmt::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

/// RFC 7239 §4: a value is a token or a quoted-string.
fn push_forwarded_value(out: &mut String, value: &str) {
    if !value.is_empty() && value.bytes().all(is_token_byte) {
        out.push_str(value);
        return;
    }
    out.push('"');
    let mut rest = value;
    while let Some(at) = rest.bytes().position(|byte| byte == b'"' || byte == b'\\') {
        out.push_str(&rest[..at]);
        out.push('\\');
        out.push_str(&rest[at..=at]);
        rest = &rest[at + 1..];
    }
    out.push_str(rest);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::tests::map;

    #[test]
    fn forwarded_values_are_tokens_or_escaped_quoted_strings() {
        for (value, written) in [
            ("app.example.com", "app.example.com"),
            ("app.example.com:8443", "\"app.example.com:8443\""),
            ("a\"b\\c\"", "\"a\\\"b\\\\c\\\"\""),
            ("", "\"\""),
        ] {
            let mut out = String::new();
            push_forwarded_value(&mut out, value);
            assert_eq!(out, written, "{value:?}");
        }
    }

    #[test]
    fn addresses_are_written_as_std_writes_them() {
        let addresses = [
            "0.0.0.0",
            "9.10.99.100",
            "255.254.200.101",
            "127.0.0.1",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:10.0.0.1",
        ];
        for text in addresses {
            let ip: IpAddr = text.parse().unwrap();
            let mut out = String::new();
            push_ip(&mut out, ip);
            assert_eq!(out, ip.to_string());
        }
    }

    #[test]
    fn untrusted_peer_gets_its_forwarding_headers_replaced() {
        let mut headers = map(&[
            ("host", "app.example.com:8443"),
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "evil.test"),
            ("forwarded", "for=1.1.1.1"),
            ("x-real-ip", "1.1.1.1"),
        ]);
        let peer: IpAddr = "192.0.2.7".parse().unwrap();
        set_forwarding_headers(
            &mut headers,
            &Hop {
                peer,
                peer_trusted: false,
                client_ip: peer,
                tls: true,
            },
        );
        assert_eq!(headers["x-forwarded-for"], "192.0.2.7");
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(headers["x-forwarded-host"], "app.example.com:8443");
        assert_eq!(headers["x-real-ip"], "192.0.2.7");
        assert_eq!(
            headers["forwarded"],
            "for=192.0.2.7;proto=https;host=\"app.example.com:8443\""
        );
    }

    #[test]
    fn trusted_peer_chain_is_extended_and_its_proto_kept() {
        let mut headers = map(&[
            ("host", "app.example.com"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=203.0.113.9;proto=https"),
        ]);
        let peer: IpAddr = "::1".parse().unwrap();
        let client: IpAddr = "203.0.113.9".parse().unwrap();
        set_forwarding_headers(
            &mut headers,
            &Hop {
                peer,
                peer_trusted: true,
                client_ip: client,
                tls: false,
            },
        );
        assert_eq!(headers["x-forwarded-for"], "203.0.113.9, ::1");
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(headers["x-forwarded-host"], "app.example.com");
        assert_eq!(headers["x-real-ip"], "203.0.113.9");
        assert_eq!(
            headers["forwarded"],
            "for=203.0.113.9;proto=https, for=\"[::1]\";proto=http;host=app.example.com"
        );
    }
}
