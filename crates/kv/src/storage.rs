//! The storage seam: how a block's payload (its K and V for every layer of
//! one pool) moves in and out of wherever a model keeps it.
//!
//! This crate decides which block holds what; a model keeps the bytes, in
//! arenas indexed by [`BlockId`]. Three operations cross between the two,
//! and they are the whole interface a tier (host RAM, disk, later a remote
//! store) or a GPU backend needs:
//!
//! * [`BlockStorage::export_block`]: the bytes of one block, in the
//!   storage's documented [`BlockStorage::layout`], e.g. to keep a block the
//!   pool is about to evict;
//! * [`BlockStorage::import_block`]: the inverse, into a block the cache
//!   has just allocated (a tier hit promoted back into the pool);
//! * [`BlockStorage::copy_block`]: a copy-on-write the cache asked for
//!   ([`BlockCopy`]).
//!
//! An export followed by an import into another block reproduces the first
//! block exactly (bit for bit): that is what lets a conversation continued
//! from a tier give the same tokens as one that never left the pool. The
//! layout string names everything the bytes depend on (element type, the
//! order of layers, heads, positions, dimensions, byte order), so that a
//! persisted payload is never read back under another layout: tiers fold it
//! into the fingerprint their records carry.

use crate::error::Result;
use crate::ids::BlockId;
use crate::sequence::BlockCopy;

/// Block payloads of one pool. Implemented by the model's K/V arenas (CPU
/// today; a GPU backend implements the same trait).
pub trait BlockStorage {
    /// A description of the byte layout of one exported block, stable
    /// across processes for the same model and settings (for example
    /// `"kvserve-paged-v1 layers=30 kv_heads=3 block=16 head_dim=64 f16-le
    /// order=layer,k|v,head,position,dim"`).
    fn layout(&self) -> String;

    /// Bytes of one block's payload.
    fn block_bytes(&self) -> usize;

    /// Writes `block`'s payload into `out` (exactly [`Self::block_bytes`]).
    ///
    /// # Errors
    /// [`crate::Error::BlockOutOfRange`] or [`crate::Error::PayloadLength`];
    /// `out` is then unspecified and the storage unchanged.
    fn export_block(&self, block: BlockId, out: &mut [u8]) -> Result<()>;

    /// Overwrites `block`'s payload with `data` (exactly
    /// [`Self::block_bytes`], as [`Self::export_block`] wrote it).
    ///
    /// # Errors
    /// [`crate::Error::BlockOutOfRange`] or [`crate::Error::PayloadLength`];
    /// nothing is written then.
    fn import_block(&mut self, block: BlockId, data: &[u8]) -> Result<()>;

    /// Performs a copy-on-write: the first `copy.tokens` positions of
    /// `copy.src`, every layer, K and V, to the same positions of `copy.dst`.
    ///
    /// # Errors
    /// [`crate::Error::BlockOutOfRange`], or [`crate::Error::PayloadLength`]
    /// for a token count beyond the block; nothing is written then.
    fn copy_block(&mut self, copy: BlockCopy) -> Result<()>;
}
