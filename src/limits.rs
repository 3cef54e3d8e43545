//! A route's per-client limits: open tunnels and requests per client IP
//! (`max_connections_per_ip`) and new upgrades per client IP
//! (`handshake_rate`), checked right after the client IP, before anything
//! costly such as a token.
//!
//! Both tables are bounded. The open counts hold an entry only while that
//! IP has something open, so they never exceed the open connections
//! (`max_connections`). The handshake buckets forget an IP once its bucket
//! has refilled, which an absent entry means anyway; they are pruned every
//! [`PRUNE_EVERY`] new upgrades, and if a flood of distinct addresses still
//! leaves more than [`MAX_TRACKED_ADDRESSES`], the table starts over (those
//! addresses get full buckets, as new addresses would). So the handshake
//! table holds at most that many addresses, about 100 bytes each
//! (`benches/RESULTS.md` has the measured figure).

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::config::{ClientLimits, Rate};
use crate::error::Rejection;

/// The most addresses the handshake table remembers at once.
pub const MAX_TRACKED_ADDRESSES: usize = 100_000;
/// New upgrades between two prunings of refilled buckets.
pub const PRUNE_EVERY: usize = 4096;
/// Shards of the open-count table, so handshakes on many threads rarely
/// wait for one another.
const SHARDS: usize = 16;

/// One route's limiter, shared by its connections for a config generation.
pub struct ClientLimiter {
    open: Option<(usize, Arc<OpenCounts>)>,
    handshakes: Option<HandshakeRate>,
}

impl ClientLimiter {
    /// `None` when the route sets no limit: its handshakes pay nothing.
    pub fn new(limits: &ClientLimits) -> Option<ClientLimiter> {
        let open = limits
            .max_connections_per_ip
            .map(|limit| (limit, Arc::new(OpenCounts::default())));
        let handshakes = limits.handshake_rate.map(HandshakeRate::new);
        (open.is_some() || handshakes.is_some()).then_some(ClientLimiter { open, handshakes })
    }

    /// Counts a tunnel or request of `ip` as open until the slot is
    /// dropped, or refuses it when `ip` is at the limit.
    pub fn open(&self, ip: IpAddr) -> Result<Option<OpenSlot>, Rejection> {
        match &self.open {
            None => Ok(None),
            Some((limit, counts)) => counts.take(ip, *limit).map(Some),
        }
    }

    /// Takes a handshake token of `ip`, or tells when one is free.
    pub fn handshake(&self, ip: IpAddr) -> Result<(), Rejection> {
        match &self.handshakes {
            None => Ok(()),
            Some(rate) => rate.take(ip),
        }
    }
}

impl std::fmt::Debug for ClientLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientLimiter")
            .field(
                "max_connections_per_ip",
                &self.open.as_ref().map(|(limit, _)| limit),
            )
            .field("handshake_rate", &self.handshakes.is_some())
            .finish()
    }
}

#[derive(Default)]
struct OpenCounts {
    shards: [Mutex<HashMap<IpAddr, usize>>; SHARDS],
}

impl OpenCounts {
    fn shard(&self, ip: IpAddr) -> &Mutex<HashMap<IpAddr, usize>> {
        // The low bits of the address spread clients well enough, and cost
        // no hashing on top of the map's own.
        let low = match ip {
            IpAddr::V4(v4) => usize::from(v4.octets()[3]),
            IpAddr::V6(v6) => usize::from(v6.octets()[15]),
        };
        &self.shards[low % SHARDS]
    }

    fn take(self: &Arc<Self>, ip: IpAddr, limit: usize) -> Result<OpenSlot, Rejection> {
        // A poisoned shard only means a panic elsewhere mid-update; the
        // counts are still usable.
        let mut shard = self.shard(ip).lock().unwrap_or_else(|e| e.into_inner());
        let count = shard.entry(ip).or_insert(0);
        if *count >= limit {
            return Err(Rejection::TooManyConnections { limit });
        }
        *count += 1;
        Ok(OpenSlot {
            counts: self.clone(),
            ip,
        })
    }
}

/// One open tunnel or request of a client IP; dropping it frees the slot.
pub struct OpenSlot {
    counts: Arc<OpenCounts>,
    ip: IpAddr,
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        let mut shard = self
            .counts
            .shard(self.ip)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(count) = shard.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                shard.remove(&self.ip);
            }
        }
    }
}

impl std::fmt::Debug for OpenSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenSlot").field("ip", &self.ip).finish()
    }
}

