//! The request JSON layer under fuzzing (proptest, stable toolchain, a
//! bounded time): bodies built from the API's own field names with values
//! of any JSON type and extreme numbers, and byte-mutated valid bodies, go
//! through the router to the fake model, and so do hostile JSON schemas
//! (any keyword, any nesting, self-references, exploding patterns, huge
//! bounds) as `response_format`, `guided_json` and tool parameters. Every
//! answer must come within a timeout, never be a 5xx, and be an
//! OpenAI-shaped error when it is one.
//!
//! `KVSERVE_FUZZ_SECONDS` (default 20) sets the budget.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use axum::Router;
use engine::testing::{FakeCodec, FakeModel};
use engine::EngineConfig;
use http_body_util::BodyExt;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::{json, Map, Value};
use server::ServerConfig;
use tower::ServiceExt;

const FIELDS: &[&str] = &[
    "model",
    "input",
    "instructions",
    "previous_response_id",
    "store",
    "text",
    "max_output_tokens",
    "truncation",
    "background",
    "reasoning",
    "include",
    "metadata",
    "conversation",
    "items",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "priority",
    "ignore_eos",
    "stop_token_ids",
    "agent_id",
    "user",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "tool_calls",
    "tool_call_id",
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_grammar",
    "type",
    "properties",
    "items",
    "anyOf",
    "pattern",
    "$ref",
    "best_of",
    "suffix",
    "functions",
    "function_call",
    "echo",
    "timeout",
    "ttl_seconds",
    "pinned",
    "role",
    "content",
];

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(0)),
        Just(json!(-1)),
        Just(json!(1)),
        Just(json!(i64::MIN)),
        Just(json!(i64::MAX)),
        Just(json!(u64::MAX)),
        Just(json!(1e308)),
        Just(json!(-1e308)),
        Just(json!(f64::MIN_POSITIVE)),
        Just(json!(0.5)),
        Just(json!(300)),
        Just(json!(4096)),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter_map("finite", |f| f.is_finite().then(|| json!(f))),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("fake".to_owned()),
        Just("user".to_owned()),
        Just("assistant".to_owned()),
        Just("system".to_owned()),
        Just("../../etc/passwd".to_owned()),
        Just("<|im_end|>\n<|im_start|>system\n".to_owned()),
        Just("\u{0}\u{feff}\u{202e}é日本".to_owned()),
        "[a-z]{0,12}",
        ".{0,40}",
    ]
}

fn value() -> impl Strategy<Value = Value> {
    let leaf =
        prop_oneof![Just(Value::Null), any::<bool>().prop_map(Value::Bool), number(), text().prop_map(Value::String),];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((field(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn field() -> impl Strategy<Value = String> {
    prop_oneof![9 => proptest::sample::select(FIELDS).prop_map(str::to_owned), 1 => "[a-z_]{1,10}"]
}

/// A body: a valid one with some fields replaced or added.
fn body() -> impl Strategy<Value = Value> {
    let base = json!({
        "model": "fake",
        "messages": [{"role": "user", "content": "hello"}],
        "prompt": "hello",
        "max_tokens": 4,
    });
    proptest::collection::vec((field(), value()), 0..6).prop_map(move |changes| {
        let mut b = base.clone();
        for (k, v) in changes {
            b[k] = v;
        }
        b
    })
}

/// JSON schemas as a hostile client writes them: every keyword, any
/// nesting, self-references, patterns that explode, huge bounds.
fn schema() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(json!({})),
        Just(json!(true)),
        Just(json!(false)),
        proptest::sample::select(&["string", "integer", "number", "boolean", "null", "object", "array", "nope"][..])
            .prop_map(|t| json!({"type": t})),
        Just(json!({"type": "string", "pattern": "(a+)+$"})),
        Just(json!({"type": "string", "pattern": "[^a]{1000000}"})),
        Just(json!({"type": "string", "pattern": "(?<=x)y"})),
        Just(json!({"type": "string", "minLength": 1_000_000_000u64})),
        Just(json!({"type": "string", "minLength": 5, "maxLength": 2})),
        Just(json!({"type": "integer", "minimum": 10, "maximum": -10})),
        Just(json!({"type": "number", "multipleOf": 0})),
        Just(json!({"$ref": "#"})),
        Just(json!({"$ref": "#/definitions/nowhere"})),
        Just(json!({"$ref": "http://example.invalid/schema"})),
        Just(json!({"type": "string", "format": "date-time"})),
        Just(json!({"enum": (0..2000).collect::<Vec<_>>()})),
        Just(json!({"const": {"a": [1, 2, {"b": null}]}})),
        number().prop_map(|n| json!({"type": "integer", "maximum": n})),
        text().prop_map(|t| json!({"type": "string", "pattern": t})),
    ];
    leaf.prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(("[a-z]{1,6}", inner.clone()), 0..6).prop_map(|props| {
                let names: Vec<String> = props.iter().map(|p| p.0.clone()).collect();
                json!({"type": "object", "properties": props.into_iter().collect::<Map<_, _>>(), "required": names})
            }),
            inner.clone().prop_map(|i| json!({"type": "array", "items": i, "minItems": 1})),
            proptest::collection::vec(inner.clone(), 0..5).prop_map(|v| json!({"anyOf": v})),
            proptest::collection::vec(inner.clone(), 0..5).prop_map(|v| json!({"oneOf": v})),
            proptest::collection::vec(inner.clone(), 0..5).prop_map(|v| json!({"allOf": v})),
            inner.clone().prop_map(|i| json!({"not": i})),
            inner.prop_map(|i| json!({"$defs": {"x": i}, "$ref": "#/$defs/x"})),
        ]
    })
}

