use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use super::acts::quantize_block;
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
        for m in [1, 2, 3, 4, 5, 7, 8, 9, 17, 70] {
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

/// Many parallel runs, a last run shorter than the others, a last
/// partial group (8-bit) and a last partial tile (Q4_1): every kernel
/// writes exactly its columns of the row-major result, and the bits
/// equal the scalar reference's.
#[test]
fn runs_of_columns_land_in_their_place_in_the_row_major_result() {
    let (n, k) = (1001, 64);
    let wf = Tensor::from_vec(rand(n * k, 5), (n, k), &Device::Cpu).unwrap();
    let q4 = QTensor::quantize(&wf, GgmlDType::Q4_1).unwrap();
    let w4 = Q4_1Matrix::from_ggml_bytes(&q4.data().unwrap(), n, k).unwrap();
    let q8 = QTensor::quantize(&wf, GgmlDType::Q8_0).unwrap();
    let w8 = Q8Matrix::from_ggml_bytes(&q8.data().unwrap(), n, k).unwrap();
    for m in [1, 2, 5, 17] {
        let x = rand(m * k, m as u64);
        let (want4, want8) = (matmul(&w4, &x, m, Isa::Scalar).unwrap(), matmul_q8(&w8, &x, m, Isa::Scalar).unwrap());
        assert_eq!(want8.len(), m * n);
        for isa in [Isa::Avx2, Isa::Avx512Vnni].into_iter().filter(|i| i.available()) {
            let got4 = matmul(&w4, &x, m, isa).unwrap();
            let got8 = matmul_q8(&w8, &x, m, isa).unwrap();
            for (name, got, want) in [("q4_1", &got4, &want4), ("q8_0", &got8, &want8)] {
                let bad = got.iter().zip(want.iter()).position(|(a, b)| a.to_bits() != b.to_bits());
                assert!(bad.is_none(), "{name} {isa:?} m={m}: first difference at {bad:?}");
            }
        }
    }
}

/// Batch invariance: row `r` of an `m`-row product has the bits of the
/// same row computed alone, for every row count up to 64 and beyond a
/// row tile, on every instruction set.
#[test]
fn each_row_is_bit_identical_to_the_row_computed_alone() {
    let (n, k) = (40, 192);
    let wf = Tensor::from_vec(rand(n * k, 91), (n, k), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&wf, GgmlDType::Q4_1).unwrap();
    let w = Q4_1Matrix::from_ggml_bytes(&q.data().unwrap(), n, k).unwrap();
    let q8 = QTensor::quantize(&wf, GgmlDType::Q8_0).unwrap();
    let w8 = Q8Matrix::from_ggml_bytes(&q8.data().unwrap(), n, k).unwrap();
    let x = rand(67 * k, 17);
    for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni].into_iter().filter(|i| i.available()) {
        let alone: Vec<Vec<f32>> = (0..67).map(|r| matmul(&w, &x[r * k..(r + 1) * k], 1, isa).unwrap()).collect();
        let alone8: Vec<Vec<f32>> = (0..67).map(|r| matmul_q8(&w8, &x[r * k..(r + 1) * k], 1, isa).unwrap()).collect();
        for m in (1..=64).chain([67]) {
            let got = matmul(&w, &x[..m * k], m, isa).unwrap();
            let got8 = matmul_q8(&w8, &x[..m * k], m, isa).unwrap();
            for r in 0..m {
                let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same(&got[r * n..(r + 1) * n], &alone[r]), "Q4_1 {isa:?} m={m} row {r}");
                assert!(same(&got8[r * n..(r + 1) * n], &alone8[r]), "Q8_0 {isa:?} m={m} row {r}");
            }
        }
    }
}

/// Every 8-bit format against candle's quantized matmul, which
/// quantizes activations as GGML does: Q8_0 per 32 for Q8_0, Q4_0 and
/// Q5_0, Q8_K per 256 for the K-quants. Only the summation order
/// differs, so the results agree to float rounding (with activations
/// quantized per 32 for a K-quant they would not: ~1e-2).
#[test]
fn eight_bit_kernels_match_candle() {
    let dev = Device::Cpu;
    let cases = [
        (GgmlDType::Q8_0, 1, 64),
        (GgmlDType::Q8_0, 37, 96),
        (GgmlDType::Q8_0, 70, 576),
        (GgmlDType::Q4_0, 19, 128),
        (GgmlDType::Q5_0, 19, 128),
        (GgmlDType::Q4K, 17, 512),
        (GgmlDType::Q5K, 9, 256),
        (GgmlDType::Q6K, 17, 768),
    ];
    for (dtype, n, k) in cases {
        let wf = Tensor::from_vec(rand(n * k, (n * k) as u64 + 3), (n, k), &dev).unwrap();
        let q = QTensor::quantize(&wf, dtype).unwrap();
        let ours = Q8Matrix::from_ggml(dtype, &q.data().unwrap(), n, k).unwrap();
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
                let got = matmul_q8(&ours, &x, m, isa).unwrap();
                for (a, b) in got.iter().zip(&expected) {
                    // The same products, summed in another order (exact
                    // integer dots per half block here, float lanes of
                    // four in candle): equal within rounding. Bit
                    // equality across instruction sets is checked
                    // against the scalar reference elsewhere.
                    assert!(
                        (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                        "{dtype:?} {isa:?} n={n} k={k} m={m}: {a} vs {b}"
                    );
                }
            }
        }
    }
}

