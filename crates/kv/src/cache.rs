//! `KvCache`: the single-threaded state machine that ties the pool, the
//! owners, the prefix index and the sequences together.
//!
//! Every operation validates everything it depends on (the sequence exists,
//! the quota allows it, enough blocks are free or evictable) before it changes
//! anything, and then changes state without a fallible step. So an error
//! leaves the cache exactly as it was, and an operation that needs `n` blocks
//! takes all `n` or none. Block references are released tail first, so
//! eviction eats chains from their ends.
//!
//! Writes go through two steps: [`KvCache::append`] reserves slots for new
//! tokens (and copies a shared partial block on write), and
//! [`KvCache::mark_computed`] records that the model wrote them, which
//! publishes the now-complete full blocks to the prefix index and, under a
//! sliding window, releases blocks no query can reach any more.
//!
//! Thread safety is the job of [`crate::SharedKvCache`]; this type is `&mut
//! self` throughout and easy to test.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::hash::{hash_block, Namespace, PrefixHashes};
use crate::hash::{BlockHash, BlockKey};
use crate::ids::{BlockId, OwnerId, SeqId, TokenId};
use crate::owners::{OwnerSlot, OwnerTable, OwnerUsage};
use crate::pool::{BlockPool, Evicted, IndexChange};
use crate::sequence::{Appended, BlockCopy, BlockTable, Sequence, SequenceSnapshot};
use crate::spec::CacheSpec;
use crate::stats::CacheStats;

/// The KV cache bookkeeping of one model: blocks, sequences, prefix index.
pub struct KvCache {
    pub(crate) spec: CacheSpec,
    pub(crate) pool: BlockPool,
    pub(crate) owners: OwnerTable,
    pub(crate) seqs: HashMap<SeqId, Sequence>,
    /// Holder of each block handed out by [`KvCache::allocate`], indexed by
    /// block (a flat array: O(1) without hashing on the hot path).
    pub(crate) raw: Vec<Option<OwnerSlot>>,
    next_seq: u64,
    scratch: Vec<u8>,
    prefix_lookup_tokens: u64,
    prefix_hit_tokens: u64,
}

impl KvCache {
    /// An empty cache with every block free.
    pub fn new(spec: CacheSpec) -> Self {
        Self {
            pool: BlockPool::new(spec.num_blocks()),
            owners: OwnerTable::default(),
            seqs: HashMap::new(),
            raw: vec![None; spec.num_blocks()],
            next_seq: 0,
            scratch: Vec::new(),
            prefix_lookup_tokens: 0,
            prefix_hit_tokens: 0,
            spec,
        }
    }

    /// The layout.
    pub fn spec(&self) -> &CacheSpec {
        &self.spec
    }

    fn bs(&self) -> usize {
        self.spec.block_size()
    }

    fn seq(&self, id: SeqId) -> Result<&Sequence> {
        self.seqs.get(&id).ok_or(Error::UnknownSequence(id))
    }

    // ---------------------------------------------------------------- owners

    /// Sets (or with `None` lifts) an owner's block quota. Lowering it below
    /// what the owner holds takes nothing away; it only refuses growth.
    pub fn set_quota(&mut self, owner: &OwnerId, quota: Option<u32>) {
        self.owners.set_quota(owner, quota);
    }

    /// What an owner holds now (all zero for an unknown owner).
    pub fn owner_usage(&self, owner: &OwnerId) -> OwnerUsage {
        self.owners.usage(owner)
    }

    // ------------------------------------------------------------ raw blocks

    /// Takes `n` blocks for `owner`, all or none, evicting cached blocks if
    /// the free list runs short.
    ///
    /// # Errors
    /// [`Error::QuotaExceeded`] or [`Error::Exhausted`]; nothing is taken.
    pub fn allocate(&mut self, owner: &OwnerId, n: usize) -> Result<Vec<BlockId>> {
        let slot = self.owners.intern(owner);
        let mut out = Vec::with_capacity(n);
        let taken = self
            .owners
            .check_quota(slot, n)
            .and_then(|()| self.pool.allocate_into(slot, n, &mut self.owners, &mut out));
        if let Err(e) = taken {
            self.owners.release_if_idle(slot);
            return Err(e);
        }
        for &b in &out {
            self.raw[b.index()] = Some(slot);
        }
        Ok(out)
    }

