//! The config file exactly as serde reads it: strings where the engine wants
//! parsed types, so that every value can be validated with its key path.
//! Unknown keys are typos and are refused, but not here: serde would stop at
//! the first one, so [`super::keys`] collects them all while deserialising.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct RawConfig {
    #[serde(default)]
    pub listener: Vec<RawListener>,
    #[serde(default)]
    pub server: RawServer,
    pub admin: Option<RawAdmin>,
    #[serde(default)]
    pub upstream: BTreeMap<String, RawUpstream>,
    #[serde(default)]
    pub route: Vec<RawRoute>,
}

#[derive(Debug, Deserialize)]
pub struct RawListener {
    pub addr: String,
    pub tls: Option<RawTls>,
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Absent: offered (TLS listeners only; there is no cleartext h2).
    pub http2: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct RawTls {
    pub certs: Vec<RawCert>,
}

#[derive(Debug, Deserialize)]
pub struct RawCert {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawServer {
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    pub max_connections: Option<i64>,
    /// Threads serving connections; 0 or absent = one per CPU.
    pub worker_threads: Option<i64>,
    pub header_timeout: Option<String>,
    pub max_header_bytes: Option<i64>,
    pub drain_timeout: Option<String>,
    pub drain_close_code: Option<i64>,
    pub drain_spread: Option<String>,
    pub drain_delay: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawAdmin {
    pub addr: String,
}

#[derive(Debug, Deserialize)]
pub struct RawUpstream {
    pub servers: Vec<String>,
    pub balance: Option<String>,
    pub connect_timeout: Option<String>,
    #[serde(default)]
    pub tls: bool,
    pub ca: Option<String>,
    pub health_check: Option<RawHealthCheck>,
    pub hash_key: Option<String>,
    pub sticky_cookie: Option<String>,
    pub max_fails: Option<i64>,
    pub fail_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawHealthCheck {
    pub path: String,
    pub interval: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawRoute {
    /// Label for logs and metrics; defaults to `host` + `path`.
    pub name: Option<String>,
    pub host: Option<String>,
    pub path: Option<String>,
    pub upstream: String,
    pub websocket: Option<String>,
    pub origins: Option<Vec<String>>,
    #[serde(default)]
    pub allow_any_origin: bool,
    pub missing_origin: Option<String>,
    pub origin_mode: Option<String>,
    pub subprotocols: Option<Vec<String>>,
    pub idle_timeout: Option<String>,
    pub ping_interval: Option<String>,
    pub ping_timeout: Option<String>,
    pub max_message_bytes: Option<i64>,
    pub max_connections_per_ip: Option<i64>,
    pub handshake_rate: Option<String>,
    pub client_message_rate: Option<String>,
    pub origin_checks: Option<String>,
    pub handshake_timeout: Option<String>,
    pub allow_ips: Option<Vec<String>>,
    pub deny_ips: Option<Vec<String>>,
    pub auth: Option<RawAuth>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawAuth {
    pub jwt_secret_env: Option<String>,
    /// HS secret read from a file (Docker/Kubernetes secrets), trailing newline ignored.
    pub jwt_secret_file: Option<String>,
    pub jwt_public_key: Option<String>,
    pub jwks_file: Option<String>,
    pub token_query: Option<String>,
    pub token_cookie: Option<String>,
    pub required_scope: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Option<String>,
    #[serde(default)]
    pub forward_claims: BTreeMap<String, String>,
    #[serde(default)]
    pub strip_token: bool,
    pub forward: Option<String>,
    pub forward_timeout: Option<String>,
    /// Response headers of the forward-auth service copied to the upstream request.
    #[serde(default)]
    pub forward_response_headers: Vec<String>,
}
