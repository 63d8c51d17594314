//! The router in-process (`tower::ServiceExt::oneshot`) over the fake model:
//! every endpoint, every error status, streaming format, agents, auth, and
//! that a client going away frees its blocks.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use engine::testing::{FakeCodec, FakeControl, FakeModel};
use engine::{EngineConfig, EngineHandle, EngineStats, TenantId};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use server::ServerConfig;
use tower::ServiceExt;

struct App {
    router: Router,
    engine: EngineHandle,
    control: Arc<FakeControl>,
}

fn app_with(engine_config: EngineConfig, server_config: ServerConfig) -> App {
    let (model, control) = FakeModel::new(16, 256);
    let config =
        EngineConfig { model_name: "fake".into(), default_timeout: Some(Duration::from_secs(30)), ..engine_config };
    let engine = engine::start(Box::new(model), Arc::new(FakeCodec::new()), config).unwrap();
    App { router: server::router(engine.clone(), server_config), engine, control }
}

fn app() -> App {
    app_with(EngineConfig::default(), ServerConfig::default())
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

async fn call(app: &App, method: &str, uri: &str, body: Option<&str>, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req.body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned()))).unwrap();
    let res = app.router.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    Reply { status: parts.status, headers: parts.headers, body: String::from_utf8(bytes.to_vec()).unwrap() }
}

async fn post(app: &App, uri: &str, body: Value) -> Reply {
    call(app, "POST", uri, Some(&body.to_string()), &[]).await
}