    /// Gives back blocks from [`KvCache::allocate`], all or none.
    ///
    /// # Errors
    /// [`Error::NotHeld`] if any block was not allocated to `owner` or is
    /// named twice (a double free); nothing is released.
    pub fn free(&mut self, owner: &OwnerId, blocks: &[BlockId]) -> Result<()> {
        let not_held = |block| Error::NotHeld { block, owner: owner.clone() };
        let slot = match (self.owners.find(owner), blocks.first()) {
            (_, None) => return Ok(()),
            (Some(slot), _) => slot,
            (None, Some(&b)) => return Err(not_held(b)),
        };
        // Claim every entry first; a block not held, or named twice (its
        // entry already claimed), rolls the claims back and fails.
        for (i, &b) in blocks.iter().enumerate() {
            match self.raw.get_mut(b.index()) {
                Some(entry) if *entry == Some(slot) => *entry = None,
                _ => {
                    for &claimed in &blocks[..i] {
                        self.raw[claimed.index()] = Some(slot);
                    }
                    return Err(not_held(b));
                }
            }
        }
        for &b in blocks.iter().rev() {
            self.pool.release(b, slot, &mut self.owners);
        }
        self.owners.release_if_idle(slot);
        Ok(())
    }

    // ------------------------------------------------------------- sequences

    /// A new empty sequence.
    pub fn create_sequence(&mut self, owner: &OwnerId, ns: Namespace) -> SeqId {
        let slot = self.owners.intern(owner);
        self.insert_sequence(Sequence::new(slot, ns))
    }

    fn insert_sequence(&mut self, seq: Sequence) -> SeqId {
        self.owners.sequence_created(seq.owner);
        let id = SeqId::new(self.next_seq);
        self.next_seq += 1;
        self.seqs.insert(id, seq);
        id
    }

    /// A new sequence that adopts the longest cached prefix of `tokens` (whole
    /// blocks only). Returns the id and how many tokens were adopted; the
    /// caller appends `tokens[adopted..]`. To keep at least one token to
    /// compute (for its logits), pass the prompt without its last token.
    ///
    /// # Errors
    /// [`Error::QuotaExceeded`] if adopting would push the owner over quota;
    /// nothing changes.
    pub fn create_with_prefix(&mut self, owner: &OwnerId, ns: Namespace, tokens: &[TokenId]) -> Result<(SeqId, usize)> {
        let hashes = PrefixHashes::compute(ns, tokens, self.bs());
        self.create_with_prefix_hashes(owner, tokens, &hashes)
    }

    /// [`KvCache::create_with_prefix`] with hashes computed beforehand (by
    /// [`PrefixHashes::compute`] over the same tokens), so that a caller
    /// holding a lock does not hash under it.
    ///
    /// # Errors
    /// [`Error::HashMismatch`] if the hashes are for another block size or
    /// more tokens; otherwise as [`KvCache::create_with_prefix`].
    pub fn create_with_prefix_hashes(
        &mut self,
        owner: &OwnerId,
        tokens: &[TokenId],
        hashes: &PrefixHashes,
    ) -> Result<(SeqId, usize)> {
        let matched = self.matched_blocks(tokens, hashes)?;
        let slot = self.owners.intern(owner);
        let new_to_owner = matched.iter().filter(|&&b| self.pool.held_by(b, slot) == 0).count();
        if let Err(e) = self.owners.check_quota(slot, new_to_owner) {
            self.owners.release_if_idle(slot);
            return Err(e);
        }
        let adopted = matched.len() * self.bs();
        let mut seq = Sequence::new(slot, hashes.ns);
        for &b in &matched {
            self.pool.retain(b, slot, &mut self.owners);
            seq.table.push(b);
        }
        seq.tokens.extend_from_slice(&tokens[..adopted]);
        seq.hashes.extend_from_slice(&hashes.hashes[..matched.len()]);
        seq.computed = adopted;
        self.prefix_lookup_tokens += tokens.len() as u64;
        self.prefix_hit_tokens += adopted as u64;
        let id = self.insert_sequence(seq);
        self.release_out_of_window(id);
        Ok((id, adopted))
    }

