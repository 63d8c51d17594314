//! The tokenizer a GGUF file describes, for either of its two families:
//!
//! * SentencePiece (`tokenizer.ggml.model = llama`: Gemma, Llama 2,
//!   Mistral): scores, token types and byte fallback, tokenized exactly as
//!   llama.cpp does (`spm.rs`). `tokenizer.ggml.add_bos_token` (default on)
//!   says whether a prompt starts with BOS.
//! * Byte-level BPE, built with the `tokenizers` crate, described below.
//!
//! Byte-level BPE (`tokenizer.ggml.model = gpt2`): the vocabulary from
//! `tokenizer.ggml.tokens`, merges from `tokenizer.ggml.merges`, control and
//! user-defined tokens (by `tokenizer.ggml.token_type`) registered as special
//! tokens so chat markup like `<|im_start|>` encodes to one id. The
//! pre-tokenizer follows `tokenizer.ggml.pre`, as llama.cpp does:
//!
//! | `pre` | pre-tokenizer |
//! |---|---|
//! | `smollm` | split digits one by one, then byte-level without a prefix space |
//! | `llama-bpe`, `llama3` | Llama 3 split regex, then byte-level |
//! | `qwen2` | Qwen2 split regex (single digits), then byte-level |
//! | `gpt2`, `default`, absent | GPT-2 byte-level regex |
//!
//! Candle's own GGUF tokenizer ignores `pre` and so splits `Hello` wrongly for
//! SmolLM2 (38699 instead of 19556); the tests pin the right ids.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use candle_core::quantized::gguf_file::Value;

use crate::error::{Error, Result};
use crate::gguf::GgufFile;

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

use crate::spm::{token_type, Spm};

const TOKEN_TYPE_CONTROL: i32 = token_type::CONTROL;
const TOKEN_TYPE_USER_DEFINED: i32 = token_type::USER_DEFINED;

/// The algorithm behind a [`Tokenizer`].
#[derive(Clone)]
enum Backend {
    /// Byte-level BPE: the tokenizer with special tokens, and the same
    /// matching none (for literal text).
    Bpe { inner: Box<tokenizers::Tokenizer>, literal: Box<tokenizers::Tokenizer> },
    /// SentencePiece.
    Spm(Box<Spm>),
}

