//! A plain request forwarded with the route's pooled upstream client, its
//! response streamed back with hop-by-hop headers stripped.

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::body::{BoxError, ProxyBody};
use crate::error::Rejection;
use crate::headers;
use crate::state::Route;
use crate::upstream::ConnectError;

pub(super) async fn forward_plain(
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
        .map_err(|_| Rejection::BadRequest {
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
                Some(connect_error) => Rejection::from(connect_error),
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
