//! What a caller asks for, and the validated form the engine accepts.
//!
//! A [`Request`] is plain data from the edge (the server or the CLI);
//! [`crate::EngineHandle::validate`] turns it into a [`ValidRequest`]
//! (prompt rendered and tokenized, every parameter range-checked, lengths
//! checked against the model's context and the cache's capacity). The engine
//! loop accepts only `ValidRequest`s, so it never has to refuse one later for
//! a reason that was knowable up front.

use std::sync::Arc;
use std::time::Duration;

use model::Message;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Longest agent or tenant id.
pub const MAX_ID_LEN: usize = 64;

fn check_id(what: &'static str, id: &str) -> Result<()> {
    let reason = if id.is_empty() {
        Some("it is empty")
    } else if id.len() > MAX_ID_LEN {
        Some("it is longer than 64 bytes")
    } else if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':')) {
        Some("only ASCII letters, digits, '-', '_', '.' and ':' are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidId { what, id: id.chars().take(MAX_ID_LEN).collect(), reason }),
        None => Ok(()),
    }
}

/// An agent's name, chosen by the client: 1 to 64 of `[A-Za-z0-9_.:-]`, so
/// it is safe in logs, URLs and metric labels.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct AgentId(Arc<str>);

impl AgentId {
    /// Validates `id`.
    ///
    /// # Errors
    /// [`Error::InvalidId`] naming what is wrong.
    pub fn new(id: &str) -> Result<Self> {
        check_id("agent", id)?;
        Ok(Self(id.into()))
    }

    /// The id's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for AgentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tenant: the unit of block quotas and of cache isolation (tenants never
/// share blocks). Same character rules as [`AgentId`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct TenantId(Arc<str>);

impl TenantId {
    /// Validates `id`.
    ///
    /// # Errors
    /// [`Error::InvalidId`] naming what is wrong.
    pub fn new(id: &str) -> Result<Self> {
        check_id("tenant", id)?;
        Ok(Self(id.into()))
    }

    /// The tenant of requests that name none.
    pub fn default_tenant() -> Self {
        Self("default".into())
    }

    /// The id's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TenantId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Identifies one submitted request (for [`crate::EngineHandle::cancel`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RequestId(pub u64);

/// The text the model continues.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Raw text, tokenized as is.
    Text(String),
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<Message>),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

/// How the next token is chosen. The defaults sample at temperature 1 with
/// no filtering and no penalties.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy; otherwise logits are divided by it. `[0, 2]`.
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches this. `(0, 1]`.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one. `[0, 1]`.
    pub min_p: f32,
    /// Divides positive (multiplies negative) logits of every token already
    /// in the prompt or the answer; 1 is off. `(0, 2]`.
    pub repetition_penalty: f32,
    /// Subtracted once per earlier occurrence in the answer. `[-2, 2]`.
    pub frequency_penalty: f32,
    /// Subtracted once if the token occurred in the answer. `[-2, 2]`.
    pub presence_penalty: f32,
    /// Makes sampling reproducible; `None` draws a seed.
    pub seed: Option<u64>,
    /// Report the chosen token's log-probability and this many alternatives
    /// (at most 20); `None` reports nothing.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    fn validate(&self) -> Result<()> {
        let bad = |field, problem: &str| Err(Error::InvalidRequest { field, problem: problem.to_owned() });
        let within = |v: f32, lo: f32, hi: f32| v.is_finite() && v >= lo && v <= hi;
        if !within(self.temperature, 0.0, 2.0) {
            return bad("temperature", "must be between 0 and 2");
        }
        if !(within(self.top_p, 0.0, 1.0) && self.top_p > 0.0) {
            return bad("top_p", "must be greater than 0 and at most 1");
        }
        if !within(self.min_p, 0.0, 1.0) {
            return bad("min_p", "must be between 0 and 1");
        }
        if !(within(self.repetition_penalty, 0.0, 2.0) && self.repetition_penalty > 0.0) {
            return bad("repetition_penalty", "must be greater than 0 and at most 2");
        }
        if !within(self.frequency_penalty, -2.0, 2.0) {
            return bad("frequency_penalty", "must be between -2 and 2");
        }
        if !within(self.presence_penalty, -2.0, 2.0) {
            return bad("presence_penalty", "must be between -2 and 2");
        }
        if self.logprobs.is_some_and(|n| n > 20) {
            return bad("top_logprobs", "must be at most 20");
        }
        Ok(())
    }
}

