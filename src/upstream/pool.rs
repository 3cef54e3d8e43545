//! Plain HTTP to the backends: a keep-alive pool per server (as nginx's
//! `keepalive` per upstream server), the server picked per request by the
//! balancer, and a server that refuses the connection passed over for the
//! next with the request body still unsent.
//!
//! One hyper-util client serves the upstream; its pool is keyed by the
//! request URI's authority, so each request's URI names the chosen server
//! (`http://{index}.server.invalid/…`) and the client keeps that server's
//! idle connections apart from the others'. Its connector connects to the
//! server the authority names, and to no other: a connection pooled under
//! one server is always to that server. (One shared pool, as before, reused
//! whichever connection was idle, whatever the balancer would have picked.)

use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response, Uri};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::oneshot;

use super::connect::Lease;
use super::{Affinity, ConnectError, Picker, Upstream, UpstreamStream};

pub(super) fn client(upstream: Weak<Upstream>) -> Client<Connector, Resendable> {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        // Per server now: the pool key is the server. Above the requests one
        // busy HTTP/2 client has in flight (128 streams), or each burst past
        // the cap closes connections only to reconnect them (h2load through
        // wsgate at 100 streams: ~9 % of CPU in connect(2) with 64).
        .pool_max_idle_per_host(1024)
        // Without a timer hyper-util never reaps idle pooled
        // connections: they would outlive `pool_idle_timeout`.
        .pool_timer(TokioTimer::new())
        // Host must reach the backend exactly as the client sent it.
        .set_host(false)
        .http1_preserve_header_case(true)
        .build(Connector { upstream })
}

/// The hyper client's connector: a connection to the server the request
/// URI's authority names.
#[derive(Clone)]
pub struct Connector {
    upstream: Weak<Upstream>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<UpstreamStream>;
    type Error = ConnectError;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let upstream = self.upstream.upgrade();
        Box::pin(async move {
            let gone = |why: &str| ConnectError::Unavailable {
                upstream: String::new(),
                server: uri.to_string(),
                source: std::io::Error::other(why.to_owned()),
            };
            let upstream = upstream.ok_or_else(|| gone("the upstream was removed by a reload"))?;
            let index = server_index(&uri)
                .filter(|&index| index < upstream.config.servers.len())
                .ok_or_else(|| gone("not a server of this upstream"))?;
            match upstream.connect_to(index, &[]).await {
                Ok((stream, _)) => Ok(TokioIo::new(stream)),
                // Counted here, not by the request: hyper-util may go on
                // with a connect the request no longer waits for.
                Err(error) => {
                    upstream.health.failed(index);
                    tracing::warn!(upstream = %upstream.config.name, %error, "upstream connect failed");
                    Err(error)
                }
            }
        })
    }
}

/// The URI that sends `target` to server `index`'s pool.
fn pool_uri(index: usize, target: &Uri) -> Result<Uri, http::Error> {
    let path_and_query = target
        .path_and_query()
        .map_or("/", |path_and_query| path_and_query.as_str());
    Uri::builder()
        .scheme("http")
        .authority(format!("{index}.server.invalid"))
        .path_and_query(path_and_query)
        .build()
}

fn server_index(uri: &Uri) -> Option<usize> {
    uri.host()?.split_once('.')?.0.parse().ok()
}

/// Why a plain request got no response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    #[error(transparent)]
    Connect(ConnectError),
    #[error("the request target is not valid: {0}")]
    Target(#[source] http::Error),
    /// hyper-util's; a failed connect has our [`ConnectError`] as its source.
    #[error(transparent)]
    Http(hyper_util::client::legacy::Error),
}

impl Upstream {
    /// Sends a plain request to the server the balancer picks, on that
    /// server's keep-alive connections; a server whose connect fails is
    /// passed over for the next choice, trying each server at most once.
    /// Returns the response head with the server that gave it. The server
    /// carries the request as load until its response head arrives.
    pub(crate) async fn send(
        self: &Arc<Self>,
        mut parts: Parts,
        mut body: Incoming,
        affinity: &Affinity,
    ) -> Result<(Response<Incoming>, usize), SendError> {
        let mut picker = Picker::new(affinity);
        let mut last_error = None;
        while let Some(index) = picker.next(self) {
            let _lease = Lease::take(&self.active, index);
            parts.uri = pool_uri(index, &parts.uri).map_err(SendError::Target)?;
            // Another server to try: keep a copy of the head, and a way back
            // for the body, in case this connect fails.
            let retry = (self.config.servers.len() > picker.tried.len() + 1).then(|| {
                let (home, returned) = oneshot::channel();
                (copy_head(&parts), home, returned)
            });
            let (spare, home, returned) = match retry {
                Some((spare, home, returned)) => (Some(spare), Some(home), Some(returned)),
                None => (None, None, None),
            };
            let request = Request::from_parts(
                parts,
                Resendable {
                    body: Some(body),
                    started: false,
                    home,
                },
            );
            match self.http.request(request).await {
                Ok(response) => {
                    self.health.succeeded(index);
                    return Ok((response, index));
                }
                Err(error) if error.is_connect() => {
                    let back = returned.and_then(|mut returned| returned.try_recv().ok());
                    let (Some(spare), Some(back)) = (spare, back) else {
                        return Err(SendError::Http(error));
                    };
                    parts = spare;
                    body = back;
                    last_error = Some(error);
                }
                Err(error) => return Err(SendError::Http(error)),
            }
        }
        Err(match last_error {
            Some(error) => SendError::Http(error),
            None => SendError::Connect(self.none_in_rotation()),
        })
    }
}

/// The head of `parts` again, for another attempt (extensions are wsgate's
/// own and do not go upstream).
fn copy_head(parts: &Parts) -> Parts {
    let (mut copy, ()) = Request::new(()).into_parts();
    copy.method = parts.method.clone();
    copy.uri = parts.uri.clone();
    copy.version = parts.version;
    copy.headers = parts.headers.clone();
    copy
}

/// A request body that comes back when it was never read: hyper-util drops
/// a request whose connect failed, body unsent, and this hands the body to
/// `home` as it goes so the next server can have it. Once polled it is
/// spent, and a failure then is not retried — the backend may have acted
/// on part of it.
pub struct Resendable {
    body: Option<Incoming>,
    started: bool,
    home: Option<oneshot::Sender<Incoming>>,
}

impl Body for Resendable {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.started = true;
        match self.body.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for Resendable {
    fn drop(&mut self) {
        if self.started {
            return;
        }
        if let (Some(body), Some(home)) = (self.body.take(), self.home.take()) {
            // No one waiting any more: the body is dropped with the request.
            let _ = home.send(body);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_uri_names_its_server_and_keeps_the_target() {
        let target: Uri = "/a/b?c=d".parse().unwrap();
        let uri = pool_uri(7, &target).unwrap();
        assert_eq!(uri.to_string(), "http://7.server.invalid/a/b?c=d");
        assert_eq!(server_index(&uri), Some(7));
        let again = pool_uri(2, &uri).unwrap();
        assert_eq!(again.to_string(), "http://2.server.invalid/a/b?c=d");
        assert_eq!(
            server_index(&"http://x.server.invalid/".parse().unwrap()),
            None
        );
    }
}
