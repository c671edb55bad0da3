//! A bounded replay cache: remembers what was accepted inside the timestamp window.
//!
//! Implements the replay check of PROTOCOL.md §6 ("message hash unseen within the window") and
//! serves as the nonce cache of §3 and §4 (enrollment, connect and group-key request nonces).
//!
//! Every entry carries the timestamp of what it remembers. Entries whose timestamp has left the
//! window are evicted: a message that old cannot be replayed once forgotten, because the
//! timestamp check (`|T − now| ≤ window`, repeated by [`ReplayCache::check_and_insert`] itself)
//! rejects it before the cache is consulted. The timestamp is covered by the message signature,
//! so a replayer cannot refresh it.
//!
//! Memory is bounded by a hard capacity. When a flood fills the cache, the entry with the oldest
//! timestamp is evicted and the cache raises a *floor* to that timestamp: from then on anything
//! with a timestamp at or below the floor is refused as a possible replay. So a capacity
//! eviction never opens a replay hole; under a flood, the cost is that some genuine but older
//! messages are refused until the window moves past the floor.
//!
//! # Usage
//! ```
//! use quva_client::replay::{ReplayCache, ReplayError};
//! let mut cache = ReplayCache::new(60_000, 1024);
//! let hash = [7u8; 32];
//! assert_eq!(cache.check_and_insert(hash, 1_000, 1_500), Ok(()));
//! assert_eq!(cache.check_and_insert(hash, 1_000, 2_000), Err(ReplayError::Replayed));
//! // Once outside the window the entry is gone, and the message is refused as too old instead.
//! assert_eq!(
//!     cache.check_and_insert(hash, 1_000, 70_000),
//!     Err(ReplayError::OutsideWindow)
//! );
//! assert!(cache.is_empty());
//! ```

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::Hash;

/// Default timestamp window: 60 s (PROTOCOL.md §6).
pub const DEFAULT_WINDOW_MS: u64 = 60_000;
/// Default capacity: 65 536 entries (a few MiB with 32-byte keys).
pub const DEFAULT_CAPACITY: usize = 65_536;

/// Why [`ReplayCache::check_and_insert`] refused an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The key was already accepted inside the window.
    #[error("replayed")]
    Replayed,
    /// The timestamp is more than the window away from now (in either direction).
    #[error("timestamp outside the window")]
    OutsideWindow,
    /// The timestamp is at or below the floor left by a capacity eviction: the cache can no longer
    /// tell whether this was seen, so it refuses it.
    #[error("timestamp below the replay floor")]
    BelowFloor,
}

/// A replay cache over keys `K`: by default 32-byte message hashes, or any ordered, hashable nonce.
///
/// Lookups are O(1) (a `HashSet` with std's randomly keyed SipHash, so an attacker cannot force
/// collisions); evictions are O(log n) (a `BTreeSet` ordered by timestamp).
#[derive(Debug, Clone)]
pub struct ReplayCache<K = [u8; 32]> {
    window_ms: u64,
    capacity: usize,
    seen: HashSet<K>,
    by_time: BTreeSet<(u64, K)>,
    floor: Option<u64>,
}

impl<K: Eq + Hash + Ord + Clone> ReplayCache<K> {
    /// An empty cache with the given window (ms) and hard capacity (at least 1 entry).
    pub fn new(window_ms: u64, capacity: usize) -> Self {
        Self {
            window_ms,
            capacity: capacity.max(1),
            seen: HashSet::new(),
            by_time: BTreeSet::new(),
            floor: None,
        }
    }

    /// The timestamp window in milliseconds.
    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// The hard capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries currently remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Whether `key` is remembered. A cheap pre-check before expensive verification; the decision
    /// is [`check_and_insert`](Self::check_and_insert)'s.
    pub fn contains(&self, key: &K) -> bool {
        self.seen.contains(key)
    }

    /// Whether a capacity eviction left a floor that still guards part of the window.
    pub fn has_floor(&self) -> bool {
        self.floor.is_some()
    }

