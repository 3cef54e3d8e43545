//! Header rules on the way to the backend: hop-by-hop stripping, WebSocket
//! upgrade detection and client-IP resolution, over any request head's
//! [`Fields`]: hyper's `HeaderMap`, or the spans of an upgrade request read
//! off the wire ([`crate::wire::request`]). The forwarding headers the
//! proxy adds are [`forwarding`]'s.

pub mod forwarding;

use std::net::IpAddr;

use http::header::{CONNECTION, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

pub const SEC_WEBSOCKET_PROTOCOL: HeaderName = HeaderName::from_static("sec-websocket-protocol");

/// A request head's fields, looked up by name. The checks every handshake
/// makes are written once against this, so the upgrade path can run them on
/// the bytes it read without building a `HeaderMap`.
pub trait Fields {
    /// Every value of the fields called `name` (lowercase), in order. The
    /// iterator borrows `name` (a span scan compares against it), so a
    /// `const` name is bound to a local first.
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a;

    /// The first value of `name`.
    fn first<'a>(&'a self, name: &'a HeaderName) -> Option<&'a [u8]> {
        self.values(name).next()
    }
}

impl Fields for HeaderMap {
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.get_all(name).iter().map(HeaderValue::as_bytes)
    }
}

/// RFC 9110 §5.6.2 `tchar`.
pub fn is_token_byte(byte: u8) -> bool {
    matches!(byte, b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b'!' | b'#'..=b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~')
}

/// A field value as text, when it is visible ASCII, spaces and tabs (what
/// `HeaderValue::to_str` accepts).
pub(crate) fn visible_ascii(value: &[u8]) -> Option<&str> {
    if value
        .iter()
        .all(|&byte| byte == b'\t' || (b' '..=b'~').contains(&byte))
    {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

/// Comma-separated tokens across every instance of `name`, trimmed; values
/// that are not [`visible_ascii`] are skipped.
pub fn list_tokens<'a, F: Fields + ?Sized>(
    fields: &'a F,
    name: &'a HeaderName,
) -> impl Iterator<Item = &'a str> + 'a {
    fields
        .values(name)
        .filter_map(visible_ascii)
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

/// The comma-separated tokens of one field value, as bytes, trimmed of ASCII
/// whitespace (RFC 9110 §5.6.1 OWS; no token holds any other). The checks
/// every handshake makes (`Connection`, `Upgrade`) compare ASCII tokens, so
/// they need neither UTF-8 validation nor Unicode-aware trimming.
pub(crate) fn split_tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&byte| byte == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|token| !token.is_empty())
}

/// [`split_tokens`] across every instance of `name`.
fn token_bytes<'a, F: Fields + ?Sized>(
    fields: &'a F,
    name: &'a HeaderName,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    fields.values(name).flat_map(split_tokens)
}

fn has_token<F: Fields + ?Sized>(fields: &F, name: &HeaderName, wanted: &str) -> bool {
    token_bytes(fields, name).any(|token| token.eq_ignore_ascii_case(wanted.as_bytes()))
}

/// RFC 6455 §4.2.1: `Connection` includes the token `Upgrade` and `Upgrade`
/// includes `websocket`, both case-insensitive and possibly among others.
pub fn is_websocket_upgrade<F: Fields + ?Sized>(fields: &F) -> bool {
    has_token(fields, &CONNECTION, "upgrade") && has_token(fields, &UPGRADE, "websocket")
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(crate) const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
pub(crate) const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Headers that describe one connection, never the message (RFC 9110 §7.6.1),
/// plus `Proxy-Authorization`, which is meant for this proxy alone. `Upgrade`
/// is handled apart, since a WebSocket upgrade keeps it.
pub(crate) const HOP_BY_HOP: [HeaderName; 8] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    http::header::PROXY_AUTHORIZATION,
    http::header::PROXY_AUTHENTICATE,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
];

/// RFC 9110 §7.6.1: "a proxy or gateway MUST parse a received Connection header
/// field before a message is forwarded and, for each connection-option in this
/// field, remove any header or trailer field(s) from the message with the same
/// name". These are the names; `Upgrade` is not among them, whatever the
/// request is: a plain request loses it anyway, and an upgrade keeps it.
pub(crate) fn connection_options<F: Fields + ?Sized>(fields: &F) -> impl Iterator<Item = &[u8]> {
    token_bytes(fields, &CONNECTION).filter(|token| {
        !token.eq_ignore_ascii_case(b"upgrade") && !token.eq_ignore_ascii_case(b"keep-alive")
    })
}

