//! OpenAI's Responses API: `POST /v1/responses`, `GET` and `DELETE
//! /v1/responses/{id}`, `GET /v1/responses/{id}/input_items`.
//!
//! # A response is an agent's turn
//!
//! A request becomes a chat turn through the same planning as Chat
//! Completions (`structured.rs`: tools, `tool_choice`, formats and the
//! generic tool format): `instructions` is the system message (never
//! carried over by `previous_response_id`, as in OpenAI's API: a client
//! resends it, and an unchanged one keeps the prefix cached), then the
//! items of the chain the request continues, then its own `input` items.
//! Items map to turns: messages by role (`developer` is `system`), each run
//! of `function_call` items to one assistant turn with those calls
//! (arguments verbatim, as generated), each `function_call_output` to a
//! tool turn, which must answer a call earlier in the context.
//!
//! With `store` (the default), the response runs as a turn of an agent: a
//! new chain's agent is named after its first response, and a response
//! that continues one runs on the same agent, so its K/V stays warm in the
//! pool, RAM, disk or the remote tier and survives restarts as agents do;
//! the next turn recomputes only its new tokens. A fork (continuing an
//! older response of the chain) shares the cached blocks up to the fork
//! point by content (copy-on-write), and computes the rest. `store: false`
//! runs without an agent and keeps nothing. A response in a `conversation`
//! (`conversations.rs`) runs on the conversation's agent with its items as
//! the context, and appends its input and output items to it.
//!
//! The stored record (`response_store.rs`) holds the response object,
//! this turn's input items and its output items: enough to rebuild the
//! context of any later turn even if every block of it was evicted
//! (recomputed, never refused).
//!
//! # What is refused
//!
//! Fields this server cannot honour are a 400 naming the field, never
//! ignored: `background: true`, a non-empty `reasoning` (the model has
//! none), `include`, built-in tools (`web_search`, `file_search`, ...),
//! image or file inputs, `conversation` together with
//! `previous_response_id`, `prompt` templates,
//! `top_logprobs`. The same fields sent empty (`reasoning: null`,
//! `background: false`, `include: []`) are accepted, as clients send them.
//! Function tools default to `strict: true`, as in this API.
//! `truncation: "auto"` drops whole oldest items of the context until the
//! prompt fits; `"disabled"` (the default) refuses an over-long one.
//!
//! # Streaming
//!
//! Server-sent events as OpenAI sends them, each with its `event:` name and
//! a `sequence_number`: `response.created`, `response.in_progress`, then
//! per output item `response.output_item.added`, for a message
//! `response.content_part.added`, `response.output_text.delta` per piece,
//! `response.output_text.done`, `response.content_part.done`; for a
//! function call `response.function_call_arguments.delta` and `.done`;
//! `response.output_item.done`; and last `response.completed`,
//! `response.incomplete` (`max_output_tokens` reached) or `error` then
//! `response.failed`. A reply in the tool format is held until it is
//! complete (its calls are known only then), then sent as its items.

use std::collections::HashSet;
use std::convert::Infallible;

use axum::extract::{Path, Query, State};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use engine::tools::{ToolCall, Turn};
use engine::{Event, FinishReason, Prompt, TenantId};
use futures_util::stream::{self, Stream};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::access_log::GenerationLog;
use crate::completions::{now_secs, random_id, validate};
use crate::error::ApiError;
use crate::guard::JsonBody;
use crate::openai::Common;
use crate::response_store::Stored;
use crate::{AppState, Tenant};

/// Most responses a chain is followed back through.
const MAX_CHAIN: usize = 10_000;
/// Most items one request's input may have.
const MAX_ITEMS: usize = 2_048;

/// `POST /v1/responses`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ResponsesRequest {
    model: Option<String>,
    input: Option<Value>,
    instructions: Option<String>,
    previous_response_id: Option<String>,
    conversation: Option<Value>,
    store: Option<bool>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    text: Option<Value>,
    max_output_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    metadata: Option<Map<String, Value>>,
    truncation: Option<String>,
    #[serde(default)]
    stream: bool,
    background: Option<bool>,
    reasoning: Option<Value>,
    include: Option<Vec<Value>>,
    prompt: Option<Value>,
    top_logprobs: Option<u32>,
    /// An extension, as in Chat Completions.
    seed: Option<i64>,
    /// `false` opts out of speculative decoding (same output).
    speculative: Option<bool>,
    /// Everything else: accepted only where harmless (see [`IGNORED`]).
    #[serde(flatten)]
    other: Map<String, Value>,
}

/// Fields clients send that change nothing here.
const IGNORED: &[&str] =
    &["user", "safety_identifier", "prompt_cache_key", "service_tier", "stream_options", "max_tool_calls"];

fn invalid(param: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message)
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", random_id())
}

