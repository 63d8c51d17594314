//! The Responses API on the fake model: chains and their stored items,
//! tenant isolation, pagination, the streaming events' order, and what is
//! refused. The official client against the real model is in
//! `kvserve/tests/openai_responses.py`.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use engine::testing::{FakeCodec, FakeModel};
use engine::{EngineConfig, TenantId};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use server::ServerConfig;
use tower::ServiceExt;

fn app() -> Router {
    let (model, _) = FakeModel::new(16, 256);
    let config = EngineConfig {
        model_name: "fake".into(),
        default_timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    };
    let engine = engine::start(Box::new(model), Arc::new(FakeCodec::new()), config).unwrap();
    let keys = HashMap::from([
        ("key-a".to_owned(), TenantId::new("a").unwrap()),
        ("key-b".to_owned(), TenantId::new("b").unwrap()),
    ]);
    server::router(engine, ServerConfig { api_keys: keys, ..ServerConfig::default() })
}

async fn call(app: &Router, method: &str, uri: &str, key: &str, body: Option<Value>) -> (StatusCode, String) {
    let mut req = Request::builder().method(method).uri(uri).header("authorization", format!("Bearer {key}"));
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req.body(Body::from(body.map(|b| b.to_string()).unwrap_or_default())).unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

async fn create(app: &Router, key: &str, body: Value) -> Value {
    let (status, text) = call(app, "POST", "/v1/responses", key, Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn body(input: Value, previous: Option<&Value>) -> Value {
    json!({"model": "fake", "input": input, "instructions": "Be brief.", "max_output_tokens": 4,
           "temperature": 0, "previous_response_id": previous.map(|p| p["id"].clone())})
}

#[tokio::test]
async fn a_chain_is_stored_per_tenant_and_continues_with_its_context() {
    let app = app();
    let first = create(&app, "key-a", body(json!("hello there"), None)).await;
    assert_eq!(first["object"], "response");
    assert_eq!(first["status"], "incomplete", "four tokens of the fake model: {first}");
    assert_eq!(first["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(first["output"][0]["type"], "message");
    let second = create(&app, "key-a", body(json!("and again"), Some(&first))).await;
    assert_eq!(second["previous_response_id"], first["id"]);
    let (input, output) =
        (first["usage"]["input_tokens"].as_u64().unwrap(), first["usage"]["output_tokens"].as_u64().unwrap());
    let cached = second["usage"]["input_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(
        cached + 16 >= input + output - 1,
        "the chain's agent kept its K/V: cached {cached}, previous {input}+{output}"
    );
    // The chain's agent is named after its first response.
    let (status, agent) =
        call(&app, "GET", &format!("/v1/agents/{}", first["id"].as_str().unwrap()), "key-a", None).await;
    assert_eq!(status, StatusCode::OK, "{agent}");

    // Another tenant sees none of it: 404, not 403.
    let id = second["id"].as_str().unwrap();
    for (method, uri) in [
        ("GET", format!("/v1/responses/{id}")),
        ("GET", format!("/v1/responses/{id}/input_items")),
        ("DELETE", format!("/v1/responses/{id}")),
    ] {
        let (status, text) = call(&app, method, &uri, "key-b", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {uri}: {text}");
    }
    let (status, text) = call(&app, "POST", "/v1/responses", "key-b", Some(body(json!("hi"), Some(&second)))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{text}");
    assert!(text.contains("previous_response_id"), "{text}");

    let (status, got) = call(&app, "GET", &format!("/v1/responses/{id}"), "key-a", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_str::<Value>(&got).unwrap(), second);
    let (status, _) = call(&app, "DELETE", &format!("/v1/responses/{id}"), "key-a", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(call(&app, "GET", &format!("/v1/responses/{id}"), "key-a", None).await.0, StatusCode::NOT_FOUND);
    assert_eq!(call(&app, "DELETE", &format!("/v1/responses/{id}"), "key-a", None).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn input_items_are_listed_in_pages_both_ways() {
    let app = app();
    let items: Vec<Value> = (0..5).map(|i| json!({"role": "user", "content": format!("item {i}")})).collect();
    let r = create(&app, "key-a", body(Value::Array(items), None)).await;
    let id = r["id"].as_str().unwrap();
    let page = |q: String| {
        let app = app.clone();
        let uri = format!("/v1/responses/{id}/input_items{q}");
        async move {
            let (status, text) = call(&app, "GET", &uri, "key-a", None).await;
            assert_eq!(status, StatusCode::OK, "{text}");
            serde_json::from_str::<Value>(&text).unwrap()
        }
    };
    let texts = |v: &Value| -> Vec<String> {
        v["data"].as_array().unwrap().iter().map(|i| i["content"][0]["text"].as_str().unwrap().to_owned()).collect()
    };
    let newest = page("?limit=2".into()).await;
    assert_eq!(texts(&newest), ["item 4", "item 3"], "newest first by default");
    assert_eq!(newest["has_more"], true);
    let after = newest["last_id"].as_str().unwrap().to_owned();
    let next = page(format!("?limit=2&after={after}")).await;
    assert_eq!(texts(&next), ["item 2", "item 1"]);
    let asc = page("?order=asc&limit=100".into()).await;
    assert_eq!(texts(&asc).len(), 5);
    assert_eq!(asc["has_more"], false);
    let (status, _) = call(&app, "GET", &format!("/v1/responses/{id}/input_items?limit=0"), "key-a", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_stream_sends_the_events_in_order_and_store_false_keeps_nothing() {
    let app = app();
    let mut b = body(json!("hello"), None);
    b["stream"] = json!(true);
    b["store"] = json!(false);
    let (status, text) = call(&app, "POST", "/v1/responses", "key-a", Some(b)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let events: Vec<Value> =
        text.lines().filter_map(|l| l.strip_prefix("data: ")).map(|d| serde_json::from_str(d).unwrap()).collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds[..4],
        ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    );
    assert_eq!(
        kinds[kinds.len() - 4..],
        ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.incomplete"]
    );
    assert!(kinds.contains(&"response.output_text.delta"));
    let numbers: Vec<u64> = events.iter().map(|e| e["sequence_number"].as_u64().unwrap()).collect();
    assert!(numbers.iter().enumerate().all(|(i, &n)| n == i as u64), "{numbers:?}");
    let deltas: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    let last = events.last().unwrap();
    assert_eq!(last["response"]["output"][0]["content"][0]["text"], deltas);
    let id = last["response"]["id"].as_str().unwrap();
    assert_eq!(
        call(&app, "GET", &format!("/v1/responses/{id}"), "key-a", None).await.0,
        StatusCode::NOT_FOUND,
        "store: false"
    );
}

#[tokio::test]
async fn bad_items_and_fields_are_openai_shaped_400s_and_a_huge_input_a_413() {
    let app = app();
    for (input, extra, param) in [
        (json!([{"type": "bogus"}]), json!({}), "input"),
        (json!([{"type": "function_call_output", "call_id": "call_x", "output": "y"}]), json!({}), "input"),
        (json!([{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]), json!({}), "input"),
        (json!("hi"), json!({"background": true}), "background"),
        (json!("hi"), json!({"reasoning": {"effort": "high"}}), "reasoning"),
        (json!("hi"), json!({"tools": [{"type": "file_search"}]}), "tools"),
        (json!("hi"), json!({"text": {"format": {"type": "yaml"}}}), "text"),
        (json!("hi"), json!({"max_output_tokens": 0}), "max_output_tokens"),
    ] {
        let mut b = body(input, None);
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        let (status, text) = call(&app, "POST", "/v1/responses", "key-a", Some(b.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{b}: {text}");
        let e: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(e["error"]["param"], param, "{text}");
        assert_eq!(e["error"]["type"], "invalid_request_error");
    }
    // Sent empty, as clients send them: accepted.
    let mut b = body(json!("hi"), None);
    b["reasoning"] = Value::Null;
    b["background"] = json!(false);
    b["include"] = json!([]);
    assert_eq!(call(&app, "POST", "/v1/responses", "key-a", Some(b)).await.0, StatusCode::OK);
    let huge = body(json!("x".repeat(10 << 20)), None);
    let (status, text) = call(&app, "POST", "/v1/responses", "key-a", Some(huge)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{}", &text[..text.len().min(200)]);
}

/// Conversations: per tenant, responses in one append their items and run
/// on its agent, concurrent responses both land, and deleting it deletes
/// the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_keep_items_per_tenant_and_their_agent_goes_with_them() {
    let app = app();
    let (status, text) = call(
        &app,
        "POST",
        "/v1/conversations",
        "key-a",
        Some(json!({"metadata": {"k": "v"}, "items": [{"role": "user", "content": "hi"}]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let conv: Value = serde_json::from_str(&text).unwrap();
    let id = conv["id"].as_str().unwrap().to_owned();
    assert_eq!(conv["object"], "conversation");
    for (method, uri) in [
        ("GET", format!("/v1/conversations/{id}")),
        ("GET", format!("/v1/conversations/{id}/items")),
        ("DELETE", format!("/v1/conversations/{id}")),
    ] {
        assert_eq!(call(&app, method, &uri, "key-b", None).await.0, StatusCode::NOT_FOUND, "{method} {uri}");
    }
    let (status, _) =
        call(&app, "POST", "/v1/responses", "key-b", Some(json!({"model": "fake", "input": "x", "conversation": id})))
            .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Two responses at once in the conversation: both append their input
    // and output.
    let ask = |text: &'static str| {
        let (app, id) = (app.clone(), id.clone());
        tokio::spawn(async move {
            create(&app, "key-a", json!({"model": "fake", "input": text, "conversation": id, "max_output_tokens": 3}))
                .await
        })
    };
    let (one, two) = (ask("one"), ask("two"));
    let (one, two) = (one.await.unwrap(), two.await.unwrap());
    assert_eq!(one["conversation"]["id"], id.as_str());
    assert_eq!(two["conversation"]["id"], id.as_str());
    let (_, text) = call(&app, "GET", &format!("/v1/conversations/{id}/items?order=asc"), "key-a", None).await;
    let items: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(items["data"].as_array().unwrap().len(), 5, "the first item, then two inputs and two outputs: {items}");
    let (status, _) = call(&app, "GET", &format!("/v1/agents/{id}"), "key-a", None).await;
    assert_eq!(status, StatusCode::OK, "the conversation's agent");
    let bad = json!({"model": "fake", "input": "x", "conversation": id, "previous_response_id": one["id"]});
    assert_eq!(call(&app, "POST", "/v1/responses", "key-a", Some(bad)).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(call(&app, "DELETE", &format!("/v1/conversations/{id}"), "key-a", None).await.0, StatusCode::OK);
    assert_eq!(
        call(&app, "GET", &format!("/v1/agents/{id}"), "key-a", None).await.0,
        StatusCode::NOT_FOUND,
        "its agent went with it"
    );
    assert_eq!(call(&app, "GET", &format!("/v1/conversations/{id}"), "key-a", None).await.0, StatusCode::NOT_FOUND);
}
