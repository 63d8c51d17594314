//! Quantized matmul kernels for Q4_1 weights (the default model's type).
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
//!   or AVX-512 VNNI `dpbusd` on 256-bit lanes), from unpacking each weight
//!   block once for up to four activation rows (so batched decode and prefill
//!   reuse every weight load), and from splitting output columns over the one
//!   rayon pool. The instruction set is picked at run time
//!   (`is_x86_feature_detected!`); a scalar path runs everywhere and is the
//!   reference.
//!
//! Weights are re-laid out once at load: codes, scales and minimums in three
//! flat arrays (scales as f32, which is exact for f16 values).

use rayon::prelude::*;

use crate::error::{Error, Result};

/// Weights per block.
pub const BLOCK: usize = 32;
/// Activation rows that share one unpacked weight block.
const ROWS: usize = 4;
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
                    && std::is_x86_feature_detected!("avx2")
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
pub struct Q4_1Matrix {
    n: usize,
    k: usize,
    /// `n * k / 2` bytes: per block, byte `j` holds weight `j` (low nibble)
    /// and weight `j + 16` (high nibble).
    codes: Vec<u8>,
    scale: Vec<f32>,
    min: Vec<f32>,
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
        let mut codes = Vec::with_capacity(blocks * 16);
        let mut scale = Vec::with_capacity(blocks);
        let mut min = Vec::with_capacity(blocks);
        for b in bytes.chunks_exact(20) {
            scale.push(half::f16::from_le_bytes([b[0], b[1]]).to_f32());
            min.push(half::f16::from_le_bytes([b[2], b[3]]).to_f32());
            codes.extend_from_slice(&b[4..20]);
        }
        Ok(Self { n, k, codes, scale, min })
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
        let mut out = Self { n: 0, k, codes: Vec::new(), scale: Vec::new(), min: Vec::new() };
        for p in parts {
            out.n += p.n;
            out.codes.extend(p.codes);
            out.scale.extend(p.scale);
            out.min.extend(p.min);
        }
        Ok(out)
    }

    /// Output size.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input size.
    pub fn cols(&self) -> usize {
        self.k
    }
}

/// Activations quantized to Q8_1, `[m, k]`.
pub struct Q8Acts {
    m: usize,
    k: usize,
    codes: Vec<i8>,
    /// The f16-rounded scale of each block, as f32.
    scale: Vec<f32>,
    /// The f16 `s = f16(Σq) · d` of each block, as f32.
    sum: Vec<f32>,
}

impl Q8Acts {
    /// Quantizes `x` (`[m, k]`, row major) exactly as candle's
    /// `BlockQ8_1::from_float` does.
    pub fn quantize(x: &[f32], m: usize, k: usize) -> Self {
        debug_assert_eq!(x.len(), m * k);
        let blocks = m * k / BLOCK;
        let mut codes = vec![0i8; m * k];
        let mut scale = Vec::with_capacity(blocks);
        let mut sum = Vec::with_capacity(blocks);
        for (xs, qs) in x.chunks_exact(BLOCK).zip(codes.chunks_exact_mut(BLOCK)) {
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let d16 = half::f16::from_f32(d);
            let mut total = 0i32;
            for (q, v) in qs.iter_mut().zip(xs) {
                *q = (v * id).round() as i8;
                total += i32::from(*q);
            }
            scale.push(d16.to_f32());
            sum.push((half::f16::from_f32(total as f32) * d16).to_f32());
        }
        Self { m, k, codes, scale, sum }
    }
}

