//! What the `cargo fuzz` targets in `fuzz/` reach that the normal API keeps
//! crate-private. Only built with the `fuzzing` feature, hidden from the
//! docs, and not an API: wrappers return plain data so the targets can
//! compare it against their own reference decoders without naming
//! crate-private types.

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{HeaderMap, StatusCode};
use tokio::io::AsyncRead;

use crate::headers::forwarding::Hop;
use crate::policy::auth::token::{self, Locations, Source};
use crate::upstream::affinity;
use crate::wire::request::UpgradeRequest;
use crate::wire::{self, AnswerHead};
use crate::ws::refusal::BodyDecoder;

pub use crate::listen::first_head::{FirstHead, read_first_head};
pub use crate::listen::proxy_header::{ProxyHeaderError, read_proxy_header};
pub use crate::ws::frame::{
    Control, Event, Fed, FrameFollower, FrameHeader, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN, Opcode,
    Violation, encode_close, encode_ping,
};

/// What the upgrade path made of a first request head.
#[derive(Debug)]
pub struct Upgrade {
    pub head_len: usize,
    /// The bytes after the head, as the tunnel would replay them.
    pub rest: Bytes,
    /// The head as written for the backend.
    pub encoded: Vec<u8>,
    /// The head as the admission steps that need a map see it.
    pub parts: Option<Parts>,
}

/// [`UpgradeRequest::parse`] and everything done with a parsed one on the
/// way upstream: the encode for `hop`, with and without a narrowed offer,
/// and the map for JWT or forward auth.
pub fn parse_upgrade(buffer: &Bytes, hop: &Hop) -> Option<Upgrade> {
    let request = UpgradeRequest::parse(buffer)?;
    let mut encoded = Vec::new();
    request.encode(hop, None, &mut encoded);
    let offer = request.shared_value(&http::header::SEC_WEBSOCKET_PROTOCOL);
    if let Some(offer) = &offer {
        request.encode(hop, Some(offer), &mut Vec::new());
    }
    Some(Upgrade {
        head_len: request.head_len,
        rest: request.rest(),
        encoded,
        parts: request.to_parts(),
    })
}

/// The bearer token [`Locations::find`] picks, and where from.
pub fn find_token(
    query: Option<&str>,
    cookie: Option<&str>,
    parts: &Parts,
) -> Option<(String, &'static str)> {
    let locations = Locations {
        query: query.map(str::to_owned),
        cookie: cookie.map(str::to_owned),
    };
    locations.find(parts).map(|(token, source)| {
        let source = match source {
            Source::Query => "query",
            Source::Cookie => "cookie",
            Source::Header => "header",
        };
        (token, source)
    })
}

/// The query without parameter `name`, as `strip_token` forwards it.
pub fn strip_query_param(query: &str, name: &str) -> Option<String> {
    token::strip_query_param(query, name)
}

/// The sticky / hash-key cookie `name` as the balancer reads it.
pub fn affinity_cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    affinity::cookie_value(headers, name)
}

/// The hash-key query parameter `name` as the balancer reads it.
pub fn affinity_query<'q>(query: &'q str, name: &str) -> Option<&'q [u8]> {
    affinity::query_value(query, name)
}

/// A backend's answer as the upgrade exchange reads it.
#[derive(Debug)]
pub enum Answer {
    Switch {
        raw: Bytes,
        upgrades_to_websocket: bool,
        selected_protocols: Vec<Bytes>,
        /// The 101 as hyper would write it; `false` if it did not convert.
        converts: bool,
        /// Bytes read past the head: the backend's first frames.
        after: BytesMut,
    },
    Final {
        status: StatusCode,
        headers: HeaderMap,
        /// The decoded body, or why decoding stopped.
        body: Result<Bytes, String>,
        /// The decoder reached the body's end.
        done: bool,
    },
}

/// [`wire::read_response_head`], then for a refusal its body through
/// [`BodyDecoder`] as the relay holds it (up to `limit` bytes).
pub async fn read_answer<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: usize,
) -> Result<Answer, String> {
    let mut buffer = BytesMut::new();
    let head = wire::read_response_head(stream, &mut buffer)
        .await
        .map_err(|error| error.to_string())?;
    match head {
        AnswerHead::Switch(switch) => {
            let raw = switch.raw.clone();
            let upgrades_to_websocket = switch.upgrades_to_websocket;
            let selected_protocols = switch.selected_protocols.clone();
            let converts = switch.into_response(()).is_ok();
            Ok(Answer::Switch {
                raw,
                upgrades_to_websocket,
                selected_protocols,
                converts,
                after: buffer,
            })
        }
        AnswerHead::Final(head) => {
            let status = head.status;
            let headers = head.headers.clone();
            let (body, done) = match BodyDecoder::new(&head, buffer) {
                Ok(mut decoder) => {
                    let body = decoder.read_up_to(stream, limit).await;
                    (body.map_err(|error| error.to_string()), decoder.is_done())
                }
                Err(error) => (Err(error.to_string()), false),
            };
            Ok(Answer::Final {
                status,
                headers,
                body,
                done,
            })
        }
    }
}

/// `wsgate probe`'s decoder of a chunked refusal body: the bytes decoded so
/// far, and whether the body is over.
pub fn probe_dechunk(raw: &[u8]) -> (Vec<u8>, bool) {
    crate::tools::probe::dechunk(raw)
}

/// Why wsgate refuses a connection's first head itself rather than hand it
/// to hyper (see `wire::malformed`); `None` when it goes to hyper.
pub fn first_head_problem(head: &[u8]) -> Option<&'static str> {
    crate::wire::malformed::problem(head)
}

/// What an HTTP/2 request's fields become for an HTTP/1.1 backend: `Host`
/// from `:authority`, split `Cookie` fields joined.
pub fn h2_request_fields(uri: http::Uri, fields: &mut HeaderMap) {
    crate::http::h2::as_http11_fields(uri, fields)
}

/// An RFC 8441 extended CONNECT rewritten into the HTTP/1.1 upgrade sent to
/// the backend; returns the `Sec-WebSocket-Key` it made.
pub fn h2_upgrade_parts(parts: &mut Parts) -> String {
    crate::ws::extended_connect::as_http11_upgrade(parts)
}