/// A value a client sends to mean "not asked": null, false, {} or [], or an
/// object of only nulls.
fn empty(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Object(m) => m.values().all(Value::is_null),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

impl ResponsesRequest {
    /// The fields this server cannot honour (module doc).
    fn refuse_unsupported(&self) -> Result<(), ApiError> {
        if self.background == Some(true) {
            return Err(invalid("background", "background responses are not supported"));
        }
        if self.reasoning.as_ref().is_some_and(|r| !empty(r)) {
            return Err(invalid("reasoning", "this model does not reason; send reasoning: null or leave it out"));
        }
        if self.include.as_ref().is_some_and(|i| !i.is_empty()) {
            return Err(invalid("include", "no additional output data can be included"));
        }
        if self.conversation.as_ref().is_some_and(|c| !c.is_null()) && self.previous_response_id.is_some() {
            return Err(invalid("conversation", "give either conversation or previous_response_id, not both"));
        }
        if self.prompt.as_ref().is_some_and(|p| !p.is_null()) {
            return Err(invalid("prompt", "prompt templates are not supported"));
        }
        if self.top_logprobs.is_some_and(|n| n > 0) {
            return Err(invalid("top_logprobs", "log-probabilities are not supported on this endpoint"));
        }
        if let Some(name) = self.other.keys().find(|k| !IGNORED.contains(&k.as_str())) {
            let name: String = name.chars().take(64).collect();
            return Err(ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("unknown parameter {name:?}"),
            ));
        }
        match self.truncation.as_deref() {
            None | Some("disabled" | "auto") => Ok(()),
            Some(_) => Err(invalid("truncation", "must be \"auto\" or \"disabled\"")),
        }
    }
}

/// `input`, as items with ids (module doc): a string is one user message.
pub(crate) fn input_items(input: Option<Value>) -> Result<Vec<Value>, ApiError> {
    let items = match input {
        None | Some(Value::Null) => return Err(invalid("input", "input is required")),
        Some(Value::String(text)) => {
            vec![json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]})]
        }
        Some(Value::Array(items)) => items,
        Some(_) => return Err(invalid("input", "input must be a string or a list of items")),
    };
    if items.is_empty() {
        return Err(invalid("input", "input must not be empty"));
    }
    if items.len() > MAX_ITEMS {
        return Err(invalid("input", format!("at most {MAX_ITEMS} items")));
    }
    items.into_iter().map(normalize).collect()
}

fn text_field(item: &Map<String, Value>, name: &str, what: &str) -> Result<String, ApiError> {
    match item.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(invalid("input", format!("a {what} item needs a string {name:?}"))),
    }
}

/// One input item checked and put in the shape it is stored and listed in.
pub(crate) fn normalize(item: Value) -> Result<Value, ApiError> {
    let Value::Object(item) = item else { return Err(invalid("input", "each input item must be an object")) };
    let kind = match item.get("type") {
        None if item.contains_key("role") => "message",
        Some(Value::String(k)) => k.as_str(),
        _ => return Err(invalid("input", "each input item needs a \"type\"")),
    };
    match kind {
        "message" => {
            let role = item.get("role").and_then(Value::as_str).unwrap_or("");
            if !matches!(role, "user" | "system" | "developer" | "assistant") {
                return Err(invalid(
                    "input",
                    format!("unknown message role {:?}", role.chars().take(32).collect::<String>()),
                ));
            }
            let text = match item.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                            (Some("input_text" | "output_text" | "text"), Some(t)) => text.push_str(t),
                            (Some(k), _) => {
                                let k: String = k.chars().take(32).collect();
                                return Err(invalid(
                                    "input",
                                    format!("content part {k:?} is not supported (text only)"),
                                ));
                            }
                            (None, _) => return Err(invalid("input", "each content part needs a \"type\"")),
                        }
                    }
                    text
                }
                _ => return Err(invalid("input", "a message item needs content: a string or a list of parts")),
            };
            let part = if role == "assistant" { "output_text" } else { "input_text" };
            let mut content = json!({"type": part, "text": text});
            if role == "assistant" {
                content["annotations"] = json!([]);
            }
            Ok(
                json!({"id": new_id("msg"), "type": "message", "role": role, "status": "completed", "content": [content]}),
            )
        }
        "function_call" => {
            let name = text_field(&item, "name", "function_call")?;
            if !engine::tools::valid_name(&name) {
                return Err(invalid("input", "a function_call's name is not a valid function name"));
            }
            Ok(json!({
                "id": item.get("id").and_then(Value::as_str).map_or_else(|| new_id("fc"), str::to_owned),
                "type": "function_call",
                "call_id": text_field(&item, "call_id", "function_call")?,
                "name": name,
                "arguments": text_field(&item, "arguments", "function_call")?,
                "status": "completed",
            }))
        }
        "function_call_output" => {
            let output = match item.get("output") {
                Some(Value::String(s)) => s.clone(),
                Some(v @ (Value::Array(_) | Value::Object(_))) => v.to_string(),
                _ => return Err(invalid("input", "a function_call_output item needs an \"output\"")),
            };
            Ok(json!({
                "id": new_id("fco"),
                "type": "function_call_output",
                "call_id": text_field(&item, "call_id", "function_call_output")?,
                "output": output,
                "status": "completed",
            }))
        }
        other => {
            let other: String = other.chars().take(32).collect();
            Err(invalid("input", format!("input items of type {other:?} are not supported")))
        }
    }
}

