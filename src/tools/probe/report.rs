//! The probe's findings: what each step saw, as one serialisable value
//! (`--json`) and as the readable report printed by default.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use super::verdict::Verdict;

#[derive(Serialize, Debug)]
pub struct Report {
    pub url: String,
    pub verdict: Verdict,
    pub fix: String,
    pub steps: Steps,
}

/// Each step in the order it ran; a step that never ran (its predecessor
/// failed) is `None` or empty.
#[derive(Serialize, Debug)]
pub struct Steps {
    pub dns: DnsStep,
    pub tcp: Option<TcpStep>,
    /// `None` for `ws://`.
    pub tls: Option<TlsStep>,
    pub upgrades: Vec<UpgradeStep>,
    pub hold: Option<HoldStep>,
}

#[derive(Serialize, Debug)]
pub struct DnsStep {
    pub host: String,
    pub addresses: Vec<IpAddr>,
    pub ms: f64,
    pub error: Option<String>,
}

#[derive(Serialize, Debug)]
pub struct TcpStep {
    /// The address that accepted, if any did.
    pub connected: Option<SocketAddr>,
    pub ms: f64,
    /// Addresses tried before one accepted (or all of them).
    pub failed: Vec<ConnectFailure>,
}

#[derive(Serialize, Debug)]
pub struct ConnectFailure {
    pub addr: SocketAddr,
    pub error: String,
}

#[derive(Serialize, Debug)]
pub struct TlsStep {
    /// The name sent as SNI and checked against the certificate.
    pub server_name: String,
    pub ok: bool,
    pub version: Option<String>,
    /// The protocol the server chose from the probe's offer (`http/1.1`).
    pub alpn: Option<String>,
    pub certificate: Option<CertInfo>,
    /// Whether the chain verified against the webpki roots and names the host.
    pub trusted: Option<bool>,
    /// Why it did not, when it did not.
    pub verify_error: Option<String>,
    /// `--insecure`: an untrusted certificate was accepted anyway.
    pub insecure: bool,
    pub ms: f64,
    pub error: Option<String>,
}

#[derive(Serialize, Debug, Clone)]
pub struct CertInfo {
    pub subject: String,
    /// DNS names and IP addresses from subjectAltName.
    pub names: Vec<String>,
    pub issuer: String,
    pub self_signed: bool,
    pub not_after: String,
    /// Negative once expired.
    pub days_left: i64,
    /// Whether one of `names` covers the URL's host.
    pub covers_host: bool,
}

/// Which `Origin` an upgrade attempt carried.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OriginFrom {
    /// The URL's own origin.
    Url,
    /// An `--origin`.
    Flag,
    /// No `Origin` header, as curl and server-side clients send.
    None,
}

/// Where an attempt carried `--token`.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TokenPlace {
    Query,
    Cookie,
    Bearer,
}

#[derive(Serialize, Debug, Clone)]
pub struct UpgradeStep {
    pub origin: Option<String>,
    pub origin_from: OriginFrom,
    pub token_in: Option<TokenPlace>,
    pub status: Option<u16>,
    pub status_text: Option<String>,
    pub wsgate_reason: Option<String>,
    pub www_authenticate: Option<String>,
    pub retry_after: Option<String>,
    /// A 101 with the right `Upgrade`, `Connection` and `Sec-WebSocket-Accept`.
    pub upgraded: bool,
    /// What was wrong with a 101 that did not count as upgraded.
    pub problem: Option<String>,
    /// The start of a refusal's body, tags removed.
    pub body: Option<String>,
    /// No answer: the connection, TLS or the read failed.
    pub error: Option<String>,
    pub ms: f64,
}

impl UpgradeStep {
    pub fn new(
        origin: Option<String>,
        origin_from: OriginFrom,
        token_in: Option<TokenPlace>,
    ) -> Self {
        UpgradeStep {
            origin,
            origin_from,
            token_in,
            status: None,
            status_text: None,
            wsgate_reason: None,
            www_authenticate: None,
            retry_after: None,
            upgraded: false,
            problem: None,
            body: None,
            error: None,
            ms: 0.0,
        }
    }

