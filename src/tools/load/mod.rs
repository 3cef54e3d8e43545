//! `wsgate load`: a load tester for WebSocket upgrade passthrough.
//!
//! `--connections` workers each run one [`Mode`] until `--duration` ends:
//! hold a connection idle, echo messages (back to back, or on a timetable
//! with `--message-rate`) and reconnect, or upgrade and close as fast as
//! allowed. Every message carries a tag (its connection and sequence
//! number) and every echo is matched to its send by that tag and compared
//! with it, so a tunnel that corrupts, drops or cross-wires data shows up as
//! an error, not as speed — while a backend's own messages (a greeting,
//! broadcasts) and echoes out of order are normal and merely counted.
//!
//! With `--h2` every connection is a WebSocket over HTTP/2 (RFC 8441): a
//! stream on one of ceil(connections / streams-per-connection) shared TLS
//! connections, with the same modes and the same report.
//!
//! Layout: this file parses flags and runs the workers; `client` connects,
//! speaks TLS and upgrades; `h2` does the same over shared HTTP/2
//! connections; `session` is what a worker does per mode; `tag`
//! builds the messages and recognises their echoes; `pace` decides when
//! handshakes and paced sends may start; `stats` counts while running;
//! `report` is the result and its printing; `progress` is the live line on a
//! terminal.

mod client;
mod h2;
mod pace;
mod progress;
mod report;
mod session;
mod stats;
mod tag;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use http::header::{HeaderName, HeaderValue, ORIGIN};
use http::{HeaderMap, Uri};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub use report::{Failures, Handshakes, Latency, LoadReport, SessionErrors, Traffic};

use client::Target;
use pace::{MessageRate, Pacer};
use session::Plan;

/// Work in progress at the end of `--duration` (echoes in flight, closing
/// handshakes, half-done upgrades) gets this long to finish before it is cut.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Default `--message-size` in bulk mode; other modes default to 128 bytes.
const BULK_MESSAGE_SIZE: usize = 1 << 20;

/// Load-test WebSocket upgrade passthrough: open connections against a
/// ws:// or wss:// URL and report handshake outcomes, latencies and echo throughput.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "wsgate load")]
pub struct LoadArgs {
    /// Target URL, ws://host[:port]/path or wss://host[:port]/path.
    #[arg(long, value_parser = parse_url)]
    pub url: Uri,

    /// Concurrent connections (workers).
    #[arg(long, default_value_t = 1, value_parser = parse_positive)]
    pub connections: usize,

    /// How long to run, e.g. 500ms, 10s, 2m.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// New handshakes per second across all connections; absent = as fast as possible.
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,

    /// Payload bytes per message, at least 16: the tag that matches each
    /// echo to its send [default: 128, or 1 MiB in bulk mode].
    #[arg(long)]
    pub message_size: Option<usize>,

    /// Echo messages per connection; 0 = send none (hold or handshake only).
    #[arg(long, default_value_t = 0)]
    pub messages: u64,

    /// Echo messages per second across all connections, open loop (echo and bulk modes).
    ///
    /// Each connection sends on a fixed timetable at its share, the
    /// connections' timetables staggered so sends are spread evenly; a send
    /// waits only while --in-flight messages are outstanding. Round-trip
    /// latency is measured from each message's scheduled send time, so a
    /// stalled tunnel is charged for the sends it held back; a send that was
    /// merely woken late by the load tool's own timer is timed from its wake-up.
    #[arg(long, value_parser = parse_message_rate)]
    pub message_rate: Option<f64>,

    /// Messages outstanding at once per connection.
    #[arg(long, default_value_t = 1, value_parser = parse_positive)]
    pub in_flight: usize,

    /// Origin header to send, e.g. https://app.example.com.
    #[arg(long, value_parser = parse_header_value)]
    pub origin: Option<HeaderValue>,

    /// Extra request header 'Name: value' (repeatable); replaces a default of the same name.
    #[arg(long = "header", short = 'H', value_parser = parse_header)]
    pub headers: Vec<(HeaderName, HeaderValue)>,

    /// Accept any TLS certificate (self-signed test setups).
    #[arg(long)]
    pub insecure: bool,

    /// Make every TLS handshake a full one (no session resumption).
    #[arg(long)]
    pub no_tls_resume: bool,

    /// Print the report as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,

    /// What each connection does [default: hold with --messages 0, else echo].
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,

    /// Limit for the TCP connect, for TLS plus upgrade, and for each echo.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    /// WebSockets over HTTP/2 (RFC 8441 extended CONNECT): needs a wss://
    /// URL and a server that picks ALPN h2 and enables the CONNECT protocol.
    #[arg(long)]
    pub h2: bool,