/// The turns of `items` (module doc), after `instructions`.
fn turns(instructions: Option<&str>, items: &[Value]) -> Result<Vec<Turn>, ApiError> {
    let mut turns = Vec::new();
    if let Some(i) = instructions.filter(|i| !i.is_empty()) {
        turns.push(Turn { role: "system".into(), content: i.into(), tool_calls: Vec::new(), tool_call_id: None });
    }
    let mut calls: HashSet<&str> = HashSet::new();
    for item in items {
        let s = |k: &str| item.get(k).and_then(Value::as_str).unwrap_or_default();
        match s("type") {
            "message" => {
                let text: String = item["content"]
                    .as_array()
                    .map(|parts| parts.iter().filter_map(|p| p["text"].as_str()).collect())
                    .unwrap_or_default();
                let role = if s("role") == "developer" { "system" } else { s("role") };
                turns.push(Turn { role: role.into(), content: text, tool_calls: Vec::new(), tool_call_id: None });
            }
            "function_call" => {
                calls.insert(s("call_id"));
                let call =
                    ToolCall { id: s("call_id").into(), name: s("name").into(), arguments: s("arguments").into() };
                match turns.last_mut() {
                    Some(t) if t.role == "assistant" && !t.tool_calls.is_empty() => t.tool_calls.push(call),
                    _ => turns.push(Turn {
                        role: "assistant".into(),
                        content: String::new(),
                        tool_calls: vec![call],
                        tool_call_id: None,
                    }),
                }
            }
            "function_call_output" => {
                if !calls.contains(s("call_id")) {
                    let id: String = s("call_id").chars().take(64).collect();
                    return Err(invalid(
                        "input",
                        format!("function_call_output {id:?} answers no function_call before it"),
                    ));
                }
                turns.push(Turn {
                    role: "tool".into(),
                    content: s("output").into(),
                    tool_calls: Vec::new(),
                    tool_call_id: Some(s("call_id").into()),
                });
            }
            _ => {}
        }
    }
    Ok(turns)
}

/// `tools` in the Responses shape, as Chat Completions' (function tools
/// only; `strict` defaults to true here).
fn chat_tools(tools: &[Value]) -> Result<(Vec<Value>, Vec<Value>), ApiError> {
    let (mut chat, mut echo) = (Vec::new(), Vec::new());
    for t in tools {
        match t.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some(other) => {
                let other: String = other.chars().take(32).collect();
                return Err(invalid(
                    "tools",
                    format!("tools of type {other:?} are not supported (function tools only)"),
                ));
            }
            None => return Err(invalid("tools", "each tool needs a \"type\"")),
        }
        let name = t.get("name").cloned().ok_or_else(|| invalid("tools", "a function tool needs a \"name\""))?;
        let strict = match t.get("strict") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(invalid("tools", "strict must be a boolean")),
        };
        let parameters = t.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        let description = t.get("description").cloned().unwrap_or(Value::Null);
        let mut function = json!({"name": name, "parameters": parameters, "strict": strict});
        if !description.is_null() {
            function["description"] = description.clone();
        }
        chat.push(json!({"type": "function", "function": function}));
        echo.push(json!({"type": "function", "name": name, "description": description, "parameters": parameters, "strict": strict}));
    }
    Ok((chat, echo))
}

/// `tool_choice` in Chat Completions' shape.
fn chat_tool_choice(choice: &Value) -> Result<Value, ApiError> {
    match choice {
        Value::String(_) => Ok(choice.clone()),
        Value::Object(m) if m.get("type").and_then(Value::as_str) == Some("function") => {
            let name =
                m.get("name").cloned().ok_or_else(|| invalid("tool_choice", "a function choice needs a \"name\""))?;
            Ok(json!({"type": "function", "function": {"name": name}}))
        }
        _ => Err(invalid(
            "tool_choice",
            "must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"name\"}",
        )),
    }
}

