//! The disk tier's record index: which records exist, their recency, which
//! agents need them, and the byte budget. Plain `&mut self`; the disk tier
//! keeps it behind one mutex shared by the engine, the writer and the
//! readers (`disk/mod.rs`, `# Concurrency`).
//!
//! A record is *queued* (a write job for it is in the writer's queue: a
//! second job for it is not needed) or *present* (its file is in place).
//! Every install of a file bumps a generation, so a reader that found a
//! record corrupt deletes it only if nobody rewrote it meanwhile.
//!
//! Agents' manifests reference records: `refs` counts, per record, the
//! manifests naming it and how many of those are pinned. Eviction takes
//! present records in LRU order, first those no manifest names, then
//! unpinned agents' ones; a pinned agent's records are never evicted
//! (pinning is refused past the budget, above this layer). Deleting an
//! agent drops its references; records no other manifest names go with it.
//! A manifest's tail (its partial last block, `manifest.rs`) is named by
//! that manifest alone: replaced by a newer manifest that does not name it,
//! it goes too, where a full block stays as a plain cached record.

use std::collections::{BTreeMap, HashMap};

use crate::manifest::ManifestId;
use crate::record::RecordKey;

/// What the index knows of one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// A write job is queued.
    Queued,
    /// The file is in place.
    Present {
        /// Install generation.
        gen: u64,
        /// File size.
        bytes: u64,
        /// Recency (larger is more recent).
        tick: u64,
    },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Refs {
    agents: u32,
    pinned: u32,
}

#[derive(Debug)]
struct AgentRefs {
    /// Every record the manifest names, its tail included.
    blocks: Vec<RecordKey>,
    tail: Option<RecordKey>,
    pinned: bool,
}

/// See the module doc.
#[derive(Debug, Default)]
pub(crate) struct Index {
    records: HashMap<RecordKey, State>,
    /// Evictable present records by (class, tick): class 0 is named by no
    /// manifest, class 1 by unpinned agents only.
    order: BTreeMap<(u8, u64), RecordKey>,
    refs: HashMap<RecordKey, Refs>,
    agents: HashMap<ManifestId, AgentRefs>,
    /// Records a batch in progress is committing: not evicted meanwhile.
    protected: std::collections::HashSet<RecordKey>,
    /// The turn count of each agent's durable manifest.
    turns: HashMap<ManifestId, u64>,
    bytes: u64,
    pinned_bytes: u64,
    tick: u64,
    gen: u64,
    budget: u64,
}

impl Index {
    pub(crate) fn new(budget: u64) -> Self {
        Self { budget, ..Self::default() }
    }

