//! The small interface the engine drives: [`Model`] (one step of a ragged
//! batch over a [`KvCache`]) and [`TextCodec`] (text to tokens and back, chat
//! rendering, stop tokens). The engine's tests implement both with a fake;
//! [`PagedLlama`] and [`LlamaText`] are the real ones.
//!
//! A `Model` owns its K/V storage (the arenas the cache's block ids index),
//! sized once from the [`CacheSpec`] it reports, and the engine owns the
//! matching [`KvCache`]. `step` must leave the cache as it found it when it
//! fails (no half-appended tokens), which [`LlamaModel::step`] guarantees.

use kv::{CacheSpec, KvCache, KvDType, SeqId};
use xxhash_rust::xxh3::xxh3_128;

use crate::chat::{ChatTemplate, Message};
use crate::error::Result;
use crate::gguf::GgufFile;
use crate::kv_store::PagedKvStore;
use crate::llama::{LlamaModel, MatmulPath};
use crate::tokenizer::Tokenizer;

/// One model instance as the engine sees it.
pub trait Model: Send {
    /// The layout of the cache this model's storage was sized for.
    fn spec(&self) -> &CacheSpec;
    /// Logit row length.
    fn vocab_size(&self) -> usize;
    /// Longest sequence the model can attend over.
    fn max_positions(&self) -> usize;
    /// Identifies the weights; part of every prefix-cache namespace so two
    /// models never share blocks.
    fn fingerprint(&self) -> &[u8];
    /// Appends each entry's tokens to its sequence, runs them as one batch,
    /// marks them computed and returns the logits of each entry's last token
    /// (one row of [`Model::vocab_size`] per entry).
    ///
    /// # Errors
    /// [`crate::Error::Kv`] when the cache refuses (out of blocks or quota)
    /// and any forward-pass error; the cache is then unchanged.
    fn step(&mut self, cache: &mut KvCache, work: &[(SeqId, &[u32])]) -> Result<Vec<Vec<f32>>>;
}

/// Text in and out of a model's token space.
pub trait TextCodec: Send + Sync {
    /// Tokens of `text` (special-token markup encodes to its ids).
    ///
    /// # Errors
    /// [`crate::Error::Tokenizer`] if the text cannot be encoded.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// Text of `ids`, special tokens left out.
    ///
    /// # Errors
    /// [`crate::Error::Tokenizer`] for ids outside the vocabulary.
    fn decode(&self, ids: &[u32]) -> Result<String>;
    /// A conversation rendered with the model's template, ending with the
    /// assistant's cue.
    ///
    /// # Errors
    /// [`crate::Error::ChatTemplate`] when the template rejects it.
    fn render_chat(&self, messages: &[Message]) -> Result<String>;
    /// Ids that end generation (end of sequence, end of turn).
    fn stop_ids(&self) -> &[u32];
    /// The raw bytes of one token (part of a UTF-8 character, possibly), as
    /// OpenAI's logprobs report them; by default its decoded text's.
    ///
    /// # Errors
    /// [`crate::Error::Tokenizer`] for an id outside the vocabulary.
    fn token_bytes(&self, id: u32) -> Result<Vec<u8>> {
        self.decode(&[id]).map(String::into_bytes)
    }
}

/// A [`LlamaModel`] with its paged K/V arenas.
pub struct PagedLlama {
    model: LlamaModel,
    store: PagedKvStore,
    spec: CacheSpec,
    fingerprint: Vec<u8>,
}

impl std::fmt::Debug for PagedLlama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedLlama").field("spec", &self.spec).finish_non_exhaustive()
    }
}

impl PagedLlama {
    /// Sizes the arenas for `num_blocks` blocks of `block_size` tokens.
    ///
    /// # Errors
    /// [`crate::Error::Kv`] if the layout is invalid (zero blocks, a block
    /// size the cache rejects).
    pub fn new(model: LlamaModel, file: &GgufFile, block_size: u32, num_blocks: u32, dtype: KvDType) -> Result<Self> {
        let spec = model.config().cache_spec(block_size, num_blocks, dtype)?;
        let store = PagedKvStore::new(&spec);
        Ok(Self { model, store, spec, fingerprint: fingerprint(file) })
    }

    /// Opens a GGUF file and loads its model (arenas for `num_blocks` blocks
    /// of `block_size` tokens) and its text side.
    ///
    /// # Errors
    /// As [`GgufFile::open`], [`LlamaModel::load_with`],
    /// [`LlamaText::from_gguf`] and [`PagedLlama::new`].
    pub fn open(
        path: &std::path::Path,
        block_size: u32,
        num_blocks: u32,
        dtype: KvDType,
        matmul: MatmulPath,
    ) -> Result<(Self, LlamaText)> {
        let file = GgufFile::open(path)?;
        let text = LlamaText::from_gguf(&file)?;
        let model = LlamaModel::load_with(&file, &candle_core::Device::Cpu, matmul)?;
        Ok((Self::new(model, &file, block_size, num_blocks, dtype)?, text))
    }

    /// The model inside.
    pub fn model(&self) -> &LlamaModel {
        &self.model
    }
}

/// A content identity of a model file that is cheap to compute: its size,
/// its metadata (keys and values) and the shapes and types of its tensors.
fn fingerprint(file: &GgufFile) -> Vec<u8> {
    let mut keys: Vec<String> = file.metadata().iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    keys.sort_unstable();
    let text = format!("{}|{}", file.len_bytes(), keys.join("\n"));
    xxh3_128(text.as_bytes()).to_le_bytes().to_vec()
}

impl Model for PagedLlama {
    fn spec(&self) -> &CacheSpec {
        &self.spec
    }

    fn vocab_size(&self) -> usize {
        self.model.config().vocab
    }

    fn max_positions(&self) -> usize {
        self.model.max_positions()
    }

    fn fingerprint(&self) -> &[u8] {
        &self.fingerprint
    }

    fn step(&mut self, cache: &mut KvCache, work: &[(SeqId, &[u32])]) -> Result<Vec<Vec<f32>>> {
        Ok(self.model.step(cache, &mut self.store, work)?.to_vec2()?)
    }
}

/// A GGUF file's tokenizer and chat template.
#[derive(Debug)]
pub struct LlamaText {
    tokenizer: Tokenizer,
    template: ChatTemplate,
}

impl LlamaText {
    /// The tokenizer and template `file` describes.
    ///
    /// # Errors
    /// As [`Tokenizer::from_gguf`] and [`ChatTemplate::from_gguf`].
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let tokenizer = Tokenizer::from_gguf(file)?;
        let template = ChatTemplate::from_gguf(file, &tokenizer)?;
        Ok(Self { tokenizer, template })
    }
}

impl TextCodec for LlamaText {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text)
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true)
    }

    fn render_chat(&self, messages: &[Message]) -> Result<String> {
        self.template.render(messages, true)
    }

    fn stop_ids(&self) -> &[u32] {
        &self.tokenizer.stop_ids
    }

    fn token_bytes(&self, id: u32) -> Result<Vec<u8>> {
        self.tokenizer
            .token_bytes(id)
            .ok_or_else(|| crate::Error::Tokenizer(format!("id {id} is outside the vocabulary")))
    }
}