/// `text.format` as Chat Completions' `response_format`.
fn chat_format(text: Option<&Value>) -> Result<Option<Value>, ApiError> {
    let Some(format) = text.and_then(|t| t.get("format")).filter(|f| !f.is_null()) else { return Ok(None) };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let schema =
                format.get("schema").cloned().ok_or_else(|| invalid("text", "json_schema needs a \"schema\""))?;
            let spec = json!({"name": format.get("name"), "schema": schema, "strict": format.get("strict").cloned().unwrap_or(Value::Null)});
            Ok(Some(json!({"type": "json_schema", "json_schema": spec})))
        }
        _ => Err(invalid("text", "text.format.type must be \"text\", \"json_object\" or \"json_schema\"")),
    }
}

/// `conversation`: an id, or `{"id": ...}`.
fn conversation_id(v: Option<&Value>) -> Result<Option<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(id)) => Ok(Some(id.clone())),
        Some(Value::Object(m)) => match m.get("id") {
            Some(Value::String(id)) => Ok(Some(id.clone())),
            _ => Err(invalid("conversation", "must be a conversation id or {\"id\": ...}")),
        },
        Some(_) => Err(invalid("conversation", "must be a conversation id or {\"id\": ...}")),
    }
}

/// The items of the chain ending at `id` (oldest first), and its agent.
async fn chain(state: &AppState, tenant: &TenantId, id: &str) -> Result<(Vec<Value>, Option<String>), ApiError> {
    let store = state.responses.as_ref().ok_or_else(|| invalid("previous_response_id", "responses are not stored"))?;
    let mut records = Vec::new();
    let mut next = Some(id.to_owned());
    while let Some(id) = next {
        if records.len() == MAX_CHAIN {
            return Err(invalid("previous_response_id", "the chain is too long"));
        }
        let Some(r) = store.get::<Stored>(tenant.as_str(), &id).await? else {
            let id: String = id.chars().take(64).collect();
            let mut e = ApiError::not_found(format!("no response {id:?}"));
            e.param = Some("previous_response_id");
            return Err(e);
        };
        next = r.previous_response_id.clone();
        records.push(r);
    }
    let agent = records.first().and_then(|r| r.agent.clone());
    let items = records.into_iter().rev().flat_map(|r| r.input.into_iter().chain(r.output)).collect();
    Ok((items, agent))
}

/// What a response is about, for its object and its events.
#[derive(Clone)]
struct Meta {
    id: String,
    created_at: u64,
    model: String,
    instructions: Option<String>,
    previous_response_id: Option<String>,
    store: bool,
    agent: Option<String>,
    /// The conversation its items are appended to.
    conversation: Option<String>,
    tenant: TenantId,
    /// The request's own fields, echoed in the response object.
    echo: Map<String, Value>,
    input: Vec<Value>,
    tool_reply: bool,
    structured_answer: bool,
    log: GenerationLog,
}