    /// With --h2: WebSockets (streams) per TLS connection; --connections of
    /// them need ceil(connections / this) connections. In handshake mode a
    /// handshake is a new stream on an existing connection [default: 100,
    /// the least concurrent streams RFC 9113 asks servers to allow].
    #[arg(long, requires = "h2", value_parser = parse_positive)]
    pub streams_per_connection: Option<usize>,
}

/// What each connection does during the run.
#[derive(clap::ValueEnum, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Open every connection once, send its messages if any, then hold it idle
    /// until the end; for many connections to a loopback target the source
    /// address is spread over 127.0.0.0/8.
    Hold,
    /// Send and check the messages, close, reconnect; until the end.
    Echo,
    /// Upgrade and close at once, repeatedly: measures handshake rate.
    Handshake,
    /// Echo with big messages (1 MiB unless --message-size says otherwise).
    Bulk,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Hold => "hold",
            Mode::Echo => "echo",
            Mode::Handshake => "handshake",
            Mode::Bulk => "bulk",
        })
    }
}

/// Runs the load test and prints its report; exit code 0 only when something
/// was attempted, something upgraded, and nothing failed.
pub async fn run(args: LoadArgs) -> anyhow::Result<ExitCode> {
    let report = execute(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{report}");
    }
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs the load test and returns its report without printing it.
pub async fn execute(args: &LoadArgs) -> anyhow::Result<LoadReport> {
    let mode = match args.mode {
        Some(mode) => mode,
        None if args.messages == 0 => Mode::Hold,
        None => Mode::Echo,
    };
    // Checked first: with --messages 0 the mode errors below would blame the
    // mode rather than the flag that asked for messages.
    if args.message_rate.is_some() {
        if args.messages == 0 {
            bail!("--message-rate paces echo messages; it needs --messages greater than 0");
        }
        if !matches!(mode, Mode::Echo | Mode::Bulk) {
            bail!(
                "--message-rate paces echo messages; it works with --mode echo or bulk, not {mode}"
            );
        }
    }
    match mode {
        Mode::Echo | Mode::Bulk if args.messages == 0 => {
            bail!("--mode {mode} needs --messages greater than 0")
        }
        Mode::Handshake if args.messages > 0 => {
            bail!("--mode handshake closes right after the upgrade; drop --messages")
        }
        _ => {}
    }
    if args.duration.is_zero() {
        bail!("--duration must be greater than 0");
    }
    let message_size = args.message_size.unwrap_or(match mode {
        Mode::Bulk => BULK_MESSAGE_SIZE,
        Mode::Hold | Mode::Echo | Mode::Handshake => 128,
    });
    if args.messages > 0 && message_size < tag::TAG_LEN {
        bail!(
            "--message-size must be at least {} bytes: each message carries a tag that matches its echo",
            tag::TAG_LEN
        );
    }
    raise_open_file_limit(args.connections);

    let mut headers = HeaderMap::new();
    if let Some(origin) = &args.origin {
        headers.append(ORIGIN, origin.clone());
    }
    for (name, value) in &args.headers {
        headers.append(name.clone(), value.clone());
    }
    let streams_per_connection = args.h2.then(|| {
        args.streams_per_connection
            .unwrap_or(h2::DEFAULT_STREAMS_PER_CONNECTION)
    });
    let target = Target::new(
        args.url.clone(),
        headers,
        args.insecure,
        !args.no_tls_resume,
        ws_config(mode, message_size),
        args.timeout,
        streams_per_connection.map(|per| (args.connections, per)),
    )
    .await?;
    // Over HTTP/2 the workers of one slot share its TCP connection and source.
    let tcp_connections = target.h2().map_or(args.connections, h2::Pool::slot_count);
    let sources = source_addresses(mode, target.addr(), tcp_connections);

    let start = Instant::now();
    let deadline = start + args.duration;
    let plan = Arc::new(Plan {
        target,
        mode,
        messages: args.messages,
        message_size,
        in_flight: args.in_flight,
        timeout: args.timeout,
        deadline,
        hard_end: deadline + DRAIN_GRACE,
        pacer: args.rate.map(|rate| Pacer::new(start, rate)),
        message_rate: args
            .message_rate
            .map(|rate| MessageRate::new(start, rate, args.connections))
            .transpose()?,
        stats: stats::Stats::new()?,
    });
    let progress = progress::spawn(plan.clone(), start, args.duration);
    let mut workers = JoinSet::new();
    for index in 0..args.connections {
        let plan = plan.clone();
        let connection = plan.target.h2().map_or(index, |pool| pool.slot_of(index));
        let source = (!sources.is_empty()).then(|| sources[connection % sources.len()]);
        workers.spawn(async move { plan.worker(index, source).await });
    }
    let mut panicked = false;
    while let Some(joined) = workers.join_next().await {
        panicked |= joined.is_err();
    }
    let elapsed = start.elapsed();
    if let Some(progress) = progress {
        progress.finish();
    }
    if panicked {
        bail!("a load worker panicked; the counts would be incomplete");
    }
    let mut report = plan.stats.report(
        args.url.to_string(),
        mode,
        args.connections,
        args.message_rate,
        elapsed,
    );
    report.protocol = if args.h2 { "h2" } else { "http/1.1" };
    report.streams_per_connection = streams_per_connection;
    report.tcp_connections = plan.target.tcp_connections();
    Ok(report)
}

/// Small read buffers when connections mostly sit idle (hold may open
/// hundreds of thousands); buffers sized to the message when echoing.
fn ws_config(mode: Mode, message_size: usize) -> WebSocketConfig {
    let read_buffer = match mode {
        Mode::Hold | Mode::Handshake => 4 * 1024,
        Mode::Echo | Mode::Bulk => message_size.saturating_add(16).clamp(4 * 1024, 128 * 1024),
    };
    // Never refuse our own echo, however big --message-size is.
    let limit = message_size.saturating_add(1024);
    WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .max_message_size(Some(limit.max(64 << 20)))
        .max_frame_size(Some(limit.max(16 << 20)))
}

/// Many connections need many descriptors; the soft limit is often 1024.
fn raise_open_file_limit(connections: usize) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < connections as u64 + 64 => tracing::warn!(
            limit,
            connections,
            "open-file limit is below the connection count; expect local failures"
        ),
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "could not raise the open-file limit"),
    }
}

