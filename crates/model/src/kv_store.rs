//! Paged K/V storage: per layer one K and one V arena indexed by the `kv`
//! crate's block ids.
//!
//! Layout of an arena: `[block][kv_head][offset][head_dim]`, so the keys of
//! one head in one block are one contiguous run of `block_size * head_dim`
//! elements, which is what attention streams through. Elements are f16 by
//! default (half the memory of f32; converted to f32 a block at a time on
//! read), f32 or bf16 on request. The store never decides which block holds
//! what: the model writes K/V into the slots `kv` hands out and performs the
//! block copies `kv` asks for.

use half::{bf16, f16, slice::HalfFloatSliceExt};
use kv::{BlockCopy, BlockId, CacheSpec, KvDType, Slot};

use crate::error::{Error, Result};

/// Element types an arena can hold.
trait Element: Copy + Send + Sync + 'static {
    const ZERO: Self;
    fn store(src: &[f32], dst: &mut [Self]);
    fn load(src: &[Self], dst: &mut [f32]);
}

impl Element for f32 {
    const ZERO: Self = 0.0;
    fn store(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
    fn load(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl Element for f16 {
    const ZERO: Self = f16::ZERO;
    fn store(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
    fn load(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

impl Element for bf16 {
    const ZERO: Self = bf16::ZERO;
    fn store(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
    fn load(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

enum Arena {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Arena {
    fn new(dtype: KvDType, len: usize) -> Self {
        match dtype {
            KvDType::F32 => Self::F32(vec![f32::ZERO; len]),
            KvDType::F16 => Self::F16(vec![f16::ZERO; len]),
            KvDType::BF16 => Self::BF16(vec![bf16::ZERO; len]),
        }
    }

    fn store(&mut self, at: usize, src: &[f32]) {
        let end = at + src.len();
        match self {
            Self::F32(a) => f32::store(src, &mut a[at..end]),
            Self::F16(a) => f16::store(src, &mut a[at..end]),
            Self::BF16(a) => bf16::store(src, &mut a[at..end]),
        }
    }

    fn load(&self, at: usize, dst: &mut [f32]) {
        let end = at + dst.len();
        match self {
            Self::F32(a) => f32::load(&a[at..end], dst),
            Self::F16(a) => f16::load(&a[at..end], dst),
            Self::BF16(a) => bf16::load(&a[at..end], dst),
        }
    }

    fn copy_within(&mut self, src: usize, dst: usize, len: usize) {
        match self {
            Self::F32(a) => a.copy_within(src..src + len, dst),
            Self::F16(a) => a.copy_within(src..src + len, dst),
            Self::BF16(a) => a.copy_within(src..src + len, dst),
        }
    }
}

struct LayerKv {
    k: Arena,
    v: Arena,
}

/// K and V arenas for every layer.
pub struct PagedKvStore {
    layers: Vec<LayerKv>,
    num_blocks: usize,
    block_size: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl std::fmt::Debug for PagedKvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedKvStore")
            .field("layers", &self.layers.len())
            .field("num_blocks", &self.num_blocks)
            .field("block_size", &self.block_size)
            .finish_non_exhaustive()
    }
}

impl PagedKvStore {
    /// Arenas for the layout `spec` describes (all of its blocks, every layer).
    pub fn new(spec: &CacheSpec) -> Self {
        let p = spec.params();
        let (kv_heads, head_dim) = (p.kv_heads as usize, p.head_dim as usize);
        let len = spec.num_blocks() * kv_heads * spec.block_size() * head_dim;
        let layers =
            (0..p.layers.len()).map(|_| LayerKv { k: Arena::new(p.dtype, len), v: Arena::new(p.dtype, len) }).collect();
        Self { layers, num_blocks: spec.num_blocks(), block_size: spec.block_size(), kv_heads, head_dim }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    fn offset(&self, block: BlockId, head: usize, token: usize) -> usize {
        ((block.index() * self.kv_heads + head) * self.block_size + token) * self.head_dim
    }

    fn check(&self, block: BlockId) -> Result<()> {
        if block.index() >= self.num_blocks {
            return Err(Error::InvalidBatch(format!("{block} is outside the {} blocks of the store", self.num_blocks)));
        }
        Ok(())
    }

    /// Writes one token's K and V (`kv_heads * head_dim` values each, head
    /// major) into `slot` of `layer`.
    ///
    /// # Errors
    /// [`Error::InvalidBatch`] for a slot outside the store or rows of the
    /// wrong length.
    pub fn write(&mut self, layer: usize, slot: Slot, k: &[f32], v: &[f32]) -> Result<()> {
        self.check(slot.block)?;
        let row = self.kv_heads * self.head_dim;
        if k.len() != row || v.len() != row || slot.offset as usize >= self.block_size || layer >= self.layers.len() {
            return Err(Error::InvalidBatch("K/V row does not fit the store".into()));
        }
        for h in 0..self.kv_heads {
            let at = self.offset(slot.block, h, slot.offset as usize);
            let src = h * self.head_dim..(h + 1) * self.head_dim;
            self.layers[layer].k.store(at, &k[src.clone()]);
            self.layers[layer].v.store(at, &v[src]);
        }
        Ok(())
    }

    /// Reads the first `tokens` keys and values of `head` in `block` of
    /// `layer` as f32 (`tokens * head_dim` each).
    pub(crate) fn load(&self, layer: usize, block: BlockId, head: usize, k: &mut [f32], v: &mut [f32]) {
        let at = self.offset(block, head, 0);
        self.layers[layer].k.load(at, k);
        self.layers[layer].v.load(at, v);
    }

    /// Performs a copy-on-write that `kv` asked for, in every layer.
    ///
    /// # Errors
    /// [`Error::InvalidBatch`] for blocks outside the store or a token count
    /// beyond the block size.
    pub fn copy_block(&mut self, copy: BlockCopy) -> Result<()> {
        self.check(copy.src)?;
        self.check(copy.dst)?;
        let n = copy.tokens as usize;
        if n > self.block_size {
            return Err(Error::InvalidBatch(format!("copy of {n} tokens exceeds the block size")));
        }
        for h in 0..self.kv_heads {
            let (src, dst) = (self.offset(copy.src, h, 0), self.offset(copy.dst, h, 0));
            for layer in &mut self.layers {
                layer.k.copy_within(src, dst, n * self.head_dim);
                layer.v.copy_within(src, dst, n * self.head_dim);
            }
        }
        Ok(())
    }
}
