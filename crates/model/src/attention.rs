//! Attention that reads K/V straight from the paged blocks.
//!
//! For each (sequence, KV head, chunk of up to 32 queries) one task walks the
//! sequence's block table once, loading each block's keys and values for that
//! head (a contiguous run, converted to f32 into a small scratch), and updates
//! an online softmax (running max, running sum, weighted value accumulator)
//! for every query of the chunk and every query head sharing the KV head
//! (grouped-query attention). Nothing is gathered into a history-sized
//! tensor; memory per task is one block plus the accumulators. Tasks run on
//! the one rayon pool that candle's matmuls also use.
//!
//! The per-row update over one block (scores, rescale, `exp`, value
//! accumulation) runs in AVX2/FMA where the CPU has them, chosen at run
//! time. Each task transposes a block's keys once to `[dim][key]`, so a row
//! scores eight keys per FMA with no horizontal sums (four dimensions
//! unrolled: eight independent FMA chains); the max and the `exp`
//! (Cephes-style polynomial) run on whole vectors with out-of-range lanes
//! set to `-inf`; values are folded with one FMA chain per eight dimensions
//! (eight chains for a 64-wide head), keys in the inner loop. The query
//! heads of one position read the same keys, so they are updated two at a
//! time, sharing every key and value load; each head's operations and their
//! order are those of the head alone (tested bit for bit), so the pairing
//! never makes a row depend on another. The scalar update is the reference
//! and the fallback; they agree to ~1e-5 relative.
//!
//! Causality and sliding windows are positional: query at position `p` reads
//! keys `max(0, p + 1 - W) ..= p` (`W` infinite for full attention).

use kv::BlockTable;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kv_store::PagedKvStore;

/// One sequence's queries in the batch.
pub(crate) struct SeqQueries<'a> {
    /// Row of its first query in the batch.
    pub(crate) row: usize,
    /// Number of queries.
    pub(crate) len: usize,
    /// Position of its first query.
    pub(crate) start_pos: usize,
    pub(crate) table: &'a BlockTable,
}

/// Shapes of one attention call.
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) window: Option<usize>,
}

const QUERY_CHUNK: usize = 32;

/// What one task produced: sequence, KV head, first query, outputs
/// `[queries, group, head_dim]`.
type ChunkOut = (usize, usize, usize, Vec<f32>);

