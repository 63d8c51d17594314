//! Constrained decoding: a grammar decides which tokens may come next, so
//! structured outputs parse and tool arguments match their schemas by
//! construction, not by luck.
//!
//! The hard part is `llguidance` (the structured-output engine llama.cpp and
//! others use) over a `toktrie` trie of the model's vocabulary; this file is
//! the seam between it and the engine.
//!
//! # Design
//!
//! - **One compiler per engine** ([`Grammars`]): the token trie and
//!   llguidance's `ParserFactory` are built once, on first use, from the
//!   codec's [`model::TextCodec::vocabulary`] (special tokens marked, so no
//!   grammar can spell `<|im_end|>` out of text). Building them takes a few
//!   hundred milliseconds for a 49k vocabulary; `kvserve serve` warms it at
//!   start.
//! - **Compiling happens in validation** ([`crate::EngineHandle::validate`],
//!   which the server runs off the async runtime), never on the engine
//!   thread. A grammar that does not compile is an
//!   [`Error::InvalidRequest`] naming the request field it came from.
//!   Bounds: the grammar's text is at most [`MAX_GRAMMAR_BYTES`]; llguidance's
//!   own limits bound compile work (lexer fuel, grammar size, lexer states)
//!   and per-token work (step fuel, Earley items), so a hostile schema costs
//!   a bounded amount and then fails with a 400.
//! - **Compiled grammars are cached** by their canonical text (an LRU of
//!   [`CACHE_ENTRIES`]): a request with a schema seen before clones the
//!   compiled parser, lexer caches included, instead of compiling again.
//! - **Per request, a [`Constraint`]**: the matcher, and the mask for the
//!   next token. The engine computes the masks of every constrained row of a
//!   step together, on one long-lived helper thread ([`MaskWorker`]), while
//!   the forward pass runs (`core.rs`): a mask depends only on the tokens
//!   already generated, which are known before the step starts.
//! - **Sampling** (`sampling.rs`) applies the mask after `logit_bias` and the
//!   penalties: forbidden tokens become `-inf`, so a bias never re-enables a
//!   token the grammar forbids.
//! - **Ending**: when the grammar accepts, the mask allows the end-of-sequence
//!   token, and every stop id of the request with it; the grammar's end is
//!   the request's end (a finished grammar stops the request without
//!   spending a step on the end token). `max_tokens` before the grammar can
//!   end finishes with `length`: the output is incomplete and says so.
//!   Stop strings do not apply to constrained requests: they could only cut
//!   a structure short, and the grammar already decides where it ends.
//! - **Schemas are rewritten before they compile** (`schema.rs`): every
//!   number, string and open value gets a bound, so a model caught in a
//!   loop (`1111…`) is made to end the value instead of running to
//!   `max_tokens`; `strict` closes object schemas to the keys they name.
//! - **JSON layout**: schemas compile with fixed separators (`", "`, `": "`)
//!   and no free whitespace unless the schema's own `x-guidance` options say
//!   otherwise. Small models otherwise wander into runs of newlines, and a
//!   canonical layout lets a tool call's rendered history reproduce the
//!   tokens the model generated (so the next turn hits the cache).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory, TokenParser};
use model::TextCodec;

use crate::error::{Error, Result};
use crate::schema::grammar_schema;

/// Longest grammar text (a schema's JSON, a Lark grammar, a regex).
pub const MAX_GRAMMAR_BYTES: usize = 64 * 1024;
/// Compiled grammars kept for reuse.
pub(crate) const CACHE_ENTRIES: usize = 64;

/// What the output must match.
#[derive(Clone, Debug, PartialEq)]
pub enum GrammarSpec {
    /// Any JSON object.
    JsonObject,
    /// A value valid against this JSON schema; `strict`: object schemas
    /// admit only the keys they name unless they say otherwise (see
    /// `schema.rs`).
    JsonSchema {
        /// The schema, as the request gave it.
        schema: serde_json::Value,
        /// Whether the request asked for strict mode.
        strict: bool,
    },
    /// A Lark grammar in llguidance's dialect (which can embed JSON schemas
    /// with `%json { ... }`).
    Lark(String),
    /// Text matching this regular expression (whole output).
    Regex(String),
}