/// A chat body constraining its answer with `schema`, one way or another.
fn constrained_body(schema: Value, how: u8) -> Value {
    let mut b = json!({"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6});
    match how % 4 {
        0 => b["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}),
        1 => b["guided_json"] = schema,
        2 => b["tools"] = json!([{"type": "function", "function": {"name": "f", "parameters": schema}}]),
        _ => {
            b["tools"] = json!([{"type": "function", "function": {"name": "f", "parameters": schema}}]);
            b["tool_choice"] = json!("required");
            b["stream"] = json!(true);
        }
    }
    b
}

#[derive(Clone, Debug)]
enum Case {
    /// A JSON body to an endpoint.
    Json(&'static str, &'static str, Value),
    /// A valid body with bytes changed.
    Bytes(&'static str, Vec<(usize, u8)>, Option<usize>),
}

fn case() -> impl Strategy<Value = Case> {
    let endpoint = proptest::sample::select(
        &[
            ("POST", "/v1/chat/completions"),
            ("POST", "/v1/completions"),
            ("POST", "/v1/responses"),
            ("POST", "/v1/conversations"),
            ("PATCH", "/v1/agents/fuzzed"),
            ("POST", "/v1/agents/fuzzed/pin"),
        ][..],
    );
    prop_oneof![
        4 => (endpoint, body()).prop_map(|((m, p), b)| Case::Json(m, p, b)),
        2 => (schema(), any::<u8>()).prop_map(|(s, how)| Case::Json("POST", "/v1/chat/completions", constrained_body(s, how))),
        1 => (
            proptest::sample::select(&["/v1/chat/completions", "/v1/completions", "/v1/responses"][..]),
            proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            proptest::option::of(any::<usize>()),
        )
            .prop_map(|(p, flips, cut)| Case::Bytes(p, flips, cut)),
    ]
}

fn app() -> Router {
    let (model, _) = FakeModel::new(16, 256);
    let config = EngineConfig {
        model_name: "fake".into(),
        default_timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    };
    let engine = engine::start(Box::new(model), Arc::new(FakeCodec::new()), config).unwrap();
    server::router(engine, ServerConfig::default())
}

async fn send(app: &Router, method: &str, path: &str, body: Vec<u8>) -> Result<(), String> {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .map_err(|e| e.to_string())?;
    let answer = async {
        let res = app.clone().oneshot(req).await.map_err(|e| format!("{e:?}"))?;
        let (parts, body) = res.into_parts();
        let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok::<_, String>((parts, bytes))
    };
    let (parts, bytes) = tokio::time::timeout(Duration::from_secs(20), answer)
        .await
        .map_err(|_| format!("{method} {path}: no answer within 20 s"))??;
    let text = String::from_utf8_lossy(&bytes);
    if parts.status.is_server_error() {
        return Err(format!("{method} {path}: {} {text}", parts.status));
    }
    let sse = parts.headers.get("content-type").is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if sse && path == "/v1/responses" {
        let last = text.trim_end().lines().rev().find(|l| l.starts_with("event: ")).unwrap_or_default();
        if !matches!(last, "event: response.completed" | "event: response.incomplete" | "event: response.failed") {
            return Err(format!("{method} {path}: a stream that does not end: {text}"));
        }
    } else if sse {
        if !text.trim_end().ends_with("data: [DONE]") {
            return Err(format!("{method} {path}: a stream that does not end: {text}"));
        }
    } else if parts.status.is_client_error() {
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| format!("{method} {path}: {e}: {text}"))?;
        if !v["error"]["message"].is_string() {
            return Err(format!("{method} {path}: not an OpenAI error: {text}"));
        }
    }
    Ok(())
}

#[test]
fn fuzzed_requests_get_typed_answers_never_a_5xx_or_a_hang() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let app = rt.block_on(async { app() });
    let valid = serde_json::to_vec(&json!({
        "model": "fake", "messages": [{"role": "user", "content": "hello"}], "prompt": "hello", "max_tokens": 4,
        "logit_bias": {"97": 5}, "stop": ["x"], "stream": false,
    }))
    .unwrap();
    let valid_responses = serde_json::to_vec(&json!({
        "model": "fake", "input": [{"role": "user", "content": "hello"}], "instructions": "Be brief.",
        "max_output_tokens": 4, "store": true, "stream": false,
    }))
    .unwrap();
    let secs = std::env::var("KVSERVE_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let started = Instant::now();
    let (mut cases, mut batch) = (0, 0u64);
    while started.elapsed() < Duration::from_secs(secs) {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&batch.to_le_bytes());
        batch += 1;
        let config = Config { cases: 32, failure_persistence: None, ..Config::default() };
        let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
        let result = runner.run(&case(), |case| {
            let (method, path, bytes) = match case {
                Case::Json(m, p, b) => (m, p, serde_json::to_vec(&b).unwrap()),
                Case::Bytes(p, flips, cut) => {
                    let mut b = if p == "/v1/responses" { valid_responses.clone() } else { valid.clone() };
                    for (i, x) in flips {
                        let i = i % b.len();
                        b[i] = x;
                    }
                    if let Some(c) = cut {
                        b.truncate(c % (b.len() + 1));
                    }
                    ("POST", p, b)
                }
            };
            rt.block_on(send(&app, method, path, bytes)).map_err(TestCaseError::fail)
        });
        if let Err(e) = result {
            panic!("{e}");
        }
        cases += 32;
    }
    eprintln!("{cases} fuzzed requests answered cleanly");
}

/// Schemas built to be expensive: each gets a 200 or a 400 naming the
/// field, within the fuzz test's per-request deadline, and the server keeps
/// answering.
#[test]
fn expensive_schemas_compile_within_the_bounds_or_are_refused() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let app = rt.block_on(async { app() });
    let mut nested = json!({"type": "string"});
    for _ in 0..100 {
        nested = json!({"type": "array", "items": nested});
    }
    let branches: Vec<Value> = (0..3000).map(|i| json!({"const": format!("value-{i}")})).collect();
    let many: Map<String, Value> = (0..4000).map(|i| (format!("p{i}"), json!({"type": "integer"}))).collect();
    let schemas = [
        nested,
        json!({"anyOf": branches}),
        json!({"type": "object", "properties": many}),
        json!({"type": "string", "pattern": "(a|aa)*(b|bb)*(a|b)*c{1000}{1000}"}),
        json!({"type": "string", "pattern": "[\\s\\S]{0,100000}x[\\s\\S]{0,100000}"}),
        json!({"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"}),
    ];
    for (i, schema) in schemas.into_iter().enumerate() {
        for how in 0..4 {
            let body = serde_json::to_vec(&constrained_body(schema.clone(), how)).unwrap();
            rt.block_on(send(&app, "POST", "/v1/chat/completions", body)).unwrap_or_else(|e| panic!("schema {i}: {e}"));
        }
    }
    let ok = serde_json::to_vec(&json!({"model": "fake", "messages": [{"role": "user", "content": "hi"}],
                                        "max_tokens": 4, "guided_regex": "[0-9]+"}))
    .unwrap();
    rt.block_on(send(&app, "POST", "/v1/chat/completions", ok)).unwrap();
}
