//! Where a bearer token is found: the query parameter, then the cookie, then
//! `Authorization: Bearer` (the contract's order). Browsers cannot set headers
//! on a WebSocket handshake, which is why the first two exist at all.

use http::HeaderMap;
use http::request::Parts;

/// The configured places to look, besides the always-checked `Authorization`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Locations {
    pub query: Option<String>,
    pub cookie: Option<String>,
}

/// Which location a token came from; `strip_token` only concerns the query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Query,
    Cookie,
    Header,
}

impl Locations {
    /// The first non-empty token, in the contract's order.
    pub fn find(&self, parts: &Parts) -> Option<(String, Source)> {
        let from_query = self
            .query
            .as_deref()
            .and_then(|name| query_value(parts.uri.query().unwrap_or(""), name))
            .map(|token| (token, Source::Query));
        from_query
            .or_else(|| {
                let name = self.cookie.as_deref()?;
                cookie_value(&parts.headers, name).map(|token| (token, Source::Cookie))
            })
            .or_else(|| bearer(&parts.headers).map(|token| (token, Source::Header)))
    }

    /// For `TokenMissing`: e.g. `query parameter "token", cookie "session", Authorization header`.
    pub fn describe(&self) -> String {
        let mut places = Vec::new();
        if let Some(name) = &self.query {
            places.push(format!("query parameter {name:?}"));
        }
        if let Some(name) = &self.cookie {
            places.push(format!("cookie {name:?}"));
        }
        places.push("Authorization header".to_owned());
        places.join(", ")
    }
}

/// The first non-empty value of query parameter `name`, percent-decoded.
/// `+` is left alone: JWTs never contain it and decoding it would corrupt one.
fn query_value(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .filter(|(key, _)| percent_decode(key) == name)
        .map(|(_, value)| percent_decode(value))
        .find(|value| !value.is_empty())
}

/// RFC 6265 §4.2.1: `name=value` pairs separated by `; ` across every Cookie header.
fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(key, _)| key.trim() == name)
        .map(|(_, value)| value.trim().trim_matches('"').to_owned())
        .find(|value| !value.is_empty())
}

/// RFC 6750 §2.1; the auth scheme is case-insensitive (RFC 9110 §11.1).
fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::AUTHORIZATION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .filter_map(|value| value.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim().to_owned())
        .find(|token| !token.is_empty())
}

/// The query without any `name=…` parameter; every other parameter is kept
/// byte for byte and in order. `None` when nothing is left.
pub(crate) fn strip_query_param(query: &str, name: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let key = pair.split_once('=').map_or(*pair, |(key, _)| key);
            percent_decode(key) != name
        })
        .collect();
    let kept = kept.join("&");
    (!kept.is_empty()).then_some(kept)
}

/// Decodes `%XX` escapes; malformed escapes are kept as written.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escaped = (bytes[index] == b'%')
            .then(|| bytes.get(index + 1..index + 3))
            .flatten()
            // `from_str_radix` takes a sign, so `%+a` would decode to LF.
            .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                index += 3;
            }
            None => {
                out.push(bytes[index]);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `token` fuzz target: `=.bo%+a=Fk`.
    #[test]
    fn escape_with_a_sign_is_kept_as_written() {
        assert_eq!(
            query_value("t=.bo%+a=Fk", "t").as_deref(),
            Some(".bo%+a=Fk")
        );
        assert_eq!(query_value("%+at=1&%-1=2", "%+at").as_deref(), Some("1"));
        assert_eq!(percent_decode("%2B%+f%-0"), "+%+f%-0");
    }

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::builder().uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn everywhere() -> Locations {
        Locations {
            query: Some("token".into()),
            cookie: Some("session".into()),
        }
    }

    #[test]
    fn query_beats_cookie_beats_header() {
        let all = parts(
            "/ws?a=1&token=q",
            &[("cookie", "x=1; session=c"), ("authorization", "Bearer h")],
        );
        assert_eq!(everywhere().find(&all), Some(("q".into(), Source::Query)));
        let no_query = parts(
            "/ws?a=1",
            &[("cookie", "x=1; session=c"), ("authorization", "Bearer h")],
        );
        assert_eq!(
            everywhere().find(&no_query),
            Some(("c".into(), Source::Cookie))
        );
        let header_only = parts("/ws", &[("authorization", "bearer  h ")]);
        assert_eq!(
            everywhere().find(&header_only),
            Some(("h".into(), Source::Header))
        );
    }

    #[test]
    fn unconfigured_locations_are_not_consulted() {
        let request = parts("/ws?token=q", &[("cookie", "session=c")]);
        assert_eq!(Locations::default().find(&request), None);
    }

    #[test]
    fn empty_values_and_other_schemes_do_not_count() {
        let request = parts(
            "/ws?token=&token",
            &[("cookie", "session=\"\""), ("authorization", "Basic dTpw")],
        );
        assert_eq!(everywhere().find(&request), None);
        let later = parts("/ws?token=&token=two", &[]);
        assert_eq!(
            everywhere().find(&later),
            Some(("two".into(), Source::Query))
        );
    }

    #[test]
    fn values_are_percent_decoded_and_cookies_unquoted() {
        let request = parts("/ws?%74oken=a%2Eb", &[]);
        assert_eq!(
            everywhere().find(&request),
            Some(("a.b".into(), Source::Query))
        );
        let quoted = parts(
            "/ws",
            &[("cookie", "other=1"), ("cookie", "session=\"x.y\"")],
        );
        assert_eq!(
            everywhere().find(&quoted),
            Some(("x.y".into(), Source::Cookie))
        );
        assert_eq!(percent_decode("100%zz%4"), "100%zz%4");
    }

    #[test]
    fn describe_lists_the_places_in_order() {
        assert_eq!(
            everywhere().describe(),
            "query parameter \"token\", cookie \"session\", Authorization header"
        );
        assert_eq!(Locations::default().describe(), "Authorization header");
    }

    #[test]
    fn stripping_keeps_other_parameters_byte_for_byte() {
        assert_eq!(
            strip_query_param("a=%2F+1&token=x&b&token=y&c=", "token").as_deref(),
            Some("a=%2F+1&b&c=")
        );
        assert_eq!(strip_query_param("token=x", "token"), None);
        assert_eq!(
            strip_query_param("tokens=1", "token").as_deref(),
            Some("tokens=1")
        );
    }
}
