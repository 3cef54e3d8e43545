//! The per-request pipeline: route → policy → forwarding headers → upstream →
//! (upgrade hand-off to [`crate::upgrade`] | streamed plain response).
//!
//! [`admit`] is the pipeline every request goes through, whichever way it
//! came in; [`report_rejection`] logs and counts a refused request (a
//! connection refused before any request, [`crate::server`]'s own, and a
//! backend's refusal, counted where it is read, are the others). [`handle`] is
//! hyper's entry point.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{HOST, ORIGIN};
use http::{HeaderValue, Method, Request, Response, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::RouteConfig;
use crate::error::Rejection;
use crate::forwarding::{self, Hop};
use crate::headers::{self, Fields};
use crate::metrics::RouteMetrics;
use crate::policy;
use crate::router;
use crate::state::{Route, State};
use crate::upgrade;
use crate::upstream::ConnectError;

/// A response body's error: hyper's from an origin's body, ours from a
/// refusal streamed off a backend ([`crate::refusal`]).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

pub(crate) fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

pub(crate) fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Everything a request needs to know about the connection it came on.
pub struct Connection {
    /// The TCP peer, or the PROXY header's source.
    pub peer: SocketAddr,
    pub tls: bool,
    /// The config generation this connection was accepted under.
    pub state: Arc<State>,
    /// Tunnels are tracked so shutdown can wait for them, and cut them when
    /// `drain` is cancelled.
    pub tunnels: TaskTracker,
    pub drain: CancellationToken,
    /// Keeps this connection counted against `max_connections` while a tunnel
    /// outlives the HTTP connection that created it.
    pub(crate) _slot: crate::server::ConnectionSlot,
}

/// What the log line of a request says about it.
pub(crate) struct RequestFacts {
    /// Index into the state's routes once one matched.
    route: Option<usize>,
    pub(crate) client_ip: IpAddr,
    origin: Option<http::HeaderValue>,
    uri: Uri,
    upgrade: bool,
}

impl RequestFacts {
    fn origin_for_log(&self) -> std::borrow::Cow<'_, str> {
        match &self.origin {
            Some(origin) => String::from_utf8_lossy(origin.as_bytes()),
            None => "-".into(),
        }
    }

    /// Cheap reference-counted clones: only a rejection formats them.
    pub(crate) fn new(
        uri: &Uri,
        origin: Option<HeaderValue>,
        conn: &Connection,
        upgrade: bool,
    ) -> Self {
        RequestFacts {
            route: None,
            client_ip: conn.peer.ip().to_canonical(),
            origin,
            uri: uri.clone(),
            upgrade,
        }
    }
}

/// hyper's service entry point; never fails, every problem is a response.
pub async fn handle(
    request: Request<Incoming>,
    conn: Arc<Connection>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let upgrade =
        request.version() == Version::HTTP_11 && headers::is_websocket_upgrade(request.headers());
    let (parts, body) = request.into_parts();
    let origin = parts.headers.get(ORIGIN).cloned();
    let mut facts = RequestFacts::new(&parts.uri, origin, &conn, upgrade);
    let result = handle_inner(parts, body, &conn, &mut facts, started).await;
    let response = match result {
        Ok(response) => response,
        Err(rejection) => {
            report_rejection(&conn.state, &facts, &rejection);
            rejection.into_response().map(full)
        }
    };
    if !upgrade {
        metrics_for(&conn.state, &facts).http_status(response.status().as_u16());
    }
    Ok(response)
}

fn metrics_for<'s>(state: &'s State, facts: &RequestFacts) -> &'s RouteMetrics {
    route_metrics(state, matched_route(state, facts))
}

fn matched_route<'s>(state: &'s State, facts: &RequestFacts) -> Option<&'s Route> {
    facts.route.and_then(|index| state.routes.get(index))
}

fn route_metrics<'s>(state: &'s State, route: Option<&'s Route>) -> &'s RouteMetrics {
    route.map_or(&state.unrouted_metrics, |route| &route.metrics)
}