impl Meta {
    fn object(
        &self,
        status: &str,
        output: &[Value],
        usage: Option<&engine::Usage>,
        extra: Option<(&str, Value)>,
    ) -> Value {
        let mut o = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": null,
            "incomplete_details": null,
            "instructions": self.instructions,
            "model": self.model,
            "output": output,
            "previous_response_id": self.previous_response_id,
            "store": self.store,
            "reasoning": {"effort": null, "summary": null},
            "usage": usage.map(|u| json!({
                "input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": u.cached_tokens},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u.prompt_tokens + u.completion_tokens,
            })),
        });
        for (k, v) in &self.echo {
            o[k] = v.clone();
        }
        if let Some((k, v)) = extra {
            o[k] = v;
        }
        o
    }

    /// The output items of a finished reply.
    fn output(&self, text: String, reason: FinishReason) -> Vec<Value> {
        let message = |text: String| {
            json!({"id": new_id("msg"), "type": "message", "role": "assistant", "status": "completed",
                   "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
        };
        if self.tool_reply && reason == FinishReason::Stop {
            match crate::structured::read_reply(&text, self.structured_answer) {
                Some(crate::structured::ToolReply::Calls(calls)) => {
                    return calls
                        .into_iter()
                        .map(|c| {
                            json!({"id": new_id("fc"), "type": "function_call", "call_id": c.id, "name": c.name,
                                   "arguments": c.arguments, "status": "completed"})
                        })
                        .collect();
                }
                Some(crate::structured::ToolReply::Answer(a)) => return vec![message(a)],
                None => {}
            }
        }
        if self.tool_reply && !self.structured_answer {
            if let Some(body) = text.strip_prefix(crate::structured::ANSWER_PREFIX) {
                return vec![message(crate::structured::decode_partial(body).0)];
            }
        }
        vec![message(text)]
    }

    /// The final object, stored if asked.
    async fn finish(
        &self,
        state: &AppState,
        output: &[Value],
        reason: FinishReason,
        usage: &engine::Usage,
    ) -> Result<Value, ApiError> {
        let (status, extra) = match reason {
            FinishReason::Stop => ("completed", None),
            FinishReason::Length => {
                ("incomplete", Some(("incomplete_details", json!({"reason": "max_output_tokens"}))))
            }
            FinishReason::Cancelled => ("incomplete", Some(("incomplete_details", json!({"reason": "cancelled"})))),
        };
        let object = self.object(status, output, Some(usage), extra);
        if let Some(conv) = &self.conversation {
            let items = self.input.iter().chain(output).cloned().collect();
            crate::conversations::append(state, &self.tenant, conv, items).await?;
        }
        if let (true, Some(store)) = (self.store, &state.responses) {
            store
                .put(&Stored {
                    id: self.id.clone(),
                    tenant: self.tenant.as_str().to_owned(),
                    created_at: self.created_at,
                    agent: self.agent.clone(),
                    previous_response_id: self.previous_response_id.clone(),
                    input: self.input.clone(),
                    output: output.to_vec(),
                    response: object.clone(),
                })
                .await?;
        }
        Ok(object)
    }
}

/// `POST /v1/responses` (module doc).
pub(crate) async fn create(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Extension(log): Extension<GenerationLog>,
    JsonBody(req): JsonBody<ResponsesRequest>,
) -> Result<Response, ApiError> {
    req.refuse_unsupported()?;
    let store = req.store.unwrap_or(true);
    let input = input_items(req.input.clone())?;
    let conversation = conversation_id(req.conversation.as_ref())?;
    let (mut context, agent) = match (&req.previous_response_id, &conversation) {
        (Some(prev), _) => chain(&state, &tenant, prev).await?,
        (None, Some(conv)) => {
            let c = crate::conversations::load(&state, &tenant, conv, "conversation").await?;
            (c.items, Some(c.id))
        }
        (None, None) => (Vec::new(), None),
    };
    let id = new_id("resp");
    // A conversation is an agent whatever `store` says: its items are kept.
    let agent = match (store || conversation.is_some(), agent) {
        (false, _) => None,
        (true, Some(a)) => Some(a),
        (true, None) => Some(id.clone()),
    };
    let (tools, echo_tools) = chat_tools(req.tools.as_deref().unwrap_or_default())?;
    let tool_choice = req.tool_choice.as_ref().map(chat_tool_choice).transpose()?;
    let response_format = chat_format(req.text.as_ref())?;
    if req.max_output_tokens == Some(0) {
        return Err(invalid("max_output_tokens", "must be at least 1"));
    }
    let truncate = req.truncation.as_deref() == Some("auto");
    let mut echo = Map::new();
    echo.insert("tools".into(), Value::Array(echo_tools));
    echo.insert("tool_choice".into(), req.tool_choice.clone().unwrap_or_else(|| json!("auto")));
    echo.insert("parallel_tool_calls".into(), json!(req.parallel_tool_calls.unwrap_or(true)));
    echo.insert("text".into(), req.text.clone().unwrap_or_else(|| json!({"format": {"type": "text"}})));
    echo.insert("temperature".into(), json!(req.temperature.unwrap_or(1.0)));
    echo.insert("top_p".into(), json!(req.top_p.unwrap_or(1.0)));
    echo.insert("max_output_tokens".into(), json!(req.max_output_tokens));
    echo.insert("truncation".into(), json!(req.truncation.as_deref().unwrap_or("disabled")));
    echo.insert("metadata".into(), Value::Object(req.metadata.clone().unwrap_or_default()));
    echo.insert("user".into(), req.other.get("user").cloned().unwrap_or(Value::Null));
    echo.insert("conversation".into(), conversation.as_ref().map_or(Value::Null, |c| json!({"id": c})));
    // Plans the prompt, dropping the oldest context items while it does not
    // fit and truncation allows.
    let (events, plan) = loop {
        let mut items = context.clone();
        items.extend(input.iter().cloned());
        let plan = crate::structured::plan(
            turns(req.instructions.as_deref(), &items)?,
            crate::structured::Asked {
                tools: Some(&tools).filter(|t| !t.is_empty()),
                tool_choice: tool_choice.as_ref(),
                parallel_tool_calls: req.parallel_tool_calls,
                response_format: response_format.as_ref(),
                guided: None,
            },
        )?;
        let common = Common {
            model: req.model.clone(),
            max_tokens: req.max_output_tokens,
            temperature: req.temperature,
            top_p: req.top_p,
            seed: req.seed,
            speculative: req.speculative,
            agent_id: agent.clone(),
            ..Common::default()
        };
        let request = common
            .into_request(
                Prompt::Chat(plan.messages.clone()),
                plan.grammar.clone(),
                &state.model_names,
                tenant.clone(),
                None,
                state.max_priority,
            )
            .map_err(for_responses)?;
        match validate(&state, request).await.map_err(for_responses) {
            Ok(valid) => break (valid, plan),
            Err(e) if truncate && !context.is_empty() && e.code == Some("context_length_exceeded") => {
                context.remove(0);
            }
            Err(e) => return Err(e),
        }
    };
    log.agent(agent.as_deref().and_then(|a| engine::AgentId::new(a).ok()).as_ref());
    let mut events = state.engine.submit(events)?;
    events.admitted().await?;
    let meta = Meta {
        id,
        created_at: now_secs(),
        model: state.model_name.to_string(),
        instructions: req.instructions.clone(),
        previous_response_id: req.previous_response_id.clone(),
        store,
        agent,
        conversation,
        tenant,
        echo,
        input,
        tool_reply: plan.tool_reply,
        structured_answer: plan.structured_answer,
        log,
    };
    if req.stream {
        return Ok(Sse::new(sse(state, events, meta)).into_response());
    }
    let mut text = String::new();
    let (reason, usage) = loop {
        match events.next().await {
            Some(Event::Token { text: t, .. }) => {
                meta.log.token();
                text.push_str(&t);
            }
            Some(Event::Finished { reason, text: t, usage }) => {
                meta.log.finished(usage);
                text.push_str(&t);
                break (reason, usage);
            }
            Some(Event::Prompt { .. }) => {}
            Some(Event::Error(e)) => return Err(e.into()),
            None => return Err(engine::Error::EngineStopped.into()),
        }
    };
    let output = meta.output(text, reason);
    Ok(Json(meta.finish(&state, &output, reason, &usage).await?).into_response())
}

/// The stream's events, made by one task per response and sent through a
/// channel: dropping the body (the client went away) ends the task, which
/// drops the engine stream and so cancels the request.
fn sse(
    state: AppState,
    mut events: engine::EventStream,
    meta: Meta,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(64);
    tokio::spawn(async move {
        let mut seq = 0u64;
        let send = |kind: &'static str, mut body: Value, seq: &mut u64| {
            body["type"] = json!(kind);
            body["sequence_number"] = json!(*seq);
            *seq += 1;
            let ev = SseEvent::default().event(kind).data(body.to_string());
            let tx = tx.clone();
            async move { tx.send(ev).await.is_ok() }
        };
        if !send("response.created", json!({"response": meta.object("in_progress", &[], None, None)}), &mut seq).await
            || !send("response.in_progress", json!({"response": meta.object("in_progress", &[], None, None)}), &mut seq)
                .await
        {
            return;
        }
        // A plain reply streams as one message; a tool-format reply is held.
        let item_id = new_id("msg");
        let mut opened = false;
        let mut text = String::new();
        let finished = loop {
            match events.next().await {
                Some(Event::Token { text: t, .. }) => {
                    meta.log.token();
                    text.push_str(&t);
                    if meta.tool_reply || t.is_empty() {
                        continue;
                    }
                    if !opened {
                        opened = true;
                        let item = json!({"id": item_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []});
                        let part = json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []});
                        if !send("response.output_item.added", json!({"output_index": 0, "item": item}), &mut seq).await
                            || !send(
                                "response.content_part.added",
                                json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": part}),
                                &mut seq,
                            )
                            .await
                        {
                            return;
                        }
                    }
                    let delta =
                        json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": t, "logprobs": []});
                    if !send("response.output_text.delta", delta, &mut seq).await {
                        return;
                    }
                }
                Some(Event::Finished { reason, text: t, usage }) => {
                    meta.log.finished(usage);
                    text.push_str(&t);
                    break Ok((reason, usage, t));
                }
                Some(Event::Prompt { .. }) => {}
                Some(Event::Error(e)) => break Err(ApiError::from(e)),
                None => break Err(ApiError::from(engine::Error::EngineStopped)),
            }
        };
        let (reason, usage, tail) = match finished {
            Ok(f) => f,
            Err(e) => {
                let body = json!({"code": e.code, "message": e.message, "param": e.param});
                if send("error", body, &mut seq).await {
                    let failed = meta.object(
                        "failed",
                        &[],
                        None,
                        Some(("error", json!({"code": "server_error", "message": e.message}))),
                    );
                    send("response.failed", json!({"response": failed}), &mut seq).await;
                }
                return;
            }
        };
        let mut output = meta.output(text, reason);
        if !meta.tool_reply {
            // The streamed message keeps the id its events named.
            if let Some(first) = output.first_mut() {
                first["id"] = json!(item_id);
            }
        }
        for (index, item) in output.iter().enumerate() {
            let streamed = index == 0 && opened;
            let ok = match item["type"].as_str() {
                Some("message") => {
                    let full = item["content"][0]["text"].as_str().unwrap_or_default().to_owned();
                    let id = item["id"].clone();
                    let part = item["content"][0].clone();
                    let mut ok = true;
                    if !streamed {
                        let added = json!({"id": id, "type": "message", "role": "assistant", "status": "in_progress", "content": []});
                        let empty = json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []});
                        ok = send("response.output_item.added", json!({"output_index": index, "item": added}), &mut seq).await
                            && send("response.content_part.added", json!({"item_id": id, "output_index": index, "content_index": 0, "part": empty}), &mut seq).await
                            && (full.is_empty()
                                || send("response.output_text.delta", json!({"item_id": id, "output_index": index, "content_index": 0, "delta": full, "logprobs": []}), &mut seq).await);
                    } else if !tail.is_empty() {
                        ok = send("response.output_text.delta", json!({"item_id": id, "output_index": index, "content_index": 0, "delta": tail, "logprobs": []}), &mut seq).await;
                    }
                    ok && send(
                        "response.output_text.done",
                        json!({"item_id": id, "output_index": index, "content_index": 0, "text": full, "logprobs": []}),
                        &mut seq,
                    )
                    .await
                        && send(
                            "response.content_part.done",
                            json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
                            &mut seq,
                        )
                        .await
                }
                _ => {
                    let mut added = item.clone();
                    added["status"] = json!("in_progress");
                    added["arguments"] = json!("");
                    let id = item["id"].clone();
                    send("response.output_item.added", json!({"output_index": index, "item": added}), &mut seq).await
                        && send("response.function_call_arguments.delta", json!({"item_id": id, "output_index": index, "delta": item["arguments"]}), &mut seq).await
                        && send("response.function_call_arguments.done", json!({"item_id": id, "output_index": index, "arguments": item["arguments"], "name": item["name"]}), &mut seq).await
                }
            };
            if !ok || !send("response.output_item.done", json!({"output_index": index, "item": item}), &mut seq).await {
                return;
            }
        }
        match meta.finish(&state, &output, reason, &usage).await {
            Ok(object) => {
                let kind = if object["status"] == "completed" { "response.completed" } else { "response.incomplete" };
                send(kind, json!({"response": object}), &mut seq).await;
            }
            Err(e) => {
                if send("error", json!({"code": e.code, "message": e.message, "param": e.param}), &mut seq).await {
                    let failed = meta.object(
                        "failed",
                        &output,
                        Some(&usage),
                        Some(("error", json!({"code": "server_error", "message": e.message}))),
                    );
                    send("response.failed", json!({"response": failed}), &mut seq).await;
                }
            }
        }
    });
    stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|ev| (Ok(ev), rx)) })
}

