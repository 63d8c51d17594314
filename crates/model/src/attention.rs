//! Attention that reads K/V straight from the paged blocks.
//!
//! For each (sequence, KV head, chunk of up to 32 queries) one task walks the
//! sequence's block table once, loading each block's keys and values for that
//! head (a contiguous run, converted to f32 into a small scratch), and updates
//! an online softmax (running max, running sum, weighted value accumulator)
//! for every query of the chunk and every query head sharing the KV head
//! (grouped-query attention). Nothing is gathered into a history-sized
//! tensor; memory per task is one block plus the accumulators. Tasks run on
//! the persistent step workers (`workers` crate), as the matmuls do.
//!
//! The per-row update over one block (scores, rescale, `exp`, value
//! accumulation) runs in AVX2/FMA where the CPU has them, chosen at run
//! time. Each task transposes a block's keys once to `[dim][key]`, so a row
//! scores eight keys per FMA with no horizontal sums; the max and the `exp`
//! (Cephes-style polynomial) run on whole vectors with out-of-range lanes
//! set to `-inf`; values are folded with one FMA chain per eight dimensions,
//! keys in the inner loop.
//!
//! Rows are updated in tiles of up to four (a small GEMM per block): the
//! heads of one position, and of consecutive positions, read the same keys
//! of every block but the diagonal one (and a sliding window's edge), so a
//! tile loads each key and value vector once for all its rows. Four rows by
//! two groups of eight keys are eight independent score chains, and the
//! loads (two key vectors, four query broadcasts) no longer outnumber the
//! FMAs (eight), as they did one or two rows at a time. Each row's
//! arithmetic never depends on the tile: a score is one FMA chain over the
//! dimensions in order, then a multiply by the scale; a value dimension is
//! one chain over the keys in order (tested bit for bit), so decode, any
//! chunk split and a recompute give the same bits. The scalar update is the
//! reference and the fallback; they agree to ~1e-5 relative.
//!
//! Causality and sliding windows are positional: query at position `p` reads
//! keys `max(0, p + 1 - W) ..= p` (`W` infinite for full attention).

use std::sync::OnceLock;