/// The one log line and the counters of a refused request.
pub(crate) fn report_rejection(state: &State, facts: &RequestFacts, rejection: &Rejection) {
    let route = matched_route(state, facts);
    tracing::info!(
        route = route.map(|route| route.config.name.as_str()).unwrap_or("-"),
        client_ip = %facts.client_ip,
        origin = %facts.origin_for_log(),
        path = %redacted_path(&facts.uri),
        status = rejection.status().as_u16(),
        reason = rejection.reason(),
        detail = %rejection.detail(),
        "request rejected"
    );
    let metrics = route_metrics(state, route);
    metrics.rejection(rejection.reason());
    if facts.upgrade {
        match rejection {
            Rejection::UpstreamUnavailable { .. }
            | Rejection::UpstreamTimeout { .. }
            | Rejection::UpstreamProtocol { .. } => metrics.upstream_error.inc(),
            _ => metrics.rejected.inc(),
        };
    }
}

/// Query values can carry tokens, so only the parameter names are logged.
fn redacted_path(uri: &Uri) -> String {
    match uri.query() {
        None => uri.path().to_owned(),
        Some(query) => {
            let names: Vec<&str> = query
                .split('&')
                .map(|pair| pair.split_once('=').map(|(name, _)| name).unwrap_or(pair))
                .collect();
            format!(
                "{}?{}",
                uri.path(),
                names
                    .iter()
                    .map(|name| format!("{name}=…"))
                    .collect::<Vec<_>>()
                    .join("&")
            )
        }
    }
}