/// `x[m, k] · Wᵀ` → `[m, n]`, on the one rayon pool.
///
/// # Errors
/// [`Error::InvalidBatch`] if `x` is not `m * k` long, or `isa` is not
/// available on this CPU.
pub fn matmul(w: &Q4_1Matrix, x: &[f32], m: usize, isa: Isa) -> Result<Vec<f32>> {
    check_call(x, m, w.k, isa)?;
    let acts = Q8Acts::quantize(x, m, w.k);
    Ok(par_columns(w.n, m, |j, col| column(w, j, &acts, isa, col)))
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

/// Runs `column(j, out)` for every output column `j < n` (each filling the
/// `m` outputs of that column) on the one rayon pool, and returns the
/// row-major `[m, n]` result.
fn par_columns(n: usize, m: usize, column: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    // Column-major result: each task owns a contiguous run of columns.
    let mut out_t = vec![0f32; n * m];
    let per_task = n.div_ceil(rayon::current_num_threads() * TASKS_PER_THREAD).max(MIN_COLS_PER_TASK);
    out_t.par_chunks_mut(per_task * m).enumerate().for_each(|(task, chunk)| {
        for (c, col) in chunk.chunks_exact_mut(m).enumerate() {
            column(task * per_task + c, col);
        }
    });
    let mut out = vec![0f32; m * n];
    for (j, col) in out_t.chunks_exact(m).enumerate() {
        for (r, v) in col.iter().enumerate() {
            out[r * n + j] = *v;
        }
    }
    out
}

/// A Q8_0 weight matrix `[n, k]` (32 weights per block: f16 scale, 32 i8
/// codes), re-laid out for the kernels. The default model's token
/// embedding, which is also its output projection, is Q8_0.
pub struct Q8_0Matrix {
    n: usize,
    k: usize,
    codes: Vec<i8>,
    scale: Vec<f32>,
}

impl std::fmt::Debug for Q8_0Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q8_0Matrix").field("n", &self.n).field("k", &self.k).finish_non_exhaustive()
    }
}

impl Q8_0Matrix {
    /// Parses GGUF Q8_0 block bytes (34 per block: f16 d, 32 codes) of an
    /// `[n, k]` matrix.
    ///
    /// # Errors
    /// [`Error::InvalidBatch`] if `k` is not a multiple of 32 or the byte
    /// count does not match.
    pub fn from_ggml_bytes(bytes: &[u8], n: usize, k: usize) -> Result<Self> {
        if !k.is_multiple_of(BLOCK) || bytes.len() != n * (k / BLOCK) * 34 {
            return Err(Error::InvalidBatch(format!("Q8_0 data of {} bytes does not fit [{n}, {k}]", bytes.len())));
        }
        let mut codes = Vec::with_capacity(n * k);
        let mut scale = Vec::with_capacity(n * k / BLOCK);
        for b in bytes.chunks_exact(34) {
            scale.push(half::f16::from_le_bytes([b[0], b[1]]).to_f32());
            codes.extend(b[2..34].iter().map(|&c| c as i8));
        }
        Ok(Self { n, k, codes, scale })
    }

    /// Output size.
    pub fn rows(&self) -> usize {
        self.n
    }
}

/// `x[m, k] · Wᵀ` → `[m, n]` for Q8_0 weights. Bit-identical to candle's
/// Q8_0 matmul on the same instruction-set class: the AVX2 and VNNI kernels
/// follow candle's AVX2 path (per-lane fused multiply-add across blocks,
/// then its horizontal sum), the scalar kernel its portable path.
///
/// # Errors
/// As [`matmul`].
pub fn matmul_q8_0(w: &Q8_0Matrix, x: &[f32], m: usize, isa: Isa) -> Result<Vec<f32>> {
    check_call(x, m, w.k, isa)?;
    let acts = Q8Acts::quantize(x, m, w.k);
    Ok(par_columns(w.n, m, |j, col| column_q8_0(w, j, &acts, isa, col)))
}

#[allow(unsafe_code)] // dispatch into the SIMD kernels below
fn column_q8_0(w: &Q8_0Matrix, j: usize, acts: &Q8Acts, isa: Isa, out: &mut [f32]) {
    let nb = w.k / BLOCK;
    let (codes, scale) = (&w.codes[j * w.k..(j + 1) * w.k], &w.scale[j * nb..(j + 1) * nb]);
    for (r, o) in out.iter_mut().enumerate() {
        let x = &acts.codes[r * acts.k..(r + 1) * acts.k];
        let xs = &acts.scale[r * nb..(r + 1) * nb];
        *o = match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `matmul_q8_0` checked `isa.available()` (AVX2; FMA is
            // implied on every CPU with AVX-512 VNNI and checked for AVX2).
            Isa::Avx2 | Isa::Avx512Vnni if std::is_x86_feature_detected!("fma") => unsafe {
                x86::dot_q8_0_avx2(codes, scale, x, xs)
            },
            _ => (0..nb)
                .map(|b| {
                    let sumi: i32 =
                        (0..BLOCK).map(|i| i32::from(codes[b * BLOCK + i]) * i32::from(x[b * BLOCK + i])).sum();
                    (b, sumi)
                })
                .fold(0f32, |acc, (b, sumi)| acc + sumi as f32 * (scale[b] * xs[b])),
        };
    }
}

