//! The block pool: per-block reference counts and holders, the free list,
//! the LRU list of cached blocks, and the prefix index that maps content
//! addresses to cached blocks.
//!
//! Every block is in exactly one state, derived from its fields:
//!
//! | state  | refs | key (published) | lives in  |
//! |--------|------|-----------------|-----------|
//! | free   | 0    | none            | `free`    |
//! | used   | > 0  | either          | nowhere   |
//! | cached | 0    | some            | `lru`     |
//!
//! Allocation pops the free list, and when it is empty evicts the least
//! recently used cached block (dropping its index entry and key), so free +
//! cached is what can be allocated; it checks that count first and then takes
//! all `n` or none. Releasing the last reference sends a published block to
//! the most-recent end of the LRU and an unpublished one to the free list.
//! Callers release a sequence's blocks tail first, so within a chain the tail
//! is always older than its parent and eviction eats chains from the tail:
//! the surviving part of a chain stays a usable prefix. A published block
//! can lose its address to a new copy of the same tokens that the caller
//! prefers (`supersede`); it then leaves as an unpublished block would.
//! All operations are O(1) except lookup verification, which is O(block
//! size).
//!
//! `refs` is the sum of the holder counts; each holder is an owner slot with
//! the number of references it has, which is how owners' distinct-block
//! counts stay exact under sharing.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::hash::{BlockHash, BlockKey, Namespace, Prehashed};
use crate::ids::{BlockId, TokenId};
use crate::lru::LruList;
use crate::owners::{OwnerSlot, OwnerTable};

#[derive(Default)]
struct BlockMeta {
    refs: u32,
    /// (owner, references it holds); at most a few entries, capacity kept
    /// across reuse so steady-state allocation does not allocate.
    holders: Vec<(OwnerSlot, u32)>,
    key: Option<Box<BlockKey>>,
}

/// Where a block is, as seen by invariant checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BlockState {
    Free,
    Used,
    Cached,
}

/// A cached block the pool evicted to make room, with the content address it
/// had: the block id is reused right away, so whoever keeps the payload (a
/// RAM or disk tier) must copy it out before the model writes the block again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evicted {
    /// The block, already handed to its new holder.
    pub block: BlockId,
    /// What it held.
    pub key: BlockKey,
}

/// A change to what the prefix index holds, in the order it happened
/// (`KvCache::report_changes`): what a replica tells a router.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexChange {
    /// A block became findable under `hash` (its parent: the block before
    /// it in its chain).
    Published {
        /// Its address.
        hash: BlockHash,
        /// The previous block's address, if any.
        parent: Option<BlockHash>,
    },
    /// The block under `hash` left the index (evicted or superseded by
    /// nothing: its address is no longer findable).
    Unpublished {
        /// Its address.
        hash: BlockHash,
    },
}

pub(crate) struct BlockPool {
    blocks: Vec<BlockMeta>,
    free: Vec<BlockId>,
    lru: LruList,
    index: HashMap<BlockHash, BlockId, Prehashed>,
    evictions: u64,
    /// `Some` while evictions are reported (`KvCache::report_evictions`).
    evicted: Option<Vec<Evicted>>,
    /// `Some` while index changes are reported (`KvCache::report_changes`).
    changes: Option<Vec<IndexChange>>,
}

impl BlockPool {
    pub(crate) fn new(num_blocks: usize) -> Self {
        let mut blocks = Vec::with_capacity(num_blocks);
        blocks.resize_with(num_blocks, BlockMeta::default);
        // Pop order hands out low ids first, which keeps tests readable.
        let free = (0..num_blocks as u32).rev().map(BlockId::new).collect();
        Self {
            blocks,
            free,
            lru: LruList::new(num_blocks),
            index: HashMap::default(),
            evictions: 0,
            evicted: None,
            changes: None,
        }
    }

    pub(crate) fn total(&self) -> usize {
        self.blocks.len()
    }

    pub(crate) fn free_len(&self) -> usize {
        self.free.len()
    }

    pub(crate) fn cached_len(&self) -> usize {
        self.lru.len()
    }

