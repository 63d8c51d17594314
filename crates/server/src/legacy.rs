//! `POST /v1/completions` in the legacy shape evaluation harnesses use:
//! several prompts (strings or token-id lists) answered with one choice
//! each, `echo` (the prompt returned in `text`), and integer `logprobs`
//! (0–20) as `{tokens, token_logprobs, top_logprobs, text_offset}`.
//!
//! # Design
//!
//! Each prompt is its own engine request, all submitted at once (so they
//! batch in the engine's steps) and collected concurrently; the choices
//! come back in prompt order with their `index`. With `echo` and
//! `logprobs`, the engine reports the prompt's own log-probabilities
//! (`Request::prompt_logprobs`): the prompt is then computed whole, not
//! taken from the cache (a prefill's cost; its K/V still joins the cache),
//! and its entries are exactly what the same tokens get when generated
//! (row-independent kernels). The first prompt token has none (`null`).
//! `max_tokens` 0 is allowed with `echo`: the prompt alone.
//!
//! `top_logprobs[i]` maps a token's text to its log-probability for the
//! `logprobs` most likely tokens, plus the chosen one (OpenAI's and vLLM's
//! shape: `logprobs: 0` still names the chosen token); two tokens with
//! the same text keep the likelier. `text_offset[i]` is where token `i`'s
//! text starts in the choice's `text`.
//!
//! Answered whole: `stream` with any of these is a 400 (no harness streams
//! them; a partial legacy object has no agreed shape).

use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use engine::{Event, Logprobs, Prompt, TenantId, Usage};
use serde_json::{json, Map, Value};

use crate::access_log::GenerationLog;
use crate::completions::{finish_reason, header_agent, now_secs, random_id, validate, MIN_LOGPROB};
use crate::error::ApiError;
use crate::openai::{CompletionRequest, UsageBody};
use crate::AppState;

/// One prompt's answer as the engine gave it.
struct Answer {
    prompt_logprobs: Option<Vec<Option<Logprobs>>>,
    tokens: Vec<(u32, Option<Logprobs>)>,
    text: String,
    finish: engine::FinishReason,
    usage: Usage,
}

/// Answers a legacy-shaped completion (see the module doc).
pub(crate) async fn complete(
    state: &AppState,
    req: CompletionRequest,
    prompts: Vec<Prompt>,
    tenant: TenantId,
    (headers, log): (&HeaderMap, GenerationLog),
) -> Result<Response, ApiError> {
    let CompletionRequest { echo, logprobs, mut common, .. } = req;
    if common.stream {
        return Err(ApiError::invalid(
            "stream",
            "echo, logprobs and several prompts are answered whole; send stream: false",
        ));
    }
    let top = logprobs.map(|n| n as usize);
    let zero = common.max_completion_tokens.or(common.max_tokens) == Some(0);
    if zero && !echo {
        return Err(ApiError::invalid("max_tokens", "must be at least 1 (0 only with echo: the prompt alone)"));
    }
    if zero {
        // Checked by hand above: the shared check refuses 0.
        (common.max_tokens, common.max_completion_tokens) = (None, None);
    }
    let grammar = common.guided.grammar()?;
    let agent = header_agent(headers)?;
    let mut valid = Vec::with_capacity(prompts.len());
    let mut echoed = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let text = match &prompt {
            Prompt::Text(t) => Some(t.clone()),
            _ => None,
        };
        let mut r = common.clone().into_request(
            prompt,
            grammar.clone(),
            &state.model_names,
            tenant.clone(),
            agent.clone(),
            state.max_priority,
        )?;
        r.sampling.logprobs = top;
        if echo {
            r.prompt_logprobs = top.or(zero.then_some(0));
        }
        if zero {
            r.max_tokens = Some(0);
        }
        log.agent(r.agent.as_ref());
        let v = validate(state, r).await.map_err(|mut e| {
            if e.param == Some("messages") {
                e.param = Some("prompt");
            }
            e
        })?;
        let codec = state.engine.codec();
        echoed.push(text.unwrap_or_else(|| codec.decode(v.prompt_tokens()).unwrap_or_default()));
        valid.push(v);
    }
    let prompt_ids: Vec<Vec<u32>> = valid.iter().map(|v| v.prompt_tokens().to_vec()).collect();
    let mut streams = Vec::with_capacity(valid.len());
    for v in valid {
        streams.push(state.engine.submit(v)?);
    }
    let answers = futures_util::future::try_join_all(streams.into_iter().map(|s| collect(s, log.clone()))).await?;
    let mut total = Usage::default();
    let mut choices = Vec::with_capacity(answers.len());
    for (index, ((answer, prompt), echo_text)) in answers.into_iter().zip(&prompt_ids).zip(echoed).enumerate() {
        total.prompt_tokens += answer.usage.prompt_tokens;
        total.cached_tokens += answer.usage.cached_tokens;
        total.completion_tokens += answer.usage.completion_tokens;
        let text = if echo { echo_text + &answer.text } else { answer.text.clone() };
        let lp = top.map(|n| legacy_logprobs(state, &answer, echo.then_some(prompt.as_slice()), n));
        choices.push(json!({
            "index": index,
            "text": text,
            "logprobs": lp,
            "finish_reason": finish_reason(answer.finish),
        }));
    }
    log.finished(total);
    let body = json!({
        "id": format!("cmpl-{}", random_id()),
        "object": "text_completion",
        "created": now_secs(),
        "model": &*state.model_name,
        "choices": choices,
        "usage": UsageBody::from(total),
    });
    Ok(Json(body).into_response())
}

