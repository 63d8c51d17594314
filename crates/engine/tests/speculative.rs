//! Speculative decoding (`speculative.rs`) changes how many tokens a step
//! yields, never which: greedy and seeded output with drafting on is token
//! for token the output with it off, on the strict fake model (whose every token
//! depends on the K/V of the whole history, so a rejected draft's K/V left
//! behind would change it) and on the default model (whose rows are
//! batch-invariant).

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{collect, fake_engine, greedy, Outcome};
use engine::{EngineConfig, EngineHandle, FinishReason, Prompt, Request, SamplingParams, Speculation};
use kv::KvDType;
use model::quant::Isa;
use model::{MatmulPath, PagedLlama};

fn config(speculative: Speculation) -> EngineConfig {
    EngineConfig { speculative, default_timeout: Some(Duration::from_secs(300)), ..EngineConfig::default() }
}

/// Runs `reqs` together and returns their outcomes in order.
async fn together(engine: &EngineHandle, reqs: Vec<Request>) -> Vec<Outcome> {
    let streams: Vec<_> = reqs.into_iter().map(|r| engine.generate(r).unwrap()).collect();
    let mut out = Vec::new();
    for s in streams {
        out.push(collect(s).await);
    }
    out
}

/// Prompts whose text repeats, so prompt lookup has something to propose.
fn repetitive(i: usize) -> String {
    format!("{i} alpha beta gamma delta {i} alpha beta gamma delta {i} alpha beta gamma")
}

/// A seeded request at temperature `t`.
fn seeded(mut r: Request, t: f32, seed: u64) -> Request {
    r.sampling = SamplingParams { temperature: t, seed: Some(seed), ..SamplingParams::default() };
    r
}

#[tokio::test]
async fn drafts_rolled_back_on_the_fake_model_leave_the_output_unchanged() {
    // Greedy, then seeded at a temperature; at most 4 at once (more do not
    // draft).
    let greedy_reqs = || (0..4).map(|i| greedy(&repetitive(i), 40)).collect::<Vec<_>>();
    let seeded_reqs = || (0..2).map(|i| seeded(greedy(&repetitive(i), 40), 0.7, 11 + i as u64)).collect::<Vec<_>>();
    let (plain, _) = fake_engine(16, 256, config(Speculation::Off));
    let mut want = together(&plain, greedy_reqs()).await;
    want.extend(together(&plain, seeded_reqs()).await);
    let (spec, _) = fake_engine(16, 256, config(Speculation::Auto));
    let mut got = together(&spec, greedy_reqs()).await;
    got.extend(together(&spec, seeded_reqs()).await);
    for (g, w) in got.iter().zip(&want) {
        assert_eq!((&g.tokens, &g.text, g.reason), (&w.tokens, &w.text, w.reason));
        assert_eq!(w.usage.drafted_tokens, 0);
    }
    let s = spec.stats();
    assert!(s.drafted_tokens > 0, "the prompts' repeats were proposed: {s:?}");
    assert_eq!(got.iter().map(|o| o.usage.drafted_tokens as u64).sum::<u64>(), s.drafted_tokens);
    spec.check_invariants().await.unwrap();
    // A pool too small for all of them: requests are preempted (their
    // drafts with them) and recomputed, with the same tokens.
    let (tight_plain, _) = fake_engine(16, 11, config(Speculation::Off));
    let want_tight = together(&tight_plain, greedy_reqs()).await;
    let (tight, _) = fake_engine(16, 11, config(Speculation::Auto));
    let got_tight = together(&tight, greedy_reqs()).await;
    for (g, w) in got_tight.iter().zip(&want_tight) {
        assert_eq!((&g.tokens, &g.text, g.reason), (&w.tokens, &w.text, w.reason));
    }
    assert!(tight.stats().preemptions > 0, "{:?}", tight.stats());
    tight.check_invariants().await.unwrap();
    // A request that opts out drafts nothing.
    let mut r = greedy(&repetitive(9), 40);
    r.speculative = false;
    let o = collect(spec.generate(r).unwrap()).await;
    assert_eq!(o.usage.drafted_tokens, 0);
}

