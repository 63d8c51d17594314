//! Constrained decoding through the engine over the fake model: outputs
//! match their grammars, constrained and free requests share batches, the
//! grammar's end is the request's end, and `max_tokens` cuts short with
//! `length`.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{assert_pool_full, collect_blocking, fake_engine, greedy};
use engine::{EngineConfig, Error, FinishReason, Grammar, GrammarSpec, Request, SamplingParams};

fn config() -> EngineConfig {
    EngineConfig { default_timeout: Some(Duration::from_secs(30)), ..EngineConfig::default() }
}

fn constrained(prompt: &str, spec: GrammarSpec, max_tokens: usize) -> Request {
    let mut r = greedy(prompt, max_tokens);
    r.grammar = Some(Grammar::new(spec, "response_format"));
    r
}

fn schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": { "id": { "type": "integer" }, "tag": { "type": "string", "maxLength": 6 } },
        "required": ["id", "tag"],
        "additionalProperties": false
    })
}

#[test]
fn constrained_and_free_requests_share_steps_and_each_gets_what_it_asked_for() {
    let (engine, control) = fake_engine(16, 256, config());
    control.step_delay_ms.store(2, Ordering::SeqCst);
    let mut streams = Vec::new();
    for i in 0..12 {
        let prompt = format!("request {i}");
        let req = match i % 3 {
            0 => constrained(&prompt, GrammarSpec::Regex("[0-9]{3}-[a-z]{2}".into()), 40),
            1 => constrained(&prompt, GrammarSpec::JsonSchema { schema: schema(), strict: false }, 60),
            _ => greedy(&prompt, 10),
        };
        streams.push((i, engine.generate(req).unwrap()));
    }
    for (i, s) in streams {
        let o = collect_blocking(s);
        match i % 3 {
            0 => {
                assert_eq!(o.reason, Some(FinishReason::Stop), "{o:?}");
                let b = o.text.as_bytes();
                assert!(b.len() == 6 && b[..3].iter().all(u8::is_ascii_digit) && b[3] == b'-', "{o:?}");
                assert_eq!(o.usage.completion_tokens, 6, "the grammar's end ends the request at once");
            }
            1 => {
                let v: serde_json::Value = serde_json::from_str(&o.text).unwrap_or_else(|e| panic!("{e}: {o:?}"));
                assert!(v["id"].is_number() && v["tag"].as_str().is_some_and(|t| t.len() <= 6), "{v}");
                assert!(o.text.starts_with("{\"id\": "), "fixed layout: {}", o.text);
            }
            _ => {
                assert_eq!(o.reason, Some(FinishReason::Length));
                assert_eq!(o.usage.completion_tokens, 10);
            }
        }
    }
    let widest = control.batches.lock().unwrap().iter().map(Vec::len).max().unwrap();
    assert!(widest >= 6, "constrained rows batched with the others (widest {widest})");
    assert_pool_full(&engine);
}

#[test]
fn max_tokens_before_the_grammar_can_end_finishes_with_length() {
    let (engine, _) = fake_engine(16, 64, config());
    let o = collect_blocking(
        engine.generate(constrained("x", GrammarSpec::JsonSchema { schema: schema(), strict: false }, 4)).unwrap(),
    );
    assert_eq!(o.reason, Some(FinishReason::Length), "{o:?}");
    assert_eq!(o.usage.completion_tokens, 4);
    assert!(serde_json::from_str::<serde_json::Value>(&o.text).is_err(), "incomplete, and reported so");
}

#[test]
fn stop_strings_do_not_cut_a_structure_short_and_sampling_stays_inside_the_grammar() {
    let (engine, _) = fake_engine(16, 64, config());
    let mut r = constrained("y", GrammarSpec::Regex("(abc|abd)!".into()), 20);
    r.stop = vec!["b".into()];
    r.sampling = SamplingParams { temperature: 1.5, seed: Some(3), ..SamplingParams::default() };
    r.logit_bias = vec![(u32::from(b'z'), 100.0)];
    let o = collect_blocking(engine.generate(r).unwrap());
    assert!(o.text == "abc!" || o.text == "abd!", "{o:?}");
    assert_eq!(o.reason, Some(FinishReason::Stop));
}

