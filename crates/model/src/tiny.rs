//! Tiny random-weight GGUF files for tests: the same loading path as a real
//! model (tokenizer metadata, quantized weights, optional biases), small
//! enough to run in milliseconds. Deterministic for a given seed (a
//! splitmix64 generator, so this module needs no `rand` dependency).

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::error::Result;

/// What to build.
#[derive(Clone, Debug)]
pub struct TinySpec {
    /// `general.architecture`: "llama", "qwen2", "gemma3" (with its extra
    /// norms; set `sliding_window`), or anything (to test errors).
    pub arch: String,
    /// Transformer blocks.
    pub layers: usize,
    /// Hidden size (a multiple of 32).
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// K/V heads.
    pub kv_heads: usize,
    /// Feed-forward size (a multiple of 32).
    pub ffn: usize,
    /// Context length.
    pub context: usize,
    /// Weight type of the matrices.
    pub dtype: GgmlDType,
    /// Random seed.
    pub seed: u64,
    /// `{arch}.attention.sliding_window`, written when set.
    pub sliding_window: Option<u32>,
    /// `{arch}.rope.freq_base`.
    pub rope_base: f32,
    /// Scale of the attention and gate/up weights relative to
    /// `1/sqrt(hidden)`: the default 6 makes greedy decoding of random
    /// weights varied (and chaotic); smaller is tamer.
    pub weight_scale: f32,
    /// More metadata, written after the rest (tests of bad values).
    pub extra_metadata: Vec<(String, Value)>,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            arch: "llama".into(),
            layers: 2,
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            ffn: 128,
            context: 512,
            dtype: GgmlDType::Q8_0,
            seed: 7,
            sliding_window: None,
            rope_base: 10_000.0,
            weight_scale: 6.0,
            extra_metadata: Vec::new(),
        }
    }
}

impl TinySpec {
    /// A tiny Gemma 3: six layers (five sliding with a window of 8 tokens,
    /// then one full), hidden 64, two query heads sharing one K/V head,
    /// feed-forward 96, RoPE base 1e6 on the full layer.
    pub fn gemma3() -> Self {
        Self {
            arch: "gemma3".into(),
            layers: 6,
            hidden: 64,
            heads: 2,
            kv_heads: 1,
            ffn: 96,
            sliding_window: Some(8),
            rope_base: 1_000_000.0,
            weight_scale: 2.0,
            ..Self::default()
        }
    }
}

/// Specials after the 256 byte tokens.
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Vocabulary size of a tiny model: 256 byte tokens, the specials, padding to 320.
pub const VOCAB: usize = 320;

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0 // uniform in [-1, 1)
    }
}

/// GPT-2's byte-to-unicode table: the token string of each byte.
pub fn byte_tokens() -> Vec<String> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    let mut table = vec![String::new(); 256];
    for (b, c) in printable.iter().zip(&chars) {
        table[*b as usize] = char::from_u32(*c).map(String::from).unwrap_or_default();
    }
    table
}

/// Writes a tiny model to `path`.
///
/// # Errors
/// I/O or quantization failures.
pub fn write_tiny_gguf(path: &Path, spec: &TinySpec) -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = SplitMix(spec.seed);
    let head_dim = spec.hidden / spec.heads;
    let mut rand = |dims: &[usize], scale: f32| -> Result<Tensor> {
        let n: usize = dims.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.next() * scale).collect();
        Ok(Tensor::from_vec(data, dims, &dev)?)
    };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let w = 1.0 / (spec.hidden as f32).sqrt();
    let q = |t: Tensor, dtype| -> Result<QTensor> { Ok(QTensor::quantize(&t, dtype)?) };
    tensors.push(("token_embd.weight".into(), q(rand(&[VOCAB, spec.hidden], 1.0)?, spec.dtype)?));
    tensors.push(("output_norm.weight".into(), q((rand(&[spec.hidden], 0.1)? + 1.0)?, GgmlDType::F32)?));
    let (qo, kvo) = (spec.heads * head_dim, spec.kv_heads * head_dim);
    for i in 0..spec.layers {
        let n = |s: &str| format!("blk.{i}.{s}");
        for (name, dims) in [
            ("attn_q.weight", [qo, spec.hidden]),
            ("attn_k.weight", [kvo, spec.hidden]),
            ("attn_v.weight", [kvo, spec.hidden]),
            ("attn_output.weight", [spec.hidden, qo]),
            ("ffn_gate.weight", [spec.ffn, spec.hidden]),
            ("ffn_up.weight", [spec.ffn, spec.hidden]),
        ] {
            tensors.push((n(name), q(rand(&dims, w * spec.weight_scale)?, spec.dtype)?));
        }
        tensors.push((
            n("ffn_down.weight"),
            q(rand(&[spec.hidden, spec.ffn], 2.0 / (spec.ffn as f32).sqrt())?, spec.dtype)?,
        ));
        tensors.push((n("attn_norm.weight"), q((rand(&[spec.hidden], 0.1)? + 1.0)?, GgmlDType::F32)?));
        tensors.push((n("ffn_norm.weight"), q((rand(&[spec.hidden], 0.1)? + 1.0)?, GgmlDType::F32)?));
        if spec.arch == "gemma3" {
            for (name, len) in [
                ("attn_q_norm.weight", head_dim),
                ("attn_k_norm.weight", head_dim),
                ("post_attention_norm.weight", spec.hidden),
                ("post_ffw_norm.weight", spec.hidden),
            ] {
                tensors.push((n(name), q((rand(&[len], 0.3)? + 1.0)?, GgmlDType::F32)?));
            }
        }
        if spec.arch == "qwen2" {
            tensors.push((n("attn_q.bias"), q(rand(&[qo], 0.2)?, GgmlDType::F32)?));
            tensors.push((n("attn_k.bias"), q(rand(&[kvo], 0.2)?, GgmlDType::F32)?));
            tensors.push((n("attn_v.bias"), q(rand(&[kvo], 0.2)?, GgmlDType::F32)?));
        }
    }

    let mut tokens = byte_tokens();
    tokens.extend(SPECIALS.iter().map(|s| s.to_string()));
    while tokens.len() < VOCAB {
        tokens.push(format!("<unused{}>", tokens.len()));
    }
    let types: Vec<Value> =
        (0..VOCAB).map(|i| Value::I32(if (256..256 + SPECIALS.len()).contains(&i) { 3 } else { 1 })).collect();
    let a = |k: &str| format!("{}.{k}", spec.arch);
    let u = |v: usize| Value::U32(v as u32);
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(spec.arch.clone())),
        (a("block_count"), u(spec.layers)),
        (a("embedding_length"), u(spec.hidden)),
        (a("feed_forward_length"), u(spec.ffn)),
        (a("attention.head_count"), u(spec.heads)),
        (a("attention.head_count_kv"), u(spec.kv_heads)),
        (a("context_length"), u(spec.context)),
        (a("rope.dimension_count"), u(head_dim)),
        (a("rope.freq_base"), Value::F32(spec.rope_base)),
        (a("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(Vec::new())),
        ("tokenizer.ggml.bos_token_id".into(), u(257)),
        ("tokenizer.ggml.eos_token_id".into(), u(258)),
    ];
    let mut metadata = metadata;
    if let Some(w) = spec.sliding_window {
        metadata.push((a("attention.sliding_window"), Value::U32(w)));
    }
    metadata.extend(spec.extra_metadata.iter().cloned());
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).map_err(candle_core::Error::from)?);
    gguf_file::write(&mut file, &md, &ts)?;
    std::io::Write::flush(&mut file).map_err(candle_core::Error::from)?;
    Ok(())
}
