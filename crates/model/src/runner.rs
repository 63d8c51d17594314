//! The small interface the engine drives: [`Model`] (the forward pass over
//! a prepared ragged [`Batch`], and the [`BlockStorage`] of its K/V) and
//! [`TextCodec`] (text to tokens and back, chat rendering, stop tokens). The
//! engine's tests implement both with a fake; [`PagedLlama`] and
//! [`LlamaText`] are the real ones.
//!
//! A `Model` owns its K/V storage (the arenas the cache's block ids index),
//! sized once from the [`CacheSpec`] it reports; the engine owns the
//! matching `KvCache` and the transaction around each step: it appends the
//! tokens (getting slots and copy-on-writes from the cache, and performing
//! the copies through the model's [`BlockStorage`]), hands the model a
//! [`Batch`], and marks the tokens computed, or rolls back if the model
//! fails. The model only computes: it writes each token's K/V into its
//! slot and returns logits. So a fake and the real model share one
//! transaction instead of each repeating it, and the engine sees every
//! block that enters or leaves the pool.
//!
//! A hybrid model (Gemma 3) keeps its sliding layers' K/V in pages beside
//! the blocks (`kv_store.rs`); three more calls let the engine keep those
//! consistent: [`Model::keep_windows`] before each step (the live windows),
//! [`Model::usable_prefix`] at each adoption (how much of a cached prefix
//! still has its window), [`Model::window_pages`] when admitting and
//! planning (pages are memory as blocks are), [`Model::pages`] for metrics.

use kv::{BlockStorage, CacheSpec, KvDType};
use xxhash_rust::xxh3::xxh3_128;

use crate::chat::{ChatTemplate, Message};
use crate::error::Result;
use crate::gguf::GgufFile;
use crate::kv_store::PagedKvStore;
use crate::llama::{LlamaModel, MatmulPath, SeqStep};
use crate::tokenizer::Tokenizer;

/// One model instance as the engine sees it.
pub trait Model: Send {
    /// The layout of the cache this model's storage was sized for.
    fn spec(&self) -> &CacheSpec;
    /// Logit row length.
    fn vocab_size(&self) -> usize;
    /// Longest sequence the model can attend over.
    fn max_positions(&self) -> usize;
    /// Identifies the model's content (weights, tokenizer, template): part
    /// of every prefix-cache namespace so two models never share blocks, and
    /// of the fingerprint persisted blocks carry.
    fn fingerprint(&self) -> &[u8];
    /// Runs `batch.seqs` as one ragged batch, writing every new token's K/V
    /// into its slot, and returns logit rows of [`Model::vocab_size`]: for
    /// each entry in order, its last [`SeqStep::rows_out`] tokens' (one row,
    /// the next token's, unless the entry asks for more).
    ///
    /// # Errors
    /// [`crate::Error::InvalidBatch`] for a batch that does not fit the
    /// model or its storage, and any forward-pass error. K/V slots of the
    /// batch may have been written; the engine rolls the cache back, so
    /// nothing reads them.
    fn forward(&mut self, batch: Batch<'_>) -> Result<Vec<Vec<f32>>>;
    /// The K/V storage, for block export and import (tiers).
    fn storage(&mut self) -> &mut dyn BlockStorage;
    /// Whether the model keeps sliding-window K/V apart from its blocks
    /// (hybrid models: see `kv_store.rs`), and so needs
    /// [`Model::keep_windows`] before each step and
    /// [`Model::usable_prefix`] at each adoption.
    fn tracks_windows(&self) -> bool {
        false
    }
    /// The longest prefix of a sequence's first `len` tokens (its block
    /// table) that a continuation can start from: `len` unless the model
    /// dropped the sliding-window K/V the continuation would read.
    fn usable_prefix(&self, table: &kv::BlockTable, len: usize) -> usize {
        let _ = table;
        len
    }
    /// The windows live sequences will read from (block table, computed
    /// tokens), reported before each step: their sliding-window K/V is kept.
    fn keep_windows(&mut self, live: &[(&kv::BlockTable, usize)]) {
        let _ = live;
    }
    /// Whether `block`'s K/V is whole: on a hybrid model, whether its
    /// sliding layers' runs are held (it has a page); always otherwise.
    fn holds_window_kv(&self, block: kv::BlockId) -> bool {
        let _ = block;
        true
    }
    /// Sliding-window pages (hybrid models): in all, and holding a block.
    fn pages(&self) -> Option<(usize, usize)> {
        None
    }
    /// Sliding-window pages (hybrid models) the windows of `live` hold,
    /// each counted once, and the pages in all: for every live sequence,
    /// the first number is what no new block can get a page from.
    fn window_pages(&self, live: &[(&kv::BlockTable, usize)]) -> Option<(usize, usize)> {
        let _ = live;
        None
    }
    /// The most sliding-window pages one sequence's window holds once its
    /// step is over (hybrid models).
    fn window_blocks(&self) -> Option<usize> {
        None
    }
    /// K/V bytes the storage keeps per block id and per sliding-window
    /// page: a plain store keeps every layer per block and has no pages.
    fn kv_bytes(&self) -> (u64, u64) {
        (self.spec().bytes_per_block(), 0)
    }
    /// Imports a block its sequence will not read through a sliding window
    /// again: a hybrid model keeps its full layers only and takes no page
    /// for it. Otherwise [`BlockStorage::import_block`].
    ///
    /// # Errors
    /// As [`BlockStorage::import_block`].
    fn import_block_outside_window(&mut self, block: kv::BlockId, data: &[u8]) -> kv::Result<()> {
        self.storage().import_block(block, data)
    }
}

/// One step's work as the engine prepared it (its copy-on-writes already
/// done through the storage).
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    /// Each sequence's new tokens, positions, block table and slots.
    pub seqs: &'a [SeqStep<'a>],
}

