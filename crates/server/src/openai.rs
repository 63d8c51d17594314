//! OpenAI's wire types (the subset kvserve serves), and their conversion into
//! the engine's [`Request`]. Parsing is strict about types and values and
//! lenient about unknown fields (clients send many we do not use).
//!
//! Extensions beyond OpenAI's schema, accepted in the body (the official
//! clients send them through `extra_body`): `agent_id`, `top_k`, `min_p`,
//! `repetition_penalty`, `priority`, `ignore_eos`, `stop_token_ids`,
//! `speculative` (false opts out of speculative decoding). Usage reports
//! speculative decoding's drafted tokens as OpenAI reports predicted
//! outputs: `completion_tokens_details.accepted_prediction_tokens` and
//! `rejected_prediction_tokens`.
//!
//! What the server cannot honour is refused with a 400 naming the field,
//! never silently ignored: `n` > 1, `best_of` > 1, `suffix`, `echo`, legacy
//! `functions` / `function_call`. Tools, response formats and grammars are
//! `structured.rs`.

use engine::{AgentId, Prompt, Request, SamplingParams, TenantId};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// `stop`: one string or a list.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Message content: a string, or a list of parts of which only text is
/// supported.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub(crate) struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    /// An assistant's tool calls.
    #[serde(default)]
    tool_calls: Option<Vec<crate::structured::WireToolCall>>,
    /// A tool result's call.
    #[serde(default)]
    tool_call_id: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub(crate) include_usage: bool,
}

/// Fields shared by chat and text completions.
#[derive(Clone, Debug, Default, Deserialize)]
pub(crate) struct Common {
    pub(crate) model: Option<String>,
    #[serde(default)]
    pub(crate) stream: bool,
    pub(crate) stream_options: Option<StreamOptions>,
    pub(crate) max_tokens: Option<u64>,
    pub(crate) max_completion_tokens: Option<u64>,
    pub(crate) temperature: Option<f32>,
    pub(crate) top_p: Option<f32>,
    pub(crate) n: Option<u32>,
    pub(crate) stop: Option<Stop>,
    pub(crate) seed: Option<i64>,
    pub(crate) presence_penalty: Option<f32>,
    pub(crate) frequency_penalty: Option<f32>,
    pub(crate) top_k: Option<i64>,
    pub(crate) min_p: Option<f32>,
    pub(crate) repetition_penalty: Option<f32>,
    pub(crate) priority: Option<i32>,
    #[serde(default)]
    pub(crate) ignore_eos: bool,
    #[serde(default)]
    pub(crate) stop_token_ids: Vec<u32>,
    pub(crate) agent_id: Option<String>,
    /// `false` opts out of speculative decoding (the output is the same
    /// either way).
    pub(crate) speculative: Option<bool>,
    /// Token id (as a string, per OpenAI) to a bias in `[-100, 100]`.
    pub(crate) logit_bias: Option<std::collections::BTreeMap<String, f32>>,
    pub(crate) best_of: Option<u32>,
    /// `guided_json` / `guided_regex` / `guided_grammar` (`structured.rs`).
    #[serde(flatten)]
    pub(crate) guided: crate::structured::Guided,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    pub(crate) messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    pub(crate) logprobs: bool,
    pub(crate) top_logprobs: Option<u32>,
    pub(crate) tools: Option<Vec<serde_json::Value>>,
    pub(crate) tool_choice: Option<serde_json::Value>,
    pub(crate) parallel_tool_calls: Option<bool>,
    pub(crate) response_format: Option<serde_json::Value>,
    pub(crate) functions: Option<serde_json::Value>,
    pub(crate) function_call: Option<serde_json::Value>,
    #[serde(flatten)]
    pub(crate) common: Common,
}

/// `prompt` of a text completion.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    /// Several prompts as token ids (lm-evaluation-harness sends these).
    TokenLists(Vec<Vec<u32>>),
}

/// Most prompts one `/v1/completions` request may carry.
pub(crate) const MAX_PROMPTS: usize = 64;

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub(crate) struct CompletionRequest {
    pub(crate) prompt: Option<PromptInput>,
    #[serde(default)]
    pub(crate) echo: bool,
    pub(crate) logprobs: Option<u32>,
    pub(crate) suffix: Option<String>,
    #[serde(flatten)]
    pub(crate) common: Common,
}

fn invalid(param: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message)
}

