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
//!
//! # Hybrid models: sliding-window pages ([`PagedKvStore::hybrid`])
//!
//! Gemma 3 has five sliding-window layers (window 512) to each full layer.
//! A full layer reads a sequence's whole history; a sliding layer only its
//! last window. Keeping every layer's K/V for every block (what
//! [`PagedKvStore::new`] does) wastes most of the memory on positions no
//! sliding layer will read again, so the hybrid store keeps two kinds of
//! arenas:
//!
//! * **full layers**: indexed by block id, like everything above: the `kv`
//!   crate's blocks, prefix index, eviction and tiers govern them;
//! * **sliding layers**: a smaller set of *pages*, each holding one block's
//!   sliding-layer K/V, mapped from block ids on demand. A block gets a page
//!   when the first token is written into it; it keeps it while any live
//!   sequence's window covers it (the engine reports the live windows before
//!   every step and every import from the tiers,
//!   [`PagedKvStore::keep_windows`], and a step protects its own reads and
//!   writes); after that the page stays as it is, reclaimable,
//!   least recently used first, when a new block needs one. So a finished
//!   turn's last window stays until memory is short, which is exactly what
//!   its continuation (the agent's next turn, a shared prefix's next user)
//!   needs.
//!
//! A cached prefix of `L` tokens is usable only if the sliding layers still
//! hold the window before the cut, the blocks covering positions
//! `L − W .. L`; [`PagedKvStore::usable_prefix`] answers with the longest
//! usable cut (the full length, else a block boundary, else 0), in one pass
//! over at most `W / block_size + 1` blocks per candidate. The engine
//! shortens an adoption to it, so attention never meets a missing page (if
//! it did, the step fails with a typed error, never garbage). The blocks it
//! then computes again replace the page-less copies in the prefix index
//! ([`PagedKvStore::holds_window_kv`], `engine/src/txn.rs`), so the next
//! user of that prefix finds the window.
//!
//! The exported payload of a hybrid store is the same per-layer layout
//! (a sliding layer's run read from the block's page, zeros without one)
//! followed by 8 bytes: 1 (little-endian u64) when the sliding runs are the
//! block's, 0 when it had no page. Import restores the page when the flag
//! says so (if one can be had); a block that comes back behind the window
//! its sequence will read from next is imported without it
//! ([`PagedKvStore::import_block_outside_window`]), so bringing back a long
//! history takes a window's pages, not one per block.
//!
//! # Residency
//!
//! Arenas are allocated as untouched zero pages, so allocation is instant;
//! the first write to each page then costs a fault and a zeroing. After a
//! restart that cost landed on the first turns: a restored 2k-token
//! agent's 48 MB imported into fresh pages took ~30 ms more than into
//! resident ones (measured, `kvserve bench tiers`, restart column). A
//! server therefore calls [`PagedKvStore::prefault`] before it starts: the
//! arenas' pages are mapped writable (`MADV_POPULATE_WRITE`, which writes
//! nothing), every arena in parallel, so the pool is resident from the
//! start, as llama.cpp's and vLLM's are. Not in the background: a thread
//! populating pages holds the process's memory-map lock (for reading) and,
//! at a low priority, was preempted holding it, so every `mmap` of the
//! engine (a large `Vec`) waited for it: the first turn after a restart
//! took 260–470 ms instead of 90 (measured, then dropped).
//!
//! Pages are memory as blocks are, and the engine plans with them
//! ([`PagedKvStore::window_pages`]: what live windows hold, so what no new
//! block can have; [`PagedKvStore::window_blocks`]: the most one window
//! holds).

use half::{bf16, f16, slice::HalfFloatSliceExt};
use kv::{BlockCopy, BlockId, BlockStorage, CacheSpec, KvDType, Slot};

use crate::error::{Error, Result};

/// Element types an arena can hold.
trait Element: Copy + Send + Sync + 'static {
    const BYTES: usize;
    fn store(src: &[f32], dst: &mut [Self]);
    fn load(src: &[Self], dst: &mut [f32]);
    fn to_le(src: &[Self], out: &mut [u8]);
    fn from_le(src: &[u8], out: &mut [Self]);
}