/// Text in and out of a model's token space.
pub trait TextCodec: Send + Sync {
    /// Tokens of `text` as plain text: markup such as `<|im_end|>` in it is
    /// spelled out, never a control token (a `/v1/completions` prompt).
    ///
    /// # Errors
    /// [`crate::Error::Tokenizer`] if the text cannot be encoded.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// Tokens of a whole `/v1/completions` prompt: [`TextCodec::encode`]
    /// with what the model expects in front of a sequence (BOS, where the
    /// file asks for it).
    ///
    /// # Errors
    /// As [`TextCodec::encode`].
    fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.encode(text)
    }
    /// Tokens of a conversation rendered with the model's chat template,
    /// ending with the assistant's cue; only the template's own markup
    /// becomes control tokens, every message's text is literal
    /// (`crate::prompt`).
    ///
    /// # Errors
    /// [`crate::Error::ChatTemplate`] when the template rejects it,
    /// [`crate::Error::Tokenizer`] if encoding fails.
    fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>>;
    /// The most bytes one token stands for (at least 1): a text of `b`
    /// bytes is at least `b / max_token_bytes` tokens, which lets a caller
    /// refuse an oversized prompt before tokenizing it.
    fn max_token_bytes(&self) -> usize;
    /// Text of `ids`, special tokens left out.
    ///
    /// # Errors
    /// [`crate::Error::Tokenizer`] for ids outside the vocabulary.
    fn decode(&self, ids: &[u32]) -> Result<String>;
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
    /// Every token by id: what it spells and whether it is a control token
    /// (what a grammar engine needs to know which tokens can write which
    /// text). Empty when the codec cannot say, which disables constrained
    /// decoding.
    fn vocabulary(&self) -> Vec<VocabEntry> {
        Vec::new()
    }
    /// Whether `id` is a control (special) token, whose markup is not text.
    fn is_control(&self, id: u32) -> bool {
        let _ = id;
        false
    }
}

/// One token of the vocabulary ([`TextCodec::vocabulary`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VocabEntry {
    /// The raw bytes it spells (for a control token, its markup).
    pub bytes: Vec<u8>,
    /// A control (special) token: it never stands for text a grammar matches.
    pub special: bool,
}

/// A [`LlamaModel`] with its paged K/V arenas.
pub struct PagedLlama {
    model: std::sync::Arc<LlamaModel>,
    store: PagedKvStore,
    spec: CacheSpec,
    sizing: KvSizing,
    fingerprint: Vec<u8>,
}

impl std::fmt::Debug for PagedLlama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedLlama").field("spec", &self.spec).finish_non_exhaustive()
    }
}

/// How much K/V memory a [`PagedLlama`] gets, and in what blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvSizing {
    /// Tokens per block.
    pub block_size: u32,
    /// The memory of this many blocks of every layer.
    pub num_blocks: u32,
    /// Element type.
    pub dtype: KvDType,
    /// For a hybrid model: how many sequences' sliding windows the pages
    /// must hold at once (the engine's `max_running`); below that memory
    /// the store keeps every layer per block instead.
    pub live_windows: usize,
}

impl KvSizing {
    /// `num_blocks` blocks of `block_size` tokens, room for 64 live windows.
    pub fn new(block_size: u32, num_blocks: u32, dtype: KvDType) -> Self {
        Self { block_size, num_blocks, dtype, live_windows: 64 }
    }
}

