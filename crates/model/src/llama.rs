//! The decoder forward pass (llama, qwen2, gemma3) over a ragged batch, with
//! attention reading the paged K/V store.
//!
//! One call takes any mix of prefill chunks and single-token decodes, each
//! sequence with its own start position, block table and slots. All tokens of
//! the batch are stacked into one `[tokens, hidden]` activation, so every
//! weight matrix is read once per step whatever the batch holds; only
//! attention is per sequence. Per layer: RMSNorm, q/k/v projections (plus
//! qwen2's biases), RoPE at each token's own position, K/V written into the
//! token's slot, paged attention, output projection and residual, RMSNorm,
//! SwiGLU feed-forward and residual. The final norm and the vocabulary
//! projection run only on each sequence's last token.
//!
//! Gemma 3 adds, as llama.cpp's `gemma3` graph does: embeddings scaled by
//! √hidden; RMS norms over each head of q and k (before RoPE); an RMS norm
//! on the attention output and on the feed-forward output before each
//! residual; GeGLU (tanh GELU) instead of SwiGLU; RoPE base 10,000 on the
//! sliding-window layers (`ModelConfig::rope_base_local`); and sliding-window
//! masks on those layers (the attention reads only the window). Its norm
//! weights are stored with Gemma's `1 +` already folded in, so the RMS norm
//! is the usual one. The output projection is tied to the embeddings.
//!
//! Embeddings stored as Q8_0 (both default models) are not dequantized
//! whole: each step dequantizes only its tokens' rows from the same matrix
//! the tied output projection multiplies by (Gemma's 262,144 × 640 table
//! would be 671 MB as f32). RoPE's cos/sin are computed per step for the
//! step's positions (the same f32 operations a table would hold).

use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
use kv::{BlockTable, Slot};

use crate::attention::{paged_attention, Dims, SeqQueries};
use crate::config::{Arch, ModelConfig, RopeScaling};
use crate::dispatch::{Path, PerfTracker, ShapeKey};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::kv_store::PagedKvStore;
use crate::quant::{self, Isa, Q4_1Matrix, Q8Matrix};

/// Which code multiplies by the quantized weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPath {
    /// Measured dispatch (`dispatch.rs`): for Q4_1 weights, kvserve's
    /// kernels (with this instruction set) or a dense f32 GEMM over weights
    /// dequantized at load, whichever has measured cheaper for the shape and
    /// batch; kvserve's kernels for Q8_0; candle for other types. Opt-in
    /// (`KVSERVE_MATMUL=auto`): a row's bits then depend on its batch.
    Auto(Isa),
    /// kvserve's kernels for Q4_1 and Q8_0, always; candle for the rest.
    /// The default: each output row is computed the same way whatever the
    /// batch (batch-invariant greedy output), and no dense copy of the
    /// weights is kept.
    Kernels(Isa),
    /// Dense f32 GEMM for Q4_1, always; candle for the rest.
    Dense,
    /// candle's quantized matmul for everything.
    Candle,
}

impl MatmulPath {
    /// kvserve's kernels with the best instruction set for this CPU
    /// (chosen once; every instruction set gives the same bits), unless
    /// `KVSERVE_MATMUL` overrides it: `auto` (the measured dispatch, which
    /// may switch paths between batches and so is not batch-invariant),
    /// `kernels`, `dense`, `candle`, or an instruction set for the kernels
    /// (`scalar`, `avx2`, `avx512`).
    ///
    /// # Errors
    /// [`Error::InvalidBatch`] for an unknown value or an instruction set
    /// this CPU lacks.
    pub fn from_env() -> Result<Self> {
        let path = match std::env::var("KVSERVE_MATMUL").as_deref() {
            Err(_) | Ok("" | "kernels") => Self::Kernels(Isa::detect()),
            Ok("auto") => Self::Auto(Isa::detect()),
            Ok("dense") => Self::Dense,
            Ok("candle") => Self::Candle,
            Ok("scalar") => Self::Kernels(Isa::Scalar),
            Ok("avx2") => Self::Kernels(Isa::Avx2),
            Ok("avx512") => Self::Kernels(Isa::Avx512Vnni),
            Ok(other) => {
                return Err(Error::InvalidBatch(format!(
                    "KVSERVE_MATMUL={other:?}: expected auto, kernels, dense, candle, scalar, avx2 or avx512"
                )))
            }
        };
        if let Self::Kernels(isa) | Self::Auto(isa) = path {
            if !isa.available() {
                return Err(Error::InvalidBatch(format!("KVSERVE_MATMUL: this CPU cannot run {}", isa.name())));
            }
        }
        Ok(path)
    }