/// One element type: its size, f32 conversions (`half`'s slice
/// conversions, vectorised where the CPU allows; f16 loads through
/// [`f16_to_f32`]) and little-endian bytes.
macro_rules! element {
    ($t:ty, $bytes:literal, $store:expr, $load:expr) => {
        impl Element for $t {
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

element!(f32, 4, |s: &[f32], d: &mut [f32]| d.copy_from_slice(s), |s: &[f32], d: &mut [f32]| d.copy_from_slice(s));
element!(f16, 2, |s: &[f32], d: &mut [f16]| d.convert_from_f32_slice(s), f16_to_f32);
element!(bf16, 2, |s: &[f32], d: &mut [bf16]| d.convert_from_f32_slice(s), |s: &[bf16], d: &mut [f32]| s
    .convert_to_f32_slice(d));

/// f16 to f32, exactly: eight elements per F16C instruction where the CPU
/// has it. `half`'s slice conversion made an out-of-line call per eight
/// elements, a fifth of decode time at long contexts (attention converts
/// every block it reads).
#[allow(unsafe_code)] // dispatch into the F16C loop after detection
fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "f16 conversion lengths");
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("f16c") && std::is_x86_feature_detected!("avx") {
        // SAFETY: F16C and AVX were detected just above.
        unsafe { f16_to_f32_f16c(src, dst) };
        return;
    }
    src.convert_to_f32_slice(dst);
}

/// # Safety
/// The CPU must have F16C and AVX.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16_to_f32_f16c(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::{_mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
    let whole = src.len() / 8 * 8;
    for at in (0..whole).step_by(8) {
        // SAFETY: at + 8 <= whole <= both lengths (asserted equal by the
        // caller); unaligned 16-byte load and 32-byte store.
        unsafe {
            let h = _mm_loadu_si128(src.as_ptr().add(at).cast());
            _mm256_storeu_ps(dst.as_mut_ptr().add(at), _mm256_cvtph_ps(h));
        }
    }
    for (d, s) in dst[whole..].iter_mut().zip(&src[whole..]) {
        *d = s.to_f32();
    }
}

/// A hint that the cache line at `p` will be read soon.
#[allow(unsafe_code)] // the prefetch intrinsic
fn prefetch_line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults and reads nothing architecturally;
    // callers pass addresses inside an arena anyway. SSE is baseline on
    // x86_64.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

