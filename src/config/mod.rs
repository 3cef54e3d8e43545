//! Configuration: TOML text → [`raw`] serde structs → validated [`Config`].
//!
//! Parsing stops at the first structural problem (bad TOML, unknown key, wrong
//! type); validation then collects *every* problem it can find, each with its
//! TOML key path, so `wsgate check` can list them all at once. The engine only
//! ever sees [`Config`], never TOML.

pub(crate) mod auth;
mod keys;
pub(crate) mod raw;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use crate::policy::auth::AuthPolicy;
use crate::policy::origin::OriginPattern;
pub use crate::policy::{MissingOrigin, OriginChecks, OriginMode, RoutePolicy, WebSocketMode};
use crate::tls::CertPair;

/// One problem in the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// TOML key path such as `route[0].origins[1]`; empty for whole-file problems.
    pub key: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.line, self.key.is_empty()) {
            (Some(line), false) => write!(f, "{} (line {}): {}", self.key, line, self.message),
            (Some(line), true) => write!(f, "line {}: {}", line, self.message),
            (None, false) => write!(f, "{}: {}", self.key, self.message),
            (None, true) => f.write_str(&self.message),
        }
    }
}

/// Every problem found in one config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    pub source: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        write!(
            f,
            "{}: {} problem{}",
            self.source.display(),
            count,
            if count == 1 { "" } else { "s" }
        )?;
        for problem in &self.problems {
            write!(f, "\n  {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Collects problems during validation; each helper records and returns `None`.
pub struct Problems {
    list: Vec<Problem>,
}

impl Problems {
    pub fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.list.push(Problem {
            key: key.into(),
            line: None,
            message: message.into(),
        });
    }

    pub fn duration(&mut self, key: &str, text: Option<&str>, default: Duration) -> Duration {
        let Some(text) = text else { return default };
        match humantime::parse_duration(text) {
            Ok(value) => value,
            Err(error) => {
                self.add(
                    key,
                    format!(
                        "{text:?} is not a duration such as \"500ms\", \"30s\" or \"24h\" ({error})"
                    ),
                );
                default
            }
        }
    }

    /// A duration that would cut every connection at zero: `"0s"` is an error.
    pub fn nonzero_duration(
        &mut self,
        key: &str,
        text: Option<&str>,
        default: Duration,
    ) -> Duration {
        let value = self.duration(key, text, default);
        if value.is_zero() {
            self.add(
                key,
                "0s would cut every connection at once; leave the key out for the default",
            );
            return default;
        }
        value
    }

    pub fn cidrs(&mut self, key: &str, list: &[String]) -> Vec<IpNet> {
        let mut nets = Vec::with_capacity(list.len());
        for (index, text) in list.iter().enumerate() {
            match parse_cidr(text) {
                Some(net) => nets.push(net),
                None => self.add(
                    format!("{key}[{index}]"),
                    format!("{text:?} is not an IP address or CIDR block such as \"10.0.0.0/8\" or \"::1/128\""),
                ),
            }
        }
        nets
    }
}

/// Accepts `10.0.0.0/8` and a bare address (a /32 or /128). An IPv4-mapped
/// IPv6 block (`::ffff:10.0.0.0/104`) becomes its IPv4 block, because client
/// addresses are compared in their IPv4 form; kept as IPv6 it would never match.
fn parse_cidr(text: &str) -> Option<IpNet> {
    let text = text.trim();
    let net = text
        .parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<std::net::IpAddr>().ok().map(IpNet::from))?
        .trunc();
    if let IpNet::V6(v6) = net {
        if let (Some(v4), true) = (v6.addr().to_ipv4_mapped(), v6.prefix_len() >= 96) {
            return ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .ok()
                .map(IpNet::V4);
        }
    }
    Some(net)
}

/// The validated configuration the engine runs on.
#[derive(Debug)]
pub struct Config {
    pub listeners: Vec<ListenerConfig>,
    pub server: ServerConfig,
    pub admin: Option<SocketAddr>,
    pub upstreams: BTreeMap<String, Arc<UpstreamConfig>>,
    pub routes: Vec<Arc<RouteConfig>>,
}