    /// A short name for tables and logs.
    pub fn name(self) -> String {
        match self {
            Self::Auto(isa) => format!("auto (kernels-{} | dense-gemm, measured)", isa.name()),
            Self::Kernels(isa) => format!("kernels-{}", isa.name()),
            Self::Dense => "dense-gemm".into(),
            Self::Candle => "candle".into(),
        }
    }
}

/// How a Q4_1 matrix picks its path.
enum Mode {
    Measured(Arc<PerfTracker>),
    Fixed(Path),
}

/// A weight matrix (or several side by side) and the code that multiplies
/// by it.
enum Linear {
    Q4_1 {
        w: Q4_1Matrix,
        isa: Isa,
        dense: Option<Tensor>,
        mode: Mode,
    },
    /// 8-bit weights on kvserve's kernels: Q8_0, and Q4_0, Q5_0, Q4_K,
    /// Q5_K and Q6_K converted exactly at load (`kquant.rs`). No dense
    /// alternative: the default model's one such matrix is the vocabulary
    /// projection, run for a few rows at a time.
    Q8 {
        w: Arc<Q8Matrix>,
        isa: Isa,
    },
    Candle(QMatMul),
    /// Matrices that could not be fused; their outputs are concatenated.
    Stacked(Vec<Linear>),
}

impl Linear {
    fn new(t: QTensor, path: MatmulPath, tracker: &Arc<PerfTracker>) -> Result<Self> {
        Self::fused(vec![t], path, tracker)
    }

    /// One matmul for several weight matrices with the same input (q, k and
    /// v; gate and up): one pass over the activations and one parallel
    /// region instead of several. Output columns are the parts' in order.
    fn fused(parts: Vec<QTensor>, path: MatmulPath, tracker: &Arc<PerfTracker>) -> Result<Self> {
        let (isa, mode, with_dense) = match path {
            MatmulPath::Candle => return Self::on_candle(parts),
            MatmulPath::Auto(isa) => (isa, Mode::Measured(tracker.clone()), true),
            MatmulPath::Kernels(isa) => (isa, Mode::Fixed(Path::Quantized), false),
            MatmulPath::Dense => (Isa::Scalar, Mode::Fixed(Path::DenseGemm), true),
        };
        if path != MatmulPath::Dense && parts.iter().all(|t| Q8Matrix::supports(t.dtype())) {
            let dtypes: Vec<GgmlDType> = parts.iter().map(|t| t.dtype()).collect();
            if Q8Matrix::stackable(&dtypes) {
                return Self::q8(&parts, isa);
            }
            let separate = parts.into_iter().map(|t| Self::q8(&[t], isa)).collect::<Result<Vec<_>>>()?;
            return Ok(Self::Stacked(separate));
        }
        if parts.iter().any(|t| t.dtype() != GgmlDType::Q4_1) {
            return Self::on_candle(parts);
        }
        let mut matrices = Vec::with_capacity(parts.len());
        for t in &parts {
            let (n, k) = t.shape().dims2()?;
            matrices.push(Q4_1Matrix::from_ggml_bytes(&t.data()?, n, k)?);
        }
        let dense = if with_dense {
            let d = parts.iter().map(|t| t.dequantize(&t.device())).collect::<candle_core::Result<Vec<_>>>()?;
            Some(Tensor::cat(&d, 0)?)
        } else {
            None
        };
        Ok(Self::Q4_1 { w: Q4_1Matrix::stack(matrices)?, isa, dense, mode })
    }

