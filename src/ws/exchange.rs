//! The exchange with the backend: the admitted upgrade request sent, the
//! backend's answer read and judged — a valid 101, or its own refusal to
//! relay, or a failure that is the upstream's.

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;

use crate::error::Rejection;
use crate::headers::{self, Fields};
use crate::policy;
use crate::state::Route;
use crate::upstream::UpstreamStream;
use crate::wire::{self, AnswerError, AnswerHead, SwitchHead};
use crate::ws::refusal::{BodyDecoder, MAX_HELD_BODY, Refusal};

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
        .map_err(|error| Rejection::from(&error))?;
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
    policy::check_selected_subprotocol(&route.config.policy, offered, &head.selected_protocols)?;
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
