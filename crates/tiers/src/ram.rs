//! T1: blocks the pool evicted, kept in host RAM under a byte budget.
//!
//! The engine copies a block's payload here when the pool evicts it (about
//! 368 KB and a few tens of microseconds for the default model), and looks
//! here when a prefix lookup runs past the pool: a hit is *taken* out (the
//! tiers are exclusive, so RAM is not spent twice on one block) and
//! imported into a fresh pool block instead of being recomputed.
//!
//! Memory is taken as blocks arrive, never reserved: the budget is a cap.
//! Inserting past it evicts least recently used entries, which
//! [`RamTier::insert`] hands back so the caller can demote them to disk.
//! Lookups verify the whole key (namespace, parent, tokens), as the pool's
//! index does, so an address collision is a miss.
//!
//! Plain `&mut self`: the engine thread owns it.

use std::collections::{BTreeMap, HashMap};

use kv::BlockKey;

use crate::manifest::ManifestId;
use crate::record::{GroupId, RecordKey, Reject};
use crate::tier::{Done, LoadTask, Loading, Overflow, Stored, Tier, TierSnapshot};

/// Bookkeeping bytes charged per entry besides its payload and tokens.
const ENTRY_OVERHEAD: u64 = 96;

struct Entry {
    key: BlockKey,
    payload: Vec<u8>,
    tick: u64,
}

impl Entry {
    fn bytes(&self) -> u64 {
        self.payload.len() as u64 + 4 * self.key.tokens.len() as u64 + ENTRY_OVERHEAD
    }
}

/// See the module doc.
pub struct RamTier {
    budget: u64,
    bytes: u64,
    tick: u64,
    entries: HashMap<RecordKey, Entry>,
    lru: BTreeMap<u64, RecordKey>,
}

impl std::fmt::Debug for RamTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RamTier")
            .field("budget", &self.budget)
            .field("bytes", &self.bytes)
            .field("blocks", &self.entries.len())
            .finish()
    }
}

impl RamTier {
    /// An empty tier that holds at most `budget` bytes.
    pub fn new(budget: u64) -> Self {
        Self { budget, bytes: 0, tick: 0, entries: HashMap::new(), lru: BTreeMap::new() }
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held (payloads plus bookkeeping).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The byte budget.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Keeps `payload` as the block `key` of `group`, evicting least
    /// recently used entries to stay within the budget; returns them (and
    /// this block itself, if it alone exceeds the budget). A block already
    /// held is replaced.
    pub fn insert(&mut self, group: GroupId, key: BlockKey, payload: Vec<u8>) -> Vec<Overflow> {
        let rk = RecordKey::new(group, key.hash);
        self.remove(&rk);
        let entry = Entry { key, payload, tick: 0 };
        if entry.bytes() > self.budget {
            return vec![Overflow { group, key: entry.key, payload: entry.payload }];
        }
        let mut out = Vec::new();
        while self.bytes + entry.bytes() > self.budget {
            let Some((_, victim)) = self.lru.pop_first() else { break };
            if let Some(e) = self.entries.remove(&victim) {
                self.bytes -= e.bytes();
                out.push(Overflow { group: victim.group, key: e.key, payload: e.payload });
            }
        }
        self.tick += 1;
        self.lru.insert(self.tick, rk);
        self.bytes += entry.bytes();
        self.entries.insert(rk, Entry { tick: self.tick, ..entry });
        out
    }

    /// Whether a block with this address is held (unverified: a chain
    /// lookup's quick test; [`RamTier::take`] verifies).
    pub fn contains(&self, key: &RecordKey) -> bool {
        self.entries.contains_key(key)
    }

    /// Removes and returns the payload of exactly the block `expected` in
    /// `group`; `None` if absent or if the entry at that address holds
    /// something else (a collision: left alone).
    pub fn take(&mut self, group: GroupId, expected: &BlockKey) -> Option<Vec<u8>> {
        let rk = RecordKey::new(group, expected.hash);
        let e = self.entries.get(&rk)?;
        if e.key != *expected {
            return None;
        }
        self.remove(&rk).map(|e| e.payload)
    }

    /// A copy of the payload of exactly `expected`, which stays (and becomes
    /// the most recently used).
    pub fn get(&mut self, group: GroupId, expected: &BlockKey) -> Option<Vec<u8>> {
        let rk = RecordKey::new(group, expected.hash);
        let e = self.entries.get_mut(&rk).filter(|e| e.key == *expected)?;
        self.lru.remove(&e.tick);
        self.tick += 1;
        e.tick = self.tick;
        self.lru.insert(self.tick, rk);
        Some(e.payload.clone())
    }

    fn remove(&mut self, rk: &RecordKey) -> Option<Entry> {
        let e = self.entries.remove(rk)?;
        self.lru.remove(&e.tick);
        self.bytes -= e.bytes();
        Some(e)
    }

    /// Drops a block (an agent deleted: its conversation leaves every tier).
    pub fn discard(&mut self, key: &RecordKey) -> bool {
        self.remove(key).is_some()
    }
}

impl Tier for RamTier {
    fn name(&self) -> &'static str {
        "ram"
    }