    /// The 8-bit kernel over the parts stacked.
    fn q8(parts: &[QTensor], isa: Isa) -> Result<Self> {
        let matrices = parts
            .iter()
            .map(|t| {
                let (n, k) = t.shape().dims2()?;
                Q8Matrix::from_ggml(t.dtype(), &t.data()?, n, k)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::Q8 { w: Arc::new(Q8Matrix::stack(matrices)?), isa })
    }

    /// Candle's quantized matmul for each part.
    fn on_candle(parts: Vec<QTensor>) -> Result<Self> {
        let mut linears =
            parts.into_iter().map(|t| Ok(Self::Candle(QMatMul::from_qtensor(t)?))).collect::<Result<Vec<_>>>()?;
        Ok(if linears.len() == 1 { linears.remove(0) } else { Self::Stacked(linears) })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, isa, dense, mode) = match self {
            Self::Q4_1 { w, isa, dense, mode } => (w, isa, dense, mode),
            Self::Candle(m) => return Ok(m.forward(x)?),
            Self::Q8 { w, isa } => {
                let (m, _) = x.dims2()?;
                let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
                return Ok(Tensor::from_vec(quant::matmul_q8(w, &xs, m, *isa)?, (m, w.rows()), x.device())?);
            }
            Self::Stacked(parts) => {
                let outs = parts.iter().map(|p| p.forward(x)).collect::<Result<Vec<_>>>()?;
                return Ok(Tensor::cat(&outs, 1)?);
            }
        };
        let (m, k) = x.dims2()?;
        let key = ShapeKey::new(w.rows(), k, m);
        let path = match mode {
            Mode::Measured(t) => t.choose(key),
            Mode::Fixed(p) => *p,
        };
        let start = Instant::now();
        let y = match (path, dense) {
            (Path::DenseGemm, Some(d)) => x.matmul(&d.t()?)?,
            _ => {
                let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
                Tensor::from_vec(quant::matmul(w, &xs, m, *isa)?, (m, w.rows()), x.device())?
            }
        };
        if let Mode::Measured(t) = mode {
            t.record(key, path, u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
        Ok(y)
    }
}

/// One sequence's part of a batch.
#[derive(Clone, Copy, Debug)]
pub struct SeqStep<'a> {
    /// The new tokens (a prefill chunk, or one token when decoding).
    pub tokens: &'a [u32],
    /// Position of `tokens[0]` (the number of tokens already in the cache).
    pub start_pos: usize,
    /// The sequence's block table, covering the new tokens.
    pub table: &'a BlockTable,
    /// Where each new token's K/V goes, as `kv` handed them out.
    pub slots: &'a [Slot],
    /// How many of `tokens`' last rows return logits (1: the next token's
    /// only; more for a prompt's own log-probabilities). Clamped to
    /// `1..=tokens.len()`.
    pub logit_rows: usize,
}

impl SeqStep<'_> {
    /// The rows whose logits [`LlamaModel::forward`] returns for it.
    pub fn rows_out(&self) -> usize {
        self.logit_rows.clamp(1, self.tokens.len().max(1))
    }
}

/// The token embedding table.
enum Embedding {
    /// Dequantized whole.
    Dense(Tensor),
    /// Q8_0 rows, dequantized per step (shared with a tied output).
    Q8_0(Arc<Q8Matrix>),
}

impl Embedding {
    /// `[ids.len(), hidden]` rows.
    fn rows(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Self::Dense(t) => Ok(t.index_select(&Tensor::new(ids, device)?, 0)?),
            Self::Q8_0(w) => {
                let k = w.cols();
                let mut out = vec![0f32; ids.len() * k];
                for (row, &id) in out.chunks_exact_mut(k).zip(ids) {
                    w.dequantize_row(id as usize, row);
                }
                Ok(Tensor::from_vec(out, (ids.len(), k), device)?)
            }
        }
    }
}

/// Gemma 3's extra norms of one layer.
struct GemmaNorms {
    /// Over each query head (`[head_dim]`), before RoPE.
    q: Tensor,
    /// Over each key head.
    k: Tensor,
    /// On the attention output, before the residual.
    post_attn: Tensor,
    /// On the feed-forward output, before the residual.
    post_ffn: Tensor,
}

struct Layer {
    attn_norm: Tensor,
    gemma: Option<GemmaNorms>,
    /// q, k and v projections fused: outputs `[q | k | v]`.
    qkv: Linear,
    /// qwen2's biases, `[q | k | v]`.
    bias: Option<Tensor>,
    wo: Linear,
    ffn_norm: Tensor,
    /// gate and up projections fused: outputs `[gate | up]`.
    gate_up: Linear,
    down: Linear,
}

