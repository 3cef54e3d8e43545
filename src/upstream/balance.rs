//! The balancers, as pure functions of the server list, each server's load
//! and which servers may be chosen: round robin, least loaded, and
//! consistent hashing with bounded loads.
//!
//! `balance = "hash"` is rendezvous hashing (highest random weight: Thaler &
//! Ravishankar, "Using Name-Based Mappings to Increase Hit Rates", IEEE/ACM
//! Transactions on Networking 6(1), 1998): every server gets a score for the
//! key, and the key goes to the highest. A server that is removed or lost
//! takes away only the keys it had; every other key keeps its server, and
//! the orphans spread over the rest by their next-highest scores.
//!
//! On top, the bounded-load rule of Mirrokni, Thorup & Zadimoghaddam,
//! "Consistent Hashing with Bounded Loads" (arXiv:1608.01350, 2016; SODA
//! 2018): with `m` connections open including the new one and `n` servers,
//! each server holds at most `⌈(1 + ε)·m / n⌉`, and a key whose server is
//! full goes to the next server in its own ranking that is not. Here `ε =
//! 1/4`: no server gets more than 1.25 × its share. With few connections
//! open the cap is small (one connection over three servers already fills
//! one), so a key's second concurrent connection may land elsewhere; a
//! session that must stay on one server wants `sticky_cookie`.
//!
//! Scores and server identities are XXH3-64 (xxHash's specified 64-bit
//! hash, seed 0), so every wsgate with the same server list maps every key
//! the same way; a server is known by the hash of its `host:port` as
//! configured, not by its place in the list, so reordering the list changes
//! nothing.

use xxhash_rust::xxh3::xxh3_64;

/// A server's identity: XXH3-64 of its `host:port` as configured.
pub(super) fn server_id(server: &str) -> u64 {
    xxh3_64(server.as_bytes())
}

/// A request's hash key: XXH3-64 of its bytes.
pub(super) fn key_hash(key: &[u8]) -> u64 {
    xxh3_64(key)
}

/// The rendezvous score of `server` for `key`: XXH3-64 of both, little-endian.
fn score(key: u64, server: u64) -> u64 {
    let mut both = [0u8; 16];
    both[..8].copy_from_slice(&key.to_le_bytes());
    both[8..].copy_from_slice(&server.to_le_bytes());
    xxh3_64(&both)
}

/// The first eligible server from `start`, in list order.
pub(super) fn round_robin(
    count: usize,
    start: usize,
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    (0..count)
        .map(|offset| (start + offset) % count)
        .find(|&index| eligible(index))
}

/// The eligible server with the least load; ties go to the first from
/// `start`, so they spread out.
pub(super) fn least_loaded(
    count: usize,
    start: usize,
    load: impl Fn(usize) -> usize,
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    (0..count)
        .map(|offset| (start + offset) % count)
        .filter(|&index| eligible(index))
        .min_by_key(|&index| load(index))
}

