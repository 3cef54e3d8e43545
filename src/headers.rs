//! Header rules on the way to the backend: hop-by-hop stripping, WebSocket
//! upgrade detection, client-IP resolution and the forwarding headers
//! (`X-Forwarded-*`, `X-Real-IP`, RFC 7239 `Forwarded`). Pure functions over
//! `HeaderMap`, so each rule is unit-tested on its own.

use std::net::IpAddr;

use http::header::{CONNECTION, Entry, HOST, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

/// RFC 9110 §5.6.2 `tchar`.
pub fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// Comma-separated tokens across every instance of `name`, trimmed.
pub fn list_tokens<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
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
fn token_bytes<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a [u8]> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|value| split_tokens(value.as_bytes()))
}

fn has_token(headers: &HeaderMap, name: &HeaderName, wanted: &str) -> bool {
    token_bytes(headers, name).any(|token| token.eq_ignore_ascii_case(wanted.as_bytes()))
}

/// RFC 6455 §4.2.1: `Connection` includes the token `Upgrade` and `Upgrade`
/// includes `websocket`, both case-insensitive and possibly among others.
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    has_token(headers, &CONNECTION, "upgrade") && has_token(headers, &UPGRADE, "websocket")
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(crate) const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Headers that describe one connection, never the message (RFC 9110 §7.6.1),
/// plus `Proxy-Authorization`, which is meant for this proxy alone. `Upgrade`
/// is handled apart, since a WebSocket upgrade keeps it.
const HOP_BY_HOP: [HeaderName; 8] = [
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
/// name", then drop the fixed hop-by-hop set. For a WebSocket upgrade the
/// upgrade itself is end-to-end in effect, so `Upgrade` is kept and
/// `Connection: Upgrade` put back.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, websocket_upgrade: bool) {
    let named: Vec<HeaderName> = token_bytes(headers, &CONNECTION)
        .filter(|token| {
            !token.eq_ignore_ascii_case(b"upgrade") && !token.eq_ignore_ascii_case(b"keep-alive")
        })
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
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let mut client = peer.to_canonical();
    if !is_trusted(client, trusted) {
        return client;
    }
    let entries: Vec<&str> = list_tokens(headers, &X_FORWARDED_FOR).collect();
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

/// What the forwarding headers are computed from.
pub struct Hop {
    /// The TCP peer (or the PROXY header's source).
    pub peer: IpAddr,
    pub peer_trusted: bool,
    pub client_ip: IpAddr,
    pub tls: bool,
}

/// Sets `X-Forwarded-For/Proto/Host`, `X-Real-IP` and `Forwarded`. From a
/// trusted peer the incoming chain is extended and its proto/host kept; from
/// anyone else the incoming values are lies or noise and are replaced.
///
/// This runs on every request, so the peer's address is formatted once, by
/// hand (`fmt` cost more than the rest of the headers), and each header is
/// looked up once.
pub fn set_forwarding_headers(headers: &mut HeaderMap, hop: &Hop) {
    let peer = hop.peer.to_canonical();
    let mut peer_text = String::with_capacity(40);
    push_ip(&mut peer_text, peer);
    let proto = if hop.tls { "https" } else { "http" };
    let host = headers.get(HOST).cloned();

    let chain = match hop
        .peer_trusted
        .then(|| joined(headers, &X_FORWARDED_FOR))
        .flatten()
    {
        Some(mut incoming) => {
            incoming.push_str(", ");
            incoming.push_str(&peer_text);
            owned_value(incoming)
        }
        None => HeaderValue::from_str(&peer_text).ok(),
    };
    insert_some(headers, X_FORWARDED_FOR, chain);

    match headers.entry(X_FORWARDED_PROTO) {
        Entry::Occupied(_) if hop.peer_trusted => {}
        Entry::Occupied(mut entry) => {
            entry.insert(HeaderValue::from_static(proto));
        }
        Entry::Vacant(entry) => {
            entry.insert(HeaderValue::from_static(proto));
        }
    }
    match (headers.entry(X_FORWARDED_HOST), &host) {
        (Entry::Occupied(_), _) if hop.peer_trusted => {}
        (Entry::Occupied(mut entry), Some(host)) => {
            entry.insert(host.clone());
        }
        (Entry::Occupied(entry), None) => {
            entry.remove_entry_mult().1.for_each(drop);
        }
        (Entry::Vacant(entry), Some(host)) => {
            entry.insert(host.clone());
        }
        (Entry::Vacant(_), None) => {}
    }
    let client = hop.client_ip.to_canonical();
    let real_ip = if client == peer {
        HeaderValue::from_str(&peer_text).ok()
    } else {
        let mut client_text = String::with_capacity(40);
        push_ip(&mut client_text, client);
        owned_value(client_text)
    };
    insert_some(headers, X_REAL_IP, real_ip);

    let incoming = hop
        .peer_trusted
        .then(|| joined(headers, &FORWARDED))
        .flatten();
    let mut forwarded = match incoming {
        Some(mut incoming) => {
            incoming.push_str(", ");
            incoming
        }
        None => String::with_capacity(48 + peer_text.len()),
    };
    forwarded.push_str("for=");
    // RFC 7239 §6: IPv6 nodes are bracketed, and then must be a quoted-string.
    match peer {
        IpAddr::V4(_) => forwarded.push_str(&peer_text),
        IpAddr::V6(_) => {
            forwarded.push_str("\"[");
            forwarded.push_str(&peer_text);
            forwarded.push_str("]\"");
        }
    }
    forwarded.push_str(";proto=");
    forwarded.push_str(proto);
    if let Some(host) = host.as_ref().and_then(|host| host.to_str().ok()) {
        forwarded.push_str(";host=");
        push_forwarded_value(&mut forwarded, host);
    }
    insert_some(headers, FORWARDED, owned_value(forwarded));
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

/// All instances of a header joined with ", " (RFC 9110 §5.3 list semantics).
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut values = headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok());
    let mut text = values.next()?.to_owned();
    for value in values {
        text.push_str(", ");
        text.push_str(value);
    }
    Some(text)
}

/// A header value that takes the string's buffer instead of copying it.
fn owned_value(text: String) -> Option<HeaderValue> {
    HeaderValue::try_from(text).ok()
}

fn insert_some(headers: &mut HeaderMap, name: HeaderName, value: Option<HeaderValue>) {
    if let Some(value) = value {
        headers.insert(name, value);
    }
}

/// RFC 7239 §4: a value is a token or a quoted-string.
fn push_forwarded_value(out: &mut String, value: &str) {
    if !value.is_empty() && value.bytes().all(is_token_byte) {
        out.push_str(value);
        return;
    }
    out.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
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
