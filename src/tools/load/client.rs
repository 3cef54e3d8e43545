//! One connection attempt as a browser would make it: TCP connect, TLS for
//! `wss://`, then the HTTP/1.1 upgrade — each step classified on failure so the
//! report can say *why* a handshake did not complete.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use http::{HeaderMap, Uri};
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
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

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
    pub(super) async fn new(
        uri: Uri,
        headers: HeaderMap,
        insecure: bool,
        resume: bool,
        ws_config: WebSocketConfig,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let secure = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => bail!("--url must start with ws:// or wss://, got {uri}"),
        };
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
            Some((TlsConnector::from(tls_config(insecure, resume)?), name))
        } else {
            None
        };
        Ok(Self {
            addr,
            uri,
            headers,
            tls,
            ws_config,
            timeout,
        })
    }

    pub(super) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connects (from `source` when given) and upgrades, giving up at `hard_end`.
    pub(super) async fn connect(&self, source: Option<IpAddr>, hard_end: Instant) -> Attempt {
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

    async fn open_tcp(&self, source: Option<IpAddr>) -> io::Result<TcpStream> {
        let socket = match self.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let stream = socket.connect(self.addr).await?;
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

fn tls_config(insecure: bool, resume: bool) -> anyhow::Result<Arc<ClientConfig>> {
    let mut config = if insecure {
        let provider = Arc::new(crate::tls::provider());
        let mut config = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("building the TLS client configuration")?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
            .with_no_client_auth();
        // A WebSocket upgrade only exists in HTTP/1.1; say so, as browsers do.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config
    } else {
        // What the proxy itself uses towards a TLS backend.
        Arc::unwrap_or_clone(crate::tls::upstream_client_config(&[]).map_err(anyhow::Error::msg)?)
    };
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
}

crate::stream::delegate_async_io!(Conn { Plain, Tls });