    pub(crate) fn budget(&self) -> u64 {
        self.budget
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    pub(crate) fn pinned_bytes(&self) -> u64 {
        self.pinned_bytes
    }

    pub(crate) fn present_count(&self) -> usize {
        self.records.values().filter(|s| matches!(s, State::Present { .. })).count()
    }

    pub(crate) fn agent_count(&self) -> usize {
        self.agents.len()
    }

    pub(crate) fn state(&self, k: &RecordKey) -> Option<State> {
        self.records.get(k).copied()
    }

    /// Every record on disk now.
    pub(crate) fn present_keys(&self) -> Vec<RecordKey> {
        self.records.iter().filter(|(_, st)| matches!(st, State::Present { .. })).map(|(k, _)| *k).collect()
    }

    /// The install generation of a present record.
    pub(crate) fn present(&self, k: &RecordKey) -> Option<u64> {
        match self.records.get(k) {
            Some(State::Present { gen, .. }) => Some(*gen),
            _ => None,
        }
    }

    fn class(&self, k: &RecordKey) -> Option<u8> {
        match self.refs.get(k) {
            Some(r) if r.pinned > 0 => None,
            Some(r) if r.agents > 0 => Some(1),
            _ => Some(0),
        }
    }

    /// Takes a present record out of the eviction order (before its class
    /// or tick changes).
    fn unorder(&mut self, k: &RecordKey) {
        if let Some(State::Present { tick, bytes, .. }) = self.records.get(k).copied() {
            match self.class(k) {
                Some(c) => {
                    self.order.remove(&(c, tick));
                }
                None => self.pinned_bytes -= bytes,
            }
        }
    }

    /// Puts a present record back in the eviction order.
    fn reorder(&mut self, k: &RecordKey) {
        if let Some(State::Present { tick, bytes, .. }) = self.records.get(k).copied() {
            match self.class(k) {
                Some(c) => {
                    self.order.insert((c, tick), *k);
                }
                None => self.pinned_bytes += bytes,
            }
        }
    }

    /// Claims the write of `k`: false if it is already queued or present.
    pub(crate) fn mark_queued(&mut self, k: RecordKey) -> bool {
        if self.records.contains_key(&k) {
            return false;
        }
        self.records.insert(k, State::Queued);
        true
    }

    /// A queued write that will not happen (dropped, failed, cancelled).
    pub(crate) fn unqueue(&mut self, k: &RecordKey) {
        if self.records.get(k) == Some(&State::Queued) {
            self.records.remove(k);
        }
    }

    /// The file of `k` is in place (written now, or found at start with
    /// recency `tick` if given). Returns its generation.
    pub(crate) fn install(&mut self, k: RecordKey, bytes: u64, tick: Option<u64>) -> u64 {
        self.unorder(&k);
        if let Some(State::Present { bytes: old, .. }) = self.records.get(&k) {
            self.bytes -= old;
        }
        self.gen += 1;
        let tick = tick.unwrap_or_else(|| self.next_tick());
        self.tick = self.tick.max(tick);
        self.records.insert(k, State::Present { gen: self.gen, bytes, tick });
        self.bytes += bytes;
        self.reorder(&k);
        self.gen
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// A read hit: `k` becomes the most recently used.
    pub(crate) fn touch(&mut self, k: &RecordKey) {
        if let Some(State::Present { gen, bytes, .. }) = self.records.get(k).copied() {
            self.unorder(k);
            let tick = self.next_tick();
            self.records.insert(*k, State::Present { gen, bytes, tick });
            self.reorder(k);
        }
    }

    /// Forgets a present record (its file is being deleted), only if it is
    /// still generation `gen` when one is given. True if it was removed.
    pub(crate) fn remove(&mut self, k: &RecordKey, gen: Option<u64>) -> bool {
        match self.records.get(k).copied() {
            Some(State::Present { gen: g, bytes, .. }) if gen.is_none_or(|want| want == g) => {
                self.unorder(k);
                self.records.remove(k);
                self.bytes -= bytes;
                true
            }
            _ => false,
        }
    }

    /// Keeps `keys` from eviction until the next call (an empty list lifts
    /// it): the records a batch's commits name, while the batch runs.
    pub(crate) fn protect(&mut self, keys: &[RecordKey]) {
        self.protected = keys.iter().copied().collect();
    }

    /// Least recently used evictable records to delete so that `incoming`
    /// more bytes fit the budget; they are removed from the index (the
    /// caller unlinks their files under the same lock). May fall short when
    /// only pinned or protected records are left.
    pub(crate) fn evict_for(&mut self, incoming: u64) -> Vec<RecordKey> {
        let mut out = Vec::new();
        let mut kept = Vec::new();
        while self.bytes + incoming > self.budget {
            let Some((at, k)) = self.order.pop_first() else { break };
            if self.protected.contains(&k) {
                kept.push((at, k));
                continue;
            }
            if let Some(State::Present { bytes, .. }) = self.records.remove(&k) {
                self.bytes -= bytes;
            }
            out.push(k);
        }
        self.order.extend(kept);
        out
    }

    /// Records `id`'s manifest as naming `blocks` and `tail` (replacing
    /// what it named before). Returns the old manifest's tail if nothing
    /// names it now: it has left the index, and the caller deletes it.
    pub(crate) fn set_agent(
        &mut self,
        id: ManifestId,
        mut blocks: Vec<RecordKey>,
        tail: Option<RecordKey>,
        pinned: bool,
    ) -> Option<RecordKey> {
        let old_tail = self.agents.get(&id).and_then(|a| a.tail);
        // Records the old manifest named and the new one does not stay, as
        // plain cached records (evicted first), except its tail.
        let _ = self.drop_refs(id);
        blocks.extend(tail);
        for k in &blocks {
            self.unorder(k);
            let r = self.refs.entry(*k).or_default();
            r.agents += 1;
            r.pinned += u32::from(pinned);
            self.reorder(k);
        }
        self.agents.insert(id, AgentRefs { blocks, tail, pinned });
        old_tail.filter(|k| !self.refs.contains_key(k) && self.remove(k, None))
    }

    /// Drops `id`'s references; returns the present records no manifest
    /// names any more (the caller deletes them) and forgets queued writes
    /// of such records (they will be skipped).
    pub(crate) fn remove_agent(&mut self, id: ManifestId) -> Vec<RecordKey> {
        self.turns.remove(&id);
        let mut orphans = Vec::new();
        for k in self.drop_refs(id) {
            match self.records.get(&k).copied() {
                Some(State::Present { .. }) if self.remove(&k, None) => orphans.push(k),
                Some(State::Queued) => self.unqueue(&k),
                _ => {}
            }
        }
        orphans
    }

    /// Forgets the present records among `keys` that no manifest names
    /// (the blocks of a commit cancelled before its manifest was
    /// committed); returns them for the caller to delete.
    pub(crate) fn remove_unnamed(&mut self, keys: &[RecordKey]) -> Vec<RecordKey> {
        keys.iter().copied().filter(|k| !self.refs.contains_key(k) && self.remove(k, None)).collect()
    }

    /// Drops `id`'s references; returns the records nobody names any more.
    fn drop_refs(&mut self, id: ManifestId) -> Vec<RecordKey> {
        let Some(a) = self.agents.remove(&id) else { return Vec::new() };
        let mut unnamed = Vec::new();
        for k in &a.blocks {
            self.unorder(k);
            let gone = match self.refs.get_mut(k) {
                Some(r) => {
                    r.agents = r.agents.saturating_sub(1);
                    r.pinned = r.pinned.saturating_sub(u32::from(a.pinned));
                    r.agents == 0
                }
                None => false,
            };
            if gone {
                self.refs.remove(k);
                unnamed.push(*k);
            }
            self.reorder(k);
        }
        unnamed
    }

    /// Whether a manifest names `k`.
    pub(crate) fn is_named(&self, k: &RecordKey) -> bool {
        self.refs.contains_key(k)
    }

    /// Whether `id` has a manifest.
    pub(crate) fn has_agent(&self, id: &ManifestId) -> bool {
        self.agents.contains_key(id)
    }

    /// `id`'s manifest of `turns` turns is durable.
    pub(crate) fn durable(&mut self, id: ManifestId, turns: u64) {
        self.turns.insert(id, turns);
    }

    /// The turn count of `id`'s durable manifest.
    pub(crate) fn durable_turns(&self, id: &ManifestId) -> Option<u64> {
        self.turns.get(id).copied()
    }

    /// The whole-state check the tests and loom models run.
    pub(crate) fn check(&self) -> Result<(), String> {
        let mut bytes = 0;
        let mut pinned = 0;
        let mut ordered = 0;
        for (k, s) in &self.records {
            if let State::Present { bytes: b, tick, .. } = s {
                bytes += b;
                match self.class(k) {
                    Some(c) => {
                        ordered += 1;
                        if self.order.get(&(c, *tick)) != Some(k) {
                            return Err(format!("{k:?} is present but not in the eviction order"));
                        }
                    }
                    None => pinned += b,
                }
            }
        }
        if bytes != self.bytes || pinned != self.pinned_bytes {
            return Err(format!("bytes {}/{} pinned {}/{}", self.bytes, bytes, self.pinned_bytes, pinned));
        }
        if ordered != self.order.len() {
            return Err(format!("{} ordered entries for {ordered} evictable records", self.order.len()));
        }
        let mut counted: HashMap<RecordKey, Refs> = HashMap::new();
        for a in self.agents.values() {
            for k in &a.blocks {
                let r = counted.entry(*k).or_default();
                r.agents += 1;
                r.pinned += u32::from(a.pinned);
            }
        }
        if counted != self.refs {
            return Err("reference counts do not match the manifests".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv::BlockHash;

    fn k(i: u128) -> RecordKey {
        RecordKey::new(0, BlockHash::from_u128(i))
    }

    #[test]
    fn evicts_unreferenced_records_first_and_never_pinned_ones() {
        let mut ix = Index::new(400);
        for i in 0..4 {
            assert!(ix.mark_queued(k(i)));
            ix.install(k(i), 100, None);
        }
        assert!(!ix.mark_queued(k(0)), "present: no second write");
        // Record 0 (oldest) belongs to an unpinned agent, 1 to a pinned one.
        ix.set_agent(ManifestId::of("t", "a"), vec![k(0)], None, false);
        ix.set_agent(ManifestId::of("t", "p"), vec![k(1)], None, true);
        ix.check().unwrap();
        assert_eq!(ix.pinned_bytes(), 100);
        assert_eq!(ix.evict_for(100), vec![k(2)], "unreferenced before the agent's older record");
        assert_eq!(ix.evict_for(300), vec![k(3), k(0)], "then the agent's");
        assert_eq!(ix.evict_for(1000), vec![], "the pinned record stays");
        assert!(ix.present(&k(1)).is_some());
        ix.check().unwrap();
    }

    #[test]
    fn deleting_an_agent_removes_only_records_nobody_else_names() {
        let mut ix = Index::new(u64::MAX);
        for i in 0..3 {
            ix.install(k(i), 10, None);
        }
        ix.mark_queued(k(9));
        let a = ManifestId::of("t", "a");
        let b = ManifestId::of("t", "b");
        ix.set_agent(a, vec![k(0), k(1), k(9)], None, false);
        ix.set_agent(b, vec![k(0)], None, true);
        let mut gone = ix.remove_agent(a);
        gone.sort();
        assert_eq!(gone, vec![k(1)]);
        assert_eq!(ix.state(&k(9)), None, "a queued write of a deleted agent's record is cancelled");
        assert!(ix.present(&k(0)).is_some(), "shared with b");
        assert!(ix.present(&k(2)).is_some(), "named by nobody, but not the agent's");
        assert!(ix.remove_agent(a).is_empty(), "a second delete does nothing");
        ix.check().unwrap();
    }

    #[test]
    fn a_stale_generation_does_not_remove_a_rewritten_record() {
        let mut ix = Index::new(u64::MAX);
        let g1 = ix.install(k(1), 10, None);
        let g2 = ix.install(k(1), 10, None);
        assert_ne!(g1, g2);
        assert!(!ix.remove(&k(1), Some(g1)));
        assert!(ix.remove(&k(1), Some(g2)));
        assert_eq!(ix.bytes(), 0);
        ix.check().unwrap();
    }

    #[test]
    fn replacing_a_manifest_moves_references() {
        let mut ix = Index::new(30);
        for i in 0..3 {
            ix.install(k(i), 10, None);
        }
        let a = ManifestId::of("t", "a");
        ix.set_agent(a, vec![k(0), k(1)], None, true);
        ix.set_agent(a, vec![k(1), k(2)], None, false);
        assert_eq!(ix.pinned_bytes(), 0);
        assert!(ix.present(&k(0)).is_some(), "a replaced manifest deletes nothing");
        ix.check().unwrap();
        assert_eq!(ix.evict_for(10), vec![k(0)], "no longer named: evicted first");
    }

    /// A replaced manifest's tail leaves with it (nobody else could ever
    /// look it up), unless the new manifest names it too.
    #[test]
    fn replacing_a_manifest_deletes_its_old_tail() {
        let mut ix = Index::new(100);
        for i in 0..4 {
            ix.install(k(i), 10, None);
        }
        let a = ManifestId::of("t", "a");
        assert_eq!(ix.set_agent(a, vec![k(0)], Some(k(1)), false), None);
        assert_eq!(ix.set_agent(a, vec![k(0)], Some(k(1)), false), None, "the same tail named again stays");
        assert!(ix.present(&k(1)).is_some());
        assert_eq!(ix.set_agent(a, vec![k(0), k(2)], Some(k(3)), false), Some(k(1)));
        assert_eq!(ix.present(&k(1)), None, "the old tail left the index");
        assert_eq!(ix.bytes(), 30);
        ix.check().unwrap();
        let mut gone = ix.remove_agent(a);
        gone.sort();
        assert_eq!(gone, vec![k(0), k(2), k(3)], "a deleted agent's tail goes with its blocks");
        ix.check().unwrap();
    }
}
