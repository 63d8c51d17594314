//! The engine over Gemma 3 270M (fetched on first use): an agent's
//! conversation grows past 2,000 tokens, four times the 512-token sliding
//! window, so the sliding layers really drop old positions while the full
//! layers keep them. The greedy answers must be the same whether each turn's
//! history comes from the cache or is prefilled from scratch (in 512-token
//! chunks, so chunk boundaries fall at other places than the cached turns'
//! ends), and every turn after the first must find almost all of its prompt
//! cached.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::sync::Arc;
use std::time::Duration;

use engine::{EngineConfig, EngineHandle, Usage};
use kv::KvDType;
use model::quant::Isa;
use model::{MatmulPath, Message, PagedLlama};

fn gemma_engine(prefix_cache: bool) -> EngineHandle {
    let path = model::fetch::ensure_model(&model::fetch::GEMMA3_270M, &mut |_| {}).unwrap();
    let (model, text) = PagedLlama::open(
        &path,
        model::KvSizing { live_windows: 4, ..model::KvSizing::new(16, 640, KvDType::F16) },
        MatmulPath::Kernels(Isa::detect()),
    )
    .unwrap();
    let config = EngineConfig {
        prefix_cache,
        default_timeout: Some(Duration::from_secs(600)),
        model_name: "gemma3-270m".into(),
        ..EngineConfig::default()
    };
    engine::start(Box::new(model), Arc::new(text), config).unwrap()
}

/// A long document: numbered facts about made-up places, about 2,100
/// tokens.
fn document() -> String {
    let towns = ["Arden", "Belmere", "Corvale", "Dunmoor", "Elsworth", "Fenwick", "Glenhaven", "Harrowgate"];
    let goods = ["wool", "salt", "copper", "timber", "grain", "amber", "linen", "cider"];
    let mut s = String::from("Read the following notes carefully.\n\n");
    for i in 0..96 {
        let (t, g) = (towns[i % 8], goods[(i * 3 + 1) % 8]);
        s.push_str(&format!(
            "Note {i}: The town of {t} traded {} barrels of {g} in year {}, and its mayor was elected {} times.\n",
            17 + i * 7 % 90,
            1800 + i * 3,
            1 + i % 5
        ));
    }
    s
}

async fn turn(engine: &EngineHandle, history: &mut Vec<Message>, user: &str) -> (Vec<u32>, Usage) {
    let o = common::agent_turn(engine, history, user, "reader", 12).await;
    (o.tokens, o.usage)
}

async fn conversation(engine: &EngineHandle) -> Vec<(Vec<u32>, Usage)> {
    let first = format!("{}\nWhich town traded amber in year 1803?", document());
    let users = [first.as_str(), "And which traded salt?", "How many notes were there?", "Name the last town."];
    let mut history = Vec::new();
    let mut out = Vec::new();
    for u in users {
        out.push(turn(engine, &mut history, u).await);
    }
    out
}

#[tokio::test]
async fn a_long_gemma_conversation_answers_the_same_from_the_cache_and_caches_its_history() {
    let cached = conversation(&gemma_engine(true)).await;
    let cold = conversation(&gemma_engine(false)).await;
    assert!(cached[0].1.prompt_tokens > 2_000, "the history outgrows the window four times: {:?}", cached[0].1);
    for (i, (a, b)) in cached.iter().zip(&cold).enumerate() {
        assert_eq!(a.0, b.0, "turn {i}: the same greedy tokens with and without the cache");
        assert_eq!(b.1.cached_tokens, 0);
    }
    for (i, (_, u)) in cached.iter().enumerate() {
        eprintln!("turn {i}: prompt {} tokens, {} cached", u.prompt_tokens, u.cached_tokens);
    }
    for (i, (_, u)) in cached.iter().enumerate().skip(1) {
        let share = u.cached_tokens as f64 / u.prompt_tokens as f64;
        assert!(share >= 0.9, "turn {i}: {share:.3} of the prompt cached ({u:?})");
    }
}
