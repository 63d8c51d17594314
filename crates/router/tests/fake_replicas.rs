//! The router over a real socket in front of fake replicas: small axum
//! servers on 127.0.0.1:0 that implement `/health`, the KV event API (the
//! test writes their events), the completion routes (JSON, and SSE whose
//! pace the test controls) and the agent API. Each fake runs on its own
//! runtime, so killing it closes its listener and every connection at once,
//! like a process dying.
//!
//! Nothing waits on a sleep: every condition is polled with a deadline.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Json;
use futures_util::StreamExt;
use kv::BlockHash;
use router::{Config, KvRouter, Timing};
use serde_json::{json, Value};
use server::Endpoint;

/// How a fake answers a streamed completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Three chunks, then `[DONE]`.
    Normal,
    /// One chunk, then waits for the test's gate, then the rest.
    Gated,
    /// One chunk, then the connection breaks.
    FailMidStream,
}

/// What a fake replica is and does; the test changes it as it goes.
struct FakeState {
    name: String,
    epoch: Mutex<String>,
    fingerprint: String,
    /// Events still held, oldest first (`first` is the first one's seq).
    events: Mutex<(u64, Vec<Value>)>,
    /// What a snapshot lists.
    blocks: Mutex<Vec<(BlockHash, &'static str)>>,
    changed: tokio::sync::Notify,
    mode: Mutex<Mode>,
    gate: tokio::sync::Semaphore,
    /// Completions received, and the Authorization header of the last one.
    served: AtomicUsize,
    last_auth: Mutex<Option<String>>,
    snapshot_reads: AtomicUsize,
    /// The key the KV event API wants, if any.
    kv_key: Option<String>,
    agents: Mutex<Vec<Value>>,
    healthy: AtomicBool,
}

impl FakeState {
    fn next(&self) -> u64 {
        let e = self.events.lock().unwrap();
        e.0 + e.1.len() as u64
    }

    fn push(&self, kind: &str, tier: &str, hash: Option<BlockHash>) {
        {
            let mut e = self.events.lock().unwrap();
            let seq = e.0 + e.1.len() as u64;
            let mut ev = json!({"seq": seq, "type": kind, "tier": tier});
            if let Some(h) = hash {
                ev["hash"] = json!(h.to_string());
                ev["parent"] = Value::Null;
            }
            e.1.push(ev);
        }
        self.changed.notify_waiters();
    }

    fn info(&self) -> Value {
        json!({"epoch": *self.epoch.lock().unwrap(), "model_fingerprint": self.fingerprint,
               "block_size": 16, "namespacing": "model+tenant"})
    }

    fn load(&self) -> Value {
        json!({"running": 0, "waiting": 0, "free_blocks": 100, "total_blocks": 100})
    }

