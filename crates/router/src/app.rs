//! The router's HTTP face: the OpenAI-compatible routes, proxied; the agent
//! API; its own `/health` and `/metrics`.
//!
//! | route | goes to |
//! |---|---|
//! | `POST /v1/chat/completions`, `/v1/completions` | the choice for the agent or the prompt (`policy.rs`) |
//! | `POST /v1/responses` | the same rules, by agent or load (its prompt is not read) |
//! | `GET /v1/models` | the least loaded replica |
//! | `GET /v1/agents` | every replica; the lists merged (an agent on several: its most recently used entry) |
//! | `DELETE /v1/agents/{id}` | every replica (an agent that overflowed under load has blocks on several); the home's answer, or the first success |
//! | other `/v1/agents/{id}...` | the agent's rendezvous home |
//! | `GET /health` | 200 `{"status": "ok", "replicas": {"healthy", "total"}}` while one replica is routable, else 503 |
//! | `GET /metrics` | the router's metrics (`metrics.rs`) |
//!
//! The same guard as `kvserve serve` ([`server::Guard`]): `Host` and
//! `Origin` rules, API keys (401 before anything is forwarded; the key
//! names the tenant, part of block addresses and agent homes), the metrics
//! key. The client's `Authorization` header is forwarded, so replicas
//! check the same keys.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Json;
use futures_util::future::join_all;
use serde_json::{json, Value};
use server::{ApiError, Endpoint, Guard};

use crate::plan::Planner;
use crate::proxy::{self, Outgoing};
use crate::state::{Plan, Shared, Target};

/// What every handler reaches.
#[derive(Clone)]
pub(crate) struct App {
    pub(crate) shared: Arc<Shared>,
    pub(crate) client: reqwest::Client,
    pub(crate) planner: Arc<Planner>,
    pub(crate) guard: Arc<Guard>,
    pub(crate) max_body: usize,
    pub(crate) body_timeout: Duration,
}

/// The router's routes.
pub(crate) fn routes(app: App) -> axum::Router {
    let max_body = app.max_body;
    axum::Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completion))
        .route("/v1/responses", post(responses))
        .route("/v1/models", get(models))
        .route("/v1/agents", get(list_agents))
        .route("/v1/agents/{id}", any(agent))
        .route("/v1/agents/{id}/{action}", any(agent_action))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(axum::middleware::from_fn_with_state(app.clone(), check_host))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(app)
}

async fn check_host(State(app): State<App>, req: Request, next: Next) -> Response {
    if let Err(e) = app.guard.check_host(req.method(), req.headers()) {
        return e.into_response();
    }
    next.run(req).await
}

/// A request taken apart: what forwarding needs, the body read (within
/// the limit and the body timeout), the tenant checked.
struct Incoming {
    method: Method,
    path: String,
    headers: HeaderMap,
    tenant: String,
    body: Bytes,
}

async fn incoming(app: &App, req: Request) -> Result<Incoming, ApiError> {
    let tenant = app.guard.tenant(req.headers())?.as_str().to_owned();
    let method = req.method().clone();
    let path = req.uri().path_and_query().map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned());
    let headers = req.headers().clone();
    let body = match tokio::time::timeout(app.body_timeout, Bytes::from_request(req, &())).await {
        Err(_) => return Err(ApiError::body_timeout()),
        Ok(Ok(b)) => b,
        Ok(Err(rej)) if rej.status() == StatusCode::PAYLOAD_TOO_LARGE => return Err(ApiError::too_large(app.max_body)),
        Ok(Err(rej)) => return Err(ApiError::bad_json(rej.body_text())),
    };
    Ok(Incoming { method, path, headers, tenant, body })
}

async fn route(app: &App, req: Incoming, target: Target, arrived: Option<Instant>) -> Response {
    let plan = Plan { tenant: req.tenant, target };
    let out = Outgoing { method: &req.method, path: &req.path, headers: &req.headers, body: req.body, arrived };
    proxy::forward(&app.shared, &app.client, &plan, out).await
}

async fn complete(app: App, endpoint: Option<Endpoint>, req: Request) -> Response {
    let arrived = Instant::now();
    let req = match incoming(&app, req).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let target = app.planner.completion(endpoint, &req.tenant, &req.headers, &req.body).await;
    route(&app, req, target, Some(arrived)).await
}

async fn chat(State(app): State<App>, req: Request) -> Response {
    complete(app, Some(Endpoint::Chat), req).await
}

async fn completion(State(app): State<App>, req: Request) -> Response {
    complete(app, Some(Endpoint::Completion), req).await
}

async fn responses(State(app): State<App>, req: Request) -> Response {
    complete(app, None, req).await
}