/// A constraint on a request's output, and the request field it came from
/// (errors name it).
#[derive(Clone, Debug, PartialEq)]
pub struct Grammar {
    /// The grammar.
    pub spec: GrammarSpec,
    /// The request field that asked for it (`response_format`, `tools`,
    /// `grammar`...).
    pub field: &'static str,
}

impl Grammar {
    /// A grammar asked for by `field`.
    pub fn new(spec: GrammarSpec, field: &'static str) -> Self {
        Self { spec, field }
    }

    /// The grammar as llguidance takes it, and its canonical text (the
    /// cache key).
    fn to_llguidance(&self) -> Result<(TopLevelGrammar, String)> {
        let invalid = |problem: String| Error::InvalidRequest { field: self.field, problem };
        let too_large = |body: usize| invalid(format!("the grammar is {body} bytes; at most {MAX_GRAMMAR_BYTES}"));
        let json = |schema: &serde_json::Value, strict: bool| {
            // The limit is on what the client sent; the rewrite adds a few
            // keywords per schema node (llguidance's size limits still hold).
            let sent = schema.to_string().len();
            if sent > MAX_GRAMMAR_BYTES {
                return Err(too_large(sent));
            }
            let schema = grammar_schema(schema, strict);
            let key = format!("json:{schema}");
            Ok((TopLevelGrammar::from_json_schema(schema), key))
        };
        match &self.spec {
            GrammarSpec::JsonObject => json(&serde_json::json!({ "type": "object" }), false),
            GrammarSpec::JsonSchema { schema, strict } => {
                if !schema.is_object() && !schema.is_boolean() {
                    return Err(invalid("the schema must be a JSON object".into()));
                }
                json(schema, *strict)
            }
            GrammarSpec::Lark(text) | GrammarSpec::Regex(text) if text.len() > MAX_GRAMMAR_BYTES => {
                Err(too_large(text.len()))
            }
            GrammarSpec::Lark(text) => Ok((TopLevelGrammar::from_lark(text.clone()), format!("lark:{text}"))),
            GrammarSpec::Regex(text) => Ok((TopLevelGrammar::from_regex(text), format!("regex:{text}"))),
        }
    }
}

struct Compiler {
    factory: ParserFactory,
    eos: u32,
}

/// The engine's grammar compiler and its cache (see the module doc).
///
/// # Concurrency
/// Shared by every validating thread. The factory is built once
/// (`OnceLock`); the cache is one `Mutex` over an LRU, held to look up,
/// clone out (a cached parser is cloned under it) or insert, never while
/// compiling.
pub(crate) struct Grammars {
    codec: Arc<dyn TextCodec>,
    vocab_size: usize,
    compiler: OnceLock<std::result::Result<Compiler, String>>,
    cache: Mutex<VecDeque<(String, TokenParser)>>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").field("vocab_size", &self.vocab_size).finish_non_exhaustive()
    }
}

impl Grammars {
    pub(crate) fn new(codec: Arc<dyn TextCodec>, vocab_size: usize) -> Self {
        Self { codec, vocab_size, compiler: OnceLock::new(), cache: Mutex::new(VecDeque::new()) }
    }

    fn compiler(&self) -> Result<&Compiler> {
        self.compiler
            .get_or_init(|| build_compiler(self.codec.as_ref(), self.vocab_size))
            .as_ref()
            .map_err(|e| Error::InvalidRequest { field: "grammar", problem: e.clone() })
    }

    /// Builds the trie and the factory now rather than on the first
    /// constrained request.
    pub(crate) fn warm(&self) {
        if let Err(e) = self.compiler() {
            tracing::warn!(error = %e, "constrained decoding is unavailable");
        }
    }

