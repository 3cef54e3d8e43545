//! Origin allowlists.
//!
//! RFC 6454 §4-§5: an origin is the triple (scheme, host, port); scheme and host
//! compare case-insensitively and an omitted port means the scheme's default.
//! Browsers serialise it as `scheme://host[:port]` with no path, userinfo or
//! trailing slash, so anything else in an `Origin` header is not an origin we
//! can allow — it fails closed.

use std::fmt;

/// A parsed, normalised origin: lower-case scheme and host, explicit port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub scheme: String,
    pub host: String,
    pub port: u16,
}

/// One entry of a route's `origins` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginPattern {
    Exact(Origin),
    /// `scheme://*.domain[:port]`: one or more labels in front of `domain`.
    Subdomains {
        scheme: String,
        domain: String,
        port: u16,
    },
    /// A bare `"*"`, only accepted with `allow_any_origin = true`.
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginError {
    NotAnOrigin(&'static str),
}

impl fmt::Display for OriginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OriginError::NotAnOrigin(why) => f.write_str(why),
        }
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

fn is_scheme(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// A DNS name or IPv4 literal as browsers serialise it: ASCII (IDNs arrive as
/// punycode), no empty label — which also rules out a trailing dot, since
/// `example.com.` is a different origin from `example.com`.
fn is_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn is_ipv6_literal(host: &str) -> bool {
    host.strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .is_some_and(|inner| inner.parse::<std::net::Ipv6Addr>().is_ok())
}

/// Splits `scheme://authority` and normalises it; `allow_wildcard` lets the host
/// start with `*.` (for patterns).
fn split_origin(text: &str) -> Result<(String, String, u16), OriginError> {
    let (scheme, rest) = text
        .split_once("://")
        .ok_or(OriginError::NotAnOrigin("expected scheme://host[:port]"))?;
    if !is_scheme(scheme) {
        return Err(OriginError::NotAnOrigin("the scheme is not valid"));
    }
    let scheme = scheme.to_ascii_lowercase();
    if rest.contains('@') {
        return Err(OriginError::NotAnOrigin("an origin has no userinfo"));
    }
    if rest.contains(['/', '?', '#']) {
        return Err(OriginError::NotAnOrigin(
            "an origin has no path, query or trailing slash",
        ));
    }
    let (host, port) = match rest.rfind(':') {
        // A colon inside brackets belongs to an IPv6 literal, not to a port.
        Some(colon) if !rest[colon..].contains(']') => {
            let port_text = &rest[colon + 1..];
            if port_text.is_empty() || !port_text.bytes().all(|b| b.is_ascii_digit()) {
                return Err(OriginError::NotAnOrigin("the port is not a number"));
            }
            let port = port_text
                .parse::<u16>()
                .map_err(|_| OriginError::NotAnOrigin("the port is out of range"))?;
            (&rest[..colon], port)
        }
        _ => {
            let port = default_port(&scheme).ok_or(OriginError::NotAnOrigin(
                "a scheme without a default port needs an explicit port",
            ))?;
            (rest, port)
        }
    };
    Ok((scheme, host.to_ascii_lowercase(), port))
}

impl Origin {
    /// Parses one serialised origin as found in an `Origin` header.
    pub fn parse(text: &str) -> Result<Origin, OriginError> {
        let (scheme, host, port) = split_origin(text)?;
        if !(is_host_name(&host) || is_ipv6_literal(&host)) {
            return Err(OriginError::NotAnOrigin("the host is not a valid name"));
        }
        Ok(Origin { scheme, host, port })
    }
}

impl OriginPattern {
    /// Parses a config entry; `check` reports the error with its key path.
    pub fn parse(text: &str) -> Result<OriginPattern, OriginError> {
        if text == "*" {
            return Ok(OriginPattern::Any);
        }
        let (scheme, host, port) = split_origin(text)?;
        if let Some(domain) = host.strip_prefix("*.") {
            if !is_host_name(domain) {
                return Err(OriginError::NotAnOrigin(
                    "the domain after `*.` is not a valid name",
                ));
            }
            return Ok(OriginPattern::Subdomains {
                scheme,
                domain: domain.to_owned(),
                port,
            });
        }
        if host.contains('*') {
            return Err(OriginError::NotAnOrigin(
                "a wildcard is only allowed as the whole first label: scheme://*.domain",
            ));
        }
        if !(is_host_name(&host) || is_ipv6_literal(&host)) {
            return Err(OriginError::NotAnOrigin("the host is not a valid name"));
        }
        Ok(OriginPattern::Exact(Origin { scheme, host, port }))
    }

    pub fn matches(&self, origin: &Origin) -> bool {
        match self {
            OriginPattern::Any => true,
            OriginPattern::Exact(allowed) => allowed == origin,
            OriginPattern::Subdomains {
                scheme,
                domain,
                port,
            } => {
                *scheme == origin.scheme
                    && *port == origin.port
                    && origin
                        .host
                        .strip_suffix(domain.as_str())
                        .and_then(|front| front.strip_suffix('.'))
                        .is_some_and(|labels| !labels.is_empty())
            }
        }
    }
}

/// Whether the raw `Origin` header value is allowed by `patterns`.
///
/// A value that is not a single serialised origin (including `null`, which
/// opaque origins such as sandboxed iframes and `file:` pages send) is only
/// allowed by `*`.
pub fn is_allowed(patterns: &[OriginPattern], header_value: &str) -> bool {
    if patterns.contains(&OriginPattern::Any) {
        return true;
    }
    match Origin::parse(header_value) {
        Ok(origin) => patterns.iter().any(|pattern| pattern.matches(&origin)),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns(list: &[&str]) -> Vec<OriginPattern> {
        list.iter()
            .map(|text| OriginPattern::parse(text).unwrap())
            .collect()
    }

    #[test]
    fn exact_origin_compares_scheme_host_and_port() {
        let allow = patterns(&["https://app.example.com"]);
        assert!(is_allowed(&allow, "https://app.example.com"));
        assert!(is_allowed(&allow, "HTTPS://APP.Example.COM"));
        assert!(is_allowed(&allow, "https://app.example.com:443"));
        assert!(!is_allowed(&allow, "http://app.example.com"));
        assert!(!is_allowed(&allow, "https://app.example.com:8443"));
        assert!(!is_allowed(&allow, "https://app.example.com."));
        assert!(!is_allowed(&allow, "https://app.example.com/"));
        assert!(!is_allowed(&allow, "https://app.example.com.evil.com"));
        assert!(!is_allowed(&allow, "https://evilapp.example.com"));
        assert!(!is_allowed(&allow, "https://app.example.com@evil.com"));
        assert!(!is_allowed(&allow, "https://evil.com@app.example.com"));
        assert!(!is_allowed(&allow, "null"));
        assert!(!is_allowed(&allow, ""));
        assert!(!is_allowed(
            &allow,
            "https://app.example.com https://evil.com"
        ));
    }

    #[test]
    fn explicit_port_in_pattern_must_match() {
        let allow = patterns(&["http://localhost:5173"]);
        assert!(is_allowed(&allow, "http://localhost:5173"));
        assert!(!is_allowed(&allow, "http://localhost"));
        assert!(!is_allowed(&allow, "http://localhost:51730"));
    }

    #[test]
    fn subdomain_wildcard_needs_at_least_one_label() {
        let allow = patterns(&["https://*.example.com"]);
        assert!(is_allowed(&allow, "https://a.example.com"));
        assert!(is_allowed(&allow, "https://a.b.example.com"));
        assert!(is_allowed(&allow, "https://A.Example.com:443"));
        assert!(!is_allowed(&allow, "https://example.com"));
        assert!(!is_allowed(&allow, "https://xexample.com"));
        assert!(!is_allowed(&allow, "https://.example.com"));
        assert!(!is_allowed(&allow, "https://a.example.com.evil.com"));
        assert!(!is_allowed(&allow, "http://a.example.com"));
        assert!(!is_allowed(&allow, "https://a.example.com:444"));
        assert!(!is_allowed(&allow, "https://a.example.com."));
    }

    #[test]
    fn ipv6_literals_are_origins() {
        let allow = patterns(&["http://[::1]:8080"]);
        assert!(is_allowed(&allow, "http://[::1]:8080"));
        assert!(!is_allowed(&allow, "http://[::1]"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for text in [
            "app.example.com",
            "https://app.example.com/",
            "https://app.*.com",
            "https://*example.com",
            "https://user@app.example.com",
            "https://app.example.com:99999",
            "custom://app.example.com",
        ] {
            assert!(OriginPattern::parse(text).is_err(), "{text} was accepted");
        }
        assert_eq!(OriginPattern::parse("*"), Ok(OriginPattern::Any));
    }

    #[test]
    fn any_allows_even_null() {
        assert!(is_allowed(&patterns(&["*"]), "null"));
    }
}
