//! `check_invariants`: the whole-state consistency check that randomized and
//! stress tests run after every step. O(blocks + table entries).
//!
//! It verifies that
//! * every block is in exactly one state: free (on the free list once, no
//!   key), cached (in the LRU once, published) or used (referenced);
//!   free + used + cached = total;
//! * each block's reference count equals the sum of its holders' counts, and
//!   those equal the references that sequence tables and raw allocations
//!   actually make, per owner;
//! * each owner's held count is the number of distinct blocks it holds and its
//!   sequence count is the number of its sequences;
//! * the prefix index and the published keys agree both ways;
//! * every sequence's table covers exactly its length, names no block twice,
//!   holds one hash per computed full block, and under a sliding window has
//!   released nothing a future query needs.

use std::collections::HashMap;

use crate::cache::KvCache;
use crate::ids::BlockId;
use crate::owners::OwnerSlot;
use crate::pool::BlockState;

/// A broken invariant, described for a test failure message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("KV cache invariant violated: {0}")]
pub struct InvariantViolation(pub String);

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(InvariantViolation(format!($($fmt)+)));
        }
    };
}

impl KvCache {
    /// Checks every structural invariant (see the module doc of
    /// `invariants.rs`).
    ///
    /// # Errors
    /// The first violation found.
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        let pool = &self.pool;
        let total = pool.total();
        let bs = self.spec.block_size();

        // Block states and the two lists.
        let mut on_free = vec![false; total];
        for &b in pool.free_list() {
            ensure!(b.index() < total, "free list names {b} beyond the pool");
            ensure!(!on_free[b.index()], "{b} is on the free list twice");
            on_free[b.index()] = true;
        }
        let mut lru_len = 0;
        for b in pool.lru_order() {
            lru_len += 1;
            ensure!(pool.state(b) == BlockState::Cached, "{b} is in the LRU but {:?}", pool.state(b));
        }
        ensure!(lru_len == pool.cached_len(), "LRU length {} but walked {lru_len}", pool.cached_len());
        let mut used = 0;
        for (i, &free) in on_free.iter().enumerate() {
            let b = BlockId::new(i as u32);
            let state = pool.state(b);
            ensure!(free == (state == BlockState::Free), "{b} is {state:?} but on_free={free}");
            ensure!(
                pool.lru_contains(b) == (state == BlockState::Cached),
                "{b} is {state:?} but LRU membership disagrees"
            );
            used += usize::from(state == BlockState::Used);
            let sum: u32 = pool.holders(b).iter().map(|&(_, n)| n).sum();
            ensure!(sum == pool.refs(b), "{b} has refs {} but holders sum to {sum}", pool.refs(b));
            ensure!(pool.holders(b).iter().all(|&(_, n)| n > 0), "{b} lists a holder with zero references");
        }
        ensure!(
            pool.free_len() + used + pool.cached_len() == total,
            "free {} + used {used} + cached {} != total {total}",
            pool.free_len(),
            pool.cached_len()
        );

        // References as the tables and raw allocations make them.
        let mut expected: HashMap<(BlockId, OwnerSlot), u32> = HashMap::new();
        let mut seqs_per_owner: HashMap<OwnerSlot, u32> = HashMap::new();
        for (id, s) in &self.seqs {
            ensure!(self.owners.is_live(s.owner), "{id} names a dropped owner");
            *seqs_per_owner.entry(s.owner).or_default() += 1;
            let len = s.tokens.len();
            ensure!(
                s.table.logical_len() == len.div_ceil(bs),
                "{id}: table covers {} blocks for {len} tokens",
                s.table.logical_len()
            );
            ensure!(s.computed <= len, "{id}: computed {} > len {len}", s.computed);
            ensure!(
                s.hashes.len() == s.computed / bs,
                "{id}: {} hashes for {} computed tokens",
                s.hashes.len(),
                s.computed
            );
            if let Some(w) = self.spec.window() {
                ensure!(
                    s.table.first_block() <= (s.computed + 1).saturating_sub(w) / bs,
                    "{id}: window released too much"
                );
            } else {
                ensure!(s.table.first_block() == 0, "{id}: blocks released without a sliding window");
            }
            let mut seen = std::collections::HashSet::new();
            for &b in s.table.blocks() {
                ensure!(b.index() < total, "{id} names {b} beyond the pool");
                ensure!(seen.insert(b), "{id} names {b} twice");
                *expected.entry((b, s.owner)).or_default() += 1;
            }
        }
        for (i, slot) in self.raw.iter().enumerate() {
            if let Some(slot) = *slot {
                *expected.entry((BlockId::new(i as u32), slot)).or_default() += 1;
            }
        }
        let mut distinct_per_owner: HashMap<OwnerSlot, u32> = HashMap::new();
        let mut holder_entries = 0;
        for i in 0..total {
            let b = BlockId::new(i as u32);
            for &(owner, n) in pool.holders(b) {
                holder_entries += 1;
                let want = expected.get(&(b, owner)).copied().unwrap_or(0);
                ensure!(n == want, "{b}: owner {owner:?} has {n} references recorded but {want} made");
                *distinct_per_owner.entry(owner).or_default() += 1;
            }
        }
        ensure!(holder_entries == expected.len(), "references exist that no block records");
        for (slot, held, sequences) in self.owners.live() {
            let distinct = distinct_per_owner.get(&slot).copied().unwrap_or(0);
            ensure!(held == distinct, "owner {} held={held} but holds {distinct} blocks", self.owners.id(slot));
            let n = seqs_per_owner.get(&slot).copied().unwrap_or(0);
            ensure!(sequences == n, "owner {} counts {sequences} sequences but has {n}", self.owners.id(slot));
        }

        // Prefix index both ways.
        let mut published = 0;
        for i in 0..total {
            let b = BlockId::new(i as u32);
            if let Some(key) = pool.key(b) {
                published += 1;
                ensure!(key.tokens.len() == bs, "{b} published with {} tokens", key.tokens.len());
                let found = pool.lookup(key.hash, key.parent, key.ns, &key.tokens);
                ensure!(found == Some(b), "{b} is published but its address finds {found:?}");
            }
        }
        let mut entries = 0;
        for (h, &b) in pool.index_entries() {
            entries += 1;
            ensure!(pool.key(b).is_some_and(|k| k.hash == *h), "index entry for {b} does not match its key");
        }
        ensure!(entries == published, "{entries} index entries but {published} published blocks");
        Ok(())
    }
}