    /// Blocks an allocation can get: free plus evictable.
    pub(crate) fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    pub(crate) fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Takes `n` blocks for `owner` into `out`, all or none.
    pub(crate) fn allocate_into(
        &mut self,
        owner: OwnerSlot,
        n: usize,
        owners: &mut OwnerTable,
        out: &mut Vec<BlockId>,
    ) -> Result<()> {
        if n > self.available() {
            return Err(Error::Exhausted { requested: n, available: self.available() });
        }
        out.reserve(n);
        for _ in 0..n {
            let id = match self.free.pop() {
                Some(id) => id,
                None => self.evict_one().expect("free + cached >= n was checked under the same borrow"),
            };
            let meta = &mut self.blocks[id.index()];
            debug_assert!(meta.refs == 0 && meta.key.is_none() && meta.holders.is_empty());
            meta.refs = 1;
            meta.holders.push((owner, 1));
            owners.started_holding(owner);
            out.push(id);
        }
        Ok(())
    }

    fn evict_one(&mut self) -> Option<BlockId> {
        let i = self.lru.pop_front()?;
        let id = BlockId::new(i);
        self.drop_key(id);
        self.evictions += 1;
        Some(id)
    }

    /// Unpublishes `id`, reporting its key if evictions are reported.
    fn drop_key(&mut self, id: BlockId) {
        if let Some(key) = self.blocks[id.index()].key.take() {
            self.index.remove(&key.hash);
            if let Some(log) = &mut self.changes {
                log.push(IndexChange::Unpublished { hash: key.hash });
            }
            if let Some(log) = &mut self.evicted {
                log.push(Evicted { block: id, key: *key });
            }
        }
    }

    /// Evicts the cached (unreferenced) block published under `hash` now,
    /// moving it to the free list; false if no cached block has that address.
    pub(crate) fn evict_cached(&mut self, hash: BlockHash) -> bool {
        let Some(&id) = self.index.get(&hash) else { return false };
        if self.blocks[id.index()].refs != 0 {
            return false;
        }
        self.lru.remove(id.get());
        self.drop_key(id);
        self.evictions += 1;
        self.free.push(id);
        true
    }

    /// Starts (or stops, discarding pending reports) reporting evictions.
    pub(crate) fn report_evictions(&mut self, on: bool) {
        self.evicted = on.then(|| self.evicted.take().unwrap_or_default());
    }