/// RFC 9112 §3.2.2: an absolute-form target's authority wins over `Host`.
fn request_host<F: Fields + ?Sized>(uri: &Uri, fields: &F) -> String {
    let raw = uri
        .authority()
        .map(|authority| authority.as_str())
        .or_else(|| fields.first(&HOST).and_then(headers::visible_ascii))
        .unwrap_or_default();
    router::normalise_request_host(raw)
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

async fn handle_inner(
    mut parts: http::request::Parts,
    body: Incoming,
    conn: &Arc<Connection>,
    facts: &mut RequestFacts,
    started: Instant,
) -> Result<Response<ProxyBody>, Rejection> {
    // A connection's first head was bounded as it was read (`head.rs`); a
    // later one on a keep-alive connection only by hyper's larger buffer.
    let limit = conn.state.server.max_header_bytes;
    if head_size(&parts) > limit {
        return Err(Rejection::HeaderTooLarge { limit });
    }
    let route = admit(&mut parts, conn, facts).await?;
    if facts.upgrade {
        upgrade::through_hyper(parts, conn, route, facts.client_ip, started).await
    } else {
        forward_plain(parts, body, &conn.state.routes[route]).await
    }
}

/// Everything a request goes through before it may go upstream, in the
/// contract's order: route, IP, shape, origin, token, scope, subprotocol.
/// On success `parts` is the request as the backend should see it, and the
/// matched route's index (in `conn.state.routes`) is returned.
pub(crate) async fn admit(
    parts: &mut http::request::Parts,
    conn: &Connection,
    facts: &mut RequestFacts,
) -> Result<usize, Rejection> {
    let (index, hop) = admit_head(conn, &parts.uri, &parts.method, &parts.headers, facts)?;
    finish_admission(parts, &conn.state.routes[index], &hop, facts.upgrade).await?;
    Ok(index)
}

/// The checks before a request's head is rewritten: route, IP, shape,
/// origin. Returns the matched route's index and the hop its forwarding
/// headers will describe; `facts` learns the route and the client's IP.
pub(crate) fn admit_head<F: Fields + ?Sized>(
    conn: &Connection,
    uri: &Uri,
    method: &Method,
    fields: &F,
    facts: &mut RequestFacts,
) -> Result<(usize, Hop), Rejection> {
    let state = &conn.state;
    let host = request_host(uri, fields);
    let index = router::route(
        state.routes.iter().map(|route| &*route.config),
        &host,
        uri.path(),
    )
    .ok_or_else(|| Rejection::NoRoute {
        host: host.clone(),
        path: uri.path().to_owned(),
    })?;
    let route = &state.routes[index];
    facts.route = Some(index);

    let peer = conn.peer.ip().to_canonical();
    let trusted = &state.server.trusted_proxies;
    let peer_trusted = headers::is_trusted(peer, trusted);
    facts.client_ip = headers::client_ip(peer, fields, trusted);
    let config: &RouteConfig = &route.config;

    policy::check_ip(config, facts.client_ip)?;
    policy::check_shape(config, method, fields, facts.upgrade)?;
    if facts.upgrade {
        if let Some(would_reject) = policy::check_origin(config, fields)? {
            route.metrics.origin_reports.inc();
            tracing::warn!(
                route = %config.name,
                client_ip = %facts.client_ip,
                origin = %facts.origin_for_log(),
                reason = would_reject.reason(),
                detail = %would_reject.detail(),
                "origin would be rejected; let through by origin_mode = \"report\""
            );
        }
    }
    let hop = Hop {
        peer,
        peer_trusted,
        client_ip: facts.client_ip,
        tls: conn.tls,
    };
    Ok((index, hop))
}

/// The rest of [`admit`] on a head in a `HeaderMap`: the rewrite, then token,
/// scope and subprotocol.
pub(crate) async fn finish_admission(
    parts: &mut http::request::Parts,
    route: &Route,
    hop: &Hop,
    upgrade: bool,
) -> Result<(), Rejection> {
    let config: &RouteConfig = &route.config;
    // Rewritten before the auth check: a forward-auth service must judge the
    // forwarding headers we vouch for, never ones an untrusted client forged.
    rewrite_request_head(parts, hop, upgrade);
    let grant = match &config.auth {
        Some(auth) => Some(auth.check(parts).await?),
        None => None,
    };
    let narrowed_offer = if upgrade {
        policy::check_subprotocols(config, &parts.headers)?
    } else {
        None
    };
    if let Some(auth) = &config.auth {
        // Identity headers are ours to set: a client's own copy is a forgery.
        auth.strip_spoofable(&mut parts.headers);
    }
    if let Some(grant) = grant {
        grant.apply(parts);
    }
    if let Some(offer) = narrowed_offer {
        parts.headers.insert(policy::SEC_WEBSOCKET_PROTOCOL, offer);
    }
    Ok(())
}

/// The request as the backend should see it: hop-by-hop headers gone,
/// forwarding headers set, origin-form target, HTTP/1.1.
fn rewrite_request_head(parts: &mut http::request::Parts, hop: &Hop, websocket_upgrade: bool) {
    headers::strip_hop_by_hop(&mut parts.headers, websocket_upgrade);
    forwarding::set_forwarding_headers(&mut parts.headers, hop);
    if parts.uri.authority().is_some() {
        let origin_form = parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/");
        if let Ok(uri) = origin_form.parse() {
            parts.uri = uri;
        }
    }
    parts.version = Version::HTTP_11;
}

pub(crate) fn connect_rejection(error: &ConnectError) -> Rejection {
    if error.is_timeout() {
        Rejection::UpstreamTimeout {
            detail: error.to_string(),
        }
    } else {
        Rejection::UpstreamUnavailable {
            detail: error.to_string(),
        }
    }
}

async fn forward_plain(
    mut parts: http::request::Parts,
    body: Incoming,
    route: &Route,
) -> Result<Response<ProxyBody>, Rejection> {
    // The pooled client wants an absolute URI; its connector ignores the
    // authority and asks the upstream's balancer instead.
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    parts.uri = format!("http://upstream.invalid{path_and_query}")
        .parse()
        .map_err(|_| Rejection::BadHandshake {
            detail: "the request target is not valid",
        })?;
    let upstream = &route.upstream;
    let timeout = route.config.handshake_timeout;
    let name = &upstream.config.name;
    let response = match tokio::time::timeout(
        timeout,
        upstream
            .http_client()
            .request(Request::from_parts(parts, body)),
    )
    .await
    {
        Err(_) => {
            return Err(Rejection::UpstreamTimeout {
                detail: format!("upstream {name:?} did not answer within {timeout:?}"),
            });
        }
        Ok(Err(error)) => {
            let connect_error = std::error::Error::source(&error)
                .and_then(|source| source.downcast_ref::<ConnectError>());
            return Err(match connect_error {
                Some(connect_error) => connect_rejection(connect_error),
                None => Rejection::UpstreamUnavailable {
                    detail: format!("upstream {name:?} failed: {error}"),
                },
            });
        }
        Ok(Ok(response)) => response,
    };
    let (mut head, body) = response.into_parts();
    headers::strip_hop_by_hop(&mut head.headers, false);
    Ok(Response::from_parts(
        head,
        body.map_err(BoxError::from).boxed(),
    ))
}
