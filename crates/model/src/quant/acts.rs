//! Activations quantized to 8 bits (Q8_1 per 32, Q8_K per 256), as the
//! kernels read them.

#[allow(clippy::wildcard_imports)]
use super::*;

/// Activations quantized to 8 bits, `[m, k]`: as Q8_1 (per 32, f16 scale;
/// [`Q8Acts::quantize`]) or as Q8_K (per 256, f32 scale, stored per block
/// of 32 all the same; [`Q8Acts::quantize_k`]).
pub struct Q8Acts {
    pub(super) m: usize,
    pub(super) k: usize,
    pub(super) codes: Vec<i8>,
    /// The f16-rounded scale of each block, as f32.
    pub(super) scale: Vec<f32>,
    /// The f16 `s = f16(Σq) · d` of each block, as f32.
    pub(super) sum: Vec<f32>,
    /// `d · Σq` of each block (the f32 product, `Σq` exact).
    pub(super) xsum: Vec<f32>,
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
    pub(super) fn half_sums(&self) -> Vec<i32> {
        self.codes.chunks_exact(16).map(|h| -128 * h.iter().map(|&q| i32::from(q)).sum::<i32>()).collect()
    }

    /// Row `r`'s `d · Σq` per block (`nb` blocks per row).
    pub(super) fn xsum_of(&self, r: usize, nb: usize) -> &[f32] {
        &self.xsum[r * nb..(r + 1) * nb]
    }
}

/// One block of activations to 8 bits: codes `round(x / d)` (half away
/// from zero) with `d = max|x| / 127`; returns `d` and the codes' sum.
pub(super) fn quantize_block(xs: &[f32], qs: &mut [i8]) -> (f32, i32) {
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
pub(super) fn block_scale(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    (d, if d != 0.0 { 1.0 / d } else { 0.0 })
}