    /// Compiles `grammar` (or clones its cached compilation).
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] naming `grammar.field` when it is too large,
    /// does not compile, or exceeds the compile limits.
    pub(crate) fn compile(&self, grammar: &Grammar) -> Result<CompiledGrammar> {
        let (top, key) = grammar.to_llguidance()?;
        let compiler = self.compiler()?;
        if let Some(parser) = self.cached(&key) {
            return Ok(CompiledGrammar { parser, eos: compiler.eos });
        }
        // llguidance reports errors as values; a panic inside it on some
        // input nobody foresaw must still be this request's 400, not a 500.
        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| compiler.factory.create_parser(top)));
        let parser = match built {
            Ok(Ok(parser)) => parser,
            Ok(Err(e)) => {
                return Err(Error::InvalidRequest {
                    field: grammar.field,
                    problem: format!("the grammar does not compile: {}", short(&e.to_string())),
                })
            }
            Err(_) => {
                return Err(Error::InvalidRequest {
                    field: grammar.field,
                    problem: "the grammar could not be compiled".into(),
                })
            }
        };
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_ENTRIES {
                cache.pop_back();
            }
            cache.push_front((key, parser.deep_clone()));
        }
        Ok(CompiledGrammar { parser, eos: compiler.eos })
    }

    fn cached(&self, key: &str) -> Option<TokenParser> {
        let mut cache = self.cache.lock().ok()?;
        let at = cache.iter().position(|(k, _)| k == key)?;
        let entry = cache.remove(at)?;
        let parser = entry.1.deep_clone();
        cache.push_front(entry);
        Some(parser)
    }
}

/// At most 300 characters of an error (llguidance's can quote the grammar).
fn short(s: &str) -> String {
    let line = s.lines().next().unwrap_or_default();
    line.chars().take(300).collect()
}

fn build_compiler(codec: &dyn TextCodec, vocab_size: usize) -> std::result::Result<Compiler, String> {
    let started = std::time::Instant::now();
    let vocab = codec.vocabulary();
    if vocab.is_empty() {
        return Err("this model's tokenizer does not expose its vocabulary; constrained decoding is unavailable".into());
    }
    let eos = *codec.stop_ids().first().ok_or("the model has no end-of-sequence token")?;
    // The model's logits may be wider than the tokenizer's vocabulary
    // (padding): those ids spell nothing, so no grammar allows them.
    let size = vocab_size.max(vocab.len());
    let words: Vec<Vec<u8>> = (0..size)
        .map(|i| match vocab.get(i) {
            Some(e) if e.special => [&[TokTrie::SPECIAL_TOKEN_MARKER][..], &e.bytes].concat(),
            Some(e) => e.bytes.clone(),
            None => Vec::new(),
        })
        .collect();
    let size = u32::try_from(size).map_err(|_| "the vocabulary is too large")?;
    let mut info = TokRxInfo::new(size, eos);
    info.tok_end_of_turn = codec.stop_ids().get(1).copied();
    let env: llguidance::toktrie::TokEnv = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)));
    let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
    factory.quiet();
    *factory.limits_mut() = ParserLimits {
        // Compile work: a few hundred milliseconds at most.
        initial_lexer_fuel: 2_000_000,
        max_grammar_size: 200_000,
        max_lexer_states: 100_000,
        // Errors must not echo the client's grammar or its output back.
        verbose_errors: false,
        ..ParserLimits::default()
    };
    tracing::info!(vocab = size, ms = started.elapsed().as_millis() as u64, "grammar compiler ready");
    Ok(Compiler { factory, eos })
}

/// A compiled grammar, ready to constrain one request.
pub struct CompiledGrammar {
    parser: TokenParser,
    eos: u32,
}

impl Clone for CompiledGrammar {
    fn clone(&self) -> Self {
        Self { parser: self.parser.deep_clone(), eos: self.eos }
    }
}

