//! What a request says about which server should serve it: the upstream's
//! `hash_key` (for `balance = "hash"`) and its `sticky_cookie`, and the
//! `Set-Cookie` that makes a client sticky.
//!
//! Both are read from the request as the backend receives it (after
//! admission, with its forwarding and identity headers), so every path —
//! hyper's, the direct upgrade, plain HTTP — reads the same thing; a hash
//! on a header that `forward_claims` sets hashes the verified claim.
//!
//! A sticky cookie's value is the server's identity: 16 hex digits of
//! XXH3-64 of its `host:port` as configured ([`super::balance::server_id`]).
//! Every wsgate with that server in its list reads it the same way, and
//! reordering the list remaps nothing, as an index would. It names a server
//! and nothing else, so it need not be secret: any value names at most a
//! server the client could be sent to anyway.

use std::net::IpAddr;

use http::header::COOKIE;
use http::{HeaderName, HeaderValue};

use super::Upstream;
use super::balance::key_hash;
use crate::config::{Balance, HashKey};
use crate::headers::Fields;

/// Where a request would like to go.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Affinity {
    /// The server a valid sticky cookie names.
    pub(super) sticky: Option<usize>,
    /// The hash of the request's `hash_key`, under `balance = "hash"`;
    /// without one the upstream balances by least connections.
    pub(super) key: Option<u64>,
}

/// A `sticky_cookie`: its name and each server's `Set-Cookie` values.
pub(super) struct Sticky {
    name: String,
    ids: Vec<u64>,
    plain: Vec<HeaderValue>,
    /// With `Secure`, for TLS listeners.
    secure: Vec<HeaderValue>,
}

impl Sticky {
    pub(super) fn new(name: &str, ids: &[u64]) -> Sticky {
        let line = |id: &u64, secure: &str| {
            // A token name (checked by config validation) and hex digits
            // are always a valid field value; an impossible failure would
            // only mean no cookie is set.
            HeaderValue::try_from(format!(
                "{name}={id:016x}; Path=/; HttpOnly; SameSite=Lax{secure}"
            ))
            .unwrap_or_else(|_| HeaderValue::from_static(""))
        };
        Sticky {
            name: name.to_owned(),
            ids: ids.to_vec(),
            plain: ids.iter().map(|id| line(id, "")).collect(),
            secure: ids.iter().map(|id| line(id, "; Secure")).collect(),
        }
    }

    /// The server `value` names, if it is one of ours.
    fn server(&self, value: &[u8]) -> Option<usize> {
        if value.len() != 16 || !value.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let id = u64::from_str_radix(std::str::from_utf8(value).ok()?, 16).ok()?;
        self.ids.iter().position(|&known| known == id)
    }
}

impl Upstream {
    /// Whether [`Upstream::affinity`] reads the request's fields or query
    /// at all; the direct upgrade path parses its outgoing head only then.
    pub(crate) fn reads_request(&self) -> bool {
        self.sticky.is_some()
            || (self.config.balance == Balance::Hash && self.config.hash_key != HashKey::ClientIp)
    }

    /// The affinity of a request with these `fields` and `query` from
    /// `client_ip` (the client IP admission determined).
    pub(crate) fn affinity<F: Fields + ?Sized>(
        &self,
        fields: &F,
        query: Option<&str>,
        client_ip: IpAddr,
    ) -> Affinity {
        let sticky = self.sticky.as_ref().and_then(|sticky| {
            cookie_value(fields, &sticky.name).and_then(|value| sticky.server(value))
        });
        let key = match (&self.config.balance, &self.config.hash_key) {
            (Balance::Hash, HashKey::ClientIp) => Some(match client_ip.to_canonical() {
                IpAddr::V4(ip) => key_hash(&ip.octets()),
                IpAddr::V6(ip) => key_hash(&ip.octets()),
            }),
            (Balance::Hash, HashKey::Cookie(name)) => cookie_value(fields, name).map(key_hash),
            (Balance::Hash, HashKey::Header(name)) => fields
                .first(name)
                .filter(|value| !value.is_empty())
                .map(key_hash),
            (Balance::Hash, HashKey::Query(name)) => query
                .and_then(|query| query_value(query, name))
                .map(key_hash),
            _ => None,
        };
        Affinity { sticky, key }
    }

    /// [`Upstream::affinity`] of a request head as written for the backend.
    pub(crate) fn affinity_of_head(&self, head: &[u8], client_ip: IpAddr) -> Affinity {
        if !self.reads_request() {
            return self.affinity(&NoFields, None, client_ip);
        }
        // Room for the client's fields (at most `MAX_HEADERS`) and the
        // forwarding and identity fields admission added.
        let mut slots = vec![httparse::EMPTY_HEADER; crate::wire::MAX_HEADERS + 32];
        let mut request = httparse::Request::new(&mut slots);
        match request.parse(head) {
            Ok(httparse::Status::Complete(_)) => {
                let query = request
                    .path
                    .and_then(|target| target.split_once('?'))
                    .map(|(_, query)| query);
                self.affinity(&Parsed(request.headers), query, client_ip)
            }
            // We wrote the head ourselves; should it not parse, the request
            // is balanced as one without a key.
            _ => self.affinity(&NoFields, None, client_ip),
        }
    }

