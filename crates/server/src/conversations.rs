//! OpenAI's Conversations API: a conversation is a list of items kept by
//! the server, and an agent whose K/V stays warm between the responses
//! that run in it (`responses.rs` with `conversation`).
//!
//! | method and path | does |
//! |---|---|
//! | `POST /v1/conversations` | create, with optional initial `items` and `metadata` |
//! | `GET`, `POST`, `DELETE /v1/conversations/{id}` | read, set `metadata`, delete |
//! | `GET`, `POST /v1/conversations/{id}/items` | list a page of items, add items |
//! | `GET`, `DELETE /v1/conversations/{id}/items/{item_id}` | one item |
//!
//! Conversations are records of the response store (`response_store.rs`:
//! durable on disk, per tenant, another tenant's id a 404), changed under
//! their own lock. The agent is named after the conversation; deleting the
//! conversation deletes the agent too (its K/V in every tier), durably.
//! Deleting an item from the middle changes the next prompt from that
//! item on: the agent's cached tokens match only up to there, so the rest
//! is recomputed, never answered from stale K/V.

use axum::extract::{Path, Query, State};
use axum::Json;
use engine::TenantId;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::completions::{now_secs, random_id};
use crate::error::ApiError;
use crate::guard::JsonBody;
use crate::response_store::Conversation;
use crate::responses::{normalize, page, store, ListQuery};
use crate::{AppState, Tenant};

/// Most items a conversation holds.
pub(crate) const MAX_ITEMS: usize = 10_000;
/// Most items one call adds.
const MAX_ADD: usize = 20;
/// Most metadata keys, and their lengths (OpenAI's limits).
const MAX_METADATA: usize = 16;

fn invalid(param: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message)
}

fn not_found(id: &str) -> ApiError {
    let id: String = id.chars().take(64).collect();
    ApiError::not_found(format!("no conversation {id:?}"))
}

fn object(c: &Conversation) -> Value {
    json!({"id": c.id, "object": "conversation", "created_at": c.created_at, "metadata": c.metadata})
}

fn metadata(v: Option<Value>) -> Result<Map<String, Value>, ApiError> {
    let m = match v {
        None | Some(Value::Null) => return Ok(Map::new()),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(invalid("metadata", "must be an object of strings")),
    };
    if m.len() > MAX_METADATA {
        return Err(invalid("metadata", format!("at most {MAX_METADATA} keys")));
    }
    for (k, v) in &m {
        if k.len() > 64 || v.as_str().is_none_or(|s| s.len() > 512) {
            return Err(invalid("metadata", "keys are at most 64 characters, values strings of at most 512"));
        }
    }
    Ok(m)
}

fn items(v: Option<Value>, most: usize) -> Result<Vec<Value>, ApiError> {
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(invalid("items", "must be a list of items")),
    };
    if list.len() > most {
        return Err(invalid("items", format!("at most {most} items at once")));
    }
    list.into_iter()
        .map(|i| {
            normalize(i).map_err(|mut e| {
                e.param = Some("items");
                e
            })
        })
        .collect()
}

/// The tenant's conversation `id` (404 naming `param`'s kind otherwise).
pub(crate) async fn load(
    state: &AppState,
    tenant: &TenantId,
    id: &str,
    param: &'static str,
) -> Result<Conversation, ApiError> {
    store(state)?.get::<Conversation>(tenant.as_str(), id).await?.ok_or_else(|| {
        let mut e = not_found(id);
        e.param = Some(param);
        e
    })
}

/// Changes the tenant's conversation `id` with `f`, under its lock: read,
/// change, stamp, write back. Nothing is written when `f` refuses.
async fn change(
    state: &AppState,
    tenant: &TenantId,
    id: &str,
    param: &'static str,
    f: impl FnOnce(&mut Conversation) -> Result<(), ApiError>,
) -> Result<Conversation, ApiError> {
    let store = store(state)?;
    let _guard = store.lock(tenant.as_str(), id).await?;
    let mut c = load(state, tenant, id, param).await?;
    f(&mut c)?;
    c.updated_at = now_secs();
    store.put(&c).await?;
    Ok(c)
}