fn chat_body(content: &str, extra: Value) -> Value {
    let mut body =
        json!({"model": "fake", "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    body
}

/// The JSON payloads of an SSE body, `[DONE]` kept as a string.
fn sse_data(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_owned).collect()
}

async fn wait_blocks_back(engine: &EngineHandle) {
    wait_for(engine, |s| s.running == 0 && s.waiting == 0 && s.cache.used_blocks == 0).await;
}

/// Polls the engine's stats until `done` holds; fails the test after 10 s.
async fn wait_for(engine: &EngineHandle, done: impl Fn(&EngineStats) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = engine.stats();
        if done(&s) {
            return;
        }
        assert!(Instant::now() < deadline, "engine never reached the state: {s:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn chat_completion_returns_an_openai_shaped_answer() {
    let app = app();
    let r = post(&app, "/v1/chat/completions", chat_body("hello", json!({}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "fake");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap().len(), 8);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 8);
    assert_eq!(v["usage"]["total_tokens"], v["usage"]["prompt_tokens"].as_u64().unwrap() + 8);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
}

#[tokio::test]
async fn streaming_sends_role_text_finish_usage_then_done() {
    let app = app();
    let whole = post(&app, "/v1/chat/completions", chat_body("stream me", json!({}))).await.json();
    let r = post(
        &app,
        "/v1/chat/completions",
        chat_body("stream me", json!({"stream": true, "stream_options": {"include_usage": true}})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let data = sse_data(&r.body);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String =
        chunks.iter().filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str().map(str::to_owned)).collect();
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap(), "same greedy answer streamed");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 8);
}

#[tokio::test]
async fn text_completions_stream_and_not() {
    let app = app();
    let body = json!({"model": "fake", "prompt": "once upon", "max_tokens": 5, "temperature": 0});
    let v = post(&app, "/v1/completions", body.clone()).await.json();
    assert_eq!(v["object"], "text_completion");
    let text = v["choices"][0]["text"].as_str().unwrap().to_owned();
    assert_eq!(text.len(), 5);
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let r = post(&app, "/v1/completions", streamed).await;
    let data = sse_data(&r.body);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let joined: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(joined, text);
}

#[tokio::test]
async fn models_health_and_metrics() {
    let app = app();
    let v = call(&app, "GET", "/v1/models", None, &[]).await.json();
    assert_eq!(v["data"][0]["id"], "fake");
    let h = call(&app, "GET", "/health", None, &[]).await;
    assert_eq!((h.status, h.json()["status"].clone()), (StatusCode::OK, json!("ok")));
    post(&app, "/v1/chat/completions", chat_body("count me", json!({}))).await;
    wait_for(&app.engine, |s| s.finished.length == 1 && s.running == 0).await;
    let m = call(&app, "GET", "/metrics", None, &[]).await;
    assert!(m.headers["content-type"].to_str().unwrap().starts_with("text/plain"));
    for name in [
        "kvserve_queue_depth 0",
        "kvserve_kv_blocks_free",
        "kvserve_prefix_hit_rate",
        "kvserve_generated_tokens_total 8",
        "kvserve_time_to_first_token_seconds_count 1",
        "kvserve_inter_token_latency_seconds_bucket{le=\"+Inf\"} 7",
        "kvserve_requests_finished_total{reason=\"length\"} 1",
    ] {
        assert!(m.body.contains(name), "{name} missing from\n{}", m.body);
    }
    let nf = call(&app, "GET", "/nope", None, &[]).await;
    assert_eq!(nf.status, StatusCode::NOT_FOUND);
    assert_eq!(nf.json()["error"]["type"], "not_found_error");
}

/// The tiers as a client sees them: where an agent's blocks are, tier
/// metrics, and `/health` saying degraded (still 200, still serving) when
/// the disk tier cannot write.
#[tokio::test]
async fn tiers_show_in_agents_and_metrics_and_a_failing_disk_makes_health_degraded() {
    let dir = tempfile::tempdir().unwrap();
    let disk = engine::DiskConfig { retry: Duration::from_secs(3600), ..engine::DiskConfig::new(dir.path(), 1 << 30) };
    let tiers = engine::TierConfig { ram_bytes: 1 << 20, disk: Some(disk), ..engine::TierConfig::default() };
    let app = app_with(EngineConfig { tiers, ..EngineConfig::default() }, ServerConfig::default());
    let turn = |content: &'static str| post(&app, "/v1/chat/completions", chat_body(content, json!({"agent_id": "a"})));
    assert_eq!(turn("a first message long enough to fill two blocks of sixteen tokens").await.status, StatusCode::OK);
    assert!(app.engine.flush_tiers(Duration::from_secs(10)).await.unwrap());
    let info = call(&app, "GET", "/v1/agents/a", None, &[]).await.json();
    assert_eq!(info["blocks"]["durable"], true, "{info}");
    assert!(info["blocks"]["disk"].as_u64().unwrap() >= 2, "{info}");
    assert_eq!(info["blocks"]["pool"], info["blocks"]["disk"], "{info}");
    wait_for(&app.engine, |s| s.tiers.disk.as_ref().is_some_and(|d| d.commits == 1)).await;
    let m = call(&app, "GET", "/metrics", None, &[]).await.body;
    // The agent's full blocks, and its partial last block (the manifest's
    // tail, a record of its own).
    let on_disk = format!("kvserve_tier_blocks{{tier=\"disk\"}} {}", info["blocks"]["disk"].as_u64().unwrap() + 1);
    for name in [
        on_disk.as_str(),
        "kvserve_agent_commits_total 1",
        "kvserve_durability_lag_seconds_count 1",
        "kvserve_tier_disk_degraded 0",
        "kvserve_tier_hit_tokens_total{tier=\"ram\"} 0",
    ] {
        assert!(m.contains(name), "{name} missing from\n{m}");
    }
    // The directory vanishes under the server: the next commit fails.
    std::fs::remove_dir_all(dir.path()).unwrap();
    assert_eq!(turn("and a second message").await.status, StatusCode::OK, "serving goes on");
    app.engine.flush_tiers(Duration::from_secs(10)).await.unwrap();
    wait_for(&app.engine, |s| s.tiers.disk.as_ref().is_some_and(|d| d.degraded.is_some())).await;
    let h = call(&app, "GET", "/health", None, &[]).await;
    assert_eq!(h.status, StatusCode::OK);
    assert_eq!(h.json()["status"], "degraded", "{}", h.body);
    assert!(h.json()["reason"].as_str().unwrap().starts_with("disk tier:"), "{}", h.body);
    let m = call(&app, "GET", "/metrics", None, &[]).await.body;
    assert!(m.contains("kvserve_tier_disk_degraded 1"), "{m}");
    assert!(m.contains("kvserve_agent_commits_failed_total 1"), "{m}");
}

async fn error_of(app: &App, body: &str) -> (StatusCode, Value) {
    let r = call(app, "POST", "/v1/chat/completions", Some(body), &[]).await;
    (r.status, r.json()["error"].clone())
}

/// The model answers to its aliases (catalogue name, file stem,
/// `--served-model-name`s), lists them all, and names them when refusing
/// another; answers carry the primary name.
#[tokio::test]
async fn a_model_answers_to_each_of_its_names() {
    let aliases = vec!["smollm2-135m".to_owned(), "my-model".to_owned(), "fake".to_owned()];
    let app = app_with(EngineConfig::default(), ServerConfig { model_aliases: aliases, ..ServerConfig::default() });
    let v = call(&app, "GET", "/v1/models", None, &[]).await.json();
    let ids: Vec<&str> = v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["fake", "smollm2-135m", "my-model"], "primary first, no duplicates");
    for name in ["smollm2-135m", "my-model"] {
        let r = post(&app, "/v1/chat/completions", chat_body("hi", json!({"model": name, "max_tokens": 2}))).await;
        assert_eq!(r.status, StatusCode::OK, "{name}");
        assert_eq!(r.json()["model"], "fake");
    }
    let (s, e) = error_of(&app, &chat_body("x", json!({"model": "gpt-9"})).to_string()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("smollm2-135m") && msg.contains("my-model"), "{msg}");
}

