//! GGML's block formats rewritten, exactly, as 8-bit codes with float
//! scales: the one layout the 8-bit kernel (`quant::Q8Matrix`) multiplies.
//!
//! Every format below stores a weight as `scale × code + min` with small
//! integer codes; only the packing differs. Unpacking once at load keeps one
//! kernel (and one numeric path, so the batch-invariance argument is made
//! once) for all of them:
//!
//! | format | block | weight | here: code, scale (per 16 / per 32), min |
//! |---|---|---|---|
//! | Q8_0 | 32 | `d·q`, q ∈ [−127, 127] | q, d, — |
//! | Q4_0 | 32 | `d·(q − 8)`, q 4-bit | q − 8, d, — |
//! | Q5_0 | 32 | `d·(q − 16)`, q 5-bit | q − 16, d, — |
//! | Q4_K | 256 = 8 × 32 | `d·sc_j·q − dmin·m_j`, q 4-bit, sc/m 6-bit | q, d·sc_j, −dmin·m_j |
//! | Q5_K | 256 = 8 × 32 | as Q4_K with 5-bit q | q, d·sc_j, −dmin·m_j |
//! | Q6_K | 256 = 16 × 16 | `d·sc_j·(q − 32)`, q 6-bit, sc i8 | q − 32, d·sc_j per 16, — |
//!
//! Products like `d·sc_j` (an f16 times a 6- or 8-bit integer) are exact in
//! f32, so nothing is rounded: dequantizing the result gives GGML's values
//! bit for bit (the tests check this against candle's dequantization).
//! The price is memory: a byte per weight instead of 4.5 to 6.6 bits.
//!
//! Why not candle's kernels for these types: they dot one activation row
//! with one column at a time with no reuse across rows (prefill runs ~20×
//! slower than llama.cpp), and Q5_0 has no SIMD path there at all.

use candle_core::quantized::GgmlDType;

use crate::error::{Error, Result};

/// Weights per block of the kernel.
pub(crate) const BLOCK: usize = 32;
pub(crate) const QK_K: usize = 256;

/// A matrix unpacked to codes and per-block parameters, row by row.
pub(crate) struct Unpacked {
    /// One per weight.
    pub(crate) codes: Vec<i8>,
    /// Per block of 32 (the first 16 weights' scale when `scale_hi` is set).
    pub(crate) scale: Vec<f32>,
    /// Per block, the scale of its second 16 weights (Q6_K).
    pub(crate) scale_hi: Option<Vec<f32>>,
    /// Per block, added to every weight of it (K-quants with minimums).
    pub(crate) min: Option<Vec<f32>>,
}

/// The activation block GGML quantizes inputs in for `dtype`'s dot
/// products (its `vec_dot_type`): Q8_K, one f32 scale per 256 values, for
/// the K-quants; Q8_0, one f16 scale per 32, for the rest. The 8-bit kernel
/// quantizes a matrix's activations the same way, so its rounding is
/// llama.cpp's (see `quant::Q8Acts::quantize_k`).
pub(crate) fn activation_block(dtype: GgmlDType) -> usize {
    if matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K) {
        QK_K
    } else {
        BLOCK
    }
}

/// Whether `dtype` converts (see the module doc).
pub(crate) fn supported(dtype: GgmlDType) -> bool {
    matches!(
        dtype,
        GgmlDType::Q8_0 | GgmlDType::Q4_0 | GgmlDType::Q5_0 | GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K
    )
}

