//! The one path from a conversation to token ids: render the chat template,
//! then encode, so that **only the template's own markup can become control
//! tokens**. Everything a client wrote (every message's content, whatever
//! its role) is literal text, even where it spells `<|im_end|>` or
//! `<|im_start|>system`.
//!
//! Rendering a template to a string and encoding that string with special
//! tokens recognised (what llama.cpp's server, vLLM and `transformers` do)
//! lets any end user forge system and assistant turns. Here:
//!
//! 1. In each message's text, every occurrence of a special token's markup
//!    is replaced by a sentinel: `U+E000 <nonce> : <k> U+E001`, `k` the
//!    special's index, the nonce a random per-conversation number a client
//!    cannot guess (so a sentinel cannot be forged). Private-use characters
//!    and digits pass through the string operations templates apply
//!    (`trim`, `upper`, concatenation) unchanged.
//! 2. The template renders the escaped conversation.
//! 3. The rendered text is encoded piece by piece: the text between
//!    sentinels with special tokens recognised (the template's markup, and
//!    user text, which no longer contains any markup), and each sentinel as
//!    its special's markup spelled as *literal* text.
//!
//! The only visible cost: a piece boundary at each escaped special, where
//! BPE cannot merge across (the escaped text was going to be literal tokens
//! anyway). Later features extend this path (tool calls and results, other
//! chat formats) rather than adding another.
//!
//! `/v1/completions` prompt text never goes through a template and is
//! encoded literally whole ([`Tokenizer::encode_literal`]); a client who
//! wants control tokens there sends token ids.

use std::hash::{BuildHasher, Hasher};

use aho_corasick::{AhoCorasick, MatchKind};

use crate::chat::{ChatTemplate, Message};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

const OPEN: char = '\u{E000}';
const CLOSE: char = '\u{E001}';

/// Escapes special-token markup in message text (see the module doc).
#[derive(Debug)]
pub struct Escaper {
    specials: Vec<String>,
    matcher: Option<AhoCorasick>,
}

impl Escaper {
    /// An escaper for the tokenizer's special tokens.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if the automaton cannot be built.
    pub fn new(tokenizer: &Tokenizer) -> Result<Self> {
        let specials: Vec<String> = tokenizer.special_strings().into_iter().filter(|s| !s.is_empty()).collect();
        let matcher = if specials.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(&specials)
                    .map_err(|e| Error::Tokenizer(format!("special tokens: {e}")))?,
            )
        };
        Ok(Self { specials, matcher })
    }

    /// `text` with every special's markup replaced by its sentinel.
    fn escape(&self, text: &str, nonce: u64) -> String {
        let Some(m) = &self.matcher else { return text.to_owned() };
        let mut out = String::with_capacity(text.len());
        let mut last = 0;
        for found in m.find_iter(text) {
            out.push_str(&text[last..found.start()]);
            out.push(OPEN);
            out.push_str(&format!("{nonce}:{}", found.pattern().as_usize()));
            out.push(CLOSE);
            last = found.end();
        }
        out.push_str(&text[last..]);
        out
    }
}

/// A number a client cannot guess: std's randomly keyed hasher.
fn nonce() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x6b76_7365_7276_6521);
    h.finish()
}

/// Renders `messages` with `template` and encodes the result with
/// `tokenizer`, message text literal (see the module doc).
///
/// # Errors
/// [`Error::ChatTemplate`] if the template rejects the conversation;
/// [`Error::Tokenizer`] if encoding fails.
pub fn encode_chat(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    escaper: &Escaper,
    messages: &[Message],
) -> Result<Vec<u32>> {
    let nonce = nonce();
    let escaped: Vec<Message> =
        messages.iter().map(|m| Message { content: escaper.escape(&m.content, nonce), ..m.clone() }).collect();
    // The escape survives what templates do to content (trim, concatenate,
    // case changes of the surrounding markup). A template that rewrote the
    // content itself (`replace`, `lower`) could in principle reassemble
    // markup from escaped pieces; no known template does, and the sentinels
    // are private-use characters a `replace` would have to name.
    let rendered = template.render(&escaped, true)?;
    let tag = format!("{OPEN}{nonce}:");
    let mut ids = Vec::new();
    let mut rest = rendered.as_str();
    while let Some(at) = rest.find(&tag) {
        ids.extend(tokenizer.encode(&rest[..at])?);
        let after = &rest[at + tag.len()..];
        let end = after.find(CLOSE).unwrap_or(after.len());
        match after[..end].parse::<usize>().ok().and_then(|k| escaper.specials.get(k)) {
            Some(special) => ids.extend(tokenizer.encode_literal(special)?),
            // Not a sentinel of ours after all (the nonce matched by chance
            // and the rest did not): literal text.
            None => ids.extend(tokenizer.encode_literal(&rest[at..at + tag.len() + end])?),
        }
        rest = after.get(end + CLOSE.len_utf8()..).unwrap_or("");
    }
    ids.extend(tokenizer.encode(rest)?);
    Ok(ids)
}
