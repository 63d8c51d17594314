//! Quantized matmul kernels: one for Q4_1 weights (the default model's
//! layers), one for 8-bit codes with float scales ([`Q8Matrix`]: Q8_0, and
//! Q4_0, Q5_0, Q4_K, Q5_K and Q6_K unpacked to it exactly, `kquant.rs`).
//! Both keep each output row's arithmetic independent of the other rows
//! (batch invariance), and every instruction set gives the same bits.
//!
//! Both kinds of matrix keep columns in tiles of eight, column-interleaved
//! within a block ([`Q4_1Matrix`], [`Q8Matrix`]): one `vpdpbusd` (or
//! `maddubs` on AVX2) meets four weights of eight columns with four
//! broadcast activation codes and leaves each column's dot in its own
//! 32-bit lane, so neither the integer sums nor the float sums need
//! horizontal adds, and a tile is one contiguous stream of weights.
//!
//! The 8-bit kernel's numerics are defined at [`matmul_q8`] (an exact
//! integer dot per half block, one FMA per half block); an AVX-512 VNNI
//! kernel shares each block's weight vectors across four rows, an AVX2 one
//! serves CPUs without VNNI. The rest of this doc is the Q4_1 kernel.
//!
//! `y[m, n] = x[m, k] · W[n, k]ᵀ` with `W` in GGUF's Q4_1 blocks (32 weights:
//! f16 scale `d`, f16 minimum `m`, 16 bytes of 4-bit codes, `w = d·q + m`)
//! and `x` quantized per 32-element block to 8 bits (Q8_1: f16 scale, i8
//! codes, f16 `s = d·Σq`). Per block the dot product is
//! `Σ(q_w·q_x)·d_w·d_x + m_w·s_x`: an exact integer dot plus two products.
//!
//! * **Numerics** replicate candle's `BlockQ4_1::vec_dot` bit for bit: the
//!   same activation quantization (round half away from zero, f16 scale and
//!   sum), an exact integer dot per block, and the float terms added block by
//!   block in the same order. So switching kernels never changes a token, and
//!   the tests compare against candle with `==` on the bits.
//! * **Speed** comes from SIMD for the integer dot (AVX2 `maddubs`/`madd`,
//!   or AVX-512 VNNI `dpbusd` on 256-bit lanes), from computing eight output
//!   columns at once, one per 32-bit lane: the codes are column-interleaved
//!   ([`Q4_1Matrix`]), so four broadcast activations meet eight columns'
//!   four weights in one instruction and neither the integer dots nor the
//!   block-by-block float sums need horizontal adds (see `tile_kernel`),
//!   from unpacking each weight block once for four activation rows
//!   (prefill and batched decode; each row's arithmetic unchanged), and
//!   from splitting output columns over the persistent step workers
//!   (`workers` crate). The instruction set is picked at run time
//!   (`is_x86_feature_detected!`); a scalar path runs everywhere, is the
//!   reference, and serves the last columns of a matrix whose width is not
//!   a multiple of eight.
//!
//! Weights are re-laid out once at load (tile by tile, see [`Q4_1Matrix`]):
//! codes, scales and minimums in three flat arrays (scales as f32, which is
//! exact for f16 values).

use crate::error::{Error, Result};

/// Weights per block.
pub const BLOCK: usize = 32;
/// Output columns the tiled SIMD kernels compute together, one per f32 lane.
const TILE: usize = 8;
/// Activation rows the tiled SIMD kernels compute together, sharing each
/// unpacked weight block (prefill, batched decode). Four and eight measured
/// the same; four keeps the accumulators and the eight weight vectors in
/// registers.
const ROW_TILE: usize = 4;
/// Fewest output columns per parallel task (smaller tasks cost more in
/// scheduling than they gain in balance).
const MIN_COLS_PER_TASK: usize = 32;
/// Tasks per pool thread: a few, so uneven cores still balance.
const TASKS_PER_THREAD: usize = 4;

/// Instruction sets a kernel can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust; the reference.
    Scalar,
    /// AVX2 integer dot products.
    Avx2,
    /// AVX-512 VNNI (`vpdpbusd`) on 256-bit vectors.
    Avx512Vnni,
}

impl Isa {
    /// The best this CPU supports.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512vnni")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx2")
            {
                return Self::Avx512Vnni;
            }
            if std::is_x86_feature_detected!("avx2") {
                return Self::Avx2;
            }
        }
        Self::Scalar
    }

    /// Whether this CPU can run it.
    pub fn available(self) -> bool {
        match self {
            Self::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => std::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Vnni => {
                std::is_x86_feature_detected!("avx512vnni")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// A short name for tables and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Scalar => "scalar",
            Self::Avx2 => "avx2",
            Self::Avx512Vnni => "avx512-vnni",
        }
    }
}

/// A Q4_1 weight matrix `[n, k]`, re-laid out for the kernels.
///
/// Columns `0..tiled` (whole tiles of eight columns) are stored tile by
/// tile so that the SIMD kernels read one stream, and column-interleaved
/// within a block so that one 32-bit lane holds one column: a tile's block
/// is 128 bytes, four 32-byte vectors `P_e` (`e` in 0..4) whose byte
/// `4c + i` holds column `c`'s weight `4e + i` in its low nibble and weight
/// `16 + 4e + i` in its high nibble. A kernel masks (or shifts) a vector and
/// meets eight columns' four weights with four broadcast activations in one
/// `vpdpbusd`: each column's dot lands in its own lane, no horizontal adds.
/// Scales and minimums of a tile are `[block][column]`, so one vector load
/// gives a block's values for the whole tile. Columns from `tiled` on (fewer
/// than a tile) are stored column by column, block by block, as GGUF has
/// them.
pub struct Q4_1Matrix {
    n: usize,
    k: usize,
    /// `n * k / 2` bytes: per block, byte `j` holds weight `j` (low nibble)
    /// and weight `j + 16` (high nibble).
    codes: Vec<u8>,
    scale: Vec<f32>,
    min: Vec<f32>,
    tiled: usize,
}

impl std::fmt::Debug for Q4_1Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q4_1Matrix").field("n", &self.n).field("k", &self.k).finish_non_exhaustive()
    }
}

impl Q4_1Matrix {
    /// Parses GGUF Q4_1 block bytes (20 per block: f16 d, f16 m, 16 code
    /// bytes) of an `[n, k]` matrix.
    ///
    /// # Errors
    /// [`Error::InvalidBatch`] if `k` is not a multiple of 32 or the byte
    /// count does not match.
    pub fn from_ggml_bytes(bytes: &[u8], n: usize, k: usize) -> Result<Self> {
        if !k.is_multiple_of(BLOCK) || bytes.len() != n * (k / BLOCK) * 20 {
            return Err(Error::InvalidBatch(format!("Q4_1 data of {} bytes does not fit [{n}, {k}]", bytes.len())));
        }
        let blocks = n * k / BLOCK;
        let mut plain = Plain {
            codes: Vec::with_capacity(blocks * 16),
            scale: Vec::with_capacity(blocks),
            min: Vec::with_capacity(blocks),
        };
        for b in bytes.chunks_exact(20) {
            plain.scale.push(half::f16::from_le_bytes([b[0], b[1]]).to_f32());
            plain.min.push(half::f16::from_le_bytes([b[2], b[3]]).to_f32());
            plain.codes.extend_from_slice(&b[4..20]);
        }
        Ok(Self::from_plain(n, k, &plain))
    }

    /// Stacks matrices with the same input size into one (their outputs
    /// side by side), so one call does the work of several.
    ///
    /// # Errors
    /// [`Error::InvalidBatch`] if the input sizes differ or nothing is given.
    pub fn stack(parts: Vec<Self>) -> Result<Self> {
        let k = parts.first().map(|p| p.k).ok_or_else(|| Error::InvalidBatch("nothing to stack".into()))?;
        if parts.iter().any(|p| p.k != k) {
            return Err(Error::InvalidBatch("stacked matrices must share their input size".into()));
        }
        let mut all = Plain { codes: Vec::new(), scale: Vec::new(), min: Vec::new() };
        let mut n = 0;
        for p in parts {
            let plain = p.to_plain();
            all.codes.extend(plain.codes);
            all.scale.extend(plain.scale);
            all.min.extend(plain.min);
            n += p.n;
        }
        Ok(Self::from_plain(n, k, &all))
    }

    /// Output size.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input size.
    pub fn cols(&self) -> usize {
        self.k
    }

    fn blocks(&self) -> usize {
        self.k / BLOCK
    }

    /// Index of column `j`'s block `b` in `scale` and `min`.
    fn param_index(&self, j: usize, b: usize) -> usize {
        let nb = self.blocks();
        if j < self.tiled {
            (j / TILE * nb + b) * TILE + j % TILE
        } else {
            j * nb + b
        }
    }

    /// Where GGUF code byte `i` (0..16: weight `i` low, `i + 16` high) of
    /// column `j`'s block `b` lives in `codes`. Bytes `4e..4e + 4` are
    /// contiguous in every layout (the conversions copy them four at a time).
    fn code_index(&self, j: usize, b: usize, i: usize) -> usize {
        let nb = self.blocks();
        if j < self.tiled {
            let (tile, c) = (j / TILE * nb * TILE * 16, j % TILE);
            tile + b * TILE * 16 + i / 4 * 32 + c * 4 + i % 4
        } else {
            (j * nb + b) * 16 + i
        }
    }

