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
    let mut scores = vec![0f32; bs];
    for lb in first_block..=last_block {
        let block = sq.table.blocks()[lb - sq.table.first_block()];
        let base = lb * bs;
        let valid = bs.min(hi_pos + 1 - base);
        store.load(layer, block, g, &mut kbuf[..valid * d], &mut vbuf[..valid * d]);
        for i in 0..n {
            let pos = lo_pos + i;
            let lo = reach(pos).max(base);
            if pos < base || lo >= base + valid {
                continue;
            }
            let (j0, j1) = (lo - base, (pos + 1 - base).min(valid));
            for hh in 0..group {
                let h = g * group + hh;
                let qrow = &q[((sq.row + first + i) * heads + h) * d..][..d];
                let mut bmax = f32::NEG_INFINITY;
                for j in j0..j1 {
                    let s = dot(qrow, &kbuf[j * d..(j + 1) * d]) * scale;
                    scores[j] = s;
                    bmax = bmax.max(s);
                }
                let r = i * group + hh;
                let m_new = max[r].max(bmax);
                let alpha = (max[r] - m_new).exp();
                let a = &mut acc[r * d..(r + 1) * d];
                if alpha != 1.0 {
                    sum[r] *= alpha;
                    a.iter_mut().for_each(|x| *x *= alpha);
                }
                for j in j0..j1 {
                    let p = (scores[j] - m_new).exp();
                    sum[r] += p;
                    axpy(p, &vbuf[j * d..(j + 1) * d], a);
                }
                max[r] = m_new;
            }
        }
    }
    for r in 0..rows {
        let inv = 1.0 / sum[r];
        acc[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= inv);
    }
    Ok(acc)
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
}