#[derive(Debug)]
pub struct ListenerConfig {
    pub addr: SocketAddr,
    /// Absent: plaintext. The first pair is the default when SNI matches none.
    pub tls: Option<Vec<CertPair>>,
    pub proxy_protocol: bool,
    /// TLS listeners offer ALPN `h2` beside `http/1.1`; plaintext ones
    /// speak HTTP/1.1 only either way.
    pub http2: bool,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Peers whose X-Forwarded-*/Forwarded/PROXY data is believed.
    pub trusted_proxies: Vec<IpNet>,
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
    pub drain_timeout: Duration,
    /// The Close code every tunnel gets on drain: 1012 or 1001.
    pub drain_close_code: u16,
    /// The window over which a drain's Close frames are spread.
    pub drain_spread: Duration,
    /// How long listeners keep accepting after `/readyz` turned 503.
    pub drain_delay: Duration,
    /// A TLS handshake that has not finished by then is dropped.
    pub tls_handshake_timeout: Duration,
    /// Runtime threads; `None` = one per CPU. `Some(1)` runs everything on
    /// one thread with no cross-thread wake-ups (like one nginx worker).
    pub worker_threads: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    LeastConn,
    /// Consistent hashing of the upstream's `hash_key`, with bounded load.
    Hash,
}

/// What `balance = "hash"` hashes. A request without it falls back to
/// least_conn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    /// Cookie names are case-sensitive (RFC 6265 §5.4).
    Cookie(String),
    /// Lower-cased, as header names compare.
    Header(http::HeaderName),
    Query(String),
}

/// Passive health: this many failures in a row take a server out of
/// rotation for `fail_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassiveHealth {
    pub max_fails: u32,
    pub fail_timeout: Duration,
}

/// A rate as configured: `count` per `period`, also the burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub period: Duration,
}

impl Rate {
    /// `"N/s"` or `"N/m"` with N ≥ 1.
    pub fn parse(text: &str) -> Option<Rate> {
        let (count, unit) = text.trim().split_once('/')?;
        let count: u32 = count.trim().parse().ok().filter(|&count| count > 0)?;
        let period = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            _ => return None,
        };
        Some(Rate { count, period })
    }
}

/// A route's per-client limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientLimits {
    /// Open tunnels plus in-flight requests of one client IP on the route.
    pub max_connections_per_ip: Option<usize>,
    /// New upgrades per client IP.
    pub handshake_rate: Option<Rate>,
}

#[derive(Debug)]
pub struct UpstreamConfig {
    pub name: String,
    /// `host:port` as written; resolved at connect time so DNS changes are seen.
    pub servers: Vec<String>,
    pub balance: Balance,
    pub connect_timeout: Duration,
    /// Present: connect with TLS, verified against webpki roots plus these CAs.
    pub tls: Option<UpstreamTls>,
    pub health_check: Option<HealthCheck>,
    pub hash_key: HashKey,
    pub sticky_cookie: Option<String>,
    pub passive_health: PassiveHealth,
}

/// Active health checking: a `GET path` to every server each `interval`;
/// a server that fails gets no new connections until it passes again.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
}

#[derive(Debug)]
pub struct UpstreamTls {
    pub extra_roots: Vec<rustls_pki_types::CertificateDer<'static>>,
}

#[derive(Debug)]
pub struct RouteConfig {
    /// Label in logs and metrics.
    pub name: String,
    /// Lower-case, without port or trailing dot.
    pub host: Option<String>,
    /// Always starts with `/`; never ends with `/` unless it is `/`.
    pub path: String,
    pub upstream: Arc<UpstreamConfig>,
    /// What admission checks on this route, besides the token.
    pub policy: RoutePolicy,
    pub tunnel: TunnelConfig,
    pub limits: ClientLimits,
    pub handshake_timeout: Duration,
    pub auth: Option<Arc<AuthPolicy>>,
}

/// What a route's tunnels enforce after the 101.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelConfig {
    /// No byte either way for this long: Close 1001 to both sides.
    pub idle_timeout: Duration,
    pub ping: Option<Liveness>,
    /// The largest data message (all fragments) passed either way.
    pub max_message_bytes: Option<u64>,
    /// Data messages from the client, enforced by not reading.
    pub client_message_rate: Option<Rate>,
}

/// Dead-peer detection: a Ping to a client silent for `interval`, and the
/// client counted dead if nothing arrives within `timeout` of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    pub interval: Duration,
    pub timeout: Duration,
}

