//! The cache layout: how many blocks, how many tokens a block holds, and how
//! many bytes that is for a given model.
//!
//! The spec is built from plain numbers; the model crate maps GGUF metadata
//! onto [`CacheSpecParams`]. A block holds `block_size` tokens of K and V for
//! every layer of one *layer group*, so
//! `bytes_per_token = 2 (K and V) * layers * kv_heads * head_dim * dtype bytes`
//! and `bytes_per_block = bytes_per_token * block_size`.
//!
//! # Attention kinds and per-kind pools
//!
//! A layer attends either to the whole history ([`AttentionKind::Full`]) or to
//! the last `W` positions ([`AttentionKind::SlidingWindow`]: the query at
//! position `p` reads keys `p + 1 - W ..= p`).
//!
//! * All layers full (llama, qwen2): one pool, nothing is ever released early.
//! * All layers sliding: one pool; once tokens are computed, the blocks that lie
//!   wholly before the widest window are released ([`CacheSpec::window`] is
//!   `Some`), so a sequence holds at most `ceil(W / block_size) + 1` blocks
//!   however long it grows. The accounting in `KvCache` follows that.
//! * Mixed (Gemma-3: five sliding layers to one full): a block id names the
//!   K/V of the *full* layers; this crate's pool, prefix index, eviction and
//!   tiers govern those. The model keeps the sliding layers' K/V apart, in
//!   pages mapped from block ids while a live window covers them and kept
//!   afterwards until reclaimed least recently used first (the model
//!   crate's `kv_store.rs`); the engine asks it how much of a cached prefix
//!   is usable (the sliding layers must still hold the window before the
//!   cut) and shortens adoptions to that. [`CacheSpec::window`] is `None`
//!   for a mixed spec (nothing in the full layers is ever released early);
//!   [`CacheSpec::layer_groups`] splits the layers by kind.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How one layer attends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AttentionKind {
    /// Every earlier position.
    Full,
    /// The last `window` positions, the query's own included.
    SlidingWindow {
        /// Window length in tokens (at least 1).
        window: u32,
    },
}

/// Element type of the K/V arenas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KvDType {
    /// 32-bit float.
    F32,
    /// IEEE half precision (the default).
    F16,
    /// bfloat16.
    BF16,
}

impl KvDType {
    /// Bytes per element.
    pub const fn size(self) -> u64 {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }
}

/// Plain numbers from which a [`CacheSpec`] is built and validated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheSpecParams {
    /// Tokens per block (default [`CacheSpec::DEFAULT_BLOCK_SIZE`]).
    pub block_size: u32,
    /// Blocks in the pool.
    pub num_blocks: u32,
    /// One entry per layer.
    pub layers: Vec<AttentionKind>,
    /// K/V heads per layer (after grouped-query sharing).
    pub kv_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// Element type.
    pub dtype: KvDType,
}

impl CacheSpecParams {
    /// `num_layers` layers of one kind, the default block size and f16.
    pub fn uniform(num_layers: usize, kind: AttentionKind, kv_heads: u32, head_dim: u32, num_blocks: u32) -> Self {
        Self {
            block_size: CacheSpec::DEFAULT_BLOCK_SIZE,
            num_blocks,
            layers: vec![kind; num_layers],
            kv_heads,
            head_dim,
            dtype: KvDType::F16,
        }
    }
}

/// A validated cache layout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheSpec {
    params: CacheSpecParams,
    bytes_per_token: u64,
}

/// Layers of one attention kind, as split by [`CacheSpec::layer_groups`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerGroup {
    /// The kind all these layers share.
    pub kind: AttentionKind,
    /// Their indices in the model.
    pub layers: Vec<usize>,
    /// The spec of this group's own pool (same block size and block count).
    pub spec: CacheSpec,
}

impl CacheSpec {
    /// Tokens per block unless told otherwise.
    pub const DEFAULT_BLOCK_SIZE: u32 = 16;
    /// Largest accepted block size.
    pub const MAX_BLOCK_SIZE: u32 = 4096;

    /// Validates the numbers.
    ///
    /// # Errors
    /// [`Error::InvalidSpec`] for a zero or oversized block size, no blocks
    /// (or `u32::MAX` of them), no layers, a zero window, zero heads or head
    /// dim, or a byte size that overflows.
    pub fn new(params: CacheSpecParams) -> Result<Self> {
        let bad = |field, problem: &str| Error::InvalidSpec { field, problem: problem.to_owned() };
        if params.block_size == 0 || params.block_size > Self::MAX_BLOCK_SIZE {
            return Err(bad("block_size", "must be between 1 and 4096"));
        }
        if params.num_blocks == 0 || params.num_blocks == u32::MAX {
            return Err(bad("num_blocks", "must be between 1 and 2^32 - 2"));
        }
        if params.layers.is_empty() {
            return Err(bad("layers", "must not be empty"));
        }
        if params.layers.iter().any(|k| matches!(k, AttentionKind::SlidingWindow { window: 0 })) {
            return Err(bad("layers", "has a sliding window of 0 tokens"));
        }
        if params.kv_heads == 0 || params.head_dim == 0 {
            return Err(bad("kv_heads/head_dim", "must be positive"));
        }
        let bytes_per_token = 2u64
            .checked_mul(params.layers.len() as u64)
            .and_then(|b| b.checked_mul(u64::from(params.kv_heads)))
            .and_then(|b| b.checked_mul(u64::from(params.head_dim)))
            .and_then(|b| b.checked_mul(params.dtype.size()))
            .filter(|b| b.checked_mul(u64::from(params.block_size)).is_some())
            .ok_or_else(|| bad("layers/kv_heads/head_dim", "give a byte size that overflows"))?;
        Ok(Self { params, bytes_per_token })
    }

