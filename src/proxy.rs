//! The per-request pipeline: route → policy → forwarding headers → upstream →
//! (upgrade hand-off to a tunnel | streamed plain response).
//!
//! [`handle`] is the one place where a [`Rejection`] becomes a response: the
//! inner functions return `Result`, and the outer one logs once, counts once
//! and builds the reply.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::future::{FusedFuture, FutureExt};
use http::header::{HOST, ORIGIN, UPGRADE};
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::RouteConfig;
use crate::error::Rejection;
use crate::headers::{self, Hop};
use crate::policy;
use crate::router;
use crate::state::{Route, State};
use crate::tunnel;
use crate::upgraded::{ClientIo, UpstreamIo};
use crate::upstream::{ConnectError, Upstream};

pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn empty() -> ProxyBody {
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
    pub slot: Arc<dyn Send + Sync>,
}

/// What the log line of a request says about it.
struct RequestFacts {
    /// Index into the state's routes once one matched.
    route: Option<usize>,
    client_ip: IpAddr,
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
}

/// hyper's service entry point; never fails, every problem is a response.
pub async fn handle(
    request: Request<Incoming>,
    conn: Arc<Connection>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let upgrade =
        request.version() == Version::HTTP_11 && headers::is_websocket_upgrade(request.headers());
    // Cheap reference-counted clones: only a rejection formats them.
    let mut facts = RequestFacts {
        route: None,
        client_ip: conn.peer.ip().to_canonical(),
        origin: request.headers().get(ORIGIN).cloned(),
        uri: request.uri().clone(),
        upgrade,
    };
    let result = handle_inner(request, &conn, &mut facts, started).await;
    let state = &conn.state;
    let route = facts.route.and_then(|index| state.routes.get(index));
    let metrics = route
        .map(|route| &route.metrics)
        .unwrap_or(&state.unrouted_metrics);
    let response = match result {
        Ok(response) => response,
        Err(rejection) => {
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
            metrics.rejection(rejection.reason());
            if upgrade {
                match rejection {
                    Rejection::UpstreamUnavailable { .. }
                    | Rejection::UpstreamTimeout { .. }
                    | Rejection::UpstreamProtocol { .. } => metrics.upstream_error.inc(),
                    _ => metrics.rejected.inc(),
                };
            }
            rejection.into_response().map(full)
        }
    };
    if !upgrade {
        metrics.http_status(response.status().as_u16());
    }
    Ok(response)
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
fn request_host(request: &Request<Incoming>) -> String {
    let raw = request
        .uri()
        .authority()
        .map(|authority| authority.as_str().to_owned())
        .or_else(|| {
            request
                .headers()
                .get(HOST)
                .and_then(|host| host.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    router::normalise_request_host(&raw)
}

/// Size of the request head as it was on the wire, give or take whitespace
/// hyper normalised away.
fn head_size(request: &Request<Incoming>) -> usize {
    let uri = request.uri();
    let target = uri.scheme_str().map_or(0, |scheme| scheme.len() + 3)
        + uri
            .authority()
            .map_or(0, |authority| authority.as_str().len())
        + uri.path_and_query().map_or(1, |pq| pq.as_str().len());
    // "METHOD SP target SP HTTP/1.1 CRLF"
    let request_line = request.method().as_str().len() + target + 12;
    let fields: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    request_line + fields + 2
}

async fn handle_inner(
    request: Request<Incoming>,
    conn: &Arc<Connection>,
    facts: &mut RequestFacts,
    started: Instant,
) -> Result<Response<ProxyBody>, Rejection> {
    let state = &conn.state;
    let limit = state.server.max_header_bytes;
    if head_size(&request) > limit {
        return Err(Rejection::HeaderTooLarge { limit });
    }
    let host = request_host(&request);
    let index = router::route(
        state.routes.iter().map(|route| &*route.config),
        &host,
        request.uri().path(),
    )
    .ok_or_else(|| Rejection::NoRoute {
        host: host.clone(),
        path: request.uri().path().to_owned(),
    })?;
    let route = &state.routes[index];
    facts.route = Some(index);
    let (mut parts, body) = request.into_parts();

    let peer = conn.peer.ip().to_canonical();
    let trusted = &state.server.trusted_proxies;
    let peer_trusted = headers::is_trusted(peer, trusted);
    facts.client_ip = headers::client_ip(peer, &parts.headers, trusted);
    let config: &RouteConfig = &route.config;

    // The contract's order: IP, shape, origin, token, scope, subprotocol.
    policy::check_ip(config, facts.client_ip)?;
    policy::check_shape(config, &parts.method, &parts.headers, facts.upgrade)?;
    if facts.upgrade {
        if let Some(would_reject) = policy::check_origin(config, &parts.headers)? {
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
    // Rewritten before the auth check: a forward-auth service must judge the
    // forwarding headers we vouch for, never ones an untrusted client forged.
    rewrite_request_head(&mut parts, &hop, facts.upgrade);
    let grant = match &config.auth {
        Some(auth) => Some(auth.check(&parts).await?),
        None => None,
    };
    let narrowed_offer = if facts.upgrade {
        policy::check_subprotocols(config, &parts.headers)?
    } else {
        None
    };
    if let Some(auth) = &config.auth {
        // Identity headers are ours to set: a client's own copy is a forgery.
        auth.strip_spoofable(&mut parts.headers);
    }
    if let Some(grant) = grant {
        grant.apply(&mut parts);
    }
    if facts.upgrade {
        if let Some(offer) = narrowed_offer {
            parts.headers.insert(policy::SEC_WEBSOCKET_PROTOCOL, offer);
        }
        upgrade(parts, conn, route, facts.client_ip, started).await
    } else {
        forward_plain(parts, body, route).await
    }
}

/// The request as the backend should see it: hop-by-hop headers gone,
/// forwarding headers set, origin-form target, HTTP/1.1.
fn rewrite_request_head(parts: &mut http::request::Parts, hop: &Hop, websocket_upgrade: bool) {
    headers::strip_hop_by_hop(&mut parts.headers, websocket_upgrade);
    headers::set_forwarding_headers(&mut parts.headers, hop);
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

fn connect_rejection(error: &ConnectError) -> Rejection {
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

async fn upgrade(
    mut parts: http::request::Parts,
    conn: &Arc<Connection>,
    route: &Route,
    client_ip: IpAddr,
    started: Instant,
) -> Result<Response<ProxyBody>, Rejection> {
    // Claim the client side of the upgrade before the head goes upstream
    // (what `hyper::upgrade::on` does); it resolves once hyper has written our 101.
    let client_upgrade = parts
        .extensions
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or(Rejection::BadHandshake {
            detail: "the connection cannot be upgraded",
        })?;
    let forwarded_offer: HeaderMap = parts
        .headers
        .get_all(policy::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .map(|value| (policy::SEC_WEBSOCKET_PROTOCOL, value.clone()))
        .collect();

    let upstream: &Arc<Upstream> = &route.upstream;
    let stream = upstream
        .connect()
        .await
        .map_err(|error| connect_rejection(&error))?;
    let timeout = route.config.handshake_timeout;
    let upstream_name = &upstream.config.name;
    // The connection future is driven here and then by the tunnel task rather
    // than by a task of its own: one spawn less per handshake. It finishes by
    // handing the socket to the upgrade. Boxed so the tunnel task stays small.
    let mut connection = None;
    let exchange = async {
        let (mut sender, driver) = hyper::client::conn::http1::Builder::new()
            .preserve_header_case(true)
            .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await?;
        // Fused: it may finish (handing over the socket) in the very turn the
        // 101 is delivered, and must not be polled again after that.
        let driver = connection.insert(Box::pin(driver.with_upgrades().fuse()));
        let sent = sender.send_request(Request::from_parts(parts, Empty::new()));
        tokio::pin!(sent);
        loop {
            tokio::select! {
                biased;
                response = &mut sent => return response.map(|response| (response, sender)),
                // If the driver ends first, the request future reports why
                // (or, on an upgrade, is already answered).
                _ = driver.as_mut(), if !driver.is_terminated() => {}
            }
        }
    };
    let (mut response, sender) = match tokio::time::timeout(timeout, exchange).await {
        Err(_) => {
            return Err(Rejection::UpstreamTimeout {
                detail: format!(
                    "upstream {upstream_name:?} did not answer the upgrade within {timeout:?}"
                ),
            });
        }
        Ok(Err(error)) => {
            return Err(Rejection::UpstreamUnavailable {
                detail: format!("upstream {upstream_name:?} failed during the upgrade: {error}"),
            });
        }
        Ok(Ok(answer)) => answer,
    };
    let Some(connection) = connection else {
        return Err(Rejection::UpstreamUnavailable {
            detail: format!("upstream {upstream_name:?} connection was lost"),
        });
    };

    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The backend's own refusal is the answer the client should see; its
        // body still has to be read off the connection, so that needs a task.
        tokio::spawn(async move {
            let _sender = sender;
            if !connection.is_terminated() {
                let _ = connection.await;
            }
        });
        // The backend's own refusal is the answer the client should see.
        route.metrics.rejected.inc();
        let (mut head, body) = response.into_parts();
        headers::strip_hop_by_hop(&mut head.headers, false);
        return Ok(Response::from_parts(head, body.boxed()));
    }
    if !headers::list_tokens(response.headers(), &UPGRADE)
        .any(|token| token.eq_ignore_ascii_case("websocket"))
    {
        return Err(Rejection::UpstreamProtocol {
            detail: format!("upstream {upstream_name:?} answered 101 without Upgrade: websocket"),
        });
    }
    policy::check_selected_subprotocol(&forwarded_offer, response.headers())?;

    let upstream_upgrade = hyper::upgrade::on(&mut response);
    let metrics = route.metrics.clone();
    let idle_timeout = route.config.idle_timeout;
    let route_name = route.config.name.clone();
    let drain = conn.drain.clone();
    let keep_slot = conn.slot.clone();
    metrics.upgraded.inc();
    metrics
        .handshake_duration
        .observe(started.elapsed().as_secs_f64());
    conn.tunnels.spawn(async move {
        let _slot = keep_slot;
        let upstream_side = async move {
            // Completes once the 101 has been read and the socket handed over.
            if !connection.is_terminated() {
                let _ = connection.await;
            }
            drop(sender);
            upstream_upgrade.await
        };
        let (client_io, upstream_io) = match tokio::join!(client_upgrade, upstream_side) {
            (Ok(client_io), Ok(upstream_io)) => (client_io, upstream_io),
            (client, upstream) => {
                tracing::debug!(
                    client_ok = client.is_ok(),
                    upstream_ok = upstream.is_ok(),
                    "upgrade did not complete"
                );
                return;
            }
        };
        metrics.tunnels_active.inc();
        let outcome = tunnel::splice(
            ClientIo::from_upgraded(client_io),
            UpstreamIo::from_upgraded(upstream_io),
            idle_timeout,
            drain,
        )
        .await;
        metrics.tunnels_active.dec();
        metrics.tunnel_closed(&outcome);
        tracing::debug!(
            route = %route_name,
            %client_ip,
            cause = outcome.cause.as_str(),
            client_to_upstream = outcome.client_to_upstream,
            upstream_to_client = outcome.upstream_to_client,
            "tunnel closed"
        );
    });
    let (head, _) = response.into_parts();
    Ok(Response::from_parts(head, empty()))
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
    Ok(Response::from_parts(head, body.boxed()))
}