impl std::fmt::Debug for CompiledGrammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledGrammar").finish_non_exhaustive()
    }
}

/// Computes the masks of a step's constrained rows on a thread of its own
/// while the engine thread runs the forward pass (started once, on first
/// use; a thread per step would pay for a new stack every step).
///
/// # Concurrency
/// The engine thread hands over the step's constraints and takes them back
/// before it samples; between the two it does not touch them. A panic while
/// computing one mask is caught and leaves that constraint without a mask,
/// so its request fails with [`Error::Grammar`]; the thread goes on.
pub(crate) struct MaskWorker {
    jobs: std::sync::mpsc::Sender<Vec<(usize, Constraint)>>,
    done: std::sync::mpsc::Receiver<Vec<(usize, Constraint)>>,
}

impl MaskWorker {
    /// The worker, or `None` if no thread can be started (masks are then
    /// computed on the engine thread).
    pub(crate) fn start() -> Option<Self> {
        let (jobs, inbox) = std::sync::mpsc::channel::<Vec<(usize, Constraint)>>();
        let (outbox, done) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("kvserve-masks".into())
            .spawn(move || {
                for mut batch in inbox {
                    for (_, c) in &mut batch {
                        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.prepare())).is_ok();
                        if !ok {
                            c.mask = None;
                            c.poisoned = true;
                        }
                    }
                    if outbox.send(batch).is_err() {
                        return;
                    }
                }
            })
            .ok()?;
        Some(Self { jobs, done })
    }

    /// Hands `batch` over; gives it back if the worker is gone.
    pub(crate) fn send(&self, batch: Vec<(usize, Constraint)>) -> Result<(), Vec<(usize, Constraint)>> {
        self.jobs.send(batch).map_err(|e| e.0)
    }

    /// Takes the batch back, masks computed; `None` if the worker died
    /// with it (never expected: its work is wrapped in `catch_unwind`).
    pub(crate) fn recv(&self) -> Option<Vec<(usize, Constraint)>> {
        self.done.recv().ok()
    }
}

/// What accepting a token did to the grammar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Accepted {
    /// More tokens may follow.
    Continue,
    /// The grammar is complete: the request ends here.
    Complete,
}

/// One request's grammar state (see the module doc).
pub(crate) struct Constraint {
    matcher: Matcher,
    eos: u32,
    /// The mask for the next token, once computed.
    mask: Option<SimpleVob>,
    /// At the last [`Constraint::apply`]: the grammar may end here.
    can_end: bool,
    /// Computing a mask panicked: the state cannot be trusted.
    poisoned: bool,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("has_mask", &self.mask.is_some()).finish_non_exhaustive()
    }
}

fn runtime(e: impl std::fmt::Display) -> Error {
    Error::Grammar(short(&e.to_string()))
}

impl Constraint {
    pub(crate) fn new(compiled: CompiledGrammar) -> Self {
        Self {
            matcher: Matcher::new(Ok(compiled.parser)),
            eos: compiled.eos,
            mask: None,
            can_end: false,
            poisoned: false,
        }
    }

    /// Computes the next token's mask if it is not known yet. Cheap to call
    /// twice.
    pub(crate) fn prepare(&mut self) {
        if self.mask.is_none() && !self.poisoned {
            self.mask = self.matcher.compute_mask_or_eos().ok();
        }
    }