enum Arena {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Arena {
    /// A zeroed arena. Built from zero bits (`vec![0u16; n]`, `vec![0.0;
    /// n]`), which the allocator hands out as untouched zero pages: the
    /// arena becomes resident as blocks are written, not all at start-up
    /// (`vec![f16::ZERO; n]` writes every element, so a 1 GiB pool was
    /// 1 GiB resident at once).
    fn new(dtype: KvDType, len: usize) -> Self {
        use half::vec::HalfBitsVecExt;
        match dtype {
            KvDType::F32 => Self::F32(vec![0.0; len]),
            KvDType::F16 => Self::F16(vec![0u16; len].reinterpret_into()),
            KvDType::BF16 => Self::BF16(vec![0u16; len].reinterpret_into()),
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

    /// Prefetch hints for elements `at..at + n` (clamped to the arena).
    fn prefetch(&self, at: usize, n: usize) {
        let (ptr, len, size) = match self {
            Self::F32(a) => (a.as_ptr().cast::<u8>(), a.len(), 4),
            Self::F16(a) => (a.as_ptr().cast::<u8>(), a.len(), 2),
            Self::BF16(a) => (a.as_ptr().cast::<u8>(), a.len(), 2),
        };
        let end = (at + n).min(len);
        for byte in (at.min(end) * size..end * size).step_by(64) {
            prefetch_line(ptr.wrapping_add(byte));
        }
    }

    /// Where the arena's elements lie: address and length in bytes.
    fn byte_range(&self) -> (usize, usize) {
        match self {
            Self::F32(a) => (a.as_ptr() as usize, std::mem::size_of_val(a.as_slice())),
            Self::F16(a) => (a.as_ptr() as usize, std::mem::size_of_val(a.as_slice())),
            Self::BF16(a) => (a.as_ptr() as usize, std::mem::size_of_val(a.as_slice())),
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
    /// Indexed by sliding-window page rather than by block id.
    paged: bool,
}

const NONE: u32 = u32::MAX;

/// The sliding layers' pages of a hybrid store (see the module doc).
struct SlidingPages {
    window: usize,
    /// By block id: its page, or [`NONE`].
    page_of: Vec<u32>,
    /// By page: its block, or [`NONE`].
    block_of: Vec<u32>,
    free: Vec<u32>,
    /// By page: the last step that read or wrote it.
    used: Vec<u64>,
    /// By page: the last [`PagedKvStore::keep_windows`] round that found it
    /// in a live window.
    live: Vec<u64>,
    step: u64,
    round: u64,
}

impl SlidingPages {
    fn page(&self, block: BlockId) -> Option<usize> {
        self.page_of.get(block.index()).copied().filter(|&p| p != NONE).map(|p| p as usize)
    }

    /// A page for `block`: its own, a free one, or the least recently used
    /// one that no live window and no part of this step needs.
    fn ensure(&mut self, block: BlockId) -> Option<usize> {
        if let Some(p) = self.page(block) {
            self.used[p] = self.step;
            return Some(p);
        }
        let p = match self.free.pop() {
            Some(p) => p as usize,
            None => {
                let (step, round) = (self.step, self.round);
                let p = (0..self.block_of.len())
                    .filter(|&p| self.used[p] < step && self.live[p] < round)
                    .min_by_key(|&p| self.used[p])?;
                let old = self.block_of[p];
                if old != NONE {
                    self.page_of[old as usize] = NONE;
                }
                p
            }
        };
        self.page_of[block.index()] = p as u32;
        self.block_of[p] = block.index() as u32;
        self.used[p] = self.step;
        Some(p)
    }

    /// The most blocks one window spans: its `window − 1` earlier positions
    /// from any offset in a block.
    fn window_blocks(&self, bs: usize) -> usize {
        (self.window - 1).div_ceil(bs) + 1
    }

    /// The pages held by the window a sequence with `computed` tokens reads
    /// from next (its blocks that lost their page are skipped).
    fn window_pages<'t>(
        &'t self,
        table: &'t kv::BlockTable,
        computed: usize,
        bs: usize,
    ) -> impl Iterator<Item = usize> + 't {
        let lo = (computed + 1).saturating_sub(self.window);
        Self::blocks(lo, computed, bs).filter_map(move |lb| Self::block_at(table, lb, bs).and_then(|b| self.page(b)))
    }

    /// `table`'s block at logical index `lb` (through [`kv::BlockTable::slot`]).
    fn block_at(table: &kv::BlockTable, lb: usize, bs: usize) -> Option<BlockId> {
        table.slot(lb * bs, bs).map(|s| s.block)
    }

    /// Logical blocks holding positions `lo..hi`.
    fn blocks(lo: usize, hi: usize, bs: usize) -> std::ops::Range<usize> {
        if lo >= hi {
            return 0..0;
        }
        lo / bs..(hi - 1) / bs + 1
    }
}

/// K and V arenas for every layer.
pub struct PagedKvStore {
    layers: Vec<LayerKv>,
    num_blocks: usize,
    block_size: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: KvDType,
    sliding: Option<SlidingPages>,
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
        let layers = (0..p.layers.len())
            .map(|_| LayerKv { k: Arena::new(p.dtype, len), v: Arena::new(p.dtype, len), paged: false })
            .collect();
        Self::assemble(spec, layers, None)
    }

    fn assemble(spec: &CacheSpec, layers: Vec<LayerKv>, sliding: Option<SlidingPages>) -> Self {
        let p = spec.params();
        Self {
            layers,
            num_blocks: spec.num_blocks(),
            block_size: spec.block_size(),
            kv_heads: p.kv_heads as usize,
            head_dim: p.head_dim as usize,
            dtype: p.dtype,
            sliding,
        }
    }

    /// Makes the arenas resident now: see "Residency" in the module doc.
    /// Returns the bytes mapped. Linux only (where `MADV_POPULATE_WRITE`
    /// exists, 5.14+); elsewhere, or if the kernel refuses, 0, and pages
    /// stay faulted in as used.
    pub fn prefault(&self) -> usize {
        #[cfg(target_os = "linux")]
        {
            use rayon::prelude::*;
            let ranges: Vec<(usize, usize)> =
                self.layers.iter().flat_map(|l| [l.k.byte_range(), l.v.byte_range()]).collect();
            ranges.par_iter().map(|&r| populate(r)).sum()
        }
        #[cfg(not(target_os = "linux"))]
        0
    }
    /// A hybrid store (module doc): full layers for all of `spec`'s blocks,
    /// sliding-window layers in `pages` pages. `None` unless `spec` mixes
    /// full layers with sliding layers of one window size.
    pub fn hybrid(spec: &CacheSpec, pages: usize) -> Option<Self> {
        let p = spec.params();
        let windows: Vec<usize> = p
            .layers
            .iter()
            .filter_map(|k| match k {
                kv::AttentionKind::SlidingWindow { window } => Some(*window as usize),
                kv::AttentionKind::Full => None,
            })
            .collect();
        let window = *windows.first()?;
        if windows.len() == p.layers.len() || windows.iter().any(|&w| w != window) || pages == 0 {
            return None;
        }
        let (kv_heads, head_dim) = (p.kv_heads as usize, p.head_dim as usize);
        let run = kv_heads * spec.block_size() * head_dim;
        let layers = p
            .layers
            .iter()
            .map(|k| {
                let paged = matches!(k, kv::AttentionKind::SlidingWindow { .. });
                let len = run * if paged { pages } else { spec.num_blocks() };
                LayerKv { k: Arena::new(p.dtype, len), v: Arena::new(p.dtype, len), paged }
            })
            .collect();
        let sliding = SlidingPages {
            window,
            page_of: vec![NONE; spec.num_blocks()],
            block_of: vec![NONE; pages],
            free: (0..pages as u32).rev().collect(),
            used: vec![0; pages],
            live: vec![0; pages],
            step: 1,
            round: 1,
        };
        Some(Self::assemble(spec, layers, Some(sliding)))
    }

    /// The most pages one sequence's window holds (hybrid stores): a
    /// sequence never keeps more once its step is over.
    pub fn window_blocks(&self) -> Option<usize> {
        self.sliding.as_ref().map(|sp| sp.window_blocks(self.block_size))
    }

    /// Sliding-window pages (hybrid stores): how many in all, how many hold
    /// a block.
    pub fn pages(&self) -> Option<(usize, usize)> {
        self.sliding.as_ref().map(|s| (s.block_of.len(), s.block_of.len() - s.free.len()))
    }

    /// Bytes of K/V the store holds for one block: every layer's for a
    /// plain store, the full layers' for a hybrid one (its pages are
    /// counted apart, [`PagedKvStore::page_bytes`]).
    pub fn bytes_per_block(&self) -> usize {
        self.layers.iter().filter(|l| !l.paged).count() * 2 * self.run() * self.dtype.size() as usize
    }

    /// Bytes of one sliding-window page (0 for a plain store).
    pub fn page_bytes(&self) -> usize {
        self.layers.iter().filter(|l| l.paged).count() * 2 * self.run() * self.dtype.size() as usize
    }

    /// Before a step of `batch`: every block whose sliding-layer K/V the
    /// step reads is marked used by it (so nothing this step needs can be
    /// reclaimed), and every block it writes gets a page.
    ///
    /// # Errors
    /// [`Error::InvalidBatch`] if a window the step reads lost its page (the
    /// engine's adoption check, [`PagedKvStore::usable_prefix`], prevents
    /// this); [`kv::Error::Exhausted`] if no page can be had (every page is
    /// in a live window or in this step).
    pub fn prepare(&mut self, batch: &[crate::llama::SeqStep<'_>]) -> Result<()> {
        let bs = self.block_size;
        let Some(sp) = self.sliding.as_mut() else { return Ok(()) };
        sp.step += 1;
        for s in batch {
            let lo = (s.start_pos + 1).saturating_sub(sp.window);
            for lb in SlidingPages::blocks(lo, s.start_pos, bs) {
                match SlidingPages::block_at(s.table, lb, bs).and_then(|b| sp.page(b)) {
                    Some(p) => sp.used[p] = sp.step,
                    None => {
                        return Err(Error::InvalidBatch(format!(
                            "the sliding-window K/V of logical block {lb} is no longer held"
                        )))
                    }
                }
            }
        }
        for s in batch {
            for slot in s.slots {
                if sp.ensure(slot.block).is_none() {
                    // Like a pool out of blocks: the engine preempts a
                    // sequence (its window becomes reclaimable) and retries.
                    let (pages, free) = (sp.block_of.len(), sp.free.len());
                    return Err(Error::Kv(kv::Error::Exhausted { requested: 1, available: free.min(pages) }));
                }
            }
        }
        Ok(())
    }

    /// Before a step (or an import): the windows live sequences will read
    /// from next, each a block table and the count of computed tokens. Their
    /// pages are kept; pages of no live window become reclaimable (least
    /// recently used first), those the last step used included: the copies
    /// and imports that follow may take them.
    pub fn keep_windows<'a>(&mut self, live: impl IntoIterator<Item = (&'a kv::BlockTable, usize)>) {
        let bs = self.block_size;
        let Some(sp) = self.sliding.as_mut() else { return };
        sp.round += 1;
        sp.step += 1;
        let mut kept = Vec::new();
        for (table, computed) in live {
            kept.extend(sp.window_pages(table, computed, bs));
        }
        for p in kept {
            sp.live[p] = sp.round;
        }
    }

