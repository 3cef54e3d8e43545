//! `--h2`: each WebSocket is an RFC 8441 extended CONNECT stream
//! (`:protocol = websocket`) on one of a few shared TLS connections that
//! negotiated ALPN `h2`, so that wsgate (or a peer) is measured the way a
//! browser multiplexing its sockets uses it. hyper speaks HTTP/2; the
//! upgraded stream is handed to tungstenite exactly like an HTTP/1.1 one.

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::header::{SEC_WEBSOCKET_EXTENSIONS, SEC_WEBSOCKET_PROTOCOL, SEC_WEBSOCKET_VERSION};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper::ext::Protocol;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, oneshot};
use tokio_rustls::client::TlsStream;

use super::client::Failure;

/// Default `--streams-per-connection`: RFC 9113 §6.5.2 asks servers to allow
/// at least 100 concurrent streams, and HAProxy's default
/// (`tune.h2.max-concurrent-streams`) is exactly 100 — so 100 fits every
/// common server (nginx and wsgate allow 128) without queueing streams.
pub(super) const DEFAULT_STREAMS_PER_CONNECTION: usize = 100;

pub(super) type Sender = SendRequest<Empty<Bytes>>;

/// Why a connection is unusable for the run as configured, as opposed to a
/// network failure: the preflight turns these into an error for the user.
pub(super) enum SetupError {
    /// A failure to count, like any other handshake failure.
    Failed(Failure),
    /// The server cannot do what `--h2` asks; the message says why.
    Refused(String),
}

impl From<Failure> for SetupError {
    fn from(failure: Failure) -> Self {
        SetupError::Failed(failure)
    }
}

/// The shared HTTP/2 connections: worker `i` uses slot `i / per_connection`,
/// so each holds at most `per_connection` WebSockets at once.
pub(super) struct Pool {
    slots: Vec<Mutex<Option<Sender>>>,
    per_connection: usize,
    /// HTTP/2 connections that got through TLS and the server's SETTINGS.
    pub(super) opened: AtomicU64,
}

impl Pool {
    pub(super) fn new(connections: usize, per_connection: usize) -> Self {
        let slots = connections.div_ceil(per_connection);
        Self {
            slots: (0..slots).map(|_| Mutex::new(None)).collect(),
            per_connection,
            opened: AtomicU64::new(0),
        }
    }

    pub(super) fn per_connection(&self) -> usize {
        self.per_connection
    }

    pub(super) fn slot_count(&self) -> usize {
        self.slots.len()
    }

    pub(super) fn slot_of(&self, worker: usize) -> usize {
        worker / self.per_connection
    }

    /// The slot's connection, or a new one from `open` when it has none or
    /// its old one has ended. Waiters on the same slot queue behind the one
    /// opening it rather than each opening their own.
    pub(super) async fn sender(
        &self,
        slot: usize,
        open: impl Future<Output = Result<Sender, SetupError>>,
    ) -> Result<Sender, SetupError> {
        let Some(slot) = self.slots.get(slot) else {
            return Err(SetupError::Failed(Failure::Other));
        };
        let mut current = slot.lock().await;
        if let Some(sender) = current.as_ref() {
            if !sender.is_closed() {
                return Ok(sender.clone());
            }
        }
        *current = None;
        let sender = open.await?;
        self.opened.fetch_add(1, Relaxed);
        *current = Some(sender.clone());
        Ok(sender)
    }
}

/// What the server's first SETTINGS frame said.
struct ServerSettings {
    connect_protocol: bool,
    max_streams: usize,
}

/// HTTP/2 over an established TLS connection: checks ALPN, starts the
/// connection task and waits for the server's SETTINGS, since an extended
/// CONNECT is only allowed once the server has enabled it there.
pub(super) async fn handshake(
    tls: TlsStream<TcpStream>,
    per_connection: usize,
) -> Result<Sender, SetupError> {
    match tls.get_ref().1.alpn_protocol() {
        Some(b"h2") => {}
        chosen => {
            let chosen = chosen.map_or("no protocol".to_owned(), |alpn| {
                format!("ALPN {}", String::from_utf8_lossy(alpn))
            });
            return Err(SetupError::Refused(format!(
                "--h2: the server chose {chosen}, not h2: HTTP/2 is off on that listener \
                 (wsgate: `http2 = false`)"
            )));
        }
    }
    let watch = Arc::new(Watch {
        waker: AtomicWaker::new(),
        on: AtomicBool::new(true),
    });
    let mut builder = hyper::client::conn::http2::Builder::new(Executor(watch.clone()));
    builder
        .timer(TokioTimer::new())
        // No stream may open before the server's SETTINGS: that is also how
        // their arrival is recognised below (h2 then sets the limit to the
        // server's value, or unlimited).
        .initial_max_send_streams(0);
    let (sender, connection) = builder
        .handshake(TokioIo::new(tls))
        .await
        .map_err(|error| {
            tracing::debug!(%error, "HTTP/2 handshake failed");
            Failure::Protocol
        })?;
    let (settings_tx, settings_rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut connection = pin!(connection);
        let mut settings_tx = Some(settings_tx);
        let ended = std::future::poll_fn(|cx| {
            // Registered before looking, so progress made in between still wakes us.
            if settings_tx.is_some() {
                watch.waker.register(cx.waker());
            }
            let polled = connection.as_mut().poll(cx);
            let max_streams = connection.current_max_send_streams();
            if max_streams > 0 {
                if let Some(tx) = settings_tx.take() {
                    watch.on.store(false, Relaxed);
                    let _ = tx.send(ServerSettings {
                        connect_protocol: connection.is_extended_connect_protocol_enabled(),
                        max_streams,
                    });
                }
            }
            polled
        })
        .await;
        if let Err(error) = ended {
            tracing::debug!(%error, "HTTP/2 connection ended with an error");
        }
    });
    // The connection ended before its SETTINGS arrived.
    let settings = settings_rx.await.map_err(|_| Failure::Reset)?;
    if !settings.connect_protocol {
        return Err(SetupError::Refused(
            "--h2: the server did not send SETTINGS_ENABLE_CONNECT_PROTOCOL = 1, so it cannot \
             carry WebSockets over HTTP/2 (RFC 8441)"
                .to_owned(),
        ));
    }
    if settings.max_streams < per_connection {
        return Err(SetupError::Refused(format!(
            "--h2: the server allows {} concurrent streams per connection \
             (SETTINGS_MAX_CONCURRENT_STREAMS), fewer than --streams-per-connection {per_connection}",
            settings.max_streams
        )));
    }
    Ok(sender)
}