    fn kv_allowed(&self, headers: &HeaderMap) -> bool {
        let given = headers.get("authorization").and_then(|v| v.to_str().ok());
        self.kv_key.as_ref().is_none_or(|k| given == Some(&format!("Bearer {k}")))
    }
}

async fn health(State(s): State<Arc<FakeState>>) -> Response {
    if s.healthy.load(Ordering::SeqCst) {
        Json(json!({"status": "ok"})).into_response()
    } else {
        StatusCode::SERVICE_UNAVAILABLE.into_response()
    }
}

async fn snapshot(State(s): State<Arc<FakeState>>, headers: HeaderMap) -> Response {
    if !s.kv_allowed(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    s.snapshot_reads.fetch_add(1, Ordering::SeqCst);
    let blocks: Vec<Value> =
        s.blocks.lock().unwrap().iter().map(|(h, t)| json!({"hash": h.to_string(), "tier": t})).collect();
    Json(json!({"replica": s.info(), "next": s.next(), "load": s.load(), "blocks": blocks})).into_response()
}

async fn events(
    State(s): State<Arc<FakeState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, u64>>,
) -> Response {
    if !s.kv_allowed(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let since = q.get("since").copied().unwrap_or(0);
    let wait = Duration::from_millis(q.get("wait_ms").copied().unwrap_or(0).min(10_000));
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let changed = s.changed.notified();
        {
            let e = s.events.lock().unwrap();
            let (first, next) = (e.0, e.0 + e.1.len() as u64);
            if since < first {
                let body = json!({"error": {"code": "events_gap", "message": "gone", "type": "invalid_request_error"}});
                return (StatusCode::GONE, Json(body)).into_response();
            }
            if since < next || tokio::time::Instant::now() >= deadline {
                let page: Vec<Value> = e.1.iter().skip((since.min(next) - first) as usize).cloned().collect();
                return Json(json!({"replica": s.info(), "first": first, "next": next.max(since),
                                   "events": page, "load": s.load()}))
                .into_response();
            }
        }
        let _ = tokio::time::timeout_at(deadline, changed).await;
    }
}

fn chunk(s: &FakeState, i: usize) -> Bytes {
    Bytes::from(format!("data: {}\n\n", json!({"replica": s.name, "i": i})))
}

async fn complete(State(s): State<Arc<FakeState>>, headers: HeaderMap, body: Bytes) -> Response {
    s.served.fetch_add(1, Ordering::SeqCst);
    *s.last_auth.lock().unwrap() = headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if req["stream"] != json!(true) {
        return Json(json!({"replica": s.name, "echo": req})).into_response();
    }
    let mode = *s.mode.lock().unwrap();
    let st = Arc::clone(&s);
    let stream = futures_util::stream::unfold(0usize, move |i| {
        let s = Arc::clone(&st);
        async move {
            match (i, mode) {
                (0, _) => Some((Ok(chunk(&s, 0)), 1)),
                (1, Mode::FailMidStream) => {
                    // Dies once the first chunk is on the wire.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Some((Err(std::io::Error::other("the replica died")), usize::MAX))
                }
                (1, Mode::Gated) => {
                    s.gate.acquire().await.unwrap().forget();
                    Some((Ok(chunk(&s, 1)), 2))
                }
                (1 | 2, _) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    Some((Ok(chunk(&s, i)), i + 1))
                }
                (3, _) => Some((Ok(Bytes::from_static(b"data: [DONE]\n\n")), 4)),
                _ => None,
            }
        }
    });
    Response::builder().header("content-type", "text/event-stream").body(Body::from_stream(stream)).unwrap()
}

async fn models(State(s): State<Arc<FakeState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": "tiny", "object": "model"}], "replica": s.name}))
}

async fn agents(State(s): State<Arc<FakeState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": *s.agents.lock().unwrap()}))
}

async fn agent(State(s): State<Arc<FakeState>>, Path(id): Path<String>) -> Json<Value> {
    Json(json!({"id": id, "replica": s.name}))
}

/// A fake replica on its own runtime.
struct Fake {
    state: Arc<FakeState>,
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Fake {
    fn start(name: &str, fingerprint: &str) -> Self {
        Self::start_with(name, fingerprint, None)
    }

    fn start_with(name: &str, fingerprint: &str, kv_key: Option<&str>) -> Self {
        let state = Arc::new(FakeState {
            name: name.into(),
            epoch: Mutex::new("00000000000000e1".into()),
            fingerprint: fingerprint.into(),
            events: Mutex::new((0, Vec::new())),
            blocks: Mutex::new(Vec::new()),
            changed: tokio::sync::Notify::new(),
            mode: Mutex::new(Mode::Normal),
            gate: tokio::sync::Semaphore::new(0),
            served: AtomicUsize::new(0),
            last_auth: Mutex::new(None),
            snapshot_reads: AtomicUsize::new(0),
            kv_key: kv_key.map(str::to_owned),
            agents: Mutex::new(Vec::new()),
            healthy: AtomicBool::new(true),
        });
        let app = axum::Router::new()
            .route("/health", get(health))
            .route("/v1/kv/snapshot", get(snapshot))
            .route("/v1/kv/events", get(events))
            .route("/v1/chat/completions", post(complete))
            .route("/v1/completions", post(complete))
            .route("/v1/models", get(models))
            .route("/v1/agents", get(agents))
            .route("/v1/agents/{id}", any(agent))
            .with_state(Arc::clone(&state));
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let _ = axum::serve(listener, app).await;
        });
        Self { state, addr, runtime: Some(runtime) }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn served(&self) -> usize {
        self.state.served.load(Ordering::SeqCst)
    }