    /// The pages the windows of `live` (block table, computed tokens) hold,
    /// each counted once however many windows share it, and the pages in
    /// all; `None` for a plain store. Reported for every sequence the
    /// cache holds, the first number is what no new block can have: the
    /// engine admits and plans by the difference (a step short of pages
    /// would otherwise be refused again and again).
    pub fn window_pages<'a>(
        &self,
        live: impl IntoIterator<Item = (&'a kv::BlockTable, usize)>,
    ) -> Option<(usize, usize)> {
        let sp = self.sliding.as_ref()?;
        // One bit per page: windows sharing a prefix share pages.
        let mut seen = vec![0u64; sp.block_of.len().div_ceil(64)];
        let mut held = 0;
        for (table, computed) in live {
            for p in sp.window_pages(table, computed, self.block_size) {
                let (word, bit) = (p / 64, 1u64 << (p % 64));
                held += usize::from(seen[word] & bit == 0);
                seen[word] |= bit;
            }
        }
        Some((held, sp.block_of.len()))
    }

    /// The longest prefix of `table`'s first `len` tokens a sequence can
    /// continue from: `len` itself when the sliding layers hold the window
    /// before it, else the longest block boundary below `len` where they
    /// do, else 0. Plain stores: `len`.
    pub fn usable_prefix(&self, table: &kv::BlockTable, len: usize) -> usize {
        let Some(sp) = self.sliding.as_ref() else { return len };
        let bs = self.block_size;
        let held = |lo: usize, hi: usize| {
            SlidingPages::blocks(lo, hi, bs)
                .all(|lb| SlidingPages::block_at(table, lb, bs).and_then(|b| sp.page(b)).is_some())
        };
        let mut cut = len;
        loop {
            if cut == 0 || held(cut.saturating_sub(sp.window), cut) {
                return cut;
            }
            cut = if cut.is_multiple_of(bs) { cut - bs } else { cut / bs * bs };
        }
    }

