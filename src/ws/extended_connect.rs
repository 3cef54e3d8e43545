//! WebSockets over HTTP/2 (RFC 8441): an extended CONNECT with
//! `:protocol = websocket` becomes an HTTP/1.1 upgrade to the backend.
//!
//! The stream's request is rewritten into the upgrade an HTTP/1.1 client
//! would have sent (GET, `Upgrade`/`Connection`, a `Sec-WebSocket-Key` of
//! wsgate's own) and then goes through exactly the admission and exchange of
//! the HTTP/1.1 paths, so every check, refusal and metric is theirs. No
//! client checks the backend's `Sec-WebSocket-Accept` here, so wsgate does.
//! The backend's 101 becomes a 200 on the stream, and the stream and the
//! backend connection are spliced by the same tunnel.

use std::sync::Arc;
use std::time::Instant;

use http::header::{CONNECTION, ORIGIN, UPGRADE};
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::admit::{self, Candidate, Connection, RequestFacts};
use crate::body::{self, ProxyBody};
use crate::error::Rejection;
use crate::headers;
use crate::http::h2::{StreamGuard, refusal_response};
use crate::policy::SEC_WEBSOCKET_KEY;
use crate::stream::Prefixed;
use crate::ws::exchange::{Answer, Switched, exchange};
use crate::ws::upgrade::{TunnelPeer, encoded_head, run_tunnel};

const SEC_WEBSOCKET_ACCEPT: &str = "sec-websocket-accept";

/// Answers one extended CONNECT: a 200 and a tunnel, the backend's own
/// refusal, or wsgate's.
pub(crate) async fn serve(
    request: Request<Incoming>,
    conn: Arc<Connection>,
    in_use: StreamGuard,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let (mut parts, _empty_body) = request.into_parts();
    let origin = parts.headers.get(ORIGIN).cloned();
    let mut facts = RequestFacts::new(&parts.uri, origin, &conn, true);
    let response = match switch(&mut parts, &conn, &mut facts, started, &in_use).await {
        Ok(response) => response,
        Err(rejection) => {
            admit::report_rejection(&conn.state, &facts, &rejection);
            refusal_response(rejection)
        }
    };
    // A refusal's body keeps the stream in use while it is sent; a tunnel
    // holds a use of its own.
    response.map(|body| in_use.held_by(body))
}

async fn switch(
    parts: &mut http::request::Parts,
    conn: &Arc<Connection>,
    facts: &mut RequestFacts,
    started: Instant,
    in_use: &StreamGuard,
) -> Result<Response<ProxyBody>, Rejection> {
    // Resolves once hyper has sent our 200 on the stream.
    let client_upgrade = parts
        .extensions
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or(Rejection::BadHandshake {
            detail: "the stream cannot be upgraded",
        })?;
    let key = as_http11_upgrade(parts);
    let route_index = admit::admit(conn, Candidate::Parts(parts), facts).await?;
    let route = &conn.state.routes[route_index];
    let affinity = route
        .upstream
        .affinity(&parts.headers, parts.uri.query(), facts.client_ip);
    let expected_accept = derive_accept_key(key.as_bytes());
    let answer = exchange(
        &encoded_head(parts),
        &parts.headers,
        route,
        started,
        &affinity,
        conn.tls,
        Some(&expected_accept),
    )
    .await?;
    let Switched {
        head,
        early,
        stream,
    } = match answer {
        Answer::Switched(switched) => switched,
        Answer::Refused(refusal) => return Ok(refusal.into_response()),
    };
    let switched = head
        .into_response(())
        .map_err(|error| Rejection::UpstreamProtocol {
            detail: format!("the backend's 101 could not be re-read: {error}"),
        })?;
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::OK;
    // The backend's fields (subprotocol, extensions, cookies) travel on;
    // what only made sense for its HTTP/1.1 switch does not.
    *response.headers_mut() = switched.into_parts().0.headers;
    headers::strip_hop_by_hop(response.headers_mut(), false);
    response.headers_mut().remove(SEC_WEBSOCKET_ACCEPT);
    response.headers_mut().remove(http::header::CONTENT_LENGTH);

    let peer = TunnelPeer {
        client_ip: facts.client_ip,
        origin: parts.headers.get(ORIGIN).cloned(),
    };
    let slot = facts.slot.take();
    let in_use = in_use.another();
    let conn = conn.clone();
    conn.tunnels.clone().spawn(async move {
        let _slot = slot;
        let _in_use = in_use;
        let mut client = match client_upgrade.await {
            Ok(upgraded) => TokioIo::new(upgraded),
            Err(error) => {
                tracing::debug!(%error, "the HTTP/2 stream ended before its 200 was sent");
                return;
            }
        };
        let mut upstream = Prefixed::new(early, stream);
        run_tunnel(&mut client, &mut upstream, route_index, &conn, &peer).await;
    });
    Ok(response)
}

/// Rewrites an extended CONNECT into the HTTP/1.1 upgrade request that
/// admission and the backend expect, and returns the key it carries. The
/// fields that mean the same on both (`Origin`, `Sec-WebSocket-Version`,
/// `-Protocol`, `-Extensions`) stay as the client sent them.
pub(crate) fn as_http11_upgrade(parts: &mut http::request::Parts) -> String {
    parts.method = Method::GET;
    parts.version = Version::HTTP_11;
    parts.extensions.remove::<hyper::ext::Protocol>();
    let key = generate_key();
    let fields = &mut parts.headers;
    fields.insert(UPGRADE, HeaderValue::from_static("websocket"));
    fields.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(value) = HeaderValue::from_str(&key) {
        fields.insert(SEC_WEBSOCKET_KEY, value);
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_extended_connect_becomes_a_get_upgrade_with_a_fresh_key() {
        let request = Request::builder()
            .method(Method::CONNECT)
            .version(Version::HTTP_2)
            .uri("https://app.example/chat")
            .header("sec-websocket-version", "13")
            .header("origin", "https://app.example")
            .body(())
            .unwrap();
        let (mut parts, ()) = request.into_parts();
        let key = as_http11_upgrade(&mut parts);
        assert_eq!(parts.method, Method::GET);
        assert_eq!(parts.version, Version::HTTP_11);
        assert_eq!(parts.headers[UPGRADE], "websocket");
        assert_eq!(parts.headers[CONNECTION], "Upgrade");
        assert_eq!(parts.headers[SEC_WEBSOCKET_KEY], key.as_str());
        assert_eq!(parts.headers["origin"], "https://app.example");
        assert_eq!(parts.headers["sec-websocket-version"], "13");
        let again = as_http11_upgrade(&mut parts);
        assert_ne!(key, again, "every stream gets a key of its own");
    }
}
