//! Why a request was refused, and the one exhaustive mapping from that to the
//! status, `wsgate-reason` code, headers and body the client sees.
//!
//! The match in [`Rejection::status`] has no catch-all arm on purpose: a new
//! variant cannot compile without a status being chosen for it.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

/// Who a refused handshake is blamed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Refused by policy or for the request's own fault.
    Rejected,
    /// The backend could not be reached, was too slow, or answered wrongly.
    UpstreamError,
}

/// A refusal the proxy answers itself. Details are for the person debugging and
/// never contain a secret (tokens are not echoed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    NoRoute {
        host: String,
        path: String,
    },
    IpForbidden {
        ip: std::net::IpAddr,
    },
    OriginForbidden {
        detail: String,
    },
    OriginMissing,
    TokenMissing {
        looked_in: String,
    },
    TokenInvalid {
        detail: String,
    },
    ScopeMissing {
        scope: String,
    },
    SubprotocolForbidden {
        offered: String,
    },
    BadHandshake {
        detail: &'static str,
    },
    /// A request that is not valid HTTP for a proxy to pass on (an invalid
    /// target, say): `bad-request`, as the contract names it.
    BadRequest {
        detail: &'static str,
    },
    BadVersion {
        version: String,
    },
    UpgradeRequired,
    WebSocketForbidden,
    HeaderTooLarge {
        limit: usize,
    },
    Overloaded,
    /// The client IP already has `limit` tunnels or requests open on the
    /// route.
    TooManyConnections {
        limit: usize,
    },
    /// The client IP's handshake bucket is empty; a token is free in
    /// `retry_after` whole seconds.
    RateLimited {
        retry_after: u64,
    },
    UpstreamUnavailable {
        detail: String,
    },
    UpstreamTimeout {
        detail: String,
    },
    UpstreamProtocol {
        detail: String,
    },
    /// The forward-auth service's own refusal, relayed with its status, body
    /// and the headers a client acts on (`WWW-Authenticate`, `Content-Type`, `Location`).
    AuthDenied {
        status: StatusCode,
        /// Boxed: rare, and it would make every `Result<_, Rejection>` large.
        headers: Box<http::HeaderMap>,
        body: Bytes,
    },
    AuthUnavailable {
        detail: String,
    },
}

