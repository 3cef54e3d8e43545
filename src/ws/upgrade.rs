//! The WebSocket upgrade after admission: the exchange with the backend, the
//! answer to the client, and the tunnel.
//!
//! A connection whose first request is an upgrade (every browser WebSocket)
//! is served without hyper: [`serve_direct`] takes the head the server
//! already read and parsed, runs the same admission as every request, writes
//! the backend's 101 to the client and hands back a [`Tunnel`], which the
//! connection's own task then runs. An upgrade that arrives later on a
//! keep-alive connection came through hyper, and [`through_hyper`] answers
//! it with the same [`exchange`].

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::ORIGIN;
use http::{HeaderValue, Response};
use tokio::io::AsyncWriteExt;

use crate::admit::{self, Candidate, Connection, RequestFacts};
use crate::body::{self, ProxyBody};
use crate::error::Rejection;
use crate::limits::OpenSlot;
use crate::stream::{self, ClientConn, Prefixed};
use crate::upstream::UpstreamStream;
use crate::wire;
use crate::wire::request::UpgradeRequest;
use crate::ws::exchange::{Answer, Switched, exchange};
use crate::ws::tunnel;

/// The upstream side of a tunnel: the connection the upgrade was sent on,
/// with whatever the backend sent behind its 101 in front.
pub(crate) type UpstreamIo = Prefixed<UpstreamStream>;

/// A WebSocket the proxy has switched: what its tunnel needs, and nothing
/// of the handshake that made it.
pub(crate) struct Tunnel {
    client: Prefixed<ClientConn>,
    upstream: UpstreamIo,
    conn: Connection,
    route: usize,
    peer: TunnelPeer,
    /// Holds the client's `max_connections_per_ip` slot for the tunnel's life.
    _slot: Option<OpenSlot>,
}

/// Who is on the client's end, for the tunnel's log line.
pub(crate) struct TunnelPeer {
    pub client_ip: IpAddr,
    pub origin: Option<HeaderValue>,
}

impl Tunnel {
    pub async fn run(mut self) {
        run_tunnel(
            &mut self.client,
            &mut self.upstream,
            self.route,
            &self.conn,
            &self.peer,
        )
        .await;
    }
}

/// Serves a connection whose first request is a WebSocket upgrade up to the
/// switch: admission, the exchange with the backend, the 101 to the client.
/// Refusals close the connection, as browsers do after a failed WebSocket
/// handshake anyway.
pub(crate) async fn serve_direct(
    mut io: ClientConn,
    request: UpgradeRequest,
    conn: Connection,
) -> Option<Tunnel> {
    let started = Instant::now();
    let origin = request.shared_value(&ORIGIN);
    let mut facts = RequestFacts::new(&request.uri, origin.clone(), &conn, true);
    // A copy for the tunnel's life: the shared value would keep the whole
    // request buffer alive with it.
    let origin = origin.and_then(|value| HeaderValue::from_bytes(value.as_bytes()).ok());
    let mut head = Vec::new();
    let candidate = Candidate::Wire {
        request: &request,
        head: &mut head,
    };
    let answer = match admit::admit(&conn, candidate, &mut facts).await {
        // The backend's choice of subprotocol is checked against what the
        // client offered (and the route allows), whichever way it was admitted.
        Ok(index) => {
            let route = &conn.state.routes[index];
            // Hash key and sticky cookie as the backend will see them.
            let affinity = route.upstream.affinity_of_head(&head, facts.client_ip);
            exchange(
                &head,
                &request.passed_on(),
                route,
                started,
                &affinity,
                conn.tls,
                None,
            )
            .await
            .map(|answer| (index, answer))
        }
        Err(rejection) => Err(rejection),
    };
    let (route, switched) = match answer {
        Ok((route, Answer::Switched(switched))) => (route, switched),
        Ok((_, Answer::Refused(refusal))) => {
            // Boxed, as the reading of it was: a rare path's state would
            // otherwise enlarge every handshake's future.
            Box::pin(refusal.write_to(&mut io)).await;
            return None;
        }
        Err(rejection) => {
            admit::report_rejection(&conn.state, &facts, &rejection);
            wire::write_final_response(&mut io, &rejection.into_response()).await;
            return None;
        }
    };
    // The backend's 101 goes out as it came, byte for byte.
    let sent = async {
        io.write_all(&switched.head.raw).await?;
        io.flush().await
    };
    if let Err(error) = sent.await {
        tracing::debug!(peer = %conn.peer, %error, "client left before the 101 was written");
        return None;
    }
    Some(Tunnel {
        client: Prefixed::new(request.rest(), io),
        upstream: Prefixed::new(switched.early, switched.stream),
        conn,
        route,
        peer: TunnelPeer {
            client_ip: facts.client_ip,
            origin,
        },
        _slot: facts.slot.take(),
    })
}

