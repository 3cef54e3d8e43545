//! A connection's first request, when it is a WebSocket upgrade, kept as the
//! bytes it arrived in: each field is a span of the read buffer, looked up
//! through [`Fields`], and the head sent upstream is written from those
//! spans with the forwarding fields added on the way ([`encode`]).
//!
//! A `HeaderMap` per handshake (hashing each name, a value per field, the
//! edits of the rewrite) cost more than any check it served, so only a route
//! that needs one — JWT or forward auth reads and writes fields by name —
//! gets it, through [`UpgradeRequest::to_parts`].
//!
//! [`encode`]: UpgradeRequest::encode

use std::mem::MaybeUninit;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderName, HeaderValue, Method, Uri, Version};

use super::{self as wire, MAX_HEADERS, push_field};
use crate::headers::forwarding::{self, FORWARDING, FieldSink, Hop};
use crate::headers::{self, Fields, HOP_BY_HOP, SEC_WEBSOCKET_PROTOCOL};

/// Where a name or value lies in the buffer.
#[derive(Clone, Copy)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    fn len(self) -> usize {
        (self.end - self.start) as usize
    }
}

#[derive(Clone, Copy)]
struct Field {
    name: Span,
    value: Span,
}

/// A client's WebSocket upgrade request, parsed off the wire.
pub(crate) struct UpgradeRequest {
    /// The bytes read so far: the head and whatever followed it.
    buffer: Bytes,
    /// Length of the head at the start of `buffer`.
    pub head_len: usize,
    pub uri: Uri,
    fields: Vec<Field>,
    /// Bit `i` set: field `i` is hop-by-hop and not passed on (at most
    /// [`MAX_HEADERS`] fields, so 128 bits cover them all).
    hop_by_hop: u128,
}

/// The fields that go upstream: all but the hop-by-hop ones.
pub(crate) struct PassedOn<'r>(&'r UpgradeRequest);

impl Fields for UpgradeRequest {
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.named(name, false)
    }
}

impl Fields for PassedOn<'_> {
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.0.named(name, true)
    }
}

impl UpgradeRequest {
    /// Parses the start of `buffer` when it is a request the upgrade path
    /// serves on its own: a complete HTTP/1.1 GET asking for a WebSocket
    /// upgrade, with no body. Anything else, including anything malformed,
    /// gives `None`, and hyper answers it as it would have anyway.
    pub(crate) fn parse(buffer: &Bytes) -> Option<UpgradeRequest> {
        // Offsets are u32: a head is bounded far below 4 GiB by `max_header_bytes`.
        u32::try_from(buffer.len()).ok()?;
        let mut slots = [MaybeUninit::uninit(); MAX_HEADERS];
        let mut request = httparse::Request::new(&mut []);
        let head_len = match request.parse_with_uninit_headers(buffer, &mut slots) {
            Ok(httparse::Status::Complete(len)) => len,
            _ => return None,
        };
        // Most first requests that are not upgrades are plain HTTP for hyper:
        // nothing more is done for those.
        if request.method != Some("GET")
            || request.version != Some(1)
            || !request
                .headers
                .iter()
                .any(|field| field.name.eq_ignore_ascii_case("upgrade"))
        {
            return None;
        }
        let uri = Uri::from_maybe_shared(buffer.slice_ref(request.path?.as_bytes())).ok()?;
        let fields = request
            .headers
            .iter()
            .map(|field| Field {
                name: span(buffer, field.name.as_bytes()),
                value: span(buffer, field.value),
            })
            .collect();
        let mut parsed = UpgradeRequest {
            buffer: buffer.clone(),
            head_len,
            uri,
            fields,
            hop_by_hop: 0,
        };
        if !headers::is_websocket_upgrade(&parsed) || parsed.has_body() {
            return None;
        }
        parsed.hop_by_hop = parsed.find_hop_by_hop();
        Some(parsed)
    }

    /// The first value of `name` as a `HeaderValue` sharing the read buffer.
    pub(crate) fn shared_value(&self, name: &HeaderName) -> Option<HeaderValue> {
        let value = self.first(name)?;
        HeaderValue::from_maybe_shared(self.buffer.slice_ref(value)).ok()
    }

    /// What the client sent behind the head.
    pub(crate) fn rest(&self) -> Bytes {
        self.buffer.slice(self.head_len..)
    }

