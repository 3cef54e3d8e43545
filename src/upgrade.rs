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

use bytes::{Bytes, BytesMut};
use http::header::ORIGIN;
use http::{Method, Response};
use tokio::io::AsyncWriteExt;

use crate::error::Rejection;
use crate::head::Prefixed;
use crate::headers::{self, Fields};
use crate::policy;
use crate::proxy::{self, Connection, ProxyBody, RequestFacts};
use crate::refusal::{BodyDecoder, MAX_HELD_BODY, Refusal};
use crate::state::Route;
use crate::tunnel;
use crate::upgrade_request::UpgradeRequest;
use crate::upgraded::{self, ClientConn, UpstreamIo};
use crate::upstream::UpstreamStream;
use crate::wire::{self, AnswerError, AnswerHead, SwitchHead};

/// The backend's answer to a forwarded upgrade.
pub(crate) enum Answer {
    Switched(Switched),
    /// The backend's own refusal (already counted), hop-by-hop headers
    /// stripped. Boxed, so the common answer is not moved at its size.
    Refused(Box<Refusal<UpstreamStream>>),
}

/// A valid 101 and the connection it came on.
pub(crate) struct Switched {
    pub head: SwitchHead,
    /// Bytes the backend sent right behind its 101.
    pub early: Bytes,
    pub stream: UpstreamStream,
}

/// Sends the admitted request's `head` to the route's upstream and reads its
/// answer, within `handshake_timeout` after the connect. `offered` is what
/// the client asked for, to check the backend's choice of subprotocol
/// against. The answer is counted here: a switch with the handshake's
/// duration since `started`, a refusal as such.
pub(crate) async fn exchange<F: Fields + ?Sized>(
    head: &[u8],
    offered: &F,
    route: &Route,
    started: Instant,
) -> Result<Answer, Rejection> {
    let upstream = &route.upstream;
    let (mut stream, sent) = upstream
        .connect_sending(head)
        .await
        .map_err(|error| proxy::connect_rejection(&error))?;
    let name = &upstream.config.name;
    let timeout = route.config.handshake_timeout;
    // Pinned in place (in its own block, so the stream is free again after):
    // handing the future itself to `timeout` would copy it.
    let answered = {
        let talk = std::pin::pin!(async {
            stream.write_all(&head[sent..]).await?;
            stream.flush().await?;
            let mut buffer = BytesMut::with_capacity(1024);
            match wire::read_response_head(&mut stream, &mut buffer).await? {
                AnswerHead::Switch(head) => Ok(Ok((head, buffer.freeze()))),
                // Boxed: a refusal's body reader would otherwise enlarge the
                // future of every handshake.
                AnswerHead::Final(head) => {
                    Box::pin(async {
                        let mut body = BodyDecoder::new(&head, buffer)?;
                        let held = body.read_up_to(&mut stream, MAX_HELD_BODY).await?;
                        Ok::<_, AnswerError>(Err((head.into_response(held), body)))
                    })
                    .await
                }
            }
        });
        tokio::time::timeout(timeout, talk).await
    };
    let (head, early) = match answered {
        Err(_) => {
            return Err(Rejection::UpstreamTimeout {
                detail: format!("upstream {name:?} did not answer the upgrade within {timeout:?}"),
            });
        }
        Ok(Err(error @ AnswerError::TooLarge(..))) => {
            return Err(Rejection::UpstreamProtocol {
                detail: format!("upstream {name:?} answered the upgrade with {error}"),
            });
        }
        // Garbage is what a backend that is not (yet) an HTTP server sends: a
        // server down for the client's purposes, as the contract counts it.
        Ok(Err(error)) => {
            return Err(Rejection::UpstreamUnavailable {
                detail: format!("upstream {name:?} failed during the upgrade: {error}"),
            });
        }
        Ok(Ok(Ok(switch))) => switch,
        Ok(Ok(Err((mut response, decoder)))) => {
            headers::strip_hop_by_hop(response.headers_mut(), false);
            route.metrics.rejected.inc();
            let refusal = Refusal::new(response, decoder, stream, timeout);
            return Ok(Answer::Refused(Box::new(refusal)));
        }
    };
    if !head.upgrades_to_websocket {
        return Err(Rejection::UpstreamProtocol {
            detail: format!("upstream {name:?} answered 101 without Upgrade: websocket"),
        });
    }
    policy::check_selected_subprotocol(&route.config, offered, &head.selected_protocols)?;
    route.metrics.upgraded.inc();
    route
        .metrics
        .handshake_duration
        .observe(started.elapsed().as_secs_f64());
    Ok(Answer::Switched(Switched {
        head,
        early,
        stream,
    }))
}