/// Local addresses for hold mode: one source address reaches one target
/// address:port from at most as many connections as there are ephemeral
/// ports, so beyond that spread over 127.0.0.2, 127.0.0.3, … when the target
/// is on loopback (all of 127.0.0.0/8 is local on Linux). Empty = let the
/// kernel choose.
fn source_addresses(mode: Mode, target: SocketAddr, connections: usize) -> Vec<IpAddr> {
    let per_address = ephemeral_ports();
    if mode != Mode::Hold || connections <= per_address {
        return Vec::new();
    }
    if !target.ip().is_loopback() || target.is_ipv6() {
        tracing::warn!(
            connections,
            per_address,
            "more connections than one source address can open to a non-loopback IPv4 target"
        );
        return Vec::new();
    }
    let first = u32::from(Ipv4Addr::new(127, 0, 0, 2));
    let count = connections.div_ceil(per_address).min(0x00ff_fff0) as u32;
    (0..count)
        .map(|i| IpAddr::V4(Ipv4Addr::from(first + i)))
        .collect()
}

/// Usable ephemeral ports per source address, leaving room for other sockets.
fn ephemeral_ports() -> usize {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let bounds: Vec<usize> = range
        .iter()
        .flat_map(|text| text.split_whitespace())
        .filter_map(|n| n.parse().ok())
        .collect();
    match bounds[..] {
        [low, high] if high > low => (high - low + 1).saturating_sub(1024).max(1024),
        _ => 27_000,
    }
}

fn parse_url(text: &str) -> Result<Uri, String> {
    let uri: Uri = text.parse().map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(uri.scheme_str(), Some("ws" | "wss")) {
        return Err("must start with ws:// or wss://".to_owned());
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("has no host".to_owned());
    }
    Ok(uri)
}

fn parse_positive(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err("must be a whole number greater than 0".to_owned()),
    }
}

fn parse_rate(text: &str) -> Result<f64, String> {
    parse_per_second(text, "handshakes")
}

fn parse_message_rate(text: &str) -> Result<f64, String> {
    parse_per_second(text, "messages")
}

fn parse_per_second(text: &str, what: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!(
            "must be a number of {what} per second greater than 0"
        )),
    }
}

fn parse_header_value(text: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(text).map_err(|e| e.to_string())
}

fn parse_header(text: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| "expected 'Name: value'".to_owned())?;
    let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|e| e.to_string())?;
    Ok((name, parse_header_value(value.trim())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_spreads_sources_only_beyond_one_address_on_loopback_v4() {
        let per_address = ephemeral_ports();
        let loopback: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let many = per_address * 2 + 1;
        assert!(source_addresses(Mode::Hold, loopback, per_address).is_empty());
        let sources = source_addresses(Mode::Hold, loopback, many);
        let expected: Vec<IpAddr> = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
            .iter()
            .map(|ip| ip.parse().unwrap())
            .collect();
        assert_eq!(sources, expected);
        assert!(source_addresses(Mode::Echo, loopback, many).is_empty());
        let remote: SocketAddr = "192.0.2.1:9000".parse().unwrap();
        assert!(source_addresses(Mode::Hold, remote, many).is_empty());
        let v6: SocketAddr = "[::1]:9000".parse().unwrap();
        assert!(source_addresses(Mode::Hold, v6, many).is_empty());
    }
}
