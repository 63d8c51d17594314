//! Over a real socket with the default model (fetched on first use): a
//! sensible answer, well-formed streaming, an agent's second turn served
//! from cache, 32 concurrent clients all served or cleanly refused, a
//! disconnect that frees its blocks, a bounded graceful shutdown, and a
//! strict structured answer that ends within a small budget.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::{EngineConfig, EngineHandle};
use futures_util::StreamExt;
use kv::KvDType;
use model::{MatmulPath, PagedLlama};
use serde_json::{json, Value};
use server::ServerConfig;

const MODEL: &str = "smollm2";

type Started = (String, EngineHandle, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<std::io::Result<()>>);

async fn start() -> Started {
    start_with(|_| ()).await.0
}

/// The server, and what `inspect` read from the model's text codec.
async fn start_with<T: Send + 'static>(inspect: impl FnOnce(&model::LlamaText) -> T + Send + 'static) -> (Started, T) {
    let (model, text) = tokio::task::spawn_blocking(|| {
        let path = model::fetch::ensure_default_model(&mut |_| {}).unwrap();
        PagedLlama::open(&path, model::KvSizing::new(16, 1024, KvDType::F16), MatmulPath::from_env().unwrap()).unwrap()
    })
    .await
    .unwrap();
    let seen = inspect(&text);
    let config = EngineConfig {
        model_name: MODEL.into(),
        max_running: 16,
        max_waiting: 24,
        default_timeout: Some(Duration::from_secs(300)),
        ..EngineConfig::default()
    };
    let engine = engine::start(Box::new(model), Arc::new(text), config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = server::router(engine.clone(), ServerConfig::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        let _ = stopped.await;
    };
    let task = tokio::spawn(server::serve(
        listener,
        app,
        engine.clone(),
        signal,
        Duration::from_secs(5),
        server::conn::Limits::default(),
    ));
    ((base, engine, stop, task), seen)
}

fn chat(messages: Value, extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "messages": messages, "max_tokens": 24, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

async fn wait_blocks_back(engine: &EngineHandle) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = engine.stats();
        if s.running == 0 && s.waiting == 0 && s.cache.used_blocks == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "blocks never came back: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_over_a_real_socket_with_the_default_model() {
    let (base, engine, stop, task) = start().await;
    let http = reqwest::Client::new();
    let url = format!("{base}/v1/chat/completions");
    let system = json!({"role": "system", "content": "You are a helpful assistant."});
    // Clear-cut: without "Answer in one sentence." the first token is a
    // 0.04-nat tie ("The" / "La") that a change of summation order flips.
    let question = json!({"role": "user", "content": "What is the capital of France? Answer in one sentence."});

    // A sensible answer.
    let v: Value =
        http.post(&url).json(&chat(json!([system, question]), json!({}))).send().await.unwrap().json().await.unwrap();
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    assert!(answer.contains("Paris"), "{answer:?}");

    // Streaming: every chunk parses, the text matches, [DONE] ends it.
    let body = chat(json!([system, question]), json!({"stream": true, "stream_options": {"include_usage": true}}));
    let res = http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(*data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    let streamed: String =
        chunks.iter().filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str().map(str::to_owned)).collect();
    // Part of the prompt now comes from the cache, so the prefill runs fewer
    // rows; greedy output must not notice (docs/operations.md: "Reproducibility").
    assert_eq!(streamed, answer, "the streamed answer, prefix from the cache, equals the cold one");
    assert!(chunks.iter().any(|c| c["choices"].get(0).is_some_and(|ch| ch["finish_reason"].is_string())));
    assert!(chunks.last().unwrap()["usage"]["total_tokens"].as_u64().unwrap() > 0);

    // An agent's second turn reports cached tokens.
    let first = chat(json!([system, question]), json!({"agent_id": "e2e-agent"}));
    let v: Value = http.post(&url).json(&first).send().await.unwrap().json().await.unwrap();
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let reply = v["choices"][0]["message"]["content"].clone();
    let follow = json!({"role": "user", "content": "And of Germany?"});
    let second = chat(json!([system, question, {"role": "assistant", "content": reply}, follow]), json!({}));
    let v: Value =
        http.post(&url).header("x-agent-id", "e2e-agent").json(&second).send().await.unwrap().json().await.unwrap();
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached >= prompt_tokens, "the second turn reused the first ({cached} of {prompt_tokens})");
    let del = http.delete(format!("{base}/v1/agents/e2e-agent")).send().await.unwrap();
    assert_eq!(del.status(), 200);

    // 32 concurrent clients: each served, or refused with 429 + Retry-After.
    let clients: Vec<_> = (0..32)
        .map(|i| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                let msg = json!([{"role": "user", "content": format!("Say a number: {i}")}]);
                let res = http.post(&url).json(&chat(msg, json!({"max_tokens": 6}))).send().await.unwrap();
                let status = res.status().as_u16();
                let retry = res.headers().contains_key("retry-after");
                let body: Value = res.json().await.unwrap();
                (status, retry, body)
            })
        })
        .collect();
    let mut served = 0;
    for c in clients {
        let (status, retry, body) = c.await.unwrap();
        match status {
            200 => {
                assert!(body["usage"]["completion_tokens"].as_u64().unwrap() > 0);
                served += 1;
            }
            429 => assert!(retry && body["error"]["code"] == "overloaded", "{body}"),
            other => panic!("status {other}: {body}"),
        }
    }
    assert!(served >= 24, "{served} of 32 served");

    // A client that disconnects mid-stream cancels its generation.
    let story = json!([{"role": "user", "content": "Write a very long story about the sea."}]);
    let body = chat(story, json!({"stream": true, "max_tokens": 1000, "ignore_eos": true}));
    let res = http.post(&url).json(&body).send().await.unwrap();
    let mut bytes = res.bytes_stream();
    for _ in 0..3 {
        bytes.next().await.unwrap().unwrap();
    }
    assert!(engine.stats().running == 1);
    drop(bytes);
    wait_blocks_back(&engine).await;
    assert!(engine.stats().finished.cancelled >= 1);

    // Metrics over the socket.
    let metrics = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("kvserve_prompt_tokens_cached_total"));

    // Graceful shutdown with a request in flight: bounded, and it ends.
    let long = json!([{"role": "user", "content": "Count to a thousand."}]);
    let res = http
        .post(&url)
        .json(&chat(long, json!({"stream": true, "max_tokens": 3000, "ignore_eos": true})))
        .send()
        .await
        .unwrap();
    let t = Instant::now();
    stop.send(()).unwrap();
    let rest = res.text().await.unwrap();
    assert!(
        rest.ends_with("data: [DONE]\n\n"),
        "the stream ended properly: {:?}",
        &rest[rest.len().saturating_sub(200)..]
    );
    tokio::time::timeout(Duration::from_secs(20), task).await.unwrap().unwrap().unwrap();
    assert!(t.elapsed() < Duration::from_secs(20));
    assert!(engine.is_stopped());
}

