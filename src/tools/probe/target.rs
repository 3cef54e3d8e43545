//! What the probe aims at, taken from the URL: where to connect, what to
//! put in `Host` and the request line, and the origin a page served from
//! that host would send.

use std::fmt;

use anyhow::{Context as _, bail};
use http::Uri;

/// The endpoint as the probe's requests address it.
#[derive(Clone, Debug)]
pub(super) struct Target {
    /// The URL as given, for the report.
    pub url: String,
    pub secure: bool,
    /// Without the brackets an IPv6 literal has in a URL: what DNS and TLS want.
    pub host: String,
    pub port: u16,
    /// `host[:port]`, the port only when it is not the scheme's default, as
    /// browsers write `Host` and `Origin`.
    pub authority: String,
    pub path: String,
    pub query: Option<String>,
}

impl Target {
    pub fn parse(text: &str) -> anyhow::Result<Target> {
        let uri: Uri = text
            .parse()
            .with_context(|| format!("{text:?} is not a URL"))?;
        let secure = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => bail!("the URL must start with ws:// or wss://, got {text:?}"),
        };
        let Some(authority) = uri.authority() else {
            bail!("the URL {text:?} has no host");
        };
        if authority.as_str().contains('@') {
            bail!("the URL {text:?} carries user info; browsers send none with a WebSocket");
        }
        let written_host = authority.host();
        let host = written_host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            bail!("the URL {text:?} has no host");
        }
        let default_port = if secure { 443 } else { 80 };
        let port = authority.port_u16().unwrap_or(default_port);
        let authority = if port == default_port {
            written_host.to_ascii_lowercase()
        } else {
            format!("{}:{port}", written_host.to_ascii_lowercase())
        };
        let path = match uri.path() {
            "" => "/".to_owned(),
            path => path.to_owned(),
        };
        Ok(Target {
            url: text.to_owned(),
            secure,
            host,
            port,
            authority,
            path,
            query: uri.query().map(str::to_owned),
        })
    }

    /// What a page served from this host sends as `Origin`: `https://` for
    /// `wss://`, `http://` for `ws://` (RFC 6454 §6.1, default port omitted).
    pub fn own_origin(&self) -> String {
        let scheme = if self.secure { "https" } else { "http" };
        format!("{scheme}://{}", self.authority)
    }

    /// The request target, with `extra` (`name=value`, already encoded)
    /// appended to the query.
    pub fn request_target(&self, extra: Option<&str>) -> String {
        let query = match (&self.query, extra) {
            (Some(query), Some(extra)) if !query.is_empty() => format!("{query}&{extra}"),
            (_, Some(extra)) => extra.to_owned(),
            (Some(query), None) => query.clone(),
            (None, None) => return self.path.clone(),
        };
        format!("{}?{query}", self.path)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters, as
/// `encodeURIComponent` does for a token put in a query string — the
/// checklist's "JWTs need encoding" in code.
pub(super) fn query_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_origin_follows_the_scheme_and_drops_the_default_port() {
        let cases = [
            ("ws://example.com/chat", "http://example.com", "/chat"),
            ("ws://example.com:80/", "http://example.com", "/"),
            ("wss://Example.com:443", "https://example.com", "/"),
            (
                "wss://example.com:8443/a?b=c",
                "https://example.com:8443",
                "/a?b=c",
            ),
            ("ws://[::1]:9000/x", "http://[::1]:9000", "/x"),
        ];
        for (url, origin, request_target) in cases {
            let target = Target::parse(url).unwrap();
            assert_eq!(target.own_origin(), origin, "{url}");
            assert_eq!(target.request_target(None), request_target, "{url}");
        }
        assert_eq!(Target::parse("ws://[::1]:9000/").unwrap().host, "::1");
    }

    #[test]
    fn a_token_parameter_joins_the_existing_query() {
        let target = Target::parse("ws://h/ws?room=1").unwrap();
        assert_eq!(target.request_target(Some("token=t")), "/ws?room=1&token=t");
        let target = Target::parse("ws://h/ws").unwrap();
        assert_eq!(target.request_target(Some("token=t")), "/ws?token=t");
    }

    #[test]
    fn only_ws_urls_with_a_host_are_accepted() {
        for url in ["http://h/", "h/ws", "ws:///x", "ws://user:pw@h/"] {
            assert!(Target::parse(url).is_err(), "{url}");
        }
    }

    #[test]
    fn query_values_are_encoded_like_encode_uri_component() {
        assert_eq!(query_encode("a.b-c_d~e"), "a.b-c_d~e");
        assert_eq!(query_encode("a+b/c=="), "a%2Bb%2Fc%3D%3D");
    }
}
