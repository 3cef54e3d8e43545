//! HTTP/2 client connections (ALPN `h2` on a TLS listener). Every stream is
//! a request of its own: plain ones go through the same service as
//! HTTP/1.1 ([`super::handle`]), extended CONNECTs for `websocket` (RFC 8441)
//! to [`crate::ws::extended_connect`]. Backends still speak HTTP/1.1, so a
//! request's fields are first put the way an HTTP/1.1 backend expects them.

use std::convert::Infallible;
use std::sync::Arc;

use http::header::{COOKIE, HOST};
use http::{HeaderMap, HeaderValue, Method, Request, Response};
use hyper::body::Incoming;
use hyper::ext::Protocol;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;

use crate::admit::{self, Connection, RequestFacts};
use crate::body::{self, ProxyBody};
use crate::error::Rejection;
use crate::stream::ClientConn;
use crate::ws;

mod activity;

use activity::Activity;
pub(crate) use activity::StreamGuard;

/// Streams one connection may have open at once: WebSockets included, so
/// well above a page's parallel requests (nginx and Chromium use 100–128).
pub(crate) const MAX_CONCURRENT_STREAMS: u32 = 128;
/// What one stream may have in flight unread. A 1 MiB message still moves at
/// full speed on loopback and LAN round trips; the connection window below
/// caps what one client can make wsgate hold, whatever its stream count.
const STREAM_WINDOW: u32 = 256 * 1024;
const CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Bytes queued per stream toward the client before its writer waits.
const SEND_BUFFER: usize = 256 * 1024;
/// Streams a client may open and reset before wsgate answered them
/// (CVE-2023-44487, "rapid reset"); past it the connection gets GOAWAY
/// ENHANCE_YOUR_CALM.
const PENDING_ACCEPT_RESETS: usize = 20;
/// Streams wsgate may reset for a client's errors before it ends the
/// connection the same way.
const LOCAL_ERROR_RESETS: usize = 256;

