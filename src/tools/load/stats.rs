//! Counting while a run is in progress: shared atomics and histograms that
//! workers publish to in batches, turned into a [`LoadReport`] at the end.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;

use super::Mode;
use super::client::Failure;
use super::report::{Failures, Handshakes, Latency, LoadReport, SessionErrors, Traffic};

/// Workers keep counts and latency samples locally and publish them in
/// batches of this many, so that shared cache lines are not touched per message.
const FLUSH_EVERY: u64 = 64;

/// Latencies are recorded in microseconds up to a minute; beyond that they saturate.
const HISTOGRAM_MAX_MICROS: u64 = 60_000_000;

/// Everything the report needs, shared by all workers and the progress line.
pub(super) struct Stats {
    pub(super) attempted: AtomicU64,
    pub(super) succeeded: AtomicU64,
    pub(super) unfinished: AtomicU64,
    failures: FailureCounters,
    statuses: Mutex<BTreeMap<u16, u64>>,
    open: AtomicU64,
    open_peak: AtomicU64,
    pub(super) sent: AtomicU64,
    pub(super) bytes_sent: AtomicU64,
    pub(super) received: AtomicU64,
    pub(super) bytes_received: AtomicU64,
    unsolicited: AtomicU64,
    bytes_unsolicited: AtomicU64,
    /// The server's close code of every upgraded connection that ended.
    close_codes: Mutex<BTreeMap<u16, u64>>,
    pub(super) echo_mismatch: AtomicU64,
    pub(super) echo_timeout: AtomicU64,
    pub(super) closed_early: AtomicU64,
    handshake_latency: Mutex<Histogram<u64>>,
    rtt: Mutex<Histogram<u64>>,
}

#[derive(Default)]
struct FailureCounters {
    connect_refused: AtomicU64,
    tls: AtomicU64,
    timeout: AtomicU64,
    reset: AtomicU64,
    http_status: AtomicU64,
    protocol: AtomicU64,
    local_address: AtomicU64,
    other: AtomicU64,
}

/// RFC 6455 §7.1.5: the connection closed without a Close frame.
const ABNORMAL_CLOSURE: u16 = 1006;

/// One upgraded connection while it lasts. When it is gone it leaves the
/// open-connection gauge and counts under the code of the Close the server
/// sent, or 1006 without one — so every connection that upgraded is counted
/// under exactly one code, however it ended.
pub(super) struct OpenConn<'a> {
    stats: &'a Stats,
    server_close: Option<u16>,
}

impl OpenConn<'_> {
    /// The server's Close frame arrived with this code; a connection carries
    /// one Close each way, so only the first is kept.
    pub(super) fn server_closed(&mut self, code: u16) {
        self.server_close.get_or_insert(code);
    }
}

impl Drop for OpenConn<'_> {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Relaxed);
        let code = self.server_close.unwrap_or(ABNORMAL_CLOSURE);
        *lock(&self.stats.close_codes).entry(code).or_default() += 1;
    }
}

impl Stats {
    pub(super) fn new() -> anyhow::Result<Self> {
        let histogram = || Histogram::new_with_bounds(1, HISTOGRAM_MAX_MICROS, 3);
        Ok(Self {
            attempted: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            unfinished: AtomicU64::new(0),
            failures: FailureCounters::default(),
            statuses: Mutex::new(BTreeMap::new()),
            open: AtomicU64::new(0),
            open_peak: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            unsolicited: AtomicU64::new(0),
            bytes_unsolicited: AtomicU64::new(0),
            close_codes: Mutex::new(BTreeMap::new()),
            echo_mismatch: AtomicU64::new(0),
            echo_timeout: AtomicU64::new(0),
            closed_early: AtomicU64::new(0),
            handshake_latency: Mutex::new(histogram()?),
            rtt: Mutex::new(histogram()?),
        })
    }