/// A loaded llama-family model.
pub struct LlamaModel {
    config: ModelConfig,
    device: Device,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Linear,
    path: MatmulPath,
    perf: Arc<PerfTracker>,
}

impl std::fmt::Debug for LlamaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaModel").field("config", &self.config).finish_non_exhaustive()
    }
}

impl LlamaModel {
    /// Builds the model from an open GGUF file.
    ///
    /// # Errors
    /// [`Error::UnsupportedArchitecture`] for a family without a forward
    /// pass, [`Error::Tensor`] for a missing or misshapen weight,
    /// [`Error::Metadata`] for bad hyper-parameters.
    pub fn load(file: &GgufFile, device: &Device) -> Result<Self> {
        Self::load_with(file, device, MatmulPath::from_env()?)
    }

    /// [`LlamaModel::load`] with an explicit matmul path.
    ///
    /// # Errors
    /// As [`LlamaModel::load`].
    pub fn load_with(file: &GgufFile, device: &Device, path: MatmulPath) -> Result<Self> {
        let config = ModelConfig::from_gguf(file)?;
        let c = &config;
        let (q_out, kv_out) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let shaped = |name: &str, dims: &[usize]| -> Result<candle_core::quantized::QTensor> {
            let t = file.tensor(name, device)?;
            if t.shape().dims() != dims {
                return Err(Error::Tensor {
                    path: file.path().to_path_buf(),
                    tensor: name.into(),
                    problem: format!("shape {:?}, expected {dims:?}", t.shape().dims()),
                });
            }
            Ok(t)
        };
        let perf = Arc::new(PerfTracker::new());
        let matmul = |name: &str, dims: &[usize]| -> Result<Linear> { Linear::new(shaped(name, dims)?, path, &perf) };
        let fused = |parts: &[(String, [usize; 2])]| -> Result<Linear> {
            let tensors = parts.iter().map(|(name, dims)| shaped(name, dims)).collect::<Result<Vec<_>>>()?;
            Linear::fused(tensors, path, &perf)
        };
        let vector = |name: &str, n: usize| -> Result<Tensor> { Ok(shaped(name, &[n])?.dequantize(device)?) };

        let embed_q = shaped("token_embd.weight", &[c.vocab, c.hidden])?;
        let tied = !file.has_tensor("output.weight");
        let (embed, output) = match (embed_q.dtype(), tied) {
            (GgmlDType::Q8_0, _) if path != MatmulPath::Dense && path != MatmulPath::Candle => {
                let table = Arc::new(Q8Matrix::from_ggml_bytes(&embed_q.data()?, c.vocab, c.hidden)?);
                let output = if tied {
                    let isa = match path {
                        MatmulPath::Auto(isa) | MatmulPath::Kernels(isa) => isa,
                        MatmulPath::Dense | MatmulPath::Candle => Isa::Scalar,
                    };
                    Linear::Q8 { w: Arc::clone(&table), isa }
                } else {
                    matmul("output.weight", &[c.vocab, c.hidden])?
                };
                (Embedding::Q8_0(table), output)
            }
            _ => {
                let embed = Embedding::Dense(embed_q.dequantize(device)?);
                let output = if tied {
                    Linear::new(embed_q, path, &perf)?
                } else {
                    matmul("output.weight", &[c.vocab, c.hidden])?
                };
                (embed, output)
            }
        };
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let n = |s: &str| format!("blk.{i}.{s}");
            let bias = if c.arch == Arch::Qwen2 {
                let parts = [
                    vector(&n("attn_q.bias"), q_out)?,
                    vector(&n("attn_k.bias"), kv_out)?,
                    vector(&n("attn_v.bias"), kv_out)?,
                ];
                Some(Tensor::cat(&parts, 0)?)
            } else {
                None
            };
            let gemma = if c.arch == Arch::Gemma3 {
                Some(GemmaNorms {
                    q: vector(&n("attn_q_norm.weight"), c.head_dim)?,
                    k: vector(&n("attn_k_norm.weight"), c.head_dim)?,
                    post_attn: vector(&n("post_attention_norm.weight"), c.hidden)?,
                    post_ffn: vector(&n("post_ffw_norm.weight"), c.hidden)?,
                })
            } else {
                None
            };
            layers.push(Layer {
                attn_norm: vector(&n("attn_norm.weight"), c.hidden)?,
                gemma,
                qkv: fused(&[
                    (n("attn_q.weight"), [q_out, c.hidden]),
                    (n("attn_k.weight"), [kv_out, c.hidden]),
                    (n("attn_v.weight"), [kv_out, c.hidden]),
                ])?,
                bias,
                wo: matmul(&n("attn_output.weight"), &[c.hidden, q_out])?,
                ffn_norm: vector(&n("ffn_norm.weight"), c.hidden)?,
                gate_up: fused(&[(n("ffn_gate.weight"), [c.ffn, c.hidden]), (n("ffn_up.weight"), [c.ffn, c.hidden])])?,
                down: matmul(&n("ffn_down.weight"), &[c.hidden, c.ffn])?,
            });
        }
        let norm = vector("output_norm.weight", c.hidden)?;
        Ok(Self { config, device: device.clone(), embed, layers, norm, output, path, perf })
    }

    /// The matmul path it was loaded with.
    pub fn matmul_path(&self) -> MatmulPath {
        self.path
    }

    /// The measured costs behind dispatch decisions.
    pub fn perf(&self) -> &PerfTracker {
        &self.perf
    }

    /// Hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Longest position the RoPE tables cover (the trained context).
    pub fn max_positions(&self) -> usize {
        self.config.context
    }

    fn validate(&self, batch: &[SeqStep<'_>], block_size: usize) -> Result<()> {
        if batch.is_empty() {
            return Err(Error::InvalidBatch("empty batch".into()));
        }
        for (i, s) in batch.iter().enumerate() {
            let bad = |m: String| Err(Error::InvalidBatch(format!("sequence {i}: {m}")));
            if s.tokens.is_empty() {
                return bad("no tokens".into());
            }
            if s.slots.len() != s.tokens.len() {
                return bad(format!("{} tokens but {} slots", s.tokens.len(), s.slots.len()));
            }
            if let Some(t) = s.tokens.iter().find(|&&t| t as usize >= self.config.vocab) {
                return bad(format!("token {t} is outside the vocabulary of {}", self.config.vocab));
            }
            if s.start_pos + s.tokens.len() > self.max_positions() {
                return bad(format!(
                    "positions up to {} exceed the context of {}",
                    s.start_pos + s.tokens.len(),
                    self.max_positions()
                ));
            }
            for (k, slot) in s.slots.iter().enumerate() {
                if s.table.slot(s.start_pos + k, block_size) != Some(*slot) {
                    return bad(format!("slot {k} does not match the block table"));
                }
            }
        }
        Ok(())
    }

    /// Runs one step over a ragged batch, writing every new token's K/V into
    /// `store` and returning logits `[rows, vocab]`: each sequence's last
    /// [`SeqStep::rows_out`] tokens', in batch order.
    ///
    /// # Errors
    /// [`Error::InvalidBatch`] for an inconsistent batch (nothing is written
    /// then), [`Error::Candle`] if a tensor operation fails.
    pub fn forward(&self, batch: &[SeqStep<'_>], store: &mut PagedKvStore) -> Result<Tensor> {
        self.validate(batch, store.block_size())?;
        store.prepare(batch)?;
        let c = &self.config;
        let ids: Vec<u32> = batch.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let positions: Vec<u32> =
            batch.iter().flat_map(|s| (s.start_pos..s.start_pos + s.tokens.len()).map(|p| p as u32)).collect();
        let slots: Vec<Slot> = batch.iter().flat_map(|s| s.slots.iter().copied()).collect();
        let n = ids.len();
        let mut queries = Vec::with_capacity(batch.len());
        let mut row = 0;
        for s in batch {
            queries.push(SeqQueries { row, len: s.tokens.len(), start_pos: s.start_pos, table: s.table });
            row += s.tokens.len();
        }
        let scale = match c.rope_scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Linear(f) => 1.0 / f,
        };
        let global = rope_angles(c.rope_base, scale, c.head_dim, &positions, &self.device)?;
        let local = if c.rope_base_local == c.rope_base && scale == 1.0 {
            None
        } else {
            Some(rope_angles(c.rope_base_local, 1.0, c.head_dim, &positions, &self.device)?)
        };

        let mut x = self.embed.rows(&ids, &self.device)?;
        if c.arch == Arch::Gemma3 {
            x = (x * f64::from((c.hidden as f32).sqrt()))?;
        }
        for (li, layer) in self.layers.iter().enumerate() {
            let sliding = matches!(c.attention[li], kv::AttentionKind::SlidingWindow { .. });
            let (cos, sin) = if sliding { local.as_ref().unwrap_or(&global) } else { &global };
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let mut qkv = layer.qkv.forward(&h)?;
            if let Some(bias) = &layer.bias {
                qkv = qkv.broadcast_add(bias)?;
            }
            let (q_out, kv_out) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
            let mut q = qkv.narrow(1, 0, q_out)?.contiguous()?;
            let mut k = qkv.narrow(1, q_out, kv_out)?.contiguous()?;
            let v = qkv.narrow(1, q_out + kv_out, kv_out)?;
            if let Some(g) = &layer.gemma {
                let per_head = |t: &Tensor, w: &Tensor, heads: usize| -> Result<Tensor> {
                    let t = t.reshape((n * heads, c.head_dim))?;
                    Ok(candle_nn::ops::rms_norm(&t, w, c.rms_eps)?.reshape((n, heads * c.head_dim))?)
                };
                q = per_head(&q, &g.q, c.heads)?;
                k = per_head(&k, &g.k, c.kv_heads)?;
            }
            let q = self.rope(&q, c.heads, cos, sin)?;
            let k = self.rope(&k, c.kv_heads, cos, sin)?;
            let v: Vec<f32> = v.flatten_all()?.to_vec1()?;
            let row = c.kv_heads * c.head_dim;
            for (t, slot) in slots.iter().enumerate() {
                store.write(li, *slot, &k[t * row..(t + 1) * row], &v[t * row..(t + 1) * row])?;
            }
            let window = match c.attention[li] {
                kv::AttentionKind::Full => None,
                kv::AttentionKind::SlidingWindow { window } => Some(window as usize),
            };
            let dims = Dims { heads: c.heads, kv_heads: c.kv_heads, head_dim: c.head_dim, window };
            let attn = paged_attention(&q, store, li, &queries, dims)?;
            let attn = Tensor::from_vec(attn, (n, c.heads * c.head_dim), &self.device)?;
            let mut o = layer.wo.forward(&attn)?;
            if let Some(g) = &layer.gemma {
                o = candle_nn::ops::rms_norm(&o, &g.post_attn, c.rms_eps)?;
            }
            x = (x + o)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let gate_up = layer.gate_up.forward(&h)?;
            let ff = match layer.gemma {
                Some(_) => {
                    let gu: Vec<f32> = gate_up.flatten_all()?.to_vec1()?;
                    Tensor::from_vec(geglu(&gu, c.ffn), (n, c.ffn), &self.device)?
                }
                None => {
                    let gate = gate_up.narrow(1, 0, c.ffn)?;
                    (candle_nn::ops::silu(&gate)? * gate_up.narrow(1, c.ffn, c.ffn)?)?
                }
            };
            let mut f = layer.down.forward(&ff)?;
            if let Some(g) = &layer.gemma {
                f = candle_nn::ops::rms_norm(&f, &g.post_ffn, c.rms_eps)?;
            }
            x = (x + f)?;
        }
        // Each row is its own: the rows asked for are computed exactly as
        // the last one alone would be (row-independent kernels).
        let last: Vec<u32> = queries
            .iter()
            .zip(batch)
            .flat_map(|(q, s)| (q.row + q.len - s.rows_out()..q.row + q.len).map(|r| r as u32))
            .collect();
        let x = x.index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, c.rms_eps)?;
        Ok(self.output.forward(&x)?.to_dtype(DType::F32)?)
    }

    /// Applies RoPE to `[tokens, heads * head_dim]` at each token's position;
    /// returns the rotated values flattened (`[tokens, heads, head_dim]`).
    fn rope(&self, x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Vec<f32>> {
        let n = x.dim(0)?;
        let x = x.reshape((1, n, heads, self.config.head_dim))?.transpose(1, 2)?.contiguous()?;
        let x = if self.config.rope_neox {
            candle_nn::rotary_emb::rope(&x, cos, sin)?
        } else {
            candle_nn::rotary_emb::rope_i(&x, cos, sin)?
        };
        Ok(x.transpose(1, 2)?.flatten_all()?.to_vec1()?)
    }
}