impl TunnelConfig {
    /// Only an idle timeout: the tunnel of a route with no other settings.
    pub fn idle_only(idle_timeout: Duration) -> TunnelConfig {
        TunnelConfig {
            idle_timeout,
            ping: None,
            max_message_bytes: None,
            client_message_rate: None,
        }
    }
}

pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// The most a drain spreads its Close frames over by default: long enough
/// to spare the other instances a reconnect storm, short enough for a
/// rolling deploy.
pub const MAX_DEFAULT_DRAIN_SPREAD: Duration = Duration::from_secs(5);

impl Config {
    /// Reads and validates the file at `path`; relative paths inside it resolve
    /// against its folder.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigErrors {
            source: path.to_path_buf(),
            problems: vec![Problem {
                key: String::new(),
                line: None,
                message: format!("cannot read the config file: {error}"),
            }],
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, base).map_err(|problems| ConfigErrors {
            source: path.to_path_buf(),
            problems,
        })
    }

    /// What is valid but almost certainly not meant: printed by `check`
    /// (which still exits 0) and logged at start.
    pub fn warnings(&self) -> Vec<Problem> {
        self.routes
            .iter()
            .enumerate()
            .filter(|(_, route)| {
                let policy = &route.policy;
                policy.websocket != WebSocketMode::Forbidden
                    && policy.origins.is_empty()
                    && policy.missing_origin == MissingOrigin::Reject
                    && policy.origin_mode == OriginMode::Enforce
            })
            .map(|(index, route)| Problem {
                key: format!("route[{index}]"),
                line: None,
                message: format!(
                    "route {:?} can never upgrade: it allows no origin and refuses a missing one; add `origins`, set missing_origin = \"allow\" for non-browser clients, or websocket = \"forbidden\"",
                    route.name
                ),
            })
            .collect()
    }

    /// Parses and validates config text; `base` is the folder relative paths start from.
    pub fn parse(text: &str, base: &Path) -> Result<Config, Vec<Problem>> {
        Config::parse_around_syntax_errors(text, base, 0)
    }

    /// One syntax error must not hide the file's other problems: the line
    /// it is on is blanked (so line numbers stay) and the rest parsed and
    /// validated again, for a few errors at most. A required key that the
    /// blanked line held would be reported missing; that is the syntax
    /// error's doing, so such reports are left out.
    fn parse_around_syntax_errors(
        text: &str,
        base: &Path,
        depth: usize,
    ) -> Result<Config, Vec<Problem>> {
        const MAX_SYNTAX_ERRORS: usize = 8;
        let (raw, unknown_keys) = match parse_raw(text) {
            Ok(parsed) => parsed,
            Err(Unparsed::Syntax(problem)) => {
                let mut problems = vec![problem.clone()];
                if let Some(line) = problem.line.filter(|_| depth + 1 < MAX_SYNTAX_ERRORS) {
                    let rest = blank_line(text, line);
                    if let Err(more) = Config::parse_around_syntax_errors(&rest, base, depth + 1) {
                        for more in more {
                            if !more.message.starts_with("missing field")
                                && !problems.contains(&more)
                            {
                                problems.push(more);
                            }
                        }
                    }
                }
                return Err(problems);
            }
            Err(Unparsed::Structure(problems)) => return Err(problems),
        };
        let mut problems = Problems { list: unknown_keys };
        let config = validate(raw, base, &mut problems);
        if problems.list.is_empty() {
            Ok(config)
        } else {
            Err(problems.list)
        }
    }
}

/// Structural problems stop parsing (nothing sensible can be validated after
/// a type error); unknown keys do not, so they are returned beside the config.
/// Why a file did not deserialise.
enum Unparsed {
    /// Not TOML at all, at one place.
    Syntax(Problem),
    /// TOML, but not wsgate's shape (a wrong type, a missing key).
    Structure(Vec<Problem>),
}

/// `text` with its 1-based line `line` emptied.
fn blank_line(text: &str, line: usize) -> String {
    text.split('\n')
        .enumerate()
        .map(|(index, content)| if index + 1 == line { "" } else { content })
        .collect::<Vec<_>>()
        .join("\n")
}