/// An error about the prompt or its length, in this API's field names.
fn for_responses(mut e: ApiError) -> ApiError {
    e.param = match e.param {
        Some("messages") => Some("input"),
        Some("max_tokens") => Some("max_output_tokens"),
        other => other,
    };
    e
}

pub(crate) fn page(items: &[Value], q: &ListQuery) -> Result<Value, ApiError> {
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(invalid("limit", "must be between 1 and 100"));
    }
    let mut items = items.to_vec();
    match q.order.as_deref() {
        None | Some("desc") => items.reverse(),
        Some("asc") => {}
        Some(_) => return Err(invalid("order", "must be \"asc\" or \"desc\"")),
    }
    let position = |cursor: &str, param: &'static str| {
        items.iter().position(|i| i["id"] == cursor).ok_or_else(|| invalid(param, "no such item"))
    };
    let start = match &q.after {
        Some(a) => position(a, "after")? + 1,
        None => 0,
    };
    let end = match &q.before {
        Some(b) => position(b, "before")?,
        None => items.len(),
    };
    let window: Vec<Value> = items.get(start..end.max(start)).unwrap_or_default().iter().take(limit).cloned().collect();
    let has_more = end.max(start) - start > window.len();
    Ok(json!({
        "object": "list",
        "data": window,
        "first_id": window.first().map(|i| i["id"].clone()),
        "last_id": window.last().map(|i| i["id"].clone()),
        "has_more": has_more,
    }))
}