    /// Lays out column-by-column blocks for the kernels.
    fn from_plain(n: usize, k: usize, plain: &Plain) -> Self {
        let len = plain.scale.len();
        let mut out =
            Self { n, k, codes: vec![0; len * 16], scale: vec![0.0; len], min: vec![0.0; len], tiled: n / TILE * TILE };
        let nb = k / BLOCK;
        for j in 0..n {
            for b in 0..nb {
                let src = j * nb + b;
                for i in (0..16).step_by(4) {
                    let (dst, from) = (out.code_index(j, b, i), src * 16 + i);
                    out.codes[dst..dst + 4].copy_from_slice(&plain.codes[from..from + 4]);
                }
                let p = out.param_index(j, b);
                out.scale[p] = plain.scale[src];
                out.min[p] = plain.min[src];
            }
        }
        out
    }

    /// The blocks column by column again.
    fn to_plain(&self) -> Plain {
        let nb = self.blocks();
        let mut plain = Plain {
            codes: Vec::with_capacity(self.codes.len()),
            scale: Vec::with_capacity(self.scale.len()),
            min: Vec::with_capacity(self.min.len()),
        };
        for j in 0..self.n {
            for b in 0..nb {
                for i in (0..16).step_by(4) {
                    let at = self.code_index(j, b, i);
                    plain.codes.extend_from_slice(&self.codes[at..at + 4]);
                }
                let p = self.param_index(j, b);
                plain.scale.push(self.scale[p]);
                plain.min.push(self.min[p]);
            }
        }
        plain
    }
}

/// Q4_1 blocks column by column, block by block, as GGUF stores them.
struct Plain {
    codes: Vec<u8>,
    scale: Vec<f32>,
    min: Vec<f32>,
}

/// Activations quantized to 8 bits, `[m, k]`: as Q8_1 (per 32, f16 scale;
/// [`Q8Acts::quantize`]) or as Q8_K (per 256, f32 scale, stored per block
/// of 32 all the same; [`Q8Acts::quantize_k`]).
pub struct Q8Acts {
    m: usize,
    k: usize,
    codes: Vec<i8>,
    /// The f16-rounded scale of each block, as f32.
    scale: Vec<f32>,
    /// The f16 `s = f16(Σq) · d` of each block, as f32.
    sum: Vec<f32>,
    /// `d · Σq` of each block (the f32 product, `Σq` exact).
    xsum: Vec<f32>,
}

impl Q8Acts {
    /// Quantizes `x` (`[m, k]`, row major) exactly as candle's
    /// `BlockQ8_1::from_float` does (finite inputs), with AVX2 where the CPU
    /// has it.
    #[allow(unsafe_code)] // dispatch into the SIMD block quantizer
    pub fn quantize(x: &[f32], m: usize, k: usize) -> Self {
        debug_assert_eq!(x.len(), m * k);
        let blocks = m * k / BLOCK;
        let mut codes = vec![0i8; m * k];
        let mut scale = Vec::with_capacity(blocks);
        let mut sum = Vec::with_capacity(blocks);
        let mut xsum = Vec::with_capacity(blocks);
        #[cfg(target_arch = "x86_64")]
        let simd = std::is_x86_feature_detected!("avx2");
        for (xs, qs) in x.chunks_exact(BLOCK).zip(codes.chunks_exact_mut(BLOCK)) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 was detected just above.
            let (d, total) = if simd { unsafe { x86::quantize_block_avx2(xs, qs) } } else { quantize_block(xs, qs) };
            #[cfg(not(target_arch = "x86_64"))]
            let (d, total) = quantize_block(xs, qs);
            let d16 = half::f16::from_f32(d);
            scale.push(d16.to_f32());
            sum.push((half::f16::from_f32(total as f32) * d16).to_f32());
            xsum.push(d16.to_f32() * total as f32);
        }
        Self { m, k, codes, scale, sum, xsum }
    }

    /// Quantizes `x` (`[m, k]`, `k` a multiple of 256) as GGML's Q8_K
    /// (`quantize_row_q8_K_ref`), the activations llama.cpp pairs with
    /// K-quant weights: per 256 values, `iscale = −127 / v` for the value `v`
    /// of largest magnitude (the first such), codes
    /// `min(127, round_half_even(iscale · x))`, scale `1 / iscale` (f32, not
    /// rounded to f16; negative when `v` is positive). Each block of 32 gets
    /// its group's scale, so the kernels are unchanged.
    pub fn quantize_k(x: &[f32], m: usize, k: usize) -> Self {
        debug_assert!(x.len() == m * k && k.is_multiple_of(crate::kquant::QK_K));
        let mut codes = vec![0i8; m * k];
        let blocks = m * k / BLOCK;
        let (mut scale, mut xsum) = (Vec::with_capacity(blocks), Vec::with_capacity(blocks));
        for (xs, qs) in x.chunks_exact(crate::kquant::QK_K).zip(codes.chunks_exact_mut(crate::kquant::QK_K)) {
            // Written so the compiler vectorizes it: eight running maxima,
            // and GGML's `nearest_int` (adding 1.5·2²³ leaves the rounded
            // integer in the mantissa; round half to even, as the FPU
            // rounds) instead of a libm call per value.
            let mut lanes = [0f32; 8];
            for c in xs.chunks_exact(8) {
                for (l, v) in lanes.iter_mut().zip(c) {
                    *l = if v.abs() > *l { v.abs() } else { *l };
                }
            }
            let amax = lanes.iter().fold(0f32, |a, &l| if l > a { l } else { a });
            let d = match xs.iter().find(|v| v.abs() == amax) {
                Some(&v) if amax > 0.0 => {
                    let iscale = -127.0 / v;
                    for (q, x) in qs.iter_mut().zip(xs) {
                        let rounded = ((iscale * x + 12_582_912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000;
                        *q = rounded.min(127) as i8;
                    }
                    1.0 / iscale
                }
                // All zero: codes and scale 0.
                _ => 0.0,
            };
            for q in qs.chunks_exact(BLOCK) {
                scale.push(d);
                xsum.push(d * q.iter().map(|&q| i32::from(q)).sum::<i32>() as f32);
            }
        }
        Self { m, k, codes, scale, sum: xsum.clone(), xsum }
    }

    /// Per block, `−128 ·` the sums of its first and last 16 codes (`[lo,
    /// hi]` flattened): the VNNI 8-bit kernel's correction for weights
    /// offset to unsigned bytes, ready to broadcast from memory.
    fn half_sums(&self) -> Vec<i32> {
        self.codes.chunks_exact(16).map(|h| -128 * h.iter().map(|&q| i32::from(q)).sum::<i32>()).collect()
    }

    /// Row `r`'s `d · Σq` per block (`nb` blocks per row).
    fn xsum_of(&self, r: usize, nb: usize) -> &[f32] {
        &self.xsum[r * nb..(r + 1) * nb]
    }
}

/// One block of activations to 8 bits: codes `round(x / d)` (half away
/// from zero) with `d = max|x| / 127`; returns `d` and the codes' sum.
fn quantize_block(xs: &[f32], qs: &mut [i8]) -> (f32, i32) {
    let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
    let (d, id) = block_scale(amax);
    let mut total = 0i32;
    for (q, v) in qs.iter_mut().zip(xs) {
        *q = (v * id).round() as i8;
        total += i32::from(*q);
    }
    (d, total)
}

/// A block's scale and its inverse (0 for an all-zero block).
fn block_scale(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    (d, if d != 0.0 { 1.0 / d } else { 0.0 })
}

/// `x[m, k] · Wᵀ` → `[m, n]`, on the step workers.
///
/// # Errors
/// [`Error::InvalidBatch`] if `x` is not `m * k` long, or `isa` is not
/// available on this CPU.
pub fn matmul(w: &Q4_1Matrix, x: &[f32], m: usize, isa: Isa) -> Result<Vec<f32>> {
    check_call(x, m, w.k, isa)?;
    let acts = Q8Acts::quantize(x, m, w.k);
    Ok(par_columns(w.n, m, |j0, mut run| {
        // Runs start on a TILE boundary.
        for c0 in (0..run.cols()).step_by(TILE) {
            let (j, width) = (j0 + c0, TILE.min(run.cols() - c0));
            let mut out = run.narrow(c0, width);
            if j + TILE <= w.tiled {
                tile(w, j / TILE, &acts, isa, &mut out);
            } else {
                // Fewer than a tile of columns left (no default-model
                // matrix has any): the reference kernel.
                for c in 0..width {
                    column_scalar(w, j + c, &acts, &mut out, c);
                }
            }
        }
    }))
}

/// The checks every matmul entry point makes before touching SIMD code.
fn check_call(x: &[f32], m: usize, k: usize, isa: Isa) -> Result<()> {
    if x.len() != m * k {
        return Err(Error::InvalidBatch(format!("activations of {} values do not fit [{m}, {k}]", x.len())));
    }
    if !isa.available() {
        return Err(Error::InvalidBatch(format!("this CPU cannot run the {} kernels", isa.name())));
    }
    Ok(())
}

/// Runs `columns(j0, view)` over runs of output columns on the step
/// workers (as many as rayon's pool has threads) and returns the row-major
/// `[m, n]` result, which the kernels write directly through their run's
/// [`OutColumns`] view. Every run but the last
/// starts and ends on a [`TILE`] boundary. (Kernels used to fill a
/// column-major buffer per run that was then transposed: that copy was 10%
/// of a SmolLM2 prefill and 7% of a Gemma-3 one.)
#[allow(unsafe_code)] // the views of different tasks are disjoint
fn par_columns(n: usize, m: usize, columns: impl Fn(usize, OutColumns<'_>) + Sync) -> Vec<f32> {
    let per_task =
        n.div_ceil(rayon::current_num_threads() * TASKS_PER_THREAD).max(MIN_COLS_PER_TASK).next_multiple_of(TILE);
    let mut out = vec![0f32; n * m];
    let shared = SharedOut(out.as_mut_ptr());
    workers::for_each(n.div_ceil(per_task), &|task| {
        let j0 = task * per_task;
        let view = OutColumns { out: shared, n, m, j0, cols: per_task.min(n - j0), _owns: std::marker::PhantomData };
        columns(j0, view);
    });
    out
}

/// Columns `j0..j0 + cols` of every row of a row-major `[m, n]` output:
/// one task's run in [`par_columns`], or part of one. Views of
/// different tasks never overlap, and a narrower view borrows its parent.
struct OutColumns<'a> {
    out: SharedOut,
    n: usize,
    m: usize,
    j0: usize,
    cols: usize,
    _owns: std::marker::PhantomData<&'a mut [f32]>,
}

impl OutColumns<'_> {
    /// Columns in the view.
    fn cols(&self) -> usize {
        self.cols
    }

    /// Writes row `row`, column `col` (of the view).
    ///
    /// # Panics
    /// Outside the view.
    #[inline]
    #[allow(unsafe_code)]
    fn put(&mut self, row: usize, col: usize, v: f32) {
        assert!(row < self.m && col < self.cols, "outside the output view");
        // SAFETY: in bounds of the `[m, n]` output (row < m, j0 + col <
        // n), which outlives the region; only this view writes these
        // columns while it lives (see `par_columns`).
        unsafe { *self.out.at(row * self.n + self.j0 + col) = v };
    }

    /// Row `row`'s columns of the view, contiguous.
    ///
    /// # Panics
    /// Outside the view.
    #[inline]
    #[allow(unsafe_code)]
    fn row(&mut self, row: usize) -> &mut [f32] {
        assert!(row < self.m, "outside the output view");
        // SAFETY: as in `put`: `cols` elements from `(row, j0)` are in
        // bounds and only this view (borrowed mutably for the slice's life)
        // writes them.
        unsafe { std::slice::from_raw_parts_mut(self.out.at(row * self.n + self.j0), self.cols) }
    }

    /// The view's columns `c0..c0 + cols`.
    fn narrow(&mut self, c0: usize, cols: usize) -> OutColumns<'_> {
        assert!(c0 + cols <= self.cols, "outside the output view");
        OutColumns { out: self.out, n: self.n, m: self.m, j0: self.j0 + c0, cols, _owns: std::marker::PhantomData }
    }
}

