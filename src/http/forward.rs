//! A plain request forwarded to the server the route's upstream picks for
//! it, on that server's keep-alive connections; its response streamed back
//! with hop-by-hop headers stripped and, when the client needs one, the
//! upstream's sticky cookie added.

use std::net::IpAddr;

use http::Response;
use http::header::SET_COOKIE;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::body::{BoxError, ProxyBody};
use crate::error::Rejection;
use crate::headers;
use crate::state::Route;
use crate::upstream::{ConnectError, SendError};

/// `client_ip` is the one admission determined (a `hash_key` may use it);
/// `tls`: the client came over TLS, so a sticky cookie is `Secure`.
pub(super) async fn forward_plain(
    parts: http::request::Parts,
    body: Incoming,
    route: &Route,
    client_ip: IpAddr,
    tls: bool,
) -> Result<Response<ProxyBody>, Rejection> {
    let upstream = &route.upstream;
    let affinity = upstream.affinity(&parts.headers, parts.uri.query(), client_ip);
    let timeout = route.config.handshake_timeout;
    let name = &upstream.config.name;
    let (response, server) =
        match tokio::time::timeout(timeout, upstream.send(parts, body, &affinity)).await {
            Err(_) => {
                return Err(Rejection::UpstreamTimeout {
                    detail: format!("upstream {name:?} did not answer within {timeout:?}"),
                });
            }
            Ok(Err(SendError::Connect(error))) => return Err(Rejection::from(&error)),
            Ok(Err(SendError::Target(_))) => {
                return Err(Rejection::BadRequest {
                    detail: "the request target is not valid",
                });
            }
            Ok(Err(SendError::Http(error))) => {
                let connect_error = std::error::Error::source(&error)
                    .and_then(|source| source.downcast_ref::<ConnectError>());
                return Err(match connect_error {
                    Some(connect_error) => Rejection::from(connect_error),
                    None => Rejection::UpstreamUnavailable {
                        detail: format!("upstream {name:?} failed: {error}"),
                    },
                });
            }
            Ok(Ok(answer)) => answer,
        };
    let (mut head, body) = response.into_parts();
    headers::strip_hop_by_hop(&mut head.headers, false);
    if let Some(cookie) = upstream.sticky_cookie(&affinity, server, tls) {
        // Appended: the backend's own cookies stay as they are.
        head.headers.append(SET_COOKIE, cookie);
    }
    Ok(Response::from_parts(
        head,
        body.map_err(BoxError::from).boxed(),
    ))
}