#[test]
fn a_grammar_that_does_not_compile_is_refused_before_queueing() {
    let (engine, _) = fake_engine(16, 64, config());
    let mut r = greedy("x", 4);
    r.grammar = Some(Grammar::new(GrammarSpec::Lark("start: undefined_rule".into()), "tools"));
    match engine.generate(r) {
        Err(Error::InvalidRequest { field: "tools", .. }) => {}
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert_eq!(engine.stats().waiting, 0);
}

fn weather() -> engine::tools::ToolSpec {
    engine::tools::ToolSpec {
        name: "get_weather".into(),
        description: None,
        parameters: serde_json::json!({
            "type": "object",
            "properties": { "city": { "type": "string", "maxLength": 8 } },
            "required": ["city"],
            "additionalProperties": false
        }),
        strict: false,
    }
}

fn tool_grammar(choice: engine::tools::ToolChoice) -> GrammarSpec {
    let schema = serde_json::json!({ "type": "string", "maxLength": 5 });
    let answer = engine::tools::AnswerSchema { schema: &schema, strict: false };
    let lark = engine::tools::grammar(&[weather()], &choice, false, Some(answer), &engine::grammar_schema);
    GrammarSpec::Lark(lark.expect("grammar"))
}

#[test]
fn auto_tool_choice_keeps_both_a_call_and_an_answer_open_until_the_model_picks() {
    use engine::tools::{parse_reply, Reply, ToolChoice};
    let (engine, _) = fake_engine(16, 256, config());
    // Force each branch with a bias on its first distinguishing byte: both
    // must be reachable under the mask.
    for (first, want_call) in [(b't', true), (b'r', false)] {
        let mut r = constrained("call?", tool_grammar(ToolChoice::Auto), 80);
        r.logit_bias = vec![(u32::from(first), 100.0)];
        let o = collect_blocking(engine.generate(r).unwrap());
        assert_eq!(o.reason, Some(FinishReason::Stop), "{o:?}");
        match parse_reply(&o.text, false) {
            Some(Reply::Calls(calls)) if want_call => {
                assert_eq!(calls[0].name, "get_weather");
                let args: serde_json::Value = serde_json::from_str(&calls[0].arguments).expect("arguments parse");
                assert!(args["city"].is_string(), "{args}");
            }
            Some(Reply::Answer(_)) if !want_call => {}
            other => panic!("{other:?} from {:?}", o.text),
        }
    }
    // `required` forbids the answer even when the bias pushes for it.
    let mut r = constrained("call!", tool_grammar(ToolChoice::Required), 80);
    r.logit_bias = vec![(u32::from(b'r'), 100.0)];
    let o = collect_blocking(engine.generate(r).unwrap());
    assert!(matches!(parse_reply(&o.text, false), Some(Reply::Calls(_))), "{o:?}");
}

/// The fake codec plus one two-byte token, `"xy"` (id 200, which the byte
/// alphabet never needs): canonical encoding merges the pair, a model under
/// a grammar can still write `x` then `y`.
struct MergingCodec(engine::testing::FakeCodec);

const XY: u32 = 200;

impl model::TextCodec for MergingCodec {
    fn encode(&self, text: &str) -> model::Result<Vec<u32>> {
        let mut out = Vec::new();
        let b = text.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i..].starts_with(b"xy") {
                out.push(XY);
                i += 2;
            } else {
                out.push(u32::from(b[i]));
                i += 1;
            }
        }
        Ok(out)
    }
    fn encode_chat(&self, messages: &[model::Message]) -> model::Result<Vec<u32>> {
        let mut s: String = messages.iter().map(|m| format!("{}: {}\n", m.role, m.content)).collect();
        s.push_str("assistant: ");
        self.encode(&s)
    }
    fn max_token_bytes(&self) -> usize {
        1
    }
    fn decode(&self, ids: &[u32]) -> model::Result<String> {
        let bytes: Vec<u8> = ids.iter().flat_map(|&t| self.token_bytes(t).unwrap_or_default()).collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
    fn stop_ids(&self) -> &[u32] {
        self.0.stop_ids()
    }
    fn token_bytes(&self, id: u32) -> model::Result<Vec<u8>> {
        Ok(match id {
            XY => b"xy".to_vec(),
            engine::testing::FAKE_EOS => Vec::new(),
            b => vec![u8::try_from(b).unwrap_or(b'?')],
        })
    }
    fn is_control(&self, id: u32) -> bool {
        self.0.is_control(id)
    }
    fn vocabulary(&self) -> Vec<model::VocabEntry> {
        let mut v = self.0.vocabulary();
        v[XY as usize] = model::VocabEntry { bytes: b"xy".to_vec(), special: false };
        v
    }
}