/// Shapes candle cannot check (an odd number of blocks per row, tiles
/// with and without a partial tail): every SIMD kernel equals the
/// scalar reference bit for bit, and stacking matrices equals running
/// them apart.
#[test]
fn simd_kernels_equal_the_scalar_reference_and_stacking_changes_nothing() {
    let quantize = |n: usize, k: usize, seed: u64| {
        let wf = Tensor::from_vec(rand(n * k, seed), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&wf, GgmlDType::Q4_1).unwrap();
        Q4_1Matrix::from_ggml_bytes(&q.data().unwrap(), n, k).unwrap()
    };
    for k in [32, 96, 160, 576] {
        for n in [1, 7, 8, 9, 16, 17, 41] {
            let w = quantize(n, k, (n * 31 + k) as u64);
            for m in [1, 2, 3, 5, 8] {
                let x = rand(m * k, (m * 7 + k) as u64);
                let reference = matmul(&w, &x, m, Isa::Scalar).unwrap();
                for isa in [Isa::Avx2, Isa::Avx512Vnni].into_iter().filter(|i| i.available()) {
                    let got = matmul(&w, &x, m, isa).unwrap();
                    assert!(
                        got.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{isa:?} n={n} k={k} m={m}"
                    );
                }
            }
        }
    }
    let (a, b) = (quantize(13, 96, 1), quantize(24, 96, 2));
    let x = rand(3 * 96, 5);
    let (ya, yb) = (matmul(&a, &x, 3, Isa::detect()).unwrap(), matmul(&b, &x, 3, Isa::detect()).unwrap());
    let both = Q4_1Matrix::stack(vec![a, b]).unwrap();
    let y = matmul(&both, &x, 3, Isa::detect()).unwrap();
    for r in 0..3 {
        assert_eq!(y[r * 37..r * 37 + 13], ya[r * 13..(r + 1) * 13]);
        assert_eq!(y[r * 37 + 13..(r + 1) * 37], yb[r * 24..(r + 1) * 24]);
    }
}

/// The SIMD quantizer equals the scalar one, ties and zeros included.
#[test]
fn activation_quantization_is_the_same_with_and_without_simd() {
    let mut x = rand(32 * 64, 11);
    // Exact ties after scaling: with max 127 the scale is 1.
    x[..32].copy_from_slice(&std::array::from_fn::<f32, 32, _>(|i| i as f32 - 15.5));
    x[31] = 127.0;
    x[32..64].fill(0.0);
    x[64..96].iter_mut().enumerate().for_each(|(i, v)| *v = if i % 2 == 0 { -1e-30 } else { 2.5 });
    for (xs, b) in x.chunks_exact(32).zip(0..) {
        let mut a = [0i8; 32];
        let expected = quantize_block(xs, &mut a);
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            let mut s = [0i8; 32];
            #[allow(unsafe_code)]
            // SAFETY: AVX2 detected.
            let got = unsafe { x86::quantize_block_avx2(xs, &mut s) };
            assert_eq!((got.0.to_bits(), got.1, s), (expected.0.to_bits(), expected.1, a), "block {b}");
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

/// Every type the 8-bit kernel takes, with a shape it fits.
const FORMATS: [(GgmlDType, usize); 6] = [
    (GgmlDType::Q8_0, 96),
    (GgmlDType::Q4_0, 96),
    (GgmlDType::Q5_0, 160),
    (GgmlDType::Q4K, 512),
    (GgmlDType::Q5K, 256),
    (GgmlDType::Q6K, 768),
];

fn q8_of(dtype: GgmlDType, n: usize, k: usize, seed: u64) -> (Q8Matrix, QTensor) {
    let wf = Tensor::from_vec(rand(n * k, seed), (n, k), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&wf, dtype).unwrap();
    (Q8Matrix::from_ggml(dtype, &q.data().unwrap(), n, k).unwrap(), q)
}

#[test]
fn every_format_unpacks_to_ggml_values_bit_for_bit() {
    for (dtype, k) in FORMATS {
        let n = 5;
        let (ours, q) = q8_of(dtype, n, k, k as u64 + 1);
        let theirs: Vec<Vec<f32>> = q.dequantize(&Device::Cpu).unwrap().to_vec2().unwrap();
        let mut row = vec![0f32; k];
        for (r, want) in theirs.iter().enumerate() {
            ours.dequantize_row(r, &mut row);
            let same = row.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0));
            assert!(same, "{dtype:?} row {r}: {:?} vs {:?}", &row[..8], &want[..8]);
        }
    }
}