fn parse_raw(text: &str) -> Result<(raw::RawConfig, Vec<Problem>), Unparsed> {
    let deserializer = toml::Deserializer::parse(text)
        .map_err(|error| Unparsed::Syntax(toml_problem(text, String::new(), &error)))?;
    let mut unknown = Vec::new();
    let mut record = |path: serde_ignored::Path<'_>| unknown.push(keys::steps(&path));
    let raw = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(
        deserializer,
        &mut record,
    ))
    .map_err(|error| {
        let key = error.path().to_string();
        let key = if key == "." { String::new() } else { key };
        let missing = missing_field(&error.inner().to_string());
        // A misspelt required key shows twice: as unknown, and as the
        // required one missing. The unknown key is the one to report.
        let misspelt = missing.as_deref().and_then(|field| {
            unknown.iter().position(|steps| {
                let parent = keys::display(&steps[..steps.len().saturating_sub(1)]);
                let name = match steps.last() {
                    Some(keys::Step::Key(name)) => name.as_str(),
                    _ => "",
                };
                (parent == key || key.is_empty()) && strsim::damerau_levenshtein(name, field) <= 2
            })
        });
        let mut problems = unknown_problems(text, &unknown, missing.as_deref(), misspelt);
        if misspelt.is_none() {
            problems.push(toml_problem(text, key, error.inner()));
        }
        Unparsed::Structure(problems)
    })?;
    Ok((raw, unknown_problems(text, &unknown, None, None)))
}

fn unknown_problems(
    text: &str,
    unknown: &[Vec<keys::Step>],
    missing: Option<&str>,
    misspelt: Option<usize>,
) -> Vec<Problem> {
    unknown
        .iter()
        .enumerate()
        .map(|(index, steps)| Problem {
            key: keys::display(steps),
            line: keys::line_of(text, steps),
            message: match (misspelt == Some(index), missing) {
                (true, Some(field)) => format!("unknown key; did you mean `{field}`? (`{field}` is required here)"),
                _ => "unknown key (a typo?); see proxy.toml or the README for the keys this section takes".to_owned(),
            },
        })
        .collect()
}

/// The field of serde's "missing field `name`" error.
fn missing_field(message: &str) -> Option<String> {
    let rest = message.split("missing field `").nth(1)?;
    Some(rest.split('`').next()?.to_owned())
}

fn toml_problem(text: &str, key: String, error: &toml::de::Error) -> Problem {
    let line = error.span().map(|span| keys::line_at(text, span.start));
    Problem {
        key,
        line,
        message: error.message().trim().to_owned(),
    }
}

/// A file named in the config: relative to the config's folder, absolute as
/// written (`Path::join` keeps an absolute path).
pub(crate) fn resolve(base: &Path, file: &str) -> PathBuf {
    base.join(file)
}

fn validate(raw: raw::RawConfig, base: &Path, problems: &mut Problems) -> Config {
    if raw.listener.is_empty() {
        problems.add("listener", "at least one [[listener]] is needed");
    }
    let listeners = raw
        .listener
        .iter()
        .enumerate()
        .filter_map(|(index, listener)| {
            validate_listener(&format!("listener[{index}]"), listener, base, problems)
        })
        .collect();

    let server = validate_server(&raw.server, problems);
    let admin = raw
        .admin
        .as_ref()
        .and_then(|admin| parse_addr("admin.addr", &admin.addr, problems));

    let mut upstreams = BTreeMap::new();
    for (name, upstream) in &raw.upstream {
        let valid = validate_upstream(name, upstream, base, problems);
        upstreams.insert(name.clone(), Arc::new(valid));
    }
    let routes = raw
        .route
        .iter()
        .enumerate()
        .filter_map(|(index, route)| {
            validate_route(index, route, base, &upstreams, problems).map(Arc::new)
        })
        .collect::<Vec<_>>();
    if raw.route.is_empty() {
        problems.add("route", "at least one [[route]] is needed");
    }
    check_duplicate_routes(&routes, problems);

    Config {
        listeners,
        server,
        admin,
        upstreams,
        routes,
    }
}

fn parse_addr(key: &str, text: &str, problems: &mut Problems) -> Option<SocketAddr> {
    match text.parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(_) => {
            problems.add(
                key,
                format!("{text:?} is not an address such as \"0.0.0.0:8443\" or \"[::]:8443\""),
            );
            None
        }
    }
}