impl PagedLlama {
    /// Sizes the arenas (`storage` below says how a hybrid model splits
    /// the memory).
    ///
    /// # Errors
    /// [`crate::Error::Kv`] if the layout is invalid (zero blocks, a block
    /// size the cache rejects).
    pub fn new(model: LlamaModel, file: &GgufFile, sizing: KvSizing) -> Result<Self> {
        let (spec, store) = storage(model.config(), sizing)?;
        Ok(Self { model: std::sync::Arc::new(model), store, spec, sizing, fingerprint: model_fingerprint(file) })
    }

    /// The same weights with fresh arenas of `num_blocks` blocks (same
    /// block size and element type): benchmarks measure on clean caches
    /// without loading the model again.
    ///
    /// # Errors
    /// [`crate::Error::Kv`] for an invalid block count.
    pub fn sibling(&self, num_blocks: u32) -> Result<Self> {
        let sizing = KvSizing { num_blocks, ..self.sizing };
        let (spec, store) = storage(self.model.config(), sizing)?;
        let fingerprint = self.fingerprint.clone();
        Ok(Self { model: std::sync::Arc::clone(&self.model), store, spec, sizing, fingerprint })
    }

    /// Opens a GGUF file and loads its model (arenas as `sizing` says) and
    /// its text side.
    ///
    /// # Errors
    /// As [`GgufFile::open`], [`LlamaModel::load_with`],
    /// [`LlamaText::from_gguf`] and [`PagedLlama::new`].
    pub fn open(path: &std::path::Path, sizing: KvSizing, matmul: MatmulPath) -> Result<(Self, LlamaText)> {
        let file = GgufFile::open(path)?;
        let text = LlamaText::from_gguf(&file)?;
        let model = LlamaModel::load_with(&file, &candle_core::Device::Cpu, matmul)?;
        Ok((Self::new(model, &file, sizing)?, text))
    }

    /// The model inside.
    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// The K/V arenas.
    pub fn store(&self) -> &PagedKvStore {
        &self.store
    }
}

/// The cache layout and the K/V arenas for the memory of `num_blocks`
/// blocks of every layer. A model mixing full and sliding-window layers
/// (Gemma 3) gets a hybrid store (`kv_store.rs`) when that memory holds the
/// pages of `live_windows` windows plus a prefill chunk of two windows:
/// half the memory (at least that many pages) for sliding-window pages, the
/// rest for the full layers' blocks (so several times as many blocks, a
/// longer history per byte). With less memory, or any other model,
/// `num_blocks` blocks of every layer: a plain store never runs out of
/// pages.
fn storage(config: &crate::ModelConfig, sizing: KvSizing) -> Result<(CacheSpec, PagedKvStore)> {
    let KvSizing { block_size, num_blocks, dtype, live_windows } = sizing;
    let whole = config.cache_spec(block_size, num_blocks, dtype)?;
    let memory = whole.bytes_per_block() * u64::from(num_blocks);
    // One full group and one sliding group: a block of the first is what a
    // hybrid store keeps per block id, one of the second is a page.
    if let [a, b] = whole.layer_groups().as_slice() {
        let (full, sliding) = if a.kind == kv::AttentionKind::Full { (a, b) } else { (b, a) };
        if let (kv::AttentionKind::Full, kv::AttentionKind::SlidingWindow { window }) = (full.kind, sliding.kind) {
            let (full, page) = (full.spec.bytes_per_block(), sliding.spec.bytes_per_block());
            let per_window = u64::from(window).div_ceil(u64::from(block_size)) + 2;
            let least = live_windows as u64 * per_window + 2 * per_window;
            let pages = (memory / 2 / page).max(least);
            // Room for the pages and at least as many full-layer blocks.
            if pages * (page + full) <= memory {
                let blocks = ((memory - pages * page) / full).min(u64::from(u32::MAX - 1));
                let spec = config.cache_spec(block_size, blocks as u32, dtype)?;
                if let Some(store) = PagedKvStore::hybrid(&spec, pages as usize) {
                    return Ok((spec, store));
                }
            }
        }
    }
    let store = PagedKvStore::new(&whole);
    Ok((whole, store))
}