/// GeGLU over rows of `[gate | up]` (`ffn` each): `gelu(gate) · up`, GELU
/// in its tanh form as Gemma trains it, written as `x · σ(2u)` with
/// `u = √(2/π)·(x + 0.044715·x³)` (the same function: `½(1 + tanh u) =
/// σ(2u)`), eight lanes at a time where the CPU has AVX2 and FMA (the
/// vector `exp` of the attention; libm's `tanhf` one element at a time was
/// 8% of a Gemma prefill). Each element depends only on its own inputs.
fn geglu(gate_up: &[f32], ffn: usize) -> Vec<f32> {
    let mut out = vec![0f32; gate_up.len() / 2];
    #[cfg(target_arch = "x86_64")]
    let simd = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
    for (o, row) in out.chunks_exact_mut(ffn).zip(gate_up.chunks_exact(2 * ffn)) {
        let (gate, up) = row.split_at(ffn);
        #[cfg(target_arch = "x86_64")]
        if simd {
            #[allow(unsafe_code)]
            // SAFETY: AVX2 and FMA detected just above.
            unsafe {
                geglu_avx2(gate, up, o);
            }
            continue;
        }
        for ((o, &x), &u) in o.iter_mut().zip(gate).zip(up) {
            *o = gelu_scalar(x) * u;
        }
    }
    out
}