fn validate_listener(
    key: &str,
    raw: &raw::RawListener,
    base: &Path,
    problems: &mut Problems,
) -> Option<ListenerConfig> {
    let addr = parse_addr(&format!("{key}.addr"), &raw.addr, problems);
    let tls = match &raw.tls {
        None => None,
        Some(tls) => {
            if tls.certs.is_empty() {
                problems.add(
                    format!("{key}.tls.certs"),
                    "a TLS listener needs at least one certificate",
                );
            }
            let mut pairs = Vec::new();
            for (index, pair) in tls.certs.iter().enumerate() {
                let pair_key = format!("{key}.tls.certs[{index}]");
                match CertPair::load(&resolve(base, &pair.cert), &resolve(base, &pair.key)) {
                    Ok(loaded) => pairs.push(loaded),
                    Err(error) => problems.add(
                        format!("{pair_key}.{}", error.key),
                        error.source.to_string(),
                    ),
                }
            }
            Some(pairs)
        }
    };
    Some(ListenerConfig {
        addr: addr?,
        tls,
        proxy_protocol: raw.proxy_protocol,
        http2: raw.http2.unwrap_or(true),
    })
}

fn validate_server(raw: &raw::RawServer, problems: &mut Problems) -> ServerConfig {
    let positive =
        |problems: &mut Problems, key: &str, value: Option<i64>, default: usize, min: usize| {
            match value {
                None => default,
                Some(value) if value >= min as i64 => value as usize,
                Some(value) => {
                    problems.add(
                        key,
                        format!("{value} is too small; the least allowed is {min}"),
                    );
                    default
                }
            }
        };
    let drain_timeout = problems.duration(
        "server.drain_timeout",
        raw.drain_timeout.as_deref(),
        Duration::from_secs(30),
    );
    let drain_close_code = match raw.drain_close_code {
        None => 1012,
        Some(code @ (1001 | 1012)) => code as u16,
        Some(code) => {
            problems.add(
                "server.drain_close_code",
                format!(
                    "{code} is not 1012 (Service Restart) or 1001 (Going Away); clients reconnect on those, and give up on most others"
                ),
            );
            1012
        }
    };
    let drain_spread = match raw.drain_spread.as_deref() {
        None => (drain_timeout / 2).min(MAX_DEFAULT_DRAIN_SPREAD),
        Some(text) => {
            let spread = problems.duration("server.drain_spread", Some(text), Duration::ZERO);
            if spread > drain_timeout {
                problems.add(
                    "server.drain_spread",
                    format!(
                        "{text:?} is longer than drain_timeout ({}): tunnels would be cut before their Close",
                        humantime::format_duration(drain_timeout)
                    ),
                );
            }
            spread
        }
    };
    ServerConfig {
        trusted_proxies: problems.cidrs("server.trusted_proxies", &raw.trusted_proxies),
        max_connections: positive(
            problems,
            "server.max_connections",
            raw.max_connections,
            100_000,
            1,
        ),
        header_timeout: problems.nonzero_duration(
            "server.header_timeout",
            raw.header_timeout.as_deref(),
            Duration::from_secs(10),
        ),
        max_header_bytes: positive(
            problems,
            "server.max_header_bytes",
            raw.max_header_bytes,
            16_384,
            1024,
        ),
        drain_timeout,
        drain_close_code,
        drain_spread,
        drain_delay: problems.duration(
            "server.drain_delay",
            raw.drain_delay.as_deref(),
            Duration::ZERO,
        ),
        tls_handshake_timeout: Duration::from_secs(10),
        worker_threads: match raw.worker_threads {
            None | Some(0) => None,
            Some(count @ 1..=1024) => Some(count as usize),
            Some(count) => {
                problems.add(
                    "server.worker_threads",
                    format!("{count} is not between 0 (one per CPU) and 1024"),
                );
                None
            }
        },
    }
}