    /// Whether `block`'s sliding-layer K/V is held (it has a page); always
    /// for a plain store.
    pub fn holds_window_kv(&self, block: BlockId) -> bool {
        self.sliding.as_ref().is_none_or(|sp| sp.page(block).is_some())
    }

    /// Where `block`'s run of `layer` lives in that layer's arena.
    fn page_index(&self, layer: usize, block: BlockId) -> Option<usize> {
        match (&self.sliding, self.layers[layer].paged) {
            (Some(sp), true) => sp.page(block),
            _ => Some(block.index()),
        }
    }

    /// [`BlockStorage::import_block`] for a block its sequence will not
    /// read through a sliding window again (it lies behind the window the
    /// next token reads): the full layers only, no page taken. The block's
    /// sliding K/V is lost, so a later cut inside its window recomputes.
    ///
    /// # Errors
    /// As [`BlockStorage::import_block`].
    pub fn import_block_outside_window(&mut self, block: BlockId, data: &[u8]) -> kv::Result<()> {
        self.import(block, data, false)
    }

    fn import(&mut self, block: BlockId, data: &[u8], keep_window: bool) -> kv::Result<()> {
        self.check(block)?;
        if data.len() != self.block_bytes() {
            return Err(kv::Error::PayloadLength { expected: self.block_bytes(), got: data.len() });
        }
        let bytes = self.run() * self.dtype.size() as usize;
        let (runs, flag) = data.split_at(self.layers.len() * 2 * bytes);
        let with_sliding = keep_window && flag.first().is_some_and(|&f| f == 1);
        let run = self.run();
        let page = match self.sliding.as_mut() {
            Some(sp) if with_sliding => sp.ensure(block),
            Some(sp) => {
                // The block's sliding K/V did not travel (or is not wanted):
                // any page it held belongs to its old contents.
                if let Some(p) = sp.page(block) {
                    sp.page_of[block.index()] = NONE;
                    sp.block_of[p] = NONE;
                    sp.free.push(p as u32);
                }
                None
            }
            None => None,
        };
        for (layer, data) in self.layers.iter_mut().zip(runs.chunks_exact(2 * bytes)) {
            let (k, v) = data.split_at(bytes);
            let at = match (layer.paged, page) {
                (false, _) => block.index() * run,
                (true, Some(p)) => p * run,
                (true, None) => continue,
            };
            layer.k.import(at, k);
            layer.v.import(at, v);
        }
        Ok(())
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Element offset of `token` of `head` in page (or block) `page`.
    fn offset(&self, page: usize, head: usize, token: usize) -> usize {
        ((page * self.kv_heads + head) * self.block_size + token) * self.head_dim
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
        let page = self
            .page_index(layer, slot.block)
            .ok_or_else(|| Error::InvalidBatch("a sliding-window layer's block has no page".into()))?;
        for h in 0..self.kv_heads {
            let at = self.offset(page, h, slot.offset as usize);
            let src = h * self.head_dim..(h + 1) * self.head_dim;
            self.layers[layer].k.store(at, &k[src.clone()]);
            self.layers[layer].v.store(at, &v[src]);
        }
        Ok(())
    }

    /// Reads the first `tokens` keys and values of `head` in `block` of
    /// `layer` as f32 (`tokens * head_dim` each).
    ///
    /// # Errors
    /// [`Error::InvalidBatch`] if a sliding layer's block has no page.
    pub(crate) fn load(&self, layer: usize, block: BlockId, head: usize, k: &mut [f32], v: &mut [f32]) -> Result<()> {
        let page = self
            .page_index(layer, block)
            .ok_or_else(|| Error::InvalidBatch(format!("the sliding-window K/V of {block:?} is no longer held")))?;
        let at = self.offset(page, head, 0);
        self.layers[layer].k.load(at, k);
        self.layers[layer].v.load(at, v);
        Ok(())
    }

    /// Asks the CPU to start fetching the first `tokens` K and V of `head`
    /// in `block` of `layer` into cache, so attention's read of it (the
    /// next block it walks) does not wait for memory: blocks are scattered,
    /// and each run is too short for the hardware prefetcher to ramp up.
    /// A hint only: nothing happens for a block without K/V here.
    pub(crate) fn prefetch(&self, layer: usize, block: BlockId, head: usize, tokens: usize) {
        if let Some(page) = self.page_index(layer, block) {
            let at = self.offset(page, head, 0);
            let n = tokens.min(self.block_size) * self.head_dim;
            self.layers[layer].k.prefetch(at, n);
            self.layers[layer].v.prefetch(at, n);
        }
    }
}

impl BlockStorage for PagedKvStore {
    fn layout(&self) -> String {
        let (version, tail) = match &self.sliding {
            None => ("v1", String::new()),
            Some(sp) => {
                ("v2-hybrid", format!(" sliding={:?} window={} +u64-le-sliding-flag", self.sliding_layers(), sp.window))
            }
        };
        format!(
            "kvserve-paged-{version} layers={} kv_heads={} block={} head_dim={} {:?}-le order=layer,k|v,head,position,dim{tail}",
            self.layers.len(),
            self.kv_heads,
            self.block_size,
            self.head_dim,
            self.dtype
        )
    }