/// hyper reads the connection in a task of its own, spawned here, and
/// `connection` above is not woken when the server's SETTINGS arrive there.
/// Until they have, every poll of a spawned task wakes the waiting handshake
/// to look again; after, this costs one atomic load per poll.
#[derive(Clone)]
struct Executor(Arc<Watch>);

struct Watch {
    waker: AtomicWaker,
    on: AtomicBool,
}

impl<F> hyper::rt::Executor<F> for Executor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        let watch = self.0.clone();
        tokio::spawn(async move {
            let mut future = pin!(future);
            std::future::poll_fn(|cx| {
                let polled = future.as_mut().poll(cx);
                if watch.on.load(Relaxed) {
                    watch.waker.wake();
                }
                polled
            })
            .await
        });
    }
}

/// The extended CONNECT for `uri` (a ws:// or wss:// URL) with the user's
/// headers; `Sec-WebSocket-Version: 13` unless they name their own. No
/// `Sec-WebSocket-Key`: RFC 8441 §5 drops the key and its accept.
pub(super) fn request(uri: &Uri, headers: &HeaderMap) -> Result<Request<Empty<Bytes>>, Failure> {
    let mut parts = uri.clone().into_parts();
    parts.scheme = Some(http::uri::Scheme::HTTPS);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    let uri = Uri::from_parts(parts).map_err(|_| Failure::Other)?;
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(uri)
        .body(Empty::new())
        .map_err(|_| Failure::Other)?;
    let fields = request.headers_mut();
    fields.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
    // Replaces per name, as the HTTP/1.1 path does, so a test can send a wrong version.
    fields.extend(headers.clone());
    request
        .extensions_mut()
        .insert(Protocol::from_static("websocket"));
    Ok(request)
}

/// Sends the extended CONNECT and returns the stream once the server
/// accepted it with a 200 that selects nothing the client did not offer.
pub(super) async fn open_stream(
    sender: &mut Sender,
    request: Request<Empty<Bytes>>,
) -> Result<hyper::upgrade::Upgraded, Failure> {
    let offered: Vec<String> = request
        .headers()
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|list| list.split(','))
        .map(|token| token.trim().to_owned())
        .collect();
    let extensions_offered = request.headers().contains_key(SEC_WEBSOCKET_EXTENSIONS);
    let response = sender
        .send_request(request)
        .await
        .map_err(|error| classify(&error))?;
    if response.status() != StatusCode::OK {
        return Err(Failure::Status(response.status().as_u16()));
    }
    // RFC 6455 §4.1 as RFC 8441 keeps it: a subprotocol or extension the
    // client did not offer fails the connection.
    let chosen = response.headers().get_all(SEC_WEBSOCKET_PROTOCOL);
    let mut chosen = chosen.iter();
    match (chosen.next(), chosen.next()) {
        (None, _) => {}
        (Some(one), None) if one.to_str().is_ok_and(|p| offered.iter().any(|o| o == p)) => {}
        _ => {
            tracing::debug!("the 200 selects a subprotocol that was not offered");
            return Err(Failure::Protocol);
        }
    }
    if !extensions_offered && response.headers().contains_key(SEC_WEBSOCKET_EXTENSIONS) {
        tracing::debug!("the 200 selects an extension that was not offered");
        return Err(Failure::Protocol);
    }
    hyper::upgrade::on(response).await.map_err(|error| {
        tracing::debug!(%error, "the 200 did not become a stream");
        Failure::Protocol
    })
}

fn classify(error: &hyper::Error) -> Failure {
    if error.is_closed() || error.is_canceled() || error.is_incomplete_message() {
        return Failure::Reset;
    }
    if error.is_timeout() {
        return Failure::Timeout;
    }
    tracing::debug!(%error, "extended CONNECT failed");
    if error.is_user() {
        return Failure::Other;
    }
    // A stream reset (REFUSED_STREAM, PROTOCOL_ERROR, …) comes as an h2 error.
    Failure::Reset
}
