//! The live one-line status on stderr, for a person watching a run.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::session::Plan;

/// Prints once a second until aborted — only on a terminal, so logs and
/// scripts that capture stderr get no carriage-return noise.
pub(super) fn spawn(plan: Arc<Plan>, start: Instant, duration: Duration) -> Option<Progress> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let task = tokio::spawn(async move {
        let mut ticks =
            tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let stats = &plan.stats;
        let (mut last_sent, mut last_received, mut last_ok) = (0, 0, 0);
        loop {
            ticks.tick().await;
            let (sent, received) = (stats.sent.load(Relaxed), stats.received.load(Relaxed));
            let ok = stats.succeeded.load(Relaxed);
            let line = format!(
                "\r\x1b[K{:>4.0}s/{}s  handshakes {} ok ({}/s) {} failed  open {}  sent {}/s  received {}/s",
                start.elapsed().as_secs_f64(),
                duration.as_secs(),
                ok,
                ok - last_ok,
                stats.failed_now(),
                stats.open_now(),
                sent - last_sent,
                received - last_received,
            );
            (last_sent, last_received, last_ok) = (sent, received, ok);
            let mut stderr = std::io::stderr().lock();
            let _ = stderr.write_all(line.as_bytes());
            let _ = stderr.flush();
        }
    });
    Some(Progress(task))
}

pub(super) struct Progress(JoinHandle<()>);

impl Progress {
    /// Stops the line and wipes it, so the report starts on a clean line.
    pub(super) fn finish(self) {
        self.0.abort();
        let _ = std::io::stderr().write_all(b"\r\x1b[K");
    }
}
