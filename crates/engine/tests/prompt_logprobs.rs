//! A prompt's own log-probabilities (`Request::prompt_logprobs`, what
//! `/v1/completions` `echo` with `logprobs` reports): one per prompt token,
//! the first none, computed whole even when the prompt is cached, equal to
//! what the same tokens get when they are generated; `max_tokens` 0 asks
//! for the prompt alone.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{collect, fake_engine};
use engine::{EngineConfig, FinishReason, Prompt, Request, SamplingParams};

fn config() -> EngineConfig {
    EngineConfig {
        default_timeout: Some(Duration::from_secs(30)),
        max_batch_tokens: 8,
        max_running: 4,
        ..EngineConfig::default()
    }
}

fn request(prompt: Vec<u32>, max_tokens: usize, prompt_logprobs: Option<usize>) -> Request {
    let mut r = Request::new(Prompt::Tokens(prompt));
    r.sampling = SamplingParams { logprobs: Some(2), ..SamplingParams::greedy() };
    r.max_tokens = Some(max_tokens);
    r.prompt_logprobs = prompt_logprobs;
    r
}

#[tokio::test]
async fn prompt_logprobs_equal_the_logprobs_of_the_same_tokens_generated() {
    // Chunks of 8 tokens: the prompt's rows come from several steps.
    let (engine, _) = fake_engine(4, 64, config());
    let prompt: Vec<u32> = b"the harbour at dawn".iter().map(|&b| u32::from(b)).collect();
    let generated = collect(engine.generate(request(prompt.clone(), 12, None)).unwrap()).await;
    assert_eq!(generated.error, None);
    assert!(generated.prompt_logprobs.is_none(), "not asked for");

    // The prompt and what was generated, echoed back: the second part's
    // log-probabilities are the generated tokens' own. The prompt is now
    // cached; it is computed whole anyway.
    let mut echoed_prompt = prompt.clone();
    echoed_prompt.extend(&generated.tokens);
    let echoed = collect(engine.generate(request(echoed_prompt.clone(), 0, Some(2))).unwrap()).await;
    assert_eq!(echoed.error, None);
    assert_eq!((echoed.reason, echoed.usage.completion_tokens), (Some(FinishReason::Length), 0), "the prompt only");
    assert_eq!(echoed.usage.cached_tokens, 0, "computed whole");
    let lps = echoed.prompt_logprobs.expect("asked for");
    assert_eq!(lps.len(), echoed_prompt.len());
    assert!(lps[0].is_none() && lps[1..].iter().all(Option::is_some));
    for (g, e) in generated.logprobs.iter().zip(&lps[prompt.len()..]) {
        let (g, e) = (g.as_ref().unwrap(), e.as_ref().unwrap());
        assert_eq!(g.logprob.to_bits(), e.logprob.to_bits(), "bit for bit");
        assert_eq!(g.top, e.top);
    }
}

#[tokio::test]
async fn prompt_logprobs_come_before_the_tokens_and_are_bounded() {
    let (engine, _) = fake_engine(4, 64, config());
    let prompt: Vec<u32> = b"tides".iter().map(|&b| u32::from(b)).collect();
    let o = collect(engine.generate(request(prompt.clone(), 3, Some(0))).unwrap()).await;
    assert_eq!((o.tokens.len(), o.prompt_logprobs.as_ref().map(Vec::len)), (3, Some(prompt.len())));
    assert!(
        o.prompt_logprobs.unwrap()[1..].iter().all(|l| l.as_ref().unwrap().top.is_empty()),
        "no alternatives asked"
    );
    // More than 20 alternatives, and max_tokens 0 without prompt logprobs,
    // are refused.
    assert!(engine.generate(request(prompt.clone(), 1, Some(21))).is_err());
    assert!(engine.generate(request(prompt, 0, None)).is_err());
}
