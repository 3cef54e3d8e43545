//! The exchange with the backend: the admitted upgrade request sent, the
//! backend's answer read and judged — a valid 101, or its own refusal to
//! relay, or a failure that is the upstream's.

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use http::header::SET_COOKIE;
use tokio::io::AsyncWriteExt;

use crate::error::Rejection;
use crate::headers::{self, Fields};
use crate::policy;
use crate::state::Route;
use crate::upstream::{Affinity, Connected, UpstreamStream};
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

/// Sends the admitted request's `head` to the server of the route's
/// upstream that `affinity` leads to and reads its answer, within
/// `handshake_timeout` after the connect. `offered` is what the client asked
/// for, to check the backend's choice of subprotocol against. The answer is
/// counted here: a switch with the handshake's duration since `started`, a
/// refusal as such; and in the server's passive health. A 101 carries the
/// upstream's sticky cookie when the client needs one (`Secure` when it came
/// over `tls`). With `expected_accept` (the key was wsgate's own, so no client
/// will check the answer) a 101 must carry exactly that
/// `Sec-WebSocket-Accept`.
pub(crate) async fn exchange<F: Fields + ?Sized>(
    head: &[u8],
    offered: &F,
    route: &Route,
    started: Instant,
    affinity: &Affinity,
    tls: bool,
    expected_accept: Option<&str>,
) -> Result<Answer, Rejection> {
    let upstream = &route.upstream;
    let Connected {
        mut stream,
        sent,
        server,
    } = upstream
        .connect_sending(head, affinity)
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
    // No answer in time, or none that is HTTP, fails the server as an
    // answer of 500 or more does.
    upstream.answered(
        server,
        match &answered {
            Ok(Ok(Ok(_))) => true,
            Ok(Ok(Err((response, _)))) => response.status().as_u16() < 500,
            Err(_) | Ok(Err(_)) => false,
        },
    );
    let (mut head, early) = match answered {
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
            route.metrics.upstream_refusal(response.status().as_u16());
            let refusal = Refusal::new(response, decoder, stream, timeout);
            return Ok(Answer::Refused(Box::new(refusal)));
        }
    };
    if !head.upgrades_to_websocket {
        return Err(Rejection::UpstreamProtocol {
            detail: format!("upstream {name:?} answered 101 without Upgrade: websocket"),
        });
    }
    if let Some(expected) = expected_accept {
        let accepted =
            matches!(&head.accepts[..], [only] if only.trim_ascii() == expected.as_bytes());
        if !accepted {
            return Err(Rejection::UpstreamProtocol {
                detail: format!(
                    "upstream {name:?} answered 101 without the Sec-WebSocket-Accept for wsgate's key"
                ),
            });
        }
    }
    policy::check_selected_subprotocol(&route.config.policy, offered, &head.selected_protocols)?;
    if let Some(cookie) = upstream.sticky_cookie(affinity, server, tls) {
        head.raw = with_field(&head.raw, SET_COOKIE.as_str(), &cookie);
    }
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

/// `raw` (a head up to and with its blank line) with one more field line
/// before the blank line, which keeps its own terminator (CRLF, or a bare
/// LF the backend used).
fn with_field(raw: &[u8], name: &str, value: &HeaderValue) -> Bytes {
    let blank = if raw.ends_with(b"\r\n\r\n") || raw.ends_with(b"\n\r\n") {
        2
    } else {
        1
    };
    let (fields, end) = raw.split_at(raw.len().saturating_sub(blank));
    let mut out = Vec::with_capacity(raw.len() + name.len() + value.len() + 4);
    out.extend_from_slice(fields);
    wire::push_field(&mut out, name.as_bytes(), value.as_bytes());
    out.extend_from_slice(end);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_goes_in_before_the_blank_line() {
        let value = HeaderValue::from_static("s=1; Path=/");
        let crlf = with_field(
            b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\n\r\n",
            "set-cookie",
            &value,
        );
        assert_eq!(
            &crlf[..],
            b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nset-cookie: s=1; Path=/\r\n\r\n"
        );
        let bare = with_field(
            b"HTTP/1.1 101 OK\nUpgrade: websocket\n\n",
            "set-cookie",
            &value,
        );
        assert_eq!(
            &bare[..],
            b"HTTP/1.1 101 OK\nUpgrade: websocket\nset-cookie: s=1; Path=/\r\n\n"
        );
    }
}