    /// Sets every token the grammar forbids to `-inf`; the request's stop
    /// ids are allowed exactly when the grammar may end.
    ///
    /// # Errors
    /// [`Error::Grammar`] if the mask cannot be computed (the grammar ran
    /// out of its per-token budget) or allows nothing.
    pub(crate) fn apply(&mut self, logits: &mut [f32], stop_ids: &[u32]) -> Result<()> {
        self.prepare();
        let Some(mask) = &self.mask else {
            return Err(runtime(self.matcher.get_error().unwrap_or_else(|| "the grammar failed".into())));
        };
        // "May end" is the grammar's accepting state, not the end token's
        // mask bit: a client grammar can spell special tokens mid-way.
        let can_end = self.matcher.is_stopped() || self.matcher.is_accepting().unwrap_or(false);
        self.can_end = can_end;
        // End tokens are allowed when the grammar may end; otherwise only
        // as the mask says (a stop id may be ordinary text the grammar
        // wants, and is then text, not an end).
        let ends: Vec<(usize, f32)> = stop_ids
            .iter()
            .chain([&self.eos])
            .filter_map(|&id| logits.get(id as usize).map(|&l| (id as usize, l)))
            .collect();
        // 32 tokens per mask word: whole words allowed or forbidden at once.
        let words = mask.as_slice();
        for (w, chunk) in logits.chunks_mut(32).enumerate() {
            match words.get(w).copied().unwrap_or(0) {
                u32::MAX => {}
                0 => chunk.fill(f32::NEG_INFINITY),
                bits => {
                    for (b, l) in chunk.iter_mut().enumerate() {
                        if bits >> b & 1 == 0 {
                            *l = f32::NEG_INFINITY;
                        }
                    }
                }
            }
        }
        if can_end {
            for (id, l) in ends {
                logits[id] = l;
            }
        }
        // Nothing finite left (the grammar allows nothing, or the model's
        // allowed logits are not numbers): an error, never a guess that
        // could be read as an end.
        if logits.iter().any(|l| l.is_finite()) {
            Ok(())
        } else {
            Err(Error::Grammar("no token the grammar allows is possible here".into()))
        }
    }

    /// Tokens the grammar forces next, at most `k` (JSON keys, a tool call's
    /// scaffolding): nothing else can follow, whatever the model says, so
    /// they make drafts that are not guesses (`speculative.rs`). Empty where
    /// the grammar leaves a choice. Changes no state.
    ///
    /// llguidance gives forced *bytes* (its forced tokens need a canonical
    /// tokenizer, which the approximate trie here is not); they are
    /// tokenized as plain text, less the last token, which could merge with
    /// what follows. A model that spells them otherwise only rejects the
    /// draft.
    pub(crate) fn forced(&mut self, k: usize, codec: &dyn model::TextCodec) -> Vec<u32> {
        if self.poisoned || k == 0 {
            return Vec::new();
        }
        let bytes = self.matcher.compute_ff_bytes();
        let Ok(text) = std::str::from_utf8(&bytes) else { return Vec::new() };
        let mut forced = if text.is_empty() { Vec::new() } else { codec.encode(text).unwrap_or_default() };
        forced.pop();
        forced.truncate(k);
        forced
    }

    /// Whether `token` ends the request: an end token where the grammar may
    /// end (elsewhere a stop id the grammar allowed is text).
    pub(crate) fn is_end(&self, token: u32, stop_ids: &[u32]) -> bool {
        self.can_end && (token == self.eos || stop_ids.contains(&token))
    }