/// One output column (weight row `j`) for every activation row.
#[allow(unsafe_code)] // dispatch into the SIMD kernels below
fn column(w: &Q4_1Matrix, j: usize, acts: &Q8Acts, isa: Isa, out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `matmul` checked `isa.available()`, so the CPU has AVX2.
        Isa::Avx2 => unsafe { x86::column_avx2(w, j, acts, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX2, AVX-512 VNNI and AVX-512 VL.
        Isa::Avx512Vnni => unsafe { x86::column_vnni(w, j, acts, out) },
        _ => column_scalar(w, j, acts, out),
    }
}

/// The body every instruction set shares: for each group of up to four
/// activation rows, walk the weight row's blocks once, get the exact integer
/// dot of each block with `$dots` (which fills `sumi` for `rows` rows), and
/// add the float terms block by block in candle's order.
macro_rules! column_body {
    ($w:expr, $j:expr, $acts:expr, $out:expr, $dots:expr) => {{
        let (w, j, acts, out): (&Q4_1Matrix, usize, &Q8Acts, &mut [f32]) = ($w, $j, $acts, $out);
        let nb = w.k / BLOCK;
        let codes = &w.codes[j * nb * 16..(j + 1) * nb * 16];
        let (scale, min) = (&w.scale[j * nb..(j + 1) * nb], &w.min[j * nb..(j + 1) * nb]);
        for r0 in (0..acts.m).step_by(ROWS) {
            let rows = ROWS.min(acts.m - r0);
            let mut sumf = [0f32; ROWS];
            for b in 0..nb {
                let mut sumi = [0i32; ROWS];
                let wq = &codes[b * 16..(b + 1) * 16];
                let x0 = (r0 * acts.k) + b * BLOCK;
                $dots(wq, &acts.codes, x0, acts.k, rows, &mut sumi);
                for r in 0..rows {
                    let ab = (r0 + r) * nb + b;
                    // Same operations, same order as candle's vec_dot.
                    sumf[r] += sumi[r] as f32 * scale[b] * acts.scale[ab] + min[b] * acts.sum[ab];
                }
            }
            out[r0..r0 + rows].copy_from_slice(&sumf[..rows]);
        }
    }};
}

/// Integer dots of one weight block with `rows` activation blocks starting
/// at `x0`, `stride` apart.
fn dots_scalar(wq: &[u8], x: &[i8], x0: usize, stride: usize, rows: usize, sumi: &mut [i32; ROWS]) {
    for (r, s) in sumi.iter_mut().enumerate().take(rows) {
        let x = &x[x0 + r * stride..][..BLOCK];
        *s = (0..16)
            .map(|j| i32::from(wq[j] & 0x0f) * i32::from(x[j]) + i32::from(wq[j] >> 4) * i32::from(x[j + 16]))
            .sum();
    }
}

fn column_scalar(w: &Q4_1Matrix, j: usize, acts: &Q8Acts, out: &mut [f32]) {
    column_body!(w, j, acts, out, dots_scalar)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)] // SIMD intrinsics; every block documents its safety
mod x86 {
    use std::arch::x86_64::*;

    use super::{Q4_1Matrix, Q8Acts, BLOCK, ROWS};

    /// The 32 weight codes of a block as unsigned bytes in element order.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn unpack(wq: &[u8]) -> __m256i {
        assert!(wq.len() >= 16);
        // SAFETY: 16 readable bytes (checked above), unaligned load.
        let packed = unsafe { _mm_loadu_si128(wq.as_ptr().cast()) };
        let mask = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(packed, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
        _mm256_set_m128i(hi, lo)
    }