    pub(crate) fn passed_on(&self) -> PassedOn<'_> {
        PassedOn(self)
    }

    fn bytes(&self, span: Span) -> &[u8] {
        &self.buffer[span.start as usize..span.end as usize]
    }

    fn named<'a>(
        &'a self,
        name: &'a HeaderName,
        passed_on_only: bool,
    ) -> impl Iterator<Item = &'a [u8]> + 'a {
        let wanted = name.as_str().as_bytes();
        self.fields
            .iter()
            .enumerate()
            .filter(move |&(index, field)| {
                // Lengths first: most fields differ in length from the one wanted.
                field.name.len() == wanted.len()
                    && !(passed_on_only && self.hop_by_hop & 1 << index != 0)
                    && self.bytes(field.name).eq_ignore_ascii_case(wanted)
            })
            .map(|(_, field)| self.bytes(field.value))
    }

    /// A request body would have to be relayed before the upgrade; no
    /// browser sends one, so such requests are left to hyper.
    fn has_body(&self) -> bool {
        self.first(&TRANSFER_ENCODING).is_some()
            || self.values(&CONTENT_LENGTH).any(|value| value != b"0")
    }

    /// The fixed hop-by-hop set and the `Connection` options
    /// ([`headers::connection_options`]); `Upgrade` stays.
    fn find_hop_by_hop(&self) -> u128 {
        let mut found = 0;
        for (index, field) in self.fields.iter().enumerate() {
            let name = self.bytes(field.name);
            if HOP_BY_HOP
                .iter()
                .any(|hop| name.eq_ignore_ascii_case(hop.as_str().as_bytes()))
            {
                found |= 1 << index;
            }
        }
        // Most handshakes name nothing but `Upgrade` in `Connection`.
        for option in headers::connection_options(self) {
            for (index, field) in self.fields.iter().enumerate() {
                if self.bytes(field.name).eq_ignore_ascii_case(option) {
                    found |= 1 << index;
                }
            }
        }
        found
    }

    /// The request as the backend should see it: origin-form target, the
    /// fields passed on as they came, `Connection: Upgrade`, `offer` in place
    /// of the client's `Sec-WebSocket-Protocol` when the route narrowed it,
    /// and the forwarding fields for `hop`.
    pub(crate) fn encode(&self, hop: &Hop, offer: Option<&HeaderValue>, out: &mut Vec<u8>) {
        let target = self
            .uri
            .path_and_query()
            .map_or("/", |target| target.as_str());
        out.reserve(self.head_len + 256);
        out.extend_from_slice(b"GET ");
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for (index, field) in self.fields.iter().enumerate() {
            let name = self.bytes(field.name);
            let replaced = |names: &[HeaderName]| {
                names
                    .iter()
                    .any(|own| name.eq_ignore_ascii_case(own.as_str().as_bytes()))
            };
            let skipped = self.hop_by_hop & 1 << index != 0
                || replaced(&FORWARDING)
                || (offer.is_some() && replaced(&[SEC_WEBSOCKET_PROTOCOL]));
            if !skipped {
                push_field(out, name, self.bytes(field.value));
            }
        }
        push_field(out, b"Connection", b"Upgrade");
        if let Some(offer) = offer {
            push_field(out, b"Sec-WebSocket-Protocol", offer.as_bytes());
        }
        forwarding::apply_forwarding(
            &self.passed_on(),
            hop,
            &mut HeadWriter { out, request: self },
        );
        out.extend_from_slice(b"\r\n");
    }

    /// The request with every field in a map, unstripped, for the admission
    /// steps that work on one. `None` if a field is not valid for `http`
    /// (httparse's rules are the same, so only in theory).
    pub(crate) fn to_parts(&self) -> Option<http::request::Parts> {
        let fields = self.fields.iter().map(|field| {
            (
                self.bytes(field.name),
                self.buffer
                    .slice(field.value.start as usize..field.value.end as usize),
            )
        });
        let map = wire::field_map(fields, self.fields.len() + 6).ok()?;
        let (mut parts, ()) = http::Request::new(()).into_parts();
        parts.method = Method::GET;
        parts.uri = self.uri.clone();
        parts.version = Version::HTTP_11;
        parts.headers = map;
        Some(parts)
    }
}

/// Writes the forwarding fields into the head being encoded; a kept field
/// goes out as the client sent it.
struct HeadWriter<'a> {
    out: &'a mut Vec<u8>,
    request: &'a UpgradeRequest,
}

impl FieldSink for HeadWriter<'_> {
    fn set(&mut self, name: &HeaderName, value: &[u8]) {
        push_field(self.out, name.as_str().as_bytes(), value);
    }

    fn keep(&mut self, name: &HeaderName) {
        for value in self.request.passed_on().values(name) {
            push_field(self.out, name.as_str().as_bytes(), value);
        }
    }

    fn remove(&mut self, _: &HeaderName) {}
}

