//! What a load run hands back ([`LoadReport`]), printed as a table or, with
//! `--json`, as one JSON object.

use std::collections::BTreeMap;
use std::fmt;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::Mode;

/// The result of one `wsgate load` run; `--json` prints exactly this.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub url: String,
    pub mode: Mode,
    /// How the WebSockets were carried: `"http/1.1"` (an upgrade per TCP
    /// connection) or `"h2"` (RFC 8441 streams on shared connections).
    pub protocol: &'static str,
    pub connections: usize,
    /// `--h2`: WebSockets per TLS connection; `null` over HTTP/1.1.
    pub streams_per_connection: Option<usize>,
    /// TCP connections that connected (each then did TLS for wss://): one per
    /// handshake over HTTP/1.1, one per shared connection over h2.
    pub tcp_connections: u64,
    /// `--message-rate`: echo messages per second offered across all
    /// connections; `null` when messages went back to back.
    pub message_rate: Option<f64>,
    /// Wall time from the first connect to the last worker finishing.
    pub elapsed_secs: f64,
    pub handshakes: Handshakes,
    /// Status line of every upgrade answer received, the successes included
    /// (101 over HTTP/1.1, 200 over h2).
    pub statuses: BTreeMap<u16, u64>,
    /// Why handshakes failed; sums to `handshakes.failed`.
    pub failures: Failures,
    /// From starting the TCP connect to the 101 (TLS included); over h2 from
    /// asking for the stream to its 200 (the first stream of each connection
    /// also waits for TCP, TLS and the server's SETTINGS); `null` when none succeeded.
    pub handshake_latency_ms: Option<Latency>,
    /// From sending a message to its echo arriving; `null` when none came back.
    pub echo_rtt_ms: Option<Latency>,
    pub messages: Traffic,
    /// How each upgraded connection ended, by the code of the Close frame the
    /// server sent: 1005 for a Close without a code, 1006 for none at all
    /// (the connection dropped, or was given up by the client after an echo
    /// error). Sums to `handshakes.succeeded`.
    pub close_codes: BTreeMap<u16, u64>,
    pub errors: SessionErrors,
    pub peak_open_connections: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Handshakes {
    pub attempted: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Still in progress when the run ended; neither success nor failure.
    pub unfinished: u64,
    pub succeeded_per_sec: f64,
}

/// Handshake failures by cause; `http_status` counts non-101 answers (see `statuses`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Failures {
    pub connect_refused: u64,
    pub tls: u64,
    pub timeout: u64,
    pub reset: u64,
    pub http_status: u64,
    pub protocol: u64,
    pub local_address: u64,
    pub other: u64,
}

impl Failures {
    pub fn total(&self) -> u64 {
        self.named().iter().map(|(_, n)| n).sum()
    }