    /// How many leading tokens of `tokens` a new sequence would adopt now.
    /// Read-only: counts nothing, changes no recency.
    pub fn lookup_prefix(&self, ns: Namespace, tokens: &[TokenId]) -> usize {
        let hashes = PrefixHashes::compute(ns, tokens, self.bs());
        self.lookup_prefix_hashes(tokens, &hashes)
    }

    /// [`KvCache::lookup_prefix`] with hashes computed beforehand; 0 if they
    /// do not fit this cache.
    pub fn lookup_prefix_hashes(&self, tokens: &[TokenId], hashes: &PrefixHashes) -> usize {
        self.matched_blocks(tokens, hashes).map_or(0, |m| m.len() * self.bs())
    }

    fn matched_blocks(&self, tokens: &[TokenId], hashes: &PrefixHashes) -> Result<Vec<BlockId>> {
        let bs = self.bs();
        if hashes.block_size != bs || hashes.hashes.len() > tokens.len() / bs {
            return Err(Error::HashMismatch);
        }
        let mut matched = Vec::new();
        let mut parent = None;
        for (i, &h) in hashes.hashes.iter().enumerate() {
            match self.pool.lookup(h, parent, hashes.ns, &tokens[i * bs..(i + 1) * bs]) {
                Some(b) => matched.push(b),
                None => break,
            }
            parent = Some(h);
        }
        Ok(matched)
    }

    /// Appends tokens and returns the slot each one's K/V goes to, plus the
    /// copy to make first if the last block was shared (after a fork or a
    /// truncation into a published block). Takes every block it needs or none.
    ///
    /// # Errors
    /// [`Error::UnknownSequence`], [`Error::QuotaExceeded`] or
    /// [`Error::Exhausted`]; the sequence is unchanged.
    pub fn append(&mut self, id: SeqId, tokens: &[TokenId]) -> Result<Appended> {
        let bs = self.bs();
        if tokens.is_empty() {
            self.seq(id)?;
            return Ok(Appended::default());
        }
        let (fresh, cow_src) = self.append_plan(id, tokens.len())?;
        let seq = self.seq(id)?;
        let len = seq.tokens.len();
        let owner = seq.owner;
        let n = fresh + usize::from(cow_src.is_some());
        // Releasing the copied block may end the owner's hold on it.
        let net = n - cow_src.map_or(0, |src| usize::from(self.pool.held_by(src, owner) == 1));
        self.owners.check_quota(owner, net)?;
        let mut new_blocks = Vec::with_capacity(n);
        self.pool.allocate_into(owner, n, &mut self.owners, &mut new_blocks)?;

        // Committed from here on: nothing below can fail.
        let seq = self.seqs.get_mut(&id).expect("checked above under the same &mut");
        let mut new_blocks = new_blocks.into_iter();
        let copy = cow_src.map(|src| {
            let dst = new_blocks.next().expect("allocated one block for the copy");
            *seq.table.last_mut().expect("cow implies a last block") = dst;
            self.pool.release(src, owner, &mut self.owners);
            BlockCopy { src, dst, tokens: (len % bs) as u32 }
        });
        new_blocks.for_each(|b| seq.table.push(b));
        seq.tokens.extend_from_slice(tokens);
        let slots =
            (len..len + tokens.len()).map(|p| seq.table.slot(p, bs).expect("the table covers every token")).collect();
        Ok(Appended { copy, slots })
    }