    /// Like `kill -9`: the listener and every connection go at once.
    fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        let addr = self.addr;
        poll_blocking("the killed replica's port to close", || std::net::TcpStream::connect(addr).is_err());
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

const DEADLINE: Duration = Duration::from_secs(10);

fn poll_blocking(what: &str, mut cond: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(std::time::Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(tokio::time::Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The tiny model's codec and fingerprint (what a real router loads).
struct Model {
    codec: Arc<dyn model::TextCodec>,
    fingerprint: Vec<u8>,
    _dir: tempfile::TempDir,
}

fn tiny_model() -> Model {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    model::tiny::write_tiny_gguf(&path, &model::tiny::TinySpec::default()).unwrap();
    let file = model::GgufFile::open(&path).unwrap();
    let codec = Arc::new(model::LlamaText::from_gguf(&file).unwrap());
    Model { codec, fingerprint: model::model_fingerprint(&file), _dir: dir }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A router over real sockets.
struct Front {
    router: KvRouter,
    url: String,
    client: reqwest::Client,
}

fn fast_timing() -> Timing {
    Timing {
        health_interval: Duration::from_millis(100),
        health_timeout: Duration::from_millis(500),
        events_wait: Duration::from_millis(300),
        retry_delay: Duration::from_millis(50),
        recheck: Duration::from_millis(200),
        connect_timeout: Duration::from_millis(500),
    }
}

async fn front_with(model: &Model, fakes: &[&Fake], tweak: impl FnOnce(&mut Config)) -> Front {
    let mut config =
        Config::new(fakes.iter().map(|f| f.url()).collect(), Arc::clone(&model.codec), model.fingerprint.clone());
    config.timing = fast_timing();
    tweak(&mut config);
    let router = KvRouter::start(config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = router.app();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Front { router, url, client: reqwest::Client::new() }
}

async fn front(model: &Model, fakes: &[&Fake]) -> Front {
    front_with(model, fakes, |_| {}).await
}

impl Front {
    async fn all_ready(&self) {
        until("every replica healthy and synced", || self.router.replicas().iter().all(|r| r.healthy && r.synced))
            .await;
    }

    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client.post(format!("{}{path}", self.url)).json(body).send().await.unwrap()
    }

    /// Which fake answered a non-streamed chat.
    async fn chat(&self, body: &Value) -> String {
        let r = self.post("/v1/chat/completions", body).await;
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["replica"].as_str().unwrap().to_owned()
    }

    fn metric(&self, line: &str) -> f64 {
        let text = self.router.metrics_text();
        text.lines()
            .find_map(|l| l.strip_prefix(line).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no metric {line} in\n{text}"))
    }
}

fn chat_body(agent: Option<&str>, text: &str) -> Value {
    let mut b = json!({"model": "tiny", "messages": [{"role": "system", "content": "You are the keeper of the lighthouse logbook; answer briefly. ".repeat(4)},
                                                    {"role": "user", "content": text}]});
    if let Some(a) = agent {
        b["agent_id"] = json!(a);
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_turns_stick_to_one_replica() {
    let model = tiny_model();
    let fakes: Vec<Fake> = (0..3).map(|i| Fake::start(&format!("r{i}"), &hex(&model.fingerprint))).collect();
    let front = front(&model, &fakes.iter().collect::<Vec<_>>()).await;
    front.all_ready().await;
    let first = front.chat(&chat_body(Some("ada"), "turn 0")).await;
    for turn in 1..8 {
        assert_eq!(front.chat(&chat_body(Some("ada"), &format!("turn {turn}"))).await, first);
    }
    // The header names an agent as well as the body.
    let r = front
        .client
        .post(format!("{}/v1/chat/completions", front.url))
        .header("x-agent-id", "ada")
        .json(&chat_body(None, "by header"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["replica"], json!(first));
    // Other agents have other homes.
    let mut homes = std::collections::HashSet::new();
    for a in 0..24 {
        homes.insert(front.chat(&chat_body(Some(&format!("agent-{a}")), "hi")).await);
    }
    assert_eq!(homes.len(), 3, "24 agents over 3 replicas all landed on {homes:?}");
    assert!(front.metric("kvserve_router_decisions_total{reason=\"affinity\"}") >= 30.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_goes_to_the_replica_whose_events_say_it_holds_the_prefix() {
    let model = tiny_model();
    let fakes: Vec<Fake> = (0..3).map(|i| Fake::start(&format!("r{i}"), &hex(&model.fingerprint))).collect();
    let front = front(&model, &fakes.iter().collect::<Vec<_>>()).await;
    front.all_ready().await;
    let body = chat_body(None, "What did the keeper write on the night of the storm?");
    let chain = front.router.chain_of("default", Endpoint::Chat, &body).unwrap();
    assert!(chain.len() >= 4, "a prompt of {} blocks", chain.len());
    // r2 reports the prompt's leading blocks (all but the last) in its pool.
    for h in &chain[..chain.len() - 1] {
        fakes[2].state.push("stored", "pool", Some(*h));
    }
    until("the index to hold r2's blocks", || front.router.replicas()[2].blocks == (chain.len() - 1) as u64).await;
    for _ in 0..6 {
        assert_eq!(front.chat(&body).await, "r2");
    }
    assert_eq!(front.metric("kvserve_router_decisions_total{reason=\"overlap\"}"), 6.0);
    // A prompt nobody holds goes by load.
    front.chat(&json!({"model": "tiny", "messages": [{"role": "user", "content": "Something else entirely."}]})).await;
    assert_eq!(front.metric("kvserve_router_decisions_total{reason=\"load\"}"), 1.0);
    assert!(front.metric("kvserve_router_events_total") >= (chain.len() - 1) as f64);
    // A body the router cannot plan still reaches a replica, which gives
    // the real error.
    let r = front
        .client
        .post(format!("{}/v1/chat/completions", front.url))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the fake answers whatever it gets");
    assert_eq!(front.metric("kvserve_router_decisions_total{reason=\"fallback\"}"), 1.0);
}

/// Opens `n` streams for `body` and waits until the fakes have them all;
/// the streams stay open (the fakes are gated) until the test lets go.
async fn open_streams(front: &Front, fakes: &[Fake], body: &Value, n: usize) -> Vec<reqwest::Response> {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let mut open = Vec::new();
    for _ in 0..n {
        let r = front.post("/v1/chat/completions", &body).await;
        assert_eq!(r.status(), 200);
        open.push(r);
    }
    until("every stream to reach a replica", || fakes.iter().map(Fake::served).sum::<usize>() == n).await;
    open
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_agent_under_load_spreads_instead_of_piling_on_its_home() {
    let model = tiny_model();
    let fakes: Vec<Fake> = (0..3).map(|i| Fake::start(&format!("r{i}"), &hex(&model.fingerprint))).collect();
    for f in &fakes {
        *f.state.mode.lock().unwrap() = Mode::Gated;
    }
    let front = front(&model, &fakes.iter().collect::<Vec<_>>()).await;
    front.all_ready().await;
    let open = open_streams(&front, &fakes, &chat_body(Some("hot"), "again"), 12).await;
    let per: Vec<usize> = fakes.iter().map(Fake::served).collect();
    assert!(per.iter().all(|&n| n < 12), "one replica got every request: {per:?}");
    let home = per.iter().copied().max().unwrap();
    assert!(home <= 7, "the bound (1.5 × mean + 1) caps the home: {per:?}");
    assert!(front.metric("kvserve_router_decisions_total{reason=\"load\"}") >= 1.0);
    // Load is given back as the streams end.
    for f in &fakes {
        f.state.gate.add_permits(100);
    }
    for r in open {
        let text = r.text().await.unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }
    until("in-flight counts to return to 0", || front.router.replicas().iter().all(|r| r.in_flight == 0)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_prefix_under_load_spreads_instead_of_piling_on_its_holder() {
    let model = tiny_model();
    let fakes: Vec<Fake> = (0..3).map(|i| Fake::start(&format!("r{i}"), &hex(&model.fingerprint))).collect();
    for f in &fakes {
        *f.state.mode.lock().unwrap() = Mode::Gated;
    }
    let front = front(&model, &fakes.iter().collect::<Vec<_>>()).await;
    front.all_ready().await;
    let body = chat_body(None, "the same question from everyone");
    for h in front.router.chain_of("default", Endpoint::Chat, &body).unwrap() {
        fakes[0].state.push("stored", "pool", Some(h));
    }
    until("the index to hold r0's blocks", || front.router.replicas()[0].blocks > 0).await;
    let open = open_streams(&front, &fakes, &body, 12).await;
    let per: Vec<usize> = fakes.iter().map(Fake::served).collect();
    assert!(per[0] < 12 && per[0] >= per[1] && per[0] >= per[2], "{per:?}");
    for f in &fakes {
        f.state.gate.add_permits(100);
    }
    drop(open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_sse_chunk_reaches_the_client_before_the_replica_sends_the_last() {
    let model = tiny_model();
    let fake = Fake::start("r0", &hex(&model.fingerprint));
    *fake.state.mode.lock().unwrap() = Mode::Gated;
    let front = front(&model, &[&fake]).await;
    front.all_ready().await;
    let mut body = chat_body(None, "stream please");
    body["stream"] = json!(true);
    let r = front.post("/v1/chat/completions", &body).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let mut stream = r.bytes_stream();
    // The fake holds everything after its first chunk until the gate
    // opens: a router that buffered would deliver nothing now.
    let first = tokio::time::timeout(DEADLINE, stream.next()).await.expect("the first chunk in time").unwrap().unwrap();
    assert_eq!(first, chunk(&fake.state, 0));
    fake.state.gate.add_permits(1);
    let mut rest = Vec::new();
    while let Some(b) = stream.next().await {
        rest.extend_from_slice(&b.unwrap());
    }
    let rest = String::from_utf8(rest).unwrap();
    assert!(rest.contains("\"i\":2") && rest.ends_with("data: [DONE]\n\n"), "{rest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_failing_mid_stream_ends_the_clients_stream_with_an_error_event() {
    let model = tiny_model();
    let fake = Fake::start("r0", &hex(&model.fingerprint));
    *fake.state.mode.lock().unwrap() = Mode::FailMidStream;
    let front = front(&model, &[&fake]).await;
    front.all_ready().await;
    let mut body = chat_body(None, "stream please");
    body["stream"] = json!(true);
    let r = front.post("/v1/chat/completions", &body).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("the stream ends cleanly, with the error as its last event");
    let (head, error) = text.split_once("event: error\n").expect("an error event");
    assert_eq!(head, format!("data: {}\n\n", json!({"replica": "r0", "i": 0})));
    let data: Value = serde_json::from_str(error.strip_prefix("data: ").unwrap().trim()).unwrap();
    assert_eq!(data["error"]["code"], "replica_failed");
    assert!(!text.contains("[DONE]"));
    until("the in-flight count to return to 0", || front.router.replicas()[0].in_flight == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_before_the_first_byte_is_retried_on_another() {
    let model = tiny_model();
    let mut fakes: Vec<Fake> = (0..2).map(|i| Fake::start(&format!("r{i}"), &hex(&model.fingerprint))).collect();
    // Health checks far apart: the router still believes in the dead one.
    let front = front_with(&model, &fakes.iter().collect::<Vec<_>>(), |c| {
        c.timing.health_interval = Duration::from_secs(600);
    })
    .await;
    front.all_ready().await;
    let home = front.chat(&chat_body(Some("ada"), "hello")).await;
    let (dead, alive) = if home == "r0" { (0, "r1") } else { (1, "r0") };
    fakes[dead].kill();
    for turn in 0..3 {
        let r = front.post("/v1/chat/completions", &chat_body(Some("ada"), &format!("turn {turn}"))).await;
        assert_eq!(r.status(), 200, "no client error");
        assert_eq!(r.json::<Value>().await.unwrap()["replica"], json!(alive));
    }
    // The first request was retried; the refused connection marked the
    // replica down, so the next ones went straight to the live one.
    assert_eq!(front.metric("kvserve_router_retries_total"), 1.0);
    assert!(!front.router.replicas()[dead].healthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_events_resync_from_the_snapshot() {
    let model = tiny_model();
    let fake = Fake::start("r0", &hex(&model.fingerprint));
    let front = front(&model, &[&fake]).await;
    front.all_ready().await;
    assert_eq!(fake.state.snapshot_reads.load(Ordering::SeqCst), 1);
    // The replica's event log moved past what the router read: the
    // router's `since` is gone (410) and only the snapshot tells the truth.
    let (a, b) = (BlockHash::from_u128(1), BlockHash::from_u128(2));
    *fake.state.blocks.lock().unwrap() = vec![(a, "pool"), (b, "disk")];
    *fake.state.events.lock().unwrap() =
        (10, vec![json!({"seq": 10, "type": "stored", "tier": "pool", "hash": a.to_string()})]);
    fake.state.changed.notify_waiters();
    until("a resync", || fake.state.snapshot_reads.load(Ordering::SeqCst) == 2).await;
    until("the snapshot's blocks in the index", || front.router.replicas()[0].blocks == 2).await;
    assert_eq!(front.metric("kvserve_router_resyncs_total"), 1.0);
    // And it follows the log from the snapshot's `next` on.
    fake.state.push("removed", "disk", Some(b));
    until("the removal applied", || front.router.replicas()[0].blocks == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restart_new_epoch_resyncs_and_drops_what_it_held() {
    let model = tiny_model();
    let fake = Fake::start("r0", &hex(&model.fingerprint));
    let front = front(&model, &[&fake]).await;
    front.all_ready().await;
    for i in 1..=3 {
        fake.state.push("stored", "pool", Some(BlockHash::from_u128(i)));
    }
    until("three blocks indexed", || front.router.replicas()[0].blocks == 3).await;
    // A restart: a new epoch, an empty pool, one block back from disk, a
    // new event log. Its `next` may even be past the router's `since`.
    *fake.state.epoch.lock().unwrap() = "00000000000000e2".into();
    *fake.state.blocks.lock().unwrap() = vec![(BlockHash::from_u128(3), "disk")];
    *fake.state.events.lock().unwrap() = (0, (0..5).map(|s| json!({"seq": s, "type": "moved"})).collect());
    fake.state.changed.notify_waiters();
    until("the new epoch", || front.router.replicas()[0].epoch.as_deref() == Some("00000000000000e2")).await;
    until("only the snapshot's block", || front.router.replicas()[0].blocks == 1).await;
    assert!(front.metric("kvserve_router_resyncs_total") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_of_another_model_is_refused_and_never_routed_to() {
    let model = tiny_model();
    let good = Fake::start("good", &hex(&model.fingerprint));
    let other = Fake::start("other", &"ab".repeat(16));
    let front = front(&model, &[&good, &other]).await;
    until("the other model refused", || front.router.replicas()[1].refused.is_some()).await;
    until("the good one synced", || front.router.replicas()[0].synced && front.router.replicas()[0].healthy).await;
    let why = front.router.replicas()[1].refused.clone().unwrap();
    assert!(why.contains("another model"), "{why}");
    for a in 0..10 {
        assert_eq!(front.chat(&chat_body(Some(&format!("a{a}")), "hi")).await, "good");
        assert_eq!(front.chat(&chat_body(None, &format!("q{a}"))).await, "good");
    }
    assert_eq!(other.served(), 0);
    assert_eq!(front.metric("kvserve_router_refused_replicas"), 1.0);
    assert_eq!(front.metric(&format!("kvserve_router_replica_healthy{{replica=\"{}\"}}", good.url())), 1.0);
    assert_eq!(front.metric(&format!("kvserve_router_replica_healthy{{replica=\"{}\"}}", other.url())), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_with_every_replica_down() {
    let model = tiny_model();
    let mut fakes: Vec<Fake> = (0..2).map(|i| Fake::start(&format!("r{i}"), &hex(&model.fingerprint))).collect();
    let front = front(&model, &fakes.iter().collect::<Vec<_>>()).await;
    front.all_ready().await;
    let h = front.client.get(format!("{}/health", front.url)).send().await.unwrap();
    assert_eq!(h.status(), 200);
    assert_eq!(h.json::<Value>().await.unwrap(), json!({"status": "ok", "replicas": {"healthy": 2, "total": 2}}));
    fakes[0].kill();
    fakes[1].state.healthy.store(false, Ordering::SeqCst);
    let mut last = None;
    let end = tokio::time::Instant::now() + DEADLINE;
    while tokio::time::Instant::now() < end {
        let h = front.client.get(format!("{}/health", front.url)).send().await.unwrap();
        if h.status() == 503 {
            last = Some(h.json::<Value>().await.unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(last, Some(json!({"status": "unavailable", "replicas": {"healthy": 0, "total": 2}})));
    let r = front.post("/v1/chat/completions", &chat_body(None, "anyone?")).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "no_replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_api_goes_to_the_home_and_lists_merge_every_replica() {
    let model = tiny_model();
    let fakes: Vec<Fake> = (0..3).map(|i| Fake::start(&format!("r{i}"), &hex(&model.fingerprint))).collect();
    *fakes[0].state.agents.lock().unwrap() = vec![json!({"id": "a", "last_used_unix": 5, "turns": 1})];
    *fakes[1].state.agents.lock().unwrap() =
        vec![json!({"id": "a", "last_used_unix": 9, "turns": 3}), json!({"id": "b", "last_used_unix": 1})];
    let front = front(&model, &fakes.iter().collect::<Vec<_>>()).await;
    front.all_ready().await;
    let list: Value = front.client.get(format!("{}/v1/agents", front.url)).send().await.unwrap().json().await.unwrap();
    let mut data = list["data"].as_array().unwrap().clone();
    data.sort_by_key(|a| a["id"].as_str().unwrap().to_owned());
    assert_eq!(
        data,
        vec![json!({"id": "a", "last_used_unix": 9, "turns": 3}), json!({"id": "b", "last_used_unix": 1})]
    );
    let home = front.chat(&chat_body(Some("zed"), "hi")).await;
    let info: Value =
        front.client.get(format!("{}/v1/agents/zed", front.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(info, json!({"id": "zed", "replica": home}));
    let models: Value =
        front.client.get(format!("{}/v1/models", front.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_the_router_and_reach_the_replicas() {
    let model = tiny_model();
    let fake = Fake::start_with("r0", &hex(&model.fingerprint), Some("metrics-key-1"));
    let keys = HashMap::from([("sk-acme-0001".to_owned(), engine::TenantId::new("acme").unwrap())]);
    let front = front_with(&model, &[&fake], |c| {
        c.guard = server::Guard::new(keys, Some("metrics-key-1".into()), &[], &[]);
        c.replica_key = Some("metrics-key-1".into());
    })
    .await;
    front.all_ready().await;
    let body = chat_body(None, "hi");
    let r = front.post("/v1/chat/completions", &body).await;
    assert_eq!(r.status(), 401);
    assert_eq!(fake.served(), 0, "refused before forwarding");
    let r = front
        .client
        .post(format!("{}/v1/chat/completions", front.url))
        .bearer_auth("sk-acme-0001")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(fake.state.last_auth.lock().unwrap().as_deref(), Some("Bearer sk-acme-0001"));
    // Tenants are namespaces: the same prompt has other addresses.
    let acme = front.router.chain_of("acme", Endpoint::Chat, &body).unwrap();
    assert_ne!(acme, front.router.chain_of("default", Endpoint::Chat, &body).unwrap());
    // The router's metrics want the metrics key.
    let m = front.client.get(format!("{}/metrics", front.url)).send().await.unwrap();
    assert_eq!(m.status(), 401);
    let m = front.client.get(format!("{}/metrics", front.url)).bearer_auth("metrics-key-1").send().await.unwrap();
    assert_eq!(m.status(), 200);
    assert!(m.text().await.unwrap().contains("kvserve_router_decisions_total{reason=\"load\"} 1"));
}
