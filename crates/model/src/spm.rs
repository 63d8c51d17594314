//! SentencePiece tokenization as GGUF files describe it
//! (`tokenizer.ggml.model = llama`: Llama 1/2, Mistral, Gemma): pieces with
//! scores and token types, no merge list, byte fallback.
//!
//! This follows llama.cpp's `llm_tokenizer_spm` step for step, because the
//! ids must be the ones llama.cpp (and the model's training) produce:
//!
//! 1. **Special-token partition**: the text is cut at every occurrence of a
//!    special token's markup, longest markup first, each fragment scanned
//!    left to right (llama.cpp's `tokenizer_st_partition`). User-defined
//!    tokens (Gemma's `\n\n`, runs of spaces or tabs, `<table>` ...) are cut
//!    out always: they are text. Control tokens (`<start_of_turn>`, `<bos>`)
//!    only when the caller asks for markup to be recognised; client text
//!    never becomes a control token.
//! 2. **Whitespace**: in each text fragment spaces become `▁` (U+2581), and
//!    with `add_space_prefix` a `▁` is prepended to a fragment at the start
//!    of the text or after a special token.
//! 3. **Bigram merging**: the fragment starts as one symbol per UTF-8
//!    character; a max-heap holds every adjacent pair whose concatenation is
//!    a piece, by that piece's score (ties: the leftmost pair). The best pair
//!    is merged and its new neighbours are pushed, until no pair is a piece.
//! 4. **Byte fallback**: a final symbol that is not a piece becomes its
//!    bytes' `<0xXX>` tokens (or the unknown token when the file has none).
//!
//! One deliberate difference from llama.cpp: merging never forms a control
//! token (llama.cpp's lookup includes them, so text that happened to merge
//! into `<start_of_turn>` would become the control token). No known
//! vocabulary makes this reachable; the tests compare with llama.cpp's ids.
//!
//! Why not the `tokenizers` crate: its SentencePiece-compatible models need
//! either a merge list (BPE) or unigram log-probabilities and Viterbi,
//! neither of which is what llama.cpp runs over these scores, and deriving
//! merges from a 262k-piece vocabulary costs millions of pair entries. The
//! algorithm above is short and exact.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use aho_corasick::AhoCorasick;

use crate::error::{Error, Result};

/// GGUF token types (llama.cpp's `llama_token_type`).
pub(crate) mod token_type {
    /// An ordinary piece.
    pub(crate) const NORMAL: i32 = 1;
    /// Markup with a meaning to the model (never text).
    pub(crate) const CONTROL: i32 = 3;
    /// A piece matched whole before merging (text).
    pub(crate) const USER_DEFINED: i32 = 4;
    /// `<0xXX>`: one raw byte.
    pub(crate) const BYTE: i32 = 6;
}

/// A SentencePiece vocabulary with llama.cpp's tokenization.
#[derive(Clone)]
pub(crate) struct Spm {
    pieces: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    /// Piece text to id, control tokens left out (merging never forms one).
    lookup: HashMap<String, u32>,
    /// `<0xXX>` ids by byte, where the vocabulary has them.
    bytes: [Option<u32>; 256],
    unknown: Option<u32>,
    add_space_prefix: bool,
    /// Ids of control and user-defined tokens, and a matcher over their
    /// markup that finds which occur in a text (overlapping).
    specials: Vec<u32>,
    finder: Option<AhoCorasick>,
}

/// A piece of the input after the special-token partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

/// An adjacent pair of symbols whose concatenation is a piece.
#[derive(Debug)]
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    /// Bytes of the concatenation (a stale entry no longer matches).
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// Higher score first, then the leftmost pair (the heap pops the max).
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score).then_with(|| other.left.cmp(&self.left))
    }
}

