//! A graceful drain as the tunnels see it: when their Close frames begin,
//! each tunnel's own moment in the spread, and when the rest are cut.
//!
//! Every open tunnel gets its Close at a different moment, evenly spaced
//! over `drain_spread`, so the clients of a restarting instance reconnect a
//! few at a time instead of all hitting the remaining instances at once. The
//! spacing needs the number of tunnels open when the drain began, which is
//! why tunnels register here while they run.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// One proxy's drain, shared by all its connections.
#[derive(Debug, Default)]
pub struct Drain {
    begun: CancellationToken,
    plan: OnceLock<Plan>,
    open_tunnels: AtomicUsize,
    next_slot: AtomicUsize,
}

#[derive(Debug)]
struct Plan {
    start: Instant,
    spread: Duration,
    cut_at: Instant,
    tunnels: usize,
    close_code: u16,
}

/// When one tunnel's drain Close goes out, and when it is cut if its
/// closing handshake has not ended by then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moment {
    pub close_at: Instant,
    pub cut_at: Instant,
    pub close_code: u16,
}

/// Keeps a tunnel counted as open while it lives.
#[must_use]
pub struct OpenTunnel<'a>(&'a Drain);

impl Drop for OpenTunnel<'_> {
    fn drop(&mut self) {
        self.0.open_tunnels.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drain {
    pub fn new() -> Drain {
        Drain::default()
    }

    /// Starts the Close frames: the tunnels open now share `spread`
    /// between them; any still open at `timeout` from now are cut.
    /// Only the first call counts.
    pub fn begin(&self, spread: Duration, timeout: Duration, close_code: u16) {
        let start = Instant::now();
        let plan = Plan {
            start,
            spread,
            cut_at: start + timeout,
            tunnels: self.open_tunnels.load(Ordering::Acquire),
            close_code,
        };
        if self.plan.set(plan).is_ok() {
            self.begun.cancel();
        }
    }

    /// Completes once [`Drain::begin`] has been called.
    pub fn begun(&self) -> WaitForCancellationFuture<'_> {
        self.begun.cancelled()
    }

    pub fn open_tunnel(&self) -> OpenTunnel<'_> {
        self.open_tunnels.fetch_add(1, Ordering::AcqRel);
        OpenTunnel(self)
    }

    /// The calling tunnel's moment; each call takes the next slot, so a
    /// tunnel asks once. `None` before the drain began. Tunnels beyond the
    /// count at the start (opened by a request already in flight) get the
    /// end of the window.
    pub fn moment(&self) -> Option<Moment> {
        let plan = self.plan.get()?;
        let slot = self.next_slot.fetch_add(1, Ordering::AcqRel);
        let offset = if slot >= plan.tunnels || plan.tunnels == 0 {
            plan.spread
        } else {
            // u128 so that a long spread times many tunnels cannot overflow.
            let nanos = plan.spread.as_nanos() * slot as u128 / plan.tunnels as u128;
            Duration::from_nanos(nanos.min(u64::MAX as u128) as u64)
        };
        Some(Moment {
            close_at: plan.start + offset,
            cut_at: plan.cut_at,
            close_code: plan.close_code,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn moments_are_spaced_evenly_over_the_spread() {
        let drain = Drain::new();
        let tunnels: Vec<_> = (0..4).map(|_| drain.open_tunnel()).collect();
        assert!(drain.moment().is_none());
        let start = Instant::now();
        drain.begin(Duration::from_secs(4), Duration::from_secs(30), 1012);
        assert!(drain.begun.is_cancelled());
        let offsets: Vec<Duration> = (0..5)
            .filter_map(|_| drain.moment())
            .map(|m| m.close_at - start)
            .collect();
        let secs: Vec<u64> = offsets.iter().map(Duration::as_secs).collect();
        // The fifth tunnel was not open at the start: the window's end.
        assert_eq!(secs, [0, 1, 2, 3, 4]);
        let moment = drain.moment();
        assert_eq!(
            moment.map(|m| m.cut_at - start),
            Some(Duration::from_secs(30))
        );
        assert_eq!(moment.map(|m| m.close_code), Some(1012));
        drop(tunnels);
        assert_eq!(drain.open_tunnels.load(Ordering::Acquire), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_spread_closes_all_at_once_and_only_the_first_begin_counts() {
        let drain = Drain::new();
        let _tunnels: Vec<_> = (0..3).map(|_| drain.open_tunnel()).collect();
        let start = Instant::now();
        drain.begin(Duration::ZERO, Duration::from_secs(1), 1001);
        drain.begin(Duration::from_secs(9), Duration::from_secs(9), 1012);
        for _ in 0..3 {
            assert_eq!(
                drain.moment(),
                Some(Moment {
                    close_at: start,
                    cut_at: start + Duration::from_secs(1),
                    close_code: 1001
                })
            );
        }
    }
}
