//! `POST /v1/chat/completions` and `POST /v1/completions`, streaming and not.
//!
//! Both parse the body themselves (so malformed JSON is an OpenAI-style
//! 400, not axum's plain-text rejection), build an engine request, submit it
//! and either collect the events into one response or forward them as
//! server-sent events: a first chunk with the assistant role, one chunk per
//! piece of text, a chunk with the finish reason, a usage chunk when
//! `stream_options.include_usage`, then `data: [DONE]`.
//!
//! A reply in the tool format (`structured.rs`) is read back: calls become
//! `message.tool_calls` (streamed once complete: per call a chunk with id
//! and name, then one with the arguments), a plain answer becomes content
//! (streamed as it comes, decoded from its JSON string).
//!
//! Cancellation needs no code: when a client goes away, axum drops the
//! response (or the handler's future), which drops the engine's event
//! stream, and the engine frees the request's blocks on its next iteration.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use engine::{Event, EventStream, FinishReason, Logprobs, Prompt, TenantId, Usage};
use futures_util::stream::{self, Stream};
use serde::Serialize;
use serde_json::json;

use crate::access_log::GenerationLog;
use crate::error::ApiError;
use crate::guard::JsonBody;
use crate::openai::{ChatRequest, Common, CompletionRequest, TokenLogprob, TopLogprob, UsageBody};
use crate::{AppState, Tenant};

/// Header naming the agent, as an alternative to the body's `agent_id`.
pub const AGENT_HEADER: &str = "x-agent-id";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

/// What one response is about, shared by every chunk.
#[derive(Clone)]
struct Meta {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    logprobs: Option<usize>,
    /// The reply is in the generic tool format: read back into
    /// `tool_calls` (`structured.rs`), streamed once complete.
    tool_reply: bool,
    /// Its plain answers are JSON values.
    structured_answer: bool,
    /// Its request's log line.
    log: GenerationLog,
}

/// The endpoint a completion body was sent to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Completion,
}

/// The prompt a completion body asks for, planned as the endpoint's handler
/// plans it (roles checked, content parts joined, tools and tool history
/// rendered into the messages): what a router in front of replicas needs
/// to compute the block addresses a replica will use. The engine then
/// encodes it with the model's codec ([`Prompt::Chat`] with the chat
/// template, [`Prompt::Text`] as a literal prompt, [`Prompt::Tokens`] as
/// they are). An agent's turn may reuse its own earlier tokens where the
/// re-rendered history has the same text, so for agents this is the
/// prompt's text, not always its exact tokens.
///
/// # Errors
/// The 400 the endpoint would answer for a body of the wrong shape or a
/// prompt it cannot plan (other fields are not checked).
pub fn prompt_of(endpoint: Endpoint, body: &serde_json::Value) -> Result<Prompt, ApiError> {
    use serde::Deserialize;
    match endpoint {
        Endpoint::Chat => {
            let mut req = ChatRequest::deserialize(body).map_err(ApiError::bad_json)?;
            Ok(Prompt::Chat(req.plan()?.messages))
        }
        Endpoint::Completion => {
            // A batch goes to one replica: its first prompt decides where.
            let mut req = CompletionRequest::deserialize(body).map_err(ApiError::bad_json)?;
            Ok(req.prompts()?.swap_remove(0))
        }
    }
}

pub(crate) fn header_agent(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get(AGENT_HEADER) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.to_owned()))
            .map_err(|_| ApiError::invalid("agent_id", "the x-agent-id header is not ASCII")),
    }
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Extension(log): Extension<GenerationLog>,
    headers: HeaderMap,
    JsonBody(mut req): JsonBody<ChatRequest>,
) -> Result<Response, ApiError> {
    let plan = req.plan()?;
    if req.top_logprobs.is_some_and(|n| n > 20) {
        return Err(ApiError::invalid("top_logprobs", "must be at most 20"));
    }
    if req.top_logprobs.is_some_and(|n| n > 0) && !req.logprobs {
        return Err(ApiError::invalid("top_logprobs", "needs logprobs: true"));
    }
    let logprobs = req.logprobs.then(|| req.top_logprobs.unwrap_or(0) as usize);
    let shape = Shape {
        grammar: plan.grammar,
        tool_reply: plan.tool_reply,
        structured_answer: plan.structured_answer,
        logprobs,
    };
    respond(&state, Kind::Chat, req.common, Prompt::Chat(plan.messages), tenant, (&headers, log), shape).await
}

