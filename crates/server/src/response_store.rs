//! Stored responses and conversations: what `POST /v1/responses` keeps
//! with `store: true` (the default) so that `previous_response_id` can
//! continue it and `GET /v1/responses/{id}` can return it, and the
//! Conversations API's conversations (`conversations.rs`).
//!
//! A record holds the response as answered, its input items and its output
//! items, the response it continued and the agent whose K/V holds the
//! chain (`responses.rs`). The K/V itself is the agent machinery's: pool,
//! RAM, disk and remote tiers, durable across restarts as agents are. A
//! record is written once the response has finished, after the engine has
//! taken the turn into the agent (data first, then the mapping): a crash
//! before the record is written loses the response id, never points one at
//! K/V that is not there; K/V lost since is recomputed from the record's
//! items, never refused.
//!
//! On disk (`kvserve serve` with a cache directory): one JSON file per
//! response under `responses/`, named by a hash of the tenant and the id
//! (never a client-chosen name), written to a temporary file, synced and
//! renamed into place, the directory synced after; a delete removes the
//! file and syncs the directory. A tenant asking for another tenant's id
//! hashes to a file that does not exist: a 404, as for an unknown id.
//! Without a directory (tests, `--disk-cache 0`) the records live in
//! memory. Records untouched for longer than the TTL are gone (404),
//! removed when met. File I/O runs on the blocking pool, never on the async
//! runtime.
//!
//! A conversation changes in place (items added and deleted, a response's
//! items appended): each change is a read-modify-write under the
//! conversation's own lock ([`ResponseStore::lock`]), so two at once both
//! land.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// One stored response (module doc).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Stored {
    pub(crate) id: String,
    pub(crate) tenant: String,
    /// Seconds since the Unix epoch.
    pub(crate) created_at: u64,
    /// The agent whose K/V holds the chain (`None`: the response ran
    /// without one).
    pub(crate) agent: Option<String>,
    pub(crate) previous_response_id: Option<String>,
    /// This response's input items, each with an id.
    pub(crate) input: Vec<Value>,
    /// Its output items.
    pub(crate) output: Vec<Value>,
    /// The response object as answered.
    pub(crate) response: Value,
}

/// A conversation of the Conversations API (`conversations.rs`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Conversation {
    pub(crate) id: String,
    pub(crate) tenant: String,
    pub(crate) created_at: u64,
    /// Its last change, for the TTL.
    pub(crate) updated_at: u64,
    pub(crate) metadata: serde_json::Map<String, Value>,
    /// Its items, oldest first, each with an id.
    pub(crate) items: Vec<Value>,
}

/// What the store keeps: its owner, id and last change.
pub(crate) trait Record: Serialize + serde::de::DeserializeOwned + Send + 'static {
    fn tenant(&self) -> &str;
    fn id(&self) -> &str;
    /// Seconds since the Unix epoch of its last change.
    fn touched(&self) -> u64;
}

impl Record for Stored {
    fn tenant(&self) -> &str {
        &self.tenant
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn touched(&self) -> u64 {
        self.created_at
    }
}

impl Record for Conversation {
    fn tenant(&self) -> &str {
        &self.tenant
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn touched(&self) -> u64 {
        self.updated_at
    }
}

enum Backend {
    /// Records as their JSON, by name.
    Memory(Mutex<HashMap<String, Vec<u8>>>),
    Disk(PathBuf),
}

/// The stored responses and conversations of every tenant (module doc).
#[derive(Clone)]
pub(crate) struct ResponseStore {
    backend: Arc<Backend>,
    ttl: Duration,
    /// Per-record locks for read-modify-write, by name (dead ones pruned).
    locks: Arc<Mutex<HashMap<String, std::sync::Weak<tokio::sync::Mutex<()>>>>>,
}

impl std::fmt::Debug for ResponseStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &*self.backend {
            Backend::Memory(_) => "memory",
            Backend::Disk(_) => "disk",
        };
        f.debug_struct("ResponseStore").field("backend", &kind).field("ttl", &self.ttl).finish()
    }
}

