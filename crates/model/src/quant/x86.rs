//! The x86 SIMD kernels (AVX2; AVX-512 VNNI), called only after
//! `Isa::available` said the CPU has them.

use std::arch::x86_64::*;

use super::{block_scale, OutColumns, Q4_1Matrix, Q8Acts, Q8Matrix, BLOCK, Q8_ROWS, ROW_TILE, TILE};

/// [`super::acts::quantize_block`] with AVX2, equal to it for finite inputs:
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
    let packed: [__m256i; 4] = std::array::from_fn(|e| unsafe { _mm256_loadu_si256(wq.as_ptr().add(e * 32).cast()) });
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
            let extra = w.min.as_ref().map_or(0.0, |m| min_terms_avx2(&m[j * nb..(j + 1) * nb], acts.xsum_of(row, nb)));
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
                std::array::from_fn(|e| _mm256_xor_si256(_mm256_loadu_si256(codes.add((b * 8 + e) * 32).cast()), flip)),
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