/// What a request asks of its output.
struct Shape {
    grammar: Option<engine::Grammar>,
    tool_reply: bool,
    structured_answer: bool,
    logprobs: Option<usize>,
}

/// `POST /v1/completions`.
pub(crate) async fn completion(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Extension(log): Extension<GenerationLog>,
    headers: HeaderMap,
    JsonBody(mut req): JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
    let mut prompts = req.prompts()?;
    if req.legacy(prompts.len()) {
        return crate::legacy::complete(&state, req, prompts, tenant, (&headers, log)).await;
    }
    let prompt = prompts.remove(0);
    let grammar = req.common.guided.grammar()?;
    let shape = Shape { grammar, tool_reply: false, structured_answer: false, logprobs: None };
    respond(&state, Kind::Text, req.common, prompt, tenant, (&headers, log), shape).await
}

/// Builds the engine request, submits it, and answers whole or streamed.
async fn respond(
    state: &AppState,
    kind: Kind,
    common: Common,
    prompt: Prompt,
    tenant: TenantId,
    (headers, log): (&HeaderMap, GenerationLog),
    shape: Shape,
) -> Result<Response, ApiError> {
    let (stream, include_usage) = (common.stream, common.stream_options.as_ref().is_some_and(|o| o.include_usage));
    let Shape { grammar, tool_reply, structured_answer, logprobs } = shape;
    let mut request =
        common.into_request(prompt, grammar, &state.model_names, tenant, header_agent(headers)?, state.max_priority)?;
    request.sampling.logprobs = logprobs;
    log.agent(request.agent.as_ref());
    let mut meta = Meta {
        kind,
        id: String::new(),
        created: now_secs(),
        model: state.model_name.to_string(),
        include_usage,
        logprobs,
        tool_reply,
        structured_answer,
        log,
    };
    let mut events = state.engine.submit(validate(state, request).await.map_err(|e| for_kind(kind, e))?)?;
    // What can refuse the request on its way in (agent limit, quota) is
    // answered with its HTTP status, before any stream header is sent.
    events.admitted().await?;
    let prefix = if meta.kind == Kind::Chat { "chatcmpl" } else { "cmpl" };
    meta.id = format!("{prefix}-{}", random_id());
    if stream {
        Ok(Sse::new(sse_stream(state.clone(), events, meta)).into_response())
    } else {
        whole(state, events, meta).await
    }
}

/// Renders and tokenizes a request off the async runtime: a long prompt
/// takes a CPU for a while, and the runtime's few threads must keep
/// answering everyone else (`/health` included). At most
/// `AppState::prep` prompts are prepared at once; more wait for a turn.
pub(crate) async fn validate(state: &AppState, request: engine::Request) -> Result<engine::ValidRequest, ApiError> {
    let permit = std::sync::Arc::clone(&state.prep).acquire_owned().await.map_err(|_| ApiError::internal())?;
    let engine = state.engine.clone();
    let prepared = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        engine.validate(request)
    })
    .await
    .map_err(|e| {
        tracing::error!(error = %e, "preparing a prompt failed");
        ApiError::internal()
    })?;
    Ok(prepared?)
}

/// 24 random alphanumerics: response ids tell nothing about other
/// requests (a counter would tell every tenant how much traffic others
/// send).
pub(crate) fn random_id() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), 24)
}

/// `/v1/completions` calls the prompt `prompt`, not `messages`.
fn for_kind(kind: Kind, mut e: ApiError) -> ApiError {
    if kind == Kind::Text && e.param == Some("messages") {
        e.param = Some("prompt");
    }
    e
}