    fn block_bytes(&self) -> usize {
        self.layers.len() * 2 * self.run() * self.dtype.size() as usize + if self.sliding.is_some() { 8 } else { 0 }
    }

    fn export_block(&self, block: BlockId, out: &mut [u8]) -> kv::Result<()> {
        self.check(block)?;
        if out.len() != self.block_bytes() {
            return Err(kv::Error::PayloadLength { expected: self.block_bytes(), got: out.len() });
        }
        let bytes = self.run() * self.dtype.size() as usize;
        let page = self.sliding.as_ref().and_then(|sp| sp.page(block));
        let (runs, flag) = out.split_at_mut(self.layers.len() * 2 * bytes);
        for (layer, out) in self.layers.iter().zip(runs.chunks_exact_mut(2 * bytes)) {
            let (k, v) = out.split_at_mut(bytes);
            match (layer.paged, page) {
                (false, _) => {
                    layer.k.export(block.index() * self.run(), k);
                    layer.v.export(block.index() * self.run(), v);
                }
                (true, Some(p)) => {
                    layer.k.export(p * self.run(), k);
                    layer.v.export(p * self.run(), v);
                }
                (true, None) => out.fill(0),
            }
        }
        if !flag.is_empty() {
            flag.copy_from_slice(&u64::from(page.is_some()).to_le_bytes());
        }
        Ok(())
    }

    fn import_block(&mut self, block: BlockId, data: &[u8]) -> kv::Result<()> {
        self.import(block, data, true)
    }

