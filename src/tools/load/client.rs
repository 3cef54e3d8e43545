//! One connection attempt as a browser would make it: TCP connect, TLS for
//! `wss://`, then the HTTP/1.1 upgrade — or with `--h2` a new extended
//! CONNECT stream on a shared HTTP/2 connection — each step classified on
//! failure so the report can say *why* a handshake did not complete.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context as _, bail};
use http::{HeaderMap, Uri};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::h2::{self, SetupError};

/// An upgraded WebSocket, plain or over TLS.
pub(super) type Ws = WebSocketStream<Conn>;

/// Where and how to connect; built once, shared by every worker.
pub(super) struct Target {
    addr: SocketAddr,
    uri: Uri,
    /// `--origin` and `--header` values; they replace tungstenite's defaults of
    /// the same name so that e.g. a wrong `Sec-WebSocket-Version` can be sent.
    headers: HeaderMap,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    ws_config: WebSocketConfig,
    /// Limit for the TCP connect, and separately for TLS plus upgrade.
    timeout: Duration,
    /// `--h2`: the shared HTTP/2 connections the WebSockets are streams on.
    h2: Option<h2::Pool>,
    /// TCP connections that connected (and went on to TLS for wss://).
    tcp_connections: AtomicU64,
}

/// Why a handshake did not end in an upgraded connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Failure {
    /// The server answered the upgrade with this non-101 status.
    Status(u16),
    ConnectRefused,
    Tls,
    Timeout,
    Reset,
    /// A malformed answer, or a 101 that fails tungstenite's checks.
    Protocol,
    /// No local address or port left to connect from.
    LocalAddress,
    Other,
}

pub(super) enum Attempt {
    /// Boxed: a WebSocket with its buffers dwarfs the failure variants.
    Upgraded(Box<Ws>),
    Failed(Failure),
    /// The run's hard end came first; neither a success nor a failure.
    CutOff,
}

pub(super) enum Bounded<T> {
    Done(T),
    TimedOut,
    CutOff,
}

/// Runs `fut` for at most `timeout`, but never past `hard_end`, and tells the
/// two apart: only the first is the peer's fault.
pub(super) async fn bounded<F: Future>(
    timeout: Duration,
    hard_end: Instant,
    fut: F,
) -> Bounded<F::Output> {
    let own_limit = Instant::now() + timeout;
    match tokio::time::timeout_at(own_limit.min(hard_end), fut).await {
        Ok(output) => Bounded::Done(output),
        Err(_) if own_limit <= hard_end => Bounded::TimedOut,
        Err(_) => Bounded::CutOff,
    }
}

