//! The Gemma 3 layer maths on a tiny random Gemma 3 file (f32 weights, so
//! nothing but the maths differs) against a textbook reference written here
//! with plain loops: scaled embeddings, RMS norms (q/k per head, post-norms),
//! NEOX RoPE with 10,000 on sliding layers and the file's base on full ones,
//! sliding-window and causal masks, GeGLU, tied output. The window (8) is far
//! shorter than the sequence (40), so the masks matter; the runtime computes
//! the sequence in chunks and single steps, reading K/V from the paged store.
#![allow(clippy::unwrap_used)] // helpers of a test binary: a failed unwrap is a failed test, which is the point

mod common;

use candle_core::quantized::GgmlDType;
use candle_core::Device;
use kv::{AttentionKind, KvCache, KvDType, Namespace, OwnerId};
use model::tiny::{write_tiny_gguf, TinySpec};
use model::{GgufFile, LlamaModel, ModelConfig, PagedKvStore};

fn spec() -> TinySpec {
    TinySpec { dtype: GgmlDType::F32, seed: 11, ..TinySpec::gemma3() }
}

struct Weights {
    file: GgufFile,
}

impl Weights {
    fn matrix(&self, name: &str) -> Vec<Vec<f32>> {
        self.file.tensor(name, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap().to_vec2().unwrap()
    }
    fn vector(&self, name: &str) -> Vec<f32> {
        self.file.tensor(name, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap().to_vec1().unwrap()
    }
}

fn matvec(w: &[Vec<f32>], x: &[f32]) -> Vec<f32> {
    w.iter().map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum()).collect()
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * r * g).collect()
}

/// NEOX rotation of one head at position `p`.
fn rope(x: &mut [f32], p: usize, base: f32) {
    let d = x.len();
    let half = d / 2;
    for i in 0..half {
        let theta = p as f32 * (1.0 / base.powf(2.0 * i as f32 / d as f32));
        let (c, s) = (theta.cos(), theta.sin());
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * c - b * s;
        x[i + half] = a * s + b * c;
    }
}

fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + ((2.0 / std::f32::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

/// Logits at every position of `tokens`, computed from scratch.
fn reference(w: &Weights, c: &ModelConfig, tokens: &[u32]) -> Vec<Vec<f32>> {
    let (d, eps) = (c.head_dim, c.rms_eps);
    let embed = w.matrix("token_embd.weight");
    let mut x: Vec<Vec<f32>> =
        tokens.iter().map(|&t| embed[t as usize].iter().map(|v| v * (c.hidden as f32).sqrt()).collect()).collect();
    for l in 0..c.layers {
        let n = |s: &str| format!("blk.{l}.{s}");
        let window = match c.attention[l] {
            AttentionKind::Full => usize::MAX,
            AttentionKind::SlidingWindow { window } => window as usize,
        };
        let base = if window == usize::MAX { c.rope_base } else { 10_000.0 };
        let (wq, wk, wv, wo) = (
            w.matrix(&n("attn_q.weight")),
            w.matrix(&n("attn_k.weight")),
            w.matrix(&n("attn_v.weight")),
            w.matrix(&n("attn_output.weight")),
        );
        let (qn, kn) = (w.vector(&n("attn_q_norm.weight")), w.vector(&n("attn_k_norm.weight")));
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (p, xt) in x.iter().enumerate() {
            let h = rms_norm(xt, &w.vector(&n("attn_norm.weight")), eps);
            let mut q = matvec(&wq, &h);
            let mut k = matvec(&wk, &h);
            for head in q.chunks_exact_mut(d) {
                let normed = rms_norm(head, &qn, eps);
                head.copy_from_slice(&normed);
                rope(head, p, base);
            }
            for head in k.chunks_exact_mut(d) {
                let normed = rms_norm(head, &kn, eps);
                head.copy_from_slice(&normed);
                rope(head, p, base);
            }
            qs.push(q);
            ks.push(k);
            vs.push(matvec(&wv, &h));
        }
        let group = c.heads / c.kv_heads;
        for (t, xt) in x.iter_mut().enumerate() {
            let mut attn = vec![0f32; c.heads * d];
            for h in 0..c.heads {
                let g = h / group;
                let q = &qs[t][h * d..(h + 1) * d];
                let keys: Vec<usize> = (0..=t).filter(|&j| t - j < window).collect();
                let scores: Vec<f32> = keys
                    .iter()
                    .map(|&j| {
                        q.iter().zip(&ks[j][g * d..(g + 1) * d]).map(|(a, b)| a * b).sum::<f32>() / (d as f32).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f32::MIN, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f32 = e.iter().sum();
                for (&j, p) in keys.iter().zip(&e) {
                    for (o, v) in attn[h * d..(h + 1) * d].iter_mut().zip(&vs[j][g * d..(g + 1) * d]) {
                        *o += p / sum * v;
                    }
                }
            }
            let o = rms_norm(&matvec(&wo, &attn), &w.vector(&n("post_attention_norm.weight")), eps);
            for (a, b) in xt.iter_mut().zip(&o) {
                *a += b;
            }
            let h = rms_norm(xt, &w.vector(&n("ffn_norm.weight")), eps);
            let gate = matvec(&w.matrix(&n("ffn_gate.weight")), &h);
            let up = matvec(&w.matrix(&n("ffn_up.weight")), &h);
            let f: Vec<f32> = gate.iter().zip(&up).map(|(g, u)| gelu_tanh(*g) * u).collect();
            let down =
                rms_norm(&matvec(&w.matrix(&n("ffn_down.weight")), &f), &w.vector(&n("post_ffw_norm.weight")), eps);
            for (a, b) in xt.iter_mut().zip(&down) {
                *a += b;
            }
        }
    }
    let norm = w.vector("output_norm.weight");
    x.iter().map(|xt| matvec(&embed, &rms_norm(xt, &norm, eps))).collect()
}

#[test]
fn gemma3_layers_match_a_textbook_reference_in_chunks_and_steps() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gemma3-tiny.gguf");
    write_tiny_gguf(&path, &spec()).unwrap();
    let file = GgufFile::open(&path).unwrap();
    let model = LlamaModel::load(&file, &Device::Cpu).unwrap();
    let c = model.config().clone();
    assert_eq!((c.rope_base, c.rope_base_local), (1_000_000.0, 10_000.0));
    assert_eq!(c.attention.iter().filter(|k| **k == AttentionKind::Full).count(), 1);
    let tokens: Vec<u32> = (0..40u32).map(|i| (i * 37 + 11) % 300).collect();
    let want = reference(&Weights { file: GgufFile::open(&path).unwrap() }, &c, &tokens);

    let kv = c.cache_spec(4, 64, KvDType::F32).unwrap();
    let mut store = PagedKvStore::new(&kv);
    let mut cache = KvCache::new(kv);
    let seq = cache.create_sequence(&OwnerId::new("t").unwrap(), Namespace::new(b"tiny-gemma", b""));
    // Chunks of 13, 9 and 11 tokens, then single steps: every chunk boundary
    // falls inside a block and inside a window.
    let mut at = 0;
    let mut worst = 0f32;
    for len in [13, 9, 11, 1, 1, 1, 1, 1, 1, 1] {
        let chunk = &tokens[at..at + len];
        let got: Vec<f32> = common::forward(&model, &mut cache, &mut store, &[(seq, chunk)])
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        at += len;
        let r = &want[at - 1];
        let scale = r.iter().map(|v| v.abs()).fold(0f32, f32::max);
        let diff = got.iter().zip(r).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        worst = worst.max(diff / scale);
        assert!(diff <= 1e-4 * scale, "position {}: logits differ by {diff} (largest logit {scale})", at - 1);
    }
    assert_eq!(at, tokens.len());
    eprintln!("largest relative difference {worst:e}");
}
