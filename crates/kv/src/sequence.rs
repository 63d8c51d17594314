//! Sequences and the views the model reads: block tables, slots and copies.
//!
//! A sequence is a token stream with a block table: logical block `i` holds
//! token positions `i * block_size .. (i + 1) * block_size`. Tokens are
//! *appended* (the cache hands out the slot each token's K/V goes to) and later
//! *marked computed* once the model has written those slots; only computed
//! full blocks are published to the prefix index, so no other sequence can
//! adopt K/V that has not been written yet.
//!
//! Under a sliding window the leading blocks that no future query can reach
//! are released, so the table starts at `first_block` instead of 0.

use serde::{Deserialize, Serialize};

use crate::hash::{BlockHash, Namespace};
use crate::ids::{BlockId, TokenId};
use crate::owners::OwnerSlot;

/// Where one token's K/V lives: block and offset within it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Slot {
    /// The block.
    pub block: BlockId,
    /// Token offset inside the block, `< block_size`.
    pub offset: u32,
}

/// A copy the model must perform before writing the slots of the same
/// append: the first `tokens` token slots of `src`, every layer, K and V, go
/// to the same offsets of `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockCopy {
    /// Block to read.
    pub src: BlockId,
    /// Fresh block to write.
    pub dst: BlockId,
    /// Leading token slots to copy.
    pub tokens: u32,
}

/// What an append asks of the model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Appended {
    /// Copy-on-write of a shared partial last block, to do first.
    pub copy: Option<BlockCopy>,
    /// One slot per appended token, in order.
    pub slots: Vec<Slot>,
}

/// The blocks a sequence reads, by logical block index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockTable {
    first_block: usize,
    blocks: Vec<BlockId>,
}

impl BlockTable {
    /// Logical index of `blocks()[0]`: 0 unless a sliding window released the
    /// leading blocks.
    pub fn first_block(&self) -> usize {
        self.first_block
    }

    /// The held blocks, from `first_block()` on.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Logical blocks covered, released ones included.
    pub fn logical_len(&self) -> usize {
        self.first_block + self.blocks.len()
    }

    /// The slot of token `position`, if its block is held.
    pub fn slot(&self, position: usize, block_size: usize) -> Option<Slot> {
        let logical = position / block_size;
        let block = *self.blocks.get(logical.checked_sub(self.first_block)?)?;
        Some(Slot { block, offset: (position % block_size) as u32 })
    }

    pub(crate) fn push(&mut self, id: BlockId) {
        self.blocks.push(id);
    }

    pub(crate) fn last_mut(&mut self) -> Option<&mut BlockId> {
        self.blocks.last_mut()
    }

    /// Removes logical blocks from `logical` on; returns them tail first.
    pub(crate) fn cut_from(&mut self, logical: usize) -> Vec<BlockId> {
        let keep = logical.saturating_sub(self.first_block).min(self.blocks.len());
        let mut cut = self.blocks.split_off(keep);
        cut.reverse();
        cut
    }

    /// Releases logical blocks before `logical`; returns them tail first.
    pub(crate) fn drop_front_to(&mut self, logical: usize) -> Vec<BlockId> {
        let n = logical.saturating_sub(self.first_block).min(self.blocks.len());
        let mut dropped: Vec<BlockId> = self.blocks.drain(..n).collect();
        self.first_block += n;
        dropped.reverse();
        dropped
    }
}

/// One consistent read of a sequence: tokens, table and watermark together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SequenceSnapshot {
    /// All tokens.
    pub tokens: Vec<TokenId>,
    /// Its block table.
    pub table: BlockTable,
    /// Tokens whose K/V the model has written.
    pub computed: usize,
}

pub(crate) struct Sequence {
    pub(crate) owner: OwnerSlot,
    pub(crate) ns: Namespace,
    pub(crate) tokens: Vec<TokenId>,
    pub(crate) table: BlockTable,
    /// Chained hashes of the full computed blocks: `computed / block_size` of them.
    pub(crate) hashes: Vec<BlockHash>,
    pub(crate) computed: usize,
}

impl Sequence {
    pub(crate) fn new(owner: OwnerSlot, ns: Namespace) -> Self {
        Self { owner, ns, tokens: Vec::new(), table: BlockTable::default(), hashes: Vec::new(), computed: 0 }
    }

    pub(crate) fn fork(&self) -> Self {
        Self {
            owner: self.owner,
            ns: self.ns,
            tokens: self.tokens.clone(),
            table: self.table.clone(),
            hashes: self.hashes.clone(),
            computed: self.computed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_maps_positions_to_slots() {
        let mut t = BlockTable::default();
        for i in [7, 3, 9] {
            t.push(BlockId::new(i));
        }
        assert_eq!(t.slot(5, 4), Some(Slot { block: BlockId::new(3), offset: 1 }));
        assert_eq!(t.slot(12, 4), None);
        assert_eq!(t.drop_front_to(1), vec![BlockId::new(7)]);
        assert_eq!(t.slot(2, 4), None, "released by the window");
        assert_eq!(t.slot(8, 4), Some(Slot { block: BlockId::new(9), offset: 0 }));
        assert_eq!(t.cut_from(2), vec![BlockId::new(9)]);
        assert_eq!(t.logical_len(), 2);
    }
}