fn f16(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Bytes per block and weights per block of a supported type.
fn geometry(dtype: GgmlDType) -> Option<(usize, usize)> {
    Some(match dtype {
        GgmlDType::Q8_0 => (34, 32),
        GgmlDType::Q4_0 => (18, 32),
        GgmlDType::Q5_0 => (22, 32),
        GgmlDType::Q4K => (144, QK_K),
        GgmlDType::Q5K => (176, QK_K),
        GgmlDType::Q6K => (210, QK_K),
        _ => return None,
    })
}

/// Unpacks GGUF block bytes of an `[n, k]` matrix of type `dtype`.
///
/// # Errors
/// [`Error::InvalidBatch`] for an unsupported type, a `k` that is not a
/// multiple of the type's block, or a byte count that does not fit.
pub(crate) fn unpack(dtype: GgmlDType, bytes: &[u8], n: usize, k: usize) -> Result<Unpacked> {
    let (block_bytes, per_block) =
        geometry(dtype).ok_or_else(|| Error::InvalidBatch(format!("no 8-bit kernel layout for {dtype:?}")))?;
    if k == 0 || !k.is_multiple_of(per_block) || bytes.len() != n * k / per_block * block_bytes {
        return Err(Error::InvalidBatch(format!("{dtype:?} data of {} bytes does not fit [{n}, {k}]", bytes.len())));
    }
    let blocks = n * k / BLOCK;
    let mut out =
        Unpacked { codes: Vec::with_capacity(n * k), scale: Vec::with_capacity(blocks), scale_hi: None, min: None };
    // Filled only by the formats that have them (Q6_K, and the K-quants
    // with minimums), kept below only for those.
    let (mut hi, mut min) = (Vec::new(), Vec::new());
    for b in bytes.chunks_exact(block_bytes) {
        match dtype {
            GgmlDType::Q8_0 => {
                out.scale.push(f16(b, 0));
                out.codes.extend(b[2..34].iter().map(|&c| c as i8));
            }
            GgmlDType::Q4_0 | GgmlDType::Q5_0 => {
                out.scale.push(f16(b, 0));
                let (qh, qs, offset) = if dtype == GgmlDType::Q5_0 {
                    (u32::from_le_bytes([b[2], b[3], b[4], b[5]]), &b[6..22], 16)
                } else {
                    (0, &b[2..18], 8)
                };
                let mut block = [0i8; 32];
                for (j, &q) in qs.iter().enumerate() {
                    let lo = (q & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
                    let hi = (q >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
                    block[j] = lo as i8 - offset;
                    block[j + 16] = hi as i8 - offset;
                }
                out.codes.extend_from_slice(&block);
            }
            GgmlDType::Q4K | GgmlDType::Q5K => unpack_k_with_min(dtype, b, &mut out, &mut min),
            GgmlDType::Q6K => unpack_q6k(b, &mut out, &mut hi),
            _ => unreachable!("geometry() admitted only the types above"),
        }
    }
    out.scale_hi = (dtype == GgmlDType::Q6K).then_some(hi);
    out.min = matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K).then_some(min);
    Ok(out)
}

/// GGML's `get_scale_min_k4`: the 6-bit scale and minimum of sub-block `j`.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Q4_K (144 bytes: d, dmin, 12 scale bytes, 128 code bytes) and Q5_K (176
/// bytes: the same plus 32 bytes of fifth bits before the codes).
fn unpack_k_with_min(dtype: GgmlDType, b: &[u8], out: &mut Unpacked, min: &mut Vec<f32>) {
    let (d, dmin) = (f16(b, 0), f16(b, 2));
    let scales = &b[4..16];
    let (qh, ql) = if dtype == GgmlDType::Q5K { (Some(&b[16..48]), &b[48..176]) } else { (None, &b[16..144]) };
    for chunk in 0..4 {
        let q = &ql[chunk * 32..(chunk + 1) * 32];
        for half in 0..2 {
            let (sc, m) = scale_min_k4(2 * chunk + half, scales);
            out.scale.push(d * f32::from(sc));
            min.push(-(dmin * f32::from(m)));
            for l in 0..32 {
                let mut code = if half == 0 { q[l] & 0x0f } else { q[l] >> 4 };
                if let Some(qh) = qh {
                    let bit = 1u8 << (2 * chunk + half);
                    code |= u8::from(qh[l] & bit != 0) << 4;
                }
                out.codes.push(code as i8);
            }
        }
    }
}

/// Q6_K (210 bytes: 128 bytes of low nibbles, 64 of high bit pairs, 16 i8
/// scales, f16 d).
fn unpack_q6k(b: &[u8], out: &mut Unpacked, hi: &mut Vec<f32>) {
    let (ql, qh, sc, d) = (&b[0..128], &b[128..192], &b[192..208], f16(b, 208));
    let mut codes = [0i8; QK_K];
    for half in 0..2 {
        let (ql, qh, y) = (&ql[half * 64..], &qh[half * 32..], &mut codes[half * 128..]);
        for l in 0..32 {
            let q1 = (ql[l] & 0x0f) | ((qh[l] & 3) << 4);
            let q2 = (ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4);
            let q3 = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            let q4 = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
            y[l] = q1 as i8 - 32;
            y[l + 32] = q2 as i8 - 32;
            y[l + 64] = q3 as i8 - 32;
            y[l + 96] = q4 as i8 - 32;
        }
    }
    out.codes.extend_from_slice(&codes);
    // Scale j covers weights 16j..16j+16: blocks of 32 take two each.
    for pair in sc.chunks_exact(2) {
        out.scale.push(d * f32::from(pair[0] as i8));
        hi.push(d * f32::from(pair[1] as i8));
    }
}
