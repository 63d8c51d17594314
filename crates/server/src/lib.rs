//! kvserve's HTTP layer: an OpenAI-compatible API over the engine handle.
//! It knows nothing of tensors or blocks; everything goes through
//! [`engine::EngineHandle`].
//!
//! | concept | file |
//! |---|---|
//! | OpenAI request/response types, conversion to engine requests | `openai.rs` |
//! | chat and text completions, streaming (SSE) | `completions.rs` |
//! | tools, response formats, grammars; tool calls read back | `structured.rs` |
//! | the agent API | `agents.rs` |
//! | Prometheus text exposition | `metrics.rs` |
//! | errors as OpenAI JSON with status codes | `error.rs` |
//! | the Responses API: items to turns, streaming events | `responses.rs` |
//! | the Conversations API | `conversations.rs` |
//! | stored responses and conversations, durable on disk | `response_store.rs` |
//! | Host, Origin and API-key rules | `guard.rs` |
//! | the web page at `/` and its dashboard JSON | `ui.rs`, assets in `ui/` |
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions`,
//! `POST /v1/responses`, `/v1/responses/{id}` (GET, DELETE) and its
//! `input_items`, `/v1/conversations...`, `GET /v1/models`, `/v1/agents...`, `GET /health`,
//! `GET /metrics`, and
//! (unless `--no-ui`) `GET /`, `GET /v1/dashboard`.
//!
//! Tenants come from API keys: with keys configured, every `/v1` route needs
//! `Authorization: Bearer KEY` and the key names the tenant; without keys,
//! every request is the default tenant (the binary then listens on loopback
//! only).

mod access_log;
mod agents;
mod completions;
pub mod conn;
mod conversations;
mod end_body;
mod error;
mod guard;
pub mod kv_events;
mod legacy;
pub mod metrics;
mod openai;
mod response_store;
mod responses;
mod structured;
mod ui;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use engine::{EngineHandle, TenantId};
use serde::de::DeserializeOwned;
use serde_json::json;

pub use completions::{prompt_of, Endpoint, AGENT_HEADER};
pub use engine::Prompt;
pub use error::ApiError;
pub use guard::Guard;

/// HTTP-side settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// API key to tenant. Empty: no authentication, one default tenant.
    pub api_keys: HashMap<String, TenantId>,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Highest `priority` a client may give a request or an agent (400
    /// beyond). Priorities decide who is preempted and whose agents are
    /// released first across all tenants, so by default clients may only
    /// lower theirs (background work); an operator raises the cap.
    pub max_priority: i32,
    /// Host names served besides loopback ones when there are no API keys
    /// (lowercase, no port): the `--host` address and `--allowed-host`s.
    pub allowed_hosts: Vec<String>,
    /// Origins allowed to call the API from a browser (CORS); none by
    /// default.
    pub cors_origins: Vec<String>,
    /// The key `/metrics` wants. `None` with API keys: any API key; with no
    /// keys at all: open, like the rest.
    pub metrics_key: Option<String>,
    /// Connection limits and timeouts (`conn.rs`).
    pub limits: conn::Limits,
    /// More names the model answers to besides the engine's `model_name`
    /// (the catalogue name, the file's stem, `--served-model-name`s), all
    /// listed by `/v1/models`. Answers name the engine's.
    pub model_aliases: Vec<String>,
    /// Serve the web page at `/` (`ui.rs`); `--no-ui` turns it off.
    pub ui: bool,
    /// Where stored responses are kept (`response_store.rs`); `None`: in
    /// memory.
    pub responses_dir: Option<std::path::PathBuf>,
    /// How long a stored response is kept.
    pub responses_ttl: Duration,
}

/// Lowest `priority` a client may give.
pub const MIN_PRIORITY: i32 = -1000;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            api_keys: HashMap::new(),
            max_body_bytes: 4 << 20,
            max_priority: 0,
            allowed_hosts: Vec::new(),
            cors_origins: Vec::new(),
            metrics_key: None,
            limits: conn::Limits::default(),
            model_aliases: Vec::new(),
            ui: true,
            responses_dir: None,
            responses_ttl: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// `priority` if it is within what clients may ask for.
pub(crate) fn check_priority(priority: i32, max: i32) -> Result<i32, ApiError> {
    if (MIN_PRIORITY..=max).contains(&priority) {
        Ok(priority)
    } else {
        Err(ApiError::invalid("priority", format!("must be between {MIN_PRIORITY} and {max}")))
    }
}

/// What every handler can reach.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) engine: EngineHandle,
    /// The name answers carry (the engine's `model_name`).
    pub(crate) model_name: Arc<str>,
    /// Every name a request may give: `model_name` first, then the aliases.
    pub(crate) model_names: Arc<[String]>,
    /// API keys, host and origin rules.
    pub(crate) guard: Arc<Guard>,
    pub(crate) max_body_bytes: usize,
    pub(crate) max_priority: i32,
    /// Prompts being rendered and tokenized at once (off the runtime).
    pub(crate) prep: Arc<tokio::sync::Semaphore>,
    /// Longest a request body may take to arrive (408 beyond).
    pub(crate) body_timeout: Duration,
    /// The web page's state (`ui.rs`); `None` with `--no-ui`.
    pub(crate) ui: Option<Arc<ui::Ui>>,
    /// Stored responses (`response_store.rs`).
    pub(crate) responses: Option<response_store::ResponseStore>,
}

/// The request's tenant, from its API key.
pub(crate) struct Tenant(pub(crate) TenantId);

impl FromRequestParts<AppState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        state.guard.tenant(&parts.headers).map(Self)
    }
}

/// Parses a JSON body, mapping every failure to an OpenAI-style 400 (or 413
/// when the body exceeded the limit).
pub(crate) fn parse_json<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<T, ApiError> {
    let bytes = match body {
        Ok(b) => b,
        Err(rej) if rej.status() == StatusCode::PAYLOAD_TOO_LARGE => return Err(ApiError::too_large(limit)),
        Err(rej) => return Err(ApiError::bad_json(rej.body_text())),
    };
    serde_json::from_slice(&bytes).map_err(ApiError::bad_json)
}

/// `primary`, then each alias not already named (empty ones skipped).
fn model_names(primary: &str, aliases: &[String]) -> Arc<[String]> {
    let mut names = vec![primary.to_owned()];
    for a in aliases {
        if !a.is_empty() && !names.contains(a) {
            names.push(a.clone());
        }
    }
    names.into()
}

/// The application: every route, the body limit, JSON 404s.
pub fn router(engine: EngineHandle, config: ServerConfig) -> Router {
    let state = AppState {
        model_name: engine.config().model_name.as_str().into(),
        model_names: model_names(&engine.config().model_name, &config.model_aliases),
        guard: Arc::new(Guard::new(
            config.api_keys,
            config.metrics_key.clone(),
            &config.allowed_hosts,
            &config.cors_origins,
        )),
        max_body_bytes: config.max_body_bytes,
        max_priority: config.max_priority,
        prep: Arc::new(tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get).max(2),
        )),
        body_timeout: config.limits.body_timeout,
        ui: config.ui.then(|| ui::start(&engine)),
        responses: Some(match &config.responses_dir {
            Some(dir) => response_store::ResponseStore::disk(dir.clone(), config.responses_ttl).unwrap_or_else(|e| {
                tracing::error!(error = %e, dir = %dir.display(), "the response store cannot use its directory; keeping responses in memory");
                response_store::ResponseStore::memory(config.responses_ttl)
            }),
            None => response_store::ResponseStore::memory(config.responses_ttl),
        }),
        engine,
    };
    let router = Router::new()
        .route("/v1/chat/completions", post(completions::chat))
        .route("/v1/completions", post(completions::completion))
        .route("/v1/responses", post(responses::create))
        .route("/v1/responses/{id}", get(responses::get).delete(responses::delete))
        .route("/v1/responses/{id}/input_items", get(responses::input_items_list))
        .route("/v1/conversations", post(conversations::create))
        .route(
            "/v1/conversations/{id}",
            get(conversations::get).post(conversations::update).delete(conversations::delete),
        )
        .route("/v1/conversations/{id}/items", get(conversations::list_items).post(conversations::add_items))
        .route(
            "/v1/conversations/{id}/items/{item_id}",
            get(conversations::get_item).delete(conversations::delete_item),
        )
        .route("/v1/models", get(models))
        .route("/v1/agents", get(agents::list))
        .route("/v1/agents/{id}", get(agents::get).delete(agents::delete).patch(agents::patch))
        .route("/v1/agents/{id}/pin", post(agents::pin))
        .route("/v1/agents/{id}/unpin", post(agents::unpin))
        .route("/v1/agents/{id}/hand-over", post(agents::hand_over))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/kv/snapshot", get(kv_events::snapshot))
        .route("/v1/kv/events", get(kv_events::events));
    let router = if state.ui.is_some() { ui::routes(router) } else { router };
    let router = router
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard::check_host))
        .layer(axum::middleware::from_fn(access_log::log_requests))
        .layer(DefaultBodyLimit::max(config.max_body_bytes));
    let router = match cors(&config.cors_origins) {
        Some(layer) => router.layer(layer),
        None => router,
    };
    router.with_state(state)
}

/// Whether `origin` can be given to `--cors-origin`: `*`, or
/// `scheme://host[:port]` as browsers send it.
///
/// # Errors
/// Why not, for the operator.
pub fn check_cors_origin(origin: &str) -> Result<(), String> {
    if origin == "*" {
        return Ok(());
    }
    let valid = origin.split_once("://").is_some_and(|(scheme, rest)| {
        matches!(scheme, "http" | "https")
            && !rest.is_empty()
            && !rest.contains(['/', '?', '#', ' '])
            && axum::http::HeaderValue::from_str(origin).is_ok()
    });
    if valid {
        Ok(())
    } else {
        Err(format!("{origin:?} is not an origin: give `*` or scheme://host[:port], e.g. https://app.example.com"))
    }
}

