//! hyper's side of a client connection: every request that is not a
//! connection's first-request upgrade. Plain requests are admitted and
//! forwarded with the upstream's pooled client ([`forward`]); an upgrade
//! that follows other requests on a keep-alive connection is admitted the
//! same way and answered by [`crate::ws::upgrade::through_hyper`].

mod access;
mod forward;
pub(crate) mod h2;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http::header::ORIGIN;
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;

use crate::admit::{self, Candidate, Connection, RequestFacts};
use crate::body::{self, ProxyBody};
use crate::error::Rejection;
use crate::headers;
use crate::stream::{ClientConn, Prefixed};
use crate::ws;

/// Serves requests with hyper until the connection ends: plain HTTP, and
/// upgrades that follow other requests on a keep-alive connection.
pub(crate) async fn serve(
    io: Prefixed<ClientConn>,
    connection: Arc<Connection>,
    stop_accepting: CancellationToken,
) {
    let server = &connection.state.server;
    let peer = connection.peer;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_timeout)
        // hyper refuses a head larger than its buffer with a bare 431 (no
        // reason). The first head of a connection is read by
        // `listen::first_head`; for later keep-alive heads, a buffer well
        // above the limit lets the proxy's own check answer instead. The
        // buffer grows only as bytes arrive, so the cap costs nothing for
        // ordinary requests.
        .max_buf_size((server.max_header_bytes * 4).max(64 * 1024))
        .max_headers(crate::wire::MAX_REQUEST_FIELDS)
        .preserve_header_case(true)
        .keep_alive(true);
    let for_service = connection.clone();
    let service = service_fn(move |request| handle(request, for_service.clone()));
    let serving = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(serving);
    let result = tokio::select! {
        result = serving.as_mut() => result,
        _ = stop_accepting.cancelled() => {
            serving.as_mut().graceful_shutdown();
            serving.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "client connection ended with an error");
    }
}

/// hyper's service entry point; never fails, every problem is a response.
async fn handle(
    request: Request<Incoming>,
    conn: Arc<Connection>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let upgrade =
        request.version() == Version::HTTP_11 && headers::is_websocket_upgrade(request.headers());
    let (parts, body) = request.into_parts();
    let method = parts.method.clone();
    let origin = parts.headers.get(ORIGIN).cloned();
    let mut facts = RequestFacts::new(&parts.uri, origin, &conn, upgrade);
    let response = match handle_inner(parts, body, &conn, &mut facts, started).await {
        Ok(response) => response,
        Err(rejection) => {
            admit::report_rejection(&conn.state, &facts, &rejection);
            rejection.into_response().map(body::full)
        }
    };
    if upgrade {
        return Ok(response);
    }
    let status = response.status().as_u16();
    facts.metrics(&conn.state).http_status(status);
    let line = access::AccessLine {
        route: facts.route_name(&conn.state).to_owned(),
        client_ip: facts.client_ip,
        method,
        path: facts.logged_path(),
        status,
        started,
    };
    Ok(response.map(|body| access::logged(body, line)))
}

async fn handle_inner(
    mut parts: http::request::Parts,
    body: Incoming,
    conn: &Arc<Connection>,
    facts: &mut RequestFacts,
    started: Instant,
) -> Result<Response<ProxyBody>, Rejection> {
    // A connection's first head was bounded as it was read; a later one on
    // a keep-alive connection only by hyper's larger buffer.
    let limit = conn.state.server.max_header_bytes;
    if head_size(&parts) > limit {
        return Err(Rejection::HeaderTooLarge { limit });
    }
    let route = admit::admit(conn, Candidate::Parts(&mut parts), facts).await?;
    if facts.upgrade {
        let slot = facts.slot.take();
        ws::upgrade::through_hyper(parts, conn, route, facts.client_ip, slot, started).await
    } else {
        let route = &conn.state.routes[route];
        forward::forward_plain(parts, body, route, facts.client_ip, conn.tls).await
    }
}

/// Size of the request head as it was on the wire, give or take whitespace
/// hyper normalised away.
fn head_size(parts: &http::request::Parts) -> usize {
    let uri = &parts.uri;
    let target = uri.scheme_str().map_or(0, |scheme| scheme.len() + 3)
        + uri
            .authority()
            .map_or(0, |authority| authority.as_str().len())
        + uri.path_and_query().map_or(1, |pq| pq.as_str().len());
    // "METHOD SP target SP HTTP/1.1 CRLF"
    let request_line = parts.method.as_str().len() + target + 12;
    let fields: usize = parts
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    request_line + fields + 2
}