    /// The `Set-Cookie` for a response from `served`: none without
    /// `sticky_cookie`, or when the request's cookie already named it.
    pub(crate) fn sticky_cookie(
        &self,
        affinity: &Affinity,
        served: usize,
        tls: bool,
    ) -> Option<HeaderValue> {
        let sticky = self.sticky.as_ref()?;
        if affinity.sticky == Some(served) {
            return None;
        }
        let lines = if tls { &sticky.secure } else { &sticky.plain };
        lines.get(served).cloned()
    }
}

/// A head's fields as httparse found them.
struct Parsed<'h, 'b>(&'h [httparse::Header<'b>]);

impl Fields for Parsed<'_, '_> {
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.0
            .iter()
            .filter(move |field| field.name.eq_ignore_ascii_case(name.as_str()))
            .map(|field| field.value)
    }
}

struct NoFields;

impl Fields for NoFields {
    fn values<'a>(&'a self, _: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
        std::iter::empty()
    }
}

/// The first non-empty value of cookie `name` (names are case-sensitive,
/// RFC 6265 §5.4) across every `Cookie` field: `name=value` pairs separated
/// by `;` (RFC 6265 §4.2.1), a quoted value unquoted.
pub(crate) fn cookie_value<'f, F: Fields + ?Sized>(fields: &'f F, name: &str) -> Option<&'f [u8]> {
    // A static, not the const: the values found borrow the name too.
    static COOKIE_FIELD: HeaderName = COOKIE;
    fields
        .values(&COOKIE_FIELD)
        .flat_map(|value| value.split(|&byte| byte == b';'))
        .filter_map(|pair| {
            let at = pair.iter().position(|&byte| byte == b'=')?;
            let (key, value) = (&pair[..at], &pair[at + 1..]);
            (key.trim_ascii() == name.as_bytes()).then(|| {
                let value = value.trim_ascii();
                value
                    .strip_prefix(b"\"")
                    .and_then(|inner| inner.strip_suffix(b"\""))
                    .unwrap_or(value)
            })
        })
        .find(|value| !value.is_empty())
}

/// The first non-empty value of query parameter `name`, as written: the
/// hash is of the bytes, so no decoding is needed to map alike.
pub(crate) fn query_value<'q>(query: &'q str, name: &str) -> Option<&'q [u8]> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, value)| *key == name && !value.is_empty())
        .map(|(_, value)| value.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::tests::map;

    #[test]
    fn cookie_is_found_among_others_and_in_any_cookie_field() {
        let fields = map(&[("cookie", "a=1; srv=\"abc\""), ("cookie", "b=2")]);
        assert_eq!(cookie_value(&fields, "srv"), Some(&b"abc"[..]));
        assert_eq!(cookie_value(&fields, "b"), Some(&b"2"[..]));
        assert_eq!(cookie_value(&fields, "B"), None);
        assert_eq!(cookie_value(&map(&[("cookie", "srv=")]), "srv"), None);
        assert_eq!(cookie_value(&map(&[("cookie", "srvx=1")]), "srv"), None);
    }

    #[test]
    fn query_parameter_is_matched_by_whole_name() {
        assert_eq!(query_value("a=1&user=u7&b", "user"), Some(&b"u7"[..]));
        assert_eq!(query_value("username=u7", "user"), None);
        assert_eq!(query_value("user=&user=u8", "user"), Some(&b"u8"[..]));
        assert_eq!(query_value("user", "user"), None);
    }

    #[test]
    fn sticky_value_names_a_server_by_its_identity() {
        let ids = [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210];
        let sticky = Sticky::new("srv", &ids);
        assert_eq!(sticky.server(b"fedcba9876543210"), Some(1));
        assert_eq!(sticky.server(b"FEDCBA9876543210"), Some(1));
        assert_eq!(sticky.server(b"0000000000000000"), None);
        assert_eq!(sticky.server(b"1"), None);
        assert_eq!(sticky.server(b"+edcba9876543210"), None);
        assert_eq!(
            sticky.plain[0],
            "srv=0123456789abcdef; Path=/; HttpOnly; SameSite=Lax"
        );
        assert_eq!(
            sticky.secure[1],
            "srv=fedcba9876543210; Path=/; HttpOnly; SameSite=Lax; Secure"
        );
    }
}