/// `q` is `[tokens, heads, head_dim]`; returns the same shape.
pub(crate) fn paged_attention(
    q: &[f32],
    store: &PagedKvStore,
    layer: usize,
    seqs: &[SeqQueries<'_>],
    dims: Dims,
) -> Result<Vec<f32>> {
    let Dims { heads, kv_heads, head_dim, .. } = dims;
    let tasks: Vec<(usize, usize, usize)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(s, sq)| (0..kv_heads).flat_map(move |g| (0..sq.len).step_by(QUERY_CHUNK).map(move |c| (s, g, c))))
        .collect();
    let results: Vec<Result<ChunkOut>> = tasks
        .into_par_iter()
        .map(|(s, g, c)| {
            let sq = &seqs[s];
            let n = QUERY_CHUNK.min(sq.len - c);
            attend_chunk(q, store, layer, sq, c, n, g, dims).map(|out| (s, g, c, out))
        })
        .collect();
    let group = heads / kv_heads;
    let mut out = vec![0f32; q.len()];
    for r in results {
        let (s, g, c, chunk) = r?;
        let n = chunk.len() / (group * head_dim);
        for i in 0..n {
            let row = seqs[s].row + c + i;
            for hh in 0..group {
                let h = g * group + hh;
                let dst = (row * heads + h) * head_dim;
                let src = (i * group + hh) * head_dim;
                out[dst..dst + head_dim].copy_from_slice(&chunk[src..src + head_dim]);
            }
        }
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)] // one task's coordinates; bundling them would only add a struct
fn attend_chunk(
    q: &[f32],
    store: &PagedKvStore,
    layer: usize,
    sq: &SeqQueries<'_>,
    first: usize,
    n: usize,
    g: usize,
    dims: Dims,
) -> Result<Vec<f32>> {
    let Dims { heads, kv_heads, head_dim: d, window } = dims;
    let group = heads / kv_heads;
    let bs = store.block_size();
    let kernel = RowKernel::detect();
    let scale = 1.0 / (d as f32).sqrt();
    let lo_pos = sq.start_pos + first; // first query's position
    let hi_pos = lo_pos + n - 1; // last query's position
    let reach = |p: usize| window.map_or(0, |w| (p + 1).saturating_sub(w));
    let (first_block, last_block) = (reach(lo_pos) / bs, hi_pos / bs);
    if first_block < sq.table.first_block() || last_block >= sq.table.logical_len() {
        return Err(Error::InvalidBatch(format!(
            "block table covers blocks {}..{} but attention needs {first_block}..={last_block}",
            sq.table.first_block(),
            sq.table.logical_len()
        )));
    }
    // Per (query, head): running max, running sum, accumulator.
    let rows = n * group;
    let mut max = vec![f32::NEG_INFINITY; rows];
    let mut sum = vec![0f32; rows];
    let mut acc = vec![0f32; rows * d];
    let mut kbuf = vec![0f32; bs * d];
    let mut vbuf = vec![0f32; bs * d];
    // Keys transposed to `[dim][key]` (key count rounded up to 8), so a
    // SIMD kernel scores eight keys per instruction without horizontal sums.
    let stride = bs.div_ceil(8) * 8;
    let mut kt = vec![0f32; if kernel.wants_transposed() { d * stride } else { 0 }];
    // Two rows' scores (a pair of heads, see below).
    let mut scores = vec![0f32; 2 * stride];
    for lb in first_block..=last_block {
        let block = sq.table.blocks()[lb - sq.table.first_block()];
        let base = lb * bs;
        let valid = bs.min(hi_pos + 1 - base);
        if lb < last_block {
            let next = sq.table.blocks()[lb + 1 - sq.table.first_block()];
            store.prefetch(layer, next, g, bs.min(hi_pos - base - bs + 1));
        }
        store.load(layer, block, g, &mut kbuf[..valid * d], &mut vbuf[..valid * d])?;
        if !kt.is_empty() {
            transpose_keys(&kbuf[..valid * d], d, &mut kt, stride);
        }
        let keys = KeyBlock { rows: &kbuf[..valid * d], transposed: &kt, stride, values: &vbuf[..valid * d] };
        for i in 0..n {
            let pos = lo_pos + i;
            let lo = reach(pos).max(base);
            if pos < base || lo >= base + valid {
                continue;
            }
            let (j0, j1) = (lo - base, (pos + 1 - base).min(valid));
            // The query heads of one position read the same keys: two at a
            // time share every key and value load. Which heads pair up
            // depends only on the group size, never on the batch, so a
            // head's arithmetic is the same in decode and in any chunk.
            let qrow = |hh: usize| &q[((sq.row + first + i) * heads + g * group + hh) * d..][..d];
            let r0 = i * group;
            let mut rows = max[r0..r0 + group]
                .iter_mut()
                .zip(&mut sum[r0..r0 + group])
                .zip(acc[r0 * d..(r0 + group) * d].chunks_exact_mut(d))
                .map(|((max, sum), acc)| RowState { max, sum, acc });
            let mut hh = 0;
            while let Some(a) = rows.next() {
                if let Some(b) = rows.next() {
                    let (sa, sb) = scores.split_at_mut(stride);
                    kernel.update_pair([qrow(hh), qrow(hh + 1)], &keys, j0..j1, scale, [sa, sb], [a, b]);
                    hh += 2;
                } else {
                    kernel.update(qrow(hh), &keys, j0..j1, scale, &mut scores[..stride], a);
                    hh += 1;
                }
            }
        }
    }
    for r in 0..rows {
        let inv = 1.0 / sum[r];
        acc[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= inv);
    }
    Ok(acc)
}