    /// The numbers it was built from.
    pub fn params(&self) -> &CacheSpecParams {
        &self.params
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.params.block_size as usize
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.params.num_blocks as usize
    }

    /// Per-layer attention kinds.
    pub fn layers(&self) -> &[AttentionKind] {
        &self.params.layers
    }

    /// K/V bytes one token takes over all layers.
    pub fn bytes_per_token(&self) -> u64 {
        self.bytes_per_token
    }

    /// K/V bytes one block takes over all layers.
    pub fn bytes_per_block(&self) -> u64 {
        self.bytes_per_token * u64::from(self.params.block_size)
    }

    /// Total K/V bytes of the pool.
    pub fn total_bytes(&self) -> u64 {
        self.bytes_per_block().saturating_mul(u64::from(self.params.num_blocks))
    }

    /// Tokens the pool can hold.
    pub fn capacity_tokens(&self) -> u64 {
        u64::from(self.params.block_size) * u64::from(self.params.num_blocks)
    }

    /// How many blocks of this layout fit in `budget` bytes (at least 0).
    pub fn blocks_for_budget(&self, budget: u64) -> u64 {
        budget / self.bytes_per_block()
    }

    /// `Some(W)` when every layer slides, `W` the widest window: blocks wholly
    /// before the last `W` computed positions can be released. `None` when any
    /// layer attends to the full history.
    pub fn window(&self) -> Option<usize> {
        let mut widest = 0u32;
        for kind in &self.params.layers {
            match kind {
                AttentionKind::Full => return None,
                AttentionKind::SlidingWindow { window } => widest = widest.max(*window),
            }
        }
        Some(widest as usize)
    }

    /// Splits the layers into groups of one kind each, every group with its own
    /// spec (same block size and count, bytes for its own layers only): the
    /// per-kind pools of a mixed model. A uniform model gives one group equal
    /// to itself.
    pub fn layer_groups(&self) -> Vec<LayerGroup> {
        let mut groups: Vec<(AttentionKind, Vec<usize>)> = Vec::new();
        for (i, kind) in self.params.layers.iter().enumerate() {
            match groups.iter_mut().find(|(k, _)| k == kind) {
                Some((_, layers)) => layers.push(i),
                None => groups.push((*kind, vec![i])),
            }
        }
        groups
            .into_iter()
            .map(|(kind, layers)| {
                let params = CacheSpecParams { layers: vec![kind; layers.len()], ..self.params.clone() };
                // A subset of a valid spec's layers is itself valid, and its
                // byte size is no larger, so it cannot overflow.
                let bytes_per_token = self.bytes_per_token / self.params.layers.len() as u64 * layers.len() as u64;
                LayerGroup { kind, layers, spec: Self { params, bytes_per_token } }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm(num_blocks: u32) -> CacheSpec {
        CacheSpec::new(CacheSpecParams::uniform(30, AttentionKind::Full, 3, 64, num_blocks)).expect("valid")
    }

    #[test]
    fn smollm_sizes_match_model_md() {
        let spec = smollm(100);
        assert_eq!(spec.bytes_per_token(), 23_040);
        assert_eq!(spec.bytes_per_block(), 23_040 * 16);
        assert_eq!(spec.window(), None);
        // 8192 tokens of one conversation take about 180 MiB.
        assert_eq!(spec.bytes_per_token() * 8192, 188_743_680);
        assert_eq!(spec.blocks_for_budget(spec.bytes_per_block() * 7 + 5), 7);
    }

    #[test]
    fn bad_specs_are_typed_errors() {
        let ok = CacheSpecParams::uniform(2, AttentionKind::Full, 1, 8, 4);
        for params in [
            CacheSpecParams { block_size: 0, ..ok.clone() },
            CacheSpecParams { num_blocks: 0, ..ok.clone() },
            CacheSpecParams { layers: vec![], ..ok.clone() },
            CacheSpecParams { kv_heads: 0, ..ok.clone() },
            CacheSpecParams { layers: vec![AttentionKind::SlidingWindow { window: 0 }], ..ok.clone() },
            CacheSpecParams {
                head_dim: u32::MAX,
                kv_heads: u32::MAX,
                layers: vec![AttentionKind::Full; 1 << 20],
                ..ok.clone()
            },
        ] {
            assert!(matches!(CacheSpec::new(params), Err(Error::InvalidSpec { .. })));
        }
    }

    #[test]
    fn gemma3_style_layers_split_into_per_kind_pools() {
        let mut layers = Vec::new();
        for i in 0..12 {
            layers.push(if i % 6 == 5 { AttentionKind::Full } else { AttentionKind::SlidingWindow { window: 512 } });
        }
        let spec =
            CacheSpec::new(CacheSpecParams { layers, ..CacheSpecParams::uniform(1, AttentionKind::Full, 4, 256, 64) })
                .expect("valid");
        assert_eq!(spec.window(), None, "a full layer keeps the whole history");
        let groups = spec.layer_groups();
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].layers, vec![0, 1, 2, 3, 4, 6, 7, 8, 9, 10]);
        assert_eq!(groups[0].spec.window(), Some(512));
        assert_eq!(groups[1].layers, vec![5, 11]);
        assert_eq!(groups[1].spec.window(), None);
        let sum: u64 = groups.iter().map(|g| g.spec.bytes_per_token()).sum();
        assert_eq!(sum, spec.bytes_per_token());
    }
}