#[tokio::test]
async fn bad_requests_are_openai_errors_with_the_right_status() {
    let app = app();
    let (s, e) = error_of(&app, "{not json").await;
    assert_eq!((s, e["type"].as_str().unwrap()), (StatusCode::BAD_REQUEST, "invalid_request_error"));
    let (s, e) = error_of(&app, r#"{"model": "fake"}"#).await;
    assert_eq!((s, e["param"].as_str().unwrap()), (StatusCode::BAD_REQUEST, "messages"));
    let (s, e) = error_of(&app, r#"{"model": "fake", "messages": []}"#).await;
    assert_eq!((s, e["param"].as_str().unwrap()), (StatusCode::BAD_REQUEST, "messages"));
    let (s, e) = error_of(&app, &chat_body("x", json!({"model": "gpt-9"})).to_string()).await;
    assert_eq!((s, e["code"].as_str().unwrap()), (StatusCode::BAD_REQUEST, "model_not_found"));
    let (s, e) = error_of(&app, &chat_body("x", json!({"max_tokens": 1_000_000})).to_string()).await;
    assert_eq!((s, e["code"].as_str().unwrap()), (StatusCode::BAD_REQUEST, "context_length_exceeded"));
    assert_eq!(e["param"], "max_tokens");
    let (s, e) = error_of(&app, &chat_body(&"y".repeat(5000), json!({})).to_string()).await;
    assert_eq!((s, e["code"].as_str().unwrap()), (StatusCode::BAD_REQUEST, "context_length_exceeded"));
    assert_eq!(e["param"], "messages", "the prompt alone is too long");
    let tool = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    for (extra, param) in [
        (json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}), "tools"),
        (json!({"tools": [{"type": "retrieval"}]}), "tools"),
        (json!({"tools": tool, "tool_choice": {"type": "function", "function": {"name": "g"}}}), "tool_choice"),
        (json!({"tools": tool, "tool_choice": "sometimes"}), "tool_choice"),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}]}), "tools"),
        (json!({"response_format": {"type": "xml"}}), "response_format"),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}}),
            "response_format",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}}),
            "response_format",
        ),
        (json!({"tools": [{"type": "function", "function": {"name": "f", "strict": 1}}]}), "tools"),
        (json!({"guided_regex": "("}), "guided_regex"),
        (json!({"guided_regex": "a", "guided_json": {}}), "guided_json"),
    ] {
        let (s, e) = error_of(&app, &chat_body("x", extra.clone()).to_string()).await;
        assert_eq!((s, e["param"].as_str().unwrap_or_default()), (StatusCode::BAD_REQUEST, param), "{extra}: {e}");
    }
    let r = post(&app, "/v1/chat/completions", chat_body("x", json!({"tools": tool, "tool_choice": "none"}))).await;
    assert_eq!(r.status, StatusCode::OK, "tool_choice none asks for text: {}", r.body);
    let r = post(&app, "/v1/chat/completions", chat_body("x", json!({"response_format": {"type": "text"}}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let (s, e) = error_of(&app, &chat_body("x", json!({"top_logprobs": 2})).to_string()).await;
    assert_eq!((s, e["param"].as_str().unwrap()), (StatusCode::BAD_REQUEST, "top_logprobs"), "needs logprobs");
    let (s, e) = error_of(&app, &chat_body("x", json!({"priority": 1})).to_string()).await;
    assert_eq!((s, e["param"].as_str().unwrap()), (StatusCode::BAD_REQUEST, "priority"), "above --max-priority");
    let (s, e) = error_of(&app, &chat_body("x", json!({"temperature": 5})).to_string()).await;
    assert_eq!((s, e["param"].as_str().unwrap()), (StatusCode::BAD_REQUEST, "temperature"));
    let (s, e) = error_of(&app, &chat_body("x", json!({"temperature": "hot"})).to_string()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    let (s, e) = error_of(&app, &chat_body("x", json!({"agent_id": "../../etc"})).to_string()).await;
    assert_eq!((s, e["param"].as_str().unwrap()), (StatusCode::BAD_REQUEST, "agent_id"));
    let (s, _) = error_of(&app, &chat_body("x", json!({"n": 3})).to_string()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let r = call(&app, "GET", "/v1/agents/nobody", None, &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(call(&app, "GET", "/v1/agents/bad%20id", None, &[]).await.status, StatusCode::BAD_REQUEST);
    let huge = r#"{"ttl_seconds": 18446744073709551615}"#;
    let r = call(&app, "PATCH", "/v1/agents/someone", Some(huge), &[]).await;
    assert_eq!((r.status, r.json()["error"]["param"].clone()), (StatusCode::BAD_REQUEST, json!("ttl_seconds")));

    let small = app_with(EngineConfig::default(), ServerConfig { max_body_bytes: 1024, ..ServerConfig::default() });
    let (s, e) = error_of(&small, &chat_body(&"z".repeat(4096), json!({})).to_string()).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{e}");
}

/// `logprobs` on chat: one entry per answer token with its raw bytes and the
/// requested alternatives, most likely first, all finite numbers.
#[tokio::test]
async fn chat_logprobs_list_each_token_with_its_alternatives() {
    let app = app();
    let r = post(&app, "/v1/chat/completions", chat_body("x", json!({"logprobs": true, "top_logprobs": 3}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let body = r.json();
    let content = body["choices"][0]["logprobs"]["content"].as_array().unwrap().clone();
    assert_eq!(content.len() as u64, body["usage"]["completion_tokens"].as_u64().unwrap());
    let mut text = String::new();
    for entry in &content {
        let token = entry["token"].as_str().unwrap();
        let bytes: Vec<u8> = entry["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
        assert_eq!(bytes, token.as_bytes());
        text.push_str(token);
        let lp = entry["logprob"].as_f64().unwrap();
        let top: Vec<f64> =
            entry["top_logprobs"].as_array().unwrap().iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert_eq!(top.len(), 3);
        assert!(top.windows(2).all(|w| w[0] >= w[1]) && lp <= 0.0 && (lp - top[0]).abs() < 1e-6, "{entry}");
    }
    assert_eq!(text, body["choices"][0]["message"]["content"].as_str().unwrap());
}

/// A request its tenant's quota cannot hold even alone is 403, not a 429
/// that clients would retry forever.
#[tokio::test]
async fn a_request_beyond_the_tenants_quota_is_403_insufficient_quota() {
    let app = app();
    app.engine.set_quota(&TenantId::default_tenant(), Some(1)).await.unwrap();
    let r = post(&app, "/v1/chat/completions", chat_body(&"z".repeat(40), json!({}))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let e = &r.json()["error"];
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("insufficient_quota"), Some("quota_exceeded")));
    assert!(r.headers.get("retry-after").is_none());
}

#[tokio::test]
async fn overload_is_429_with_retry_after_and_failures_are_500_without_internals() {
    let app =
        app_with(EngineConfig { max_running: 1, max_waiting: 1, ..EngineConfig::default() }, ServerConfig::default());
    app.control.step_delay_ms.store(5, Ordering::SeqCst);
    // One request running and one waiting fill the engine; wait for each to be
    // seen by the engine, so the refusal below does not depend on thread timing.
    let spawn_busy = |i: usize| {
        let router = app.router.clone();
        tokio::spawn(async move {
            let body = chat_body(&format!("busy {i}"), json!({"max_tokens": 200, "ignore_eos": true})).to_string();
            let req = Request::post("/v1/chat/completions")
                .header("content-type", "application/json")
                .body(Body::from(body))
                .unwrap();
            router.oneshot(req).await.unwrap().status()
        })
    };
    let running = spawn_busy(0);
    wait_for(&app.engine, |s| s.running == 1).await;
    let waiting = spawn_busy(1);
    wait_for(&app.engine, |s| s.waiting == 1).await;
    let r = post(&app, "/v1/chat/completions", chat_body("one too many", json!({}))).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(running.await.unwrap(), StatusCode::OK);
    assert_eq!(waiting.await.unwrap(), StatusCode::OK);

    let failing = self::app();
    failing.control.fail_at_step.store(2, Ordering::SeqCst);
    let r = post(&failing, "/v1/chat/completions", chat_body("fail", json!({}))).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!r.body.contains("injected"), "internals stay in the log: {}", r.body);
    wait_blocks_back(&failing.engine).await;
}

#[tokio::test]
async fn api_keys_map_to_tenants_that_do_not_see_each_other() {
    let keys = HashMap::from([
        ("key-a".to_owned(), TenantId::new("tenant-a").unwrap()),
        ("key-b".to_owned(), TenantId::new("tenant-b").unwrap()),
    ]);
    let app = app_with(EngineConfig::default(), ServerConfig { api_keys: keys, ..ServerConfig::default() });
    let body = chat_body("hi", json!({"agent_id": "mine"})).to_string();
    let r = call(&app, "POST", "/v1/chat/completions", Some(&body), &[]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = call(&app, "POST", "/v1/chat/completions", Some(&body), &[("authorization", "Bearer wrong")]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = call(&app, "POST", "/v1/chat/completions", Some(&body), &[("authorization", "Bearer key-a")]).await;
    assert_eq!(r.status, StatusCode::OK);
    let a = call(&app, "GET", "/v1/agents", None, &[("authorization", "Bearer key-a")]).await.json();
    let b = call(&app, "GET", "/v1/agents", None, &[("authorization", "Bearer key-b")]).await.json();
    assert_eq!(a["data"][0]["id"], "mine");
    assert_eq!(a["data"][0]["tenant"], "tenant-a");
    assert_eq!(b["data"], json!([]));
    assert_eq!(call(&app, "GET", "/health", None, &[]).await.status, StatusCode::OK, "health needs no key");
}

#[tokio::test]
async fn agents_keep_their_cache_and_can_be_pinned_and_deleted() {
    let app = app();
    let first = post(&app, "/v1/chat/completions", chat_body("first turn", json!({"agent_id": "bot-1"}))).await.json();
    let answer = first["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    let second = json!({
        "model": "fake", "max_tokens": 4, "temperature": 0,
        "messages": [
            {"role": "user", "content": "first turn"},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "second"},
        ],
    });
    let r = call(&app, "POST", "/v1/chat/completions", Some(&second.to_string()), &[("x-agent-id", "bot-1")]).await;
    let cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached >= first["usage"]["prompt_tokens"].as_u64().unwrap(), "second turn reused the first: {cached}");

    let info = call(&app, "GET", "/v1/agents/bot-1", None, &[]).await.json();
    assert_eq!((info["turns"].as_u64(), info["retention"].as_str()), (Some(2), Some("evictable")));
    assert!(info["blocks_held"].as_u64().unwrap() > 0);
    let pinned = call(&app, "POST", "/v1/agents/bot-1/pin", None, &[]).await.json();
    assert_eq!(pinned["retention"], "pinned");
    let ttl =
        call(&app, "PATCH", "/v1/agents/bot-1", Some(r#"{"ttl_seconds": 600, "priority": -2}"#), &[]).await.json();
    assert_eq!((ttl["retention"]["ttl_seconds"].as_u64(), ttl["priority"].as_i64()), (Some(600), Some(-2)));
    let r = call(&app, "PATCH", "/v1/agents/bot-1", Some(r#"{"priority": 1}"#), &[]).await;
    assert_eq!((r.status, r.json()["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("priority")));
    let bad = call(&app, "PATCH", "/v1/agents/bot-1", Some(r#"{"colour": "red"}"#), &[]).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(call(&app, "POST", "/v1/agents/bot-1/unpin", None, &[]).await.json()["retention"], "evictable");
    let del = call(&app, "DELETE", "/v1/agents/bot-1", None, &[]).await;
    assert_eq!(del.json()["deleted"], true);
    assert_eq!(call(&app, "DELETE", "/v1/agents/bot-1", None, &[]).await.status, StatusCode::NOT_FOUND);
    wait_blocks_back(&app.engine).await;
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_cancels_and_frees_its_blocks() {
    let app = app();
    app.control.step_delay_ms.store(2, Ordering::SeqCst);
    let body = chat_body("a long story", json!({"stream": true, "max_tokens": 2000})).to_string();
    let req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    let res = app.router.clone().oneshot(req).await.unwrap();
    let mut body = res.into_body();
    for _ in 0..3 {
        body.frame().await.unwrap().unwrap();
    }
    assert!(app.engine.stats().cache.used_blocks > 0);
    drop(body);
    wait_blocks_back(&app.engine).await;
    assert_eq!(app.engine.stats().finished.cancelled, 1);
}

fn weather_tool() -> Value {
    json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}},
                       "required": ["city"], "additionalProperties": false}
    }}])
}

#[tokio::test]
async fn tool_calls_come_back_as_openai_tool_calls_whole_and_streamed() {
    let app = app();
    let body = chat_body(
        "weather?",
        json!({"tools": weather_tool(), "tool_choice": "required", "parallel_tool_calls": false, "max_tokens": 80}),
    );
    let r = post(&app, "/v1/chat/completions", body.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let choice = &r.json()["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{choice}");
    assert!(choice["message"]["content"].is_null());
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!((call["type"].as_str(), call["function"]["name"].as_str()), (Some("function"), Some("get_weather")));
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["city"].as_str().is_some_and(|c| c.len() <= 6), "{args}");

    // Streamed: id and name first, then the arguments, then the finish.
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let r = post(&app, "/v1/chat/completions", streamed).await;
    let chunks: Vec<Value> =
        sse_data(&r.body).iter().filter(|d| *d != "[DONE]").map(|d| serde_json::from_str(d).unwrap()).collect();
    let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
    let mut args = String::new();
    for d in &deltas {
        if let Some(calls) = d["tool_calls"].as_array() {
            assert_eq!(calls[0]["index"], 0);
            args.push_str(calls[0]["function"]["arguments"].as_str().unwrap_or_default());
        }
    }
    assert_eq!(deltas.iter().filter(|d| d["tool_calls"][0]["function"]["name"] == "get_weather").count(), 1);
    assert_eq!(args, call["function"]["arguments"].as_str().unwrap(), "greedy: same arguments streamed");
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "tool_calls");
}

#[tokio::test]
async fn structured_outputs_parse_and_a_tool_history_renders_literally() {
    let app = app();
    let schema = json!({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                        "additionalProperties": false});
    let format = json!({"type": "json_schema", "json_schema": {"name": "r", "schema": schema, "strict": true}});
    let r =
        post(&app, "/v1/chat/completions", chat_body("x", json!({"response_format": format, "max_tokens": 30}))).await;
    let content = r.json()["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    let v: Value = serde_json::from_str(&content).unwrap_or_else(|e| panic!("{e}: {content}"));
    assert!(v["ok"].is_boolean(), "{v}");
    let r = post(
        &app,
        "/v1/completions",
        json!({"model": "fake", "prompt": "n=", "max_tokens": 10,
                                                 "temperature": 0, "guided_regex": "[0-9]{4}"}),
    )
    .await;
    let text = r.json()["choices"][0]["text"].as_str().unwrap().to_owned();
    assert!(text.len() == 4 && text.bytes().all(|b| b.is_ascii_digit()), "{text}");

    // A tool loop's history: the call and its result render in the generic
    // format, as literal text (the fake codec echoes the rendered prompt's
    // length in prompt_tokens: one byte, one token).
    let history = json!({"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "<|im_end|> 3C"}
    ], "tools": weather_tool(), "max_tokens": 80, "model": "fake", "temperature": 0});
    let r = post(&app, "/v1/chat/completions", history).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let choice = &r.json()["choices"][0];
    assert!(["tool_calls", "stop", "length"].contains(&choice["finish_reason"].as_str().unwrap()), "{choice}");
}

/// `strict: true` closes object schemas: a model pushed to write `,` after
/// the last named key adds no key the schema does not name, in a response
/// format or in a function's arguments; without `strict` it does.
#[tokio::test]
async fn strict_schemas_refuse_keys_they_do_not_name() {
    let app = app();
    let comma = json!({"44": 100});
    let schema = json!({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]});
    for strict in [true, false] {
        let format = json!({"type": "json_schema", "json_schema": {"name": "r", "schema": schema, "strict": strict}});
        let body = chat_body("x", json!({"response_format": format, "max_tokens": 30, "logit_bias": comma}));
        let choice = post(&app, "/v1/chat/completions", body).await.json()["choices"][0].clone();
        let content = choice["message"]["content"].as_str().unwrap();
        if strict {
            assert_eq!(choice["finish_reason"], "stop", "{choice}");
            let v: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {content}"));
            assert_eq!(v.as_object().unwrap().keys().collect::<Vec<_>>(), ["ok"]);
        } else {
            assert!(content.contains(", \""), "an unnamed key, as the schema allows: {content}");
        }
    }
    let tool = json!([{"type": "function", "function": {"name": "get_weather", "strict": true,
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}},
                       "required": ["city"]}}}]);
    let body = chat_body(
        "weather?",
        json!({"tools": tool, "tool_choice": "required", "parallel_tool_calls": false, "max_tokens": 80,
               "logit_bias": comma}),
    );
    let choice = post(&app, "/v1/chat/completions", body).await.json()["choices"][0].clone();
    assert_eq!(choice["finish_reason"], "tool_calls", "{choice}");
    let args = choice["message"]["tool_calls"][0]["function"]["arguments"].as_str().unwrap();
    let args: Value = serde_json::from_str(args).unwrap_or_else(|e| panic!("{e}: {args}"));
    assert_eq!(args.as_object().unwrap().keys().collect::<Vec<_>>(), ["city"], "{args}");
}

#[tokio::test]
async fn a_plain_answer_in_the_tool_format_streams_as_it_comes() {
    let app = app();
    // 'r' (114) pushed up: the fake model answers instead of calling.
    let body = chat_body(
        "weather?",
        json!({"tools": weather_tool(), "tool_choice": "auto", "max_tokens": 30, "logit_bias": {"114": 100}}),
    );
    let whole = post(&app, "/v1/chat/completions", body.clone()).await.json();
    let content = whole["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    assert!(!content.is_empty() && !content.contains('{'), "the answer's text, not the JSON: {whole}");
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let r = post(&app, "/v1/chat/completions", streamed).await;
    let pieces: Vec<String> = sse_data(&r.body)
        .iter()
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["choices"][0]["delta"]["content"].as_str().map(str::to_owned)
        })
        .filter(|c| !c.is_empty())
        .collect();
    assert!(pieces.len() > 3, "streamed piece by piece: {pieces:?}");
    assert_eq!(pieces.concat(), content);
}

/// What a router follows: the events name the blocks a request published
/// in the pool (chained by parent), a reader waiting for news is woken by
/// them, the snapshot lists the same blocks as of its `next`, and a reader
/// from another epoch or too far behind gets 410 `events_gap`.
#[tokio::test]
async fn kv_events_and_the_snapshot_tell_a_router_which_blocks_this_replica_holds() {
    let app = app();
    let start = call(&app, "GET", "/v1/kv/events?since=0", None, &[]).await;
    assert_eq!(start.status, StatusCode::OK, "{}", start.body);
    let start = start.json();
    let since = start["next"].as_u64().unwrap();
    let router = app.router.clone();
    let waiter = tokio::spawn(async move {
        let uri = format!("/v1/kv/events?since={since}&wait_ms=5000");
        let res = router.oneshot(Request::builder().uri(uri).body(Body::empty()).unwrap()).await.unwrap();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice::<Value>(&bytes).unwrap()
    });
    let r =
        post(&app, "/v1/chat/completions", chat_body(&"the tide tables of the northern harbour ".repeat(4), json!({})))
            .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let got = waiter.await.unwrap();
    assert_eq!(got["replica"]["epoch"], start["replica"]["epoch"]);
    let events = got["events"].as_array().unwrap();
    let stored: Vec<&Value> = events.iter().filter(|e| e["type"] == "stored" && e["tier"] == "pool").collect();
    assert!(stored.len() >= 4, "{got}");
    for pair in stored.windows(2) {
        assert_eq!(pair[1]["parent"], pair[0]["hash"], "a prompt's blocks chain by parent: {got}");
    }
    assert!(stored.iter().all(|e| e["hash"].as_str().is_some_and(|h| h.len() == 32)));
    let snap = call(&app, "GET", "/v1/kv/snapshot", None, &[]).await.json();
    assert_eq!(snap["replica"]["block_size"], 16);
    assert_eq!(snap["replica"]["namespacing"], "model+tenant");
    assert!(!snap["replica"]["model_fingerprint"].as_str().unwrap().is_empty());
    assert!(snap["next"].as_u64().unwrap() >= got["next"].as_u64().unwrap());
    let held: Vec<&Value> =
        snap["blocks"].as_array().unwrap().iter().filter(|b| b["tier"] == "pool").map(|b| &b["hash"]).collect();
    assert!(stored.iter().all(|e| held.contains(&&e["hash"])), "the snapshot holds what the events stored: {snap}");
    assert!(snap["load"]["total_blocks"].as_u64().unwrap() > 0);
    let ahead = snap["next"].as_u64().unwrap() + 100;
    let gap = call(&app, "GET", &format!("/v1/kv/events?since={ahead}"), None, &[]).await;
    assert_eq!(gap.status, StatusCode::GONE, "{}", gap.body);
    assert_eq!(gap.json()["error"]["code"], "events_gap");
}

/// The events describe every tenant's cache: with API keys they want the
/// metrics key, as `/metrics` does.
#[tokio::test]
async fn kv_events_and_snapshot_are_guarded_like_metrics() {
    let keys = HashMap::from([("k1".to_owned(), TenantId::new("t1").unwrap())]);
    let config = ServerConfig { api_keys: keys, metrics_key: Some("mk".into()), ..ServerConfig::default() };
    let app = app_with(EngineConfig::default(), config);
    for uri in ["/v1/kv/events?since=0", "/v1/kv/snapshot"] {
        assert_eq!(call(&app, "GET", uri, None, &[]).await.status, StatusCode::UNAUTHORIZED, "{uri}");
        assert_eq!(
            call(&app, "GET", uri, None, &[("authorization", "Bearer k1")]).await.status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            call(&app, "GET", uri, None, &[("authorization", "Bearer mk")]).await.status,
            StatusCode::OK,
            "{uri}"
        );
    }
}

/// Handing an agent over needs a tier other replicas share: without one it
/// is refused (400) and the agent stays; an unknown agent is 404.
#[tokio::test]
async fn hand_over_needs_a_shared_tier_and_a_known_agent() {
    let app = app();
    let r = call(&app, "POST", "/v1/agents/nobody/hand-over", None, &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    let r = post(&app, "/v1/chat/completions", chat_body("hello there", json!({"agent_id": "stays"}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = call(&app, "POST", "/v1/agents/stays/hand-over", None, &[]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(r.body.contains("shared tier"), "{}", r.body);
    assert_eq!(call(&app, "GET", "/v1/agents/stays", None, &[]).await.status, StatusCode::OK, "still here");
}

/// The legacy completions shape lm-evaluation-harness's `local-completions`
/// scores with: prompts as token-id lists in a batch, `echo`, integer
/// `logprobs`, `max_tokens` 1 and 0. It reads `token_logprobs[ctxlen:-1]`
/// and compares each with `max(top_logprobs[i].values())` for greediness.
#[tokio::test]
async fn legacy_completions_echo_logprobs_and_batches_as_lm_eval_reads_them() {
    let app = app();
    let ids = |s: &str| s.bytes().map(u32::from).collect::<Vec<_>>();
    let (context, continuation) = (ids("the tide is "), ids("out"));
    let whole: Vec<u32> = context.iter().chain(&continuation).copied().collect();
    let body = json!({"model": "fake", "prompt": [whole.clone(), ids("sea")], "echo": true,
                      "logprobs": 1, "max_tokens": 1, "temperature": 0});
    let r = post(&app, "/v1/completions", body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v = r.json();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!((choices[0]["index"].clone(), choices[1]["index"].clone()), (json!(0), json!(1)));
    let lp = &choices[0]["logprobs"];
    let token_logprobs = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(token_logprobs.len(), whole.len() + 1, "the prompt's tokens, then the one generated");
    assert!(token_logprobs[0].is_null() && token_logprobs[1..].iter().all(Value::is_number));
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens[..whole.len()].iter().map(|t| t.as_str().unwrap()).collect::<String>(), "the tide is out");
    assert!(choices[0]["text"].as_str().unwrap().starts_with("the tide is out"), "echoed");
    let ctxlen = context.len();
    let top = lp["top_logprobs"].as_array().unwrap();
    for i in ctxlen..whole.len() {
        let best = top[i].as_object().unwrap().values().map(|x| x.as_f64().unwrap()).fold(f64::MIN, f64::max);
        assert!(token_logprobs[i].as_f64().unwrap() <= best, "position {i}");
    }
    let offsets: Vec<u64> = lp["text_offset"].as_array().unwrap().iter().map(|o| o.as_u64().unwrap()).collect();
    assert_eq!(&offsets[..3], &[0, 1, 2]);
    assert_eq!(v["usage"]["prompt_tokens"], json!(whole.len() + 3));

    // The same echo with max_tokens 0: the prompt alone, same numbers.
    let body = json!({"model": "fake", "prompt": whole.clone(), "echo": true, "logprobs": 1, "max_tokens": 0});
    let v = post(&app, "/v1/completions", body).await.json();
    let zero = &v["choices"][0];
    assert_eq!(zero["text"], "the tide is out");
    assert_eq!(zero["logprobs"]["token_logprobs"].as_array().unwrap()[..], token_logprobs[..whole.len()]);
    assert_eq!(v["usage"]["completion_tokens"], 0);

    // What stays refused, said clearly.
    for (extra, param) in [
        (json!({"logprobs": 21}), "logprobs"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"echo": true, "stream": true}), "stream"),
        (json!({"prompt": []}), "prompt"),
    ] {
        let mut body = json!({"model": "fake", "prompt": "x"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let r = post(&app, "/v1/completions", body).await;
        assert_eq!((r.status, r.json()["error"]["param"].clone()), (StatusCode::BAD_REQUEST, json!(param)));
    }
}

/// Speculative decoding shows in the usage as OpenAI shows predicted
/// outputs, a request opts out with `"speculative": false` (same answer),
/// and a wrong type is a 400.
#[tokio::test]
async fn drafted_tokens_show_in_the_usage_and_a_request_may_opt_out() {
    let app = app();
    let text = "abc abc abc abc abc abc abc abc abc abc";
    let on = post(&app, "/v1/chat/completions", chat_body(text, json!({"max_tokens": 32}))).await;
    assert_eq!(on.status, StatusCode::OK, "{}", on.body);
    let details = &on.json()["usage"]["completion_tokens_details"];
    let drafted = details["accepted_prediction_tokens"].as_u64().unwrap()
        + details["rejected_prediction_tokens"].as_u64().unwrap();
    assert!(drafted > 0, "the prompt's repeats were drafted: {}", on.body);
    let off =
        post(&app, "/v1/chat/completions", chat_body(text, json!({"max_tokens": 32, "speculative": false}))).await;
    assert_eq!(off.status, StatusCode::OK, "{}", off.body);
    assert_eq!(off.json()["choices"][0]["message"]["content"], on.json()["choices"][0]["message"]["content"]);
    assert_eq!(
        off.json()["usage"]["completion_tokens_details"],
        json!({"accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0})
    );
    let bad = post(&app, "/v1/chat/completions", chat_body(text, json!({"speculative": "yes"}))).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.body);
    let m = call(&app, "GET", "/metrics", None, &[]).await.body;
    assert!(m.contains(&format!("kvserve_speculative_drafted_tokens_total {drafted}")), "{m}");
    let value = |name: &str| -> f64 {
        let line = m.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name}: {m}"));
        line[name.len() + 1..].parse().unwrap()
    };
    let accepted = details["accepted_prediction_tokens"].as_f64().unwrap();
    let checks = value("kvserve_speculative_verifications_total");
    assert!(checks >= 1.0, "{m}");
    assert_eq!(value("kvserve_speculative_acceptance_rate"), accepted / drafted as f64);
    assert_eq!(value("kvserve_speculative_tokens_per_step"), (checks + accepted) / checks);
}