const GELU_K: f32 = 0.797_884_6; // √(2/π)
const GELU_C: f32 = 0.044_715;

fn gelu_scalar(x: f32) -> f32 {
    let u = GELU_K * (x + GELU_C * x * x * x);
    x / (1.0 + (-2.0 * u).exp())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(unsafe_code)] // intrinsics, loads and stores within the checked slices
fn geglu_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(gate.len() == out.len() && up.len() == out.len());
    let whole = out.len() / 8 * 8;
    for at in (0..whole).step_by(8) {
        // SAFETY: at + 8 <= whole <= the length of all three slices.
        unsafe {
            let x = _mm256_loadu_ps(gate.as_ptr().add(at));
            let x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
            let u = _mm256_mul_ps(_mm256_set1_ps(GELU_K), _mm256_fmadd_ps(_mm256_set1_ps(GELU_C), x3, x));
            let e = crate::attention::x86::exp256(_mm256_mul_ps(_mm256_set1_ps(-2.0), u));
            let g = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e));
            _mm256_storeu_ps(out.as_mut_ptr().add(at), _mm256_mul_ps(g, _mm256_loadu_ps(up.as_ptr().add(at))));
        }
    }
    for i in whole..out.len() {
        out[i] = gelu_scalar(gate[i]) * up[i];
    }
}