/// One generation request, as the edge received it.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// What to continue.
    pub prompt: Prompt,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Most tokens to generate; `None` means up to the context's end.
    pub max_tokens: Option<usize>,
    /// Generation stops before any of these strings (at most 4, each at most
    /// 256 bytes); they may span tokens.
    pub stop: Vec<String>,
    /// Generation stops after any of these ids (besides the model's own
    /// end-of-turn ids unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past the model's end-of-sequence ids.
    pub ignore_eos: bool,
    /// The agent whose cached conversation this turn continues.
    pub agent: Option<AgentId>,
    /// Whose quota and cache namespace the request uses.
    pub tenant: TenantId,
    /// Higher runs first and is preempted last; FIFO within a priority.
    pub priority: i32,
    /// Give up after this long (queueing included); `None` uses the engine's
    /// default.
    pub timeout: Option<Duration>,
    /// Added to these tokens' logits before choosing (OpenAI's
    /// `logit_bias`: at most [`MAX_LOGIT_BIAS`] entries, each in
    /// `[-100, 100]`; -100 bans a token, 100 all but forces it).
    pub logit_bias: Vec<(u32, f32)>,
    /// What the output must match (`grammar.rs`): the grammar's end is
    /// the request's end, and stop strings do not apply.
    pub grammar: Option<crate::Grammar>,
    /// Report the prompt's own log-probabilities ([`Event::Prompt`]), each
    /// with this many most likely alternatives (at most 20): every prompt
    /// token's, given the ones before it (the first has none). The prompt
    /// is then computed whole, never taken from the cache (its K/V is;
    /// its logits are not kept). Allows `max_tokens` 0: the prompt only.
    pub prompt_logprobs: Option<usize>,
    /// May its decoding draft tokens (`speculative.rs`)? The output is the
    /// same either way; false opts out.
    pub speculative: bool,
}

/// Most `logit_bias` entries a request may carry.
pub const MAX_LOGIT_BIAS: usize = 300;
/// Most `stop_token_ids` a request may carry.
pub const MAX_STOP_TOKEN_IDS: usize = 64;
/// Longest timeout a request or the engine may set: a year (beyond, adding
/// it to a clock reading could overflow).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

impl Request {
    /// A request for `prompt` with default settings.
    pub fn new(prompt: Prompt) -> Self {
        Self {
            prompt,
            sampling: SamplingParams::default(),
            max_tokens: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            agent: None,
            tenant: TenantId::default_tenant(),
            priority: 0,
            timeout: None,
            logit_bias: Vec::new(),
            grammar: None,
            prompt_logprobs: None,
            speculative: true,
        }
    }

    /// Checks everything that does not need the model.
    pub(crate) fn validate_params(&self) -> Result<()> {
        self.sampling.validate()?;
        if self.max_tokens == Some(0) && self.prompt_logprobs.is_none() {
            return Err(Error::InvalidRequest { field: "max_tokens", problem: "must be at least 1".into() });
        }
        if self.prompt_logprobs.is_some_and(|n| n > 20) {
            return Err(Error::InvalidRequest { field: "logprobs", problem: "at most 20".into() });
        }
        if self.stop.len() > 4 {
            return Err(Error::InvalidRequest { field: "stop", problem: "at most 4 stop strings".into() });
        }
        if self.stop.iter().any(|s| s.is_empty() || s.len() > 256) {
            return Err(Error::InvalidRequest { field: "stop", problem: "each must be 1 to 256 bytes".into() });
        }
        if self.timeout.is_some_and(|t| t.is_zero() || t > MAX_TIMEOUT) {
            return Err(Error::InvalidRequest {
                field: "timeout",
                problem: "must be positive and at most a year".into(),
            });
        }
        if self.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
            return Err(Error::InvalidRequest { field: "stop_token_ids", problem: "at most 64 ids".into() });
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return Err(Error::InvalidRequest { field: "logit_bias", problem: "at most 300 entries".into() });
        }
        if self.logit_bias.iter().any(|&(_, b)| !(b.is_finite() && (-100.0..=100.0).contains(&b))) {
            return Err(Error::InvalidRequest {
                field: "logit_bias",
                problem: "each bias must be between -100 and 100".into(),
            });
        }
        match &self.prompt {
            Prompt::Chat(m) if m.is_empty() => {
                Err(Error::InvalidRequest { field: "messages", problem: "must not be empty".into() })
            }
            Prompt::Tokens(t) if t.is_empty() => {
                Err(Error::InvalidRequest { field: "prompt", problem: "must not be empty".into() })
            }
            Prompt::Text(t) if t.is_empty() => {
                Err(Error::InvalidRequest { field: "prompt", problem: "must not be empty".into() })
            }
            _ => Ok(()),
        }
    }
}