    /// Carried a browser's `Origin` (the URL's own or an `--origin`).
    pub fn is_browser(&self) -> bool {
        self.origin_from != OriginFrom::None
    }
}

/// How the `--hold` connection ended.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HoldEnd {
    /// Still open when the hold was over.
    Open,
    /// The server sent a Close frame.
    Close,
    /// The connection ended with no Close frame: what a browser reports as 1006.
    Cut,
    /// It could not be opened (no attempt upgraded, or this one was refused).
    Failed,
}

#[derive(Serialize, Debug)]
pub struct HoldStep {
    pub requested_ms: f64,
    /// Which attempt's headers the held connection repeated.
    pub origin: Option<String>,
    pub token_in: Option<TokenPlace>,
    pub ended: HoldEnd,
    /// The Close code (1005 for a Close without one), 1006 for a cut.
    pub code: Option<u16>,
    pub close_reason: Option<String>,
    /// Since the 101.
    pub after_ms: Option<f64>,
    pub pings_answered: u64,
    pub messages_received: u64,
    pub error: Option<String>,
}

pub fn millis(duration: std::time::Duration) -> f64 {
    (duration.as_secs_f64() * 10_000.0).round() / 10.0
}

/// Left column width of the text report.
const LABEL: usize = 9;

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "wsgate probe {}", self.url)?;
        let steps = &self.steps;
        write_dns(f, &steps.dns)?;
        if let Some(tcp) = &steps.tcp {
            write_tcp(f, tcp)?;
        }
        if let Some(tls) = &steps.tls {
            write_tls(f, tls)?;
        }
        for attempt in &steps.upgrades {
            write_upgrade(f, attempt)?;
        }
        if let Some(hold) = &steps.hold {
            write_hold(f, hold)?;
        }
        line(f, "verdict", &self.verdict.to_string())?;
        line(f, "fix", &self.fix)
    }
}

fn line(f: &mut fmt::Formatter<'_>, label: &str, text: &str) -> fmt::Result {
    writeln!(f, "{label:<LABEL$}{text}")
}

fn more(f: &mut fmt::Formatter<'_>, text: &str) -> fmt::Result {
    line(f, "", text)
}

fn write_dns(f: &mut fmt::Formatter<'_>, dns: &DnsStep) -> fmt::Result {
    match &dns.error {
        Some(error) => line(f, "dns", &format!("{}: {error}", dns.host)),
        None => {
            let addresses: Vec<String> = dns.addresses.iter().map(ToString::to_string).collect();
            line(
                f,
                "dns",
                &format!("{} → {} ({} ms)", dns.host, addresses.join(", "), dns.ms),
            )
        }
    }
}

fn write_tcp(f: &mut fmt::Formatter<'_>, tcp: &TcpStep) -> fmt::Result {
    for failure in &tcp.failed {
        line(f, "tcp", &format!("{}: {}", failure.addr, failure.error))?;
    }
    match tcp.connected {
        Some(addr) => line(f, "tcp", &format!("connected to {addr} in {} ms", tcp.ms)),
        None => Ok(()),
    }
}

fn write_tls(f: &mut fmt::Formatter<'_>, tls: &TlsStep) -> fmt::Result {
    let head = match &tls.error {
        Some(error) => format!("handshake with {} failed: {error}", tls.server_name),
        None => format!(
            "{}, ALPN {} ({} ms)",
            tls.version.as_deref().unwrap_or("unknown version"),
            tls.alpn.as_deref().unwrap_or("none"),
            tls.ms
        ),
    };
    line(f, "tls", &head)?;
    if let Some(cert) = &tls.certificate {
        let expiry = if cert.days_left < 0 {
            format!("EXPIRED {} ({} days ago)", cert.not_after, -cert.days_left)
        } else {
            format!("expires {} (in {} days)", cert.not_after, cert.days_left)
        };
        let names = if cert.names.is_empty() {
            "no subjectAltName".to_owned()
        } else {
            cert.names.join(", ")
        };
        more(f, &format!("certificate for {names}; {expiry}"))?;
        let issuer = if cert.self_signed {
            "self-signed".to_owned()
        } else {
            format!("issued by {}", cert.issuer)
        };
        more(f, &format!("subject {}; {issuer}", cert.subject))?;
        if !cert.covers_host {
            more(
                f,
                &format!("{} is not among the certificate's names", tls.server_name),
            )?;
        }
    }
    match (tls.trusted, &tls.verify_error) {
        (Some(true), _) => more(f, "chain verified against the webpki roots"),
        (_, Some(error)) if tls.insecure => more(
            f,
            &format!("NOT trusted ({error}); accepted because of --insecure"),
        ),
        (_, Some(error)) if tls.error.is_none() => more(f, &format!("NOT trusted ({error})")),
        _ => Ok(()),
    }
}