/// A WebSocket the proxy has switched: what its tunnel needs, and nothing
/// of the handshake that made it.
pub(crate) struct Tunnel {
    client: Prefixed<ClientConn>,
    upstream: UpstreamIo,
    conn: Connection,
    route: usize,
    client_ip: IpAddr,
}

impl Tunnel {
    pub async fn run(mut self) {
        run_tunnel(
            &mut self.client,
            &mut self.upstream,
            self.route,
            &self.conn,
            self.client_ip,
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
    let mut facts = RequestFacts::new(&request.uri, origin, &conn, true);
    let answer = match admit_direct(&request, &conn, &mut facts).await {
        // The backend's choice of subprotocol is checked against what the
        // client offered (and the route allows), whichever way it was admitted.
        Ok((route, head)) => exchange(
            &head,
            &request.passed_on(),
            &conn.state.routes[route],
            started,
        )
        .await
        .map(|answer| (route, answer)),
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
            proxy::report_rejection(&conn.state, &facts, &rejection);
            wire::write_rejection(&mut io, rejection).await;
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
        client_ip: facts.client_ip,
    })
}

/// Admission of an upgrade read off the wire: the matched route's index and
/// the head to send it. Without auth, every step reads the request's spans
/// and the head is written from them; a route with auth takes the map path,
/// whose later steps read and edit fields by name.
async fn admit_direct(
    request: &UpgradeRequest,
    conn: &Connection,
    facts: &mut RequestFacts,
) -> Result<(usize, Vec<u8>), Rejection> {
    let (index, hop) = proxy::admit_head(conn, &request.uri, &Method::GET, request, facts)?;
    let route = &conn.state.routes[index];
    if route.config.auth.is_none() {
        let offer = policy::check_subprotocols(&route.config, &request.passed_on())?;
        let mut head = Vec::new();
        request.encode(&hop, offer.as_ref(), &mut head);
        return Ok((index, head));
    }
    let mut parts = request.to_parts().ok_or(Rejection::BadHandshake {
        detail: "a header field is not valid",
    })?;
    proxy::finish_admission(&mut parts, route, &hop, true).await?;
    Ok((index, encoded_head(&parts)))
}

fn encoded_head(parts: &http::request::Parts) -> Vec<u8> {
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
    } = match exchange(&encoded_head(&parts), &parts.headers, route, started).await? {
        Answer::Switched(switched) => switched,
        Answer::Refused(refusal) => return Ok(refusal.into_response()),
    };
    let conn = conn.clone();
    conn.tunnels.clone().spawn(async move {
        let mut client = match client_upgrade.await {
            Ok(upgraded) => match upgraded::client_from_upgraded(upgraded) {
                Some(client) => client,
                None => return,
            },
            Err(error) => {
                tracing::debug!(%error, "client upgrade did not complete");
                return;
            }
        };
        let mut upstream = Prefixed::new(early, stream);
        run_tunnel(&mut client, &mut upstream, route_index, &conn, client_ip).await;
    });
    head.into_response(proxy::empty())
        .map_err(|error| Rejection::UpstreamProtocol {
            detail: format!("the backend's 101 could not be re-read: {error}"),
        })
}

async fn run_tunnel(
    client: &mut Prefixed<ClientConn>,
    upstream: &mut UpstreamIo,
    route_index: usize,
    conn: &Connection,
    client_ip: IpAddr,
) {
    let route = &conn.state.routes[route_index];
    let metrics = &route.metrics;
    metrics.tunnels_active.inc();
    let outcome = tunnel::splice(
        client,
        upstream,
        route.config.idle_timeout,
        conn.drain.clone(),
    )
    .await;
    metrics.tunnels_active.dec();
    metrics.tunnel_closed(&outcome);
    tracing::debug!(
        route = %route.config.name,
        %client_ip,
        cause = outcome.cause.as_str(),
        client_to_upstream = outcome.client_to_upstream,
        upstream_to_client = outcome.upstream_to_client,
        "tunnel closed"
    );
}
