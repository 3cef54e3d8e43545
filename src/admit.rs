//! Admission: everything a request goes through before it may go upstream,
//! in the contract's order — route, client IP, request shape, origin, token,
//! scope, subprotocol — and the one place a refused request is logged and
//! counted ([`report_rejection`]).
//!
//! Both upgrade paths and plain HTTP call [`admit`]. A connection's first
//! upgrade request is still in its read buffer ([`UpgradeRequest`]): the
//! checks read its spans and the head is written upstream from them, with no
//! header map. A request in a map (hyper's, or a first upgrade on a route
//! with auth, whose checks edit fields by name) is rewritten in place.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::header::{HOST, ORIGIN};
use http::{HeaderValue, Method, Uri, Version};
use tokio_util::task::TaskTracker;

use crate::config::{OriginChecks, RouteConfig};
use crate::drain::Drain;
use crate::error::{Outcome, Rejection};
use crate::headers::forwarding::{self, Hop};
use crate::headers::{self, Fields};
use crate::limits::OpenSlot;
use crate::metrics::RouteMetrics;
use crate::policy;
use crate::router;
use crate::state::{Route, State};
use crate::wire;
use crate::wire::request::UpgradeRequest;

/// Holds one unit of `max_connections` until dropped.
pub(crate) struct ConnectionSlot(Arc<AtomicUsize>);

impl ConnectionSlot {
    /// Counts one more connection in `open`; returns the slot and the count
    /// with it.
    pub(crate) fn take(open: &Arc<AtomicUsize>) -> (ConnectionSlot, usize) {
        let count = open.fetch_add(1, Ordering::AcqRel) + 1;
        (ConnectionSlot(open.clone()), count)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Everything a request needs to know about the connection it came on.
pub(crate) struct Connection {
    /// The TCP peer, or the PROXY header's source.
    pub peer: SocketAddr,
    pub tls: bool,
    /// HTTP/1.1, or HTTP/2 when TLS chose ALPN `h2`: what every request and
    /// tunnel of this connection runs over.
    pub protocol: ClientProtocol,
    /// The config generation this connection was accepted under.
    pub state: Arc<State>,
    /// Tunnels are tracked so shutdown can wait for them; `drain` tells
    /// them when to close.
    pub tunnels: TaskTracker,
    pub drain: Arc<Drain>,
    /// Keeps this connection counted against `max_connections` while a tunnel
    /// outlives the HTTP connection that created it.
    pub _slot: ConnectionSlot,
}

/// What the client's request runs over: its own HTTP/1.1 connection, or a
/// stream of an HTTP/2 one (RFC 8441 for a WebSocket).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ClientProtocol {
    Http1,
    H2,
}

impl ClientProtocol {
    /// The `protocol` field of the log lines, as ALPN names it.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientProtocol::Http1 => "http/1.1",
            ClientProtocol::H2 => "h2",
        }
    }
}

/// What the log line of a request says about it.
pub(crate) struct RequestFacts {
    /// Index into the state's routes once one matched.
    route: Option<usize>,
    pub client_ip: IpAddr,
    origin: Option<HeaderValue>,
    uri: Uri,
    pub upgrade: bool,
    pub protocol: ClientProtocol,
    /// Counts the request (and the tunnel it becomes) against the route's
    /// `max_connections_per_ip` while held.
    pub slot: Option<OpenSlot>,
}

impl RequestFacts {
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
            protocol: conn.protocol,
            slot: None,
        }
    }

    fn origin_for_log(&self) -> std::borrow::Cow<'_, str> {
        match &self.origin {
            Some(origin) => String::from_utf8_lossy(origin.as_bytes()),
            None => "-".into(),
        }
    }

    /// The matched route's metrics, or the unrouted series.
    pub(crate) fn metrics<'s>(&self, state: &'s State) -> &'s RouteMetrics {
        route_metrics(state, self.matched_route(state))
    }

    /// The matched route's name, `-` for none.
    pub(crate) fn route_name<'s>(&self, state: &'s State) -> &'s str {
        self.matched_route(state)
            .map(|route| route.config.name.as_str())
            .unwrap_or("-")
    }

    pub(crate) fn logged_path(&self) -> String {
        redacted_path(&self.uri)
    }

    fn matched_route<'s>(&self, state: &'s State) -> Option<&'s Route> {
        self.route.and_then(|index| state.routes.get(index))
    }
}

fn route_metrics<'s>(state: &'s State, route: Option<&'s Route>) -> &'s RouteMetrics {
    route.map_or(&state.unrouted_metrics, |route| &route.metrics)
}

/// A request as admission sees it.
pub(crate) enum Candidate<'r> {
    /// A connection's first request, an upgrade, still in its read buffer;
    /// once admitted, the head to send upstream is written to `head`.
    Wire {
        request: &'r UpgradeRequest,
        head: &'r mut Vec<u8>,
    },
    /// A request in a header map, rewritten in place for the backend.
    Parts(&'r mut http::request::Parts),
}

