//! The TLS step: a handshake offering ALPN `http/1.1` (a WebSocket upgrade
//! only exists there), the chain checked against the webpki roots — and the
//! server's certificate kept either way, so a refused certificate can still
//! be described (whose names, which issuer, when it expires).

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use x509_parser::extensions::GeneralName;

use super::net::show;
use super::report::{CertInfo, TlsStep, millis};

/// What the verifier saw on the latest handshake.
#[derive(Debug, Default)]
struct Seen {
    leaf: Option<CertificateDer<'static>>,
    verify_error: Option<String>,
}

/// The webpki verifier, with a memory of the certificate it judged; under
/// `--insecure` its verdict is recorded but not enforced.
#[derive(Debug)]
struct Recording {
    inner: Arc<WebPkiServerVerifier>,
    insecure: bool,
    seen: Mutex<Seen>,
}

impl Recording {
    fn take(&self) -> Seen {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        std::mem::take(&mut *seen)
    }
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        {
            let mut seen = self
                .seen
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            seen.leaf = Some(end_entity.clone().into_owned());
            seen.verify_error = verdict.as_ref().err().map(ToString::to_string);
        }
        match verdict {
            Err(_) if self.insecure => Ok(ServerCertVerified::assertion()),
            verdict => verdict,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The TLS client for every connection of one probe.
pub(super) struct Tls {
    connector: TlsConnector,
    name: ServerName<'static>,
    recording: Arc<Recording>,
    host: String,
    insecure: bool,
}

impl Tls {
    pub fn new(host: &str, insecure: bool) -> anyhow::Result<Tls> {
        let name = ServerName::try_from(host.to_owned())
            .with_context(|| format!("{host:?} is not a valid TLS server name"))?;
        let provider = Arc::new(crate::tls::provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .context("building the certificate verifier")?;
        let recording = Arc::new(Recording {
            inner,
            insecure,
            seen: Mutex::new(Seen::default()),
        });
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("building the TLS client configuration")?
            .dangerous()
            .with_custom_certificate_verifier(recording.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // Each attempt a full handshake, as a browser's first visit.
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Tls {
            connector: TlsConnector::from(Arc::new(config)),
            name,
            recording,
            host: host.to_owned(),
            insecure,
        })
    }

    /// The handshake of one connection, bounded by `timeout`.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        timeout: Duration,
    ) -> Result<TlsStream<TcpStream>, String> {
        match tokio::time::timeout(timeout, self.connector.connect(self.name.clone(), tcp)).await {
            Ok(Ok(tls)) => Ok(tls),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("no TLS handshake within {}", show(timeout))),
        }
    }

    /// The first connection's handshake, described as the TLS step.
    pub async fn first(
        &self,
        tcp: TcpStream,
        timeout: Duration,
    ) -> (TlsStep, Option<TlsStream<TcpStream>>) {
        let start = Instant::now();
        let result = self.connect(tcp, timeout).await;
        let ms = millis(start.elapsed());
        let seen = self.recording.take();
        let certificate = seen.leaf.as_ref().and_then(|der| describe(der, &self.host));
        let mut step = TlsStep {
            server_name: self.host.clone(),
            ok: false,
            version: None,
            alpn: None,
            certificate,
            trusted: seen.leaf.as_ref().map(|_| seen.verify_error.is_none()),
            verify_error: seen.verify_error,
            insecure: self.insecure,
            ms,
            error: None,
        };
        match result {
            Ok(tls) => {
                let session = tls.get_ref().1;
                step.ok = true;
                step.version = session.protocol_version().map(version_name);
                step.alpn = session
                    .alpn_protocol()
                    .map(|alpn| String::from_utf8_lossy(alpn).into_owned());
                (step, Some(tls))
            }
            Err(error) => {
                step.error = Some(error);
                (step, None)
            }
        }
    }
}

fn version_name(version: rustls::ProtocolVersion) -> String {
    match version {
        rustls::ProtocolVersion::TLSv1_3 => "TLS 1.3".to_owned(),
        rustls::ProtocolVersion::TLSv1_2 => "TLS 1.2".to_owned(),
        other => format!("{other:?}"),
    }
}

/// Names, issuer and expiry of a certificate; `None` when it does not parse
/// (the handshake error then says why).
fn describe(der: &CertificateDer<'_>, host: &str) -> Option<CertInfo> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => names.push(dns.to_ascii_lowercase()),
                GeneralName::IPAddress(bytes) => {
                    if let Some(ip) = ip_from_bytes(bytes) {
                        names.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let not_after = cert.validity().not_after.timestamp();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs() as i64);
    let covers_host = names.iter().any(|name| name_covers(name, host));
    Some(CertInfo {
        subject: cert.subject().to_string(),
        names,
        issuer: cert.issuer().to_string(),
        self_signed: cert.subject().as_raw() == cert.issuer().as_raw(),
        not_after: format_time(not_after),
        days_left: (not_after - now).div_euclid(86_400),
        covers_host,
    })
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// RFC 6125 matching, as browsers do it: exact (case-insensitive), or a
/// `*.` wildcard standing for exactly one left-most label; IP addresses
/// only exactly.
fn name_covers(name: &str, host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    if let Ok(ip) = host.parse::<IpAddr>() {
        return name.parse::<IpAddr>().is_ok_and(|name| name == ip);
    }
    match name.strip_prefix("*.") {
        Some(parent) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
        None => name == host,
    }
}

fn format_time(unix_seconds: i64) -> String {
    match u64::try_from(unix_seconds) {
        Ok(seconds) => {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(seconds)).to_string()
        }
        Err(_) => format!("{unix_seconds} (before 1970)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cover_hosts_as_browsers_match_them() {
        assert!(name_covers("example.com", "Example.COM"));
        assert!(name_covers("*.example.com", "a.example.com"));
        assert!(!name_covers("*.example.com", "example.com"));
        assert!(!name_covers("*.example.com", "a.b.example.com"));
        assert!(name_covers("127.0.0.1", "127.0.0.1"));
        assert!(name_covers("::1", "::1"));
        assert!(!name_covers("localhost", "127.0.0.1"));
    }

    #[test]
    fn a_generated_certificate_is_described_with_its_names() {
        let names = ["other.test".to_owned(), "127.0.0.2".to_owned()];
        let (pem, _key) = crate::tls::generate_dev_certificate(&names).unwrap();
        use rustls_pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let info = describe(&der, "127.0.0.1").unwrap();
        assert_eq!(info.names, ["other.test", "127.0.0.2"]);
        assert!(info.self_signed);
        assert!(!info.covers_host);
        assert!(info.days_left > 300, "{info:?}");
        assert!(describe(&der, "other.test").unwrap().covers_host);
    }
}