fn real_engine(speculative: Speculation) -> EngineHandle {
    let path = model::fetch::ensure_default_model(&mut |_| {}).unwrap();
    let (model, text) =
        PagedLlama::open(&path, model::KvSizing::new(16, 512, KvDType::F16), MatmulPath::Kernels(Isa::detect()))
            .unwrap();
    engine::start(Box::new(model), Arc::new(text), config(speculative)).unwrap()
}

const TEXT: &str = "The lighthouse keeper climbed the spiral stairs every evening at dusk, trimmed the wick, \
wound the clockwork that turned the great lens, and wrote the weather in a leather logbook: wind from the west, \
seas moderate, two fishing boats returning to the harbour before dark.";

fn copy_request(max_tokens: usize, stop: &[&str]) -> Request {
    let mut r = Request::new(Prompt::Chat(vec![
        model::Message::new("system", "You repeat texts exactly, word for word."),
        model::Message::new("user", format!("Repeat this text exactly:\n\n{TEXT}")),
    ]));
    r.sampling = SamplingParams::greedy();
    r.max_tokens = Some(max_tokens);
    r.stop = stop.iter().map(|s| (*s).to_string()).collect();
    r
}

/// A JSON answer under a schema (constrained decoding): its keys are forced.
fn json_request() -> Request {
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "harbour_name": { "type": "string", "maxLength": 40 },
            "number_of_fishing_boats": { "type": "integer" },
            "has_a_lighthouse": { "type": "boolean" }
        },
        "required": ["harbour_name", "number_of_fishing_boats", "has_a_lighthouse"],
        "additionalProperties": false
    });
    let mut r = greedy("Describe a small harbour as JSON.", 64);
    r.grammar = Some(engine::Grammar::new(engine::GrammarSpec::JsonSchema { schema, strict: true }, "response_format"));
    r
}

/// Copy-heavy greedy decoding on the default model: the same tokens with
/// drafting off and on, alone, beside other requests, with a stop string,
/// with `max_tokens` landing inside an accepted run, sampled with a seed,
/// under a JSON schema, and from the cache.
#[tokio::test]
async fn greedy_output_on_the_default_model_is_identical_with_speculation_on_and_off() {
    let cases = || {
        vec![
            copy_request(64, &[]),
            copy_request(7, &[]),
            copy_request(64, &["logbook"]),
            greedy("Write one sentence about the sea.", 24),
            seeded(copy_request(64, &[]), 0.7, 42),
            seeded(greedy("Write one sentence about the sea.", 24), 1.0, 7),
            json_request(),
        ]
    };
    let plain = real_engine(Speculation::Off);
    let mut want = Vec::new();
    for r in cases() {
        want.push(collect(plain.generate(r).unwrap()).await);
    }
    let spec = real_engine(Speculation::Auto);
    let mut alone = Vec::new();
    for r in cases() {
        alone.push(collect(spec.generate(r).unwrap()).await);
    }
    let busy = together(&spec, cases()).await;
    let cached = together(&spec, cases()).await;
    for run in [&alone, &busy, &cached] {
        for (g, w) in run.iter().zip(&want) {
            assert_eq!((&g.tokens, &g.text, g.reason), (&w.tokens, &w.text, w.reason), "{:?}", g.usage);
        }
    }
    assert!(want[0].text.contains("lighthouse keeper"), "the model copies: {:?}", want[0].text);
    assert_eq!(alone[2].reason, Some(FinishReason::Stop));
    assert_eq!(alone[1].usage.completion_tokens, 7);
    let copied = alone[0].usage;
    assert!(copied.accepted_tokens * 2 >= copied.completion_tokens, "most of a copy is drafted: {copied:?}");
    assert!(alone[4].usage.accepted_tokens > 0, "a sampled copy is drafted too: {:?}", alone[4].usage);
    // Copies are all but sure drafts: they pay beside six other decodes too.
    let busy_drafted: usize = busy.iter().map(|g| g.usage.drafted_tokens).sum();
    assert!(busy_drafted > 0, "drafts in a busy batch: {:?}", busy.iter().map(|g| g.usage).collect::<Vec<_>>());
    let json = alone[6].usage;
    assert!(json.accepted_tokens > 0, "a schema's forced keys are drafted: {json:?}");
    assert!(serde_json::from_str::<serde_json::Value>(&alone[6].text).is_ok(), "{:?}", alone[6].text);
    spec.check_invariants().await.unwrap();
}
