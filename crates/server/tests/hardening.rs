//! What a hostile client or a web page tried against the router, each test
//! named after the hole it keeps closed (the connection-level cases, which
//! need real sockets, are in `hostile.rs`).

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use engine::testing::{FakeCodec, FakeModel};
use engine::{EngineConfig, EngineHandle, TenantId};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use server::ServerConfig;
use tower::ServiceExt;

struct App {
    router: Router,
    engine: EngineHandle,
}

fn app_with(engine_config: EngineConfig, server_config: ServerConfig) -> App {
    let (model, _) = FakeModel::new(16, 256);
    let config =
        EngineConfig { model_name: "fake".into(), default_timeout: Some(Duration::from_secs(30)), ..engine_config };
    let engine = engine::start(Box::new(model), Arc::new(FakeCodec::new()), config).unwrap();
    App { router: server::router(engine.clone(), server_config), engine }
}

fn app() -> App {
    app_with(EngineConfig::default(), ServerConfig::default())
}

fn keyed() -> ServerConfig {
    let keys = HashMap::from([
        ("key-a".to_owned(), TenantId::new("a").unwrap()),
        ("key-b".to_owned(), TenantId::new("b").unwrap()),
    ]);
    ServerConfig { api_keys: keys, ..ServerConfig::default() }
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

    fn error(&self) -> Value {
        self.json()["error"].clone()
    }
}

/// One request with exactly these headers (no content type added).
async fn raw(app: &App, method: &str, uri: &str, body: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Body::from(body.to_owned())).unwrap();
    let res = app.router.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    Reply { status: parts.status, headers: parts.headers, body: String::from_utf8_lossy(&bytes).into_owned() }
}

const JSON: (&str, &str) = ("content-type", "application/json");

async fn chat(app: &App, body: &Value, headers: &[(&str, &str)]) -> Reply {
    let mut h = vec![JSON];
    h.extend_from_slice(headers);
    raw(app, "POST", "/v1/chat/completions", &body.to_string(), &h).await
}