/// The assistant message and finish reason of a finished reply: tool
/// calls read back when the reply is in the tool format and complete.
fn chat_message(meta: &Meta, text: String, reason: FinishReason) -> (serde_json::Value, &'static str) {
    if meta.tool_reply && reason == FinishReason::Stop {
        match crate::structured::read_reply(&text, meta.structured_answer) {
            Some(crate::structured::ToolReply::Calls(calls)) => {
                let calls = crate::structured::calls_json(&calls, false);
                return (json!({"role": "assistant", "content": null, "tool_calls": calls}), "tool_calls");
            }
            Some(crate::structured::ToolReply::Answer(a)) => {
                return (json!({"role": "assistant", "content": a}), "stop");
            }
            None => {}
        }
    }
    // An answer cut short: its text so far, as the stream sent it.
    if meta.tool_reply && !meta.structured_answer {
        if let Some(body) = text.strip_prefix(crate::structured::ANSWER_PREFIX) {
            let (answer, _, _) = crate::structured::decode_partial(body);
            return (json!({"role": "assistant", "content": answer}), finish_reason(reason));
        }
    }
    (json!({"role": "assistant", "content": text}), finish_reason(reason))
}

pub(crate) fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

/// OpenAI's stand-in for a probability that rounds to zero (JSON has no
/// `-inf`; serde would write `null`).
pub(crate) const MIN_LOGPROB: f32 = -9999.0;

fn token_logprobs(state: &AppState, id: u32, lp: &Logprobs) -> TokenLogprob {
    let codec = state.engine.codec();
    let token = |t: u32| {
        let bytes = codec.token_bytes(t).unwrap_or_default();
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    };
    let (text, bytes) = token(id);
    TokenLogprob {
        token: text,
        bytes,
        logprob: lp.logprob.max(MIN_LOGPROB),
        top_logprobs: lp
            .top
            .iter()
            .map(|&(t, logprob)| {
                let (token, bytes) = token(t);
                TopLogprob { token, bytes, logprob: logprob.max(MIN_LOGPROB) }
            })
            .collect(),
    }
}

/// Collects the whole answer into one JSON response.
async fn whole(state: &AppState, mut events: EventStream, meta: Meta) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    let (reason, usage) = loop {
        match events.next().await {
            Some(Event::Token { id, text: t, logprobs: lp }) => {
                meta.log.token();
                text.push_str(&t);
                if let Some(lp) = lp {
                    logprobs.push(token_logprobs(state, id, &lp));
                }
            }
            Some(Event::Finished { reason, text: t, usage }) => {
                meta.log.finished(usage);
                text.push_str(&t);
                break (reason, usage);
            }
            // Not asked for on this path (`legacy.rs` asks).
            Some(Event::Prompt { .. }) => {}
            Some(Event::Error(e)) => return Err(e.into()),
            None => return Err(engine::Error::EngineStopped.into()),
        }
    };
    let usage = UsageBody::from(usage);
    let body = match meta.kind {
        Kind::Chat => {
            let (message, finish) = chat_message(&meta, text, reason);
            json!({
                "id": meta.id,
                "object": "chat.completion",
                "created": meta.created,
                "model": meta.model,
                "choices": [{
                    "index": 0,
                    "message": message,
                    "logprobs": meta.logprobs.map(|_| json!({"content": logprobs})),
                    "finish_reason": finish,
                }],
                "usage": usage,
            })
        }
        Kind::Text => json!({
            "id": meta.id,
            "object": "text_completion",
            "created": meta.created,
            "model": meta.model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason(reason)}],
            "usage": usage,
        }),
    };
    Ok(Json(body).into_response())
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<UsageBody>,
}

impl Meta {
    fn chunk(&self, choices: Vec<serde_json::Value>, usage: Option<UsageBody>) -> SseEvent {
        let object = if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
        let chunk = Chunk { id: &self.id, object, created: self.created, model: &self.model, choices, usage };
        SseEvent::default().data(serde_json::to_string(&chunk).unwrap_or_default())
    }