    /// `status`: 101 for an HTTP/1.1 upgrade, 200 for an RFC 8441 stream.
    pub(super) fn handshake_succeeded(&self, status: u16, latency: Duration) -> OpenConn<'_> {
        self.succeeded.fetch_add(1, Relaxed);
        *lock(&self.statuses).entry(status).or_default() += 1;
        lock(&self.handshake_latency).saturating_record(micros(latency));
        let open = self.open.fetch_add(1, Relaxed) + 1;
        self.open_peak.fetch_max(open, Relaxed);
        OpenConn {
            stats: self,
            server_close: None,
        }
    }

    pub(super) fn handshake_failed(&self, failure: Failure) {
        let f = &self.failures;
        let counter = match failure {
            Failure::Status(code) => {
                *lock(&self.statuses).entry(code).or_default() += 1;
                &f.http_status
            }
            Failure::ConnectRefused => &f.connect_refused,
            Failure::Tls => &f.tls,
            Failure::Timeout => &f.timeout,
            Failure::Reset => &f.reset,
            Failure::Protocol => &f.protocol,
            Failure::LocalAddress => &f.local_address,
            Failure::Other => &f.other,
        };
        counter.fetch_add(1, Relaxed);
    }

    pub(super) fn open_now(&self) -> u64 {
        self.open.load(Relaxed)
    }

    pub(super) fn failed_now(&self) -> u64 {
        self.failures.snapshot().total()
    }

    /// Data messages that are not the echo of an outstanding send.
    pub(super) fn unsolicited(&self) -> Tally<'_> {
        Tally::new(&self.unsolicited, &self.bytes_unsolicited)
    }

    pub(super) fn rtt_recorder(&self) -> RttRecorder<'_> {
        RttRecorder {
            shared: &self.rtt,
            samples: Vec::with_capacity(FLUSH_EVERY as usize),
        }
    }

    /// The final report; call once every worker has finished.
    pub(super) fn report(
        &self,
        url: String,
        mode: Mode,
        connections: usize,
        message_rate: Option<f64>,
        elapsed: Duration,
    ) -> LoadReport {
        let secs = elapsed.as_secs_f64().max(f64::EPSILON);
        let per_sec = |n: u64| n as f64 / secs;
        let failures = self.failures.snapshot();
        let succeeded = self.succeeded.load(Relaxed);
        let (sent, received) = (self.sent.load(Relaxed), self.received.load(Relaxed));
        let (bytes_sent, bytes_received) = (
            self.bytes_sent.load(Relaxed),
            self.bytes_received.load(Relaxed),
        );
        LoadReport {
            url,
            mode,
            protocol: "http/1.1",
            connections,
            streams_per_connection: None,
            tcp_connections: 0,
            message_rate,
            elapsed_secs: elapsed.as_secs_f64(),
            handshakes: Handshakes {
                attempted: self.attempted.load(Relaxed),
                succeeded,
                failed: failures.total(),
                unfinished: self.unfinished.load(Relaxed),
                succeeded_per_sec: per_sec(succeeded),
            },
            statuses: lock(&self.statuses).clone(),
            failures,
            handshake_latency_ms: Latency::from_histogram(&lock(&self.handshake_latency)),
            echo_rtt_ms: Latency::from_histogram(&lock(&self.rtt)),
            messages: Traffic {
                sent,
                received,
                bytes_sent,
                bytes_received,
                sent_per_sec: per_sec(sent),
                received_per_sec: per_sec(received),
                bytes_sent_per_sec: per_sec(bytes_sent),
                bytes_received_per_sec: per_sec(bytes_received),
                received_unsolicited: self.unsolicited.load(Relaxed),
                bytes_received_unsolicited: self.bytes_unsolicited.load(Relaxed),
            },
            close_codes: lock(&self.close_codes).clone(),
            errors: SessionErrors {
                echo_mismatch: self.echo_mismatch.load(Relaxed),
                echo_timeout: self.echo_timeout.load(Relaxed),
                closed_early: self.closed_early.load(Relaxed),
            },
            peak_open_connections: self.open_peak.load(Relaxed),
        }
    }
}

impl FailureCounters {
    fn snapshot(&self) -> Failures {
        Failures {
            connect_refused: self.connect_refused.load(Relaxed),
            tls: self.tls.load(Relaxed),
            timeout: self.timeout.load(Relaxed),
            reset: self.reset.load(Relaxed),
            http_status: self.http_status.load(Relaxed),
            protocol: self.protocol.load(Relaxed),
            local_address: self.local_address.load(Relaxed),
            other: self.other.load(Relaxed),
        }
    }
}

/// A message count and its bytes, published every [`FLUSH_EVERY`] messages and on drop.
pub(super) struct Tally<'a> {
    count: &'a AtomicU64,
    bytes: &'a AtomicU64,
    pending: u64,
    pending_bytes: u64,
}

impl<'a> Tally<'a> {
    pub(super) fn new(count: &'a AtomicU64, bytes: &'a AtomicU64) -> Self {
        Self {
            count,
            bytes,
            pending: 0,
            pending_bytes: 0,
        }
    }

    pub(super) fn add(&mut self, bytes: usize) {
        self.pending += 1;
        self.pending_bytes += bytes as u64;
        if self.pending >= FLUSH_EVERY {
            self.flush();
        }
    }

    fn flush(&mut self) {
        self.count
            .fetch_add(std::mem::take(&mut self.pending), Relaxed);
        self.bytes
            .fetch_add(std::mem::take(&mut self.pending_bytes), Relaxed);
    }
}

impl Drop for Tally<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Round-trip samples, merged into the shared histogram in batches and on drop.
pub(super) struct RttRecorder<'a> {
    shared: &'a Mutex<Histogram<u64>>,
    samples: Vec<u64>,
}

impl RttRecorder<'_> {
    pub(super) fn record(&mut self, rtt: Duration) {
        self.samples.push(micros(rtt));
        if self.samples.len() as u64 >= FLUSH_EVERY {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.samples.is_empty() {
            return;
        }
        let mut histogram = lock(self.shared);
        for sample in self.samples.drain(..) {
            histogram.saturating_record(sample);
        }
    }
}

impl Drop for RttRecorder<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// A worker that panicked mid-update leaves counts that are still worth reporting.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
