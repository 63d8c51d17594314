//! Shared helpers: engines over the fake model, and collecting a stream.
#![allow(dead_code, unreachable_pub)] // each test binary uses a different subset
#![allow(clippy::unwrap_used)] // helpers of a test binary: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::testing::{FakeCodec, FakeControl, FakeModel};
use engine::{
    EngineConfig, EngineHandle, Error, Event, EventStream, FinishReason, Prompt, Request, SamplingParams, Usage,
};

/// An engine over a fake model of `blocks` blocks of `block_size` tokens.
pub fn fake_engine(block_size: u32, blocks: u32, config: EngineConfig) -> (EngineHandle, Arc<FakeControl>) {
    let (model, control) = FakeModel::new(block_size, blocks);
    let engine = engine::start(Box::new(model), Arc::new(FakeCodec::new()), config).unwrap();
    (engine, control)
}

/// One turn of agent `agent`'s chat: `user` joins `history`, the greedy
/// answer (at most `max_tokens`) is generated without error and joins it too.
pub async fn agent_turn(
    engine: &EngineHandle,
    history: &mut Vec<model::Message>,
    user: &str,
    agent: &str,
    max_tokens: usize,
) -> Outcome {
    history.push(model::Message::new("user", user));
    let mut r = Request::new(Prompt::Chat(history.clone()));
    r.sampling = SamplingParams::greedy();
    r.max_tokens = Some(max_tokens);
    r.agent = Some(engine::AgentId::new(agent).unwrap());
    let o = collect(engine.generate(r).unwrap()).await;
    assert_eq!(o.error, None);
    history.push(model::Message::new("assistant", o.text.clone()));
    o
}

/// A greedy request for `text`, at most `max_tokens`.
pub fn greedy(text: &str, max_tokens: usize) -> Request {
    let mut r = Request::new(Prompt::Text(text.into()));
    r.sampling = SamplingParams::greedy();
    r.max_tokens = Some(max_tokens);
    r
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub text: String,
    pub tokens: Vec<u32>,
    pub reason: Option<FinishReason>,
    pub usage: Usage,
    pub error: Option<Error>,
    /// Each generated token's, when asked for.
    pub logprobs: Vec<Option<engine::Logprobs>>,
    /// The prompt's, when asked for.
    pub prompt_logprobs: Option<Vec<Option<engine::Logprobs>>>,
}

fn absorb(out: &mut Outcome, ev: Event) {
    match ev {
        Event::Token { id, text, logprobs } => {
            out.tokens.push(id);
            out.text.push_str(&text);
            out.logprobs.push(logprobs);
        }
        Event::Prompt { logprobs } => {
            assert!(out.prompt_logprobs.is_none() && out.tokens.is_empty(), "once, before any token");
            out.prompt_logprobs = Some(logprobs);
        }
        Event::Finished { reason, text, usage } => {
            out.text.push_str(&text);
            out.reason = Some(reason);
            out.usage = usage;
        }
        Event::Error(e) => out.error = Some(e),
    }
}

fn empty() -> Outcome {
    Outcome {
        text: String::new(),
        tokens: vec![],
        reason: None,
        usage: Usage::default(),
        error: None,
        logprobs: vec![],
        prompt_logprobs: None,
    }
}

/// Reads a stream to its end from a plain thread.
pub fn collect_blocking(mut s: EventStream) -> Outcome {
    let mut out = empty();
    while let Some(ev) = s.blocking_next() {
        absorb(&mut out, ev);
    }
    out
}

/// Reads a stream to its end from async code.
pub async fn collect(mut s: EventStream) -> Outcome {
    let mut out = empty();
    while let Some(ev) = s.next().await {
        absorb(&mut out, ev);
    }
    out
}

/// Waits (really, with a deadline) until nothing is queued or running.
pub fn wait_idle(engine: &EngineHandle) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = engine.stats();
        if s.waiting == 0 && s.running == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "engine did not go idle: {s:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until the published snapshot satisfies `f`.
pub fn wait_for(engine: &EngineHandle, what: &str, f: impl Fn(&engine::EngineStats) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f(&engine.stats()) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {:?}", engine.stats());
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// After everything ended (and agents are gone), no block is in use.
pub fn assert_pool_full(engine: &EngineHandle) {
    wait_idle(engine);
    // The snapshot is published after each loop iteration; wait for one
    // that reflects the last request's end.
    wait_for(engine, "all blocks back", |s| s.cache.used_blocks == 0 && s.cache.sequences == 0);
}