/// Serves an HTTP/2 connection until the client closes it or, on shutdown,
/// until a GOAWAY's open streams have ended.
pub(crate) async fn serve(
    io: ClientConn,
    connection: Arc<Connection>,
    stop_accepting: CancellationToken,
) {
    let server = &connection.state.server;
    let peer = connection.peer;
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        // HPACK-decoded size: the same bound as an HTTP/1.1 head, which also
        // bounds a CONTINUATION flood (h2 ends it with ENHANCE_YOUR_CALM).
        .max_header_list_size(u32::try_from(server.max_header_bytes).unwrap_or(u32::MAX))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buf_size(SEND_BUFFER)
        .max_pending_accept_reset_streams(PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(LOCAL_ERROR_RESETS);
    let activity = Activity::default();
    let for_service = (connection.clone(), activity.clone());
    let service = service_fn(move |request| {
        let (connection, activity) = for_service.clone();
        handle(request, connection, activity.begin())
    });
    let serving = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(serving);
    let result = tokio::select! {
        result = serving.as_mut() => result,
        _ = stop_accepting.cancelled() => {
            // GOAWAY (NO_ERROR) naming the streams already open: they go on,
            // each WebSocket until its drain Close, and the client opens new
            // ones elsewhere.
            serving.as_mut().graceful_shutdown();
            serving.await
        }
        () = activity.idle_for(server.header_timeout) => {
            // As hyper closes an HTTP/1.1 keep-alive connection that sends no
            // next head within `header_timeout`. The GOAWAY tells the client
            // to open a new connection next time; one that reads nothing
            // cannot hold the connection open by leaving it unsent.
            tracing::debug!(%peer, timeout = ?server.header_timeout, "HTTP/2 connection idle; closing");
            serving.as_mut().graceful_shutdown();
            match tokio::time::timeout(server.header_timeout, serving).await {
                Ok(result) => result,
                Err(_) => Ok(()),
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "HTTP/2 client connection ended with an error");
    }
}

async fn handle(
    mut request: Request<Incoming>,
    conn: Arc<Connection>,
    in_use: StreamGuard,
) -> Result<Response<ProxyBody>, Infallible> {
    as_http11_fields(request.uri().clone(), request.headers_mut());
    if request.method() != Method::CONNECT {
        let response = super::handle(request, conn).await;
        return Ok(response?.map(|body| in_use.held_by(body)));
    }
    let websocket = request
        .extensions()
        .get::<Protocol>()
        .is_some_and(|protocol| protocol.as_str().eq_ignore_ascii_case("websocket"));
    if websocket {
        return Ok(ws::extended_connect::serve(request, conn, in_use).await);
    }
    // A plain CONNECT would make wsgate a forward proxy, and another
    // `:protocol` is nothing a WebSocket backend could serve.
    let rejection = Rejection::BadRequest {
        detail: "CONNECT is served only for :protocol websocket (RFC 8441)",
    };
    let facts = RequestFacts::new(request.uri(), None, &conn, false);
    admit::report_rejection(&conn.state, &facts, &rejection);
    Ok(refusal_response(rejection))
}

/// A refusal as an HTTP/2 response: the same status, reason and body as on
/// HTTP/1.1, without the connection-specific fields HTTP/2 forbids (RFC 9113
/// §8.2.2), `Upgrade` of a 426 among them.
pub(crate) fn refusal_response(rejection: Rejection) -> Response<ProxyBody> {
    let mut response = rejection.into_response();
    crate::headers::strip_hop_by_hop(response.headers_mut(), false);
    response.map(body::full)
}

/// The fields of an HTTP/2 request as an HTTP/1.1 backend needs them:
/// `Host` from `:authority` (RFC 9113 §8.3.1: it wins over any `Host`), and
/// the crumbs of `Cookie` that HTTP/2 lets clients split joined into one
/// field again (§8.2.3).
pub(crate) fn as_http11_fields(uri: http::Uri, fields: &mut HeaderMap) {
    if let Some(authority) = uri.authority() {
        if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
            fields.insert(HOST, host);
        }
    }
    if fields.get_all(COOKIE).iter().nth(1).is_some() {
        // An empty crumb holds no cookie: skipped, rather than leaving a
        // stray `; ` (found by the h2_glue fuzz target: an empty first
        // crumb lost its separator, later ones kept theirs).
        let mut joined = Vec::new();
        for crumb in fields.get_all(COOKIE).iter().filter(|c| !c.is_empty()) {
            if !joined.is_empty() {
                joined.extend_from_slice(b"; ");
            }
            joined.extend_from_slice(crumb.as_bytes());
        }
        if let Ok(joined) = HeaderValue::from_bytes(&joined) {
            fields.insert(COOKIE, joined);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_becomes_the_host_and_cookie_crumbs_are_joined() {
        let mut fields = HeaderMap::new();
        fields.insert(HOST, HeaderValue::from_static("forged.example"));
        fields.append(COOKIE, HeaderValue::from_static("a=1"));
        fields.append(COOKIE, HeaderValue::from_static("b=2"));
        as_http11_fields(
            "https://app.example:8443/chat".parse().unwrap(),
            &mut fields,
        );
        assert_eq!(
            fields.get_all(HOST).iter().collect::<Vec<_>>(),
            ["app.example:8443"]
        );
        assert_eq!(
            fields.get_all(COOKIE).iter().collect::<Vec<_>>(),
            ["a=1; b=2"]
        );
        // Empty crumbs hold no cookie, wherever they come.
        let mut fields = HeaderMap::new();
        for crumb in ["", "a=1", "", "b=2"] {
            fields.append(COOKIE, HeaderValue::from_static(crumb));
        }
        as_http11_fields("/".parse().unwrap(), &mut fields);
        assert_eq!(
            fields.get_all(COOKIE).iter().collect::<Vec<_>>(),
            ["a=1; b=2"]
        );
    }

    #[test]
    fn a_426_over_h2_keeps_status_and_reason_but_not_upgrade() {
        let response = refusal_response(Rejection::BadVersion {
            version: "8".to_owned(),
        });
        assert_eq!(response.status(), 426);
        assert_eq!(response.headers()["wsgate-reason"], "bad-version");
        assert!(response.headers().get(http::header::UPGRADE).is_none());
        assert!(response.headers().get(http::header::CONNECTION).is_none());
    }
}
