//! A bounded set of record keys whose entries expire: the remote tier's
//! negative cache (recent misses) and its known set (blocks this process
//! wrote, queued or read within the store's TTL).
//!
//! # Design and costs
//!
//! A hash map from key to expiry, plus a FIFO of (key, expiry) in insertion
//! order. Expired entries are dropped lazily: a lookup treats an expired
//! entry as absent, and every insert pops expired or superseded entries
//! off the front of the FIFO. Past the capacity the oldest entries go
//! first. An insert, lookup or removal is O(1) amortized; memory is about
//! 90 bytes per entry (1M entries: ~90 MB), bounded by the capacity (the
//! FIFO is compacted when refreshes leave it more than twice the map).
//!
//! # Invariants
//!
//! * `map.len() <= cap`;
//! * every map entry has a FIFO entry with the same expiry (older FIFO
//!   entries of a refreshed or removed key are stale and skipped).
//!
//! A plain `&mut self` type: the tier keeps it under its one lock.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::record::RecordKey;

/// See the module doc.
#[derive(Debug)]
pub(crate) struct ExpiringSet {
    ttl: Duration,
    cap: usize,
    map: HashMap<RecordKey, Instant>,
    order: VecDeque<(RecordKey, Instant)>,
}

impl ExpiringSet {
    /// An empty set whose entries live `ttl` and which holds at most `cap`.
    pub(crate) fn new(ttl: Duration, cap: usize) -> Self {
        Self { ttl, cap: cap.max(1), map: HashMap::new(), order: VecDeque::new() }
    }

    /// Whether `key` is in the set and not expired at `now`.
    pub(crate) fn contains(&self, key: &RecordKey, now: Instant) -> bool {
        self.map.get(key).is_some_and(|&exp| exp > now)
    }

    /// Adds `key` (or refreshes it) until `now + ttl`; true if it was not
    /// in the set (or had expired).
    pub(crate) fn insert(&mut self, key: RecordKey, now: Instant) -> bool {
        let exp = now + self.ttl;
        let fresh = !self.contains(&key, now);
        self.map.insert(key, exp);
        self.order.push_back((key, exp));
        self.trim(now);
        fresh
    }

    /// Removes `key`; true if it was there (expired or not).
    pub(crate) fn remove(&mut self, key: &RecordKey) -> bool {
        self.map.remove(key).is_some()
    }

    /// Entries held (some may have expired and not been dropped yet).
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Drops expired entries from the front and the oldest past the
    /// capacity; compacts the FIFO when stale entries dominate it.
    fn trim(&mut self, now: Instant) {
        while let Some(&(k, exp)) = self.order.front() {
            let live = self.map.get(&k) == Some(&exp);
            if live && exp > now && self.map.len() <= self.cap {
                break;
            }
            self.order.pop_front();
            if live {
                self.map.remove(&k);
            }
        }
        if self.order.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.order.retain(|(k, exp)| map.get(k) == Some(exp));
        }
    }

    /// Checks the invariants (tests).
    #[cfg(test)]
    fn check(&self) -> Result<(), String> {
        if self.map.len() > self.cap {
            return Err(format!("{} entries past the cap {}", self.map.len(), self.cap));
        }
        for (k, exp) in &self.map {
            if !self.order.iter().any(|(ok, oexp)| ok == k && oexp == exp) {
                return Err(format!("{k:?} has no FIFO entry"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv::BlockHash;
    use rand::{Rng, SeedableRng};

    fn key(i: u32) -> RecordKey {
        RecordKey::new(0, BlockHash::from_u128(u128::from(i)))
    }

    #[test]
    fn an_entry_expires_after_its_ttl_and_a_refresh_extends_it() {
        let t0 = Instant::now();
        let mut s = ExpiringSet::new(Duration::from_secs(2), 10);
        assert!(s.insert(key(1), t0));
        assert!(s.contains(&key(1), t0 + Duration::from_secs(1)));
        assert!(!s.insert(key(1), t0 + Duration::from_secs(1)), "refresh of a live entry");
        assert!(s.contains(&key(1), t0 + Duration::from_millis(2500)), "refreshed");
        assert!(!s.contains(&key(1), t0 + Duration::from_secs(3)));
        assert!(s.insert(key(1), t0 + Duration::from_secs(4)), "an expired entry counts as new");
        s.check().unwrap();
    }

    #[test]
    fn the_oldest_entries_go_past_the_capacity() {
        let t0 = Instant::now();
        let mut s = ExpiringSet::new(Duration::from_secs(60), 3);
        for i in 0..5 {
            s.insert(key(i), t0);
        }
        assert_eq!(s.len(), 3);
        assert!(!s.contains(&key(0), t0) && !s.contains(&key(1), t0));
        assert!((2..5).all(|i| s.contains(&key(i), t0)));
        s.check().unwrap();
    }

    #[test]
    fn refreshing_one_key_forever_keeps_the_fifo_bounded() {
        let t0 = Instant::now();
        let mut s = ExpiringSet::new(Duration::from_secs(60), 1000);
        for i in 0..100_000u64 {
            s.insert(key(7), t0 + Duration::from_micros(i));
        }
        assert_eq!(s.len(), 1);
        assert!(s.order.len() <= 2 * s.map.len() + 65, "fifo of {}", s.order.len());
    }

    /// Seeded random operations against a reference model (a map of
    /// expiries with the same capacity rule).
    #[test]
    fn random_operations_match_a_reference_model() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let ttl = Duration::from_millis(50);
        let cap = 16;
        let t0 = Instant::now();
        let mut s = ExpiringSet::new(ttl, cap);
        // Reference: key -> (expiry, insertion sequence).
        let mut model: HashMap<RecordKey, (Instant, u64)> = HashMap::new();
        for step in 0..20_000u64 {
            let now = t0 + Duration::from_millis(step / 4);
            let k = key(rng.random_range(0..24));
            match rng.random_range(0..3) {
                0 => {
                    let was = model.get(&k).is_some_and(|&(e, _)| e > now);
                    assert_eq!(s.insert(k, now), !was, "step {step}");
                    model.insert(k, (now + ttl, step));
                    model.retain(|_, (e, _)| *e > now);
                    while model.len() > cap {
                        let oldest = *model.iter().min_by_key(|(_, (_, seq))| *seq).map(|(k, _)| k).unwrap();
                        model.remove(&oldest);
                    }
                }
                1 => {
                    s.remove(&k);
                    model.remove(&k);
                }
                _ => {}
            }
            assert_eq!(s.contains(&k, now), model.get(&k).is_some_and(|&(e, _)| e > now), "step {step}");
            s.check().unwrap();
        }
    }
}