/// cos/sin of each position for RoPE with `base`, positions scaled by
/// `scale`: `[positions, head_dim/2]`. Each value depends only on its own
/// position (the same whatever else the step holds).
///
/// The angles are GGML's (`ggml_rope_cache_init`), rounding for rounding:
/// the position times `base^(-2/d)` once per pair of dimensions, in f32,
/// then the position scale. Exact powers (`p / base^(2i/d)`) part from that
/// by a few ulps at the far dimensions, and on Gemma-3 270M, whose next
/// tokens are often near-ties, the greedy continuations of the test prompts
/// then agreed with llama.cpp's on 16 tokens for 3 of 5, against 4 of 5
/// with these angles (`tests/gemma3.rs`).
fn rope_angles(base: f32, scale: f32, head_dim: usize, positions: &[u32], device: &Device) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let theta_scale = base.powf(-2.0 / head_dim as f32);
    let (mut cos, mut sin) = (Vec::with_capacity(positions.len() * half), Vec::with_capacity(positions.len() * half));
    for &p in positions {
        let mut theta = p as f32;
        for _ in 0..half {
            let angle = scale * theta;
            cos.push(angle.cos());
            sin.push(angle.sin());
            theta *= theta_scale;
        }
    }
    let shape = (positions.len(), half);
    Ok((Tensor::from_vec(cos, shape, device)?, Tensor::from_vec(sin, shape, device)?))
}

/// Index of the largest logit (greedy decoding), per row.
///
/// # Errors
/// [`Error::Candle`] if `logits` is not 2-D.
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.to_vec1()?)
}