/// Awkward shapes for every format: every instruction set gives the
/// scalar reference's bits, each row's bits are its bits alone, and the
/// result is the dequantized matmul up to the activations' rounding.
#[test]
fn eight_bit_kernels_equal_the_reference_and_rows_are_batch_invariant() {
    for (dtype, k) in FORMATS {
        for n in [1, 9, 17] {
            let (w, q) = q8_of(dtype, n, k, (n * 13 + k) as u64);
            let dense: Vec<Vec<f32>> = q.dequantize(&Device::Cpu).unwrap().to_vec2().unwrap();
            let x = rand(19 * k, (n + k) as u64);
            let alone: Vec<Vec<f32>> =
                (0..19).map(|r| matmul_q8(&w, &x[r * k..(r + 1) * k], 1, Isa::Scalar).unwrap()).collect();
            for m in [1, 2, 3, 7, 8, 9, 19] {
                for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni].into_iter().filter(|i| i.available()) {
                    let got = matmul_q8(&w, &x[..m * k], m, isa).unwrap();
                    for r in 0..m {
                        let row = &got[r * n..(r + 1) * n];
                        let same = row.iter().zip(&alone[r]).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{dtype:?} {isa:?} n={n} m={m} row {r}: {row:?} vs {:?}", alone[r]);
                    }
                }
            }
            for (r, want) in alone.iter().enumerate().take(3) {
                for (j, &got) in want.iter().enumerate() {
                    let exact: f32 = dense[j].iter().zip(&x[r * k..(r + 1) * k]).map(|(a, b)| a * b).sum();
                    let scale: f32 = dense[j].iter().map(|v| v.abs()).sum::<f32>() / 64.0;
                    assert!((got - exact).abs() <= scale, "{dtype:?} row {r} col {j}: {got} vs {exact}");
                }
            }
        }
    }
}

/// Matrices whose activations are quantized alike stack (q, k and v of
/// Gemma-3 are Q5_0 and Q8_0); a K-quant beside a 32-block format does
/// not (its activations are Q8_K), and the model keeps those apart.
#[test]
fn stacking_eight_bit_formats_changes_no_output() {
    let k = 256;
    let groups =
        [[GgmlDType::Q5_0, GgmlDType::Q8_0, GgmlDType::Q4_0], [GgmlDType::Q6K, GgmlDType::Q4K, GgmlDType::Q5K]];
    let x = rand(3 * k, 9);
    for parts in groups {
        let mut apart = Vec::new();
        let mut matrices = Vec::new();
        for (i, dtype) in parts.into_iter().enumerate() {
            let (w, _) = q8_of(dtype, 8 + i, k, i as u64);
            apart.push(matmul_q8(&w, &x, 3, Isa::detect()).unwrap());
            matrices.push(w);
        }
        assert!(Q8Matrix::stackable(&parts));
        let both = Q8Matrix::stack(matrices).unwrap();
        let y = matmul_q8(&both, &x, 3, Isa::detect()).unwrap();
        let n = both.rows();
        for r in 0..3 {
            let mut at = 0;
            for (i, a) in apart.iter().enumerate() {
                let w = 8 + i;
                let same = y[r * n + at..r * n + at + w]
                    .iter()
                    .zip(&a[r * w..(r + 1) * w])
                    .all(|(p, q)| p.to_bits() == q.to_bits());
                assert!(same, "{parts:?} part {i} row {r}");
                at += w;
            }
        }
    }
    let mixed = [GgmlDType::Q8_0, GgmlDType::Q4K];
    assert!(!Q8Matrix::stackable(&mixed));
    let matrices = mixed.into_iter().map(|d| q8_of(d, 8, k, 1).0).collect();
    assert!(Q8Matrix::stack(matrices).is_err(), "a K-quant and Q8_0 quantize activations differently");
    assert!(Q8Matrix::from_ggml(GgmlDType::Q4K, &[0; 144], 1, 128).is_err(), "K-quants need rows of 256");
    assert!(Q8Matrix::from_ggml(GgmlDType::Q5_1, &[0; 24], 1, 32).is_err());
}
