//! `GET /v1/kv/snapshot` and `GET /v1/kv/events`: what this replica's KV
//! cache holds, for a router (`kvserve route`) that sends each request to
//! the replica that has its prefix. The engine keeps the log
//! (`engine::KvEvents`); this module is its JSON and its long poll.
//!
//! * `GET /v1/kv/snapshot` → `{"replica": {epoch, model_fingerprint,
//!   block_size, namespacing}, "next": N, "load": {...}, "blocks": [{"hash",
//!   "tier"}]}`: every block held, exact as of event `N`.
//! * `GET /v1/kv/events?since=N&wait_ms=M` → `{"replica", "first", "next",
//!   "events": [{"seq", "type", "tier", "hash", "parent"}], "load"}`:
//!   events from `N` on (at most [`MAX_EVENTS`]), waiting up to `M` ms
//!   (at most [`MAX_WAIT`]) when there are none yet. `N` older than the
//!   oldest kept, or from another epoch: 410 `events_gap` (read the
//!   snapshot again).
//!
//! Block addresses are `kv`'s, in lowercase hex; a router computes the same
//! from a prompt's tokens and `kv::Namespace::new(model_fingerprint,
//! tenant)`. Both endpoints are guarded like `/metrics` (they describe
//! every tenant's cache).

use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use engine::{EngineHandle, KvEvent};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::AppState;

/// Events returned by one call at most.
pub const MAX_EVENTS: usize = 10_000;
/// The longest a call waits for new events.
pub const MAX_WAIT: Duration = Duration::from_secs(10);

/// The query of `GET /v1/kv/events`.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct EventsQuery {
    #[serde(default)]
    since: u64,
    #[serde(default)]
    wait_ms: u64,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn replica(engine: &EngineHandle, fingerprint: &[u8], block_size: usize) -> Value {
    json!({
        "epoch": format!("{:016x}", engine.kv_events().epoch()),
        "model_fingerprint": hex(fingerprint),
        "block_size": block_size,
        "namespacing": "model+tenant",
    })
}

fn load(engine: &EngineHandle) -> Value {
    let s = engine.stats();
    json!({
        "running": s.running,
        "waiting": s.waiting,
        "free_blocks": s.cache.free_blocks + s.cache.cached_blocks,
        "total_blocks": s.cache.total_blocks,
    })
}

fn event(e: &KvEvent) -> Value {
    json!({
        "seq": e.seq,
        "type": e.kind.as_str(),
        "tier": e.tier,
        "hash": e.hash.map(|h| h.to_string()),
        "parent": e.parent.map(|h| h.to_string()),
    })
}

/// `GET /v1/kv/snapshot`.
pub(crate) async fn snapshot(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(e) = state.guard.check_metrics(&headers) {
        return e.into_response();
    }
    let snap = match state.engine.kv_snapshot().await {
        Ok(s) => s,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let blocks: Vec<Value> = snap.blocks.iter().map(|(h, tier)| json!({"hash": h.to_string(), "tier": tier})).collect();
    Json(json!({
        "replica": replica(&state.engine, &snap.model_fingerprint, snap.block_size),
        "next": snap.next,
        "load": load(&state.engine),
        "blocks": blocks,
    }))
    .into_response()
}

/// `GET /v1/kv/events`.
pub(crate) async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Response {
    if let Err(e) = state.guard.check_metrics(&headers) {
        return e.into_response();
    }
    let log = state.engine.kv_events();
    let mut rx = log.subscribe();
    let wait = Duration::from_millis(q.wait_ms).min(MAX_WAIT);
    // Nothing new yet: wait for the next append, or the time asked.
    if log.next() == q.since && !wait.is_zero() {
        let _ = tokio::time::timeout(wait, rx.wait_for(|next| *next > q.since)).await;
    }
    let (fingerprint, block_size) = (state.engine.model_fingerprint(), state.engine.limits().block_size);
    match log.read(q.since, MAX_EVENTS) {
        Ok(b) => Json(json!({
            "replica": replica(&state.engine, fingerprint, block_size),
            "first": b.first,
            "next": q.since + b.events.len() as u64,
            "events": b.events.iter().map(event).collect::<Vec<_>>(),
            "load": load(&state.engine),
        }))
        .into_response(),
        Err(gap) => (
            StatusCode::GONE,
            Json(json!({"error": {
                "message": gap.to_string(),
                "type": "invalid_request_error",
                "code": "events_gap",
                "first": gap.first,
                "next": gap.next,
            }})),
        )
            .into_response(),
    }
}