async fn models(State(app): State<App>, req: Request) -> Response {
    match incoming(&app, req).await {
        Ok(req) => route(&app, req, Target::Any, None).await,
        Err(e) => e.into_response(),
    }
}

fn agent_path(id: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    id.map(|Path(id)| id).map_err(|_| ApiError::invalid("agent_id", "the agent id in the path does not decode (UTF-8)"))
}

async fn agent(State(app): State<App>, id: Result<Path<String>, PathRejection>, req: Request) -> Response {
    let id = match agent_path(id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    let req = match incoming(&app, req).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if req.method == Method::DELETE {
        return delete_everywhere(&app, req, &id).await;
    }
    route(&app, req, Target::AgentHome(id), None).await
}

async fn agent_action(
    State(app): State<App>,
    ids: Result<Path<(String, String)>, PathRejection>,
    req: Request,
) -> Response {
    let Ok(Path((id, _action))) = ids else {
        return ApiError::invalid("agent_id", "the agent id in the path does not decode (UTF-8)").into_response();
    };
    match incoming(&app, req).await {
        Ok(req) => route(&app, req, Target::AgentHome(id), None).await,
        Err(e) => e.into_response(),
    }
}

/// An answer read whole (the agent API's are small).
struct Whole {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl IntoResponse for Whole {
    fn into_response(self) -> Response {
        let mut out = Response::new(Body::from(self.body));
        *out.status_mut() = self.status;
        *out.headers_mut() = self.headers;
        out
    }
}

/// Sends `req` to every routable replica (`home_of`'s home first), each
/// answer read whole; failures are logged and left out.
async fn everywhere(app: &App, req: &Incoming, home_of: Option<&str>) -> Option<Vec<Whole>> {
    let replicas = app.shared.routable(home_of.map(|agent| (req.tenant.as_str(), agent)));
    if replicas.is_empty() {
        return None;
    }
    let calls = replicas.iter().map(|(id, url)| async move {
        let answer = async {
            let r = proxy::send(&app.client, url, &req.method, &req.path, &req.headers, req.body.clone()).await?;
            let (status, headers) = (r.status(), proxy::forwarded(r.headers()));
            Ok::<_, reqwest::Error>(Whole { status, headers, body: r.bytes().await? })
        };
        match answer.await {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(replica = %url, error = %e, "replica failed");
                if e.is_connect() {
                    app.shared.mark_down(*id);
                }
                None
            }
        }
    });
    Some(join_all(calls).await.into_iter().flatten().collect())
}

async fn delete_everywhere(app: &App, req: Incoming, id: &str) -> Response {
    let Some(answers) = everywhere(app, &req, Some(id)).await else { return proxy::no_replica() };
    // Answers keep the rendezvous order: the home's first.
    let ok = answers.iter().position(|w| w.status.is_success());
    match ok.or(if answers.is_empty() { None } else { Some(0) }) {
        Some(i) => answers.into_iter().nth(i).map_or_else(proxy::bad_gateway, IntoResponse::into_response),
        None => proxy::bad_gateway(),
    }
}

async fn list_agents(State(app): State<App>, req: Request) -> Response {
    let req = match incoming(&app, req).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let Some(answers) = everywhere(&app, &req, None).await else { return proxy::no_replica() };
    let mut merged: Vec<Value> = Vec::new();
    let mut at: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut any_ok = false;
    let used = |a: &Value| a.get("last_used_unix").and_then(Value::as_u64).unwrap_or(0);
    for w in &answers {
        if !w.status.is_success() {
            continue;
        }
        let Ok(list) = serde_json::from_slice::<Value>(&w.body) else { continue };
        any_ok = true;
        for agent in list.get("data").and_then(Value::as_array).into_iter().flatten() {
            let id = agent.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
            match at.get(&id) {
                Some(&i) if used(&merged[i]) < used(agent) => merged[i] = agent.clone(),
                Some(_) => {}
                None => {
                    at.insert(id, merged.len());
                    merged.push(agent.clone());
                }
            }
        }
    }
    if !any_ok {
        // Every replica refused (the same key checks everywhere): the
        // first answer says why; none at all is a gateway failure.
        return answers.into_iter().next().map_or_else(proxy::bad_gateway, IntoResponse::into_response);
    }
    Json(json!({"object": "list", "data": merged})).into_response()
}

async fn health(State(app): State<App>) -> Response {
    let (healthy, total) = app.shared.health_summary();
    let body = json!({"status": if healthy > 0 { "ok" } else { "unavailable" }, "replicas": {"healthy": healthy, "total": total}});
    let status = if healthy > 0 { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

async fn metrics(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Err(e) = app.guard.check_metrics(&headers) {
        return e.into_response();
    }
    let body = crate::metrics::render(&app.shared.snapshot());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}