fn stored_or_404(found: Option<Stored>, id: &str) -> Result<Stored, ApiError> {
    found.ok_or_else(|| {
        let id: String = id.chars().take(64).collect();
        ApiError::not_found(format!("no response {id:?}"))
    })
}

pub(crate) fn store(state: &AppState) -> Result<&crate::response_store::ResponseStore, ApiError> {
    state.responses.as_ref().ok_or_else(|| ApiError::not_found("responses are not stored on this server"))
}

/// `GET /v1/responses/{id}`.
pub(crate) async fn get(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let found = store(&state)?.get::<Stored>(tenant.as_str(), &id).await?;
    Ok(Json(stored_or_404(found, &id)?.response))
}

/// `DELETE /v1/responses/{id}`: the record is gone, durably, before the
/// answer.
pub(crate) async fn delete(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !store(&state)?.delete(tenant.as_str(), &id).await? {
        return Err(stored_or_404(None, &id).err().unwrap_or_else(ApiError::internal));
    }
    Ok(Json(json!({"id": id, "object": "response.deleted", "deleted": true})))
}

/// A list's page: `limit` (1 to 100, default 20), `order` (`desc`, the
/// default, or `asc`), `after` or `before` an item id.
#[derive(Debug, Deserialize)]
pub(crate) struct ListQuery {
    limit: Option<usize>,
    order: Option<String>,
    after: Option<String>,
    before: Option<String>,
}