/// Reads one prompt's events to the end.
async fn collect(mut events: engine::EventStream, log: GenerationLog) -> Result<Answer, ApiError> {
    events.admitted().await?;
    let mut a = Answer {
        prompt_logprobs: None,
        tokens: Vec::new(),
        text: String::new(),
        finish: engine::FinishReason::Stop,
        usage: Usage::default(),
    };
    loop {
        match events.next().await {
            Some(Event::Prompt { logprobs }) => a.prompt_logprobs = Some(logprobs),
            Some(Event::Token { id, text, logprobs }) => {
                log.token();
                a.tokens.push((id, logprobs));
                a.text.push_str(&text);
            }
            Some(Event::Finished { reason, text, usage }) => {
                a.text.push_str(&text);
                (a.finish, a.usage) = (reason, usage);
                return Ok(a);
            }
            Some(Event::Error(e)) => return Err(e.into()),
            None => return Err(engine::Error::EngineStopped.into()),
        }
    }
}

/// The legacy `logprobs` object of one choice: the prompt's entries first
/// when it is echoed, then the generated tokens'.
fn legacy_logprobs(state: &AppState, a: &Answer, prompt: Option<&[u32]>, n: usize) -> Value {
    let codec = state.engine.codec();
    let text_of = |t: u32| String::from_utf8_lossy(&codec.token_bytes(t).unwrap_or_default()).into_owned();
    let mut entries: Vec<(u32, Option<&Logprobs>)> = Vec::new();
    if let Some(p) = prompt {
        let lps = a.prompt_logprobs.as_deref().unwrap_or_default();
        entries.extend(p.iter().enumerate().map(|(i, &t)| (t, lps.get(i).and_then(Option::as_ref))));
    }
    entries.extend(a.tokens.iter().map(|(t, lp)| (*t, lp.as_ref())));
    let (mut tokens, mut token_logprobs, mut top_logprobs, mut text_offset) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut offset = 0;
    for (t, lp) in entries {
        let text = text_of(t);
        text_offset.push(offset);
        offset += text.len();
        token_logprobs.push(lp.map(|l| l.logprob.max(MIN_LOGPROB)));
        top_logprobs.push(lp.map(|l| {
            let mut top = Map::new();
            for &(id, v) in l.top.iter().take(n) {
                top.entry(text_of(id)).or_insert(json!(v.max(MIN_LOGPROB)));
            }
            top.entry(text.clone()).or_insert(json!(l.logprob.max(MIN_LOGPROB)));
            Value::Object(top)
        }));
        tokens.push(text);
    }
    json!({
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    })
}