/// `part`'s place in `whole`, which it was parsed from.
fn span(whole: &[u8], part: &[u8]) -> Span {
    let start = part.as_ptr() as usize - whole.as_ptr() as usize;
    // Within a buffer whose length fits u32 (checked by the caller).
    Span {
        start: start as u32,
        end: (start + part.len()) as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> Option<UpgradeRequest> {
        UpgradeRequest::parse(&Bytes::copy_from_slice(text.as_bytes()))
    }

    const UPGRADE: &str = "GET /chat?room=1 HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nOrigin: https://App.example.com\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    fn hop(peer: &str, peer_trusted: bool, client: &str, tls: bool) -> Hop {
        Hop {
            peer: peer.parse().unwrap(),
            peer_trusted,
            client_ip: client.parse().unwrap(),
            tls,
        }
    }

    fn encoded(parsed: &UpgradeRequest, hop: &Hop, offer: Option<&str>) -> String {
        let offer = offer.map(|offer| HeaderValue::from_str(offer).unwrap());
        let mut out = Vec::new();
        parsed.encode(hop, offer.as_ref(), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn upgrade_request_is_parsed_with_values_intact() {
        let text = format!("{UPGRADE}early");
        let parsed = request(&text).expect("an upgrade");
        assert_eq!(parsed.head_len, UPGRADE.len());
        assert_eq!(&parsed.rest()[..], b"early");
        assert_eq!(parsed.uri, "/chat?room=1");
        assert_eq!(
            parsed.first(&http::header::ORIGIN),
            Some(&b"https://App.example.com"[..])
        );
        assert_eq!(parsed.fields.len(), 6);
        let parts = parsed.to_parts().unwrap();
        assert_eq!(parts.method, Method::GET);
        assert_eq!(parts.version, Version::HTTP_11);
        assert_eq!(parts.headers["origin"], "https://App.example.com");
        assert_eq!(parts.headers.len(), 6);
    }

    #[test]
    fn other_requests_are_left_to_hyper() {
        let cases = [
            UPGRADE.replace("GET", "POST"),
            UPGRADE.replace("HTTP/1.1", "HTTP/1.0"),
            UPGRADE.replace("Upgrade: websocket\r\n", ""),
            UPGRADE.replace("keep-alive, Upgrade", "keep-alive"),
            UPGRADE.replace("\r\n\r\n", "\r\nContent-Length: 5\r\n\r\n"),
            UPGRADE.replace("\r\n\r\n", "\r\nTransfer-Encoding: chunked\r\n\r\n"),
            UPGRADE.replace("\r\n\r\n", "\r\n"),
            UPGRADE.replace("Host: example.com", "Ho st: example.com"),
            "GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_owned(),
        ];
        for case in cases {
            assert!(request(&case).is_none(), "{case:?}");
        }
        let zero_length = UPGRADE.replace("\r\n\r\n", "\r\nContent-Length: 0\r\n\r\n");
        assert!(request(&zero_length).is_some());
    }

    #[test]
    fn head_goes_upstream_as_sent_plus_forwarding_fields() {
        let parsed = request(UPGRADE).unwrap();
        assert_eq!(
            encoded(&parsed, &hop("192.0.2.7", false, "192.0.2.7", true), None),
            "GET /chat?room=1 HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\nOrigin: https://App.example.com\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nConnection: Upgrade\r\n\
             x-forwarded-for: 192.0.2.7\r\nx-forwarded-proto: https\r\nx-forwarded-host: example.com\r\nx-real-ip: 192.0.2.7\r\nforwarded: for=192.0.2.7;proto=https;host=example.com\r\n\r\n"
        );
    }

    #[test]
    fn map_path_head_is_written_in_origin_form() {
        let parts = request(UPGRADE).unwrap().to_parts().unwrap();
        let mut out = Vec::new();
        wire::encode_request_head(&parts, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /chat?room=1 HTTP/1.1\r\nhost: example.com\r\nupgrade: websocket\r\nconnection: keep-alive, Upgrade\r\norigin: https://App.example.com\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
        );
    }

    #[test]
    fn absolute_form_target_goes_upstream_in_origin_form() {
        let text = UPGRADE.replace("GET /chat?room=1", "GET http://example.com/chat?room=1");
        let parsed = request(&text).unwrap();
        let head = encoded(&parsed, &hop("192.0.2.7", false, "192.0.2.7", false), None);
        assert!(head.starts_with("GET /chat?room=1 HTTP/1.1\r\n"), "{head}");
    }

    #[test]
    fn hop_by_hop_and_forged_fields_are_dropped_and_offer_replaced() {
        let text = UPGRADE.replace(
            "Connection: keep-alive, Upgrade\r\n",
            "Connection: Upgrade, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nProxy-Authorization: Basic x\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: http\r\nX-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nSec-WebSocket-Protocol: evil, chat\r\n",
        );
        let parsed = request(&text).unwrap();
        let head = encoded(
            &parsed,
            &hop("192.0.2.7", false, "192.0.2.7", false),
            Some("chat"),
        );
        for gone in [
            "X-Secret",
            "Keep-Alive",
            "TE:",
            "Proxy-Authorization",
            "6.6.6.6",
            "evil",
            "keep-alive",
        ] {
            assert!(!head.contains(gone), "{gone} survived: {head}");
        }
        for kept in [
            "\r\nConnection: Upgrade\r\n",
            "\r\nSec-WebSocket-Protocol: chat\r\n",
            "\r\nx-forwarded-for: 192.0.2.7\r\n",
            "\r\nx-forwarded-proto: http\r\n",
        ] {
            assert_eq!(head.matches(kept).count(), 1, "{kept:?} in {head}");
        }
    }

    #[test]
    fn trusted_peer_keeps_its_proto_and_host_and_extends_chains() {
        let text = UPGRADE.replace(
            "Origin:",
            "X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: outer.example\r\nForwarded: for=203.0.113.9\r\nOrigin:",
        );
        let parsed = request(&text).unwrap();
        let head = encoded(&parsed, &hop("::1", true, "203.0.113.9", false), None);
        for line in [
            "\r\nx-forwarded-for: 203.0.113.9, ::1\r\n",
            "\r\nx-forwarded-proto: https\r\n",
            "\r\nx-forwarded-host: outer.example\r\n",
            "\r\nx-real-ip: 203.0.113.9\r\n",
            "\r\nforwarded: for=203.0.113.9, for=\"[::1]\";proto=http;host=example.com\r\n",
        ] {
            assert_eq!(head.matches(line).count(), 1, "{line:?} in {head}");
        }
    }

    /// The fields of a head as (lowercase name, value), sorted.
    fn field_set(head: &[u8]) -> Vec<(String, String)> {
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut slots);
        assert!(parsed.parse(head).unwrap().is_complete());
        let mut fields: Vec<(String, String)> = parsed
            .headers
            .iter()
            .map(|field| {
                (
                    field.name.to_ascii_lowercase(),
                    String::from_utf8(field.value.to_vec()).unwrap(),
                )
            })
            .collect();
        fields.sort();
        fields
    }

    /// The map path (hyper's requests, routes with auth) and this one must
    /// send a backend the same fields, whatever the client sent.
    #[test]
    fn same_fields_upstream_as_through_a_header_map() {
        let extras = [
            "",
            "X-Forwarded-For: 203.0.113.9, 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2\r\n",
            "X-Forwarded-Proto: https\r\nX-Forwarded-Host: outer\r\nForwarded: for=1.2.3.4\r\n",
            "Connection: X-Forwarded-For, Sec-WebSocket-Protocol\r\nX-Forwarded-For: 1.1.1.1\r\n",
            "Sec-WebSocket-Protocol: a, b\r\nSec-WebSocket-Protocol: c\r\nTrailer: x\r\n",
            "X-Real-IP: 9.9.9.9\r\nProxy-Connection: keep-alive\r\nTransfer-Encoding: \r\n",
        ];
        let hops = [
            hop("192.0.2.7", false, "192.0.2.7", true),
            hop("10.0.0.3", true, "203.0.113.9", false),
            hop("::ffff:10.0.0.3", true, "10.0.0.3", false),
        ];
        for extra in extras {
            let text = UPGRADE.replace("Origin:", &format!("{extra}Origin:"));
            let Some(parsed) = request(&text) else {
                assert!(extra.contains("Transfer-Encoding"), "{extra:?} not parsed");
                continue;
            };
            for hop in &hops {
                for offer in [None, Some("b")] {
                    let mut direct = Vec::new();
                    let offer = offer.map(HeaderValue::from_static);
                    parsed.encode(hop, offer.as_ref(), &mut direct);

                    let mut parts = parsed.to_parts().unwrap();
                    headers::strip_hop_by_hop(&mut parts.headers, true);
                    forwarding::set_forwarding_headers(&mut parts.headers, hop);
                    if let Some(offer) = &offer {
                        parts.headers.insert(SEC_WEBSOCKET_PROTOCOL, offer.clone());
                    }
                    let mut mapped = Vec::new();
                    wire::encode_request_head(&parts, &mut mapped);
                    assert_eq!(
                        field_set(&direct),
                        field_set(&mapped),
                        "{extra:?} from {}",
                        hop.peer
                    );
                }
            }
        }
    }
}
