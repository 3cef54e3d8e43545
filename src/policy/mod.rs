//! Edge policy: each check is a pure function of the route and the request
//! head that either passes or returns the [`Rejection`] to send. The proxy
//! runs them in the contract's order: IP, request shape, origin, token, scope,
//! subprotocol — so a forbidden IP never learns whether its token was good.

pub mod auth;
pub mod origin;

use std::net::IpAddr;

use ipnet::IpNet;

use base64::Engine;
use http::{HeaderName, HeaderValue, Method};

use crate::error::Rejection;
use crate::headers::{Fields, list_tokens};

/// What admission checks on one route, besides the token
/// ([`auth::AuthPolicy`]): built by [`crate::config`] from the route's keys.
#[derive(Debug)]
pub struct RoutePolicy {
    pub websocket: WebSocketMode,
    /// Empty: no browser origin is allowed.
    pub origins: Vec<origin::OriginPattern>,
    pub missing_origin: MissingOrigin,
    pub origin_mode: OriginMode,
    pub origin_checks: OriginChecks,
    pub subprotocols: Option<Vec<String>>,
    pub allow_ips: Option<Vec<IpNet>>,
    pub deny_ips: Vec<IpNet>,
}

/// `websocket = "required" | "allowed" | "forbidden"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebSocketMode {
    Required,
    Allowed,
    Forbidden,
}

/// `missing_origin`: whether a handshake without `Origin` (not a browser)
/// may pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingOrigin {
    Reject,
    Allow,
}

/// `origin_mode`: refuse a bad origin, or let it through and report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginMode {
    Enforce,
    Report,
}

/// `origin_checks`: which requests the origin allowlist applies to.
/// Polling fallbacks (Socket.IO, SockJS) carry a WebSocket's traffic over
/// plain requests, so a forbidden page could talk over them unless they
/// are checked too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginChecks {
    Upgrades,
    All,
}

pub const SEC_WEBSOCKET_KEY: HeaderName = HeaderName::from_static("sec-websocket-key");
const SEC_WEBSOCKET_VERSION: HeaderName = HeaderName::from_static("sec-websocket-version");
pub use crate::headers::SEC_WEBSOCKET_PROTOCOL;

/// `allow_ips` (when set) must contain the client, and `deny_ips` must not.
/// IPv4-mapped IPv6 clients are compared as IPv4.
pub fn check_ip(route: &RoutePolicy, client: IpAddr) -> Result<(), Rejection> {
    let client = client.to_canonical();
    let allowed = route
        .allow_ips
        .as_ref()
        .is_none_or(|nets| nets.iter().any(|net| net.contains(&client)));
    if allowed && !route.deny_ips.iter().any(|net| net.contains(&client)) {
        Ok(())
    } else {
        Err(Rejection::IpForbidden { ip: client })
    }
}

/// `websocket = required | allowed | forbidden`, then RFC 6455 §4.2.1: a GET
/// with exactly one `Sec-WebSocket-Key` that decodes to 16 bytes and
/// `Sec-WebSocket-Version: 13`.
pub fn check_shape<F: Fields + ?Sized>(
    route: &RoutePolicy,
    method: &Method,
    fields: &F,
    upgrade: bool,
) -> Result<(), Rejection> {
    match (route.websocket, upgrade) {
        (WebSocketMode::Required, false) => return Err(Rejection::UpgradeRequired),
        (WebSocketMode::Forbidden, true) => return Err(Rejection::WebSocketForbidden),
        (_, false) => return Ok(()),
        (_, true) => {}
    }
    if method != Method::GET {
        return Err(Rejection::BadHandshake {
            detail: "the method must be GET",
        });
    }
    let (key_name, version_name) = (SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION);
    let mut keys = fields.values(&key_name);
    let key_is_valid = match (keys.next(), keys.next()) {
        (Some(key), None) => base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_ok_and(|nonce| nonce.len() == 16),
        _ => false,
    };
    if !key_is_valid {
        return Err(Rejection::BadHandshake {
            detail: "Sec-WebSocket-Key must be one base64 value of 16 bytes",
        });
    }
    let mut versions = fields.values(&version_name);
    match (versions.next(), versions.next()) {
        (None, _) => Err(Rejection::BadHandshake {
            detail: "Sec-WebSocket-Version is missing",
        }),
        // RFC 6455 §4.1: the client sends the header once; repeating it is a
        // malformed handshake, not an unsupported version.
        (Some(_), Some(_)) => Err(Rejection::BadHandshake {
            detail: "Sec-WebSocket-Version must appear once",
        }),
        (Some(b"13"), None) => Ok(()),
        (Some(version), None) => Err(Rejection::BadVersion {
            version: String::from_utf8_lossy(version).into_owned(),
        }),
    }
}