/// CORS for the configured origins; `None` (no CORS at all) without any.
/// Origins are checked at start-up ([`check_cors_origin`]); any that still
/// does not make a header value is left out.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderName, HeaderValue, Method};
    use tower_http::cors::AllowOrigin;
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        tower_http::cors::CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::PATCH])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static(completions::AGENT_HEADER),
            ]),
    )
}

async fn models(State(state): State<AppState>, _tenant: Tenant) -> Json<serde_json::Value> {
    Json(json!({
        "object": "list",
        "data": state.model_names.iter().map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "kvserve"})).collect::<Vec<_>>(),
    }))
}

/// 200 `ok` while serving; 200 `degraded` (with the reason) while the
/// disk tier cannot write (serving goes on, nothing new is durable); 503
/// while stopping.
async fn health(State(state): State<AppState>) -> Response {
    if state.engine.is_stopped() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "stopping"}))).into_response()
    } else if let Some(reason) = state.engine.degraded() {
        Json(json!({"status": "degraded", "model": &*state.model_name, "reason": reason})).into_response()
    } else {
        Json(json!({"status": "ok", "model": &*state.model_name})).into_response()
    }
}

/// With API keys, `/metrics` wants the metrics key (`--metrics-key`), or
/// any API key if none is set: the numbers describe every tenant's traffic.
async fn metrics_text(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    if let Err(e) = state.guard.check_metrics(&headers) {
        return e.into_response();
    }
    let body = metrics::render(&state.engine.stats());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

/// Serves `app` on `listener` until `signal` resolves, with `limits` on
/// every connection (`conn.rs`); then stops accepting, gives in-flight
/// requests `grace` to finish (the engine cancels the rest), and returns
/// once every connection has closed (within the grace whatever clients do)
/// and the engine has stopped, its tiers' queued writes done.
///
/// If the engine stops on its own (its thread died), serving stops the same
/// way and this returns an error: a process must not stay up answering 503s
/// forever; its supervisor restarts it.
///
/// # Errors
/// An I/O error from the listener; [`std::io::ErrorKind::Other`] if the
/// engine died.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    engine: EngineHandle,
    signal: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
    limits: conn::Limits,
) -> std::io::Result<()> {
    let died = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = {
        let (engine, died) = (engine.clone(), Arc::clone(&died));
        async move {
            tokio::select! {
                () = signal => {}
                () = async {
                    while !engine.is_stopped() {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                } => {
                    died.store(true, std::sync::atomic::Ordering::SeqCst);
                    tracing::error!("the engine stopped unexpectedly; shutting down");
                }
            }
        }
    };
    let (engine_done, engine_stopped) = tokio::sync::oneshot::channel::<()>();
    let stop_engine = move || {
        tokio::spawn(async move {
            let _ = engine.shutdown(grace).await;
            let _ = engine_done.send(());
        });
    };
    conn::serve_with_limits(listener, app, limits, stop, grace, stop_engine).await?;
    // The engine's shutdown returns once its tiers have written what was
    // queued (agents' last turns made durable): returning earlier would let
    // the process exit under those writes. Clients cannot prolong this; a
    // stuck disk is bounded.
    if tokio::time::timeout(grace + ENGINE_FLUSH_BOUND, engine_stopped).await.is_err() {
        tracing::warn!("the engine did not finish stopping in time; exiting without it");
    }
    if died.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(std::io::Error::other("the engine stopped unexpectedly"));
    }
    Ok(())
}

/// How long past the grace `serve` waits for the engine to stop (its
/// tiers finishing their queued writes).
const ENGINE_FLUSH_BOUND: Duration = Duration::from_secs(30);

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
