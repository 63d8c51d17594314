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
//!
//! | concept | file |
//! |---|---|
//! | instruction sets, detected at run time | `isa.rs` |
//! | activations quantized to 8 bits (Q8_1, Q8_K) | `acts.rs` |
//! | the Q4_1 layout, its tile and reference kernels | `q4_1.rs` |
//! | the 8-bit layout (Q8_0, unpacked K-quants), its kernels | `q8.rs` |
//! | the parallel output view over the step workers | `out.rs` |
//! | the AVX2 and AVX-512 VNNI kernels | `x86.rs` |
//! | the entry points [`matmul`] and [`matmul_q8`] | here |

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

mod acts;
mod isa;
mod out;
mod q4_1;
mod q8;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)] // SIMD intrinsics; every block documents its safety
mod x86;

use acts::block_scale;
pub use acts::Q8Acts;
pub use isa::Isa;
use out::{par_columns, OutColumns};
pub use q4_1::Q4_1Matrix;
use q4_1::{column_scalar, tile};
pub use q8::Q8Matrix;
use q8::{tile_q8, Q8_ROWS};

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

/// `x[m, k] · Wᵀ` → `[m, n]` for 8-bit weights (Q8_0 and everything that
/// converts to it). Per column and row, block by block: the exact integer
/// dots of the block's two halves with the activation codes (`lo`: weights
/// 0..16, `hi`: 16..32), each scaled and accumulated with one fused
/// multiply-add, `acc = (scale · d_x) × lo + acc`, then
/// `acc = (scale_hi · d_x) × hi + acc` (`scale_hi` is `scale` for formats
/// with one scale per block); at the end the minimums' `Σ min · d_x · Σq_x`
/// is added (`min_terms`). Every kernel computes exactly this (integer
/// sums are exact in any order), so every instruction set and every row
/// count gives the same bits. The layout is why: candle's order for Q8_0
/// (eight float lanes of four weights per column) takes sixteen float
/// operations per column and block instead of four, and that float work
/// would be most of Gemma-3's prefill.
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