/// The output of [`par_columns`], written by its tasks' views in disjoint
/// column ranges.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: tasks write disjoint elements through it (see `par_columns`).
#[allow(unsafe_code)]
unsafe impl Send for SharedOut {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The element `at`; the caller keeps `at` in bounds.
    fn at(self, at: usize) -> *mut f32 {
        self.0.wrapping_add(at)
    }
}

/// An 8-bit weight matrix `[n, k]`: per block of 32 weights, i8 codes and
/// an f32 scale, optionally a second scale for the block's last 16 weights
/// and a minimum added to every weight (`w = scale · code + min`). Q8_0 is
/// this layout directly; Q4_0, Q5_0, Q4_K, Q5_K and Q6_K convert to it
/// exactly at load (`kquant.rs`). Both default models' token embedding,
/// which is also their output projection, is Q8_0.
///
/// Columns (output rows of the GGUF tensor) are stored in tiles of eight,
/// block by block, and column-interleaved within a block as the
/// Q4_1 tiles are: a tile's block is 256 bytes, eight 32-byte vectors, and
/// vector `e` holds weights `4e..4e + 4` of the eight columns, one column
/// per 32-bit lane (`codes[tile][block][e][column][4]`). One `vpdpbusd`
/// with four broadcast activations then adds four weights' products to each
/// column's exact integer dot in its own lane, so a block costs eight
/// integer instructions and two float ones for eight columns, and a tile
/// is one contiguous stream. Scales are `[tile][block][column]` (one vector
/// load per block). A last partial tile is padded with zero codes and
/// scales (outputs nobody reads). Minimums stay per column (`[column][block]`,
/// padded likewise): they are read once per column.
pub struct Q8Matrix {
    n: usize,
    k: usize,
    codes: Vec<i8>,
    scale: Vec<f32>,
    scale_hi: Option<Vec<f32>>,
    min: Option<Vec<f32>>,
    /// Values per activation scale: 32, or 256 for K-quants (see
    /// [`matmul_q8`]).
    act_block: usize,
}

impl std::fmt::Debug for Q8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q8Matrix").field("n", &self.n).field("k", &self.k).finish_non_exhaustive()
    }
}

impl Q8Matrix {
    /// Parses GGUF Q8_0 block bytes (34 per block: f16 d, 32 codes) of an
    /// `[n, k]` matrix.
    ///
    /// # Errors
    /// [`Error::InvalidBatch`] if `k` is not a multiple of 32 or the byte
    /// count does not match.
    pub fn from_ggml_bytes(bytes: &[u8], n: usize, k: usize) -> Result<Self> {
        Self::from_ggml(candle_core::quantized::GgmlDType::Q8_0, bytes, n, k)
    }

    /// Whether [`Q8Matrix::from_ggml`] takes this type.
    pub fn supports(dtype: candle_core::quantized::GgmlDType) -> bool {
        crate::kquant::supported(dtype)
    }

    /// Parses GGUF block bytes of an `[n, k]` matrix of a supported type.
    ///
    /// # Errors
    /// [`Error::InvalidBatch`] for another type, or a shape the bytes do not
    /// fit.
    pub fn from_ggml(dtype: candle_core::quantized::GgmlDType, bytes: &[u8], n: usize, k: usize) -> Result<Self> {
        let mut w = Self::tiled(n, k, crate::kquant::unpack(dtype, bytes, n, k)?);
        w.act_block = crate::kquant::activation_block(dtype);
        Ok(w)
    }

    /// Whether [`Q8Matrix::stack`] can stack matrices of these types: their
    /// activations must be quantized alike.
    pub fn stackable(dtypes: &[candle_core::quantized::GgmlDType]) -> bool {
        dtypes.windows(2).all(|p| crate::kquant::activation_block(p[0]) == crate::kquant::activation_block(p[1]))
    }

    fn blocks(&self) -> usize {
        self.k / BLOCK
    }

    /// Where weight `i` (0..32) of column `j`'s block `b` lives in `codes`.
    /// Weights `4e..4e + 4` are contiguous (the conversions copy them four
    /// at a time).
    fn code_index(&self, j: usize, b: usize, i: usize) -> usize {
        let (t, c) = (j / TILE, j % TILE);
        (t * self.blocks() + b) * TILE * BLOCK + i / 4 * TILE * 4 + c * 4 + i % 4
    }

    /// Index of column `j`'s block `b` in `scale` and `scale_hi`.
    fn param_index(&self, j: usize, b: usize) -> usize {
        (j / TILE * self.blocks() + b) * TILE + j % TILE
    }

    /// Tiles a row-major unpacked `[n, k]` matrix (see the type's doc).
    fn tiled(n: usize, k: usize, u: crate::kquant::Unpacked) -> Self {
        let nb = k / BLOCK;
        let padded = n.div_ceil(TILE) * TILE;
        let mut w = Self {
            n,
            k,
            codes: vec![0i8; padded * k],
            scale: vec![0f32; padded * nb],
            scale_hi: u.scale_hi.as_ref().map(|_| vec![0f32; padded * nb]),
            min: u.min.map(|mut m| {
                m.resize(padded * nb, 0.0);
                m
            }),
            act_block: BLOCK,
        };
        for j in 0..n {
            for b in 0..nb {
                let src = j * k + b * BLOCK;
                for i in (0..BLOCK).step_by(4) {
                    let at = w.code_index(j, b, i);
                    w.codes[at..at + 4].copy_from_slice(&u.codes[src + i..src + i + 4]);
                }
                let at = w.param_index(j, b);
                w.scale[at] = u.scale[j * nb + b];
                if let (Some(hi), Some(src)) = (w.scale_hi.as_mut(), u.scale_hi.as_ref()) {
                    hi[at] = src[j * nb + b];
                }
            }
        }
        w
    }

    /// The row-major unpacked form back (what [`Q8Matrix::tiled`] took).
    fn untiled(self) -> crate::kquant::Unpacked {
        let (n, k, nb) = (self.n, self.k, self.blocks());
        let mut u = crate::kquant::Unpacked {
            codes: Vec::with_capacity(n * k),
            scale: Vec::with_capacity(n * nb),
            scale_hi: self.scale_hi.as_ref().map(|_| Vec::with_capacity(n * nb)),
            min: None,
        };
        for j in 0..n {
            for b in 0..nb {
                for i in (0..BLOCK).step_by(4) {
                    let at = self.code_index(j, b, i);
                    u.codes.extend_from_slice(&self.codes[at..at + 4]);
                }
                let at = self.param_index(j, b);
                u.scale.push(self.scale[at]);
                if let (Some(dst), Some(src)) = (u.scale_hi.as_mut(), self.scale_hi.as_ref()) {
                    dst.push(src[at]);
                }
            }
        }
        u.min = self.min.map(|mut m| {
            m.truncate(n * nb);
            m
        });
        u
    }