    fn text_choice(&self, text: &str, logprobs: Option<serde_json::Value>, finish: Option<&str>) -> serde_json::Value {
        match self.kind {
            Kind::Chat => {
                let delta = if finish.is_some() && text.is_empty() { json!({}) } else { json!({"content": text}) };
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
            Kind::Text => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
        }
    }
}

/// A tool-format reply so far: its text, and once it is known to be a
/// plain answer, how much of the text has been streamed as content.
#[derive(Default)]
struct Held {
    text: String,
    streamed: Option<usize>,
}

impl Held {
    /// Takes a piece of the reply; returns answer text ready to stream.
    fn push(&mut self, piece: &str, meta: &Meta) -> String {
        self.text.push_str(piece);
        if self.streamed.is_none() && !meta.structured_answer && self.text.starts_with(crate::structured::ANSWER_PREFIX)
        {
            self.streamed = Some(crate::structured::ANSWER_PREFIX.len());
        }
        let Some(at) = self.streamed else { return String::new() };
        let (out, used, _) = crate::structured::decode_partial(&self.text[at..]);
        self.streamed = Some(at + used);
        out
    }

    /// The chunks that end the reply, its last `piece` included: per call
    /// one chunk with its id and name and one with its arguments (what the
    /// official clients accumulate), or the answer's text not streamed yet;
    /// then the finish.
    fn finish(mut self, piece: &str, meta: &Meta, reason: FinishReason) -> std::collections::VecDeque<SseEvent> {
        let ready = self.push(piece, meta);
        let streamed = self.streamed.is_some();
        let mut out = std::collections::VecDeque::new();
        let delta = |d: serde_json::Value, finish: Option<&str>| {
            meta.chunk(vec![json!({"index": 0, "delta": d, "logprobs": null, "finish_reason": finish})], None)
        };
        let (message, finish) = chat_message(meta, self.text, reason);
        match message.get("tool_calls").and_then(serde_json::Value::as_array) {
            Some(calls) => {
                for (i, c) in calls.iter().enumerate() {
                    let head = json!({"index": i, "id": c["id"], "type": "function",
                        "function": {"name": c["function"]["name"], "arguments": ""}});
                    out.push_back(delta(json!({"tool_calls": [head]}), None));
                    let args = json!({"index": i, "function": {"arguments": c["function"]["arguments"]}});
                    out.push_back(delta(json!({"tool_calls": [args]}), None));
                }
            }
            None if streamed => {
                if !ready.is_empty() {
                    out.push_back(delta(json!({"content": ready}), None));
                }
            }
            None => out.push_back(delta(json!({"content": message["content"]}), None)),
        }
        out.push_back(delta(json!({}), Some(finish)));
        out
    }
}

enum Phase {
    Start(EventStream),
    Running(EventStream, Held),
    /// Chunks still to send, then what follows them.
    Flush(std::collections::VecDeque<SseEvent>, Box<Phase>),
    Usage(Usage),
    Done,
    End,
}

/// The SSE body: see the module doc for the chunk sequence.
fn sse_stream(state: AppState, events: EventStream, meta: Meta) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    stream::unfold(Phase::Start(events), move |phase| {
        let (state, meta) = (state.clone(), meta.clone());
        async move {
            match phase {
                Phase::Start(events) => {
                    let first = match meta.kind {
                        Kind::Chat => {
                            // A tool reply may have no content at all.
                            let content = if meta.tool_reply { json!(null) } else { json!("") };
                            meta.chunk(
                                vec![json!({"index": 0, "delta": {"role": "assistant", "content": content}, "logprobs": null, "finish_reason": null})],
                                None,
                            )
                        }
                        Kind::Text => meta.chunk(vec![meta.text_choice("", None, None)], None),
                    };
                    Some((Ok(first), Phase::Running(events, Held::default())))
                }
                Phase::Running(mut events, mut held) => match events.next().await.inspect(|ev| match ev {
                    Event::Token { .. } => meta.log.token(),
                    Event::Finished { usage, .. } => meta.log.finished(*usage),
                    Event::Prompt { .. } | Event::Error(_) => {}
                }) {
                    // A tool-format reply is held until it is known to be
                    // a plain answer (then its text streams as it comes)
                    // or complete (calls).
                    Some(Event::Token { text, .. }) if meta.tool_reply => {
                        let ready = held.push(&text, &meta);
                        let ev = if ready.is_empty() {
                            SseEvent::default().comment("")
                        } else {
                            meta.chunk(vec![meta.text_choice(&ready, None, None)], None)
                        };
                        Some((Ok(ev), Phase::Running(events, held)))
                    }
                    Some(Event::Token { id, text, logprobs }) => {
                        let lp = logprobs.map(|lp| json!({"content": [token_logprobs(&state, id, &lp)]}));
                        let ev = meta.chunk(vec![meta.text_choice(&text, lp, None)], None);
                        Some((Ok(ev), Phase::Running(events, held)))
                    }
                    Some(Event::Finished { reason, text, usage }) if meta.tool_reply => {
                        let mut chunks = held.finish(&text, &meta, reason);
                        let next = if meta.include_usage { Phase::Usage(usage) } else { Phase::Done };
                        let first = chunks.pop_front().unwrap_or_else(|| SseEvent::default().comment(""));
                        Some((Ok(first), Phase::Flush(chunks, Box::new(next))))
                    }
                    Some(Event::Finished { reason, text, usage }) => {
                        let ev = meta.chunk(vec![meta.text_choice(&text, None, Some(finish_reason(reason)))], None);
                        let next = if meta.include_usage { Phase::Usage(usage) } else { Phase::Done };
                        Some((Ok(ev), next))
                    }
                    Some(Event::Prompt { .. }) => {
                        Some((Ok(SseEvent::default().comment("")), Phase::Running(events, held)))
                    }
                    Some(Event::Error(e)) => {
                        let err = ApiError::from(e);
                        Some((Ok(SseEvent::default().data(err.body_json())), Phase::Done))
                    }
                    None => None,
                },
                Phase::Flush(mut chunks, next) => match chunks.pop_front() {
                    Some(ev) => Some((Ok(ev), Phase::Flush(chunks, next))),
                    None => Some((Ok(SseEvent::default().comment("")), *next)),
                },
                Phase::Usage(usage) => Some((Ok(meta.chunk(Vec::new(), Some(usage.into()))), Phase::Done)),
                Phase::Done => Some((Ok(SseEvent::default().data("[DONE]")), Phase::End)),
                Phase::End => None,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use engine::Message;
    use serde_json::json;

    use super::*;

    #[test]
    fn prompt_of_plans_bodies_as_the_handlers_do() {
        let chat = json!({"model": "m", "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "there"}]}]});
        assert_eq!(
            prompt_of(Endpoint::Chat, &chat).unwrap(),
            Prompt::Chat(vec![Message::new("system", "Be brief."), Message::new("user", "Hello, there")])
        );
        // Tools are rendered into the messages, as the replica renders them.
        let tools = json!({"model": "m", "messages": [{"role": "user", "content": "Weather?"}],
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]});
        let Prompt::Chat(m) = prompt_of(Endpoint::Chat, &tools).unwrap() else { panic!("a chat prompt") };
        assert!(m.iter().any(|m| m.content.contains("get_weather")));
        assert_eq!(prompt_of(Endpoint::Completion, &json!({"prompt": ["once"]})).unwrap(), Prompt::Text("once".into()));
        assert_eq!(prompt_of(Endpoint::Completion, &json!({"prompt": [1, 2]})).unwrap(), Prompt::Tokens(vec![1, 2]));
        // What the handler refuses, this refuses with the same 400.
        assert_eq!(prompt_of(Endpoint::Chat, &json!({"messages": []})).unwrap_err().param, Some("messages"));
        assert_eq!(
            prompt_of(Endpoint::Completion, &json!({"prompt": "x", "suffix": "y"})).unwrap_err().param,
            Some("suffix")
        );
        // A batch is routed by its first prompt.
        let batch = json!({"prompt": [[5, 6], [7]], "echo": true, "logprobs": 1});
        assert_eq!(prompt_of(Endpoint::Completion, &batch).unwrap(), Prompt::Tokens(vec![5, 6]));
        assert_eq!(prompt_of(Endpoint::Chat, &json!({"messages": "hi"})).unwrap_err().status, 400);
    }
}