    /// Evictions since the last call, oldest first.
    pub(crate) fn take_evicted(&mut self) -> Vec<Evicted> {
        self.evicted.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Starts (or stops, discarding pending reports) reporting index
    /// changes.
    pub(crate) fn report_changes(&mut self, on: bool) {
        self.changes = on.then(|| self.changes.take().unwrap_or_default());
    }

    /// Index changes since the last call, in order.
    pub(crate) fn take_changes(&mut self) -> Vec<IndexChange> {
        self.changes.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Whether a block is published under `hash` (used or cached).
    pub(crate) fn is_indexed(&self, hash: BlockHash) -> bool {
        self.index.contains_key(&hash)
    }

    /// Adds a reference for `owner`; a cached block becomes used again.
    pub(crate) fn retain(&mut self, id: BlockId, owner: OwnerSlot, owners: &mut OwnerTable) {
        let meta = &mut self.blocks[id.index()];
        if meta.refs == 0 {
            self.lru.remove(id.get());
        }
        meta.refs += 1;
        match meta.holders.iter_mut().find(|(o, _)| *o == owner) {
            Some((_, n)) => *n += 1,
            None => {
                meta.holders.push((owner, 1));
                owners.started_holding(owner);
            }
        }
    }

    /// How many references `owner` has on `id`.
    pub(crate) fn held_by(&self, id: BlockId, owner: OwnerSlot) -> u32 {
        self.blocks.get(id.index()).and_then(|m| m.holders.iter().find(|(o, _)| *o == owner)).map_or(0, |(_, n)| *n)
    }

    /// Drops one of `owner`'s references. Callers guarantee the reference
    /// exists (sequences and the raw-allocation map track them).
    pub(crate) fn release(&mut self, id: BlockId, owner: OwnerSlot, owners: &mut OwnerTable) {
        let meta = &mut self.blocks[id.index()];
        let Some(pos) = meta.holders.iter().position(|(o, _)| *o == owner) else {
            debug_assert!(false, "released {id} for an owner that holds no reference");
            return;
        };
        meta.holders[pos].1 -= 1;
        if meta.holders[pos].1 == 0 {
            meta.holders.swap_remove(pos);
            owners.stopped_holding(owner);
        }
        debug_assert!(meta.refs > 0, "refcount underflow on {id}");
        meta.refs = meta.refs.saturating_sub(1);
        if meta.refs == 0 {
            if meta.key.is_some() {
                self.lru.push_back(id.get());
            } else {
                self.free.push(id);
            }
        }
    }

    pub(crate) fn refs(&self, id: BlockId) -> u32 {
        self.blocks[id.index()].refs
    }

    pub(crate) fn is_published(&self, id: BlockId) -> bool {
        self.blocks[id.index()].key.is_some()
    }

    /// Makes a used block findable by its content address. Returns false (and
    /// leaves the block private) if another block already has that address.
    pub(crate) fn publish(&mut self, id: BlockId, key: BlockKey) -> bool {
        let meta = &mut self.blocks[id.index()];
        if meta.key.is_some() || self.index.contains_key(&key.hash) {
            return false;
        }
        self.index.insert(key.hash, id);
        if let Some(log) = &mut self.changes {
            log.push(IndexChange::Published { hash: key.hash, parent: key.parent });
        }
        meta.key = Some(Box::new(key));
        true
    }

    /// The block published under `hash`, if any.
    pub(crate) fn indexed(&self, hash: BlockHash) -> Option<BlockId> {
        self.index.get(&hash).copied()
    }

    /// Publishes the unpublished used block `id` under `key` in place of
    /// `old`, the block published there now, whose copy the caller found
    /// worse (a hybrid model's that lost its sliding-window K/V). `old`
    /// keeps its holders but loses its address: a cached one goes to the
    /// free list at once, a used one when its last holder releases it. Not
    /// an eviction: nothing is reported, since `id` holds the same content.
    pub(crate) fn supersede(&mut self, old: BlockId, id: BlockId, key: BlockKey) {
        debug_assert_eq!(self.index.get(&key.hash), Some(&old));
        debug_assert!(old != id && self.blocks[id.index()].key.is_none() && self.blocks[id.index()].refs > 0);
        let stale = &mut self.blocks[old.index()];
        stale.key = None;
        if stale.refs == 0 {
            self.lru.remove(old.get());
            self.free.push(old);
        }
        self.index.insert(key.hash, id);
        self.blocks[id.index()].key = Some(Box::new(key));
    }

    /// The cached or used block with exactly this content, if any.
    pub(crate) fn lookup(
        &self,
        hash: BlockHash,
        parent: Option<BlockHash>,
        ns: Namespace,
        tokens: &[TokenId],
    ) -> Option<BlockId> {
        let id = *self.index.get(&hash)?;
        let key = self.blocks[id.index()].key.as_deref()?;
        (key.parent == parent && key.ns == ns && *key.tokens == *tokens).then_some(id)
    }

    // ---- read-only views for invariant checks ----

    pub(crate) fn state(&self, id: BlockId) -> BlockState {
        let m = &self.blocks[id.index()];
        match (m.refs, m.key.is_some()) {
            (0, false) => BlockState::Free,
            (0, true) => BlockState::Cached,
            _ => BlockState::Used,
        }
    }

    pub(crate) fn holders(&self, id: BlockId) -> &[(OwnerSlot, u32)] {
        &self.blocks[id.index()].holders
    }

    pub(crate) fn key(&self, id: BlockId) -> Option<&BlockKey> {
        self.blocks[id.index()].key.as_deref()
    }

    pub(crate) fn free_list(&self) -> &[BlockId] {
        &self.free
    }

    pub(crate) fn lru_contains(&self, id: BlockId) -> bool {
        self.lru.contains(id.get())
    }

    pub(crate) fn lru_order(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.lru.iter().map(BlockId::new)
    }

    pub(crate) fn index_entries(&self) -> impl Iterator<Item = (&BlockHash, &BlockId)> + '_ {
        self.index.iter()
    }
}