/// The content identity of a model file: xxh3-128 over every byte of it
/// (header, metadata with the tokenizer and template, and all tensor data),
/// so a retrained file with the same shapes and metadata is another model.
/// About 10 ms per 100 MB, once at load. The tag names the numerics too:
/// it changes whenever a kernel change moves any K/V bit, so blocks stored
/// by an older build are recomputed rather than mixed with new ones (a
/// greedy answer must not depend on whether its prefix came from disk). v3:
/// the 8-bit kernels' summation order (Gemma-3's K/V); v4: K-quant
/// activations quantized per 256 (Q8_K), as llama.cpp does, and attention
/// scores summed in one chain per row (every model's K/V); v5: RoPE angles
/// as llama.cpp computes them (every model's keys).
///
/// Part of every block address ([`kv::Namespace`]): whatever computes
/// addresses for a replica's blocks (the engine, a router in front of
/// replicas) must use this one function.
pub fn model_fingerprint(file: &GgufFile) -> Vec<u8> {
    let mut tagged = xxh3_128(file.bytes()).to_le_bytes().to_vec();
    tagged.extend_from_slice(b"kvserve-model-v5");
    xxh3_128(&tagged).to_le_bytes().to_vec()
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

    fn forward(&mut self, batch: Batch<'_>) -> Result<Vec<Vec<f32>>> {
        let (model, store) = (&self.model, &mut self.store);
        // The whole step runs on a rayon worker, so candle's parallel ops
        // start from inside rayon's pool instead of being injected from the
        // engine's thread; the matmuls and attention run on the persistent
        // step workers (`workers` crate).
        let logits = rayon::scope(|_| model.forward(batch.seqs, store))?;
        Ok(logits.to_vec2()?)
    }

    fn storage(&mut self) -> &mut dyn BlockStorage {
        &mut self.store
    }

    fn tracks_windows(&self) -> bool {
        self.store.pages().is_some()
    }

    fn usable_prefix(&self, table: &kv::BlockTable, len: usize) -> usize {
        self.store.usable_prefix(table, len)
    }

    fn keep_windows(&mut self, live: &[(&kv::BlockTable, usize)]) {
        self.store.keep_windows(live.iter().copied());
    }

    fn holds_window_kv(&self, block: kv::BlockId) -> bool {
        self.store.holds_window_kv(block)
    }

    fn pages(&self) -> Option<(usize, usize)> {
        self.store.pages()
    }

    fn window_pages(&self, live: &[(&kv::BlockTable, usize)]) -> Option<(usize, usize)> {
        self.store.window_pages(live.iter().copied())
    }

    fn window_blocks(&self) -> Option<usize> {
        self.store.window_blocks()
    }

    fn kv_bytes(&self) -> (u64, u64) {
        (self.store.bytes_per_block() as u64, self.store.page_bytes() as u64)
    }

    fn import_block_outside_window(&mut self, block: kv::BlockId, data: &[u8]) -> kv::Result<()> {
        self.store.import_block_outside_window(block, data)
    }
}

/// A GGUF file's tokenizer and chat template.
#[derive(Debug)]
pub struct LlamaText {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    escaper: crate::prompt::Escaper,
}

impl LlamaText {
    /// The tokenizer and template `file` describes.
    ///
    /// # Errors
    /// As [`Tokenizer::from_gguf`] and [`ChatTemplate::from_gguf`].
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let tokenizer = Tokenizer::from_gguf(file)?;
        let template = ChatTemplate::from_gguf(file, &tokenizer)?;
        let escaper = crate::prompt::Escaper::new(&tokenizer)?;
        Ok(Self { tokenizer, template, escaper })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// BOS in front of a prompt that lacks it, where the file asks for one
    /// (`tokenizer.ggml.add_bos_token`; a template that writes
    /// `{{ bos_token }}` already has it).
    fn with_bos(&self, ids: &mut Vec<u32>) {
        if let (true, Some(bos)) = (self.tokenizer.add_bos, self.tokenizer.bos) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
    }
}

impl TextCodec for LlamaText {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode_literal(text)
    }

    fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.tokenizer.encode_literal(text)?;
        self.with_bos(&mut ids);
        Ok(ids)
    }

    fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let mut ids = crate::prompt::encode_chat(&self.template, &self.tokenizer, &self.escaper, messages)?;
        self.with_bos(&mut ids);
        Ok(ids)
    }

    fn max_token_bytes(&self) -> usize {
        self.tokenizer.max_token_bytes().max(1)
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true)
    }

    fn stop_ids(&self) -> &[u32] {
        &self.tokenizer.stop_ids
    }

    fn token_bytes(&self, id: u32) -> Result<Vec<u8>> {
        self.tokenizer
            .token_bytes(id)
            .ok_or_else(|| crate::Error::Tokenizer(format!("id {id} is outside the vocabulary")))
    }

    fn is_control(&self, id: u32) -> bool {
        self.tokenizer.is_special(id)
    }

    fn vocabulary(&self) -> Vec<VocabEntry> {
        (0..self.tokenizer.vocab_size() as u32)
            .map(|id| VocabEntry {
                bytes: self.tokenizer.token_bytes(id).unwrap_or_default(),
                special: self.tokenizer.is_special(id),
            })
            .collect()
    }
}