/// A tokenizer with the model's special tokens.
#[derive(Clone)]
pub struct Tokenizer {
    backend: Backend,
    tokens: Vec<String>,
    /// The markup literal encoding never turns into a token: every special
    /// (control and user-defined) token for BPE; the control tokens for
    /// SentencePiece, whose user-defined tokens (`\n\n`, runs of spaces)
    /// are text.
    specials: Vec<String>,
    /// By id: a token whose markup is not text (as `specials`).
    special_ids: Vec<bool>,
    /// The most bytes any one token stands for.
    max_token_bytes: usize,
    /// Beginning-of-sequence token, if the file names one.
    pub bos: Option<u32>,
    /// End-of-sequence token, if the file names one.
    pub eos: Option<u32>,
    /// Ids that end generation (eos and end-of-turn markers).
    pub stop_ids: Vec<u32>,
    /// Whether a prompt starts with [`Tokenizer::bos`].
    pub add_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("vocab", &self.tokens.len()).field("eos", &self.eos).finish_non_exhaustive()
    }
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] for a tokenizer model other than byte-level BPE or
    /// unusable vocabulary data; [`Error::Metadata`] for missing keys.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let model = file.string("tokenizer.ggml.model")?;
        if model != "gpt2" && model != "llama" {
            return Err(Error::Tokenizer(format!(
                "{}: tokenizer model {model:?} is not supported (byte-level BPE \"gpt2\" and SentencePiece \"llama\" \
                 are)",
                file.path().display()
            )));
        }
        let tokens: Vec<String> = file
            .array("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<Result<_, _>>()
            .map_err(|_| file.meta_err("tokenizer.ggml.tokens", "holds a non-string"))?;
        let types: Vec<i32> = if file.has("tokenizer.ggml.token_type") {
            file.array("tokenizer.ggml.token_type")?
                .iter()
                .map(|v| match v {
                    Value::I32(t) => Ok(*t),
                    Value::U32(t) => Ok(*t as i32),
                    _ => Err(file.meta_err("tokenizer.ggml.token_type", "holds a non-integer")),
                })
                .collect::<Result<_>>()?
        } else {
            vec![token_type::NORMAL; tokens.len()]
        };
        if types.len() != tokens.len() {
            return Err(file.meta_err("tokenizer.ggml.token_type", "length differs from tokenizer.ggml.tokens"));
        }
        if u32::try_from(tokens.len()).is_err() {
            let problem = format!("{} entries: more than 32-bit token ids can name", tokens.len());
            return Err(file.meta_err("tokenizer.ggml.tokens", problem));
        }
        let id = |key: &str| -> Result<Option<u32>> {
            if !file.has(key) {
                return Ok(None);
            }
            let v = file.uint(key)?;
            (v < tokens.len() as u64)
                .then_some(Some(v as u32))
                .ok_or_else(|| file.meta_err(key, format!("{v} is outside the vocabulary")))
        };
        let flag = |key: &str, default: bool| -> Result<bool> {
            match file.has(key) {
                false => Ok(default),
                true => file.bool(key),
            }
        };
        let spm = model == "llama";
        let (backend, is_special): (Backend, Box<dyn Fn(i32) -> bool>) = if spm {
            let scores: Vec<f32> = file
                .array("tokenizer.ggml.scores")?
                .iter()
                .map(|v| match v {
                    Value::F32(s) => Ok(*s),
                    Value::F64(s) => Ok(*s as f32),
                    _ => Err(file.meta_err("tokenizer.ggml.scores", "holds a non-float")),
                })
                .collect::<Result<_>>()?;
            if scores.len() != tokens.len() {
                return Err(file.meta_err("tokenizer.ggml.scores", "length differs from tokenizer.ggml.tokens"));
            }
            let unknown = id("tokenizer.ggml.unknown_token_id")?;
            let prefix = flag("tokenizer.ggml.add_space_prefix", true)?;
            let spm = Spm::new(tokens.clone(), scores, types.clone(), unknown, prefix)?;
            (Backend::Spm(Box::new(spm)), Box::new(|t| t == TOKEN_TYPE_CONTROL))
        } else {
            (bpe(file, &tokens, &types)?, Box::new(|t| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED))
        };
        let specials: Vec<String> =
            tokens.iter().zip(&types).filter(|(_, &t)| is_special(t)).map(|(tok, _)| tok.clone()).collect();
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let eos = id("tokenizer.ggml.eos_token_id")?;
        let add_bos = bos.is_some() && flag("tokenizer.ggml.add_bos_token", spm)?;
        let mut stop_ids: Vec<u32> = eos.into_iter().collect();
        for marker in ["<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|endoftext|>"] {
            if let Some(i) = tokens.iter().position(|t| t == marker) {
                if !stop_ids.contains(&(i as u32)) && types[i] == TOKEN_TYPE_CONTROL {
                    stop_ids.push(i as u32);
                }
            }
        }
        let special_ids = types.iter().map(|&t| is_special(t)).collect();
        let mut t = Self { backend, tokens, specials, special_ids, max_token_bytes: 0, bos, eos, stop_ids, add_bos };
        t.max_token_bytes =
            (0..t.tokens.len() as u32).filter_map(|i| t.token_bytes(i)).map(|b| b.len()).max().unwrap_or(1);
        Ok(t)
    }

    /// Token ids of `text` where special-token markup becomes its id: for
    /// a chat template's own text (`crate::prompt` keeps client text out).
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if encoding fails.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.backend {
            Backend::Bpe { inner, .. } => Ok(inner.encode_fast(text, false).map_err(tok_err)?.get_ids().to_vec()),
            Backend::Spm(spm) => Ok(spm.encode(text, true)),
        }
    }

    /// Token ids of `text` as plain text: markup like `<|im_end|>` is
    /// spelled out in ordinary tokens, never a control token.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if encoding fails.
    pub fn encode_literal(&self, text: &str) -> Result<Vec<u32>> {
        match &self.backend {
            Backend::Bpe { literal, .. } => Ok(literal.encode_fast(text, false).map_err(tok_err)?.get_ids().to_vec()),
            Backend::Spm(spm) => Ok(spm.encode(text, false)),
        }
    }

    /// The markup of the special tokens (control and user-defined).
    pub fn special_strings(&self) -> Vec<String> {
        self.specials.clone()
    }

    /// The most bytes one token stands for: `bytes / max_token_bytes` is a
    /// lower bound on a text's token count.
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    /// Text of `ids`, special tokens skipped or kept.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if decoding fails.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        match &self.backend {
            Backend::Bpe { inner, .. } => inner.decode(ids, skip_special).map_err(tok_err),
            Backend::Spm(spm) => spm.decode(ids, skip_special),
        }
    }

    /// The token string of one id (as stored, byte-level encoded).
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The raw bytes one id stands for. SentencePiece: the piece with `▁` as
    /// a space, or the byte of a `<0xXX>` token. BPE: its byte-level token string mapped
    /// back through GPT-2's byte-to-character table (a token that is part of
    /// a multi-byte character decodes to an incomplete UTF-8 sequence, which
    /// `decode` would turn into U+FFFD). Characters outside the table
    /// (special tokens' markup never is) keep their UTF-8 bytes.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        if let Backend::Spm(spm) = &self.backend {
            return spm.token_bytes(id);
        }
        let table = byte_of_char();
        let mut out = Vec::new();
        for c in self.token(id)?.chars() {
            match table.get(&c) {
                Some(&b) => out.push(b),
                None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
        Some(out)
    }

    /// Whether `id`'s markup is not text: a control token, or for BPE a
    /// user-defined one.
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.get(id as usize).copied().unwrap_or(false)
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }
}

