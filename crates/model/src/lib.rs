//! The model runtime of kvserve: GGUF loading, the tokenizer and chat
//! template a file describes, the KV cache layout it implies, paged K/V
//! storage, and a decoder forward pass (llama, qwen2, gemma3) over ragged
//! batches whose attention reads K/V straight from the `kv` crate's blocks.
//!
//! | concept | file |
//! |---|---|
//! | memory-mapped, validated GGUF | `gguf.rs` |
//! | hyper-parameters, cache spec | `config.rs` |
//! | tokenizer (byte-level BPE or SentencePiece, from metadata) | `tokenizer.rs` |
//! | SentencePiece merging as llama.cpp does it | `spm.rs` |
//! | chat template (minijinja) | `chat.rs` |
//! | conversation to tokens, client text literal (render-then-encode) | `prompt.rs` |
//! | K/V arenas indexed by block id; a hybrid model's sliding-window pages | `kv_store.rs` |
//! | paged attention | `attention.rs` |
//! | the forward pass (llama, qwen2, gemma3) | `llama.rs` |
//! | SIMD quantized matmul kernels (by concept: ISA, layouts, activations, x86) | `quant/` |
//! | GGML block formats (Q4_0 … Q6_K) unpacked for the 8-bit kernel | `kquant.rs` |
//! | the interface the engine drives (`Model`, `TextCodec`) | `runner.rs` |
//! | tool calling in the generic format (render, grammar, parse) | `tools.rs` |
//! | named models fetched with pip (`smollm2-135m`, `gemma3-270m`) | `fetch.rs` |
//! | tiny random-weight GGUF files for tests | `tiny.rs` |

mod attention;
pub mod chat;
pub mod config;
pub mod dispatch;
mod error;
pub mod fetch;
pub mod gguf;
mod kquant;
pub mod kv_store;
pub mod llama;
pub mod prompt;
pub mod quant;
pub mod runner;
mod spm;
pub mod tiny;
pub mod tokenizer;
pub mod tools;

pub use chat::{ChatTemplate, Message};
pub use config::{Arch, ModelConfig};
pub use error::{Error, Result};
pub use gguf::GgufFile;
pub use kv_store::PagedKvStore;
pub use llama::{argmax_rows, LlamaModel, MatmulPath, SeqStep};
pub use runner::{model_fingerprint, Batch, KvSizing, LlamaText, Model, PagedLlama, TextCodec, VocabEntry};
pub use tokenizer::Tokenizer;
