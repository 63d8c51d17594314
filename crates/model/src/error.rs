//! The model crate's one error type. Every failure names the file (where
//! there is one) and what is wrong, so a user can act on it.

use std::path::PathBuf;

/// What can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The model file does not exist or cannot be opened.
    #[error("cannot open model file {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a GGUF file (wrong magic).
    #[error("{path} is not a GGUF file (it starts with {magic:02x?} instead of \"GGUF\")")]
    NotGguf {
        /// The file.
        path: PathBuf,
        /// Its first bytes.
        magic: Vec<u8>,
    },
    /// The header or a tensor runs past the end of the file.
    #[error("{path} is truncated or corrupt: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What did not fit.
        detail: String,
    },
    /// The architecture is not one this runtime implements.
    #[error("{path}: unsupported architecture {arch:?} (supported: {supported})")]
    UnsupportedArchitecture {
        /// The file.
        path: PathBuf,
        /// `general.architecture`.
        arch: String,
        /// What would work.
        supported: &'static str,
    },
    /// A tensor has an element type the runtime cannot use.
    #[error("{path}: tensor {tensor} has unsupported type {dtype}")]
    UnsupportedTensorType {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its GGML type.
        dtype: String,
    },
    /// Metadata is missing or has the wrong type or an unusable value.
    #[error("{path}: metadata {key}: {problem}")]
    Metadata {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        problem: String,
    },
    /// A tensor the architecture needs is absent or has the wrong shape.
    #[error("{path}: tensor {tensor}: {problem}")]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What is wrong.
        problem: String,
    },
    /// The tokenizer described by the file cannot be built.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template does not parse or render.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// A batch passed to the forward pass is inconsistent.
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// Fetching the default model failed.
    #[error("fetching the default model: {0}")]
    Fetch(String),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// The KV core refused an operation.
    #[error(transparent)]
    Kv(#[from] kv::Error),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