    fn copy_block(&mut self, copy: BlockCopy) -> kv::Result<()> {
        self.check(copy.src)?;
        self.check(copy.dst)?;
        let n = copy.tokens as usize;
        if n > self.block_size {
            return Err(kv::Error::PayloadLength { expected: self.block_size, got: n });
        }
        // The sliding runs travel when the source has them; the copy is
        // written into next, so it needs a page like any written block.
        let pages = match self.sliding.as_mut() {
            Some(sp) => match sp.page(copy.src) {
                Some(src) => match sp.ensure(copy.dst) {
                    Some(dst) => Some((src, dst)),
                    None => {
                        let (pages, free) = (sp.block_of.len(), sp.free.len());
                        return Err(kv::Error::Exhausted { requested: 1, available: free.min(pages) });
                    }
                },
                None => None,
            },
            None => None,
        };
        for h in 0..self.kv_heads {
            let (src, dst) = (self.offset(copy.src.index(), h, 0), self.offset(copy.dst.index(), h, 0));
            let paged = pages.map(|(s, d)| (self.offset(s, h, 0), self.offset(d, h, 0)));
            for layer in &mut self.layers {
                let (src, dst) = match (layer.paged, paged) {
                    (false, _) => (src, dst),
                    (true, Some(p)) => p,
                    (true, None) => continue,
                };
                layer.k.copy_within(src, dst, n * self.head_dim);
                layer.v.copy_within(src, dst, n * self.head_dim);
            }
        }
        Ok(())
    }
}

impl PagedKvStore {
    fn sliding_layers(&self) -> Vec<usize> {
        self.layers.iter().enumerate().filter(|(_, l)| l.paged).map(|(i, _)| i).collect()
    }
}

/// Maps the whole pages of `(address, length)` writable without writing
/// them; returns the bytes mapped (0 if the kernel refused).
#[cfg(target_os = "linux")]
fn populate((addr, len): (usize, usize)) -> usize {
    const PAGE: usize = 4096;
    let (start, end) = (addr.next_multiple_of(PAGE), (addr + len) / PAGE * PAGE);
    if end <= start {
        return 0;
    }
    #[allow(unsafe_code)]
    // SAFETY: the range lies inside a live arena (`&self` is borrowed for
    // the call); madvise reads no memory of ours and, with
    // MADV_POPULATE_WRITE, changes no contents: it only maps the pages.
    let r = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_POPULATE_WRITE) };
    if r == 0 {
        end - start
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv::{AttentionKind, CacheSpecParams};

    #[test]
    fn f16_loads_every_bit_pattern_exactly() {
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        for len in [all.len(), 13, 8, 7, 0] {
            let mut out = vec![0f32; len];
            f16_to_f32(&all[..len], &mut out);
            for (h, x) in all.iter().zip(&out) {
                let want = h.to_f32();
                assert!(
                    x.to_bits() == want.to_bits() || (x.is_nan() && want.is_nan()),
                    "{:#06x}: {x} vs {want}",
                    h.to_bits()
                );
            }
        }
    }

    fn full_spec(dtype: KvDType) -> CacheSpec {
        let mut p = CacheSpecParams::uniform(3, AttentionKind::Full, 2, 4, 5);
        p.block_size = 4;
        p.dtype = dtype;
        CacheSpec::new(p).expect("valid")
    }

    fn store(dtype: KvDType) -> PagedKvStore {
        PagedKvStore::new(&full_spec(dtype))
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

    /// Prefaulting maps pages without writing them: what was stored stays,
    /// and a large arena is mapped whole (pages inside it).
    #[test]
    fn prefault_keeps_contents_and_maps_the_arenas() {
        let mut s = store(KvDType::F16);
        fill(&mut s, 2);
        let n = s.block_bytes();
        let mut before = vec![0u8; n];
        s.export_block(BlockId::new(2), &mut before).expect("export");
        s.prefault();
        let mut after = vec![0u8; n];
        s.export_block(BlockId::new(2), &mut after).expect("export");
        assert_eq!(before, after);
        let mut p = CacheSpecParams::uniform(2, AttentionKind::Full, 2, 64, 512);
        p.block_size = 16;
        let big = PagedKvStore::new(&CacheSpec::new(p).expect("valid"));
        let arena = 512 * 2 * 16 * 64 * 2; // blocks x kv heads x tokens x dims x f16
        #[cfg(target_os = "linux")]
        assert!(big.prefault() >= 4 * (arena - 2 * 4096), "every arena's inner pages");
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
                    s.load(layer, BlockId::new(1), head, &mut k1, &mut v1).expect("load");
                    s.load(layer, BlockId::new(3), head, &mut k3, &mut v3).expect("load");
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

    /// Three layers, the middle one full, the others sliding (window 6),
    /// blocks of 4 tokens.
    fn hybrid_spec(blocks: u32) -> CacheSpec {
        let slide = AttentionKind::SlidingWindow { window: 6 };
        let mut p = CacheSpecParams::uniform(3, slide, 1, 2, blocks);
        p.layers[1] = AttentionKind::Full;
        p.block_size = 4;
        CacheSpec::new(p).expect("valid")
    }

    /// Runs `tokens` more of `seq` through `prepare` and writes every layer
    /// of each new token (values from its position).
    fn step(s: &mut PagedKvStore, cache: &mut kv::KvCache, seq: kv::SeqId, n: usize) -> Result<()> {
        let start = cache.seq_len(seq).expect("seq");
        let tokens: Vec<u32> = (start..start + n).map(|p| p as u32).collect();
        let appended = cache.append(seq, &tokens).expect("append");
        let table = cache.block_table(seq).expect("table").clone();
        let batch = [crate::llama::SeqStep {
            tokens: &tokens,
            start_pos: start,
            table: &table,
            slots: &appended.slots,
            logit_rows: 1,
        }];
        s.prepare(&batch)?;
        for (i, slot) in appended.slots.iter().enumerate() {
            for layer in 0..3 {
                let k = vec![(start + i) as f32 + layer as f32 * 0.5; 2];
                s.write(layer, *slot, &k, &k)?;
            }
        }
        cache.mark_computed(seq, start + n).expect("computed");
        Ok(())
    }

    #[test]
    fn a_hybrid_store_pages_sliding_layers_and_keeps_live_windows() {
        assert!(PagedKvStore::hybrid(&full_spec(KvDType::F16), 4).is_none(), "all full: no pages");
        let spec = hybrid_spec(32);
        let mut s = PagedKvStore::hybrid(&spec, 5).expect("mixed layers");
        assert_eq!(s.pages(), Some((5, 0)));
        assert_eq!(s.page_bytes(), 2 * s.bytes_per_block());
        let mut cache = kv::KvCache::new(spec);
        let owner = kv::OwnerId::new("t").expect("owner");
        let a = cache.create_sequence(&owner, kv::Namespace::new(b"m", b""));
        step(&mut s, &mut cache, a, 12).expect("three blocks, three pages");
        let table = cache.block_table(a).expect("table").clone();
        assert_eq!(s.usable_prefix(&table, 12), 12);
        // Windows that share pages count them once: 12 tokens read from
        // blocks 1 and 2, 4 tokens from block 0.
        assert_eq!(s.window_pages([(&table, 12), (&table, 12), (&table, 4)]), Some((3, 5)));
        assert_eq!(
            PagedKvStore::new(&hybrid_spec(32)).window_pages([(&table, 12)]),
            None,
            "a plain store has no pages"
        );
        // A second sequence churns through the remaining pages; `a` is not
        // live (not reported), so its pages are reclaimed, oldest first.
        let b = cache.create_sequence(&owner, kv::Namespace::new(b"m", b"other"));
        s.keep_windows([(cache.block_table(b).expect("table"), 0)]);
        for _ in 0..4 {
            step(&mut s, &mut cache, b, 4).expect("a page each");
            s.keep_windows([(cache.block_table(b).expect("table"), cache.computed(b).expect("c"))]);
        }
        // `a`'s window before 12 (positions 7..12: blocks 1 and 2) is gone
        // in part, and no earlier cut has its window either.
        assert!(s.usable_prefix(&table, 12) < 12);
        assert_eq!(s.usable_prefix(&table, 12), 0);
        // Full layers are untouched: block 0 of `a` still reads back.
        let (mut k, mut v) = (vec![0.0; 8], vec![0.0; 8]);
        s.load(1, table.blocks()[0], 0, &mut k, &mut v).expect("full layer");
        assert_eq!(k[..2], [0.5, 0.5]);
        assert!(s.load(0, table.blocks()[0], 0, &mut k, &mut v).is_err(), "its sliding page was reclaimed");
        // A live window is never reclaimed: `b` keeps its last two blocks
        // while a third sequence needs pages.
        let c = cache.create_sequence(&owner, kv::Namespace::new(b"m", b"third"));
        for _ in 0..3 {
            step(&mut s, &mut cache, c, 4).expect("pages");
            let live = [
                (cache.block_table(b).expect("t"), cache.computed(b).expect("c")),
                (cache.block_table(c).expect("t"), cache.computed(c).expect("c")),
            ];
            s.keep_windows(live);
        }
        let tb = cache.block_table(b).expect("table").clone();
        assert_eq!(s.usable_prefix(&tb, 16), 16, "b's window survived");
        // Two new blocks at once: one page is reclaimable (c's first block,
        // out of every window), the other would have to be stolen.
        let err = step(&mut s, &mut cache, c, 8);
        assert!(err.is_err(), "every page is in a live window or in this step: a typed error, not a stolen page");
        assert_eq!(s.usable_prefix(&tb, 16), 16, "b's window still intact");
        // A copy-on-write needs a page for the copy too: without one it is
        // the same typed error, not a copy missing its sliding K/V.
        let src = tb.blocks()[tb.blocks().len() - 1];
        let copy = kv::BlockCopy { src, dst: BlockId::new(30), tokens: 2 };
        assert!(matches!(s.copy_block(copy), Err(kv::Error::Exhausted { .. })));
    }

    #[test]
    fn hybrid_payloads_carry_the_sliding_runs_when_they_have_them() {
        let spec = hybrid_spec(8);
        let mut s = PagedKvStore::hybrid(&spec, 4).expect("mixed");
        let mut cache = kv::KvCache::new(spec);
        let a = cache.create_sequence(&kv::OwnerId::new("t").expect("o"), kv::Namespace::new(b"m", b""));
        step(&mut s, &mut cache, a, 4).expect("one block");
        let block = cache.block_table(a).expect("t").blocks()[0];
        let n = s.block_bytes();
        assert_eq!(n, 3 * 2 * 4 * 2 * 2 + 8);
        assert!(s.layout().contains("hybrid"), "{}", s.layout());
        let mut out = vec![0u8; n];
        s.export_block(block, &mut out).expect("export");
        assert_eq!(out[n - 8..], 1u64.to_le_bytes());
        let other = BlockId::new(5);
        s.import_block(other, &out).expect("import");
        let mut again = vec![0u8; n];
        s.export_block(other, &mut again).expect("export");
        assert_eq!(out, again, "bit for bit, sliding runs included");
        // Behind its sequence's window, only the full layers come back and
        // no page is taken, whatever the flag says.
        let held = s.pages().expect("hybrid").1;
        s.import_block_outside_window(BlockId::new(7), &out).expect("import");
        assert_eq!(s.pages().expect("hybrid").1, held, "no page taken");
        let (mut k, mut v) = (vec![0.0; 8], vec![0.0; 8]);
        assert!(s.load(0, BlockId::new(7), 0, &mut k, &mut v).is_err());
        s.load(1, BlockId::new(7), 0, &mut k, &mut v).expect("full layer");
        // Without the flag, only the full layers come back.
        out[n - 8..].copy_from_slice(&0u64.to_le_bytes());
        s.import_block(BlockId::new(6), &out).expect("import");
        let (mut k, mut v) = (vec![0.0; 8], vec![0.0; 8]);
        assert!(s.load(0, BlockId::new(6), 0, &mut k, &mut v).is_err());
        s.load(1, BlockId::new(6), 0, &mut k, &mut v).expect("full layer");
    }
}