fn chat_body(content: &str, extra: Value) -> Value {
    let mut body =
        json!({"model": "fake", "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test]
async fn a_cross_origin_text_plain_post_is_refused_415() {
    let app = app();
    let body = chat_body("hi", json!({})).to_string();
    for ct in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"] {
        let r = raw(&app, "POST", "/v1/chat/completions", &body, &[("content-type", ct)]).await;
        assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct}: {}", r.body);
        assert_eq!(r.error()["type"], "invalid_request_error");
    }
    let r = raw(&app, "POST", "/v1/chat/completions", &body, &[]).await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "no content type at all");
    let r =
        raw(&app, "POST", "/v1/chat/completions", &body, &[("content-type", "application/json; charset=utf-8")]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

#[tokio::test]
async fn dns_rebinding_a_forged_host_cannot_reach_an_open_server() {
    let app = app_with(
        EngineConfig::default(),
        ServerConfig { allowed_hosts: vec!["box.lan".into()], ..ServerConfig::default() },
    );
    for host in ["attacker.example", "attacker.example:8000", "localhost.attacker.example", "127.0.0.1.nip.io"] {
        let r = raw(&app, "GET", "/v1/agents", "", &[("host", host)]).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{host}: {}", r.body);
        assert_eq!(r.error()["type"], "permission_error");
    }
    for host in ["localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "box.lan", "BOX.LAN:80"] {
        let r = raw(&app, "GET", "/v1/agents", "", &[("host", host)]).await;
        assert_eq!(r.status, StatusCode::OK, "{host}: {}", r.body);
    }
    // With keys, the keys guard the API: any name, but a key.
    let app = app_with(EngineConfig::default(), keyed());
    let r = raw(&app, "GET", "/v1/agents", "", &[("host", "api.example.com"), ("authorization", "Bearer key-a")]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = raw(&app, "GET", "/v1/agents", "", &[("host", "api.example.com")]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn no_cors_headers_unless_origins_are_named() {
    let app = app();
    let r = raw(&app, "GET", "/v1/models", "", &[("origin", "https://evil.example")]).await;
    assert!(r.headers.get("access-control-allow-origin").is_none(), "{:?}", r.headers);
    let preflight = [
        ("origin", "https://evil.example"),
        ("access-control-request-method", "POST"),
        ("access-control-request-headers", "content-type"),
    ];
    let r = raw(&app, "OPTIONS", "/v1/chat/completions", "", &preflight).await;
    assert!(r.headers.get("access-control-allow-origin").is_none(), "{:?}", r.headers);

    let app = app_with(
        EngineConfig::default(),
        ServerConfig { cors_origins: vec!["https://app.example".into()], ..ServerConfig::default() },
    );
    let r = raw(&app, "GET", "/v1/models", "", &[("origin", "https://app.example")]).await;
    assert_eq!(r.headers.get("access-control-allow-origin").unwrap(), "https://app.example");
    let r = raw(&app, "GET", "/v1/models", "", &[("origin", "https://evil.example")]).await;
    assert!(r.headers.get("access-control-allow-origin").is_none());

    // `*` is any origin (tower-http panics on `*` in a list).
    let app =
        app_with(EngineConfig::default(), ServerConfig { cors_origins: vec!["*".into()], ..ServerConfig::default() });
    let r = raw(&app, "GET", "/v1/models", "", &[("origin", "https://any.example")]).await;
    assert_eq!(r.headers.get("access-control-allow-origin").unwrap(), "*");
}

/// A body-less cross-site POST needs no preflight and no content type: the
/// `Origin` a browser sends is what gives it away.
#[tokio::test]
async fn a_web_page_cannot_pin_or_unpin_agents_with_a_simple_post() {
    let app = app();
    let first = chat(&app, &chat_body("hi", json!({"agent_id": "mine"})), &[]).await;
    assert_eq!(first.status, StatusCode::OK);
    let evil = [("origin", "https://evil.example")];
    for path in ["/v1/agents/mine/pin", "/v1/agents/mine/unpin"] {
        let r = raw(&app, "POST", path, "", &evil).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}: {}", r.body);
    }
    let r = raw(&app, "DELETE", "/v1/agents/mine", "", &evil).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // Reading is not changing: a GET with an Origin is answered (CORS keeps
    // the page from reading it).
    assert_eq!(raw(&app, "GET", "/v1/models", "", &evil).await.status, StatusCode::OK);
    // Clients that are not browsers send no Origin.
    assert_eq!(raw(&app, "POST", "/v1/agents/mine/pin", "", &[]).await.status, StatusCode::OK);

    let app = app_with(
        EngineConfig::default(),
        ServerConfig { cors_origins: vec!["https://app.example".into()], ..ServerConfig::default() },
    );
    let r = chat(&app, &chat_body("hi", json!({})), &[("origin", "https://app.example")]).await;
    assert_eq!(r.status, StatusCode::OK, "a named origin may: {}", r.body);
    let r = chat(&app, &chat_body("hi", json!({})), &[("origin", "https://other.example")]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[test]
fn cors_origins_are_checked_at_start_up() {
    for ok in ["*", "https://app.example.com", "http://localhost:3000"] {
        assert!(server::check_cors_origin(ok).is_ok(), "{ok}");
    }
    for bad in ["app.example.com", "https://app.example.com/", "ftp://x", "https://", "https://a b"] {
        assert!(server::check_cors_origin(bad).is_err(), "{bad}");
    }
}

#[tokio::test]
async fn a_wrong_method_and_an_undecodable_path_answer_in_the_openai_error_shape() {
    let app = app();
    let r = raw(&app, "GET", "/v1/chat/completions", "", &[]).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(r.error()["message"].is_string(), "{}", r.body);
    assert!(r.headers.get("allow").is_some(), "405 names the allowed methods");
    let r = raw(&app, "GET", "/v1/agents/%FF", "", &[]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error()["message"].is_string(), "{}", r.body);
}

#[tokio::test]
async fn metrics_are_not_readable_without_a_key_once_keys_exist() {
    let app = app_with(EngineConfig::default(), keyed());
    assert_eq!(raw(&app, "GET", "/metrics", "", &[]).await.status, StatusCode::UNAUTHORIZED);
    let r = raw(&app, "GET", "/metrics", "", &[("authorization", "Bearer key-b")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.contains("kvserve_"), "{}", r.body);
    let app = app_with(EngineConfig::default(), ServerConfig { metrics_key: Some("scrape".into()), ..keyed() });
    assert_eq!(
        raw(&app, "GET", "/metrics", "", &[("authorization", "Bearer key-a")]).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(raw(&app, "GET", "/metrics", "", &[("authorization", "Bearer scrape")]).await.status, StatusCode::OK);
    // Health stays open for probes.
    assert_eq!(raw(&app, "GET", "/health", "", &[]).await.status, StatusCode::OK);
}

#[tokio::test]
async fn response_ids_do_not_count_other_tenants_traffic() {
    let app = app();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = chat(&app, &chat_body("hi", json!({})), &[]).await;
        ids.push(r.json()["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        let tail = id.strip_prefix("chatcmpl-").unwrap();
        assert!(tail.len() >= 16, "{id}: long enough not to be guessed");
    }
    let parsed: Vec<Option<u64>> = ids.iter().map(|i| i.trim_start_matches("chatcmpl-").parse().ok()).collect();
    assert!(
        !parsed.windows(2).all(|w| matches!(w, [Some(a), Some(b)] if b == &(a + 1))),
        "ids are not a counter: {ids:?}"
    );
    assert!(ids[0] != ids[1] && ids[1] != ids[2]);
}

#[tokio::test]
async fn errors_known_before_a_stream_starts_get_their_http_status() {
    let app = app();
    app.engine.set_quota(&TenantId::default_tenant(), Some(1)).await.unwrap();
    let r = chat(&app, &chat_body(&"z".repeat(40), json!({"stream": true})), &[]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "not 200 plus an error event: {}", r.body);
    assert_eq!(r.error()["type"], "insufficient_quota");

    let app = app_with(EngineConfig { max_agents_per_tenant: 1, ..EngineConfig::default() }, ServerConfig::default());
    let first = chat(&app, &chat_body("hi", json!({"agent_id": "one"})), &[]).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    // Pinned, "one" cannot make room for "two".
    assert_eq!(raw(&app, "POST", "/v1/agents/one/pin", "", &[]).await.status, StatusCode::OK);
    let r = chat(&app, &chat_body("hi", json!({"agent_id": "two", "stream": true})), &[]).await;
    assert!(r.status.is_client_error(), "the agent limit is an HTTP error: {} {}", r.status, r.body);
    assert!(r.error()["message"].is_string());
    // A stream that is admitted still streams.
    let r = chat(&app, &chat_body("hi", json!({"agent_id": "one", "stream": true})), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.contains("data: [DONE]"), "{}", r.body);
}

#[tokio::test]
async fn logit_bias_is_applied_not_ignored() {
    let app = app();
    let plain = chat(&app, &chat_body("hi", json!({"max_tokens": 6})), &[]).await.json();
    let plain = plain["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    // The fake's tokens are bytes: +100 on "q" makes every token a "q".
    let q = u32::from(b'q').to_string();
    let biased = chat(&app, &chat_body("hi", json!({"max_tokens": 6, "logit_bias": {q.clone(): 100}})), &[]).await;
    assert_eq!(biased.status, StatusCode::OK, "{}", biased.body);
    let text = biased.json()["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    assert_eq!(text, "qqqqqq", "plain answer was {plain:?}");
    // -100 bans: the plain answer's first byte never appears.
    let first = u32::from(plain.as_bytes()[0]).to_string();
    let banned = chat(&app, &chat_body("hi", json!({"max_tokens": 6, "logit_bias": {first: -100}})), &[]).await;
    let text = banned.json()["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    assert!(!text.contains(char::from(plain.as_bytes()[0])), "{text:?}");
}

#[tokio::test]
async fn logit_bias_and_stop_token_ids_are_bounded_and_name_themselves() {
    let app = app();
    let cases = [
        (json!({"logit_bias": {"113": 101}}), "logit_bias"),
        (json!({"logit_bias": {"not-a-number": 1}}), "logit_bias"),
        (json!({"logit_bias": {"999999": 1}}), "logit_bias"),
        (json!({"logit_bias": {"5": 100, "05": 100, "+5": 100}}), "logit_bias"),
        (
            json!({"logit_bias": (0..301).map(|i| (i.to_string(), json!(1))).collect::<serde_json::Map<_, _>>()}),
            "logit_bias",
        ),
        (json!({"stop_token_ids": [999_999]}), "stop_token_ids"),
        (json!({"stop_token_ids": (0..1000).collect::<Vec<u32>>()}), "stop_token_ids"),
    ];
    for (extra, param) in cases {
        let r = chat(&app, &chat_body("hi", extra.clone()), &[]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{extra}: {}", r.body);
        assert_eq!(r.error()["param"], param, "{extra}: {}", r.body);
    }
}

#[tokio::test]
async fn parameters_the_server_cannot_honour_are_400_not_ignored() {
    let app = app();
    let function = json!([{"name": "f", "parameters": {}}]);
    let cases = [
        (json!({"best_of": 2}), "best_of"),
        (json!({"functions": function}), "functions"),
        (json!({"function_call": "auto"}), "function_call"),
    ];
    for (extra, param) in cases {
        let r = chat(&app, &chat_body("hi", extra.clone()), &[]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{extra}: {}", r.body);
        assert_eq!(r.error()["param"], param);
    }
    let completion = |extra: Value| {
        let mut b = json!({"model": "fake", "prompt": "hi", "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b.to_string()
    };
    for (extra, param) in [(json!({"suffix": "end"}), "suffix"), (json!({"best_of": 3}), "best_of")] {
        let r = raw(&app, "POST", "/v1/completions", &completion(extra.clone()), &[JSON]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{extra}: {}", r.body);
        assert_eq!(r.error()["param"], param);
    }
    let r = raw(&app, "POST", "/v1/completions", &completion(json!({"best_of": 1})), &[JSON]).await;
    assert_eq!(r.status, StatusCode::OK, "best_of 1 is what the server does: {}", r.body);
}

#[tokio::test]
async fn a_body_agent_id_that_disagrees_with_the_header_is_400() {
    let app = app();
    let r = chat(&app, &chat_body("hi", json!({"agent_id": "alice"})), &[("x-agent-id", "bob")]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert_eq!(r.error()["param"], "agent_id");
    let r = chat(&app, &chat_body("hi", json!({"agent_id": "alice"})), &[("x-agent-id", "alice")]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

#[tokio::test]
async fn a_prompt_longer_than_the_context_by_bytes_alone_is_refused_before_tokenizing() {
    let app = app();
    // The fake's limit is 4,096 tokens of at most one byte each.
    let r = raw(
        &app,
        "POST",
        "/v1/completions",
        &json!({"model": "fake", "prompt": "a".repeat(3_900_000)}).to_string(),
        &[JSON],
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", &r.body[..r.body.len().min(300)]);
    assert_eq!(r.error()["code"], "context_length_exceeded");
    // The byte cut-off's own message (tokenizing first would report a
    // token count instead).
    assert!(r.error()["message"].as_str().unwrap().contains("bytes"), "{}", r.body);
}

/// The server's own page posts with an `Origin` equal to its own scheme and
/// `Host`: allowed, and only that exact origin (another port, another name,
/// a forged Host on an open server all stay refused).
#[tokio::test]
async fn the_servers_own_page_may_post_and_delete_and_no_one_else() {
    let app = app();
    let own = [("host", "127.0.0.1:8000"), ("origin", "http://127.0.0.1:8000")];
    let r = chat(&app, &chat_body("hi", json!({"agent_id": "page"})), &own).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(raw(&app, "DELETE", "/v1/agents/page", "", &own).await.status, StatusCode::OK);
    for (host, origin) in [
        ("127.0.0.1:8000", "http://127.0.0.1:8001"),
        ("127.0.0.1:8000", "http://localhost:8000"),
        ("127.0.0.1:8000", "https://evil.example"),
        ("attacker.example", "http://attacker.example"),
    ] {
        let r = chat(&app, &chat_body("hi", json!({})), &[("host", host), ("origin", origin)]).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{host} {origin}: {}", r.body);
    }
}

/// The page and its parts come with a strict Content-Security-Policy;
/// `--no-ui` leaves them out (a JSON 404, like any unknown route).
#[tokio::test]
async fn the_page_is_served_with_a_strict_policy_unless_turned_off() {
    let app = app();
    for (path, kind) in [
        ("/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
        ("/favicon.svg", "image/svg+xml"),
        ("/favicon.ico", "image/svg+xml"),
    ] {
        let r = raw(&app, "GET", path, "", &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert!(r.headers["content-type"].to_str().unwrap().starts_with(kind), "{path}: {:?}", r.headers);
        let csp = r.headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");
        assert_eq!(r.headers["x-content-type-options"], "nosniff");
    }
    let page = raw(&app, "GET", "/", "", &[]).await.body;
    assert!(!page.contains("<script>") && !page.contains(" style="), "nothing inline");
    for id in ["chat-input", "chat-send", "chat-stop", "agent-id", "agents-table", "tier-stats"] {
        assert!(page.contains(&format!("data-testid=\"{id}\"")), "{id}");
    }
    // The page's Host rule is the API's.
    assert_eq!(raw(&app, "GET", "/", "", &[("host", "attacker.example")]).await.status, StatusCode::FORBIDDEN);

    let off = app_with(EngineConfig::default(), ServerConfig { ui: false, ..ServerConfig::default() });
    for path in ["/", "/ui/app.js", "/v1/dashboard"] {
        let r = raw(&off, "GET", path, "", &[]).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(r.error()["type"], "not_found_error", "{}", r.body);
    }
}

/// The dashboard shows a tenant its own agents and their prefix tree, and
/// the server-wide numbers only to whoever may read `/metrics`.
#[tokio::test]
async fn the_dashboard_shows_each_tenant_its_own_and_server_numbers_to_metrics_readers() {
    let app = app_with(EngineConfig::default(), ServerConfig { metrics_key: Some("scrape-key".into()), ..keyed() });
    let system = "shared system prompt ".repeat(8);
    for (key, agent) in [("key-a", "a1"), ("key-a", "a2"), ("key-b", "b1")] {
        let body = json!({"model": "fake", "max_tokens": 4, "temperature": 0, "agent_id": agent,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": format!("I am {agent}")}]});
        let r = chat(&app, &body, &[("authorization", &format!("Bearer {key}"))]).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    assert_eq!(raw(&app, "GET", "/v1/dashboard", "", &[]).await.status, StatusCode::UNAUTHORIZED);
    let a = raw(&app, "GET", "/v1/dashboard", "", &[("authorization", "Bearer key-a")]).await.json();
    let ids: Vec<&str> = a["agents"].as_array().unwrap().iter().map(|x| x["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["a1", "a2"], "its own agents only");
    assert_eq!(a["server"], Value::Null, "a tenant key is not the metrics key");
    assert_eq!(a["keys_required"], true);
    // One root (the shared system prompt) that both agents run through,
    // then one branch each.
    let nodes = a["tree"]["nodes"].as_array().unwrap();
    let roots: Vec<&Value> = nodes.iter().filter(|n| n["parent"].is_null()).collect();
    assert_eq!(roots.len(), 1, "{nodes:?}");
    assert_eq!(roots[0]["agents"], 2);
    assert!(roots[0]["tokens"].as_u64().unwrap() >= 16, "{nodes:?}");
    assert_eq!(roots[0]["blocks"]["pool"], roots[0]["tokens"].as_u64().unwrap() / 16);
    let mut ends: Vec<&str> =
        nodes.iter().flat_map(|n| n["ends"].as_array().unwrap()).map(|e| e.as_str().unwrap()).collect();
    ends.sort_unstable();
    assert_eq!(ends, ["a1", "a2"]);
    let b = raw(&app, "GET", "/v1/dashboard", "", &[("authorization", "Bearer key-b")]).await.json();
    assert_eq!(b["agents"].as_array().unwrap().len(), 1);
    assert_eq!(b["tree"]["nodes"][0]["agents"], 1);

    // The metrics key sees the server: pool, queue, history.
    let s = raw(&app, "GET", "/v1/dashboard", "", &[("authorization", "Bearer scrape-key")]).await.json();
    assert!(s["server"]["pool"]["total_blocks"].as_u64().unwrap() > 0, "{s}");
    assert_eq!((s["agents"].as_array().unwrap().len(), s["tree"]["nodes"].as_array().unwrap().len()), (0, 0));
    assert_eq!(
        raw(&app, "GET", "/v1/dashboard", "", &[("authorization", "Bearer nope")]).await.status,
        StatusCode::UNAUTHORIZED
    );
    // Without a metrics key, any API key reads the metrics, as `/metrics`.
    let app = app_with(EngineConfig::default(), keyed());
    let any = raw(&app, "GET", "/v1/dashboard", "", &[("authorization", "Bearer key-b")]).await.json();
    let server = &any["server"];
    assert!(server["pool"]["total_blocks"].as_u64().unwrap() > 0, "{server}");
    assert!(server["history"].is_array() && server["tiers"].is_array(), "{server}");
}
