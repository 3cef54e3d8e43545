//! Getting a byte stream to the server: resolve the host, connect to its
//! addresses in the order DNS gave them until one accepts, and later open
//! one more connection (TLS included) per attempt.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

use super::report::{ConnectFailure, DnsStep, TcpStep, millis};
use super::target::Target;
use super::tls::Tls;

pub(super) async fn resolve(target: &Target, timeout: Duration) -> DnsStep {
    let start = Instant::now();
    let lookup = tokio::net::lookup_host((target.host.as_str(), target.port));
    let (addresses, error) = match tokio::time::timeout(timeout, lookup).await {
        Ok(Ok(found)) => {
            let mut addresses: Vec<IpAddr> = Vec::new();
            for addr in found {
                if !addresses.contains(&addr.ip()) {
                    addresses.push(addr.ip());
                }
            }
            let error = addresses
                .is_empty()
                .then(|| "resolved to no address".to_owned());
            (addresses, error)
        }
        Ok(Err(error)) => (Vec::new(), Some(error.to_string())),
        Err(_) => (
            Vec::new(),
            Some(format!("no answer within {}", show(timeout))),
        ),
    };
    DnsStep {
        host: target.host.clone(),
        addresses,
        ms: millis(start.elapsed()),
        error,
    }
}

/// Connects to `port` on each address in turn; the step records every
/// address that failed and the time the successful connect took.
pub(super) async fn connect_first(
    addresses: &[IpAddr],
    port: u16,
    timeout: Duration,
) -> (TcpStep, Option<TcpStream>) {
    let mut failed = Vec::new();
    for ip in addresses {
        let addr = SocketAddr::new(*ip, port);
        let start = Instant::now();
        match connect(addr, timeout).await {
            Ok(stream) => {
                let step = TcpStep {
                    connected: Some(addr),
                    ms: millis(start.elapsed()),
                    failed,
                };
                return (step, Some(stream));
            }
            Err(error) => failed.push(ConnectFailure { addr, error }),
        }
    }
    let step = TcpStep {
        connected: None,
        ms: 0.0,
        failed,
    };
    (step, None)
}

/// One TCP connect with its timeout; the error says which of the two failed.
pub(super) async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, String> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            // The probe writes whole requests; no reason to wait for more.
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no connection within {}", show(timeout))),
    }
}

/// A duration as the flags write it: `5s`, `500ms`.
pub(super) fn show(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

/// The byte stream one attempt talks over: one type for both schemes.
pub(super) enum Conn {
    Plain(TcpStream),
    // Boxed: a rustls session is far larger than a TcpStream.
    Tls(Box<TlsStream<TcpStream>>),
}

crate::stream::delegate_async_io!(Conn { Plain, Tls });

/// Opens further connections to the address the first one reached, over
/// the same TLS client: every attempt gets a connection of its own, as
/// each browser `new WebSocket()` does.
pub(super) struct Dialer {
    pub addr: SocketAddr,
    pub tls: Option<Tls>,
    pub timeout: Duration,
}

impl Dialer {
    pub async fn open(&self) -> Result<Conn, String> {
        let tcp = connect(self.addr, self.timeout)
            .await
            .map_err(|error| format!("connect to {}: {error}", self.addr))?;
        match &self.tls {
            None => Ok(Conn::Plain(tcp)),
            Some(tls) => tls
                .connect(tcp, self.timeout)
                .await
                .map(|stream| Conn::Tls(Box::new(stream)))
                .map_err(|error| format!("TLS: {error}")),
        }
    }
}