/// A record's name: a hash of its tenant and id.
fn key(tenant: &str, id: &str) -> String {
    let mut h = Sha256::new();
    h.update(tenant.as_bytes());
    h.update([0]);
    h.update(id.as_bytes());
    h.finalize().iter().take(20).map(|b| format!("{b:02x}")).collect()
}

fn storage_error(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "the response store failed");
    ApiError::internal()
}

fn now() -> u64 {
    crate::completions::now_secs()
}

impl ResponseStore {
    /// Records kept in memory only.
    pub(crate) fn memory(ttl: Duration) -> Self {
        Self { backend: Arc::new(Backend::Memory(Mutex::new(HashMap::new()))), ttl, locks: Arc::default() }
    }

    /// Records kept as files in `dir` (created if missing).
    ///
    /// # Errors
    /// The directory cannot be created.
    pub(crate) fn disk(dir: PathBuf, ttl: Duration) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self { backend: Arc::new(Backend::Disk(dir)), ttl, locks: Arc::default() })
    }

    fn expired(&self, r: &impl Record) -> bool {
        now().saturating_sub(r.touched()) > self.ttl.as_secs()
    }

    /// The lock of the tenant's record `id`, held across a
    /// read-modify-write.
    pub(crate) async fn lock(&self, tenant: &str, id: &str) -> Result<tokio::sync::OwnedMutexGuard<()>, ApiError> {
        let name = key(tenant, id);
        let lock = {
            let mut locks = self.locks.lock().map_err(storage_error)?;
            if locks.len() > 1024 {
                locks.retain(|_, l| l.strong_count() > 0);
            }
            match locks.get(&name).and_then(std::sync::Weak::upgrade) {
                Some(l) => l,
                None => {
                    let l = Arc::new(tokio::sync::Mutex::new(()));
                    locks.insert(name, Arc::downgrade(&l));
                    l
                }
            }
        };
        Ok(lock.lock_owned().await)
    }

    /// Stores `record`, durably where the store is on disk.
    pub(crate) async fn put(&self, record: &impl Record) -> Result<(), ApiError> {
        let name = key(record.tenant(), record.id());
        let bytes = serde_json::to_vec(record).map_err(storage_error)?;
        match &*self.backend {
            Backend::Memory(map) => {
                map.lock().map_err(storage_error)?.insert(name, bytes);
                Ok(())
            }
            Backend::Disk(dir) => {
                let dir = dir.clone();
                blocking(move || {
                    let tmp = dir.join(format!("{name}.tmp"));
                    let mut f = std::fs::File::create(&tmp)?;
                    f.write_all(&bytes)?;
                    f.sync_all()?;
                    std::fs::rename(&tmp, dir.join(format!("{name}.json")))?;
                    std::fs::File::open(&dir)?.sync_all()
                })
                .await
            }
        }
    }

    /// The tenant's record `id`, if stored and not expired.
    pub(crate) async fn get<T: Record>(&self, tenant: &str, id: &str) -> Result<Option<T>, ApiError> {
        let name = key(tenant, id);
        let bytes = match &*self.backend {
            Backend::Memory(map) => map.lock().map_err(storage_error)?.get(&name).cloned(),
            Backend::Disk(dir) => {
                let path = dir.join(format!("{name}.json"));
                blocking(move || match std::fs::read(&path) {
                    Ok(b) => Ok(Some(b)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(e),
                })
                .await?
            }
        };
        let found = bytes.and_then(|b| match serde_json::from_slice::<T>(&b) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "a stored record does not parse; treated as missing");
                None
            }
        });
        // The hash names the tenant; the check guards against a collision
        // (and a response id asked for as a conversation's).
        let found = found.filter(|r| r.tenant() == tenant && r.id() == id);
        match found {
            Some(r) if self.expired(&r) => {
                self.delete(tenant, id).await?;
                Ok(None)
            }
            other => Ok(other),
        }
    }

    /// Deletes the tenant's record `id`, durably; false if there was none.
    pub(crate) async fn delete(&self, tenant: &str, id: &str) -> Result<bool, ApiError> {
        let name = key(tenant, id);
        match &*self.backend {
            Backend::Memory(map) => Ok(map.lock().map_err(storage_error)?.remove(&name).is_some()),
            Backend::Disk(dir) => {
                let dir = dir.clone();
                blocking(move || match std::fs::remove_file(dir.join(format!("{name}.json"))) {
                    Ok(()) => std::fs::File::open(&dir)?.sync_all().map(|()| true),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                    Err(e) => Err(e),
                })
                .await
            }
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(storage_error)?.map_err(storage_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(tenant: &str, id: &str, created_at: u64) -> Stored {
        Stored {
            id: id.into(),
            tenant: tenant.into(),
            created_at,
            agent: None,
            previous_response_id: None,
            input: Vec::new(),
            output: Vec::new(),
            response: serde_json::json!({"id": id}),
        }
    }

    async fn round_trip(store: ResponseStore) {
        store.put(&record("a", "resp_1", now())).await.unwrap();
        assert_eq!(store.get::<Stored>("a", "resp_1").await.unwrap().unwrap().response["id"], "resp_1");
        assert!(store.get::<Stored>("b", "resp_1").await.unwrap().is_none(), "another tenant's id is unknown");
        assert!(!store.delete("b", "resp_1").await.unwrap());
        assert!(store.delete("a", "resp_1").await.unwrap());
        assert!(store.get::<Stored>("a", "resp_1").await.unwrap().is_none());
        // Expired records are gone.
        store.put(&record("a", "old", now() - 100)).await.unwrap();
        assert!(store.get::<Stored>("a", "old").await.unwrap().is_none());
        assert!(!store.delete("a", "old").await.unwrap(), "removed when met");
    }

    /// Two read-modify-writes at once on one record both land.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn changes_under_the_lock_never_lose_one_another() {
        let store = ResponseStore::memory(Duration::from_secs(50));
        let conv = Conversation {
            id: "conv_1".into(),
            tenant: "a".into(),
            created_at: now(),
            updated_at: now(),
            metadata: serde_json::Map::new(),
            items: Vec::new(),
        };
        store.put(&conv).await.unwrap();
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let _guard = store.lock("a", "conv_1").await.unwrap();
                    let mut c: Conversation = store.get("a", "conv_1").await.unwrap().unwrap();
                    tokio::task::yield_now().await;
                    c.items.push(serde_json::json!(i));
                    store.put(&c).await.unwrap();
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let c: Conversation = store.get("a", "conv_1").await.unwrap().unwrap();
        assert_eq!(c.items.len(), 16);
    }

    #[tokio::test]
    async fn records_round_trip_per_tenant_and_expire() {
        round_trip(ResponseStore::memory(Duration::from_secs(50))).await;
        let dir = tempfile::tempdir().unwrap();
        let store = ResponseStore::disk(dir.path().join("responses"), Duration::from_secs(50)).unwrap();
        round_trip(store.clone()).await;
        // A second store on the same directory (a restart) reads what the
        // first wrote; file names are hashes, not ids.
        store.put(&record("a", "resp_2", now())).await.unwrap();
        let again = ResponseStore::disk(dir.path().join("responses"), Duration::from_secs(50)).unwrap();
        assert!(again.get::<Stored>("a", "resp_2").await.unwrap().is_some());
        assert!(again.get::<Conversation>("a", "resp_2").await.unwrap().is_none(), "a response is no conversation");
        let names: Vec<String> = std::fs::read_dir(dir.path().join("responses"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 1);
        assert!(!names[0].contains("resp_2") && names[0].ends_with(".json"), "{names:?}");
    }
}