impl Target {
    /// Resolves the URL's host once, so DNS is not part of what is measured.
    /// With `h2 = Some((connections, streams_per_connection))` it also opens
    /// the first HTTP/2 connection, so that a server that cannot carry
    /// WebSockets over HTTP/2 is an error up front rather than a run of failures.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn new(
        uri: Uri,
        headers: HeaderMap,
        insecure: bool,
        resume: bool,
        ws_config: WebSocketConfig,
        timeout: Duration,
        h2: Option<(usize, usize)>,
    ) -> anyhow::Result<Self> {
        let secure = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => bail!("--url must start with ws:// or wss://, got {uri}"),
        };
        if h2.is_some() && !secure {
            bail!("--h2 needs a wss:// URL: HTTP/2 is chosen by ALPN in the TLS handshake");
        }
        let Some(host) = uri.host() else {
            bail!("--url has no host: {uri}");
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .with_context(|| format!("resolving {host}:{port}"))?
            .next()
            .with_context(|| format!("{host} resolved to no address"))?;
        let tls = if secure {
            let name = ServerName::try_from(host.clone())
                .with_context(|| format!("{host} is not a valid TLS server name"))?;
            // h2 alone would make a server without it fail the TLS
            // handshake; offering both lets the error name what it chose.
            let alpn: &[&[u8]] = match h2 {
                Some(_) => &[b"h2", b"http/1.1"],
                None => &[b"http/1.1"],
            };
            Some((
                TlsConnector::from(tls_config(insecure, resume, alpn)?),
                name,
            ))
        } else {
            None
        };
        let target = Self {
            addr,
            uri,
            headers,
            tls,
            ws_config,
            timeout,
            h2: h2.map(|(connections, per_connection)| h2::Pool::new(connections, per_connection)),
            tcp_connections: AtomicU64::new(0),
        };
        if let Some(pool) = &target.h2 {
            let hard_end = Instant::now() + timeout;
            // The first connection stays in its slot for the run. A network
            // failure here is left for the run to count, like any other.
            let opened = bounded(timeout, hard_end, pool.sender(0, target.open_h2(None))).await;
            if let Bounded::Done(Err(SetupError::Refused(why))) = opened {
                bail!("{why}");
            }
        }
        Ok(target)
    }

    /// `--h2`: the shared-connection pool.
    pub(super) fn h2(&self) -> Option<&h2::Pool> {
        self.h2.as_ref()
    }

    /// The status of an accepted handshake: the 101 of an HTTP/1.1 upgrade,
    /// or the 200 that opens an RFC 8441 stream.
    pub(super) fn success_status(&self) -> u16 {
        if self.h2.is_some() { 200 } else { 101 }
    }

    pub(super) fn tcp_connections(&self) -> u64 {
        self.tcp_connections.load(Relaxed)
    }

    pub(super) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connects (from `source` when given) and upgrades, giving up at `hard_end`.
    /// With `--h2`, worker `index` opens a stream on its slot's connection instead.
    pub(super) async fn connect(
        &self,
        index: usize,
        source: Option<IpAddr>,
        hard_end: Instant,
    ) -> Attempt {
        if let Some(pool) = &self.h2 {
            return self.connect_h2(pool, index, source, hard_end).await;
        }
        let tcp = match bounded(self.timeout, hard_end, self.open_tcp(source)).await {
            Bounded::Done(Ok(tcp)) => tcp,
            Bounded::Done(Err(error)) => return Attempt::Failed(classify_io(&error)),
            Bounded::TimedOut => return Attempt::Failed(Failure::Timeout),
            Bounded::CutOff => return Attempt::CutOff,
        };
        match bounded(self.timeout, hard_end, self.upgrade(tcp)).await {
            Bounded::Done(Ok(ws)) => Attempt::Upgraded(Box::new(ws)),
            Bounded::Done(Err(failure)) => Attempt::Failed(failure),
            Bounded::TimedOut => Attempt::Failed(Failure::Timeout),
            Bounded::CutOff => Attempt::CutOff,
        }
    }

    async fn connect_h2(
        &self,
        pool: &h2::Pool,
        index: usize,
        source: Option<IpAddr>,
        hard_end: Instant,
    ) -> Attempt {
        let slot = pool.slot_of(index);
        let opening = pool.sender(slot, self.open_h2(source));
        let mut sender = match bounded(self.timeout, hard_end, opening).await {
            Bounded::Done(Ok(sender)) => sender,
            Bounded::Done(Err(SetupError::Failed(failure))) => return Attempt::Failed(failure),
            // The preflight passed, so the server changed its mind mid-run.
            Bounded::Done(Err(SetupError::Refused(why))) => {
                tracing::debug!(%why, "a new HTTP/2 connection was unusable");
                return Attempt::Failed(Failure::Protocol);
            }
            Bounded::TimedOut => return Attempt::Failed(Failure::Timeout),
            Bounded::CutOff => return Attempt::CutOff,
        };
        let request = match h2::request(&self.uri, &self.headers) {
            Ok(request) => request,
            Err(failure) => return Attempt::Failed(failure),
        };
        let upgrading = async {
            let stream = h2::open_stream(&mut sender, request).await?;
            Ok::<_, Failure>(
                WebSocketStream::from_raw_socket(
                    Conn::H2(TokioIo::new(stream)),
                    Role::Client,
                    Some(self.ws_config),
                )
                .await,
            )
        };
        match bounded(self.timeout, hard_end, upgrading).await {
            Bounded::Done(Ok(ws)) => Attempt::Upgraded(Box::new(ws)),
            Bounded::Done(Err(failure)) => Attempt::Failed(failure),
            Bounded::TimedOut => Attempt::Failed(Failure::Timeout),
            Bounded::CutOff => Attempt::CutOff,
        }
    }

    /// A new HTTP/2 connection: TCP, TLS with ALPN h2, the server's SETTINGS.
    async fn open_h2(&self, source: Option<IpAddr>) -> Result<h2::Sender, SetupError> {
        let per_connection = self.h2.as_ref().map_or(1, h2::Pool::per_connection);
        let tcp = self
            .open_tcp(source)
            .await
            .map_err(|error| classify_io(&error))?;
        let Some((connector, name)) = &self.tls else {
            return Err(SetupError::Failed(Failure::Other));
        };
        let tls = connector
            .connect(name.clone(), tcp)
            .await
            .map_err(|error| {
                tracing::debug!(%error, "TLS handshake failed");
                Failure::Tls
            })?;
        h2::handshake(tls, per_connection).await
    }

    async fn open_tcp(&self, source: Option<IpAddr>) -> io::Result<TcpStream> {
        let socket = match self.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let stream = socket.connect(self.addr).await?;
        self.tcp_connections.fetch_add(1, Relaxed);
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    async fn upgrade(&self, tcp: TcpStream) -> Result<Ws, Failure> {
        let conn = match &self.tls {
            None => Conn::Plain(tcp),
            Some((connector, name)) => match connector.connect(name.clone(), tcp).await {
                Ok(tls) => Conn::Tls(Box::new(tls)),
                Err(error) => {
                    tracing::debug!(%error, "TLS handshake failed");
                    return Err(Failure::Tls);
                }
            },
        };
        // A fresh request per attempt: tungstenite puts a new Sec-WebSocket-Key in it.
        let mut request = self.uri.clone().into_client_request().map_err(|error| {
            tracing::debug!(%error, "building the upgrade request failed");
            Failure::Other
        })?;
        request.headers_mut().extend(self.headers.clone());
        tokio_tungstenite::client_async_with_config(request, conn, Some(self.ws_config))
            .await
            .map(|(ws, _response)| ws)
            .map_err(|error| classify_ws(&error))
    }
}

