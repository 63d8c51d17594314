//! The 8-bit weight layout ([`Q8Matrix`]: Q8_0 and the K-quants unpacked
//! to it) and its tile and reference kernels.

#[allow(clippy::wildcard_imports)]
use super::*;

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
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) codes: Vec<i8>,
    pub(super) scale: Vec<f32>,
    pub(super) scale_hi: Option<Vec<f32>>,
    pub(super) min: Option<Vec<f32>>,
    /// Values per activation scale: 32, or 256 for K-quants (see
    /// [`matmul_q8`]).
    pub(super) act_block: usize,
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

    pub(super) fn blocks(&self) -> usize {
        self.k / BLOCK
    }

    /// Where weight `i` (0..32) of column `j`'s block `b` lives in `codes`.
    /// Weights `4e..4e + 4` are contiguous (the conversions copy them four
    /// at a time).
    pub(super) fn code_index(&self, j: usize, b: usize, i: usize) -> usize {
        let (t, c) = (j / TILE, j % TILE);
        (t * self.blocks() + b) * TILE * BLOCK + i / 4 * TILE * 4 + c * 4 + i % 4
    }

    /// Index of column `j`'s block `b` in `scale` and `scale_hi`.
    pub(super) fn param_index(&self, j: usize, b: usize) -> usize {
        (j / TILE * self.blocks() + b) * TILE + j % TILE
    }

    /// Tiles a row-major unpacked `[n, k]` matrix (see the type's doc).
    pub(super) fn tiled(n: usize, k: usize, u: crate::kquant::Unpacked) -> Self {
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
    pub(super) fn untiled(self) -> crate::kquant::Unpacked {
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

/// Activation rows the 8-bit VNNI tile computes together, sharing each
/// block's weight vectors.
pub(super) const Q8_ROWS: usize = 4;

/// The columns of tile `t` that `out` views (all [`TILE`] but in a last,
/// padded tile), every row. `sums` are [`Q8Acts::half_sums`] for the VNNI
/// kernel.
#[allow(unsafe_code)] // dispatch into the SIMD kernels below
pub(super) fn tile_q8(w: &Q8Matrix, t: usize, acts: &Q8Acts, sums: &[i32], isa: Isa, out: &mut OutColumns<'_>) {
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
pub(super) fn column_q8_scalar(w: &Q8Matrix, j: usize, acts: &Q8Acts, r: usize) -> f32 {
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
pub(super) fn min_terms(min: &[f32], acts: &Q8Acts, r: usize) -> f32 {
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