/// Keys `[key][dim]` to `kt` `[dim][key]` (`stride` keys per dim): 8×8
/// tiles in registers where the CPU has AVX, element by element elsewhere
/// and for the last keys short of a tile. A plain copy, so exact.
#[allow(unsafe_code)] // dispatch into the AVX transpose after detection
fn transpose_keys(rows: &[f32], d: usize, kt: &mut [f32], stride: usize) {
    let keys = rows.len() / d;
    assert!(keys <= stride && kt.len() >= d * stride, "key transpose shapes");
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(8) && std::is_x86_feature_detected!("avx") {
        done = keys / 8 * 8;
        // SAFETY: AVX detected; shapes asserted above.
        unsafe { x86::transpose_tiles(&rows[..done * d], d, kt, stride) };
    }
    for (j, key) in rows.chunks_exact(d).enumerate().skip(done) {
        for (k, &x) in key.iter().enumerate() {
            kt[k * stride + j] = x;
        }
    }
}

/// One (query, head) row's online-softmax state.
struct RowState<'a> {
    max: &'a mut f32,
    sum: &'a mut f32,
    acc: &'a mut [f32],
}

/// One block's keys and values for one KV head.
struct KeyBlock<'a> {
    /// `[key][dim]`.
    rows: &'a [f32],
    /// `[dim][key]`, `stride` keys per dim (empty unless the kernel wants
    /// it).
    transposed: &'a [f32],
    stride: usize,
    /// `[key][dim]`.
    values: &'a [f32],
}

/// The per-row update over one block's keys, in the widest instructions
/// the CPU has (chosen at run time; the binary targets baseline x86-64).
#[derive(Clone, Copy)]
enum RowKernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
}

impl RowKernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return Self::Avx2Fma;
        }
        Self::Scalar
    }

    fn wants_transposed(self) -> bool {
        !matches!(self, Self::Scalar)
    }

    /// Folds keys `keys[range]` into `state`: scores `q·k * scale`, rescale
    /// by the new running max, add `exp(score - max)` to the sum and
    /// `exp(..) * v` to the accumulator. `scores` has `keys.stride` slots.
    #[allow(unsafe_code)] // dispatch into the SIMD update below
    fn update(
        self,
        q: &[f32],
        keys: &KeyBlock<'_>,
        range: std::ops::Range<usize>,
        scale: f32,
        scores: &mut [f32],
        state: RowState<'_>,
    ) {
        match self {
            Self::Scalar => update_scalar(q, keys, range, scale, scores, state),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `detect` chose this only where AVX2 and FMA exist.
            Self::Avx2Fma => unsafe { x86::update_rows_avx2::<1>([q], keys, range, scale, [scores], [state]) },
        }
    }
}

impl RowKernel {
    /// [`RowKernel::update`] for two rows over the same keys, each row's
    /// arithmetic exactly as alone; the SIMD kernel shares the key and
    /// value loads between them.
    #[allow(unsafe_code)] // dispatch into the SIMD update below
    fn update_pair(
        self,
        q: [&[f32]; 2],
        keys: &KeyBlock<'_>,
        range: std::ops::Range<usize>,
        scale: f32,
        scores: [&mut [f32]; 2],
        state: [RowState<'_>; 2],
    ) {
        match self {
            Self::Scalar => {
                let [sa, sb] = scores;
                let [a, b] = state;
                update_scalar(q[0], keys, range.clone(), scale, sa, a);
                update_scalar(q[1], keys, range, scale, sb, b);
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `detect` chose this only where AVX2 and FMA exist.
            Self::Avx2Fma => unsafe { x86::update_rows_avx2(q, keys, range, scale, scores, state) },
        }
    }
}

fn update_scalar(
    q: &[f32],
    keys: &KeyBlock<'_>,
    range: std::ops::Range<usize>,
    scale: f32,
    scores: &mut [f32],
    st: RowState<'_>,
) {
    let d = q.len();
    let mut bmax = f32::NEG_INFINITY;
    for j in range.clone() {
        scores[j] = dot(q, &keys.rows[j * d..(j + 1) * d]) * scale;
        bmax = bmax.max(scores[j]);
    }
    let m_new = st.max.max(bmax);
    let alpha = (*st.max - m_new).exp();
    if alpha != 1.0 {
        *st.sum *= alpha;
        st.acc.iter_mut().for_each(|x| *x *= alpha);
    }
    for j in range {
        let p = (scores[j] - m_new).exp();
        *st.sum += p;
        axpy(p, &keys.values[j * d..(j + 1) * d], st.acc);
    }
    *st.max = m_new;
}

/// Dot product with eight independent accumulators, so the compiler can keep
/// them in vector registers.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut s = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            s[k] += x[k] * y[k];
        }
    }
    s.iter().sum::<f32>() + tail
}

fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)] // AVX2/FMA intrinsics; every function is entered only after detection
pub(crate) mod x86 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{KeyBlock, RowState};

    /// `update_scalar` for `R` rows over the same keys: eight keys scored
    /// per FMA from the transposed keys, a vector `exp`, and the values
    /// folded in eight dimensions at a time over the keys. The scores and
    /// the value fold read each key and value vector once for all rows;
    /// every row's own operations and their order are those of one row
    /// alone.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn update_rows_avx2<const R: usize>(
        q: [&[f32]; R],
        keys: &KeyBlock<'_>,
        range: Range<usize>,
        scale: f32,
        mut scores: [&mut [f32]; R],
        st: [RowState<'_>; R],
    ) {
        let d = q[0].len();
        let (j0, j1) = (range.start, range.end);
        let stride = keys.stride;
        assert!(
            stride.is_multiple_of(8)
                && j1 <= stride
                && keys.transposed.len() >= d * stride
                && keys.values.len() >= j1 * d
                && q.iter().all(|q| q.len() == d)
                && scores.iter().all(|s| s.len() >= stride)
                && st.iter().all(|s| s.acc.len() == d),
            "attention kernel shapes"
        );
        let groups = j0 / 8..j1.div_ceil(8);
        score_groups(q, keys.transposed, stride, groups.clone(), scale, &mut scores);
        let mut alphas = [1f32; R];
        let mut st = st;
        for ((scores, st), alpha) in scores.iter_mut().zip(st.iter_mut()).zip(alphas.iter_mut()) {
            // Lanes of the first and last group outside the range take no part.
            scores[groups.start * 8..j0].fill(f32::NEG_INFINITY);
            scores[j1..groups.end * 8].fill(f32::NEG_INFINITY);
            let lanes = &mut scores[groups.start * 8..groups.end * 8];
            let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
            for c in lanes.chunks_exact(8) {
                // SAFETY: `c` is 8 floats.
                vmax = _mm256_max_ps(vmax, unsafe { _mm256_loadu_ps(c.as_ptr()) });
            }
            let m_new = st.max.max(hmax(vmax));
            // Usually the running max stands: skip a libm call.
            *alpha = if *st.max == m_new { 1.0 } else { (*st.max - m_new).exp() };
            let shift = _mm256_set1_ps(m_new);
            let mut vsum = _mm256_setzero_ps();
            for c in lanes.chunks_exact_mut(8) {
                // SAFETY: `c` is 8 floats.
                unsafe {
                    let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), shift));
                    _mm256_storeu_ps(c.as_mut_ptr(), e);
                    vsum = _mm256_add_ps(vsum, e);
                }
            }
            *st.sum = *st.sum * *alpha + hsum(vsum);
            *st.max = m_new;
        }
        let probs: [&[f32]; R] = std::array::from_fn(|r| &scores[r][j0..j1]);
        let values = &keys.values[j0 * d..j1 * d];
        let mut accs: [&mut [f32]; R] = st.map(|s| s.acc);
        let chunks = d / 8;
        let mut c = 0;
        while c + 8 <= chunks && R == 1 {
            fold::<8, R>(&mut accs, values, d, probs, alphas, c);
            c += 8;
        }
        while c + 4 <= chunks {
            fold::<4, R>(&mut accs, values, d, probs, alphas, c);
            c += 4;
        }
        while c < chunks {
            fold::<1, R>(&mut accs, values, d, probs, alphas, c);
            c += 1;
        }
        for (acc, (probs, alpha)) in accs.iter_mut().zip(probs.iter().zip(alphas)) {
            for k in chunks * 8..d {
                let mut x = acc[k] * alpha;
                for (j, &p) in probs.iter().enumerate() {
                    x += p * values[j * d + k];
                }
                acc[k] = x;
            }
        }
    }

    /// `acc[8c..8(c + N)] = alpha * acc[..] + Σ_j probs[j] * values[j][..]`
    /// for each of `R` rows, with `N` independent FMA chains per row (one
    /// per 8 dimensions), keys in the inner loop; each value vector is
    /// loaded once for all rows.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)] // constant-bound index loops unroll into registers
    fn fold<const N: usize, const R: usize>(
        acc: &mut [&mut [f32]; R],
        values: &[f32],
        d: usize,
        probs: [&[f32]; R],
        alpha: [f32; R],
        c: usize,
    ) {
        let keys = probs[0].len();
        assert!(
            (c + N) * 8 <= d
                && acc.iter().all(|a| a.len() >= d)
                && probs.iter().all(|p| p.len() == keys)
                && values.len() >= keys * d,
            "fold shapes"
        );
        // SAFETY: the assert bounds every access: dimensions `8c..8(c + N)`
        // of each row's `acc` and of each of the `keys` value rows.
        unsafe {
            let mut x = [[_mm256_setzero_ps(); N]; R];
            for r in 0..R {
                let (at, va) = (acc[r].as_ptr().add(c * 8), _mm256_set1_ps(alpha[r]));
                for (u, xu) in x[r].iter_mut().enumerate() {
                    *xu = _mm256_mul_ps(_mm256_loadu_ps(at.add(u * 8)), va);
                }
            }
            for j in 0..keys {
                let row = values.as_ptr().add(j * d + c * 8);
                let vp: [__m256; R] = std::array::from_fn(|r| _mm256_set1_ps(*probs[r].get_unchecked(j)));
                for u in 0..N {
                    let v = _mm256_loadu_ps(row.add(u * 8));
                    for r in 0..R {
                        x[r][u] = _mm256_fmadd_ps(vp[r], v, x[r][u]);
                    }
                }
            }
            for r in 0..R {
                let at = acc[r].as_mut_ptr().add(c * 8);
                for (u, xu) in x[r].iter().enumerate() {
                    _mm256_storeu_ps(at.add(u * 8), *xu);
                }
            }
        }
    }

    /// `scores[r][8g..8g + 8] = scale * q[r] · kt[.., 8g..8g + 8]` for each
    /// group `g` and row `r`: one group at a time for two rows (two groups
    /// at a time for one), the dimension loop unrolled four ways, so each
    /// row has four independent FMA chains per group and every key vector
    /// is loaded once for all rows. A row's chains and their order do not
    /// depend on `R`: chain `u` takes dimensions `≡ u (mod 4)` below
    /// `d / 4 · 4` in order, chain 0 the rest, then `(a0 + a1) + (a2 + a3)`.
    #[target_feature(enable = "avx2,fma")]
    fn score_groups<const R: usize>(
        q: [&[f32]; R],
        kt: &[f32],
        stride: usize,
        groups: Range<usize>,
        scale: f32,
        scores: &mut [&mut [f32]; R],
    ) {
        let d = q[0].len();
        let sc = _mm256_set1_ps(scale);
        let d4 = d / 4 * 4;
        let mut g = groups.start;
        while g < groups.end {
            // One row scores two groups at a time (eight chains in flight);
            // two rows one group each (eight chains likewise).
            let pair = R == 1 && g + 1 < groups.end;
            let col = g * 8;
            let mut a = [[_mm256_setzero_ps(); 4]; R];
            let mut b = [_mm256_setzero_ps(); 4];
            // SAFETY: `kt` holds `d * stride` floats and `col + 16 <= stride`
            // when `pair` (else `col + 8 <= stride`), checked by the caller;
            // each `q[r]` holds `d` floats and `scores[r]` `stride`.
            unsafe {
                let base = kt.as_ptr().add(col);
                let mut k = 0;
                while k < d4 {
                    for u in 0..4 {
                        let row = base.add((k + u) * stride);
                        let kv = _mm256_loadu_ps(row);
                        for r in 0..R {
                            let qk = _mm256_set1_ps(*q[r].get_unchecked(k + u));
                            a[r][u] = _mm256_fmadd_ps(qk, kv, a[r][u]);
                            if pair {
                                b[u] = _mm256_fmadd_ps(qk, _mm256_loadu_ps(row.add(8)), b[u]);
                            }
                        }
                    }
                    k += 4;
                }
                for k in d4..d {
                    let row = base.add(k * stride);
                    let kv = _mm256_loadu_ps(row);
                    for r in 0..R {
                        let qk = _mm256_set1_ps(*q[r].get_unchecked(k));
                        a[r][0] = _mm256_fmadd_ps(qk, kv, a[r][0]);
                        if pair {
                            b[0] = _mm256_fmadd_ps(qk, _mm256_loadu_ps(row.add(8)), b[0]);
                        }
                    }
                }
                for r in 0..R {
                    let s = _mm256_add_ps(_mm256_add_ps(a[r][0], a[r][1]), _mm256_add_ps(a[r][2], a[r][3]));
                    _mm256_storeu_ps(scores[r].as_mut_ptr().add(col), _mm256_mul_ps(s, sc));
                }
                if pair {
                    let s = _mm256_add_ps(_mm256_add_ps(b[0], b[1]), _mm256_add_ps(b[2], b[3]));
                    _mm256_storeu_ps(scores[0].as_mut_ptr().add(col + 8), _mm256_mul_ps(s, sc));
                }
            }
            g += if pair { 2 } else { 1 };
        }
    }

    /// [`super::transpose_keys`] for whole tiles: `rows` holds a multiple
    /// of eight keys of `d` (a multiple of eight) dimensions.
    ///
    /// # Safety
    /// The CPU must have AVX.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn transpose_tiles(rows: &[f32], d: usize, kt: &mut [f32], stride: usize) {
        let keys = rows.len() / d;
        assert!(keys.is_multiple_of(8) && d.is_multiple_of(8) && keys <= stride && kt.len() >= d * stride);
        for j0 in (0..keys).step_by(8) {
            for k0 in (0..d).step_by(8) {
                // SAFETY: keys j0..j0 + 8 and dims k0..k0 + 8 are in bounds
                // of both (asserted); unaligned loads and stores.
                unsafe {
                    let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(rows.as_ptr().add((j0 + i) * d + k0)));
                    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
                    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
                    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
                    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
                    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                    let out = [
                        _mm256_permute2f128_ps::<0x20>(u0, u4),
                        _mm256_permute2f128_ps::<0x20>(u1, u5),
                        _mm256_permute2f128_ps::<0x20>(u2, u6),
                        _mm256_permute2f128_ps::<0x20>(u3, u7),
                        _mm256_permute2f128_ps::<0x31>(u0, u4),
                        _mm256_permute2f128_ps::<0x31>(u1, u5),
                        _mm256_permute2f128_ps::<0x31>(u2, u6),
                        _mm256_permute2f128_ps::<0x31>(u3, u7),
                    ];
                    for (i, o) in out.iter().enumerate() {
                        _mm256_storeu_ps(kt.as_mut_ptr().add((k0 + i) * stride + j0), *o);
                    }
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn hmax(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)))
    }

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// `exp` of eight lanes: Cephes' single-precision range reduction and
    /// degree-6 polynomial (about 1 ulp on the range softmax uses, x <= 0).
    /// Inputs below -87.3 (where the result would be subnormal), `-inf`
    /// included, give 0.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn exp256(x: __m256) -> __m256 {
        let live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.336_54), _CMP_GE_OQ);
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.336_54)), _mm256_set1_ps(88.376_26));
        let n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), _mm256_set1_ps(0.5)));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
        }
        y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r);
        y = _mm256_add_ps(y, _mm256_set1_ps(1.0));
        let bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
        _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(bits)), live)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive_for_awkward_lengths() {
        for n in [1, 7, 8, 9, 63, 64, 65] {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| 1.0 - i as f32 * 0.25).collect();
            let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - naive).abs() < 1e-3, "{n}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    #[allow(unsafe_code)] // calls the SIMD functions after checking the CPU
    fn simd_exp_is_within_a_few_ulp() {
        use std::arch::x86_64::{_mm256_loadu_ps, _mm256_storeu_ps};
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            return; // nothing to compare on this CPU
        }
        let xs: Vec<f32> = (0..=8000).map(|i| -80.0 + i as f32 * 0.01).collect();
        for c in xs.chunks_exact(8) {
            let mut out = [0f32; 8];
            // SAFETY: AVX2 and FMA checked above; `c` and `out` are 8 floats.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), x86::exp256(_mm256_loadu_ps(c.as_ptr()))) };
            for (x, y) in c.iter().zip(out) {
                let want = x.exp();
                assert!(((y - want) / want).abs() < 1e-6, "exp({x}) = {y}, want {want}");
            }
        }
        let low = [f32::NEG_INFINITY, -1e30, -100.0, -88.0, 0.0, 0.0, 0.0, 0.0];
        let mut out = [1f32; 8];
        // SAFETY: AVX2 and FMA checked above; both arrays are 8 floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), x86::exp256(_mm256_loadu_ps(low.as_ptr()))) };
        assert_eq!(out[..4], [0.0; 4], "far below the range is exactly 0");
    }

    #[test]
    fn key_transpose_is_exact_for_awkward_shapes() {
        for d in [5, 8, 64, 72, 256] {
            for keys in [1_usize, 7, 8, 9, 16, 23] {
                let stride = keys.div_ceil(8) * 8;
                let rows: Vec<f32> = (0..keys * d).map(|i| i as f32 * 0.37 - 11.0).collect();
                let mut kt = vec![f32::NAN; d * stride];
                transpose_keys(&rows, d, &mut kt, stride);
                for j in 0..keys {
                    for k in 0..d {
                        assert_eq!(
                            kt[k * stride + j].to_bits(),
                            rows[j * d + k].to_bits(),
                            "d={d} keys={keys} ({j}, {k})"
                        );
                    }
                }
            }
        }
    }

    /// A tiny deterministic generator, so the test needs no crate.
    fn noise(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Two heads updated together give each head's bits alone, so pairing
    /// heads can never make a row depend on its neighbour.
    #[test]
    fn a_pair_of_rows_updates_bit_for_bit_as_each_alone() {
        let kernel = RowKernel::detect();
        let mut seed = 11;
        for d in [8, 24, 64, 72, 256] {
            for m in [1_usize, 9, 16, 23] {
                for range in [0..m, m / 3..m, 0..m.div_ceil(2)] {
                    let mut gen = |n: usize| (0..n).map(|_| noise(&mut seed) * 3.0).collect::<Vec<f32>>();
                    let (q0, q1, rows, values) = (gen(d), gen(d), gen(m * d), gen(m * d));
                    let stride = m.div_ceil(8) * 8;
                    let mut transposed = vec![0.0; d * stride];
                    transpose_keys(&rows, d, &mut transposed, stride);
                    let keys = KeyBlock { rows: &rows, transposed: &transposed, stride, values: &values };
                    let start = |seed: &mut u64| (0.25, 1.5, (0..d).map(|_| noise(seed)).collect::<Vec<f32>>());
                    let (s0, s1) = (start(&mut seed), start(&mut seed));
                    let alone = |q: &[f32], s: &(f32, f32, Vec<f32>)| {
                        let (mut max, mut sum, mut acc) = s.clone();
                        let mut scores = vec![0.0; stride];
                        let st = RowState { max: &mut max, sum: &mut sum, acc: &mut acc };
                        kernel.update(q, &keys, range.clone(), 0.125, &mut scores, st);
                        (max, sum, acc)
                    };
                    let (want0, want1) = (alone(&q0, &s0), alone(&q1, &s1));
                    let (mut a, mut b) = (s0.clone(), s1.clone());
                    let (mut sa, mut sb) = (vec![0.0; stride], vec![0.0; stride]);
                    kernel.update_pair(
                        [&q0, &q1],
                        &keys,
                        range.clone(),
                        0.125,
                        [&mut sa, &mut sb],
                        [
                            RowState { max: &mut a.0, sum: &mut a.1, acc: &mut a.2 },
                            RowState { max: &mut b.0, sum: &mut b.1, acc: &mut b.2 },
                        ],
                    );
                    let bits = |x: &(f32, f32, Vec<f32>)| {
                        [x.0.to_bits(), x.1.to_bits()]
                            .into_iter()
                            .chain(x.2.iter().map(|v| v.to_bits()))
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(bits(&a), bits(&want0), "d={d} m={m} {range:?} first row");
                    assert_eq!(bits(&b), bits(&want1), "d={d} m={m} {range:?} second row");
                }
            }
        }
    }

    #[test]
    fn the_detected_row_update_matches_the_scalar_one() {
        let kernel = RowKernel::detect();
        let mut seed = 7;
        for d in [5, 8, 24, 64, 72] {
            for m in [1_usize, 7, 8, 16, 24] {
                for (range, fresh) in [(0..m, true), (m / 3..m, false), (0..m.div_ceil(2), false)] {
                    let mut gen = |n: usize| (0..n).map(|_| noise(&mut seed) * 3.0).collect::<Vec<f32>>();
                    let (q, rows, values) = (gen(d), gen(m * d), gen(m * d));
                    let stride = m.div_ceil(8) * 8;
                    let mut transposed = vec![0.0; d * stride];
                    for j in 0..m {
                        for k in 0..d {
                            transposed[k * stride + j] = rows[j * d + k];
                        }
                    }
                    let keys = KeyBlock { rows: &rows, transposed: &transposed, stride, values: &values };
                    let acc0 = gen(d);
                    let (max0, sum0) = if fresh { (f32::NEG_INFINITY, 0.0) } else { (0.5, 2.0) };
                    let run = |simd: bool| {
                        let (mut max, mut sum) = (max0, sum0);
                        let mut acc = if fresh { vec![0.0; d] } else { acc0.clone() };
                        let mut scores = vec![0.0; stride];
                        let st = RowState { max: &mut max, sum: &mut sum, acc: &mut acc };
                        if simd {
                            kernel.update(&q, &keys, range.clone(), 0.125, &mut scores, st);
                        } else {
                            update_scalar(&q, &keys, range.clone(), 0.125, &mut scores, st);
                        }
                        (max, sum, acc)
                    };
                    let (a, b) = (run(true), run(false));
                    let close = |x: f32, y: f32| (x - y).abs() <= 1e-5 * (1.0 + y.abs());
                    assert!(close(a.0, b.0) && close(a.1, b.1), "d={d} m={m}: {:?} vs {:?}", (a.0, a.1), (b.0, b.1));
                    for (x, y) in a.2.iter().zip(&b.2) {
                        assert!(close(*x, *y), "d={d} m={m} {range:?}: {x} vs {y}");
                    }
                }
            }
        }
    }
}