fn validate_upstream(
    name: &str,
    raw: &raw::RawUpstream,
    base: &Path,
    problems: &mut Problems,
) -> UpstreamConfig {
    let key = format!("upstream.{name}");
    if raw.servers.is_empty() {
        problems.add(
            format!("{key}.servers"),
            "an upstream needs at least one server",
        );
    }
    for (index, server) in raw.servers.iter().enumerate() {
        let valid = server.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port > 0)
        });
        if !valid {
            problems.add(
                format!("{key}.servers[{index}]"),
                format!("{server:?} is not host:port such as \"127.0.0.1:9000\" or \"backend.internal:9000\""),
            );
        }
    }
    let balance = match raw.balance.as_deref() {
        None | Some("round_robin") => Balance::RoundRobin,
        Some("least_conn") => Balance::LeastConn,
        Some("hash") => Balance::Hash,
        Some(other) => {
            problems.add(
                format!("{key}.balance"),
                format!("{other:?} is not \"round_robin\", \"least_conn\" or \"hash\""),
            );
            Balance::RoundRobin
        }
    };
    let hash_key = match raw.hash_key.as_deref() {
        None | Some("client_ip") => HashKey::ClientIp,
        Some(text) => match parse_hash_key(text) {
            Some(hash_key) => hash_key,
            None => {
                problems.add(
                    format!("{key}.hash_key"),
                    format!("{text:?} is not \"client_ip\", \"cookie:NAME\", \"header:NAME\" or \"query:NAME\""),
                );
                HashKey::ClientIp
            }
        },
    };
    if raw.hash_key.is_some() && balance != Balance::Hash {
        problems.add(
            format!("{key}.hash_key"),
            "only meaningful together with balance = \"hash\"",
        );
    }
    let sticky_cookie = raw.sticky_cookie.clone();
    if let Some(name) = &sticky_cookie {
        if name.is_empty() || !name.bytes().all(crate::headers::is_token_byte) {
            problems.add(
                format!("{key}.sticky_cookie"),
                format!("{name:?} is not a cookie name (an HTTP token)"),
            );
        }
    }
    let max_fails = match raw.max_fails {
        None => 3,
        Some(count @ 1..=1_000_000) => count as u32,
        Some(count) => {
            problems.add(
                format!("{key}.max_fails"),
                format!("{count} is not a count of at least 1"),
            );
            3
        }
    };
    let fail_timeout = problems.duration(
        &format!("{key}.fail_timeout"),
        raw.fail_timeout.as_deref(),
        Duration::from_secs(10),
    );
    let connect_timeout = problems.nonzero_duration(
        &format!("{key}.connect_timeout"),
        raw.connect_timeout.as_deref(),
        Duration::from_secs(3),
    );
    let tls = if raw.tls {
        let mut extra_roots = Vec::new();
        if let Some(ca) = &raw.ca {
            match crate::tls::load_certificates(&resolve(base, ca)) {
                Ok(certs) => extra_roots = certs,
                Err(error) => problems.add(format!("{key}.ca"), error.to_string()),
            }
        }
        Some(UpstreamTls { extra_roots })
    } else {
        if raw.ca.is_some() {
            problems.add(format!("{key}.ca"), "`ca` only applies with `tls = true`");
        }
        None
    };
    let health_check = raw.health_check.as_ref().map(|check| {
        if !check.path.starts_with('/') {
            problems.add(
                format!("{key}.health_check.path"),
                format!("{:?} must start with /", check.path),
            );
        }
        let interval = problems.duration(
            &format!("{key}.health_check.interval"),
            check.interval.as_deref(),
            Duration::from_secs(5),
        );
        if interval.is_zero() {
            problems.add(
                format!("{key}.health_check.interval"),
                "must be longer than zero",
            );
        }
        HealthCheck {
            path: check.path.clone(),
            interval,
        }
    });
    UpstreamConfig {
        name: name.to_owned(),
        servers: raw.servers.clone(),
        balance,
        connect_timeout,
        tls,
        health_check,
        hash_key,
        sticky_cookie,
        passive_health: PassiveHealth {
            max_fails,
            fail_timeout,
        },
    }
}

fn parse_hash_key(text: &str) -> Option<HashKey> {
    let (kind, name) = text.split_once(':')?;
    if name.is_empty() {
        return None;
    }
    match kind {
        "cookie" if name.bytes().all(crate::headers::is_token_byte) => {
            Some(HashKey::Cookie(name.to_owned()))
        }
        "header" => http::HeaderName::from_bytes(name.as_bytes())
            .ok()
            .map(HashKey::Header),
        "query" => Some(HashKey::Query(name.to_owned())),
        _ => None,
    }
}

/// Lower-cases a route's `host` and drops a trailing dot, as requests are normalised.
pub fn normalise_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