fn write_upgrade(f: &mut fmt::Formatter<'_>, attempt: &UpgradeStep) -> fmt::Result {
    let origin = match (attempt.origin_from, &attempt.origin) {
        (OriginFrom::Url, Some(origin)) => format!("Origin {origin} (the URL's own)"),
        (OriginFrom::Flag, Some(origin)) => format!("Origin {origin} (--origin)"),
        _ => "no Origin".to_owned(),
    };
    let what = match attempt.token_in {
        None => origin,
        Some(TokenPlace::Query) => format!("token in the query, {origin}"),
        Some(TokenPlace::Cookie) => format!("token in a cookie, {origin}"),
        Some(TokenPlace::Bearer) => format!("token as Authorization: Bearer, {origin}"),
    };
    let outcome = match (&attempt.error, attempt.status) {
        (Some(error), _) => format!("no answer: {error}"),
        (None, Some(status)) => {
            let mut parts = vec![
                format!("{status} {}", attempt.status_text.as_deref().unwrap_or(""))
                    .trim_end()
                    .to_owned(),
            ];
            if attempt.upgraded {
                parts.push("Sec-WebSocket-Accept ok".to_owned());
            }
            if let Some(problem) = &attempt.problem {
                parts.push(problem.clone());
            }
            if let Some(reason) = &attempt.wsgate_reason {
                parts.push(format!("wsgate-reason: {reason}"));
            }
            if let Some(challenge) = &attempt.www_authenticate {
                parts.push(format!("WWW-Authenticate: {challenge}"));
            }
            if let Some(retry) = &attempt.retry_after {
                parts.push(format!("Retry-After: {retry}"));
            }
            parts.join(", ")
        }
        (None, None) => "no answer".to_owned(),
    };
    line(
        f,
        "upgrade",
        &format!("{what} → {outcome} ({} ms)", attempt.ms),
    )?;
    match &attempt.body {
        Some(body) => more(f, &format!("body: {body}")),
        None => Ok(()),
    }
}

fn write_hold(f: &mut fmt::Formatter<'_>, hold: &HoldStep) -> fmt::Result {
    let seconds = |ms: Option<f64>| format!("{:.2} s", ms.unwrap_or(0.0) / 1000.0);
    let text = match hold.ended {
        HoldEnd::Open => format!(
            "still open after {} (nothing closed it)",
            seconds(Some(hold.requested_ms))
        ),
        HoldEnd::Close => {
            let reason = match hold.close_reason.as_deref() {
                Some(reason) if !reason.is_empty() => format!(" {reason:?}"),
                _ => String::new(),
            };
            format!(
                "closed by the server with code {}{reason} after {}",
                hold.code.unwrap_or(1005),
                seconds(hold.after_ms)
            )
        }
        HoldEnd::Cut => format!(
            "cut without a Close frame (1006) after {}",
            seconds(hold.after_ms)
        ),
        HoldEnd::Failed => format!(
            "could not hold a connection: {}",
            hold.error.as_deref().unwrap_or("no attempt upgraded")
        ),
    };
    line(f, "hold", &text)?;
    if hold.pings_answered > 0 || hold.messages_received > 0 {
        more(
            f,
            &format!(
                "{} pings answered, {} messages received",
                hold.pings_answered, hold.messages_received
            ),
        )?;
    }
    Ok(())
}