/// `GET /v1/responses/{id}/input_items`: the response's input items, a
/// page at a time ([`ListQuery`]).
pub(crate) async fn input_items_list(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let items = stored_or_404(store(&state)?.get::<Stored>(tenant.as_str(), &id).await?, &id)?.input;
    Ok(Json(page(&items, &q)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_become_turns_with_calls_grouped_and_outputs_checked() {
        let items = input_items(Some(json!([
            {"role": "developer", "content": "Be brief."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in "}, {"type": "input_text", "text": "Paris?"}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
            {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        ])))
        .unwrap();
        assert!(items.iter().all(|i| i["id"].is_string()));
        let t = turns(Some("You help."), &items).unwrap();
        let roles: Vec<&str> = t.iter().map(|t| t.role.as_str()).collect();
        assert_eq!(roles, ["system", "system", "user", "assistant", "tool"]);
        assert_eq!(t[2].content, "Weather in Paris?");
        assert_eq!(t[3].tool_calls.len(), 2, "consecutive calls are one assistant turn");
        assert_eq!(t[3].tool_calls[0].arguments, "{\"city\":\"Paris\"}", "arguments verbatim");
        assert_eq!(t[4].tool_call_id.as_deref(), Some("call_1"));
        // An output must answer a call before it.
        let orphan =
            input_items(Some(json!([{"type": "function_call_output", "call_id": "nope", "output": "x"}]))).unwrap();
        assert_eq!(turns(None, &orphan).unwrap_err().param, Some("input"));
    }

    #[test]
    fn unsupported_items_and_fields_are_400s_naming_them() {
        assert_eq!(conversation_id(Some(&json!({"id": "conv_1"}))).unwrap().as_deref(), Some("conv_1"));
        assert_eq!(conversation_id(Some(&json!(7))).unwrap_err().param, Some("conversation"));
        for bad in [
            json!([{"type": "input_image", "image_url": "x"}]),
            json!([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]),
            json!([{"type": "reasoning", "summary": []}]),
            json!([{"role": "wizard", "content": "x"}]),
            json!([{"type": "function_call", "name": "f"}]),
            json!([]),
            json!(42),
        ] {
            assert_eq!(input_items(Some(bad.clone())).unwrap_err().param, Some("input"), "{bad}");
        }
        let req = |v: Value| serde_json::from_value::<ResponsesRequest>(v).unwrap();
        for (body, param) in [
            (json!({"background": true}), "background"),
            (json!({"reasoning": {"effort": "high"}}), "reasoning"),
            (json!({"include": ["file_search_call.results"]}), "include"),
            (json!({"conversation": "conv_1", "previous_response_id": "resp_1"}), "conversation"),
            (json!({"truncation": "middle"}), "truncation"),
        ] {
            assert_eq!(req(body.clone()).refuse_unsupported().unwrap_err().param, Some(param), "{body}");
        }
        for fine in [
            json!({"background": false, "reasoning": null, "include": [], "user": "u", "service_tier": "auto"}),
            json!({"reasoning": {"effort": null, "summary": null}, "truncation": "auto"}),
        ] {
            assert!(req(fine.clone()).refuse_unsupported().is_ok(), "{fine}");
        }
        let unknown = req(json!({"frobnicate": 1})).refuse_unsupported().unwrap_err();
        assert!(unknown.message.contains("frobnicate"), "{}", unknown.message);
        assert_eq!(chat_tools(&[json!({"type": "web_search"})]).unwrap_err().param, Some("tools"));
    }

    #[test]
    fn function_tools_default_to_strict_and_formats_map_to_chat() {
        let (chat, echo) =
            chat_tools(&[json!({"type": "function", "name": "f", "parameters": {"type": "object"}})]).unwrap();
        assert_eq!(chat[0]["function"]["strict"], true);
        assert_eq!(echo[0]["strict"], true);
        let (chat, _) = chat_tools(&[json!({"type": "function", "name": "f", "strict": false})]).unwrap();
        assert_eq!(chat[0]["function"]["strict"], false);
        assert_eq!(chat_tool_choice(&json!({"type": "function", "name": "f"})).unwrap()["function"]["name"], "f");
        let f = chat_format(Some(
            &json!({"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": true}}),
        ))
        .unwrap()
        .unwrap();
        assert_eq!(f["json_schema"]["strict"], true);
        assert_eq!(chat_format(Some(&json!({"format": {"type": "text"}}))).unwrap(), None);
    }
}
