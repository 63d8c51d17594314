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
//!
//! # Exported payload layout ([`BlockStorage`])
//!
//! One block's payload is, for each layer in order, its K run then its V
//! run, each the block's `[kv_head][position][head_dim]` elements exactly
//! as the arena holds them, every element little-endian in the arena's
//! element type: `layers * 2 * kv_heads * block_size * head_dim * size`
//! bytes (368,640 for SmolLM2-135M at f16 and 16 tokens). Export and import
//! are plain copies, so a block that goes out and comes back is bit for
//! bit what it was.

use half::{bf16, f16, slice::HalfFloatSliceExt};
use kv::{BlockCopy, BlockId, BlockStorage, CacheSpec, KvDType, Slot};

use crate::error::{Error, Result};

/// Element types an arena can hold.
trait Element: Copy + Send + Sync + 'static {
    const ZERO: Self;
    const BYTES: usize;
    fn store(src: &[f32], dst: &mut [Self]);
    fn load(src: &[Self], dst: &mut [f32]);
    fn to_le(src: &[Self], out: &mut [u8]);
    fn from_le(src: &[u8], out: &mut [Self]);
}

/// One element type: its zero, size, f32 conversions (`half`'s slice
/// conversions, vectorised where the CPU allows) and little-endian bytes.
macro_rules! element {
    ($t:ty, $zero:expr, $bytes:literal, $store:expr, $load:expr) => {
        impl Element for $t {
            const ZERO: Self = $zero;
            const BYTES: usize = $bytes;
            fn store(src: &[f32], dst: &mut [Self]) {
                $store(src, dst)
            }
            fn load(src: &[Self], dst: &mut [f32]) {
                $load(src, dst)
            }
            fn to_le(src: &[Self], out: &mut [u8]) {
                for (o, x) in out.chunks_exact_mut($bytes).zip(src) {
                    o.copy_from_slice(&x.to_le_bytes());
                }
            }
            fn from_le(src: &[u8], out: &mut [Self]) {
                for (x, b) in out.iter_mut().zip(src.chunks_exact($bytes)) {
                    let mut raw = [0u8; $bytes];
                    raw.copy_from_slice(b);
                    *x = <$t>::from_le_bytes(raw);
                }
            }
        }
    };
}

element!(f32, 0.0, 4, |s: &[f32], d: &mut [f32]| d.copy_from_slice(s), |s: &[f32], d: &mut [f32]| d.copy_from_slice(s));
element!(f16, f16::ZERO, 2, |s: &[f32], d: &mut [f16]| d.convert_from_f32_slice(s), |s: &[f16], d: &mut [f32]| s
    .convert_to_f32_slice(d));