    /// Sum of the eight i32 lanes.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn hsum(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    fn load(x: &[i8], at: usize) -> __m256i {
        assert!(at + BLOCK <= x.len());
        // SAFETY: 32 readable bytes (checked above), unaligned load.
        unsafe { _mm256_loadu_si256(x.as_ptr().add(at).cast()) }
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    fn dots_avx2(wq: &[u8], x: &[i8], x0: usize, stride: usize, rows: usize, sumi: &mut [i32; ROWS]) {
        let w = unpack(wq);
        let ones = _mm256_set1_epi16(1);
        for (r, s) in sumi.iter_mut().enumerate().take(rows) {
            let a = load(x, x0 + r * stride);
            // u8 × i8 pairs summed to i16 (at most 2·15·128: no saturation),
            // then pairs of i16 summed to i32.
            *s = hsum(_mm256_madd_epi16(_mm256_maddubs_epi16(w, a), ones));
        }
    }

    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    #[inline]
    fn dots_vnni(wq: &[u8], x: &[i8], x0: usize, stride: usize, rows: usize, sumi: &mut [i32; ROWS]) {
        let w = unpack(wq);
        for (r, s) in sumi.iter_mut().enumerate().take(rows) {
            let a = load(x, x0 + r * stride);
            *s = hsum(_mm256_dpbusd_epi32(_mm256_setzero_si256(), w, a));
        }
    }