pub(crate) fn encoded_head(parts: &http::request::Parts) -> Vec<u8> {
    let mut head = Vec::new();
    wire::encode_request_head(parts, &mut head);
    head
}

/// Answers an upgrade hyper parsed: the backend's 101 becomes hyper's
/// response, and the tunnel starts once hyper has written it.
pub(crate) async fn through_hyper(
    mut parts: http::request::Parts,
    conn: &Arc<Connection>,
    route_index: usize,
    client_ip: IpAddr,
    slot: Option<OpenSlot>,
    started: Instant,
) -> Result<Response<ProxyBody>, Rejection> {
    let route = &conn.state.routes[route_index];
    // Claimed before the head goes upstream (what `hyper::upgrade::on` does);
    // it resolves once hyper has written our 101.
    let client_upgrade = parts
        .extensions
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or(Rejection::BadHandshake {
            detail: "the connection cannot be upgraded",
        })?;
    let Switched {
        head,
        early,
        stream,
    } = match exchange(
        &encoded_head(&parts),
        &parts.headers,
        route,
        started,
        &route
            .upstream
            .affinity(&parts.headers, parts.uri.query(), client_ip),
        conn.tls,
        None,
    )
    .await?
    {
        Answer::Switched(switched) => switched,
        Answer::Refused(refusal) => return Ok(refusal.into_response()),
    };
    let peer = TunnelPeer {
        client_ip,
        origin: parts.headers.get(ORIGIN).cloned(),
    };
    let conn = conn.clone();
    conn.tunnels.clone().spawn(async move {
        let _slot = slot;
        let mut client = match client_upgrade.await {
            Ok(upgraded) => match stream::client_from_upgraded(upgraded) {
                Some(client) => client,
                None => return,
            },
            Err(error) => {
                tracing::debug!(%error, "client upgrade did not complete");
                return;
            }
        };
        let mut upstream = Prefixed::new(early, stream);
        run_tunnel(&mut client, &mut upstream, route_index, &conn, &peer).await;
    });
    head.into_response(body::empty())
        .map_err(|error| Rejection::UpstreamProtocol {
            detail: format!("the backend's 101 could not be re-read: {error}"),
        })
}

pub(crate) async fn run_tunnel<C>(
    client: &mut C,
    upstream: &mut UpstreamIo,
    route_index: usize,
    conn: &Connection,
    peer: &TunnelPeer,
) where
    C: tokio::io::AsyncRead + crate::stream::HoldForFin + Unpin,
{
    let TunnelPeer { client_ip, origin } = peer;
    let route = &conn.state.routes[route_index];
    let metrics = &route.metrics;
    metrics.tunnels_active.inc();
    let started = Instant::now();
    let open = conn.drain.open_tunnel();
    let outcome = tunnel::splice(client, upstream, &route.config.tunnel, &conn.drain).await;
    drop(open);
    metrics.tunnels_active.dec();
    metrics.bytes_to_upstream.inc_by(outcome.client_to_upstream);
    metrics.bytes_to_client.inc_by(outcome.upstream_to_client);
    metrics
        .messages_to_upstream
        .inc_by(outcome.messages_to_upstream);
    metrics
        .messages_to_client
        .inc_by(outcome.messages_to_client);
    // RFC 6455 §7.1.5: a Close without a code is 1005; none at all, 1006.
    let (from, code) = match outcome.close {
        Some((from, code)) => (from.as_str(), code.unwrap_or(1005)),
        None => ("none", 1006),
    };
    metrics.tunnel_closed(outcome.cause.as_str(), from, code);
    if let Some((side, violation)) = outcome.lost {
        metrics.frame_tracking_lost.inc();
        tracing::info!(
            route = %route.config.name,
            %client_ip,
            from = side.as_str(),
            ?violation,
            "bytes that are not WebSocket framing were passed on; frames no longer followed"
        );
    }
    tracing::info!(
        route = %route.config.name,
        %client_ip,
        origin = %origin_for_log(origin.as_ref()),
        protocol = conn.protocol.as_str(),
        cause = outcome.cause.as_str(),
        close_code = code,
        close_from = from,
        client_to_upstream = outcome.client_to_upstream,
        upstream_to_client = outcome.upstream_to_client,
        messages_to_upstream = outcome.messages_to_upstream,
        messages_to_client = outcome.messages_to_client,
        duration_ms = started.elapsed().as_millis() as u64,
        "tunnel closed"
    );
}

fn origin_for_log(origin: Option<&HeaderValue>) -> std::borrow::Cow<'_, str> {
    match origin {
        Some(origin) => String::from_utf8_lossy(origin.as_bytes()),
        None => "-".into(),
    }
}