element!(bf16, bf16::ZERO, 2, |s: &[f32], d: &mut [bf16]| d.convert_from_f32_slice(s), |s: &[bf16], d: &mut [f32]| s
    .convert_to_f32_slice(d));

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

    fn element_bytes(&self) -> usize {
        match self {
            Self::F32(_) => f32::BYTES,
            Self::F16(_) => f16::BYTES,
            Self::BF16(_) => bf16::BYTES,
        }
    }

    /// Elements `at..at + out.len() / size` as little-endian bytes.
    fn export(&self, at: usize, out: &mut [u8]) {
        let end = at + out.len() / self.element_bytes();
        match self {
            Self::F32(a) => f32::to_le(&a[at..end], out),
            Self::F16(a) => f16::to_le(&a[at..end], out),
            Self::BF16(a) => bf16::to_le(&a[at..end], out),
        }
    }

    fn import(&mut self, at: usize, src: &[u8]) {
        let end = at + src.len() / self.element_bytes();
        match self {
            Self::F32(a) => f32::from_le(src, &mut a[at..end]),
            Self::F16(a) => f16::from_le(src, &mut a[at..end]),
            Self::BF16(a) => bf16::from_le(src, &mut a[at..end]),
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
    dtype: KvDType,
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
        Self {
            layers,
            num_blocks: spec.num_blocks(),
            block_size: spec.block_size(),
            kv_heads,
            head_dim,
            dtype: p.dtype,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    fn offset(&self, block: BlockId, head: usize, token: usize) -> usize {
        ((block.index() * self.kv_heads + head) * self.block_size + token) * self.head_dim
    }

    fn check(&self, block: BlockId) -> kv::Result<()> {
        if block.index() >= self.num_blocks {
            return Err(kv::Error::BlockOutOfRange { block, blocks: self.num_blocks });
        }
        Ok(())
    }

    /// Elements of one block in one arena.
    fn run(&self) -> usize {
        self.kv_heads * self.block_size * self.head_dim
    }

    /// Writes one token's K and V (`kv_heads * head_dim` values each, head
    /// major) into `slot` of `layer`.
    ///
    /// # Errors
    /// [`Error::InvalidBatch`] for a slot outside the store or rows of the
    /// wrong length.
    pub fn write(&mut self, layer: usize, slot: Slot, k: &[f32], v: &[f32]) -> Result<()> {
        self.check(slot.block).map_err(|e| Error::InvalidBatch(e.to_string()))?;
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
}

impl BlockStorage for PagedKvStore {
    fn layout(&self) -> String {
        format!(
            "kvserve-paged-v1 layers={} kv_heads={} block={} head_dim={} {:?}-le order=layer,k|v,head,position,dim",
            self.layers.len(),
            self.kv_heads,
            self.block_size,
            self.head_dim,
            self.dtype
        )
    }

    fn block_bytes(&self) -> usize {
        self.layers.len() * 2 * self.run() * self.dtype.size() as usize
    }

    fn export_block(&self, block: BlockId, out: &mut [u8]) -> kv::Result<()> {
        self.check(block)?;
        if out.len() != self.block_bytes() {
            return Err(kv::Error::PayloadLength { expected: self.block_bytes(), got: out.len() });
        }
        let (at, bytes) = (block.index() * self.run(), self.run() * self.dtype.size() as usize);
        for (layer, out) in self.layers.iter().zip(out.chunks_exact_mut(2 * bytes)) {
            let (k, v) = out.split_at_mut(bytes);
            layer.k.export(at, k);
            layer.v.export(at, v);
        }
        Ok(())
    }

    fn import_block(&mut self, block: BlockId, data: &[u8]) -> kv::Result<()> {
        self.check(block)?;
        if data.len() != self.block_bytes() {
            return Err(kv::Error::PayloadLength { expected: self.block_bytes(), got: data.len() });
        }
        let (at, bytes) = (block.index() * self.run(), self.run() * self.dtype.size() as usize);
        for (layer, data) in self.layers.iter_mut().zip(data.chunks_exact(2 * bytes)) {
            let (k, v) = data.split_at(bytes);
            layer.k.import(at, k);
            layer.v.import(at, v);
        }
        Ok(())
    }

    fn copy_block(&mut self, copy: BlockCopy) -> kv::Result<()> {
        self.check(copy.src)?;
        self.check(copy.dst)?;
        let n = copy.tokens as usize;
        if n > self.block_size {
            return Err(kv::Error::PayloadLength { expected: self.block_size, got: n });
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

#[cfg(test)]
mod tests {
    use super::*;
    use kv::{AttentionKind, CacheSpecParams};

    fn store(dtype: KvDType) -> PagedKvStore {
        let mut p = CacheSpecParams::uniform(3, AttentionKind::Full, 2, 4, 5);
        p.block_size = 4;
        p.dtype = dtype;
        PagedKvStore::new(&CacheSpec::new(p).expect("valid"))
    }

    fn fill(s: &mut PagedKvStore, block: u32) {
        for layer in 0..3 {
            for pos in 0..4 {
                let k: Vec<f32> = (0..8).map(|i| (layer * 100 + pos * 10 + i) as f32 * 0.37 + block as f32).collect();
                let v: Vec<f32> = k.iter().map(|x| -x).collect();
                s.write(layer, Slot { block: BlockId::new(block), offset: pos as u32 }, &k, &v).expect("write");
            }
        }
    }

    #[test]
    fn export_then_import_reproduces_a_block_bit_for_bit() {
        for dtype in [KvDType::F16, KvDType::BF16, KvDType::F32] {
            let mut s = store(dtype);
            fill(&mut s, 1);
            let n = s.block_bytes();
            assert_eq!(n, 3 * 2 * 2 * 4 * 4 * dtype.size() as usize);
            let mut a = vec![0u8; n];
            s.export_block(BlockId::new(1), &mut a).expect("export");
            s.import_block(BlockId::new(3), &a).expect("import");
            let mut b = vec![0u8; n];
            s.export_block(BlockId::new(3), &mut b).expect("export");
            assert_eq!(a, b, "{dtype:?}");
            for layer in 0..3 {
                for head in 0..2 {
                    let (mut k1, mut v1, mut k3, mut v3) = (vec![0.0; 16], vec![0.0; 16], vec![0.0; 16], vec![0.0; 16]);
                    s.load(layer, BlockId::new(1), head, &mut k1, &mut v1);
                    s.load(layer, BlockId::new(3), head, &mut k3, &mut v3);
                    assert_eq!((k1, v1), (k3, v3));
                }
            }
        }
    }

    #[test]
    fn wrong_sizes_and_blocks_are_typed_errors() {
        let mut s = store(KvDType::F16);
        let n = s.block_bytes();
        assert!(matches!(s.export_block(BlockId::new(5), &mut vec![0; n]), Err(kv::Error::BlockOutOfRange { .. })));
        assert!(matches!(s.export_block(BlockId::new(0), &mut vec![0; n - 1]), Err(kv::Error::PayloadLength { .. })));
        assert!(matches!(s.import_block(BlockId::new(0), &vec![0; n + 2]), Err(kv::Error::PayloadLength { .. })));
        assert!(s.layout().contains("F16"), "{}", s.layout());
    }
}