impl Rejection {
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::NoRoute { .. } => StatusCode::NOT_FOUND,
            Rejection::IpForbidden { .. }
            | Rejection::OriginForbidden { .. }
            | Rejection::OriginMissing
            | Rejection::ScopeMissing { .. }
            | Rejection::WebSocketForbidden => StatusCode::FORBIDDEN,
            Rejection::TokenMissing { .. } | Rejection::TokenInvalid { .. } => {
                StatusCode::UNAUTHORIZED
            }
            Rejection::SubprotocolForbidden { .. }
            | Rejection::BadHandshake { .. }
            | Rejection::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Rejection::BadVersion { .. } | Rejection::UpgradeRequired => {
                StatusCode::UPGRADE_REQUIRED
            }
            Rejection::HeaderTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Rejection::TooManyConnections { .. } | Rejection::RateLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Rejection::Overloaded | Rejection::AuthUnavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Rejection::UpstreamUnavailable { .. } | Rejection::UpstreamProtocol { .. } => {
                StatusCode::BAD_GATEWAY
            }
            Rejection::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Rejection::AuthDenied { status, .. } => *status,
        }
    }

    /// The `wsgate-reason` code of the contract.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::NoRoute { .. } => "no-route",
            Rejection::IpForbidden { .. } => "ip-forbidden",
            Rejection::OriginForbidden { .. } => "origin-forbidden",
            Rejection::OriginMissing => "origin-missing",
            Rejection::TokenMissing { .. } => "token-missing",
            Rejection::TokenInvalid { .. } => "token-invalid",
            Rejection::ScopeMissing { .. } => "scope-missing",
            Rejection::SubprotocolForbidden { .. } => "subprotocol-forbidden",
            Rejection::BadHandshake { .. } => "bad-handshake",
            Rejection::BadRequest { .. } => "bad-request",
            Rejection::BadVersion { .. } => "bad-version",
            Rejection::UpgradeRequired => "upgrade-required",
            Rejection::WebSocketForbidden => "websocket-forbidden",
            Rejection::HeaderTooLarge { .. } => "header-too-large",
            Rejection::Overloaded => "overloaded",
            Rejection::TooManyConnections { .. } => "too-many-connections",
            Rejection::RateLimited { .. } => "rate-limited",
            Rejection::UpstreamUnavailable { .. } => "upstream-unavailable",
            Rejection::UpstreamTimeout { .. } => "upstream-timeout",
            Rejection::UpstreamProtocol { .. } => "upstream-protocol",
            Rejection::AuthDenied { .. } => "auth-denied",
            Rejection::AuthUnavailable { .. } => "auth-unavailable",
        }
    }

    /// Who failed, for `wsgate_handshakes_total`'s outcome: the backend (or
    /// the way to it), or the client's request. Exhaustive on purpose, like
    /// [`Rejection::status`].
    pub fn outcome(&self) -> Outcome {
        match self {
            Rejection::UpstreamUnavailable { .. }
            | Rejection::UpstreamTimeout { .. }
            | Rejection::UpstreamProtocol { .. } => Outcome::UpstreamError,
            Rejection::NoRoute { .. }
            | Rejection::IpForbidden { .. }
            | Rejection::OriginForbidden { .. }
            | Rejection::OriginMissing
            | Rejection::TokenMissing { .. }
            | Rejection::TokenInvalid { .. }
            | Rejection::ScopeMissing { .. }
            | Rejection::SubprotocolForbidden { .. }
            | Rejection::BadHandshake { .. }
            | Rejection::BadRequest { .. }
            | Rejection::BadVersion { .. }
            | Rejection::UpgradeRequired
            | Rejection::WebSocketForbidden
            | Rejection::HeaderTooLarge { .. }
            | Rejection::Overloaded
            | Rejection::TooManyConnections { .. }
            | Rejection::RateLimited { .. }
            | Rejection::AuthDenied { .. }
            | Rejection::AuthUnavailable { .. } => Outcome::Rejected,
        }
    }

    /// One sentence for the body and the log line.
    pub fn detail(&self) -> String {
        match self {
            Rejection::NoRoute { host, path } => {
                format!("no route matches host {host:?} and path {path:?}")
            }
            Rejection::IpForbidden { ip } => {
                format!("client address {ip} is not allowed on this route")
            }
            Rejection::OriginForbidden { detail } => detail.clone(),
            Rejection::OriginMissing => {
                "the request has no Origin header and this route requires one".to_owned()
            }
            Rejection::TokenMissing { looked_in } => {
                format!("no token found (looked in {looked_in})")
            }
            Rejection::TokenInvalid { detail } => format!("token rejected: {detail}"),
            Rejection::ScopeMissing { scope } => {
                format!("token lacks the required scope {scope:?}")
            }
            Rejection::SubprotocolForbidden { offered } => {
                format!("none of the offered subprotocols ({offered}) is allowed on this route")
            }
            Rejection::BadHandshake { detail } => {
                format!("not a valid WebSocket handshake: {detail}")
            }
            Rejection::BadRequest { detail } => format!("not a valid request: {detail}"),
            Rejection::BadVersion { version } => {
                format!("Sec-WebSocket-Version {version:?} is not supported; only 13 is")
            }
            Rejection::UpgradeRequired => "this route only accepts WebSocket upgrades".to_owned(),
            Rejection::WebSocketForbidden => {
                "this route does not accept WebSocket upgrades".to_owned()
            }
            Rejection::HeaderTooLarge { limit } => {
                format!("the request head is larger than {limit} bytes")
            }
            Rejection::Overloaded => "the proxy is at its connection limit".to_owned(),
            Rejection::TooManyConnections { limit } => {
                format!("this client already has {limit} connections open on this route")
            }
            Rejection::RateLimited { retry_after } => {
                format!("too many handshakes from this client; retry in {retry_after} s")
            }
            Rejection::UpstreamUnavailable { detail }
            | Rejection::UpstreamTimeout { detail }
            | Rejection::UpstreamProtocol { detail }
            | Rejection::AuthUnavailable { detail } => detail.clone(),
            Rejection::AuthDenied { status, .. } => format!("the auth service answered {status}"),
        }
    }

    /// Builds the response: plain-text body naming the reason, `wsgate-reason`,
    /// plus the headers each status needs (RFC 6750, RFC 6455 §4.4, RFC 9110 §15.5.22).
    pub fn into_response(self) -> Response<Bytes> {
        let status = self.status();
        let reason = self.reason();
        let body = match &self {
            Rejection::AuthDenied { body, .. } => body.clone(),
            _ => Bytes::from(format!(
                "{} {}: {}\nwsgate-reason: {}\n",
                status.as_u16(),
                status.canonical_reason().unwrap_or(""),
                self.detail(),
                reason
            )),
        };
        let mut response = Response::new(body);
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert("wsgate-reason", HeaderValue::from_static(reason));
        if !matches!(self, Rejection::AuthDenied { .. }) {
            headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
        }
        match self {
            Rejection::AuthDenied {
                headers: relayed, ..
            } => {
                for (name, value) in relayed.iter() {
                    headers.append(name, value.clone());
                }
            }
            Rejection::TokenMissing { .. } => {
                headers.insert(
                    http::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer"),
                );
            }
            Rejection::TokenInvalid { .. } => {
                headers.insert(
                    http::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            // Exactly the contract's value; the missing scope is named in the body.
            Rejection::ScopeMissing { .. } => {
                headers.insert(
                    http::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"insufficient_scope\""),
                );
            }
            Rejection::BadVersion { .. } => {
                headers.insert("sec-websocket-version", HeaderValue::from_static("13"));
            }
            Rejection::RateLimited { retry_after } => {
                headers.insert(http::header::RETRY_AFTER, HeaderValue::from(retry_after));
            }
            Rejection::UpgradeRequired => {
                headers.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
                headers.insert(
                    http::header::CONNECTION,
                    HeaderValue::from_static("Upgrade"),
                );
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rejection_names_its_reason_in_header_and_body() {
        let response = Rejection::OriginMissing.into_response();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(response.headers()["wsgate-reason"], "origin-missing");
        let body = String::from_utf8(response.body().to_vec()).unwrap();
        assert!(body.starts_with("403 Forbidden: "), "{body}");
        assert!(body.ends_with("wsgate-reason: origin-missing\n"), "{body}");
    }

    #[test]
    fn token_rejections_carry_rfc6750_challenges() {
        let missing = Rejection::TokenMissing {
            looked_in: "query".into(),
        }
        .into_response();
        assert_eq!(missing.headers()["www-authenticate"], "Bearer");
        let invalid = Rejection::TokenInvalid {
            detail: "expired".into(),
        }
        .into_response();
        assert_eq!(
            invalid.headers()["www-authenticate"],
            "Bearer error=\"invalid_token\""
        );
        let scope = Rejection::ScopeMissing {
            scope: "chat".into(),
        }
        .into_response();
        assert_eq!(scope.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            scope.headers()["www-authenticate"],
            "Bearer error=\"insufficient_scope\""
        );
    }

    #[test]
    fn auth_service_refusal_is_relayed_with_its_challenge_and_body() {
        let mut relayed = http::HeaderMap::new();
        relayed.insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Cookie realm=\"app\""),
        );
        relayed.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let response = Rejection::AuthDenied {
            status: StatusCode::UNAUTHORIZED,
            headers: Box::new(relayed),
            body: Bytes::from_static(b"{\"login\":\"/sso\"}"),
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()["wsgate-reason"], "auth-denied");
        assert_eq!(
            response.headers()["www-authenticate"],
            "Cookie realm=\"app\""
        );
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(response.body().as_ref(), b"{\"login\":\"/sso\"}");
    }
}