/// One symbol of the merge chain: a byte range of the fragment.
#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl Spm {
    /// A vocabulary from GGUF's parallel arrays.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if the arrays differ in length.
    pub(crate) fn new(
        pieces: Vec<String>,
        scores: Vec<f32>,
        types: Vec<i32>,
        unknown: Option<u32>,
        add_space_prefix: bool,
    ) -> Result<Self> {
        if scores.len() != pieces.len() || types.len() != pieces.len() {
            return Err(Error::Tokenizer(format!(
                "{} pieces, {} scores and {} token types",
                pieces.len(),
                scores.len(),
                types.len()
            )));
        }
        let mut lookup = HashMap::with_capacity(pieces.len());
        let mut bytes = [None; 256];
        let mut specials = Vec::new();
        for (id, (piece, &kind)) in pieces.iter().zip(&types).enumerate() {
            let id = id as u32;
            match kind {
                token_type::CONTROL => specials.push(id),
                token_type::USER_DEFINED => {
                    specials.push(id);
                    lookup.entry(piece.clone()).or_insert(id);
                }
                token_type::BYTE => {
                    if let Some(b) = parse_byte_piece(piece) {
                        bytes[b as usize].get_or_insert(id);
                    }
                }
                _ => {
                    lookup.entry(piece.clone()).or_insert(id);
                }
            }
        }
        specials.retain(|&id| !pieces[id as usize].is_empty());
        // Longest markup first, as llama.cpp partitions.
        specials.sort_by(|&a, &b| pieces[b as usize].len().cmp(&pieces[a as usize].len()).then(a.cmp(&b)));
        let finder = if specials.is_empty() {
            None
        } else {
            let markup = specials.iter().map(|&id| pieces[id as usize].as_str());
            Some(AhoCorasick::new(markup).map_err(|e| Error::Tokenizer(format!("special tokens: {e}")))?)
        };
        Ok(Self { pieces, scores, types, lookup, bytes, unknown, add_space_prefix, specials, finder })
    }

    /// Token ids of `text`; control-token markup becomes its id only when
    /// `parse_control`.
    pub(crate) fn encode(&self, text: &str, parse_control: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let mut prev_special = true;
        for fragment in self.partition(text, parse_control) {
            match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(t) => {
                    let mut escaped = String::with_capacity(t.len() + 3);
                    if self.add_space_prefix && prev_special {
                        escaped.push('\u{2581}');
                    }
                    for c in t.chars() {
                        escaped.push(if c == ' ' { '\u{2581}' } else { c });
                    }
                    self.merge(&escaped, &mut out);
                    prev_special = false;
                }
            }
        }
        out
    }

    /// Cuts `text` at special-token markup (see the module doc).
    fn partition<'a>(&self, text: &'a str, parse_control: bool) -> Vec<Fragment<'a>> {
        let mut fragments = vec![Fragment::Text(text)];
        let Some(finder) = &self.finder else { return fragments };
        if text.is_empty() {
            return Vec::new();
        }
        // Only the specials that occur matter; which do is one pass.
        let mut present: Vec<usize> = finder.find_overlapping_iter(text).map(|m| m.pattern().as_usize()).collect();
        present.sort_unstable();
        present.dedup();
        for index in present {
            let id = self.specials[index];
            if !parse_control && self.types[id as usize] == token_type::CONTROL {
                continue;
            }
            let markup = self.pieces[id as usize].as_str();
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for f in fragments {
                let Fragment::Text(mut rest) = f else {
                    next.push(f);
                    continue;
                };
                while let Some(at) = rest.find(markup) {
                    if at > 0 {
                        next.push(Fragment::Text(&rest[..at]));
                    }
                    next.push(Fragment::Token(id));
                    rest = &rest[at + markup.len()..];
                }
                if !rest.is_empty() {
                    next.push(Fragment::Text(rest));
                }
            }
            fragments = next;
        }
        fragments.retain(|f| *f != Fragment::Text(""));
        fragments
    }

    /// Bigram merging and byte fallback over one escaped fragment.
    fn merge(&self, text: &str, out: &mut Vec<u32>) {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (i, (start, c)) in text.char_indices().enumerate() {
            let len = c.len_utf8();
            let next = (start + len < text.len()).then_some(i + 1);
            symbols.push(Symbol { start, len, prev: i.checked_sub(1), next });
        }
        let mut heap = BinaryHeap::new();
        let piece = |s: &[Symbol], l: usize, r: usize| &text[s[l].start..s[r].start + s[r].len];
        let try_pair = |heap: &mut BinaryHeap<Bigram>, s: &[Symbol], l: Option<usize>, r: Option<usize>| {
            let (Some(l), Some(r)) = (l, r) else { return };
            if let Some(&id) = self.lookup.get(piece(s, l, r)) {
                let size = s[l].len + s[r].len;
                heap.push(Bigram { left: l, right: r, score: self.scores[id as usize], size });
            }
        };
        for i in 1..symbols.len() {
            try_pair(&mut heap, &symbols, Some(i - 1), Some(i));
        }
        while let Some(b) = heap.pop() {
            let (l, r) = (symbols[b.left], symbols[b.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
                continue; // one side was merged since
            }
            symbols[b.left].len += r.len;
            symbols[b.right].len = 0;
            symbols[b.left].next = r.next;
            if let Some(n) = r.next {
                symbols[n].prev = Some(b.left);
            }
            try_pair(&mut heap, &symbols, symbols[b.left].prev, Some(b.left));
            try_pair(&mut heap, &symbols, Some(b.left), symbols[b.left].next);
        }
        let mut at = (!symbols.is_empty()).then_some(0);
        while let Some(i) = at {
            let s = symbols[i];
            let text = &text[s.start..s.start + s.len];
            match self.lookup.get(text) {
                Some(&id) => out.push(id),
                None => {
                    for b in text.bytes() {
                        if let Some(id) = self.bytes[b as usize].or(self.unknown) {
                            out.push(id);
                        }
                    }
                }
            }
            at = s.next;
        }
    }

    /// The bytes `id` stands for: `<0xXX>` its byte, a control token its
    /// markup, any other piece its text with `▁` as a space.
    pub(crate) fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let piece = self.pieces.get(id as usize)?;
        Some(match self.types[id as usize] {
            token_type::BYTE => parse_byte_piece(piece).map_or_else(|| piece.as_bytes().to_vec(), |b| vec![b]),
            token_type::CONTROL => piece.as_bytes().to_vec(),
            _ => piece.replace('\u{2581}', " ").into_bytes(),
        })
    }

    /// Text of `ids` (bytes joined, then UTF-8 with replacement characters
    /// for incomplete sequences); control tokens left out when
    /// `skip_control`.
    pub(crate) fn decode(&self, ids: &[u32], skip_control: bool) -> Result<String> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let kind = *self
                .types
                .get(id as usize)
                .ok_or_else(|| Error::Tokenizer(format!("id {id} is outside the vocabulary")))?;
            if skip_control && kind == token_type::CONTROL {
                continue;
            }
            bytes.extend(self.token_bytes(id).unwrap_or_default());
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// `<0x41>` → `0x41`.
fn parse_byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy vocabulary: bytes, a few merges, one control and one
    /// user-defined token.
    fn toy() -> Spm {
        let mut pieces: Vec<String> = vec!["<unk>".into(), "<bos>".into(), "<turn>".into(), "\n\n".into()];
        let mut types = vec![
            2, // unknown
            token_type::CONTROL,
            token_type::CONTROL,
            token_type::USER_DEFINED,
        ];
        let mut scores = vec![0.0, 0.0, 0.0, 0.0];
        for b in 0..=255u8 {
            pieces.push(format!("<0x{b:02X}>"));
            types.push(token_type::BYTE);
            scores.push(0.0);
        }
        for (p, s) in [("a", -1.0), ("b", -1.0), ("c", -1.0), ("ab", -2.0), ("bc", -0.5), ("cab", -3.0), ("▁", -1.0)]
        {
            pieces.push(p.into());
            types.push(token_type::NORMAL);
            scores.push(s);
        }
        Spm::new(pieces, scores, types, Some(0), false).unwrap()
    }

    fn id(spm: &Spm, piece: &str) -> u32 {
        spm.pieces.iter().position(|p| p == piece).unwrap() as u32
    }

    #[test]
    fn the_best_scoring_pair_merges_first() {
        let s = toy();
        // "bc" (-0.5) beats "ab" (-2.0); then "a"+"bc" is not a piece.
        assert_eq!(s.encode("abc", false), vec![id(&s, "a"), id(&s, "bc")]);
        assert_eq!(s.encode("ab", false), vec![id(&s, "ab")]);
        // "ab" merges, then "c" + "ab" is a piece too.
        assert_eq!(s.encode("cab", false), vec![id(&s, "cab")]);
    }

    #[test]
    fn unknown_characters_fall_back_to_bytes() {
        let s = toy();
        let e = s.encode("é", false);
        assert_eq!(e, vec![id(&s, "<0xC3>"), id(&s, "<0xA9>")]);
        assert_eq!(s.decode(&e, true).unwrap(), "é");
    }

    #[test]
    fn control_markup_is_text_unless_asked_and_user_defined_always_matches() {
        let s = toy();
        let literal = s.encode("a<turn>\n\nb", false);
        assert!(!literal.contains(&id(&s, "<turn>")));
        assert!(literal.contains(&id(&s, "\n\n")));
        let parsed = s.encode("a<turn>\n\nb", true);
        assert_eq!(parsed, vec![id(&s, "a"), id(&s, "<turn>"), id(&s, "\n\n"), id(&s, "b")]);
        assert_eq!(s.decode(&parsed, true).unwrap(), "a\n\nb");
        assert_eq!(s.decode(&parsed, false).unwrap(), "a<turn>\n\nb");
    }

    #[test]
    fn spaces_become_the_meta_symbol_and_decode_back() {
        let s = toy();
        let e = s.encode("a b", false);
        assert_eq!(e, vec![id(&s, "a"), id(&s, "▁"), id(&s, "b")]);
        assert_eq!(s.decode(&e, true).unwrap(), "a b");
        assert!(s.encode("", true).is_empty());
    }
}