#[test]
fn an_agents_next_turn_keeps_the_tokens_it_generated_not_their_canonical_spelling() {
    use engine::{Message, Prompt};
    let (model, _) = engine::testing::FakeModel::new(16, 256);
    let codec = MergingCodec(engine::testing::FakeCodec::new());
    let engine = engine::start(Box::new(model), std::sync::Arc::new(codec), config()).unwrap();
    let mut history = vec![Message::new("user", "say the word")];
    let ask = |history: &[Message], grammar: Option<GrammarSpec>| {
        let mut r = Request::new(Prompt::Chat(history.to_vec()));
        r.sampling = SamplingParams::greedy();
        r.max_tokens = Some(8);
        r.agent = Some(engine::AgentId::new("speller").unwrap());
        r.grammar = grammar.map(|g| Grammar::new(g, "response_format"));
        collect_blocking(engine.generate(r).unwrap())
    };
    // Under the grammar the fake model writes `x` then `y` (the lowest
    // allowed ids), not the canonical `xy`.
    let first = ask(&history, Some(GrammarSpec::Regex("xyz".into())));
    assert_eq!(first.text, "xyz", "{first:?}");
    assert_eq!(first.tokens, vec![u32::from(b'x'), u32::from(b'y'), u32::from(b'z')]);
    history.push(Message::new("assistant", first.text.clone()));
    history.push(Message::new("user", "again"));
    let second = ask(&history, None);
    // Everything the first turn computed (its prompt and all but its last
    // token) is reused, although the re-rendered text encodes `xy` as one
    // token.
    let computed = first.usage.prompt_tokens + first.usage.completion_tokens - 1;
    assert_eq!(second.usage.cached_tokens, computed, "{second:?}");
}

/// A stop id that is ordinary text the grammar needs is text there, not an
/// end that would report an incomplete structure as complete.
#[test]
fn a_stop_id_the_grammar_needs_as_text_does_not_end_the_answer_early() {
    let (engine, _) = fake_engine(16, 64, config());
    let mut r = constrained("q", GrammarSpec::Regex("ab".into()), 10);
    r.stop_token_ids = vec![u32::from(b'a'), u32::from(b'b')];
    let o = collect_blocking(engine.generate(r).unwrap());
    assert_eq!((o.text.as_str(), o.reason), ("ab", Some(FinishReason::Stop)), "{o:?}");
}

/// A model that would write a digit forever (`1111…` until `max_tokens`)
/// is made to end the number, and with `strict` the object, well within
/// the budget.
#[test]
fn a_number_the_model_would_repeat_forever_ends_at_the_bound() {
    let (engine, _) = fake_engine(16, 64, config());
    let schema = serde_json::json!({
        "type": "object",
        "properties": { "population_millions": { "type": "number" } },
        "required": ["population_millions"]
    });
    let mut r = constrained("city?", GrammarSpec::JsonSchema { schema, strict: true }, 64);
    r.logit_bias = vec![(u32::from(b'1'), 100.0)];
    let o = collect_blocking(engine.generate(r).unwrap());
    assert_eq!(o.reason, Some(FinishReason::Stop), "{o:?}");
    let v: serde_json::Value = serde_json::from_str(&o.text).unwrap_or_else(|e| panic!("{e}: {o:?}"));
    let number = o.text.trim_start_matches("{\"population_millions\": ").trim_end_matches('}');
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    assert_eq!(whole, "1".repeat(16), "{o:?}");
    assert!(fraction.len() <= engine::FRACTION_DIGITS as usize, "{o:?}");
    assert_eq!(v.as_object().map(|m| m.len()), Some(1), "strict: no other key");
}