/// Removes the [`connection_options`] and the fixed hop-by-hop set. For a
/// WebSocket upgrade the upgrade itself is end-to-end in effect, so `Upgrade`
/// is kept and `Connection: Upgrade` put back.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, websocket_upgrade: bool) {
    let named: Vec<HeaderName> = connection_options(headers)
        .filter_map(|token| HeaderName::from_bytes(token).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    // Looked for in one pass over the (few) fields present, rather than a
    // hash lookup per name: most requests carry one or two of them.
    let present = headers.keys().fold(0u8, |found, name| {
        HOP_BY_HOP
            .iter()
            .position(|hop| hop == name)
            .map_or(found, |index| found | 1 << index)
    });
    for (index, name) in HOP_BY_HOP.iter().enumerate() {
        // An upgrade's `Connection` is replaced below, not removed first.
        let replaced = websocket_upgrade && *name == CONNECTION;
        if present & 1 << index != 0 && !replaced {
            headers.remove(name);
        }
    }
    if websocket_upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    } else {
        headers.remove(UPGRADE);
    }
}

pub fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    let ip = ip.to_canonical();
    trusted.iter().any(|net| net.contains(&ip))
}

/// The client's address, as nginx's realip with `real_ip_recursive on`: the
/// peer itself unless it is a trusted proxy; then the right-most
/// `X-Forwarded-For` entry that is not itself trusted. A malformed entry stops
/// the walk, keeping the last address we could vouch for.
pub fn client_ip<F: Fields + ?Sized>(peer: IpAddr, fields: &F, trusted: &[IpNet]) -> IpAddr {
    let mut client = peer.to_canonical();
    if !is_trusted(client, trusted) {
        return client;
    }
    let name = X_FORWARDED_FOR;
    let entries: Vec<&str> = list_tokens(fields, &name).collect();
    for entry in entries.iter().rev() {
        let Some(ip) = parse_forwarded_ip(entry) else {
            break;
        };
        client = ip.to_canonical();
        if !is_trusted(client, trusted) {
            break;
        }
    }
    client
}

/// Accepts `1.2.3.4`, `1.2.3.4:5678`, `::1` and `[::1]:5678`.
fn parse_forwarded_ip(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = entry.strip_prefix('[') {
        return rest.split_once(']').and_then(|(ip, _)| ip.parse().ok());
    }
    entry
        .rsplit_once(':')
        .and_then(|(ip, _)| ip.parse::<std::net::Ipv4Addr>().ok())
        .map(IpAddr::V4)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A map of `pairs`, in order, repeats appended.
    pub(crate) fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|net| net.parse().unwrap()).collect()
    }

    #[test]
    fn token_bytes_are_rfc_9110_tchars() {
        let tchars: Vec<u8> = (0..=255u8).filter(|&byte| is_token_byte(byte)).collect();
        let mut expected: Vec<u8> = b"!#$%&'*+-.^_`|~".to_vec();
        expected.extend((b'0'..=b'9').chain(b'A'..=b'Z').chain(b'a'..=b'z'));
        expected.sort_unstable();
        assert_eq!(tchars, expected);
    }

    #[test]
    fn upgrade_detection_is_token_based_and_case_insensitive() {
        assert!(is_websocket_upgrade(&map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket")
        ])));
        assert!(is_websocket_upgrade(&map(&[
            ("connection", "keep-alive"),
            ("connection", "upgrade"),
            ("upgrade", "websocket")
        ])));
        assert!(!is_websocket_upgrade(&map(&[
            ("connection", "upgrades"),
            ("upgrade", "websocket")
        ])));
        assert!(!is_websocket_upgrade(&map(&[("upgrade", "websocket")])));
        assert!(!is_websocket_upgrade(&map(&[
            ("connection", "upgrade"),
            ("upgrade", "h2c")
        ])));
    }

    #[test]
    fn strips_fixed_and_connection_named_headers() {
        let mut headers = map(&[
            ("connection", "Upgrade, X-Secret, keep-alive"),
            ("upgrade", "websocket"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("proxy-authorization", "Basic abc"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("origin", "https://app.example.com"),
        ]);
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers["connection"], "Upgrade");
        assert_eq!(headers["upgrade"], "websocket");
        for gone in [
            "x-secret",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "proxy-authorization",
        ] {
            assert!(!headers.contains_key(gone), "{gone} survived");
        }
        assert_eq!(headers["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(headers["origin"], "https://app.example.com");

        let mut plain = map(&[
            ("connection", "upgrade"),
            ("upgrade", "h2c"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut plain, false);
        assert!(!plain.contains_key("upgrade") && !plain.contains_key("connection"));
        assert_eq!(plain["accept"], "*/*");
    }

    #[test]
    fn client_ip_walks_xff_only_through_trusted_hops() {
        let trusted = nets(&["127.0.0.1/32", "10.0.0.0/8"]);
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        let headers = map(&[("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.1.1.1")]);
        assert_eq!(
            client_ip(peer, &headers, &trusted),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        let untrusted: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(client_ip(untrusted, &headers, &trusted), untrusted);
        let all_trusted = map(&[("x-forwarded-for", "10.0.0.2, 10.0.0.3")]);
        assert_eq!(
            client_ip(peer, &all_trusted, &trusted),
            "10.0.0.2".parse::<IpAddr>().unwrap()
        );
        let garbage = map(&[("x-forwarded-for", "203.0.113.9, not-an-ip")]);
        assert_eq!(client_ip(peer, &garbage, &trusted), peer);
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(
            client_ip(mapped, &headers, &trusted),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
    }
}