/// The origin decision. In report mode a would-be rejection is handed back as
/// `Ok(Some(..))` so the proxy can log and count it and carry on.
pub fn check_origin<F: Fields + ?Sized>(
    route: &RoutePolicy,
    route_name: &str,
    fields: &F,
) -> Result<Option<Rejection>, Rejection> {
    let verdict = origin_verdict(route, route_name, fields);
    match (verdict, route.origin_mode) {
        (Ok(()), _) => Ok(None),
        (Err(rejection), OriginMode::Report) => Ok(Some(rejection)),
        (Err(rejection), OriginMode::Enforce) => Err(rejection),
    }
}

fn origin_verdict<F: Fields + ?Sized>(
    route: &RoutePolicy,
    route_name: &str,
    fields: &F,
) -> Result<(), Rejection> {
    let mut values = fields.values(&http::header::ORIGIN);
    let value = match (values.next(), values.next()) {
        (None, _) => {
            return match route.missing_origin {
                MissingOrigin::Allow => Ok(()),
                MissingOrigin::Reject => Err(Rejection::OriginMissing),
            };
        }
        (Some(_), Some(_)) => {
            return Err(Rejection::OriginForbidden {
                detail: "the request carries more than one Origin header".to_owned(),
            });
        }
        (Some(value), None) => value,
    };
    let text = String::from_utf8_lossy(value);
    if origin::is_allowed(&route.origins, &text) {
        return Ok(());
    }
    let detail = if route.origins.is_empty() {
        format!(
            "origin {text:?} is not allowed: route {:?} lists no origins",
            route_name
        )
    } else {
        format!(
            "origin {text:?} is not in the allowlist of route {:?}",
            route_name
        )
    };
    Err(Rejection::OriginForbidden { detail })
}

/// With `subprotocols` set, the client must offer at least one of them; the
/// offer forwarded is narrowed to the allowed ones, in the client's order, so
/// the backend can only pick an allowed one. Returns the header value to
/// forward, or `None` to leave the request as it is.
pub fn check_subprotocols<F: Fields + ?Sized>(
    route: &RoutePolicy,
    fields: &F,
) -> Result<Option<HeaderValue>, Rejection> {
    let Some(allowed) = &route.subprotocols else {
        return Ok(None);
    };
    let name = SEC_WEBSOCKET_PROTOCOL;
    let offered: Vec<&str> = list_tokens(fields, &name).collect();
    let kept: Vec<&str> = offered
        .iter()
        .copied()
        .filter(|token| allowed.iter().any(|allowed| allowed == token))
        .collect();
    if kept.is_empty() {
        let offered = if offered.is_empty() {
            "none".to_owned()
        } else {
            offered.join(", ")
        };
        return Err(Rejection::SubprotocolForbidden { offered });
    }
    HeaderValue::from_str(&kept.join(", "))
        .map(Some)
        .map_err(|_| Rejection::BadHandshake {
            detail: "Sec-WebSocket-Protocol is not a token list",
        })
}

/// RFC 6455 §4.1: the client fails the connection if the server selects a
/// subprotocol it did not offer, so such a 101 is not passed on. `request` is
/// the client's offer; a route's `subprotocols` narrowed what the backend
/// saw of it, so the choice must be allowed too.
pub fn check_selected_subprotocol<F: Fields + ?Sized>(
    route: &RoutePolicy,
    request: &F,
    selected: &[bytes::Bytes],
) -> Result<(), Rejection> {
    let choice = match selected {
        [] => return Ok(()),
        [choice] => choice,
        _ => {
            return Err(Rejection::UpstreamProtocol {
                detail: "the backend selected more than one subprotocol".to_owned(),
            });
        }
    };
    let choice = std::str::from_utf8(choice).unwrap_or_default().trim();
    let allowed = route
        .subprotocols
        .as_ref()
        .is_none_or(|allowed| allowed.iter().any(|allowed| allowed == choice));
    if allowed && list_tokens(request, &SEC_WEBSOCKET_PROTOCOL).any(|offered| offered == choice) {
        Ok(())
    } else {
        Err(Rejection::UpstreamProtocol {
            detail: format!(
                "the backend selected subprotocol {choice:?}, which it was not offered"
            ),
        })
    }
}