/// Rendezvous hashing with bounded loads (see the module doc): the
/// highest-scoring eligible server for `key` whose load is under the cap.
pub(super) fn rendezvous_bounded(
    key: u64,
    ids: &[u64],
    load: impl Fn(usize) -> usize,
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    let (servers, total) = (0..ids.len())
        .filter(|&index| eligible(index))
        .fold((0usize, 0usize), |(servers, total), index| {
            (servers + 1, total.saturating_add(load(index)))
        });
    if servers == 0 {
        return None;
    }
    // ⌈(1 + ε)·m / n⌉ with ε = 1/4 and m counting the new connection.
    let cap = total
        .saturating_add(1)
        .saturating_mul(5)
        .div_ceil(servers.saturating_mul(4));
    let best = |under_cap: bool| {
        (0..ids.len())
            .filter(|&index| eligible(index) && (!under_cap || load(index) < cap))
            // Ties (only a server listed twice scores the same) go to the
            // first listed, whatever the iterator's own rule.
            .fold(None, |best: Option<(u64, usize)>, index| {
                let candidate = score(key, ids[index]);
                match best {
                    Some((top, _)) if top >= candidate => best,
                    _ => Some((candidate, index)),
                }
            })
            .map(|(_, index)| index)
    };
    // Some server is always under the cap (the loads add up to less than
    // n × cap), unless the loads moved while being read: then the ranking
    // alone decides.
    best(true).or_else(|| best(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(count: usize) -> Vec<String> {
        (0..count)
            .map(|index| format!("10.0.0.{index}:8080"))
            .collect()
    }

    fn ids(servers: &[String]) -> Vec<u64> {
        servers.iter().map(|server| server_id(server)).collect()
    }

    /// Where `key` goes with no load, among the servers `eligible` allows.
    fn place(key: u64, ids: &[u64], eligible: impl Fn(usize) -> bool) -> usize {
        rendezvous_bounded(key, ids, |_| 0, eligible).unwrap()
    }

    #[test]
    fn hashes_are_pinned_so_every_version_and_process_maps_alike() {
        // XXH3-64 of the empty input, from the xxHash specification's test
        // vectors: the crate computes the specified function.
        assert_eq!(key_hash(b""), 0x2D06_8005_38D3_94C2);
        // A fleet in a rolling upgrade runs two versions at once: a change of
        // these values would remap every key and every sticky cookie. (Both
        // agree with xxHash's C implementation.)
        assert_eq!(server_id("127.0.0.1:9000"), 0xfd47_2719_22ce_4529);
        assert_eq!(score(1, 2), 0x07ee_86c2_8144_6bef);
    }

    #[test]
    fn same_list_same_mapping_and_order_does_not_matter() {
        let list = servers(5);
        let mut reversed = list.clone();
        reversed.reverse();
        let (forward, backward) = (ids(&list), ids(&reversed));
        for key in 0..2000u64 {
            let key = key_hash(&key.to_le_bytes());
            let here = place(key, &forward, |_| true);
            let there = place(key, &backward, |_| true);
            assert_eq!(list[here], reversed[there]);
        }
    }

    #[test]
    fn keys_spread_evenly() {
        let ids = ids(&servers(4));
        let mut counts = [0usize; 4];
        for key in 0..40_000u64 {
            counts[place(key_hash(&key.to_le_bytes()), &ids, |_| true)] += 1;
        }
        for count in counts {
            assert!((9_000..=11_000).contains(&count), "{counts:?}");
        }
    }

    #[test]
    fn losing_a_server_moves_only_its_keys() {
        let list = servers(5);
        let all = ids(&list);
        let lost = 2;
        let mut remaining = list.clone();
        remaining.remove(lost);
        let fewer = ids(&remaining);
        let mut moved = 0;
        for key in 0..10_000u64 {
            let key = key_hash(&key.to_le_bytes());
            let before = place(key, &all, |_| true);
            // Unhealthy: still listed, not eligible.
            let unhealthy = place(key, &all, |index| index != lost);
            // Removed from the list by a reload.
            let removed = &remaining[place(key, &fewer, |_| true)];
            assert_eq!(&list[unhealthy], removed);
            if before == lost {
                assert_ne!(unhealthy, lost);
                moved += 1;
            } else {
                assert_eq!(unhealthy, before, "a key not on the lost server moved");
            }
        }
        // About a fifth of the keys were on it.
        assert!((1_700..=2_300).contains(&moved), "{moved}");
    }

    #[test]
    fn no_server_goes_over_the_bound() {
        let count = 4;
        let ids = ids(&servers(count));
        // The worst case: every connection has the same key.
        for keys in [1u64, 3, 1000] {
            let mut loads = vec![0usize; count];
            for connection in 0..400u64 {
                let key = key_hash(&(connection % keys).to_le_bytes());
                let chosen = rendezvous_bounded(key, &ids, |index| loads[index], |_| true).unwrap();
                loads[chosen] += 1;
                let open = connection as usize + 1;
                let cap = (5 * open).div_ceil(4 * count);
                assert!(
                    loads.iter().all(|&load| load <= cap),
                    "{loads:?} over {cap}"
                );
            }
        }
    }

    #[test]
    fn a_full_server_passes_the_key_to_its_next_ranked() {
        let ids = ids(&servers(3));
        let key = key_hash(b"user-1");
        let first = place(key, &ids, |_| true);
        let second = place(key, &ids, |index| index != first);
        // One connection open, on the key's server: with two over three
        // servers the cap is one, so the next goes to the second choice.
        let load = |index: usize| usize::from(index == first);
        assert_eq!(rendezvous_bounded(key, &ids, load, |_| true), Some(second));
        // Nothing eligible: nothing chosen.
        assert_eq!(rendezvous_bounded(key, &ids, |_| 0, |_| false), None);
    }

    #[test]
    fn round_robin_and_least_loaded_skip_the_ineligible() {
        assert_eq!(round_robin(3, 2, |_| true), Some(2));
        assert_eq!(round_robin(3, 2, |index| index != 2), Some(0));
        assert_eq!(round_robin(3, 0, |_| false), None);
        let loads = [2, 1, 1];
        assert_eq!(least_loaded(3, 0, |i| loads[i], |_| true), Some(1));
        assert_eq!(least_loaded(3, 2, |i| loads[i], |_| true), Some(2));
        assert_eq!(least_loaded(3, 0, |i| loads[i], |i| i == 0), Some(0));
    }
}