use kv::BlockTable;

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
    let results: Vec<OnceLock<Result<ChunkOut>>> = tasks.iter().map(|_| OnceLock::new()).collect();
    workers::for_each(tasks.len(), &|t| {
        let (s, g, c) = tasks[t];
        let sq = &seqs[s];
        let n = QUERY_CHUNK.min(sq.len - c);
        // Each task fills its own slot once.
        let _ = results[t].set(attend_chunk(q, store, layer, sq, c, n, g, dims).map(|out| (s, g, c, out)));
    });
    let group = heads / kv_heads;
    let mut out = vec![0f32; q.len()];
    for r in results {
        let (s, g, c, chunk) =
            r.into_inner().ok_or_else(|| Error::InvalidBatch("an attention task did not run".into()))??;
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
    // Up to [`TILE_ROWS`] rows' scores.
    let mut scores = vec![0f32; TILE_ROWS * stride];
    let qrow = |r: usize| &q[((sq.row + first + r / group) * heads + g * group + r % group) * d..][..d];
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
        // The keys of this block query `i` reads, if any.
        let range = |i: usize| {
            let pos = lo_pos + i;
            let lo = reach(pos).max(base);
            (pos >= base && lo < base + valid).then(|| lo - base..(pos + 1 - base).min(valid))
        };
        let mut i = 0;
        while i < n {
            let Some(keys_read) = range(i) else {
                i += 1;
                continue;
            };
            // Consecutive queries that read the same keys (all but the
            // diagonal block and a window's edge): their rows, every head of
            // each, are updated in tiles of up to four, sharing every key
            // and value load. A row's arithmetic is the same in any tile
            // (tested bit for bit), so decode, chunk splits and recompute
            // agree.
            let mut end = i + 1;
            while end < n && range(end).as_ref() == Some(&keys_read) {
                end += 1;
            }
            let mut r = i * group;
            while r < end * group {
                let take = (end * group - r).min(TILE_ROWS);
                let st = Rows {
                    max: &mut max[r..r + take],
                    sum: &mut sum[r..r + take],
                    acc: &mut acc[r * d..(r + take) * d],
                };
                let (sc, kr) = (&mut scores[..take * stride], keys_read.clone());
                match take {
                    4 => kernel.update_rows::<4>(std::array::from_fn(|t| qrow(r + t)), &keys, kr, scale, sc, st),
                    3 => kernel.update_rows::<3>(std::array::from_fn(|t| qrow(r + t)), &keys, kr, scale, sc, st),
                    2 => kernel.update_rows::<2>(std::array::from_fn(|t| qrow(r + t)), &keys, kr, scale, sc, st),
                    _ => kernel.update_rows::<1>([qrow(r)], &keys, kr, scale, sc, st),
                }
                r += take;
            }
            i = end;
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

    /// Folds keys `keys[range]` into each of `R` rows' states: scores
    /// `q·k * scale`, rescale by the new running max, add `exp(score - max)`
    /// to the sum and `exp(..) * v` to the accumulator. `scores` has
    /// `R * keys.stride` slots. Each row's arithmetic is exactly that of
    /// the row alone; the SIMD kernel shares key and value loads.
    #[allow(unsafe_code)] // dispatch into the SIMD update below
    fn update_rows<const R: usize>(
        self,
        q: [&[f32]; R],
        keys: &KeyBlock<'_>,
        range: std::ops::Range<usize>,
        scale: f32,
        scores: &mut [f32],
        rows: Rows<'_>,
    ) {
        match self {
            Self::Scalar => {
                let states = rows.split::<R>();
                for (r, (q, st)) in q.into_iter().zip(states).enumerate() {
                    update_scalar(
                        q,
                        keys,
                        range.clone(),
                        scale,
                        &mut scores[r * keys.stride..(r + 1) * keys.stride],
                        st,
                    );
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `detect` chose this only where AVX2 and FMA exist.
            Self::Avx2Fma => unsafe { x86::update_rows_avx2(q, keys, range, scale, scores, rows) },
        }
    }
}

/// The most rows one kernel call updates: four rows' scores over two
/// groups of eight keys are eight accumulators, and the value fold's four
/// rows by two vectors eight more, which fit the sixteen AVX2 registers
/// with the loads.
const TILE_ROWS: usize = 4;

/// Consecutive rows' online-softmax states.
struct Rows<'a> {
    max: &'a mut [f32],
    sum: &'a mut [f32],
    acc: &'a mut [f32],
}

impl<'a> Rows<'a> {
    /// Each of the `R` rows' state.
    fn split<const R: usize>(self) -> [RowState<'a>; R] {
        let Self { mut max, mut sum, mut acc } = self;
        assert!(max.len() == R && sum.len() == R && acc.len().is_multiple_of(R), "{R} row states");
        let d = acc.len() / R;
        std::array::from_fn(|_| {
            let (m, rest) = std::mem::take(&mut max).split_at_mut(1);
            max = rest;
            let (s, rest) = std::mem::take(&mut sum).split_at_mut(1);
            sum = rest;
            let (a, rest) = std::mem::take(&mut acc).split_at_mut(d);
            acc = rest;
            RowState { max: &mut m[0], sum: &mut s[0], acc: a }
        })
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

    use super::{KeyBlock, Rows};

    /// `update_scalar` for `R` rows over the same keys: eight keys scored
    /// per FMA from the transposed keys, a vector `exp`, and the values
    /// folded in eight dimensions at a time over the keys. The scores and
    /// the value fold read each key and value vector once for all rows;
    /// every row's own operations and their order are those of one row
    /// alone. Row `r`'s scores are `scores[r * stride..]`, its state
    /// `rows.max[r]`, `rows.sum[r]` and `rows.acc[r * d..]` (offsets, not
    /// per-call slices: this runs once per tile and block).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn update_rows_avx2<const R: usize>(
        q: [&[f32]; R],
        keys: &KeyBlock<'_>,
        range: Range<usize>,
        scale: f32,
        scores: &mut [f32],
        rows: Rows<'_>,
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
                && scores.len() >= R * stride
                && rows.max.len() == R
                && rows.sum.len() == R
                && rows.acc.len() == R * d,
            "attention kernel shapes"
        );
        let groups = j0 / 8..j1.div_ceil(8);
        score_groups(q, keys.transposed, stride, groups.clone(), scale, scores);
        let mut alphas = [1f32; R];
        for (r, alpha) in alphas.iter_mut().enumerate() {
            let row = &mut scores[r * stride..(r + 1) * stride];
            let (max, sum) = (&mut rows.max[r], &mut rows.sum[r]);
            // Lanes of the first and last group outside the range take no part.
            row[groups.start * 8..j0].fill(f32::NEG_INFINITY);
            row[j1..groups.end * 8].fill(f32::NEG_INFINITY);
            let lanes = &mut row[groups.start * 8..groups.end * 8];
            let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
            for c in lanes.chunks_exact(8) {
                // SAFETY: `c` is 8 floats.
                vmax = _mm256_max_ps(vmax, unsafe { _mm256_loadu_ps(c.as_ptr()) });
            }
            let m_new = max.max(hmax(vmax));
            // Usually the running max stands: skip a libm call.
            *alpha = if *max == m_new { 1.0 } else { (*max - m_new).exp() };
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
            *sum = *sum * *alpha + hsum(vsum);
            *max = m_new;
        }
        let probs = &scores[..R * stride];
        let values = &keys.values[j0 * d..j1 * d];
        let acc = rows.acc;
        let fold_range = FoldRange { probs, stride, j0, keys: j1 - j0 };
        let chunks = d / 8;
        // As many vectors per row as keep the accumulators in registers
        // (R·N ≤ 8); each row's chains are the same whatever N is.
        let mut c = 0;
        while c + 8 <= chunks && R == 1 {
            fold::<8, R>(acc, values, d, fold_range, alphas, c);
            c += 8;
        }
        while c + 4 <= chunks && R <= 2 {
            fold::<4, R>(acc, values, d, fold_range, alphas, c);
            c += 4;
        }
        while c + 2 <= chunks {
            fold::<2, R>(acc, values, d, fold_range, alphas, c);
            c += 2;
        }
        while c < chunks {
            fold::<1, R>(acc, values, d, fold_range, alphas, c);
            c += 1;
        }
        for (r, alpha) in alphas.into_iter().enumerate() {
            let probs = &probs[r * stride + j0..r * stride + j1];
            for k in chunks * 8..d {
                let mut x = acc[r * d + k] * alpha;
                for (j, &p) in probs.iter().enumerate() {
                    x += p * values[j * d + k];
                }
                acc[r * d + k] = x;
            }
        }
    }

    /// Where each row's probabilities lie: row `r`'s key `j` (from the
    /// range's start) is `probs[r * stride + j0 + j]`, `j < keys`.
    #[derive(Clone, Copy)]
    struct FoldRange<'a> {
        probs: &'a [f32],
        stride: usize,
        j0: usize,
        keys: usize,
    }

    /// `acc[r][8c..8(c + N)] = alpha[r] * acc[r][..] + Σ_j p[r][j] * values[j][..]`
    /// for each of `R` rows (row `r` of `acc` at `r * d`), with `N`
    /// independent FMA chains per row (one per 8 dimensions), keys in the
    /// inner loop; each value vector is loaded once for all rows.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)] // constant-bound index loops unroll into registers
    fn fold<const N: usize, const R: usize>(
        acc: &mut [f32],
        values: &[f32],
        d: usize,
        p: FoldRange<'_>,
        alpha: [f32; R],
        c: usize,
    ) {
        let FoldRange { probs, stride, j0, keys } = p;
        assert!(
            (c + N) * 8 <= d
                && acc.len() >= R * d
                && probs.len() >= (R - 1) * stride + j0 + keys
                && values.len() >= keys * d,
            "fold shapes"
        );
        // SAFETY: the assert bounds every access: dimensions `8c..8(c + N)`
        // of each row's `acc` and of each of the `keys` value rows, and
        // each row's `keys` probabilities.
        unsafe {
            let mut x = [[_mm256_setzero_ps(); N]; R];
            for r in 0..R {
                let (at, va) = (acc.as_ptr().add(r * d + c * 8), _mm256_set1_ps(alpha[r]));
                for u in 0..N {
                    x[r][u] = _mm256_mul_ps(_mm256_loadu_ps(at.add(u * 8)), va);
                }
            }
            let pp = probs.as_ptr().add(j0);
            for j in 0..keys {
                let row = values.as_ptr().add(j * d + c * 8);
                let mut vp = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    vp[r] = _mm256_set1_ps(*pp.add(r * stride + j));
                }
                for u in 0..N {
                    let v = _mm256_loadu_ps(row.add(u * 8));
                    for r in 0..R {
                        x[r][u] = _mm256_fmadd_ps(vp[r], v, x[r][u]);
                    }
                }
            }
            for r in 0..R {
                let at = acc.as_mut_ptr().add(r * d + c * 8);
                for u in 0..N {
                    _mm256_storeu_ps(at.add(u * 8), x[r][u]);
                }
            }
        }
    }

    /// `scores[r][8g..8g + 8] = scale * q[r] · kt[.., 8g..8g + 8]` for each
    /// group `g` of eight keys and row `r`: one FMA chain per row and group,
    /// over the dimensions in order, then one multiply by `scale`, so a
    /// row's bits never depend on `R` or on which groups go together. Two
    /// groups at a time: each step loads two key vectors and broadcasts one
    /// query value per row for `2R` FMAs (`2R` chains in flight, eight for
    /// four rows).
    #[target_feature(enable = "avx2,fma")]
    fn score_groups<const R: usize>(
        q: [&[f32]; R],
        kt: &[f32],
        stride: usize,
        groups: Range<usize>,
        scale: f32,
        scores: &mut [f32],
    ) {
        let mut g = groups.start;
        while g + 2 <= groups.end {
            score_tile::<R, 2>(q, kt, stride, g * 8, scale, scores);
            g += 2;
        }
        if g < groups.end {
            score_tile::<R, 1>(q, kt, stride, g * 8, scale, scores);
        }
    }

    /// [`score_groups`] for the `G` groups from key `col` on.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)] // constant-bound index loops unroll into registers
    fn score_tile<const R: usize, const G: usize>(
        q: [&[f32]; R],
        kt: &[f32],
        stride: usize,
        col: usize,
        scale: f32,
        scores: &mut [f32],
    ) {
        let d = q[0].len();
        assert!(
            col + 8 * G <= stride
                && kt.len() >= d * stride
                && q.iter().all(|q| q.len() == d)
                && scores.len() >= R * stride,
            "score tile shapes"
        );
        // SAFETY: the assert bounds every access: keys `col..col + 8G` of
        // each of the `d` transposed rows, `d` query values per row, and
        // the same keys' score slots.
        unsafe {
            let mut a = [[_mm256_setzero_ps(); G]; R];
            let base = kt.as_ptr().add(col);
            for k in 0..d {
                let row = base.add(k * stride);
                let mut kv = [_mm256_setzero_ps(); G];
                for u in 0..G {
                    kv[u] = _mm256_loadu_ps(row.add(u * 8));
                }
                for r in 0..R {
                    let qk = _mm256_set1_ps(*q[r].get_unchecked(k));
                    for u in 0..G {
                        a[r][u] = _mm256_fmadd_ps(qk, kv[u], a[r][u]);
                    }
                }
            }
            let sc = _mm256_set1_ps(scale);
            for r in 0..R {
                for u in 0..G {
                    _mm256_storeu_ps(scores.as_mut_ptr().add(r * stride + col + u * 8), _mm256_mul_ps(a[r][u], sc));
                }
            }
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

    /// One call's state for `rows` rows of `d`: `(max, sum, acc)`.
    type Tile = (Vec<f32>, Vec<f32>, Vec<f32>);

    fn update_tile<const R: usize>(q: &[Vec<f32>], keys: &KeyBlock<'_>, range: std::ops::Range<usize>, t: &mut Tile) {
        let mut scores = vec![0.0; R * keys.stride];
        let rows = Rows { max: &mut t.0, sum: &mut t.1, acc: &mut t.2 };
        let q: [&[f32]; R] = std::array::from_fn(|r| q[r].as_slice());
        RowKernel::detect().update_rows::<R>(q, keys, range, 0.125, &mut scores, rows);
    }

    /// Rows updated together in a tile of two, three or four give each
    /// row's bits alone, so tiling rows (heads of a position, consecutive
    /// positions) can never make a row depend on its neighbours.
    #[test]
    fn rows_updated_in_a_tile_give_the_bits_of_each_row_alone() {
        let mut seed = 11;
        for d in [8, 24, 64, 72, 256] {
            for m in [1_usize, 9, 16, 23, 33] {
                for range in [0..m, m / 3..m, 0..m.div_ceil(2)] {
                    let mut gen = |n: usize| (0..n).map(|_| noise(&mut seed) * 3.0).collect::<Vec<f32>>();
                    let q: Vec<Vec<f32>> = (0..4).map(|_| gen(d)).collect();
                    let (rows, values) = (gen(m * d), gen(m * d));
                    let stride = m.div_ceil(8) * 8;
                    let mut transposed = vec![0.0; d * stride];
                    transpose_keys(&rows, d, &mut transposed, stride);
                    let keys = KeyBlock { rows: &rows, transposed: &transposed, stride, values: &values };
                    let start: Tile = (vec![0.25, -0.5, 1.0, 0.0], vec![1.5, 0.5, 2.0, 1.0], gen(4 * d));
                    let row =
                        |t: &Tile, r: usize| -> Tile { (vec![t.0[r]], vec![t.1[r]], t.2[r * d..(r + 1) * d].to_vec()) };
                    let alone: Vec<Tile> = (0..4)
                        .map(|r| {
                            let mut t = row(&start, r);
                            update_tile::<1>(&q[r..], &keys, range.clone(), &mut t);
                            t
                        })
                        .collect();
                    let bits =
                        |t: &Tile| -> Vec<u32> { t.0.iter().chain(&t.1).chain(&t.2).map(|v| v.to_bits()).collect() };
                    for tile in 2..=4 {
                        let mut t: Tile =
                            (start.0[..tile].to_vec(), start.1[..tile].to_vec(), start.2[..tile * d].to_vec());
                        match tile {
                            2 => update_tile::<2>(&q, &keys, range.clone(), &mut t),
                            3 => update_tile::<3>(&q, &keys, range.clone(), &mut t),
                            _ => update_tile::<4>(&q, &keys, range.clone(), &mut t),
                        }
                        for (r, want) in alone.iter().enumerate().take(tile) {
                            assert_eq!(bits(&row(&t, r)), bits(want), "d={d} m={m} {range:?} tile of {tile}, row {r}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_detected_row_update_matches_the_scalar_one() {
        let kernel = RowKernel::detect();
        let mut seed = 7;
        for d in [5, 8, 24, 64, 72, 256] {
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
                        if simd {
                            let rows = Rows {
                                max: std::slice::from_mut(&mut max),
                                sum: std::slice::from_mut(&mut sum),
                                acc: &mut acc,
                            };
                            kernel.update_rows::<1>([&q], &keys, range.clone(), 0.125, &mut scores, rows);
                        } else {
                            let st = RowState { max: &mut max, sum: &mut sum, acc: &mut acc };
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
