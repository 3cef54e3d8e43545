//! TLS material: PEM loading, the SNI certificate resolver for listeners, the
//! client config for `tls = true` upstreams, and development certificates.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate chain and its key as loaded from disk, with what the engine
/// needs to know about it.
#[derive(Debug)]
pub struct CertPair {
    pub cert_path: std::path::PathBuf,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// DNS names from the leaf's subjectAltName (`*.example.com` kept as written).
    pub names: Vec<String>,
    /// Self-signed leaf: fine for development, untrusted by browsers.
    pub self_signed: bool,
}

/// Why TLS material cannot be loaded or used. The texts name the file, so a
/// config problem reads on its own.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("{} is not valid PEM: {source}", .path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("{} holds no CERTIFICATE block", .path.display())]
    NoCertificate { path: PathBuf },
    #[error("cannot read a private key from {}: {source}", .path.display())]
    Key {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("unusable private key: {0}")]
    UnusableKey(#[source] rustls::Error),
    #[error("the key does not match the certificate: {0}")]
    KeyMismatch(#[source] rustls::Error),
    #[error("the first certificate cannot be parsed: {0}")]
    Leaf(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    #[error("a TLS listener needs at least one certificate")]
    NoCertificates,
    #[error("the CA certificate is not usable: {0}")]
    UnusableCa(#[source] rustls::Error),
    #[error("the TLS protocol versions are not supported: {0}")]
    ProtocolVersions(#[source] rustls::Error),
}

/// Which file of a pair failed, relative to its `certs[N]` key.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {source}")]
pub struct CertError {
    /// `cert` or `key`.
    pub key: &'static str,
    #[source]
    pub source: TlsError,
}

pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

impl CertPair {
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<CertPair, CertError> {
        let cert_error = |source| CertError {
            key: "cert",
            source,
        };
        let key_error = |source| CertError { key: "key", source };
        let chain = load_certificates(cert_path).map_err(cert_error)?;
        let key = PrivateKeyDer::from_pem_file(key_path).map_err(|source| {
            key_error(TlsError::Key {
                path: key_path.to_path_buf(),
                source,
            })
        })?;
        let Leaf { names, self_signed } = describe_leaf(&chain[0]).map_err(cert_error)?;
        let pair = CertPair {
            cert_path: cert_path.to_path_buf(),
            chain,
            key,
            names,
            self_signed,
        };
        // Catch a key that does not belong to the certificate now, not at the first handshake.
        pair.certified_key(&provider()).map_err(key_error)?;
        Ok(pair)
    }

    fn certified_key(&self, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
        let signing_key = provider
            .key_provider
            .load_private_key(self.key.clone_key())
            .map_err(TlsError::UnusableKey)?;
        let certified = CertifiedKey::new(self.chain.clone(), signing_key);
        certified.keys_match().map_err(TlsError::KeyMismatch)?;
        Ok(certified)
    }
}

/// What the engine reads from a chain's first certificate.
struct Leaf {
    names: Vec<String>,
    self_signed: bool,
}

fn describe_leaf(der: &CertificateDer<'_>) -> Result<Leaf, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(TlsError::Leaf)?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.to_ascii_lowercase());
            }
        }
    }
    let self_signed = cert.tbs_certificate.subject.as_raw() == cert.tbs_certificate.issuer.as_raw();
    Ok(Leaf { names, self_signed })
}

pub fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Chooses a listener's certificate by SNI: exact name, then `*.parent`
/// wildcard, then the first configured pair.
#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return Some(self.default.clone());
        };
        let name = name.to_ascii_lowercase();
        if let Some(found) = self.exact.get(&name) {
            return Some(found.clone());
        }
        let parent = name.split_once('.').map(|(_, parent)| parent);
        Some(
            parent
                .and_then(|parent| self.wildcard.get(parent))
                .unwrap_or(&self.default)
                .clone(),
        )
    }
}

/// Cipher suites in the order a listener chooses them. AES-128-GCM with
/// SHA-256 first: it is what browsers ask for first anyway, and the TLS 1.3
/// key schedule then runs on SHA-256, which x86 and ARM CPUs accelerate in
/// hardware, where SHA-384 (AES-256-GCM's hash) is computed in software —
/// measurably part of each handshake's CPU cost.
fn listener_cipher_suites() -> Vec<rustls::SupportedCipherSuite> {
    use rustls::crypto::ring::cipher_suite::*;
    vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ]
}

/// Builds the rustls server config for a TLS listener: TLS 1.2+, ALPN
/// `h2` (when `http2`) and `http/1.1`, cipher suite chosen by our order (see
/// [`listener_cipher_suites`]).
pub fn server_config(
    pairs: &[CertPair],
    http2: bool,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = CryptoProvider {
        cipher_suites: listener_cipher_suites(),
        ..provider()
    };
    let mut exact = HashMap::new();
    let mut wildcard = HashMap::new();
    let mut default = None;
    for pair in pairs {
        let certified = Arc::new(pair.certified_key(&provider)?);
        if pair.self_signed {
            tracing::warn!(
                cert = %pair.cert_path.display(),
                "serving a self-signed development certificate; browsers will not trust it"
            );
        }
        for name in &pair.names {
            let table = match name.strip_prefix("*.") {
                Some(parent) => wildcard.entry(parent.to_owned()),
                None => exact.entry(name.clone()),
            };
            table.or_insert_with(|| certified.clone());
        }
        default.get_or_insert(certified);
    }
    let default = default.ok_or(TlsError::NoCertificates)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::ProtocolVersions)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver {
            exact,
            wildcard,
            default,
        }));
    // Most preferred first: a browser offering both gets h2.
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

/// Client config for `tls = true` upstreams: webpki roots plus the upstream's `ca`.
pub fn upstream_client_config(
    extra_roots: &[CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra_roots {
        roots.add(cert.clone()).map_err(TlsError::UnusableCa)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::ProtocolVersions)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A self-signed ECDSA P-256 certificate for `names`, as (certificate PEM, key PEM).
pub fn generate_dev_certificate(names: &[String]) -> Result<(String, String), rcgen::Error> {
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "wsgate development certificate");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;

    #[test]
    fn a_missing_file_names_it_and_keeps_the_io_error_as_source() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.pem");
        let error = load_certificates(&path).unwrap_err();
        assert!(matches!(error, TlsError::Read { .. }), "{error:?}");
        let prefix = format!("cannot read {}: ", path.display());
        assert!(error.to_string().starts_with(&prefix), "{error}");
        assert!(error.source().is_some());
    }

    #[test]
    fn a_pem_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "nothing here\n").unwrap();
        let error = load_certificates(&path).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("{} holds no CERTIFICATE block", path.display())
        );
    }

    #[test]
    fn a_missing_key_is_the_key_files_problem() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_pem, _) = generate_dev_certificate(&["localhost".to_owned()]).unwrap();
        let cert = dir.path().join("dev.crt");
        std::fs::write(&cert, cert_pem).unwrap();
        let key = dir.path().join("dev.key");
        let error = CertPair::load(&cert, &key).unwrap_err();
        assert_eq!(error.key, "key");
        assert!(matches!(error.source, TlsError::Key { .. }), "{error:?}");
        assert!(
            error
                .source
                .to_string()
                .starts_with("cannot read a private key from "),
            "{error}"
        );
    }

    #[test]
    fn server_config_needs_a_certificate() {
        let error = server_config(&[], true).unwrap_err();
        assert!(matches!(error, TlsError::NoCertificates));
    }
}