fn validate_route(
    index: usize,
    raw: &raw::RawRoute,
    base: &Path,
    upstreams: &BTreeMap<String, Arc<UpstreamConfig>>,
    problems: &mut Problems,
) -> Option<RouteConfig> {
    let key = format!("route[{index}]");
    let host = raw.host.as_deref().map(normalise_host);
    if let Some(host) = &host {
        if host.is_empty() || host.contains(['/', ':', ' ']) {
            problems.add(
                format!("{key}.host"),
                format!("{host:?} is not a host name (no scheme, port or path)"),
            );
        }
    }
    let path = raw.path.clone().unwrap_or_else(|| "/".to_owned());
    if !path.starts_with('/') || path.contains(['?', '#']) {
        problems.add(
            format!("{key}.path"),
            format!("{path:?} must start with / and have no query"),
        );
    }
    let path = if path.len() > 1 {
        path.trim_end_matches('/').to_owned()
    } else {
        path
    };

    let upstream = upstreams.get(&raw.upstream).cloned();
    if upstream.is_none() {
        problems.add(
            format!("{key}.upstream"),
            format!("no [upstream.{}] is defined", raw.upstream),
        );
    }

    let websocket = match raw.websocket.as_deref() {
        None | Some("allowed") => WebSocketMode::Allowed,
        Some("required") => WebSocketMode::Required,
        Some("forbidden") => WebSocketMode::Forbidden,
        Some(other) => {
            problems.add(
                format!("{key}.websocket"),
                format!("{other:?} is not \"required\", \"allowed\" or \"forbidden\""),
            );
            WebSocketMode::Allowed
        }
    };

    let mut origins = Vec::new();
    for (position, text) in raw.origins.iter().flatten().enumerate() {
        let origin_key = format!("{key}.origins[{position}]");
        match OriginPattern::parse(text) {
            Ok(OriginPattern::Any) if !raw.allow_any_origin => problems.add(
                origin_key,
                "\"*\" lets every web page open this socket with the user's cookies; set `allow_any_origin = true` on the route if that is really meant",
            ),
            Ok(pattern) => origins.push(pattern),
            Err(error) => problems.add(origin_key, format!("{text:?} is not an origin pattern: {error}")),
        }
    }
    if raw.allow_any_origin && !origins.contains(&OriginPattern::Any) {
        problems.add(
            format!("{key}.allow_any_origin"),
            "only meaningful together with origins = [\"*\"]",
        );
    }

    let missing_origin = match raw.missing_origin.as_deref() {
        None | Some("reject") => MissingOrigin::Reject,
        Some("allow") => MissingOrigin::Allow,
        Some(other) => {
            problems.add(
                format!("{key}.missing_origin"),
                format!("{other:?} is not \"reject\" or \"allow\""),
            );
            MissingOrigin::Reject
        }
    };
    let origin_mode = match raw.origin_mode.as_deref() {
        None | Some("enforce") => OriginMode::Enforce,
        Some("report") => OriginMode::Report,
        Some(other) => {
            problems.add(
                format!("{key}.origin_mode"),
                format!("{other:?} is not \"enforce\" or \"report\""),
            );
            OriginMode::Enforce
        }
    };
    if let Some(list) = &raw.subprotocols {
        if list.is_empty() {
            problems.add(
                format!("{key}.subprotocols"),
                "an empty list would refuse every client; leave the key out instead",
            );
        }
        for (position, token) in list.iter().enumerate() {
            if token.is_empty() || !token.bytes().all(crate::headers::is_token_byte) {
                problems.add(
                    format!("{key}.subprotocols[{position}]"),
                    format!("{token:?} is not an HTTP token"),
                );
            }
        }
    }
    let idle_timeout = problems.nonzero_duration(
        &format!("{key}.idle_timeout"),
        raw.idle_timeout.as_deref(),
        DEFAULT_IDLE_TIMEOUT,
    );
    let ping = match (raw.ping_interval.as_deref(), raw.ping_timeout.as_deref()) {
        (None, None) => None,
        (None, Some(_)) => {
            problems.add(
                format!("{key}.ping_timeout"),
                "only meaningful together with ping_interval",
            );
            None
        }
        (Some(interval), timeout) => {
            let interval_key = format!("{key}.ping_interval");
            let interval = problems.duration(&interval_key, Some(interval), Duration::ZERO);
            let timeout_key = format!("{key}.ping_timeout");
            let timeout = problems.duration(&timeout_key, timeout, DEFAULT_PING_TIMEOUT);
            if interval.is_zero() {
                problems.add(interval_key, "must be longer than 0s");
            }
            if timeout.is_zero() {
                problems.add(timeout_key, "must be longer than 0s");
            }
            Some(Liveness { interval, timeout })
        }
    };
    let rate = |problems: &mut Problems, name: &str, text: Option<&str>| {
        let text = text?;
        let rate = Rate::parse(text);
        if rate.is_none() {
            problems.add(
                format!("{key}.{name}"),
                format!("{text:?} is not a rate such as \"10/s\" or \"100/m\""),
            );
        }
        rate
    };
    let handshake_rate = rate(problems, "handshake_rate", raw.handshake_rate.as_deref());
    let client_message_rate = rate(
        problems,
        "client_message_rate",
        raw.client_message_rate.as_deref(),
    );
    let max_connections_per_ip = match raw.max_connections_per_ip {
        None => None,
        Some(count) if count > 0 => Some(count as usize),
        Some(count) => {
            problems.add(
                format!("{key}.max_connections_per_ip"),
                format!("{count} is not a positive count"),
            );
            None
        }
    };
    let origin_checks = match raw.origin_checks.as_deref() {
        None | Some("upgrades") => OriginChecks::Upgrades,
        Some("all") => OriginChecks::All,
        Some(other) => {
            problems.add(
                format!("{key}.origin_checks"),
                format!("{other:?} is not \"upgrades\" or \"all\""),
            );
            OriginChecks::Upgrades
        }
    };
    let max_message_bytes = match raw.max_message_bytes {
        None => None,
        Some(bytes) if bytes > 0 => Some(bytes as u64),
        Some(bytes) => {
            problems.add(
                format!("{key}.max_message_bytes"),
                format!("{bytes} is not a positive number of bytes"),
            );
            None
        }
    };
    let handshake_timeout = problems.nonzero_duration(
        &format!("{key}.handshake_timeout"),
        raw.handshake_timeout.as_deref(),
        Duration::from_secs(10),
    );
    let allow_ips = raw
        .allow_ips
        .as_ref()
        .map(|list| problems.cidrs(&format!("{key}.allow_ips"), list));
    let deny_ips = problems.cidrs(
        &format!("{key}.deny_ips"),
        raw.deny_ips.as_deref().unwrap_or_default(),
    );
    let auth = raw
        .auth
        .as_ref()
        .and_then(|auth| auth::auth_policy(auth, base, &format!("{key}.auth"), problems))
        .map(Arc::new);

    let name = raw
        .name
        .clone()
        .unwrap_or_else(|| format!("{}{}", host.as_deref().unwrap_or(""), path));
    Some(RouteConfig {
        name,
        host,
        path,
        upstream: upstream?,
        policy: RoutePolicy {
            websocket,
            origins,
            missing_origin,
            origin_mode,
            origin_checks,
            subprotocols: raw.subprotocols.clone(),
            allow_ips,
            deny_ips,
        },
        tunnel: TunnelConfig {
            idle_timeout,
            ping,
            max_message_bytes,
            client_message_rate,
        },
        limits: ClientLimits {
            max_connections_per_ip,
            handshake_rate,
        },
        handshake_timeout,
        auth,
    })
}

fn check_duplicate_routes(routes: &[Arc<RouteConfig>], problems: &mut Problems) {
    for (later, route) in routes.iter().enumerate() {
        if let Some(earlier) = routes[..later]
            .iter()
            .position(|other| other.host == route.host && other.path == route.path)
        {
            problems.add(
                format!("route[{later}]"),
                format!("same host and path as route[{earlier}], so it could never be chosen"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_mapped_blocks_become_ipv4_blocks() {
        assert_eq!(
            parse_cidr("::ffff:127.0.0.0/104"),
            "127.0.0.0/8".parse().ok()
        );
        assert_eq!(parse_cidr("::ffff:10.1.2.3"), "10.1.2.3/32".parse().ok());
        assert_eq!(parse_cidr("::1"), "::1/128".parse().ok());
        assert_eq!(parse_cidr("10.9.9.9/8"), "10.0.0.0/8".parse().ok());
        assert_eq!(parse_cidr("::/0"), "::/0".parse().ok());
    }
}