    /// Blocks appending `n` tokens to `id` would take from the pool now
    /// (new blocks plus a copy of a shared partial last block), so a
    /// scheduler can plan a batch without trying it.
    ///
    /// # Errors
    /// [`Error::UnknownSequence`].
    pub fn append_cost(&self, id: SeqId, n: usize) -> Result<usize> {
        if n == 0 {
            self.seq(id)?;
            return Ok(0);
        }
        let (fresh, cow) = self.append_plan(id, n)?;
        Ok(fresh + usize::from(cow.is_some()))
    }

    /// New blocks for `n` more tokens, and the shared partial block to copy
    /// first, if any.
    fn append_plan(&self, id: SeqId, n: usize) -> Result<(usize, Option<BlockId>)> {
        let bs = self.bs();
        let seq = self.seq(id)?;
        let len = seq.tokens.len();
        let fresh = (len + n).div_ceil(bs) - seq.table.logical_len();
        // The last block is partial and someone else can read it: copy it.
        let cow_src = (len % bs != 0)
            .then(|| *seq.table.blocks().last().expect("a partial last block is never released"))
            .filter(|&b| self.pool.refs(b) > 1 || self.pool.is_published(b));
        Ok((fresh, cow_src))
    }

    /// Records that the model has written the K/V of the first `upto`
    /// tokens. Full blocks below the watermark are published for prefix
    /// reuse; under a sliding window, blocks no future query reaches are
    /// released. Lowering the watermark is a no-op (truncate lowers it).
    ///
    /// # Errors
    /// [`Error::UnknownSequence`], or [`Error::ComputedBeyondEnd`] if `upto`
    /// exceeds the sequence's length.
    pub fn mark_computed(&mut self, id: SeqId, upto: usize) -> Result<()> {
        self.mark_computed_superseding(id, upto, |_, _| false)
    }

    /// [`KvCache::mark_computed`], letting the sequence's new full blocks
    /// replace worse copies in the prefix index: where another block is
    /// published under a new block's address, `supersede(indexed, new)`
    /// says whether `new` takes its place. The one it replaces keeps its
    /// holders and is freed, not cached, once they let go. A hybrid
    /// model's engine replaces copies that lost their sliding-window K/V,
    /// which otherwise would stay indexed and send every later user of the
    /// prefix back to recomputing it.
    ///
    /// # Errors
    /// As [`KvCache::mark_computed`].
    pub fn mark_computed_superseding(
        &mut self,
        id: SeqId,
        upto: usize,
        mut supersede: impl FnMut(BlockId, BlockId) -> bool,
    ) -> Result<()> {
        let bs = self.bs();
        let seq = self.seqs.get_mut(&id).ok_or(Error::UnknownSequence(id))?;
        if upto > seq.tokens.len() {
            return Err(Error::ComputedBeyondEnd { seq: id, len: seq.tokens.len(), requested: upto });
        }
        if upto <= seq.computed {
            return Ok(());
        }
        seq.computed = upto;
        while seq.hashes.len() < upto / bs {
            let b = seq.hashes.len();
            let parent = seq.hashes.last().copied();
            let tokens = &seq.tokens[b * bs..(b + 1) * bs];
            let hash = hash_block(&mut self.scratch, seq.ns, parent, tokens);
            seq.hashes.push(hash);
            if let Some(block) = b.checked_sub(seq.table.first_block()).map(|i| seq.table.blocks()[i]) {
                let key = BlockKey { hash, parent, ns: seq.ns, tokens: tokens.into() };
                match self.pool.indexed(hash) {
                    Some(old) if old != block && !self.pool.is_published(block) && supersede(old, block) => {
                        self.pool.supersede(old, block, key);
                    }
                    _ => {
                        self.pool.publish(block, key);
                    }
                }
            }
        }
        self.release_out_of_window(id);
        Ok(())
    }