    /// Stacks matrices with the same input size into one (outputs side by
    /// side). Parts without second scales or minimums get copies of their
    /// scale and zeros, which change none of their outputs (the kernels
    /// always scale a block's halves separately, see [`matmul_q8`]).
    ///
    /// # Errors
    /// [`Error::InvalidBatch`] if the input sizes or activation blocks
    /// differ, or nothing is given.
    pub fn stack(parts: Vec<Self>) -> Result<Self> {
        let k = parts.first().map(|p| p.k).ok_or_else(|| Error::InvalidBatch("nothing to stack".into()))?;
        if parts.iter().any(|p| p.k != k) {
            return Err(Error::InvalidBatch("stacked matrices must share their input size".into()));
        }
        let act_block = parts[0].act_block;
        if parts.iter().any(|p| p.act_block != act_block) {
            return Err(Error::InvalidBatch("stacked matrices must quantize their activations alike".into()));
        }
        let split = parts.iter().any(|p| p.scale_hi.is_some());
        let offset = parts.iter().any(|p| p.min.is_some());
        let mut n = 0;
        let mut all = crate::kquant::Unpacked { codes: Vec::new(), scale: Vec::new(), scale_hi: None, min: None };
        let (mut hi, mut min) = (Vec::new(), Vec::new());
        for p in parts {
            n += p.n;
            let p = p.untiled();
            all.codes.extend(p.codes);
            if split {
                hi.extend(p.scale_hi.unwrap_or_else(|| p.scale.clone()));
            }
            if offset {
                let blocks = p.scale.len();
                min.extend(p.min.unwrap_or_else(|| vec![0.0; blocks]));
            }
            all.scale.extend(p.scale);
        }
        all.scale_hi = split.then_some(hi);
        all.min = offset.then_some(min);
        let mut w = Self::tiled(n, k, all);
        w.act_block = act_block;
        Ok(w)
    }

    /// Output size.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input size.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Row `r` as f32 (`scale × code + min`, what GGML's dequantization
    /// gives).
    ///
    /// # Panics
    /// If `r` is not a row or `out` is not `cols()` long (callers check
    /// token ids against the vocabulary first).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let nb = self.blocks();
        assert!(r < self.n && out.len() == self.k, "row {r} of a {}-row matrix", self.n);
        for (b, o) in out.chunks_exact_mut(BLOCK).enumerate() {
            let at = self.param_index(r, b);
            let lo = self.scale[at];
            let hi = self.scale_hi.as_ref().map_or(lo, |h| h[at]);
            let min = self.min.as_ref().map(|m| m[r * nb + b]);
            for (i, o) in o.iter_mut().enumerate() {
                let v = f32::from(self.codes[self.code_index(r, b, i)]) * if i < 16 { lo } else { hi };
                *o = min.map_or(v, |m| v + m);
            }
        }
    }
}

/// `x[m, k] · Wᵀ` → `[m, n]` for 8-bit weights (Q8_0 and everything that
/// converts to it). Per column and row, block by block: the exact integer
/// dots of the block's two halves with the activation codes (`lo`: weights
/// 0..16, `hi`: 16..32), each scaled and accumulated with one fused
/// multiply-add, `acc = (scale · d_x) × lo + acc`, then
/// `acc = (scale_hi · d_x) × hi + acc` (`scale_hi` is `scale` for formats
/// with one scale per block); at the end the minimums' `Σ min · d_x · Σq_x`
/// is added (`min_terms`). Every kernel computes exactly this (integer
/// sums are exact in any order), so every instruction set and every row
/// count gives the same bits. (Before the column-interleaved layout each
/// column kept eight float lanes of four weights each, candle's order for
/// Q8_0: sixteen float operations per column and block instead of four, and
/// the tile's float work was most of Gemma-3's prefill.)
///
/// # Errors
/// As [`matmul`].
pub fn matmul_q8(w: &Q8Matrix, x: &[f32], m: usize, isa: Isa) -> Result<Vec<f32>> {
    check_call(x, m, w.k, isa)?;
    let acts = if w.act_block == BLOCK { Q8Acts::quantize(x, m, w.k) } else { Q8Acts::quantize_k(x, m, w.k) };
    let sums = if isa == Isa::Avx512Vnni { acts.half_sums() } else { Vec::new() };
    Ok(par_columns(w.n, m, |j0, mut run| {
        // Runs start on a tile boundary; only the last can end inside one.
        for c0 in (0..run.cols()).step_by(TILE) {
            let live = TILE.min(run.cols() - c0);
            tile_q8(w, (j0 + c0) / TILE, &acts, &sums, isa, &mut run.narrow(c0, live));
        }
    }))
}

/// Activation rows the 8-bit VNNI tile computes together, sharing each
/// block's weight vectors.
const Q8_ROWS: usize = 4;

/// The columns of tile `t` that `out` views (all [`TILE`] but in a last,
/// padded tile), every row. `sums` are [`Q8Acts::half_sums`] for the VNNI
/// kernel.
#[allow(unsafe_code)] // dispatch into the SIMD kernels below
fn tile_q8(w: &Q8Matrix, t: usize, acts: &Q8Acts, sums: &[i32], isa: Isa, out: &mut OutColumns<'_>) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `matmul_q8` checked `isa.available()`: AVX2, FMA, AVX-512
        // VNNI and VL.
        Isa::Avx512Vnni => unsafe { x86::tile_q8_vnni(w, t, acts, sums, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX2 and FMA.
        Isa::Avx2 => unsafe { x86::tile_q8_avx2(w, t, acts, out) },
        _ => {
            for c in 0..out.cols() {
                for r in 0..acts.m {
                    out.put(r, c, column_q8_scalar(w, t * TILE + c, acts, r));
                }
            }
        }
    }
}

/// The reference for one column and row of [`matmul_q8`].
fn column_q8_scalar(w: &Q8Matrix, j: usize, acts: &Q8Acts, r: usize) -> f32 {
    let nb = w.blocks();
    let mut acc = 0f32;
    for b in 0..nb {
        let x = &acts.codes[r * acts.k + b * BLOCK..][..BLOCK];
        let dot = |i0: usize| -> i32 {
            (i0..i0 + 16).map(|i| i32::from(w.codes[w.code_index(j, b, i)]) * i32::from(x[i])).sum()
        };
        let at = w.param_index(j, b);
        let dx = acts.scale[r * nb + b];
        let lo = w.scale[at];
        let hi = w.scale_hi.as_ref().map_or(lo, |h| h[at]);
        acc = (lo * dx).mul_add(dot(0) as f32, acc);
        acc = (hi * dx).mul_add(dot(16) as f32, acc);
    }
    if let Some(min) = &w.min {
        acc += min_terms(&min[j * nb..(j + 1) * nb], acts, r);
    }
    acc
}

/// `Σ_b min_b · (d_x,b · Σq_x,b)` for row `r`: block `b` into lane
/// `b mod 8` (fused multiply-add, block order), then the lanes summed as the
/// kernels sum theirs. K-quants, the only formats with minimums, have a
/// multiple of eight blocks per row; any tail is added last, in order.
fn min_terms(min: &[f32], acts: &Q8Acts, r: usize) -> f32 {
    let nb = min.len();
    let xsum = acts.xsum_of(r, nb);
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        #[allow(unsafe_code)]
        // SAFETY: AVX2 and FMA detected just above.
        return unsafe { x86::min_terms_avx2(min, xsum) };
    }
    let mut lanes = [0f32; 8];
    let whole = nb / 8 * 8;
    for (m8, s8) in min[..whole].chunks_exact(8).zip(xsum[..whole].chunks_exact(8)) {
        for ((lane, m), s) in lanes.iter_mut().zip(m8).zip(s8) {
            *lane = m.mul_add(*s, *lane);
        }
    }
    let l = lanes;
    let mut total = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
    for (m, s) in min[whole..].iter().zip(&xsum[whole..]) {
        total += m * s;
    }
    total
}