impl Common {
    /// Checks the model name and builds the engine request around `prompt`.
    pub(crate) fn into_request(
        self,
        prompt: Prompt,
        grammar: Option<engine::Grammar>,
        served_models: &[String],
        tenant: TenantId,
        header_agent: Option<String>,
        max_priority: i32,
    ) -> Result<Request, ApiError> {
        match self.model.as_deref() {
            None | Some("") => return Err(invalid("model", "you must provide a model parameter")),
            Some(m) if !served_models.iter().any(|s| s == m) => {
                return Err(ApiError::model_not_found(m, served_models));
            }
            Some(_) => {}
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(invalid("n", "only n = 1 is supported"));
        }
        if self.best_of.is_some_and(|n| n > 1) {
            return Err(invalid("best_of", "only best_of = 1 is supported"));
        }
        let logit_bias = match self.logit_bias {
            None => Vec::new(),
            Some(map) => {
                if map.len() > engine::MAX_LOGIT_BIAS {
                    return Err(invalid("logit_bias", "at most 300 entries"));
                }
                map.into_iter()
                    .map(|(k, v)| {
                        // Canonical decimal only: "5", "05" and "+5" must
                        // not be three entries adding up for one token.
                        let id = k.parse::<u32>().ok().filter(|id| id.to_string() == k).ok_or_else(|| {
                            invalid(
                                "logit_bias",
                                format!("{:?} is not a token id", k.chars().take(32).collect::<String>()),
                            )
                        })?;
                        Ok((id, v))
                    })
                    .collect::<Result<Vec<_>, ApiError>>()?
            }
        };
        let mut sampling = SamplingParams::default();
        if let Some(t) = self.temperature {
            sampling.temperature = t;
        }
        if let Some(p) = self.top_p {
            sampling.top_p = p;
        }
        if let Some(p) = self.min_p {
            sampling.min_p = p;
        }
        if let Some(p) = self.presence_penalty {
            sampling.presence_penalty = p;
        }
        if let Some(p) = self.frequency_penalty {
            sampling.frequency_penalty = p;
        }
        if let Some(p) = self.repetition_penalty {
            sampling.repetition_penalty = p;
        }
        if let Some(k) = self.top_k {
            // -1 is the common spelling of "off".
            sampling.top_k = match k {
                -1 | 0 => 0,
                k if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
                _ => return Err(invalid("top_k", "must be -1, 0 or positive")),
            };
        }
        sampling.seed = self.seed.map(|s| s as u64);
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            Some(0) => return Err(invalid("max_tokens", "must be at least 1")),
            Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            None => None,
        };
        let agent = match (self.agent_id, header_agent) {
            (Some(body), Some(header)) if body != header => {
                return Err(invalid("agent_id", "the body's agent_id and the x-agent-id header name different agents"))
            }
            (Some(a), _) | (None, Some(a)) => Some(AgentId::new(&a).map_err(|e| invalid("agent_id", e.to_string()))?),
            (None, None) => None,
        };
        let mut req = Request::new(prompt);
        req.sampling = sampling;
        req.max_tokens = max_tokens;
        req.stop = match self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        req.stop_token_ids = self.stop_token_ids;
        req.ignore_eos = self.ignore_eos;
        req.speculative = self.speculative.unwrap_or(true);
        req.agent = agent;
        req.tenant = tenant;
        req.priority = self.priority.map_or(Ok(0), |p| crate::check_priority(p, max_priority))?;
        req.logit_bias = logit_bias;
        req.grammar = grammar;
        Ok(req)
    }
}