/// Appends a response's items to its conversation (the oldest go past
/// [`MAX_ITEMS`]).
pub(crate) async fn append(state: &AppState, tenant: &TenantId, id: &str, new: Vec<Value>) -> Result<(), ApiError> {
    change(state, tenant, id, "conversation", |c| {
        c.items.extend(new);
        if c.items.len() > MAX_ITEMS {
            let extra = c.items.len() - MAX_ITEMS;
            c.items.drain(..extra);
        }
        Ok(())
    })
    .await
    .map(drop)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateBody {
    items: Option<Value>,
    metadata: Option<Value>,
}

/// `POST /v1/conversations`.
pub(crate) async fn create(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<CreateBody>,
) -> Result<Json<Value>, ApiError> {
    let now = now_secs();
    let c = Conversation {
        id: format!("conv_{}", random_id()),
        tenant: tenant.as_str().to_owned(),
        created_at: now,
        updated_at: now,
        metadata: metadata(body.metadata)?,
        items: items(body.items, MAX_ADD)?,
    };
    store(&state)?.put(&c).await?;
    Ok(Json(object(&c)))
}

/// `GET /v1/conversations/{id}`.
pub(crate) async fn get(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(object(&load(&state, &tenant, &id, "conversation_id").await?)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateBody {
    metadata: Value,
}

/// `POST /v1/conversations/{id}`: replaces its metadata.
pub(crate) async fn update(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<UpdateBody>,
) -> Result<Json<Value>, ApiError> {
    let metadata = metadata(Some(body.metadata))?;
    let c = change(&state, &tenant, &id, "conversation_id", |c| {
        c.metadata = metadata;
        Ok(())
    })
    .await?;
    Ok(Json(object(&c)))
}

/// `DELETE /v1/conversations/{id}`: the conversation and its agent (its K/V
/// in every tier), durably.
pub(crate) async fn delete(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let store = store(&state)?;
    let _guard = store.lock(tenant.as_str(), &id).await?;
    if !store.delete(tenant.as_str(), &id).await? {
        return Err(not_found(&id));
    }
    if let Ok(agent) = engine::AgentId::new(&id) {
        match state.engine.delete_agent(&tenant, &agent).await {
            Ok(()) | Err(engine::Error::UnknownAgent(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Json(json!({"id": id, "object": "conversation.deleted", "deleted": true})))
}

/// `GET /v1/conversations/{id}/items`: a page of its items.
pub(crate) async fn list_items(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(page(&load(&state, &tenant, &id, "conversation_id").await?.items, &q)?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AddBody {
    items: Value,
}

/// `POST /v1/conversations/{id}/items`: appends items; answers them.
pub(crate) async fn add_items(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<AddBody>,
) -> Result<Json<Value>, ApiError> {
    let new = items(Some(body.items), MAX_ADD)?;
    if new.is_empty() {
        return Err(invalid("items", "give at least one item"));
    }
    change(&state, &tenant, &id, "conversation_id", |c| {
        if c.items.len() + new.len() > MAX_ITEMS {
            return Err(invalid("items", format!("a conversation holds at most {MAX_ITEMS} items")));
        }
        c.items.extend(new.iter().cloned());
        Ok(())
    })
    .await?;
    Ok(Json(json!({
        "object": "list",
        "data": new,
        "first_id": new.first().map(|i| i["id"].clone()),
        "last_id": new.last().map(|i| i["id"].clone()),
        "has_more": false,
    })))
}

/// `GET /v1/conversations/{id}/items/{item_id}`.
pub(crate) async fn get_item(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path((id, item)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let c = load(&state, &tenant, &id, "conversation_id").await?;
    c.items.into_iter().find(|i| i["id"] == item.as_str()).map(Json).ok_or_else(|| ApiError::not_found("no such item"))
}

/// `DELETE /v1/conversations/{id}/items/{item_id}`: answers the
/// conversation (module doc: the next response recomputes from there).
pub(crate) async fn delete_item(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path((id, item)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let c = change(&state, &tenant, &id, "conversation_id", |c| {
        let before = c.items.len();
        c.items.retain(|i| i["id"] != item.as_str());
        if c.items.len() == before {
            return Err(ApiError::not_found("no such item"));
        }
        Ok(())
    })
    .await?;
    Ok(Json(object(&c)))
}
