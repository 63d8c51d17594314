//! The agent API under `/v1/agents`: list, inspect, delete, and retention.
//!
//! | method and path | does |
//! |---|---|
//! | `GET /v1/agents` | the tenant's agents |
//! | `GET /v1/agents/{id}` | one agent (404 if unknown) |
//! | `DELETE /v1/agents/{id}` | forget it, freeing its blocks |
//! | `PATCH /v1/agents/{id}` | `{"pinned": true}`, `{"ttl_seconds": 600}`, `{"priority": 2}` |
//! | `POST /v1/agents/{id}/pin`, `/unpin` | shorthands |
//! | `POST /v1/agents/{id}/hand-over` | forget it here but keep it in the shared (remote) tier: a router moved it to another replica |
//!
//! An agent appears with its first turn. Ids are validated like the body's
//! `agent_id` (400 when invalid); tenants see only their own agents.

use std::time::Duration;

use axum::extract::State;
use axum::Json;
use engine::{AgentId, AgentInfo, AgentUpdate, Retention};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::guard::{AgentPath, JsonBody};
use crate::{AppState, Tenant};

/// The longest TTL a client may set: a year.
const MAX_TTL_SECONDS: u64 = 365 * 24 * 3600;

fn agent_id(id: &str) -> Result<AgentId, ApiError> {
    AgentId::new(id).map_err(|e| ApiError::invalid("agent_id", e.to_string()))
}

pub(crate) async fn list(State(state): State<AppState>, Tenant(tenant): Tenant) -> Result<Json<Value>, ApiError> {
    let agents = state.engine.agents(&tenant).await?;
    Ok(Json(json!({"object": "list", "data": agents})))
}

pub(crate) async fn get(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    AgentPath(id): AgentPath,
) -> Result<Json<AgentInfo>, ApiError> {
    Ok(Json(state.engine.agent(&tenant, &agent_id(&id)?).await?))
}

pub(crate) async fn delete(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    AgentPath(id): AgentPath,
) -> Result<Json<Value>, ApiError> {
    let id = agent_id(&id)?;
    state.engine.delete_agent(&tenant, &id).await?;
    Ok(Json(json!({"id": id, "object": "agent.deleted", "deleted": true})))
}

pub(crate) async fn hand_over(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    AgentPath(id): AgentPath,
) -> Result<Json<Value>, ApiError> {
    let id = agent_id(&id)?;
    state.engine.hand_over_agent(&tenant, &id).await?;
    Ok(Json(json!({"id": id, "object": "agent.handed_over", "handed_over": true})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Patch {
    pinned: Option<bool>,
    ttl_seconds: Option<u64>,
    priority: Option<i32>,
}

pub(crate) async fn patch(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    AgentPath(id): AgentPath,
    JsonBody(p): JsonBody<Patch>,
) -> Result<Json<AgentInfo>, ApiError> {
    let id = agent_id(&id)?;
    let retention = match (p.pinned, p.ttl_seconds) {
        (Some(true), Some(_)) => return Err(ApiError::invalid("ttl_seconds", "a pinned agent has no TTL")),
        (Some(true), None) => Some(Retention::Pinned),
        (_, Some(0)) => return Err(ApiError::invalid("ttl_seconds", "must be at least 1")),
        (_, Some(s)) if s > MAX_TTL_SECONDS => {
            return Err(ApiError::invalid("ttl_seconds", "must be at most 31536000 (a year)"))
        }
        (_, Some(s)) => Some(Retention::Ttl(Duration::from_secs(s))),
        (Some(false), None) => Some(Retention::Evictable),
        (None, None) => None,
    };
    let priority = p.priority.map(|x| crate::check_priority(x, state.max_priority)).transpose()?;
    let update = AgentUpdate { retention, priority };
    Ok(Json(state.engine.update_agent(&tenant, &id, update).await?))
}

async fn set(state: &AppState, tenant: &engine::TenantId, id: &str, r: Retention) -> Result<Json<AgentInfo>, ApiError> {
    let update = AgentUpdate { retention: Some(r), priority: None };
    Ok(Json(state.engine.update_agent(tenant, &agent_id(id)?, update).await?))
}

pub(crate) async fn pin(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    AgentPath(id): AgentPath,
) -> Result<Json<AgentInfo>, ApiError> {
    set(&state, &tenant, &id, Retention::Pinned).await
}

pub(crate) async fn unpin(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    AgentPath(id): AgentPath,
) -> Result<Json<AgentInfo>, ApiError> {
    set(&state, &tenant, &id, Retention::Evictable).await
}