/// A token bucket per client IP with burst N, refilled at N per period:
/// governor's GCRA keeps it as one timestamp per key.
struct HandshakeRate {
    /// Replaced whole when a flood overfills it; handshakes only read-lock.
    buckets: RwLock<DefaultKeyedRateLimiter<IpAddr>>,
    quota: Quota,
    clock: DefaultClock,
    since_prune: AtomicUsize,
}

impl HandshakeRate {
    fn new(rate: Rate) -> HandshakeRate {
        let burst = NonZeroU32::new(rate.count).unwrap_or(NonZeroU32::MIN);
        // `Rate::parse` refuses a zero count, so the period is never zero;
        // should it be, one per second is the safe reading.
        let quota = Quota::with_period(rate.period / burst.get())
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        HandshakeRate {
            buckets: RwLock::new(DefaultKeyedRateLimiter::keyed(quota)),
            quota,
            clock: DefaultClock::default(),
            since_prune: AtomicUsize::new(0),
        }
    }

    fn take(&self, ip: IpAddr) -> Result<(), Rejection> {
        if self.since_prune.fetch_add(1, Ordering::Relaxed) + 1 >= PRUNE_EVERY {
            self.since_prune.store(0, Ordering::Relaxed);
            self.prune();
        }
        let buckets = self.buckets.read().unwrap_or_else(|e| e.into_inner());
        buckets.check_key(&ip).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            // Whole seconds until a token is free, rounded up: a client
            // that waits exactly that long gets in.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            Rejection::RateLimited {
                retry_after: secs.max(1),
            }
        })
    }

    fn prune(&self) {
        let mut buckets = self.buckets.write().unwrap_or_else(|e| e.into_inner());
        buckets.retain_recent();
        if buckets.len() > MAX_TRACKED_ADDRESSES {
            tracing::warn!(
                tracked = buckets.len(),
                "handshakes from more distinct addresses than the rate table keeps; starting it over"
            );
            *buckets = DefaultKeyedRateLimiter::keyed(self.quota);
        }
        buckets.shrink_to_fit();
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.read().map(|b| b.len()).unwrap_or(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x7f00_0000 | n))
    }

    #[test]
    fn open_slots_count_per_ip_and_free_on_drop() {
        let limits = ClientLimits {
            max_connections_per_ip: Some(2),
            handshake_rate: None,
        };
        let limiter = ClientLimiter::new(&limits).expect("a limit is set");
        let first = limiter.open(ip(1)).expect("first");
        let _second = limiter.open(ip(1)).expect("second");
        assert_eq!(
            limiter.open(ip(1)).err(),
            Some(Rejection::TooManyConnections { limit: 2 })
        );
        assert!(limiter.open(ip(2)).is_ok(), "another IP has its own count");
        drop(first);
        assert!(limiter.open(ip(1)).is_ok(), "a freed slot can be taken");
    }

    #[test]
    fn open_counts_keep_no_entry_for_an_ip_with_nothing_open() {
        let counts = Arc::new(OpenCounts::default());
        let slots: Vec<_> = (0..1000)
            .filter_map(|n| counts.take(ip(n), 1).ok())
            .collect();
        assert_eq!(slots.len(), 1000);
        drop(slots);
        let left: usize = counts
            .shards
            .iter()
            .map(|shard| shard.lock().map(|map| map.len()).unwrap_or(usize::MAX))
            .sum();
        assert_eq!(left, 0);
    }

    #[test]
    fn a_burst_then_retry_after_whole_seconds() {
        let rate = HandshakeRate::new(Rate {
            count: 3,
            period: Duration::from_secs(60),
        });
        for _ in 0..3 {
            assert_eq!(rate.take(ip(1)), Ok(()));
        }
        // One token per 20 s: the next is free in (just under) 20 s.
        assert_eq!(
            rate.take(ip(1)),
            Err(Rejection::RateLimited { retry_after: 20 })
        );
        assert_eq!(rate.take(ip(2)), Ok(()));
    }

    #[test]
    fn a_flood_of_addresses_is_forgotten_once_buckets_refill() {
        let rate = HandshakeRate::new(Rate {
            count: 1000,
            period: Duration::from_millis(1),
        });
        for n in 0..10_000 {
            let _ = rate.take(ip(n));
        }
        // Pruned every PRUNE_EVERY upgrades: what is left is at most the
        // addresses seen since the last pruning.
        assert!(rate.tracked() <= PRUNE_EVERY, "{} tracked", rate.tracked());
    }
}
