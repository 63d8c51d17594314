//! Criterion benchmarks of the quantized matmul kernels against candle's
//! quantized matmul and a dense f32 GEMM, on the default model's shapes.
//!
//! `cargo bench -p model --bench kernels`
#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::hint::black_box;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use model::quant::{matmul, matmul_q8, Isa, Q4_1Matrix, Q8Matrix};

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn q4_1(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut g = c.benchmark_group("q4_1");
    // (n, k): attention output / q, ffn down, ffn gate+up fused.
    for (n, k) in [(576, 576), (576, 1536), (3072, 576)] {
        let w = Tensor::from_vec(data(n * k, 1), (n, k), &dev).expect("tensor");
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).expect("quantize");
        let ours = Q4_1Matrix::from_ggml_bytes(&q.data().expect("bytes"), n, k).expect("layout");
        let theirs = QMatMul::from_qtensor(q).expect("qmatmul");
        let dense = w.t().expect("t");
        for m in [1usize, 8, 128] {
            let x = data(m * k, 2);
            let xt = Tensor::from_vec(x.clone(), (m, k), &dev).expect("tensor");
            g.throughput(Throughput::Elements((m * n * k) as u64));
            let id = format!("{n}x{k}/m{m}");
            for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni].into_iter().filter(|i| i.available()) {
                if isa == Isa::Scalar && m > 8 {
                    continue;
                }
                g.bench_with_input(BenchmarkId::new(isa.name(), &id), &x, |b, x| {
                    b.iter(|| black_box(matmul(&ours, x, m, isa).expect("matmul")))
                });
            }
            g.bench_with_input(BenchmarkId::new("candle", &id), &xt, |b, x| {
                b.iter(|| black_box(theirs.forward(x).expect("forward")))
            });
            g.bench_with_input(BenchmarkId::new("dense-gemm", &id), &xt, |b, x| {
                b.iter(|| black_box(x.matmul(&dense).expect("matmul")))
            });
        }
    }
    g.finish();
}

fn q8_0(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut g = c.benchmark_group("q8_0");
    // The default model's vocabulary projection.
    let (n, k) = (49_152, 576);
    let w = Tensor::from_vec(data(n * k, 3), (n, k), &dev).expect("tensor");
    let q = QTensor::quantize(&w, GgmlDType::Q8_0).expect("quantize");
    let ours = Q8Matrix::from_ggml_bytes(&q.data().expect("bytes"), n, k).expect("layout");
    let theirs = QMatMul::from_qtensor(q).expect("qmatmul");
    for m in [1usize, 8] {
        let x = data(m * k, 4);
        let xt = Tensor::from_vec(x.clone(), (m, k), &dev).expect("tensor");
        g.throughput(Throughput::Elements((m * n * k) as u64));
        let id = format!("{n}x{k}/m{m}");
        g.bench_with_input(BenchmarkId::new(Isa::detect().name(), &id), &x, |b, x| {
            b.iter(|| black_box(matmul_q8(&ours, x, m, Isa::detect()).expect("matmul")))
        });
        g.bench_with_input(BenchmarkId::new("candle", &id), &xt, |b, x| {
            b.iter(|| black_box(theirs.forward(x).expect("forward")))
        });
    }
    g.finish();
}

/// Every Q4_1 matmul of one step of the default model (30 layers: fused
/// q/k/v, attention output, fused gate/up, down), so the weights stream from
/// memory as in real decoding rather than sitting in cache.
fn decode_step(c: &mut Criterion) {
    let dev = Device::Cpu;
    let shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)];
    let mut layers = Vec::new();
    for l in 0..30u64 {
        for (i, &(n, k)) in shapes.iter().enumerate() {
            let w = Tensor::from_vec(data(n * k, l * 7 + i as u64), (n, k), &dev).expect("tensor");
            let q = QTensor::quantize(&w, GgmlDType::Q4_1).expect("quantize");
            layers.push(Q4_1Matrix::from_ggml_bytes(&q.data().expect("bytes"), n, k).expect("layout"));
        }
    }
    let mut g = c.benchmark_group("decode_step_q4_1");
    g.sample_size(20);
    let isa = Isa::detect();
    for m in [1usize, 4, 8, 16] {
        let (x576, x1536) = (data(m * 576, 9), data(m * 1536, 10));
        g.bench_function(BenchmarkId::new(isa.name(), format!("m{m}")), |b| {
            b.iter(|| {
                for w in &layers {
                    let x = if w.cols() == 576 { &x576 } else { &x1536 };
                    black_box(matmul(w, x, m, isa).expect("matmul"));
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, q4_1, q8_0, decode_step);
criterion_main!(benches);