    fn at_once(&self) -> bool {
        true
    }

    fn holds(&self, keys: &[RecordKey]) -> Vec<bool> {
        keys.iter().map(|k| self.contains(k)).collect()
    }

    /// Takes the blocks out (see [`RamTier::take`]): the pool gets them.
    fn load(&mut self, tasks: Vec<LoadTask>) -> Loading {
        Loading::Done(
            tasks
                .iter()
                .map(|t| self.take(t.group, &t.expected).map(crate::Payload::from_vec).ok_or(Reject::Missing))
                .collect(),
        )
    }

    fn store(&mut self, group: GroupId, key: BlockKey, payload: Vec<u8>) -> Stored {
        Stored::Kept(self.insert(group, key, payload))
    }

    fn inventory(&self) -> Vec<RecordKey> {
        self.entries.keys().copied().collect()
    }

    fn forget(&mut self, _agent: ManifestId, blocks: &[RecordKey], done: Done) {
        for k in blocks {
            self.discard(k);
        }
        done(Ok(()));
    }

    fn snapshot(&self) -> TierSnapshot {
        TierSnapshot {
            name: self.name(),
            blocks: self.len() as u64,
            bytes: self.bytes,
            budget: self.budget,
            degraded: None,
            disk: None,
            remote: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv::Namespace;

    fn key(i: u32) -> BlockKey {
        BlockKey::new(Namespace::new(b"m", b""), None, &[i; 4])
    }

    #[test]
    fn stays_within_budget_and_evicts_least_recently_used() {
        let per = 100 + 16 + ENTRY_OVERHEAD;
        let mut t = RamTier::new(per * 3);
        for i in 0..3 {
            assert!(t.insert(0, key(i), vec![i as u8; 100]).is_empty());
        }
        assert_eq!(t.bytes(), per * 3);
        // Touch block 0: block 1 becomes the oldest.
        assert_eq!(t.get(0, &key(0)), Some(vec![0; 100]));
        let out = t.insert(0, key(3), vec![3; 100]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].key, key(1));
        assert!(t.bytes() <= t.budget());
        assert_eq!(t.take(0, &key(2)), Some(vec![2; 100]));
        assert!(!t.contains(&RecordKey::new(0, key(2).hash)), "take moves the block out");
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_lookup_verifies_the_whole_key_and_groups_are_apart() {
        let mut t = RamTier::new(1 << 20);
        t.insert(0, key(1), vec![1; 8]);
        let mut forged = key(2);
        forged.hash = key(1).hash;
        assert_eq!(t.take(0, &forged), None, "same address, other tokens: a miss");
        assert_eq!(t.take(1, &key(1)), None, "another layer group");
        assert_eq!(t.take(0, &key(1)), Some(vec![1; 8]));
        assert_eq!(t.bytes(), 0);
    }

    #[test]
    fn a_block_larger_than_the_budget_overflows_at_once() {
        let mut t = RamTier::new(10);
        let out = t.insert(0, key(1), vec![0; 100]);
        assert_eq!(out.len(), 1);
        assert!(t.is_empty());
    }
}