/// A strict structured answer on the default model ends within 96 tokens
/// at temperature 0. Unbounded, the model wrote `"population_millions":
/// 1111…` and, with `strict` not closing the object, invented key after
/// key until `max_tokens` cut it with `length`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_city_schema_ends_within_96_tokens_on_the_default_model() {
    let (base, _engine, stop, task) = start().await;
    let http = reqwest::Client::new();
    let url = format!("{base}/v1/chat/completions");
    let city = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "country": {"type": "string"},
            "population_millions": {"type": "number"}
        },
        "required": ["name", "country", "population_millions"]
    });
    let format = json!({"type": "json_schema", "json_schema": {"name": "City", "schema": city, "strict": true}});
    for prompt in ["Give me a large city in France, as JSON.", "Describe Paris as JSON."] {
        let body =
            chat(json!([{"role": "user", "content": prompt}]), json!({"response_format": format, "max_tokens": 96}));
        let v: Value = http.post(&url).json(&body).send().await.unwrap().json().await.unwrap();
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "stop", "{prompt}: {v}");
        let content = choice["message"]["content"].as_str().unwrap();
        let city: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {content}"));
        let mut keys: Vec<&String> = city.as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(keys, ["country", "name", "population_millions"], "{content}");
        assert!(city["population_millions"].is_number(), "{content}");
        eprintln!("{prompt} -> {content} ({} tokens)", v["usage"]["completion_tokens"]);
    }
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// Two concurrent multi-megabyte prompts once kept `/health` waiting 1.6 s:
/// rendering and tokenizing ran on the HTTP worker threads. Now they run on
/// a bounded blocking pool; prompts just under the byte cut-off (so they
/// really are tokenized, then refused as too long in tokens) must not hold
/// up `/health`, and prompts past it are refused before tokenizing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_while_two_near_cutoff_prompts_tokenize() {
    use model::TextCodec;
    let ((base, engine, stop, task), max_token_bytes) = start_with(|t| t.max_token_bytes()).await;
    let limit = engine.limits().max_request_tokens();
    let cutoff = limit * max_token_bytes;
    // " a" is one token per two bytes: far more tokens than the limit, in
    // fewer bytes than the cut-off (and than the 4 MiB body limit).
    let bytes = (cutoff - 1).min(3 << 20) & !1;
    assert!(bytes / 2 > limit, "the prompt must be too long only once tokenized");
    let prompt = " a".repeat(bytes / 2);
    let http = reqwest::Client::new();
    let url = format!("{base}/v1/completions");
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 1}).to_string();
    let send = |body: String| {
        let (http, url) = (http.clone(), url.clone());
        tokio::spawn(async move {
            let r = http.post(&url).header("content-type", "application/json").body(body).send().await.unwrap();
            (r.status(), r.text().await.unwrap())
        })
    };
    let heavy = [send(body.clone()), send(body)];
    let mut during = Vec::new();
    while heavy.iter().any(|h| !h.is_finished()) {
        let t = Instant::now();
        let r = http.get(format!("{base}/health")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        if heavy.iter().any(|h| !h.is_finished()) {
            during.push(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for h in heavy {
        let (status, text) = h.await.unwrap();
        assert_eq!(status, 400, "{}", &text[..text.len().min(300)]);
        assert!(text.contains("context_length_exceeded"), "{}", &text[..text.len().min(300)]);
    }
    let worst = during.iter().max().copied().unwrap_or_default();
    eprintln!("/health answered {} times while tokenizing {bytes} bytes twice; worst {worst:?}", during.len());
    assert!(during.len() >= 2, "the prompts were tokenized while /health was asked ({} answers)", during.len());
    // Coarse (the target is under 100 ms; the bug was 1.6 s): a loaded CI
    // machine must not make this flaky.
    assert!(worst < Duration::from_secs(1), "/health waited {worst:?}");

    // Past the cut-off: refused by length alone.
    let past = json!({"model": MODEL, "prompt": "a".repeat(cutoff.min(4 << 20) + 1), "max_tokens": 1});
    let body = past.to_string();
    if body.len() < 4 << 20 {
        let r = http.post(&url).header("content-type", "application/json").body(body).send().await.unwrap();
        assert_eq!(r.status(), 400);
    }
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