/// Runs every check on `candidate` in the contract's order and, once it
/// passed, makes it the request the backend should see: hop-by-hop headers
/// gone, forwarding headers set, identity headers of auth applied, the
/// subprotocol offer narrowed. Returns the matched route's index (in the
/// state's routes); `facts` learns the route and client IP on the way, for
/// the log line of a refusal.
pub(crate) async fn admit(
    conn: &Connection,
    candidate: Candidate<'_>,
    facts: &mut RequestFacts,
) -> Result<usize, Rejection> {
    match candidate {
        Candidate::Wire { request, head } => {
            // Route, client IP, shape, origin: they only read the request.
            let (index, hop) = check_head(conn, &request.uri, &Method::GET, request, facts)?;
            let route = &conn.state.routes[index];
            // Without auth, token and scope have nothing to check, and the
            // head is written from the request's spans with no header map.
            if route.config.auth.is_none() {
                let offer = policy::check_subprotocols(&route.config.policy, &request.passed_on())?;
                request.encode(&hop, offer.as_ref(), head);
            } else {
                let mut parts = request.to_parts().ok_or(Rejection::BadHandshake {
                    detail: "a header field is not valid",
                })?;
                authorise(&mut parts, route, &hop, true).await?;
                wire::encode_request_head(&parts, head);
            }
            Ok(index)
        }
        Candidate::Parts(parts) => {
            let (index, hop) = check_head(conn, &parts.uri, &parts.method, &parts.headers, facts)?;
            authorise(parts, &conn.state.routes[index], &hop, facts.upgrade).await?;
            Ok(index)
        }
    }
}

/// The checks that only read the request: route, client IP, shape, origin.
/// Returns the matched route's index and the hop its forwarding headers
/// will describe.
fn check_head<F: Fields + ?Sized>(
    conn: &Connection,
    uri: &Uri,
    method: &Method,
    fields: &F,
    facts: &mut RequestFacts,
) -> Result<(usize, Hop), Rejection> {
    let state = &conn.state;
    // RFC 9112 §3.2: more than one Host is a 400; left through, the route
    // would match one Host and the backend might read the other.
    let host_field = HOST;
    if fields.values(&host_field).nth(1).is_some() {
        return Err(Rejection::BadRequest {
            detail: "more than one Host header",
        });
    }
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

    policy::check_ip(&config.policy, facts.client_ip)?;
    if let Some(limiter) = &route.limits {
        // Before the shape, origin and token: a flood costs a table lookup.
        let slot = limiter.open(facts.client_ip)?;
        if facts.upgrade {
            limiter.handshake(facts.client_ip)?;
        }
        facts.slot = slot;
    }
    policy::check_shape(&config.policy, method, fields, facts.upgrade)?;
    // A plain request without Origin passes even with origin_checks = "all":
    // browsers leave it out of same-origin GETs.
    let check_origin = facts.upgrade
        || (config.policy.origin_checks == OriginChecks::All && fields.first(&ORIGIN).is_some());
    if check_origin {
        if let Some(would_reject) = policy::check_origin(&config.policy, &config.name, fields)? {
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

/// The checks that edit the request, on a head in a map: the rewrite, then
/// token, scope and subprotocol.
async fn authorise(
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
        policy::check_subprotocols(&config.policy, &parts.headers)?
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

/// RFC 9112 §3.2.2: an absolute-form target's authority wins over `Host`.
fn request_host<F: Fields + ?Sized>(uri: &Uri, fields: &F) -> String {
    let raw = uri
        .authority()
        .map(|authority| authority.as_str())
        .or_else(|| fields.first(&HOST).and_then(headers::visible_ascii))
        .unwrap_or_default();
    router::normalise_request_host(raw)
}

/// The one log line and the counters of a refused request.
pub(crate) fn report_rejection(state: &State, facts: &RequestFacts, rejection: &Rejection) {
    let route = facts.matched_route(state);
    tracing::info!(
        route = route.map(|route| route.config.name.as_str()).unwrap_or("-"),
        client_ip = %facts.client_ip,
        origin = %facts.origin_for_log(),
        path = %redacted_path(&facts.uri),
        protocol = facts.protocol.as_str(),
        status = rejection.status().as_u16(),
        reason = rejection.reason(),
        detail = %rejection.detail(),
        "request rejected"
    );
    let metrics = route_metrics(state, route);
    metrics.rejection(rejection.reason());
    if facts.upgrade {
        match rejection.outcome() {
            Outcome::UpstreamError => metrics.upstream_error.inc(),
            Outcome::Rejected => metrics.rejected.inc(),
        };
    }
}

/// Logs and counts a refusal of a connection before any request was parsed
/// (no route, no client IP beyond the peer), under route "-".
pub(crate) fn report_unrouted(state: &State, peer: SocketAddr, rejection: &Rejection) {
    tracing::info!(
        %peer,
        status = rejection.status().as_u16(),
        reason = rejection.reason(),
        detail = %rejection.detail(),
        "request rejected"
    );
    state.unrouted_metrics.rejection(rejection.reason());
}

/// Query values can carry tokens, so only the parameter names are logged.
pub(crate) fn redacted_path(uri: &Uri) -> String {
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