    /// Sums of the eight i32 lanes of each of eight vectors, as one vector
    /// (`[Σv0, …, Σv7]`); integer sums, so exact in any order.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn sum8(v: &[__m256i; 8]) -> __m256i {
        let h01 = _mm256_hadd_epi32(v[0], v[1]);
        let h23 = _mm256_hadd_epi32(v[2], v[3]);
        let h45 = _mm256_hadd_epi32(v[4], v[5]);
        let h67 = _mm256_hadd_epi32(v[6], v[7]);
        let g0 = _mm256_hadd_epi32(h01, h23); // [v0..v3 low halves | v0..v3 high halves]
        let g1 = _mm256_hadd_epi32(h45, h67);
        _mm256_add_epi32(_mm256_permute2x128_si256(g0, g1, 0x20), _mm256_permute2x128_si256(g0, g1, 0x31))
    }

    /// The shared column loop: eight blocks at a time, their integer dots
    /// reduced together and their float terms computed as vectors with the
    /// same operations as candle (`(Σq·d_w)·d_x + m_w·s_x`, no fused
    /// multiply-add), then added to the row's sum one block at a time in
    /// block order, which keeps the result bit-identical.
    macro_rules! column_simd {
        ($w:expr, $j:expr, $acts:expr, $out:expr, $dot:ident, $dots:ident) => {{
            let (w, j, acts, out): (&Q4_1Matrix, usize, &Q8Acts, &mut [f32]) = ($w, $j, $acts, $out);
            let nb = w.k / BLOCK;
            let codes = &w.codes[j * nb * 16..(j + 1) * nb * 16];
            let (scale, min) = (&w.scale[j * nb..(j + 1) * nb], &w.min[j * nb..(j + 1) * nb]);
            let full = nb / 8 * 8;
            for r0 in (0..acts.m).step_by(ROWS) {
                let rows = ROWS.min(acts.m - r0);
                let mut sumf = [0f32; ROWS];
                for b0 in (0..full).step_by(8) {
                    let wv: [__m256i; 8] = std::array::from_fn(|i| unpack(&codes[(b0 + i) * 16..]));
                    let ws = load_f32(scale, b0);
                    let wm = load_f32(min, b0);
                    for r in 0..rows {
                        let x0 = (r0 + r) * acts.k + b0 * BLOCK;
                        let dots: [__m256i; 8] =
                            std::array::from_fn(|i| $dot(wv[i], load(&acts.codes, x0 + i * BLOCK)));
                        let ab = (r0 + r) * nb + b0;
                        let t = _mm256_add_ps(
                            _mm256_mul_ps(
                                _mm256_mul_ps(_mm256_cvtepi32_ps(sum8(&dots)), ws),
                                load_f32(&acts.scale, ab),
                            ),
                            _mm256_mul_ps(wm, load_f32(&acts.sum, ab)),
                        );
                        let mut terms = [0f32; 8];
                        // SAFETY: `terms` holds 8 f32, unaligned store.
                        unsafe { _mm256_storeu_ps(terms.as_mut_ptr(), t) };
                        for v in terms {
                            sumf[r] += v;
                        }
                    }
                }
                for b in full..nb {
                    let mut sumi = [0i32; ROWS];
                    let x0 = r0 * acts.k + b * BLOCK;
                    $dots(&codes[b * 16..], &acts.codes, x0, acts.k, rows, &mut sumi);
                    for r in 0..rows {
                        let ab = (r0 + r) * nb + b;
                        sumf[r] += sumi[r] as f32 * scale[b] * acts.scale[ab] + min[b] * acts.sum[ab];
                    }
                }
                out[r0..r0 + rows].copy_from_slice(&sumf[..rows]);
            }
        }};
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    fn load_f32(x: &[f32], at: usize) -> __m256 {
        assert!(at + 8 <= x.len());
        // SAFETY: 8 readable f32 (checked above), unaligned load.
        unsafe { _mm256_loadu_ps(x.as_ptr().add(at)) }
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    fn dot_avx2(w: __m256i, a: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1))
    }

    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    #[inline]
    fn dot_vnni(w: __m256i, a: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, a)
    }

    /// One Q8_0 dot product exactly as candle's AVX2 kernel computes it:
    /// per block `acc = fma(d_w·d_x, lanes, acc)` over eight lanes of
    /// `madd(maddubs(|w|, sign(x, w)))`, then candle's horizontal sum.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_q8_0_avx2(w: &[i8], ws: &[f32], x: &[i8], xs: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for b in 0..ws.len() {
            let d = _mm256_set1_ps(ws[b] * xs[b]);
            let (bw, bx) = (load(w, b * BLOCK), load(x, b * BLOCK));
            let lanes = _mm256_madd_epi16(
                _mm256_set1_epi16(1),
                _mm256_maddubs_epi16(_mm256_sign_epi8(bw, bw), _mm256_sign_epi8(bx, bw)),
            );
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lanes), acc);
        }
        let res = _mm_add_ps(_mm256_extractf128_ps(acc, 1), _mm256_castps256_ps128(acc));
        let res = _mm_add_ps(res, _mm_movehl_ps(res, res));
        let res = _mm_add_ss(res, _mm_movehdup_ps(res));
        _mm_cvtss_f32(res)
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn column_avx2(w: &Q4_1Matrix, j: usize, acts: &Q8Acts, out: &mut [f32]) {
        column_simd!(w, j, acts, out, dot_avx2, dots_avx2)
    }

    /// # Safety
    /// The CPU must support AVX2, AVX-512 VNNI and AVX-512 VL.
    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    pub(super) unsafe fn column_vnni(w: &Q4_1Matrix, j: usize, acts: &Q8Acts, out: &mut [f32]) {
        column_simd!(w, j, acts, out, dot_vnni, dots_vnni)
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
            for m in [1, 2, 3, 4, 5, 7, 9] {
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

    #[test]
    fn q8_0_kernels_match_candle() {
        let dev = Device::Cpu;
        for (n, k) in [(1, 64), (37, 96), (70, 576)] {
            let wf = Tensor::from_vec(rand(n * k, (n * k) as u64 + 3), (n, k), &dev).unwrap();
            let q = QTensor::quantize(&wf, GgmlDType::Q8_0).unwrap();
            let ours = Q8_0Matrix::from_ggml_bytes(&q.data().unwrap(), n, k).unwrap();
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
                    let got = matmul_q8_0(&ours, &x, m, isa).unwrap();
                    for (a, b) in got.iter().zip(&expected) {
                        // The SIMD kernels follow candle's AVX2 path bit for
                        // bit; the scalar one its portable path, which sums in
                        // another order than the AVX2 path this machine runs.
                        if isa == Isa::Scalar || !std::is_x86_feature_detected!("fma") {
                            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{isa:?} {a} vs {b}");
                        } else {
                            assert_eq!(a.to_bits(), b.to_bits(), "{isa:?} n={n} k={k} m={m}: {a} vs {b}");
                        }
                    }
                }
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
}