    /// Forgets every entry whose timestamp is more than the window before `now_ms`.
    pub fn evict_expired(&mut self, now_ms: u64) {
        let Some(oldest_allowed) = now_ms.checked_sub(self.window_ms) else {
            return;
        };
        while let Some((t, _)) = self.by_time.first() {
            if *t >= oldest_allowed {
                break;
            }
            if let Some((_, key)) = self.by_time.pop_first() {
                self.seen.remove(&key);
            }
        }
        if self.floor.is_some_and(|f| f < oldest_allowed) {
            // The window alone now rejects everything the floor guarded.
            self.floor = None;
        }
    }

    /// Accepts `key` with timestamp `t_ms` if it is inside the window around `now_ms`, above the
    /// floor and unseen, and remembers it. Call it only once everything else about the message has
    /// been verified, so that forgeries cannot fill the cache.
    ///
    /// # Errors
    /// [`ReplayError::OutsideWindow`], [`ReplayError::BelowFloor`] or [`ReplayError::Replayed`];
    /// nothing is remembered then.
    pub fn check_and_insert(&mut self, key: K, t_ms: u64, now_ms: u64) -> Result<(), ReplayError> {
        self.evict_expired(now_ms);
        if t_ms.abs_diff(now_ms) > self.window_ms {
            return Err(ReplayError::OutsideWindow);
        }
        if self.floor.is_some_and(|f| t_ms <= f) {
            return Err(ReplayError::BelowFloor);
        }
        if self.seen.contains(&key) {
            return Err(ReplayError::Replayed);
        }
        while self.seen.len() >= self.capacity {
            let Some((t, oldest)) = self.by_time.pop_first() else {
                break;
            };
            self.seen.remove(&oldest);
            self.floor = Some(self.floor.map_or(t, |f| f.max(t)));
        }
        if self.floor.is_some_and(|f| t_ms <= f) {
            // The eviction just made raised the floor above this entry.
            return Err(ReplayError::BelowFloor);
        }
        self.seen.insert(key.clone());
        self.by_time.insert((t_ms, key));
        Ok(())
    }
}

/// Replay caches partitioned by a key that the checked item itself determines (PROTOCOL.md §8
/// v1.1: per group, per sender, with quotas).
///
/// Each partition is a [`ReplayCache`] with its own capacity (the *quota*) and its own floor, so
/// a sender that floods its partition raises only its own floor: nobody else's messages are
/// refused because of it. This is sound only if every copy of an item falls in the same
/// partition, whoever presents it: the partition must be a function of the signed item (the
/// group and claimed sender of a message, the identity a connect proof names), never of the
/// connection that carries it.
///
/// # Usage
/// ```
/// use quva_client::replay::{PartitionedReplay, ReplayError};
/// let mut c: PartitionedReplay<&str> = PartitionedReplay::new(60_000, 2);
/// let now = 100_000;
/// // A flood from "a" fills and floors only a's partition…
/// for i in 0..3u8 {
///     let _ = c.check_and_insert("a", [i; 32], now + 60_000, now);
/// }
/// assert_eq!(c.check_and_insert("a", [9; 32], now, now), Err(ReplayError::BelowFloor));
/// // …while "b" is unaffected.
/// assert_eq!(c.check_and_insert("b", [9; 32], now, now), Ok(()));
/// ```
#[derive(Debug, Clone)]
pub struct PartitionedReplay<P, K = [u8; 32]> {
    window_ms: u64,
    quota: usize,
    parts: HashMap<P, ReplayCache<K>>,
}

impl<P: Eq + Hash, K: Eq + Hash + Ord + Clone> PartitionedReplay<P, K> {
    /// Empty caches with the given window (ms) and per-partition capacity (at least 1).
    pub fn new(window_ms: u64, quota: usize) -> Self {
        Self {
            window_ms,
            quota: quota.max(1),
            parts: HashMap::new(),
        }
    }

    /// The per-partition capacity.
    pub fn quota(&self) -> usize {
        self.quota
    }

    /// Whether `key` is remembered in `part` (a cheap pre-check; see
    /// [`ReplayCache::contains`]).
    pub fn contains(&self, part: &P, key: &K) -> bool {
        self.parts.get(part).is_some_and(|c| c.contains(key))
    }

    /// [`ReplayCache::check_and_insert`] in the partition `part`.
    ///
    /// # Errors
    /// As [`ReplayCache::check_and_insert`], for this partition only.
    pub fn check_and_insert(
        &mut self,
        part: P,
        key: K,
        t_ms: u64,
        now_ms: u64,
    ) -> Result<(), ReplayError> {
        let (window, quota) = (self.window_ms, self.quota);
        self.parts
            .entry(part)
            .or_insert_with(|| ReplayCache::new(window, quota))
            .check_and_insert(key, t_ms, now_ms)
    }

