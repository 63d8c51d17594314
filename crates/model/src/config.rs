//! Hyper-parameters read from GGUF metadata, and the KV cache layout they
//! imply.
//!
//! Supported: `llama` (SmolLM2, Llama 2/3, Mistral-style files), `qwen2`
//! (q/k/v biases, NEOX-style RoPE) and `gemma3` (five sliding-window layers
//! to one full layer, the pattern llama.cpp uses; RoPE base 10,000 on the
//! sliding layers and the file's base on the full ones). Anything else is
//! [`Error::UnsupportedArchitecture`].

use kv::{AttentionKind, CacheSpec, CacheSpecParams, KvDType};

use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// Model families the runtime knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama family.
    Llama,
    /// Qwen2 (biases on q/k/v, NEOX RoPE).
    Qwen2,
    /// Gemma 3 (scaled embeddings, q/k norms, post-norms, GeGLU, hybrid
    /// sliding-window attention).
    Gemma3,
}

impl Arch {
    const SUPPORTED: &'static str = "llama, qwen2, gemma3";

    fn parse(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            "gemma3" => Some(Self::Gemma3),
            _ => None,
        }
    }

    /// The `general.architecture` string.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Gemma3 => "gemma3",
        }
    }
}

/// How RoPE positions are scaled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// Positions as they are.
    None,
    /// Positions divided by a factor.
    Linear(f32),
}

/// The numbers a forward pass needs.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Family.
    pub arch: Arch,
    /// Transformer blocks.
    pub layers: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Feed-forward size.
    pub ffn: usize,
    /// Query heads.
    pub heads: usize,
    /// K/V heads.
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab: usize,
    /// Trained context length.
    pub context: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// RoPE base frequency (of full-attention layers, for Gemma 3).
    pub rope_base: f32,
    /// RoPE base of sliding-window layers (Gemma 3 trains them with 10,000
    /// whatever the file's base; other families use `rope_base`). Their
    /// positions are never scaled.
    pub rope_base_local: f32,
    /// RoPE position scaling.
    pub rope_scaling: RopeScaling,
    /// NEOX-style (halves) rather than interleaved (pairs) rotation.
    pub rope_neox: bool,
    /// Per-layer attention kind.
    pub attention: Vec<AttentionKind>,
}

impl ModelConfig {
    /// Reads the configuration of any known architecture.
    ///
    /// # Errors
    /// [`Error::UnsupportedArchitecture`], or [`Error::Metadata`] for a
    /// missing or inconsistent value.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch_name = file.string("general.architecture")?;
        let arch = Arch::parse(arch_name).ok_or_else(|| Error::UnsupportedArchitecture {
            path: file.path().to_path_buf(),
            arch: arch_name.to_owned(),
            supported: Arch::SUPPORTED,
        })?;
        let p = arch.name();
        let key = |k: &str| format!("{p}.{k}");
        let positive = |k: &str| -> Result<usize> {
            let v = file.uint(&key(k))?;
            if v == 0 || v > 1 << 24 {
                return Err(file.meta_err(&key(k), format!("{v} is out of range")));
            }
            Ok(v as usize)
        };
        let layers = positive("block_count")?;
        let hidden = positive("embedding_length")?;
        let ffn = positive("feed_forward_length")?;
        let heads = positive("attention.head_count")?;
        let kv_heads =
            if file.has(&key("attention.head_count_kv")) { positive("attention.head_count_kv")? } else { heads };
        if heads % kv_heads != 0 {
            return Err(
                file.meta_err(&key("attention.head_count_kv"), format!("{kv_heads} does not divide {heads} heads"))
            );
        }
        let head_dim =
            if file.has(&key("attention.key_length")) { positive("attention.key_length")? } else { hidden / heads };
        if head_dim % 2 != 0 || (!file.has(&key("attention.key_length")) && hidden % heads != 0) {
            return Err(file.meta_err(&key("attention.head_count"), "gives an odd or fractional head size"));
        }
        if file.has(&key("rope.dimension_count")) && file.uint(&key("rope.dimension_count"))? as usize != head_dim {
            return Err(file.meta_err(&key("rope.dimension_count"), "partial rotary embeddings are not supported"));
        }
        let vocab =
            file.tensor_shape("token_embd.weight").and_then(|s| s.first().copied()).ok_or_else(|| Error::Tensor {
                path: file.path().to_path_buf(),
                tensor: "token_embd.weight".into(),
                problem: "missing".into(),
            })?;
        if u32::try_from(vocab).is_err() {
            return Err(Error::Tensor {
                path: file.path().to_path_buf(),
                tensor: "token_embd.weight".into(),
                problem: format!("a vocabulary of {vocab} rows is more than 32-bit token ids can name"),
            });
        }
        let context = if file.has(&key("context_length")) { positive("context_length")? } else { 4096 };
        let rms_eps = if file.has(&key("attention.layer_norm_rms_epsilon")) {
            file.float(&key("attention.layer_norm_rms_epsilon"))? as f32
        } else {
            1e-5
        };
        let rope_base =
            if file.has(&key("rope.freq_base")) { file.float(&key("rope.freq_base"))? as f32 } else { 10_000.0 };
        let rope_scaling = match file.string(&key("rope.scaling.type")) {
            Err(_) | Ok("none") => RopeScaling::None,
            Ok("linear") => {
                let f = file.float(&key("rope.scaling.factor"))? as f32;
                if !(f.is_finite() && f > 0.0) {
                    return Err(file.meta_err(&key("rope.scaling.factor"), format!("{f} is not a positive factor")));
                }
                RopeScaling::Linear(f)
            }
            Ok(other) => {
                return Err(file.meta_err(&key("rope.scaling.type"), format!("{other:?} scaling is not supported")))
            }
        };
        let attention =
            match arch {
                Arch::Llama | Arch::Qwen2 => vec![AttentionKind::Full; layers],
                Arch::Gemma3 => {
                    let window = file.uint(&key("attention.sliding_window"))?;
                    let window = u32::try_from(window)
                        .map_err(|_| file.meta_err(&key("attention.sliding_window"), "too large"))?;
                    // Gemma 3: every sixth layer attends globally, the rest slide.
                    (0..layers)
                        .map(|i| {
                            if (i + 1) % 6 == 0 {
                                AttentionKind::Full
                            } else {
                                AttentionKind::SlidingWindow { window }
                            }
                        })
                        .collect()
                }
            };
        Ok(Self {
            arch,
            layers,
            hidden,
            ffn,
            heads,
            kv_heads,
            head_dim,
            vocab,
            context,
            rms_eps,
            rope_base,
            rope_base_local: if arch == Arch::Gemma3 { 10_000.0 } else { rope_base },
            rope_scaling,
            rope_neox: arch != Arch::Llama,
            attention,
        })
    }

    /// The KV cache layout for this model with `num_blocks` blocks.
    ///
    /// # Errors
    /// [`Error::Kv`] if the numbers make no valid spec.
    pub fn cache_spec(&self, block_size: u32, num_blocks: u32, dtype: KvDType) -> Result<CacheSpec> {
        Ok(CacheSpec::new(CacheSpecParams {
            block_size,
            num_blocks,
            layers: self.attention.clone(),
            kv_heads: self.kv_heads as u32,
            head_dim: self.head_dim as u32,
            dtype,
        })?)
    }
}