    fn named(&self) -> [(&'static str, u64); 8] {
        [
            ("connect_refused", self.connect_refused),
            ("tls", self.tls),
            ("timeout", self.timeout),
            ("reset", self.reset),
            ("http_status", self.http_status),
            ("protocol", self.protocol),
            ("local_address", self.local_address),
            ("other", self.other),
        ]
    }
}

/// Latency percentiles in milliseconds (microsecond resolution).
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    pub(super) fn from_histogram(histogram: &Histogram<u64>) -> Option<Self> {
        if histogram.is_empty() {
            return None;
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Some(Self {
            count: histogram.len(),
            mean: histogram.mean() / 1000.0,
            p50: ms(histogram.value_at_quantile(0.5)),
            p90: ms(histogram.value_at_quantile(0.9)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p999: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
        })
    }
}

/// Payload messages and bytes each way (frame headers not counted).
/// `received` counts echoes only, matched to their sends by the tag each
/// message carries; the rest is `received_unsolicited`.
#[derive(Debug, Clone, Serialize)]
pub struct Traffic {
    pub sent: u64,
    pub received: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub sent_per_sec: f64,
    pub received_per_sec: f64,
    pub bytes_sent_per_sec: f64,
    pub bytes_received_per_sec: f64,
    /// Data messages that were no echo of an outstanding send: a greeting, a
    /// broadcast, a message with another connection's tag, a second echo of
    /// one message. Normal for many backends; not an error.
    pub received_unsolicited: u64,
    pub bytes_received_unsolicited: u64,
}

/// Trouble on upgraded connections: how a broken tunnel shows up.
#[derive(Debug, Clone, Serialize)]
pub struct SessionErrors {
    /// An echo carried the tag of an outstanding message but differed from it.
    pub echo_mismatch: u64,
    /// An echo (or the room to send) did not come within the timeout.
    pub echo_timeout: u64,
    /// The peer closed or reset the connection before the client was done.
    pub closed_early: u64,
}

impl SessionErrors {
    pub fn total(&self) -> u64 {
        self.echo_mismatch + self.echo_timeout + self.closed_early
    }
}

impl LoadReport {
    /// The exit-code verdict: something was tried, something worked, nothing failed.
    pub fn passed(&self) -> bool {
        self.handshakes.attempted > 0
            && self.handshakes.succeeded > 0
            && self.handshakes.failed == 0
            && self.errors.total() == 0
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = &self.handshakes;
        let m = &self.messages;
        write!(
            f,
            "wsgate load {}  mode {}  {}  connections {}",
            self.url, self.mode, self.protocol, self.connections
        )?;
        if let Some(per) = self.streams_per_connection {
            write!(f, "  streams/connection {per}")?;
        }
        if let Some(rate) = self.message_rate {
            write!(f, "  message rate {rate}/s")?;
        }
        writeln!(f, "  elapsed {:.2}s", self.elapsed_secs)?;
        writeln!(
            f,
            "handshakes      attempted {}  succeeded {}  failed {}  unfinished {}  ({:.1}/s)",
            h.attempted, h.succeeded, h.failed, h.unfinished, h.succeeded_per_sec
        )?;
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(code, n)| format!("{code}: {n}"))
            .collect();
        writeln!(f, "statuses        {}", none_if_empty(&statuses))?;
        let failures: Vec<String> = self
            .failures
            .named()
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        writeln!(f, "failures        {}", none_if_empty(&failures))?;
        writeln!(
            f,
            "handshake ms    {}",
            LatencyLine(&self.handshake_latency_ms)
        )?;
        writeln!(f, "echo rtt ms     {}", LatencyLine(&self.echo_rtt_ms))?;
        writeln!(
            f,
            "sent            {} msgs ({:.1}/s)  {} ({}/s)",
            m.sent,
            m.sent_per_sec,
            Bytes(m.bytes_sent as f64),
            Bytes(m.bytes_sent_per_sec)
        )?;
        writeln!(
            f,
            "received        {} msgs ({:.1}/s)  {} ({}/s)",
            m.received,
            m.received_per_sec,
            Bytes(m.bytes_received as f64),
            Bytes(m.bytes_received_per_sec)
        )?;
        writeln!(
            f,
            "unsolicited     {} msgs  {}",
            m.received_unsolicited,
            Bytes(m.bytes_received_unsolicited as f64)
        )?;
        let close_codes: Vec<String> = self
            .close_codes
            .iter()
            .map(|(code, n)| format!("{code}: {n}"))
            .collect();
        writeln!(f, "close codes     {}", none_if_empty(&close_codes))?;
        let e = &self.errors;
        let errors: Vec<String> = [
            ("echo_mismatch", e.echo_mismatch),
            ("echo_timeout", e.echo_timeout),
            ("closed_early", e.closed_early),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
        writeln!(f, "errors          {}", none_if_empty(&errors))?;
        writeln!(f, "peak open       {}", self.peak_open_connections)?;
        writeln!(f, "tcp connections {}", self.tcp_connections)?;
        write!(
            f,
            "result          {}",
            if self.passed() { "ok" } else { "FAILED" }
        )
    }
}

fn none_if_empty(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join("  ")
    }
}

struct LatencyLine<'a>(&'a Option<Latency>);

impl fmt::Display for LatencyLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => write!(f, "-"),
            Some(l) => write!(
                f,
                "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  (n={})",
                l.p50, l.p90, l.p99, l.p999, l.max, l.count
            ),
        }
    }
}

/// A byte amount in binary units, for people.
struct Bytes(f64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut value = self.0;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        write!(f, "{value:.1} {}", UNITS[unit])
    }
}