    /// Releases the leading blocks that no query at or after the computed
    /// watermark can reach (only when every layer slides).
    fn release_out_of_window(&mut self, id: SeqId) {
        let (Some(window), Some(seq)) = (self.spec.window(), self.seqs.get_mut(&id)) else {
            return;
        };
        let reachable_from = (seq.computed + 1).saturating_sub(window) / self.spec.block_size();
        for b in seq.table.drop_front_to(reachable_from) {
            self.pool.release(b, seq.owner, &mut self.owners);
        }
    }

    /// A new sequence with the same tokens and owner, sharing every block
    /// (the partial last one included: whichever side appends to it first
    /// gets a [`BlockCopy`]). Costs no block and no quota. Uncomputed tokens'
    /// K/V must be written before either side appends.
    ///
    /// # Errors
    /// [`Error::UnknownSequence`].
    pub fn fork(&mut self, id: SeqId) -> Result<SeqId> {
        let child = self.seq(id)?.fork();
        for &b in child.table.blocks() {
            self.pool.retain(b, child.owner, &mut self.owners);
        }
        Ok(self.insert_sequence(child))
    }

    /// Rolls a sequence back to its first `len` tokens, releasing the blocks
    /// past them.
    ///
    /// # Errors
    /// [`Error::UnknownSequence`], [`Error::TruncateBeyondEnd`], or
    /// [`Error::WindowReleased`] if the window already released blocks the
    /// shorter sequence would need; the sequence is unchanged.
    pub fn truncate(&mut self, id: SeqId, len: usize) -> Result<()> {
        let bs = self.bs();
        let window = self.spec.window();
        let seq = self.seqs.get_mut(&id).ok_or(Error::UnknownSequence(id))?;
        let old = seq.tokens.len();
        if len > old {
            return Err(Error::TruncateBeyondEnd { seq: id, len: old, requested: len });
        }
        if let Some(w) = window {
            if seq.table.first_block() > (len + 1).saturating_sub(w) / bs {
                return Err(Error::WindowReleased { seq: id, requested: len, earliest: seq.table.first_block() * bs });
            }
        }
        for b in seq.table.cut_from(len.div_ceil(bs)) {
            self.pool.release(b, seq.owner, &mut self.owners);
        }
        seq.tokens.truncate(len);
        seq.computed = seq.computed.min(len);
        seq.hashes.truncate(seq.computed / bs);
        Ok(())
    }

    /// Removes a sequence, releasing its blocks (published ones stay cached).
    ///
    /// # Errors
    /// [`Error::UnknownSequence`].
    pub fn remove(&mut self, id: SeqId) -> Result<()> {
        let seq = self.seqs.remove(&id).ok_or(Error::UnknownSequence(id))?;
        for &b in seq.table.blocks().iter().rev() {
            self.pool.release(b, seq.owner, &mut self.owners);
        }
        self.owners.sequence_removed(seq.owner);
        self.owners.release_if_idle(seq.owner);
        Ok(())
    }

    /// The chained hashes of the sequence's computed full blocks, one per
    /// block from the first (those a sliding window released included).
    ///
    /// # Errors
    /// [`Error::UnknownSequence`].
    pub fn block_hashes(&self, id: SeqId) -> Result<&[BlockHash]> {
        Ok(&self.seq(id)?.hashes)
    }

    // ------------------------------------------------------------ evictions

    /// Turns eviction reports on or off (off by default; turning them off
    /// discards pending reports). While on, every cached block the pool
    /// evicts, for an allocation or by [`KvCache::evict_cached`], is kept
    /// with its key until [`KvCache::take_evicted`]: a caller that keeps
    /// payloads elsewhere copies the block out before the model writes it
    /// again. Reports accumulate until taken, so a caller that turns them on
    /// takes them after every operation that allocates.
    pub fn report_evictions(&mut self, on: bool) {
        self.pool.report_evictions(on);
    }

    /// The evictions since the last call, oldest first (empty while reports
    /// are off).
    pub fn take_evicted(&mut self) -> Vec<Evicted> {
        self.pool.take_evicted()
    }