    /// Advances past `token` (not an end token).
    ///
    /// # Errors
    /// [`Error::Grammar`] if the grammar rejects it (the mask made sure it
    /// would not).
    pub(crate) fn accept(&mut self, token: u32) -> Result<Accepted> {
        self.mask = None;
        self.matcher.consume_token(token).map_err(runtime)?;
        if self.matcher.is_stopped() {
            return Ok(Accepted::Complete);
        }
        Ok(Accepted::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{FakeCodec, FAKE_EOS, FAKE_VOCAB};

    fn grammars() -> Grammars {
        Grammars::new(Arc::new(FakeCodec::new()), FAKE_VOCAB)
    }

    fn constraint(spec: GrammarSpec) -> Constraint {
        Constraint::new(grammars().compile(&Grammar::new(spec, "response_format")).expect("compiles"))
    }

    /// Tokens (bytes) the mask allows at this point.
    fn allowed(c: &mut Constraint) -> Vec<u32> {
        let mut logits = vec![0.0; FAKE_VOCAB];
        c.apply(&mut logits, &[FAKE_EOS]).expect("mask");
        (0..FAKE_VOCAB as u32).filter(|&i| logits[i as usize].is_finite()).collect()
    }

    fn feed(c: &mut Constraint, text: &str) -> Accepted {
        let mut last = Accepted::Continue;
        for b in text.bytes() {
            assert!(allowed(c).contains(&u32::from(b)), "{:?} not allowed", b as char);
            last = c.accept(u32::from(b)).expect("accepted");
        }
        last
    }

    #[test]
    fn a_regex_allows_only_what_can_still_match_and_ends_when_complete() {
        let mut c = constraint(GrammarSpec::Regex("(yes|no)".into()));
        assert_eq!(allowed(&mut c), vec![u32::from(b'n'), u32::from(b'y')]);
        feed(&mut c, "ye");
        assert_eq!(allowed(&mut c), vec![u32::from(b's')]);
        assert_eq!(c.accept(u32::from(b's')).expect("s"), Accepted::Complete);
    }

    #[test]
    fn the_end_token_is_allowed_only_where_the_grammar_may_end() {
        let mut c = constraint(GrammarSpec::Regex("[0-9]+".into()));
        assert!(!allowed(&mut c).contains(&FAKE_EOS), "empty is not a number");
        feed(&mut c, "42");
        let now = allowed(&mut c);
        assert!(now.contains(&FAKE_EOS) && now.contains(&u32::from(b'7')));
        assert!(c.is_end(FAKE_EOS, &[FAKE_EOS]));
    }

    #[test]
    fn a_schema_forces_its_layout_and_types() {
        let schema = serde_json::json!({
            "type": "object",
            "properties": { "n": { "type": "integer" } },
            "required": ["n"],
            "additionalProperties": false
        });
        let mut c = constraint(GrammarSpec::JsonSchema { schema, strict: false });
        assert_eq!(allowed(&mut c), vec![u32::from(b'{')]);
        feed(&mut c, "{\"n\": ");
        let digits = allowed(&mut c);
        assert!(digits.contains(&u32::from(b'7')) && !digits.contains(&u32::from(b'"')));
        assert_eq!(feed(&mut c, "12}"), Accepted::Complete);
    }

    #[test]
    fn special_tokens_never_spell_grammar_text() {
        // Byte 0xFF is no token's text here; the end token is special.
        let mut c = constraint(GrammarSpec::Regex("[^\"]*".into()));
        let now = allowed(&mut c);
        assert!(now.contains(&u32::from(b'a')) && now.contains(&FAKE_EOS));
        assert!(!now.contains(&u32::from(b'"')));
    }

    #[test]
    fn bad_grammars_are_invalid_requests_naming_their_field() {
        let g = grammars();
        for spec in [
            GrammarSpec::Regex("(".into()),
            GrammarSpec::Lark("start: nothing_defined".into()),
            GrammarSpec::JsonSchema { schema: serde_json::json!({ "type": "no-such-type" }), strict: false },
            GrammarSpec::JsonSchema { schema: serde_json::json!([1, 2]), strict: false },
            GrammarSpec::Regex("a".repeat(MAX_GRAMMAR_BYTES + 1)),
        ] {
            match g.compile(&Grammar::new(spec.clone(), "tools")) {
                Err(Error::InvalidRequest { field: "tools", .. }) => {}
                other => panic!("{:.80}: {other:?}", format!("{spec:?}")),
            }
        }
    }

    #[test]
    fn a_cached_grammar_starts_fresh_for_each_request() {
        let g = grammars();
        let spec = Grammar::new(GrammarSpec::Regex("ab".into()), "grammar");
        let mut first = Constraint::new(g.compile(&spec).expect("compiles"));
        feed(&mut first, "a");
        let mut second = Constraint::new(g.compile(&spec).expect("cached"));
        assert_eq!(allowed(&mut second), vec![u32::from(b'a')]);
    }
}