/// The [`TILE`] output columns of tile `t` for every activation row, into
/// `out` (a view of exactly those columns).
#[allow(unsafe_code)] // dispatch into the SIMD kernels below
fn tile(w: &Q4_1Matrix, t: usize, acts: &Q8Acts, isa: Isa, out: &mut OutColumns<'_>) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `matmul` checked `isa.available()`, so the CPU has AVX2.
        Isa::Avx2 => unsafe { x86::tile_avx2(w, t, acts, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX2, AVX-512 VNNI and AVX-512 VL.
        Isa::Avx512Vnni => unsafe { x86::tile_vnni(w, t, acts, out) },
        _ => {
            for c in 0..TILE {
                column_scalar(w, t * TILE + c, acts, out, c);
            }
        }
    }
}

/// The reference: candle's `vec_dot` for one column, block by block: the
/// exact integer dot, then `sumf += Σq·d_w·d_x + m_w·s_x` in block order.
/// Writes column `j` to column `c` of `out`.
fn column_scalar(w: &Q4_1Matrix, j: usize, acts: &Q8Acts, out: &mut OutColumns<'_>, c: usize) {
    let nb = w.blocks();
    for r in 0..acts.m {
        let mut sumf = 0f32;
        for b in 0..nb {
            let x = &acts.codes[r * acts.k + b * BLOCK..][..BLOCK];
            let sumi: i32 = (0..16)
                .map(|i| {
                    let q = w.codes[w.code_index(j, b, i)];
                    i32::from(q & 0x0f) * i32::from(x[i]) + i32::from(q >> 4) * i32::from(x[i + 16])
                })
                .sum();
            let (p, ab) = (w.param_index(j, b), r * nb + b);
            sumf += sumi as f32 * w.scale[p] * acts.scale[ab] + w.min[p] * acts.sum[ab];
        }
        out.put(r, c, sumf);
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)] // SIMD intrinsics; every block documents its safety
mod x86 {
    use std::arch::x86_64::*;

    use super::{block_scale, OutColumns, Q4_1Matrix, Q8Acts, Q8Matrix, BLOCK, Q8_ROWS, ROW_TILE, TILE};

    /// [`super::quantize_block`] with AVX2, equal to it for finite inputs:
    /// the same products `x · (1/d)`, rounded half away from zero as
    /// `trunc(t) ± 1` where `|t − trunc(t)| ≥ 0.5` (that difference is exact).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_block_avx2(xs: &[f32], qs: &mut [i8]) -> (f32, i32) {
        assert!(xs.len() == BLOCK && qs.len() == BLOCK);
        // SAFETY: 32 readable f32 (checked above), unaligned loads.
        let v: [__m256; 4] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(xs.as_ptr().add(8 * i)) });
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let a = v.map(|x| _mm256_and_ps(x, abs_mask));
        let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_movehdup_ps(m));
        let (d, id) = block_scale(_mm_cvtss_f32(m));
        let (idv, half, one) = (_mm256_set1_ps(id), _mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
        let sign_mask = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MIN));
        let q = v.map(|x| {
            let t = _mm256_mul_ps(x, idv);
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(t);
            let away = _mm256_cmp_ps::<_CMP_GE_OQ>(_mm256_and_ps(_mm256_sub_ps(t, r), abs_mask), half);
            let step = _mm256_or_ps(_mm256_and_ps(t, sign_mask), one);
            _mm256_cvttps_epi32(_mm256_add_ps(r, _mm256_and_ps(away, step)))
        });
        let total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let total = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        let total = _mm_add_epi32(total, _mm_shuffle_epi32(total, 0b01_00_11_10));
        let total = _mm_add_epi32(total, _mm_shuffle_epi32(total, 0b10_11_00_01));
        // Packing interleaves 128-bit lanes; the permutation restores order.
        let packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        let packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: 32 writable bytes (checked above), unaligned store.
        unsafe { _mm256_storeu_si256(qs.as_mut_ptr().cast(), packed) };
        (d, _mm_cvtsi128_si32(total))
    }

    /// A tile's block (128 bytes, see [`Q4_1Matrix`]) as eight vectors of
    /// unsigned codes: vector `e` holds every column's weights `4e..4e + 4`,
    /// one column per 32-bit lane.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn unpack_tile_block(wq: &[u8]) -> [__m256i; 8] {
        assert!(wq.len() >= TILE * 16);
        let mask = _mm256_set1_epi8(0x0f);
        // SAFETY: 128 readable bytes (checked above), unaligned loads.
        let packed: [__m256i; 4] =
            std::array::from_fn(|e| unsafe { _mm256_loadu_si256(wq.as_ptr().add(e * 32).cast()) });
        std::array::from_fn(|e| {
            if e < 4 {
                _mm256_and_si256(packed[e], mask)
            } else {
                _mm256_and_si256(_mm256_srli_epi16(packed[e - 4], 4), mask)
            }
        })
    }

    /// One block's exact integer dots for the tile's eight columns, one
    /// per lane, with AVX2: activations `4e..4e + 4` broadcast to every
    /// lane meet weight vector `e`; pairs of bytes by `maddubs` (i16, at
    /// most 2·15·127 each), four of those summed in i16 (at most 15,240, no
    /// saturation), widened by `madd` against ones.
    ///
    /// # Safety
    /// `x` must point to 32 readable bytes (the row's block of codes).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn block_dots_avx2(w: &[__m256i; 8], x: *const i8) -> __m256i {
        // SAFETY: 32 readable bytes (the caller's contract), 4-byte
        // unaligned loads.
        let xq: [__m256i; 8] =
            std::array::from_fn(|e| unsafe { _mm256_set1_epi32(x.add(4 * e).cast::<i32>().read_unaligned()) });
        let ones = _mm256_set1_epi16(1);
        let half = |h: usize| {
            let p = |e: usize| _mm256_maddubs_epi16(w[e], xq[e]);
            let s = _mm256_add_epi16(_mm256_add_epi16(p(h), p(h + 1)), _mm256_add_epi16(p(h + 2), p(h + 3)));
            _mm256_madd_epi16(s, ones)
        };
        _mm256_add_epi32(half(0), half(4))
    }

    /// [`block_dots_avx2`] with `vpdpbusd`, in two chains, each reading
    /// its four activation bytes by an embedded broadcast (`{1to8}`: a
    /// plain load). Written in `asm!` because LLVM turns the broadcast into
    /// a `vmovd` and a shuffle, which made the kernel slower than one with
    /// horizontal adds.
    ///
    /// # Safety
    /// `x` must point to 32 readable bytes; the CPU must have AVX-512 VNNI
    /// and VL.
    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    #[inline]
    unsafe fn block_dots_vnni(w: &[__m256i; 8], x: *const i8) -> __m256i {
        let (mut a, mut b) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        for e in (0..8).step_by(2) {
            // SAFETY: reads 4 bytes at `x + 4e` and `x + 4e + 4`, inside
            // the caller's 32; VNNI and VL are enabled on this function.
            unsafe {
                std::arch::asm!(
                    "vpdpbusd {a}, {wa}, dword ptr [{p}]{{1to8}}",
                    "vpdpbusd {b}, {wb}, dword ptr [{p} + 4]{{1to8}}",
                    a = inout(ymm_reg) a,
                    b = inout(ymm_reg) b,
                    wa = in(ymm_reg) w[e],
                    wb = in(ymm_reg) w[e + 1],
                    p = in(reg) x.add(4 * e),
                    options(pure, readonly, nostack, preserves_flags),
                );
            }
        }
        _mm256_add_epi32(a, b)
    }

    /// The tiled kernel: the [`TILE`] columns of a tile, one per f32 lane.
    /// Per block, the column-interleaved codes meet four broadcast
    /// activations at a time, so each column's exact integer dot builds up
    /// in its own 32-bit lane (`$dots`; no horizontal adds). Each block's
    /// float term is computed lane-wise with candle's operations
    /// (`(Σq·d_w)·d_x + m_w·s_x`, no fused multiply-add) and added to the
    /// lane's running sum in block order: exactly candle's per-column
    /// arithmetic, eight columns at a time.
    ///
    /// Up to [`ROW_TILE`] activation rows share each unpacked weight block
    /// (`$rows::<R>`, `R` a constant so the accumulators stay in
    /// registers); every row's arithmetic is the same as alone (its own
    /// accumulator, blocks in order), so the bits do not depend on how many
    /// rows are computed together.
    macro_rules! tile_kernel {
        ($(#[$doc:meta])* $name:ident, $rows:ident, $features:literal, $dots:ident) => {
            $(#[$doc])*
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(w: &Q4_1Matrix, t: usize, acts: &Q8Acts, out: &mut OutColumns<'_>) {
                for r0 in (0..acts.m).step_by(ROW_TILE) {
                    match acts.m - r0 {
                        1 => $rows::<1>(w, t, acts, r0, out),
                        2 => $rows::<2>(w, t, acts, r0, out),
                        3 => $rows::<3>(w, t, acts, r0, out),
                        _ => $rows::<ROW_TILE>(w, t, acts, r0, out),
                    }
                }
            }

            #[target_feature(enable = $features)]
            fn $rows<const R: usize>(w: &Q4_1Matrix, t: usize, acts: &Q8Acts, r0: usize, out: &mut OutColumns<'_>) {
                let nb = w.k / BLOCK;
                let codes = &w.codes[t * nb * TILE * 16..(t + 1) * nb * TILE * 16];
                let (scale, min) =
                    (&w.scale[t * nb * TILE..(t + 1) * nb * TILE], &w.min[t * nb * TILE..(t + 1) * nb * TILE]);
                let rows = r0..r0 + R;
                // Each row's codes (`k` bytes), scales and sums (`nb` each).
                let x: [&[i8]; R] = std::array::from_fn(|i| &acts.codes[(r0 + i) * acts.k..][..nb * BLOCK]);
                let (xs, xm) = (&acts.scale[rows.start * nb..rows.end * nb], &acts.sum[rows.start * nb..rows.end * nb]);
                let mut acc = [_mm256_setzero_ps(); R];
                for b in 0..nb {
                    let wv = unpack_tile_block(&codes[b * TILE * 16..]);
                    let (ws, wm) = (load_f32(scale, b * TILE), load_f32(min, b * TILE));
                    for (i, acc) in acc.iter_mut().enumerate() {
                        // SAFETY: `x[i]` holds `nb` blocks of 32 codes.
                        let dots = unsafe { $dots(&wv, x[i].as_ptr().add(b * BLOCK)) };
                        let term = _mm256_add_ps(
                            _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dots), ws), _mm256_set1_ps(xs[i * nb + b])),
                            _mm256_mul_ps(wm, _mm256_set1_ps(xm[i * nb + b])),
                        );
                        *acc = _mm256_add_ps(*acc, term);
                    }
                }
                for (i, acc) in acc.iter().enumerate() {
                    // The tile's eight columns of a row are contiguous in the
                    // row-major output: one store.
                    let dst = out.row(r0 + i);
                    assert!(dst.len() == TILE, "a tile's view is TILE columns");
                    // SAFETY: `dst` holds 8 f32, unaligned store.
                    unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), *acc) };
                }
            }
        };
    }

    tile_kernel!(
        /// # Safety
        /// The CPU must support AVX2.
        tile_avx2, tile_rows_avx2, "avx2", block_dots_avx2
    );
    tile_kernel!(
        /// # Safety
        /// The CPU must support AVX2, AVX-512 VNNI and AVX-512 VL.
        tile_vnni, tile_rows_vnni, "avx2,avx512vnni,avx512vl", block_dots_vnni
    );

    #[target_feature(enable = "avx2")]
    #[inline]
    fn load_f32(x: &[f32], at: usize) -> __m256 {
        assert!(at + 8 <= x.len());
        // SAFETY: 8 readable f32 (checked above), unaligned load.
        unsafe { _mm256_loadu_ps(x.as_ptr().add(at)) }
    }

    /// The eight lanes summed in the kernels' fixed order:
    /// `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn lane_sum(v: __m256) -> f32 {
        let res = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
        let res = _mm_add_ps(res, _mm_movehl_ps(res, res));
        let res = _mm_add_ss(res, _mm_movehdup_ps(res));
        _mm_cvtss_f32(res)
    }

    /// [`super::min_terms`] with eight blocks per FMA: called directly from
    /// the AVX2 kernels, from elsewhere in `unsafe` after detection.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn min_terms_avx2(min: &[f32], xsum: &[f32]) -> f32 {
        assert_eq!(min.len(), xsum.len());
        let whole = min.len() / 8 * 8;
        let mut acc = _mm256_setzero_ps();
        for at in (0..whole).step_by(8) {
            // SAFETY: at + 8 <= whole <= len of both, unaligned loads.
            let (m, s) = unsafe { (_mm256_loadu_ps(min.as_ptr().add(at)), _mm256_loadu_ps(xsum.as_ptr().add(at))) };
            acc = _mm256_fmadd_ps(m, s, acc);
        }
        let mut total = lane_sum(acc);
        for (m, s) in min[whole..].iter().zip(&xsum[whole..]) {
            total += m * s;
        }
        total
    }

    /// A tile's pointers for the 8-bit kernels (block `b`'s vector `e` at
    /// `codes + (8b + e)·32`, its scales at `lo`/`hi + 8b`), after checking
    /// once per tile every bound the kernels' unchecked loads rely on: every
    /// row, every block of the tile. Without second-half scales `hi` is
    /// `lo`.
    #[derive(Clone, Copy)]
    struct TilePtrs {
        codes: *const i8,
        lo: *const f32,
        hi: *const f32,
    }

    fn tile_ptrs(w: &Q8Matrix, t: usize, acts: &Q8Acts, out: &OutColumns<'_>) -> TilePtrs {
        let (m, k) = (acts.m, acts.k);
        let nb = k / BLOCK;
        assert!(w.k == k && out.cols() <= TILE && nb * BLOCK == k && nb > 0);
        assert!(acts.codes.len() == m * k && acts.scale.len() == m * nb);
        let (codes, params) = ((t + 1) * nb * TILE * BLOCK, (t + 1) * nb * TILE);
        assert!(w.codes.len() >= codes && w.scale.len() >= params);
        let lo = w.scale[t * nb * TILE..].as_ptr();
        let hi = match &w.scale_hi {
            Some(h) => {
                assert!(h.len() >= params);
                h[t * nb * TILE..].as_ptr()
            }
            None => lo,
        };
        TilePtrs { codes: w.codes[t * nb * TILE * BLOCK..].as_ptr(), lo, hi }
    }

    /// Finishes rows `r0..r0 + R` of tile `t`: each live column's minimum
    /// terms added (K-quants with minimums), the values stored.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn store_tile<const R: usize>(
        acc: &[__m256; R],
        w: &Q8Matrix,
        t: usize,
        acts: &Q8Acts,
        r0: usize,
        out: &mut OutColumns<'_>,
    ) {
        let nb = acts.k / BLOCK;
        for (r, acc) in acc.iter().enumerate() {
            let row = r0 + r;
            if w.min.is_none() && out.cols() == TILE {
                let dst = out.row(row);
                assert!(dst.len() == TILE);
                // SAFETY: `dst` holds 8 f32, unaligned store.
                unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), *acc) };
                continue;
            }
            let mut v = [0f32; TILE];
            // SAFETY: `v` holds 8 f32, unaligned store.
            unsafe { _mm256_storeu_ps(v.as_mut_ptr(), *acc) };
            for (c, v) in v.iter().enumerate().take(out.cols()) {
                let j = t * TILE + c;
                let extra =
                    w.min.as_ref().map_or(0.0, |m| min_terms_avx2(&m[j * nb..(j + 1) * nb], acts.xsum_of(row, nb)));
                out.put(row, c, v + extra);
            }
        }
    }

    /// `acc = (lo_scales · d_x) × lo + acc`, then the same for the high
    /// halves: one block's float work for a tile row ([`super::matmul_q8`]).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn scale_block(acc: __m256, lo: __m256i, hi: __m256i, ws: (__m256, __m256), dx: f32) -> __m256 {
        let dx = _mm256_set1_ps(dx);
        let acc = _mm256_fmadd_ps(_mm256_mul_ps(ws.0, dx), _mm256_cvtepi32_ps(lo), acc);
        _mm256_fmadd_ps(_mm256_mul_ps(ws.1, dx), _mm256_cvtepi32_ps(hi), acc)
    }

    /// [`super::matmul_q8`] for tile `t`'s columns and every row, with AVX2
    /// (single-row decode on CPUs without VNNI, and everything there): per
    /// block, each weight vector's absolute values meet four broadcast
    /// activation codes signed by the weights (`maddubs`, no overflow:
    /// |codes| ≤ 127, or 128 meeting ±127), widened to one i32 per column.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_q8_avx2(w: &Q8Matrix, t: usize, acts: &Q8Acts, out: &mut OutColumns<'_>) {
        let ptrs = tile_ptrs(w, t, acts, out);
        for r in 0..acts.m {
            row_q8_avx2(w, t, ptrs, acts, r, out);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn row_q8_avx2(w: &Q8Matrix, t: usize, ptrs: TilePtrs, acts: &Q8Acts, row: usize, out: &mut OutColumns<'_>) {
        let (k, nb) = (acts.k, acts.k / BLOCK);
        let TilePtrs { codes, lo, hi } = ptrs;
        assert!(row < acts.m);
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        for b in 0..nb {
            // SAFETY: block b < nb of the tile and of row `row` < m (the
            // activations' and tile's sizes checked by `tile_ptrs`, the row
            // above); unaligned loads.
            let (dots, ws, dx) = unsafe {
                let xp = acts.codes.as_ptr().add(row * k + b * BLOCK);
                let dots: [__m256i; 8] = std::array::from_fn(|e| {
                    let wv = _mm256_loadu_si256(codes.add((b * 8 + e) * 32).cast());
                    let xv = _mm256_set1_epi32(xp.add(4 * e).cast::<i32>().read_unaligned());
                    _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv)), ones)
                });
                let ws = (_mm256_loadu_ps(lo.add(b * TILE)), _mm256_loadu_ps(hi.add(b * TILE)));
                (dots, ws, *acts.scale.as_ptr().add(row * nb + b))
            };
            let l = _mm256_add_epi32(_mm256_add_epi32(dots[0], dots[1]), _mm256_add_epi32(dots[2], dots[3]));
            let h = _mm256_add_epi32(_mm256_add_epi32(dots[4], dots[5]), _mm256_add_epi32(dots[6], dots[7]));
            acc = scale_block(acc, l, h, ws, dx);
        }
        store_tile(&[acc], w, t, acts, row, out);
    }

    /// [`super::matmul_q8`] for tile `t`'s columns and every row, with
    /// AVX-512 VNNI: per block, the eight weight vectors offset to unsigned
    /// bytes (`xor 0x80`) are shared by [`Q8_ROWS`] rows; each row's two
    /// chains of four `vpdpbusd` (the block's halves) start at the row's
    /// correction `−128 · Σ codes` of the half (`sums`, precomputed) and read the
    /// activations by embedded broadcast, so the integer dots equal
    /// [`tile_q8_avx2`]'s exactly.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA, AVX-512 VNNI and AVX-512 VL.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vnni,avx512vl")]
    pub(super) unsafe fn tile_q8_vnni(w: &Q8Matrix, t: usize, acts: &Q8Acts, sums: &[i32], out: &mut OutColumns<'_>) {
        let m = acts.m;
        let ptrs = tile_ptrs(w, t, acts, out);
        assert!(sums.len() == 2 * m * (acts.k / BLOCK));
        let mut r0 = 0;
        while r0 < m {
            match m - r0 {
                1 => rows_q8_vnni::<1>(w, t, ptrs, acts, sums, r0, out),
                2 => rows_q8_vnni::<2>(w, t, ptrs, acts, sums, r0, out),
                3 => rows_q8_vnni::<3>(w, t, ptrs, acts, sums, r0, out),
                _ => rows_q8_vnni::<Q8_ROWS>(w, t, ptrs, acts, sums, r0, out),
            }
            r0 += Q8_ROWS;
        }
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512vnni,avx512vl")]
    #[inline]
    fn rows_q8_vnni<const R: usize>(
        w: &Q8Matrix,
        t: usize,
        ptrs: TilePtrs,
        acts: &Q8Acts,
        sums: &[i32],
        r0: usize,
        out: &mut OutColumns<'_>,
    ) {
        let (k, nb) = (acts.k, acts.k / BLOCK);
        let TilePtrs { codes, lo, hi } = ptrs;
        assert!(r0 + R <= acts.m && sums.len() == 2 * acts.m * nb);
        let flip = _mm256_set1_epi8(-128);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            // SAFETY: block b < nb of the tile (checked by `tile_ptrs`);
            // unaligned loads.
            let (wv, ws): ([__m256i; 8], _) = unsafe {
                (
                    std::array::from_fn(|e| {
                        _mm256_xor_si256(_mm256_loadu_si256(codes.add((b * 8 + e) * 32).cast()), flip)
                    }),
                    (_mm256_loadu_ps(lo.add(b * TILE)), _mm256_loadu_ps(hi.add(b * TILE))),
                )
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                let ab = (r0 + r) * nb + b;
                let mut l = _mm256_set1_epi32(sums[2 * ab]);
                let mut h = _mm256_set1_epi32(sums[2 * ab + 1]);
                // SAFETY: row r0 + r < m (asserted above) and block b < nb
                // (sizes checked by `tile_ptrs`): the 32 bytes at `xp` are the row's block;
                // VNNI and VL are enabled on this function.
                let dx = unsafe {
                    let xp = acts.codes.as_ptr().add((r0 + r) * k + b * BLOCK);
                    std::arch::asm!(
                        "vpdpbusd {l}, {w0}, dword ptr [{p}]{{1to8}}",
                        "vpdpbusd {h}, {w4}, dword ptr [{p} + 16]{{1to8}}",
                        "vpdpbusd {l}, {w1}, dword ptr [{p} + 4]{{1to8}}",
                        "vpdpbusd {h}, {w5}, dword ptr [{p} + 20]{{1to8}}",
                        "vpdpbusd {l}, {w2}, dword ptr [{p} + 8]{{1to8}}",
                        "vpdpbusd {h}, {w6}, dword ptr [{p} + 24]{{1to8}}",
                        "vpdpbusd {l}, {w3}, dword ptr [{p} + 12]{{1to8}}",
                        "vpdpbusd {h}, {w7}, dword ptr [{p} + 28]{{1to8}}",
                        l = inout(ymm_reg) l,
                        h = inout(ymm_reg) h,
                        w0 = in(ymm_reg) wv[0],
                        w1 = in(ymm_reg) wv[1],
                        w2 = in(ymm_reg) wv[2],
                        w3 = in(ymm_reg) wv[3],
                        w4 = in(ymm_reg) wv[4],
                        w5 = in(ymm_reg) wv[5],
                        w6 = in(ymm_reg) wv[6],
                        w7 = in(ymm_reg) wv[7],
                        p = in(reg) xp,
                        options(pure, readonly, nostack, preserves_flags),
                    );
                    *acts.scale.as_ptr().add(ab)
                };
                *acc = scale_block(*acc, l, h, ws, dx);
            }
        }
        store_tile(&acc, w, t, acts, r0, out);
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    /// Every kernel gives bit-identical results to candle's Q4_1 matmul, for
    /// awkward sizes: rows not a multiple of 4, columns not a multiple of the
    /// task width, K not a multiple of 256 (576 is the default model's).
    #[test]
    fn every_kernel_matches_candle_bit_for_bit_on_awkward_sizes() {
        let dev = Device::Cpu;
        // (candle itself asserts an even block count, so K is 64·j here.)
        for (n, k) in [(1, 64), (3, 128), (33, 192), (70, 576), (17, 1536)] {
            let wf = Tensor::from_vec(rand(n * k, (n * k) as u64), (n, k), &dev).unwrap();
            let q = QTensor::quantize(&wf, GgmlDType::Q4_1).unwrap();
            let ours = Q4_1Matrix::from_ggml_bytes(&q.data().unwrap(), n, k).unwrap();
            let theirs = QMatMul::from_qtensor(q).unwrap();
            for m in [1, 2, 3, 4, 5, 7, 8, 9, 17, 70] {
                let x = rand(m * k, (m * 1000 + k) as u64);
                let expected: Vec<f32> = theirs
                    .forward(&Tensor::from_vec(x.clone(), (m, k), &dev).unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni].into_iter().filter(|i| i.available()) {
                    let got = matmul(&ours, &x, m, isa).unwrap();
                    let same = got.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{isa:?} n={n} k={k} m={m}: {:?} vs {:?}",
                        &got[..got.len().min(4)],
                        &expected[..4.min(expected.len())]
                    );
                }
            }
        }
    }

    /// Many parallel runs, a last run shorter than the others, a last
    /// partial group (8-bit) and a last partial tile (Q4_1): every kernel
    /// writes exactly its columns of the row-major result, and the bits
    /// equal the scalar reference's.
    #[test]
    fn runs_of_columns_land_in_their_place_in_the_row_major_result() {
        let (n, k) = (1001, 64);
        let wf = Tensor::from_vec(rand(n * k, 5), (n, k), &Device::Cpu).unwrap();
        let q4 = QTensor::quantize(&wf, GgmlDType::Q4_1).unwrap();
        let w4 = Q4_1Matrix::from_ggml_bytes(&q4.data().unwrap(), n, k).unwrap();
        let q8 = QTensor::quantize(&wf, GgmlDType::Q8_0).unwrap();
        let w8 = Q8Matrix::from_ggml_bytes(&q8.data().unwrap(), n, k).unwrap();
        for m in [1, 2, 5, 17] {
            let x = rand(m * k, m as u64);
            let (want4, want8) =
                (matmul(&w4, &x, m, Isa::Scalar).unwrap(), matmul_q8(&w8, &x, m, Isa::Scalar).unwrap());
            assert_eq!(want8.len(), m * n);
            for isa in [Isa::Avx2, Isa::Avx512Vnni].into_iter().filter(|i| i.available()) {
                let got4 = matmul(&w4, &x, m, isa).unwrap();
                let got8 = matmul_q8(&w8, &x, m, isa).unwrap();
                for (name, got, want) in [("q4_1", &got4, &want4), ("q8_0", &got8, &want8)] {
                    let bad = got.iter().zip(want.iter()).position(|(a, b)| a.to_bits() != b.to_bits());
                    assert!(bad.is_none(), "{name} {isa:?} m={m}: first difference at {bad:?}");
                }
            }
        }
    }

    /// Batch invariance: row `r` of an `m`-row product has the bits of the
    /// same row computed alone, for every row count up to 64 and beyond a
    /// row tile, on every instruction set.
    #[test]
    fn each_row_is_bit_identical_to_the_row_computed_alone() {
        let (n, k) = (40, 192);
        let wf = Tensor::from_vec(rand(n * k, 91), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&wf, GgmlDType::Q4_1).unwrap();
        let w = Q4_1Matrix::from_ggml_bytes(&q.data().unwrap(), n, k).unwrap();
        let q8 = QTensor::quantize(&wf, GgmlDType::Q8_0).unwrap();
        let w8 = Q8Matrix::from_ggml_bytes(&q8.data().unwrap(), n, k).unwrap();
        let x = rand(67 * k, 17);
        for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni].into_iter().filter(|i| i.available()) {
            let alone: Vec<Vec<f32>> = (0..67).map(|r| matmul(&w, &x[r * k..(r + 1) * k], 1, isa).unwrap()).collect();
            let alone8: Vec<Vec<f32>> =
                (0..67).map(|r| matmul_q8(&w8, &x[r * k..(r + 1) * k], 1, isa).unwrap()).collect();
            for m in (1..=64).chain([67]) {
                let got = matmul(&w, &x[..m * k], m, isa).unwrap();
                let got8 = matmul_q8(&w8, &x[..m * k], m, isa).unwrap();
                for r in 0..m {
                    let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same(&got[r * n..(r + 1) * n], &alone[r]), "Q4_1 {isa:?} m={m} row {r}");
                    assert!(same(&got8[r * n..(r + 1) * n], &alone8[r]), "Q8_0 {isa:?} m={m} row {r}");
                }
            }
        }
    }

    /// Every 8-bit format against candle's quantized matmul, which
    /// quantizes activations as GGML does: Q8_0 per 32 for Q8_0, Q4_0 and
    /// Q5_0, Q8_K per 256 for the K-quants. Only the summation order
    /// differs, so the results agree to float rounding (with activations
    /// quantized per 32 for a K-quant they would not: ~1e-2).
    #[test]
    fn eight_bit_kernels_match_candle() {
        let dev = Device::Cpu;
        let cases = [
            (GgmlDType::Q8_0, 1, 64),
            (GgmlDType::Q8_0, 37, 96),
            (GgmlDType::Q8_0, 70, 576),
            (GgmlDType::Q4_0, 19, 128),
            (GgmlDType::Q5_0, 19, 128),
            (GgmlDType::Q4K, 17, 512),
            (GgmlDType::Q5K, 9, 256),
            (GgmlDType::Q6K, 17, 768),
        ];
        for (dtype, n, k) in cases {
            let wf = Tensor::from_vec(rand(n * k, (n * k) as u64 + 3), (n, k), &dev).unwrap();
            let q = QTensor::quantize(&wf, dtype).unwrap();
            let ours = Q8Matrix::from_ggml(dtype, &q.data().unwrap(), n, k).unwrap();
            let theirs = QMatMul::from_qtensor(q).unwrap();
            for m in [1, 3, 6] {
                let x = rand(m * k, (m * 77 + k) as u64);
                let expected: Vec<f32> = theirs
                    .forward(&Tensor::from_vec(x.clone(), (m, k), &dev).unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni].into_iter().filter(|i| i.available()) {
                    let got = matmul_q8(&ours, &x, m, isa).unwrap();
                    for (a, b) in got.iter().zip(&expected) {
                        // The same products, summed in another order (exact
                        // integer dots per half block here, float lanes of
                        // four in candle): equal within rounding. Bit
                        // equality across instruction sets is checked
                        // against the scalar reference elsewhere.
                        assert!(
                            (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                            "{dtype:?} {isa:?} n={n} k={k} m={m}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    /// Shapes candle cannot check (an odd number of blocks per row, tiles
    /// with and without a partial tail): every SIMD kernel equals the
    /// scalar reference bit for bit, and stacking matrices equals running
    /// them apart.
    #[test]
    fn simd_kernels_equal_the_scalar_reference_and_stacking_changes_nothing() {
        let quantize = |n: usize, k: usize, seed: u64| {
            let wf = Tensor::from_vec(rand(n * k, seed), (n, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&wf, GgmlDType::Q4_1).unwrap();
            Q4_1Matrix::from_ggml_bytes(&q.data().unwrap(), n, k).unwrap()
        };
        for k in [32, 96, 160, 576] {
            for n in [1, 7, 8, 9, 16, 17, 41] {
                let w = quantize(n, k, (n * 31 + k) as u64);
                for m in [1, 2, 3, 5, 8] {
                    let x = rand(m * k, (m * 7 + k) as u64);
                    let reference = matmul(&w, &x, m, Isa::Scalar).unwrap();
                    for isa in [Isa::Avx2, Isa::Avx512Vnni].into_iter().filter(|i| i.available()) {
                        let got = matmul(&w, &x, m, isa).unwrap();
                        assert!(
                            got.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{isa:?} n={n} k={k} m={m}"
                        );
                    }
                }
            }
        }
        let (a, b) = (quantize(13, 96, 1), quantize(24, 96, 2));
        let x = rand(3 * 96, 5);
        let (ya, yb) = (matmul(&a, &x, 3, Isa::detect()).unwrap(), matmul(&b, &x, 3, Isa::detect()).unwrap());
        let both = Q4_1Matrix::stack(vec![a, b]).unwrap();
        let y = matmul(&both, &x, 3, Isa::detect()).unwrap();
        for r in 0..3 {
            assert_eq!(y[r * 37..r * 37 + 13], ya[r * 13..(r + 1) * 13]);
            assert_eq!(y[r * 37 + 13..(r + 1) * 37], yb[r * 24..(r + 1) * 24]);
        }
    }

    /// The SIMD quantizer equals the scalar one, ties and zeros included.
    #[test]
    fn activation_quantization_is_the_same_with_and_without_simd() {
        let mut x = rand(32 * 64, 11);
        // Exact ties after scaling: with max 127 the scale is 1.
        x[..32].copy_from_slice(&std::array::from_fn::<f32, 32, _>(|i| i as f32 - 15.5));
        x[31] = 127.0;
        x[32..64].fill(0.0);
        x[64..96].iter_mut().enumerate().for_each(|(i, v)| *v = if i % 2 == 0 { -1e-30 } else { 2.5 });
        for (xs, b) in x.chunks_exact(32).zip(0..) {
            let mut a = [0i8; 32];
            let expected = quantize_block(xs, &mut a);
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                let mut s = [0i8; 32];
                #[allow(unsafe_code)]
                // SAFETY: AVX2 detected.
                let got = unsafe { x86::quantize_block_avx2(xs, &mut s) };
                assert_eq!((got.0.to_bits(), got.1, s), (expected.0.to_bits(), expected.1, a), "block {b}");
            }
        }
    }

    #[test]
    fn bad_shapes_are_typed_errors() {
        assert!(Q4_1Matrix::from_ggml_bytes(&[0; 20], 1, 33).is_err());
        assert!(Q4_1Matrix::from_ggml_bytes(&[0; 19], 1, 32).is_err());
        let w = Q4_1Matrix::from_ggml_bytes(&[0; 20], 1, 32).unwrap();
        assert!(matmul(&w, &[0.0; 31], 1, Isa::Scalar).is_err());
    }

    /// Every type the 8-bit kernel takes, with a shape it fits.
    const FORMATS: [(GgmlDType, usize); 6] = [
        (GgmlDType::Q8_0, 96),
        (GgmlDType::Q4_0, 96),
        (GgmlDType::Q5_0, 160),
        (GgmlDType::Q4K, 512),
        (GgmlDType::Q5K, 256),
        (GgmlDType::Q6K, 768),
    ];

    fn q8_of(dtype: GgmlDType, n: usize, k: usize, seed: u64) -> (Q8Matrix, QTensor) {
        let wf = Tensor::from_vec(rand(n * k, seed), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&wf, dtype).unwrap();
        (Q8Matrix::from_ggml(dtype, &q.data().unwrap(), n, k).unwrap(), q)
    }

    #[test]
    fn every_format_unpacks_to_ggml_values_bit_for_bit() {
        for (dtype, k) in FORMATS {
            let n = 5;
            let (ours, q) = q8_of(dtype, n, k, k as u64 + 1);
            let theirs: Vec<Vec<f32>> = q.dequantize(&Device::Cpu).unwrap().to_vec2().unwrap();
            let mut row = vec![0f32; k];
            for (r, want) in theirs.iter().enumerate() {
                ours.dequantize_row(r, &mut row);
                let same = row.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0));
                assert!(same, "{dtype:?} row {r}: {:?} vs {:?}", &row[..8], &want[..8]);
            }
        }
    }

    /// Awkward shapes for every format: every instruction set gives the
    /// scalar reference's bits, each row's bits are its bits alone, and the
    /// result is the dequantized matmul up to the activations' rounding.
    #[test]
    fn eight_bit_kernels_equal_the_reference_and_rows_are_batch_invariant() {
        for (dtype, k) in FORMATS {
            for n in [1, 9, 17] {
                let (w, q) = q8_of(dtype, n, k, (n * 13 + k) as u64);
                let dense: Vec<Vec<f32>> = q.dequantize(&Device::Cpu).unwrap().to_vec2().unwrap();
                let x = rand(19 * k, (n + k) as u64);
                let alone: Vec<Vec<f32>> =
                    (0..19).map(|r| matmul_q8(&w, &x[r * k..(r + 1) * k], 1, Isa::Scalar).unwrap()).collect();
                for m in [1, 2, 3, 7, 8, 9, 19] {
                    for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni].into_iter().filter(|i| i.available()) {
                        let got = matmul_q8(&w, &x[..m * k], m, isa).unwrap();
                        for r in 0..m {
                            let row = &got[r * n..(r + 1) * n];
                            let same = row.iter().zip(&alone[r]).all(|(a, b)| a.to_bits() == b.to_bits());
                            assert!(same, "{dtype:?} {isa:?} n={n} m={m} row {r}: {row:?} vs {:?}", alone[r]);
                        }
                    }
                }
                for (r, want) in alone.iter().enumerate().take(3) {
                    for (j, &got) in want.iter().enumerate() {
                        let exact: f32 = dense[j].iter().zip(&x[r * k..(r + 1) * k]).map(|(a, b)| a * b).sum();
                        let scale: f32 = dense[j].iter().map(|v| v.abs()).sum::<f32>() / 64.0;
                        assert!((got - exact).abs() <= scale, "{dtype:?} row {r} col {j}: {got} vs {exact}");
                    }
                }
            }
        }
    }

    /// Matrices whose activations are quantized alike stack (q, k and v of
    /// Gemma-3 are Q5_0 and Q8_0); a K-quant beside a 32-block format does
    /// not (its activations are Q8_K), and the model keeps those apart.
    #[test]
    fn stacking_eight_bit_formats_changes_no_output() {
        let k = 256;
        let groups =
            [[GgmlDType::Q5_0, GgmlDType::Q8_0, GgmlDType::Q4_0], [GgmlDType::Q6K, GgmlDType::Q4K, GgmlDType::Q5K]];
        let x = rand(3 * k, 9);
        for parts in groups {
            let mut apart = Vec::new();
            let mut matrices = Vec::new();
            for (i, dtype) in parts.into_iter().enumerate() {
                let (w, _) = q8_of(dtype, 8 + i, k, i as u64);
                apart.push(matmul_q8(&w, &x, 3, Isa::detect()).unwrap());
                matrices.push(w);
            }
            assert!(Q8Matrix::stackable(&parts));
            let both = Q8Matrix::stack(matrices).unwrap();
            let y = matmul_q8(&both, &x, 3, Isa::detect()).unwrap();
            let n = both.rows();
            for r in 0..3 {
                let mut at = 0;
                for (i, a) in apart.iter().enumerate() {
                    let w = 8 + i;
                    let same = y[r * n + at..r * n + at + w]
                        .iter()
                        .zip(&a[r * w..(r + 1) * w])
                        .all(|(p, q)| p.to_bits() == q.to_bits());
                    assert!(same, "{parts:?} part {i} row {r}");
                    at += w;
                }
            }
        }
        let mixed = [GgmlDType::Q8_0, GgmlDType::Q4K];
        assert!(!Q8Matrix::stackable(&mixed));
        let matrices = mixed.into_iter().map(|d| q8_of(d, 8, k, 1).0).collect();
        assert!(Q8Matrix::stack(matrices).is_err(), "a K-quant and Q8_0 quantize activations differently");
        assert!(Q8Matrix::from_ggml(GgmlDType::Q4K, &[0; 144], 1, 128).is_err(), "K-quants need rows of 256");
        assert!(Q8Matrix::from_ggml(GgmlDType::Q5_1, &[0; 24], 1, 32).is_err());
    }
}