fn classify_io(error: &io::Error) -> Failure {
    use io::ErrorKind::*;
    match error.kind() {
        ConnectionRefused => Failure::ConnectRefused,
        TimedOut => Failure::Timeout,
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => Failure::Reset,
        AddrNotAvailable | AddrInUse => Failure::LocalAddress,
        _ => {
            tracing::debug!(%error, "connection failed");
            Failure::Other
        }
    }
}

fn classify_ws(error: &WsError) -> Failure {
    match error {
        WsError::Http(response) => Failure::Status(response.status().as_u16()),
        WsError::Io(error) => classify_io(error),
        // The peer closed before a whole response head arrived.
        WsError::Protocol(ProtocolError::HandshakeIncomplete) | WsError::ConnectionClosed => {
            Failure::Reset
        }
        WsError::Protocol(_) | WsError::HttpFormat(_) | WsError::Utf8(_) => {
            tracing::debug!(%error, "upgrade answer rejected");
            Failure::Protocol
        }
        _ => {
            tracing::debug!(%error, "upgrade failed");
            Failure::Other
        }
    }
}

fn tls_config(insecure: bool, resume: bool, alpn: &[&[u8]]) -> anyhow::Result<Arc<ClientConfig>> {
    let mut config = if insecure {
        let provider = Arc::new(crate::tls::provider());
        ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("building the TLS client configuration")?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
            .with_no_client_auth()
    } else {
        // What the proxy itself uses towards a TLS backend.
        Arc::unwrap_or_clone(crate::tls::upstream_client_config(&[]).map_err(anyhow::Error::msg)?)
    };
    // Without --h2 a WebSocket upgrade only exists in HTTP/1.1; say so, as browsers do.
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    if !resume {
        // Every handshake a full one: what a fleet of new clients costs a server.
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(Arc::new(config))
}

/// `--insecure`: any certificate for any name is accepted, but the handshake
/// signatures are still checked so the TLS session itself is sound.
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The byte stream under a WebSocket: one type for both schemes so the
/// workers are not generic.
pub(super) enum Conn {
    Plain(TcpStream),
    // Boxed: a rustls session is far larger than a TcpStream.
    Tls(Box<TlsStream<TcpStream>>),
    /// An extended CONNECT stream; the TLS connection belongs to hyper's task.
    H2(TokioIo<Upgraded>),
}

crate::stream::delegate_async_io!(Conn { Plain, Tls, H2 });