    /// Turns index change reports on or off (off by default; off discards
    /// pending ones). While on, every block published to the prefix index
    /// and every block leaving it is reported, in order, until
    /// [`KvCache::take_changes`]: what a replica tells a router about the
    /// blocks it holds. Reports accumulate until taken.
    pub fn report_changes(&mut self, on: bool) {
        self.pool.report_changes(on);
    }

    /// The index changes since the last call, oldest first (empty while
    /// reports are off).
    pub fn take_changes(&mut self) -> Vec<IndexChange> {
        self.pool.take_changes()
    }

    /// Every address the prefix index holds now (used and cached blocks),
    /// in no particular order.
    pub fn published(&self) -> Vec<BlockHash> {
        self.pool.index_entries().map(|(h, _)| *h).collect()
    }

    /// Evicts the cached (unreferenced) blocks published under `hashes` now,
    /// as if the pool had needed them: an operator or a benchmark moving a
    /// prefix out of the pool. Blocks in use are left alone. Returns how many
    /// were evicted.
    pub fn evict_cached(&mut self, hashes: &[BlockHash]) -> usize {
        hashes.iter().filter(|&&h| self.pool.evict_cached(h)).count()
    }

    /// Whether a block with this address is in the pool (used or cached).
    pub fn is_indexed(&self, hash: BlockHash) -> bool {
        self.pool.is_indexed(hash)
    }

    /// The sequence's tokens.
    ///
    /// # Errors
    /// [`Error::UnknownSequence`].
    pub fn tokens(&self, id: SeqId) -> Result<&[TokenId]> {
        Ok(&self.seq(id)?.tokens)
    }

    /// Its length in tokens.
    ///
    /// # Errors
    /// [`Error::UnknownSequence`].
    pub fn seq_len(&self, id: SeqId) -> Result<usize> {
        Ok(self.seq(id)?.tokens.len())
    }

    /// Tokens whose K/V is written.
    ///
    /// # Errors
    /// [`Error::UnknownSequence`].
    pub fn computed(&self, id: SeqId) -> Result<usize> {
        Ok(self.seq(id)?.computed)
    }

    /// The block table the model reads.
    ///
    /// # Errors
    /// [`Error::UnknownSequence`].
    pub fn block_table(&self, id: SeqId) -> Result<&BlockTable> {
        Ok(&self.seq(id)?.table)
    }

    /// Tokens, table and watermark in one read.
    ///
    /// # Errors
    /// [`Error::UnknownSequence`].
    pub fn snapshot(&self, id: SeqId) -> Result<SequenceSnapshot> {
        let s = self.seq(id)?;
        Ok(SequenceSnapshot { tokens: s.tokens.clone(), table: s.table.clone(), computed: s.computed })
    }

    /// Ids of the live sequences, in no particular order.
    pub fn sequence_ids(&self) -> Vec<SeqId> {
        self.seqs.keys().copied().collect()
    }

    /// Ids of `owner`'s live sequences, in no particular order.
    pub fn sequence_ids_of(&self, owner: &OwnerId) -> Vec<SeqId> {
        let Some(slot) = self.owners.find(owner) else { return Vec::new() };
        self.seqs.iter().filter(|(_, s)| s.owner == slot).map(|(&id, _)| id).collect()
    }

    /// All counters at once.
    pub fn stats(&self) -> CacheStats {
        let free = self.pool.free_len();
        let cached = self.pool.cached_len();
        CacheStats {
            block_size: self.bs(),
            total_blocks: self.pool.total(),
            free_blocks: free,
            used_blocks: self.pool.total() - free - cached,
            cached_blocks: cached,
            sequences: self.seqs.len(),
            prefix_lookup_tokens: self.prefix_lookup_tokens,
            prefix_hit_tokens: self.prefix_hit_tokens,
            evictions: self.pool.evictions(),
        }
    }
}