/// A request the engine accepts: prompt tokenized, limits checked.
#[derive(Clone, Debug)]
pub struct ValidRequest {
    pub(crate) prompt: Vec<u32>,
    pub(crate) max_tokens: usize,
    pub(crate) stop_ids: Vec<u32>,
    pub(crate) grammar: Option<crate::CompiledGrammar>,
    pub(crate) req: Request,
}

impl ValidRequest {
    /// Prompt tokens.
    pub fn prompt_tokens(&self) -> &[u32] {
        &self.prompt
    }

    /// Tokens the request may generate at most.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The request as submitted.
    pub fn request(&self) -> &Request {
        &self.req
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// Cancelled by the caller.
    Cancelled,
}

/// Token counts of one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Of those, tokens whose K/V came from the cache (not recomputed).
    pub cached_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Tokens drafted for speculative decoding (`speculative.rs`).
    pub drafted_tokens: usize,
    /// Of those, the ones the model agreed with: generated without a step
    /// of their own.
    pub accepted_tokens: usize,
}

/// Log-probabilities of one generated token.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Logprobs {
    /// The chosen token's log-probability.
    pub logprob: f32,
    /// The most likely tokens and theirs, best first.
    pub top: Vec<(u32, f32)>,
}

/// One thing that happened to a request.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A token was generated. `text` is the text it completes (possibly
    /// empty while a multi-byte character or a possible stop string is
    /// pending).
    Token {
        /// The token id.
        id: u32,
        /// Newly final text.
        text: String,
        /// When asked for.
        logprobs: Option<Logprobs>,
    },
    /// The prompt's log-probabilities, when asked for
    /// ([`Request::prompt_logprobs`]): one per prompt token, the first
    /// `None`. Comes once, before the first token.
    Prompt {
        /// Per prompt token.
        logprobs: Vec<Option<Logprobs>>,
    },
    /// The request ended normally; `text` is any text held back until now.
    Finished {
        /// Why.
        reason: FinishReason,
        /// Final text not yet sent.
        text: String,
        /// Token counts.
        usage: Usage,
    },
    /// The request failed; nothing follows.
    Error(Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_reject_what_could_escape_a_path_or_a_label() {
        assert!(AgentId::new("agent-1.a_b:c").is_ok());
        for bad in ["", "../etc", "a b", "a/b", "\"x\"", &"x".repeat(65), "é"] {
            assert!(matches!(AgentId::new(bad), Err(Error::InvalidId { what: "agent", .. })), "{bad:?}");
        }
        assert!(matches!(TenantId::new("t\n"), Err(Error::InvalidId { what: "tenant", .. })));
    }

    #[test]
    fn out_of_range_parameters_name_their_field() {
        let field = |f: fn(&mut Request)| {
            let mut r = Request::new(Prompt::Text("hi".into()));
            f(&mut r);
            match r.validate_params() {
                Err(Error::InvalidRequest { field, .. }) => field,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(field(|r| r.sampling.temperature = -1.0), "temperature");
        assert_eq!(field(|r| r.sampling.temperature = f32::NAN), "temperature");
        assert_eq!(field(|r| r.sampling.top_p = 0.0), "top_p");
        assert_eq!(field(|r| r.sampling.min_p = 1.5), "min_p");
        assert_eq!(field(|r| r.sampling.repetition_penalty = 0.0), "repetition_penalty");
        assert_eq!(field(|r| r.sampling.frequency_penalty = 3.0), "frequency_penalty");
        assert_eq!(field(|r| r.sampling.presence_penalty = -3.0), "presence_penalty");
        assert_eq!(field(|r| r.sampling.logprobs = Some(21)), "top_logprobs");
        assert_eq!(field(|r| r.max_tokens = Some(0)), "max_tokens");
        assert_eq!(field(|r| r.stop = vec![String::new()]), "stop");
        assert_eq!(field(|r| r.stop = vec!["a".into(); 5]), "stop");
        assert_eq!(field(|r| r.prompt = Prompt::Chat(vec![])), "messages");
        assert_eq!(field(|r| r.prompt = Prompt::Tokens(vec![])), "prompt");
        assert_eq!(field(|r| r.stop_token_ids = vec![1; 65]), "stop_token_ids");
        assert_eq!(field(|r| r.logit_bias = vec![(1, 0.0); 301]), "logit_bias");
        assert_eq!(field(|r| r.logit_bias = vec![(1, 101.0)]), "logit_bias");
        assert_eq!(field(|r| r.logit_bias = vec![(1, f32::NAN)]), "logit_bias");
        assert_eq!(field(|r| r.timeout = Some(Duration::from_secs(u64::MAX))), "timeout");
    }
}