impl ChatRequest {
    /// The conversation as the engine's messages, with the grammar its
    /// `tools`, `response_format` or `guided_*` fields ask for
    /// (`structured.rs`).
    pub(crate) fn plan(&mut self) -> Result<crate::structured::Plan, ApiError> {
        if self.functions.is_some() {
            return Err(invalid("functions", "the legacy functions API is not supported; use tools"));
        }
        if self.function_call.is_some() {
            return Err(invalid("function_call", "the legacy functions API is not supported; use tool_choice"));
        }
        let messages = self.messages.take().ok_or_else(|| invalid("messages", "messages is required"))?;
        if messages.is_empty() {
            return Err(invalid("messages", "messages must not be empty"));
        }
        let mut turns = Vec::with_capacity(messages.len());
        for m in messages {
            if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant" | "tool") {
                return Err(invalid("messages", format!("unknown role {:?}", m.role)));
            }
            let text = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(invalid("messages", format!("content part {kind:?} is not supported")));
                            }
                        }
                    }
                    text
                }
            };
            let tool_calls = match m.tool_calls {
                Some(calls) if m.role != "assistant" && !calls.is_empty() => {
                    return Err(invalid("messages", "only assistant messages carry tool_calls"));
                }
                Some(calls) => crate::structured::history_calls(calls)?,
                None => Vec::new(),
            };
            let role = if m.role == "developer" { "system".to_owned() } else { m.role };
            turns.push(engine::tools::Turn { role, content: text, tool_calls, tool_call_id: m.tool_call_id });
        }
        let guided = self.common.guided.grammar()?;
        crate::structured::plan(
            turns,
            crate::structured::Asked {
                tools: self.tools.as_ref(),
                tool_choice: self.tool_choice.as_ref(),
                parallel_tool_calls: self.parallel_tool_calls,
                response_format: self.response_format.as_ref(),
                guided,
            },
        )
    }
}

impl CompletionRequest {
    /// The prompts (one, or a batch answered with one choice each), after
    /// the checks of what the endpoint refuses.
    pub(crate) fn prompts(&mut self) -> Result<Vec<Prompt>, ApiError> {
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(invalid("suffix", "suffix (insertion) is not supported"));
        }
        if self.logprobs.is_some_and(|n| n > 20) {
            return Err(invalid("logprobs", "must be between 0 and 20"));
        }
        let prompts: Vec<Prompt> = match self.prompt.take() {
            None => return Err(invalid("prompt", "prompt is required")),
            Some(PromptInput::Text(t)) => vec![Prompt::Text(t)],
            Some(PromptInput::Texts(v)) => v.into_iter().map(Prompt::Text).collect(),
            Some(PromptInput::Tokens(t)) => vec![Prompt::Tokens(t)],
            Some(PromptInput::TokenLists(v)) => v.into_iter().map(Prompt::Tokens).collect(),
        };
        match prompts.len() {
            0 => Err(invalid("prompt", "the list of prompts is empty")),
            n if n > MAX_PROMPTS => Err(invalid("prompt", format!("at most {MAX_PROMPTS} prompts per request"))),
            _ => Ok(prompts),
        }
    }

    /// Whether the answer needs the legacy shape (`legacy.rs`): the prompt
    /// echoed, log-probabilities, or one choice per prompt.
    pub(crate) fn legacy(&self, prompts: usize) -> bool {
        self.echo || self.logprobs.is_some() || prompts > 1
    }
}

/// `usage` of a response.
#[derive(Debug, Serialize, Deserialize, Clone, Copy)]
pub(crate) struct UsageBody {
    pub(crate) prompt_tokens: usize,
    pub(crate) completion_tokens: usize,
    pub(crate) total_tokens: usize,
    pub(crate) prompt_tokens_details: PromptTokensDetails,
    #[serde(default)]
    pub(crate) completion_tokens_details: CompletionTokensDetails,
}

#[derive(Debug, Serialize, Deserialize, Clone, Copy)]
pub(crate) struct PromptTokensDetails {
    pub(crate) cached_tokens: usize,
}

/// OpenAI's predicted-output counts, here for speculative decoding: drafted
/// tokens the model agreed with, and those it did not.
#[derive(Debug, Serialize, Deserialize, Clone, Copy, Default)]
pub(crate) struct CompletionTokensDetails {
    pub(crate) accepted_prediction_tokens: usize,
    pub(crate) rejected_prediction_tokens: usize,
}

impl From<engine::Usage> for UsageBody {
    fn from(u: engine::Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens: u.cached_tokens },
            completion_tokens_details: CompletionTokensDetails {
                accepted_prediction_tokens: u.accepted_tokens,
                rejected_prediction_tokens: u.drafted_tokens - u.accepted_tokens,
            },
        }
    }
}

/// One token's entry in chat `logprobs.content`.
#[derive(Debug, Serialize)]
pub(crate) struct TokenLogprob {
    pub(crate) token: String,
    pub(crate) logprob: f32,
    pub(crate) bytes: Vec<u8>,
    pub(crate) top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Serialize)]
pub(crate) struct TopLogprob {
    pub(crate) token: String,
    pub(crate) logprob: f32,
    pub(crate) bytes: Vec<u8>,
}
