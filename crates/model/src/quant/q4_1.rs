//! The Q4_1 weight layout (column-interleaved tiles) and its tile and
//! reference kernels (the module doc of `quant` describes both).

#[allow(clippy::wildcard_imports)]
use super::*;

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
    pub(super) n: usize,
    pub(super) k: usize,
    /// `n * k / 2` bytes: per block, byte `j` holds weight `j` (low nibble)
    /// and weight `j + 16` (high nibble).
    pub(super) codes: Vec<u8>,
    pub(super) scale: Vec<f32>,
    pub(super) min: Vec<f32>,
    pub(super) tiled: usize,
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

    pub(super) fn blocks(&self) -> usize {
        self.k / BLOCK
    }

    /// Index of column `j`'s block `b` in `scale` and `min`.
    pub(super) fn param_index(&self, j: usize, b: usize) -> usize {
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
    pub(super) fn code_index(&self, j: usize, b: usize, i: usize) -> usize {
        let nb = self.blocks();
        if j < self.tiled {
            let (tile, c) = (j / TILE * nb * TILE * 16, j % TILE);
            tile + b * TILE * 16 + i / 4 * 32 + c * 4 + i % 4
        } else {
            (j * nb + b) * 16 + i
        }
    }

    /// Lays out column-by-column blocks for the kernels.
    pub(super) fn from_plain(n: usize, k: usize, plain: &Plain) -> Self {
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
    pub(super) fn to_plain(&self) -> Plain {
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
pub(super) struct Plain {
    pub(super) codes: Vec<u8>,
    pub(super) scale: Vec<f32>,
    pub(super) min: Vec<f32>,
}

/// The [`TILE`] output columns of tile `t` for every activation row, into
/// `out` (a view of exactly those columns).
#[allow(unsafe_code)] // dispatch into the SIMD kernels below
pub(super) fn tile(w: &Q4_1Matrix, t: usize, acts: &Q8Acts, isa: Isa, out: &mut OutColumns<'_>) {
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
pub(super) fn column_scalar(w: &Q4_1Matrix, j: usize, acts: &Q8Acts, out: &mut OutColumns<'_>, c: usize) {
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
