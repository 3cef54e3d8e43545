//! When work may start: `--rate` hands out handshake slots shared by all
//! workers; `--message-rate` gives each connection a fixed timetable of sends.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::bail;
use tokio::time::{Instant, Interval, MissedTickBehavior, interval_at, sleep_until};

/// Hands out evenly spaced start times across all workers for `--rate`.
pub(super) struct Pacer {
    start: Instant,
    interval_nanos: u64,
    /// Nanoseconds after `start` of the next free slot.
    next: AtomicU64,
}

impl Pacer {
    pub(super) fn new(start: Instant, per_second: f64) -> Self {
        Self {
            start,
            interval_nanos: (1e9 / per_second).max(1.0) as u64,
            next: AtomicU64::new(0),
        }
    }

    /// Sleeps until this caller's slot; false (after sleeping to the deadline)
    /// when the slot falls after it.
    pub(super) async fn wait(&self, deadline: Instant) -> bool {
        let now = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let claim = |next: u64| Some(next.max(now).saturating_add(self.interval_nanos));
        let (Ok(previous) | Err(previous)) = self.next.fetch_update(Relaxed, Relaxed, claim);
        let slot = self.start + Duration::from_nanos(previous.max(now));
        if slot >= deadline {
            sleep_until(deadline).await;
            return false;
        }
        sleep_until(slot).await;
        true
    }
}

/// `--message-rate` split over the connections: connection `i` may send at
/// `start + i·period/connections + k·period`, so together they send at the
/// full rate, one after another rather than all in the same instant.
pub(super) struct MessageRate {
    start: Instant,
    /// Between two sends of one connection.
    period: Duration,
    connections: usize,
}

impl MessageRate {
    pub(super) fn new(start: Instant, per_second: f64, connections: usize) -> anyhow::Result<Self> {
        let period = Duration::try_from_secs_f64(connections as f64 / per_second)
            .ok()
            .filter(|period| {
                period
                    .checked_mul(2)
                    .and_then(|p| start.checked_add(p))
                    .is_some()
            });
        let Some(period) = period else {
            bail!(
                "--message-rate {per_second} is too low to schedule over {connections} connections"
            );
        };
        Ok(Self {
            start,
            // A zero period would make the timer spin; a nanosecond is already
            // far faster than any connection can send.
            period: period.max(Duration::from_nanos(1)),
            connections,
        })
    }

    /// Connection `index`'s sends for one session, joining its timetable at
    /// the first slot not yet past: slots missed while (re)connecting are not
    /// the tunnel's to answer for.
    pub(super) fn send_times(&self, index: usize) -> SendTimes {
        let mut ticks = interval_at(self.slot_at_or_after(index, Instant::now()), self.period);
        // Burst would fire every missed slot at once after a stall, measuring
        // a flood the rate never asked for; Delay would shift this connection
        // off its phase until connections bunch up. Skip resumes on the
        // original timetable, and the stall still counts: the first late
        // message is timed from the slot it missed (see `SendTimes::next`).
        ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
        SendTimes { ticks }
    }

    fn slot_at_or_after(&self, index: usize, now: Instant) -> Instant {
        let phase = self
            .period
            .mul_f64((index % self.connections) as f64 / self.connections as f64);
        let first = self.start + phase;
        let behind = now.saturating_duration_since(first).as_nanos();
        let periods = behind.div_ceil(self.period.as_nanos());
        let offset = u64::try_from(periods * self.period.as_nanos()).unwrap_or(u64::MAX);
        first
            .checked_add(Duration::from_nanos(offset))
            .unwrap_or(first + self.period)
    }
}

/// One connection's slots under `--message-rate`.
pub(super) struct SendTimes {
    ticks: Interval,
}

impl SendTimes {
    /// Waits for the next slot; `None` once the deadline comes first. Call it
    /// as soon as the previous message is out: the answer is the instant the
    /// message's round trip is timed from.
    ///
    /// That is the scheduled slot whenever the sender was still busy at it —
    /// waiting for `--in-flight` room or for a blocked write, i.e. held up by
    /// the tunnel — so a stall cannot hide its cost by delaying the sends
    /// that would have measured it (coordinated omission). When the sender
    /// was idle, waiting on the timer, it is the instant the timer woke it:
    /// tokio's timers fire on a millisecond wheel, commonly 1–4 ms late, and
    /// that lateness is the load tool's own, not the tunnel's; it would bury
    /// a sub-millisecond round trip.
    pub(super) async fn next(&mut self, deadline: Instant) -> Option<Instant> {
        let ready_at = Instant::now();
        let slot = tokio::select! {
            slot = self.ticks.tick() => slot,
            () = sleep_until(deadline) => return None,
        };
        if slot >= deadline {
            return None;
        }
        Some(if ready_at > slot {
            slot
        } else {
            Instant::now()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_take_evenly_staggered_phases() {
        let start = Instant::now();
        let rate = MessageRate::new(start, 200.0, 4).unwrap();
        assert_eq!(rate.period, Duration::from_millis(20));
        let firsts: Vec<Duration> = (0..4)
            .map(|i| rate.slot_at_or_after(i, start) - start)
            .collect();
        let ms = Duration::from_millis;
        assert_eq!(firsts, [ms(0), ms(5), ms(10), ms(15)]);
    }

    #[test]
    fn a_late_join_lands_on_the_connections_own_grid() {
        let start = Instant::now();
        let rate = MessageRate::new(start, 200.0, 4).unwrap();
        let ms = Duration::from_millis;
        // Connection 1's slots are 5, 25, 45, … ms after the start.
        assert_eq!(rate.slot_at_or_after(1, start + ms(5)) - start, ms(5));
        assert_eq!(rate.slot_at_or_after(1, start + ms(6)) - start, ms(25));
        assert_eq!(rate.slot_at_or_after(1, start + ms(44)) - start, ms(45));
    }

    #[test]
    fn a_rate_too_low_to_schedule_is_refused() {
        let error = MessageRate::new(Instant::now(), 1e-300, 50).err().unwrap();
        assert!(error.to_string().contains("--message-rate"), "{error}");
    }
}