    /// Forgets expired entries everywhere and drops the partitions left empty with no floor
    /// (a partition with a floor still guards the window and stays).
    pub fn prune(&mut self, now_ms: u64) {
        self.parts.retain(|_, c| {
            c.evict_expired(now_ms);
            !c.is_empty() || c.has_floor()
        });
    }

    /// Partitions currently held.
    pub fn partitions(&self) -> usize {
        self.parts.len()
    }

    /// Entries remembered across all partitions.
    pub fn len(&self) -> usize {
        self.parts.values().map(ReplayCache::len).sum()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.parts.values().all(ReplayCache::is_empty)
    }
}

impl<P: Eq + Hash, K: Eq + Hash + Ord + Clone> Default for PartitionedReplay<P, K> {
    /// [`DEFAULT_WINDOW_MS`] and [`DEFAULT_CAPACITY`] per partition.
    fn default() -> Self {
        Self::new(DEFAULT_WINDOW_MS, DEFAULT_CAPACITY)
    }
}

impl<K: Eq + Hash + Ord + Clone> Default for ReplayCache<K> {
    /// [`DEFAULT_WINDOW_MS`] and [`DEFAULT_CAPACITY`].
    fn default() -> Self {
        Self::new(DEFAULT_WINDOW_MS, DEFAULT_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(i: u64) -> [u8; 32] {
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&i.to_be_bytes());
        k
    }

    #[test]
    fn rejects_a_replay_inside_the_window() {
        let mut c = ReplayCache::new(1_000, 16);
        assert_eq!(c.check_and_insert(key(1), 10_000, 10_000), Ok(()));
        assert_eq!(
            c.check_and_insert(key(1), 10_000, 10_999),
            Err(ReplayError::Replayed)
        );
        assert_eq!(c.check_and_insert(key(2), 10_000, 10_999), Ok(()));
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn evicts_by_time_and_the_window_then_rejects_the_old_message() {
        let mut c = ReplayCache::new(1_000, 16);
        c.check_and_insert(key(1), 10_000, 10_000).unwrap();
        c.check_and_insert(key(2), 10_500, 10_500).unwrap();
        // At 11 000 both are still inside the window (edges included).
        c.evict_expired(11_000);
        assert_eq!(c.len(), 2);
        // At 11 001 key 1 (t = 10 000) has left the window; key 2 stays.
        c.evict_expired(11_001);
        assert!(!c.contains(&key(1)));
        assert!(c.contains(&key(2)));
        // Replaying key 1 now is refused by the timestamp, not by memory.
        assert_eq!(
            c.check_and_insert(key(1), 10_000, 11_001),
            Err(ReplayError::OutsideWindow)
        );
        assert!(!c.contains(&key(1)));
    }

    #[test]
    fn rejects_future_timestamps_beyond_the_window() {
        let mut c = ReplayCache::new(1_000, 16);
        assert_eq!(
            c.check_and_insert(key(1), 12_001, 11_000),
            Err(ReplayError::OutsideWindow)
        );
        assert_eq!(c.check_and_insert(key(1), 12_000, 11_000), Ok(()));
    }

    #[test]
    fn eviction_order_follows_timestamps_not_arrival() {
        let mut c = ReplayCache::new(10_000, 16);
        c.check_and_insert(key(1), 20_000, 20_000).unwrap();
        c.check_and_insert(key(2), 15_000, 20_000).unwrap();
        c.evict_expired(25_001);
        assert!(c.contains(&key(1)));
        assert!(!c.contains(&key(2)));
    }

    #[test]
    fn bounded_under_a_flood_and_never_reopens_a_replay() {
        let cap = 64;
        let mut c = ReplayCache::new(60_000, cap);
        let now = 1_000_000;
        for i in 0..10_000u64 {
            // Timestamps spread over the window, arriving in scrambled order.
            let t = now - 30_000 + (i * 7919) % 30_000;
            let _ = c.check_and_insert(key(i), t, now);
            assert!(c.len() <= cap);
        }
        assert_eq!(c.len(), cap);
        // Whatever was accepted and then evicted for capacity cannot come back.
        let mut c = ReplayCache::new(60_000, 4);
        for i in 0..4u64 {
            c.check_and_insert(key(i), now - 100 + i, now).unwrap();
        }
        c.check_and_insert(key(9), now, now).unwrap();
        assert!(!c.contains(&key(0)));
        assert_eq!(
            c.check_and_insert(key(0), now - 100, now),
            Err(ReplayError::BelowFloor)
        );
        // Newer messages still pass.
        assert_eq!(c.check_and_insert(key(10), now, now), Ok(()));
        // Once the window passes the floor, the floor is dropped.
        c.evict_expired(now + 60_000);
        assert_eq!(
            c.check_and_insert(key(11), now + 59_999, now + 60_000),
            Ok(())
        );
    }

    #[test]
    fn works_for_nonces() {
        let mut c: ReplayCache<(String, [u8; 16])> = ReplayCache::new(1_000, 8);
        let n = ("dev-1".to_owned(), [3u8; 16]);
        assert_eq!(c.check_and_insert(n.clone(), 5, 5), Ok(()));
        assert_eq!(c.check_and_insert(n, 5, 6), Err(ReplayError::Replayed));
        let other = ("dev-2".to_owned(), [3u8; 16]);
        assert_eq!(c.check_and_insert(other, 5, 6), Ok(()));
    }

    #[test]
    fn a_flooding_partition_floors_only_itself() {
        let mut c: PartitionedReplay<u8> = PartitionedReplay::new(60_000, 4);
        let now = 1_000_000;
        // Partition 1 fills with messages dated at the future edge of the window, then more.
        for i in 0..8u64 {
            let _ = c.check_and_insert(1, key(i), now + 60_000, now);
        }
        assert_eq!(
            c.check_and_insert(1, key(100), now, now),
            Err(ReplayError::BelowFloor)
        );
        // Partition 2 accepts honest traffic at `now`, and still refuses its own replays.
        assert_eq!(c.check_and_insert(2, key(100), now, now), Ok(()));
        assert_eq!(
            c.check_and_insert(2, key(100), now, now + 1),
            Err(ReplayError::Replayed)
        );
        assert!(c.contains(&2, &key(100)) && !c.contains(&1, &key(100)));
        // Partition 1 keeps what the eviction left (3 of its 4); partition 2 its one entry.
        assert_eq!(c.len(), 4);
    }

    #[test]
    fn prune_drops_idle_partitions_but_keeps_floors() {
        let mut c: PartitionedReplay<u8> = PartitionedReplay::new(1_000, 1);
        c.check_and_insert(1, key(1), 10_000, 10_000).unwrap();
        c.check_and_insert(2, key(1), 10_000, 10_000).unwrap();
        // Partition 2 evicts for capacity: its floor is 10 000.
        c.check_and_insert(2, key(2), 10_500, 10_500).unwrap();
        c.prune(11_200);
        // Partition 1's only entry expired: dropped. Partition 2 still holds key 2.
        assert_eq!(c.partitions(), 1);
        c.prune(11_501);
        assert_eq!(c.partitions(), 0);
        assert!(c.is_empty());
    }

    proptest! {
        // Model check: the cache never accepts a key twice while its timestamp is in the window,
        // and never exceeds its capacity.
        #[test]
        fn never_accepts_a_key_twice_within_the_window(
            ops in proptest::collection::vec((0u64..24, 0u64..3_000, 0u64..200), 1..300),
            cap in 1usize..20,
        ) {
            let window = 1_000;
            let mut c = ReplayCache::new(window, cap);
            let mut now = 10_000u64;
            let mut accepted: Vec<(u64, u64, u64)> = Vec::new(); // (key, t, accepted_at)
            for (k, back, step) in ops {
                now += step;
                let t = now + 500 - back.min(now);
                let r = c.check_and_insert(key(k), t, now);
                if r.is_ok() {
                    for &(k2, t2, _) in &accepted {
                        // Same key accepted before: its earlier timestamp must have left the window.
                        if k2 == k {
                            prop_assert!(t2 + window < now || t != t2);
                        }
                    }
                    accepted.push((k, t, now));
                }
                prop_assert!(c.len() <= cap);
            }
        }
    }
}