/// Byte-level BPE from the vocabulary and merges, with the special tokens
/// added.
fn bpe(file: &GgufFile, tokens: &[String], types: &[i32]) -> Result<Backend> {
    let merges: Vec<(String, String)> = if file.has("tokenizer.ggml.merges") {
        file.array("tokenizer.ggml.merges")?
            .iter()
            .map(|v| {
                let s = v.to_string().map_err(|_| file.meta_err("tokenizer.ggml.merges", "holds a non-string"))?;
                let (a, b) = s
                    .split_once(' ')
                    .ok_or_else(|| file.meta_err("tokenizer.ggml.merges", format!("{s:?} is not a pair")))?;
                Ok((a.to_owned(), b.to_owned()))
            })
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    if vocab.len() != tokens.len() {
        return Err(file.meta_err("tokenizer.ggml.tokens", "has duplicate tokens"));
    }
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(tok_err)?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let pre = if file.has("tokenizer.ggml.pre") { file.string("tokenizer.ggml.pre")? } else { "default" };
    inner.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
        .map(|(tok, _)| AddedToken::from(tok.clone(), true))
        .collect();
    inner.add_special_tokens(&added);
    let mut literal = inner.clone();
    literal.set_encode_special_tokens(true);
    Ok(Backend::Bpe { inner: Box::new(inner), literal: Box::new(literal) })
}

fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(SplitPattern::Regex(pattern.to_owned()), SplitDelimiterBehavior::Isolated, false)
            .map_err(tok_err)?;
        Ok(Sequence::new(vec![split.into(), ByteLevel::new(false, false, false).into()]).into())
    };
    match pre {
        "smollm" => Ok(Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into()),
        "llama-bpe" | "llama3" => split(LLAMA3_SPLIT),
        "qwen2" => split(QWEN2_SPLIT),
        "gpt2" | "default" => Ok(ByteLevel::new(false, true, true).into()),
        other => {
            tracing::warn!(pre = other, "unknown tokenizer.ggml.pre; using the GPT-2 byte-level pre-tokenizer");
            Ok(ByteLevel::new(false, true, true).into())
        }
    }
}

/// GPT-2's byte-level alphabet reversed: printable bytes stand for
/// themselves, the other 68 for the code points from U+0100 in byte order.
fn byte_of_char() -> &'static std::collections::HashMap<char, u8> {
    static TABLE: std::sync::OnceLock<std::collections::HashMap<char, u8>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let mut next = 0x100_u32;
        (0..=255_u8)
            .map(|b| {
                let c = if printable(b) {
                    char::from(b)
                } else {
                    next += 1;
                    char::from_u32(next - 1).expect("U+0100..U+0143 are characters")
                };
                (c, b)
            })
            .collect()
    })
}
