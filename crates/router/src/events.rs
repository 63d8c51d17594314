//! Following one replica's KV events (`wire.rs` has the API): one task per
//! replica.
//!
//! ```text
//! read the snapshot ──(another model / block size / namespacing)──> refused; look again later
//!        │ matches
//!        ▼
//! index := snapshot ──> long-poll events since `next` ──> apply, loop
//!        ▲                         │
//!        └── 410 events_gap, a skipped seq, a new epoch (restart)
//! ```
//!
//! Every replica is checked against the router (fingerprint, block size,
//! namespacing), so the replicas routed to agree with each other too. A
//! replica is routed to only once its snapshot has matched: one without
//! the event API (404) or that refuses the router's key (401) is never
//! routed to, and the log says why once.
//!
//! A replica that does not answer keeps its entries (a stale hint costs a
//! miss at worst) and is polled again after `retry_delay`; the health task
//! decides whether it is routed to. The task never holds the state's lock
//! across a request: it fetches, then applies under the lock in one go.

use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::index::ReplicaId;
use crate::state::{Resync, Shared, Synced};
use crate::wire::{self, EventsPage, ReplicaInfo, Snapshot};

/// What a replica's snapshot must say to be routed to.
#[derive(Clone, Debug)]
pub(crate) struct Expect {
    /// Hex of the router's model fingerprint.
    pub(crate) fingerprint: String,
    pub(crate) block_size: usize,
}

/// The only namespacing the router computes addresses for.
pub(crate) const NAMESPACING: &str = "model+tenant";

impl Expect {
    /// Why `info` does not match, if it does not.
    pub(crate) fn mismatch(&self, info: &ReplicaInfo) -> Option<String> {
        if !info.model_fingerprint.eq_ignore_ascii_case(&self.fingerprint) {
            Some(format!(
                "it serves another model (fingerprint {}, the router's is {})",
                info.model_fingerprint.chars().take(64).collect::<String>(),
                self.fingerprint
            ))
        } else if info.block_size != self.block_size {
            Some(format!("its block size is {}, the router's is {}", info.block_size, self.block_size))
        } else if info.namespacing != NAMESPACING {
            Some(format!(
                "its namespacing is {:?}, the router computes {NAMESPACING:?}",
                info.namespacing.chars().take(64).collect::<String>()
            ))
        } else {
            None
        }
    }
}

/// Longest a snapshot (every block a replica holds) may take to arrive.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(30);

/// How a follower talks to its replica.
#[derive(Clone, Debug)]
pub(crate) struct Follow {
    pub(crate) client: reqwest::Client,
    /// Sent as `Authorization: Bearer` (the replicas' metrics key).
    pub(crate) key: Option<Arc<str>>,
    pub(crate) expect: Expect,
    /// Long-poll wait asked of the replica.
    pub(crate) wait: Duration,
    /// Pause after a failed request.
    pub(crate) retry_delay: Duration,
    /// Pause before reading a refused replica's snapshot again.
    pub(crate) recheck: Duration,
}

impl Follow {
    async fn get(&self, url: String, timeout: Duration) -> reqwest::Result<reqwest::Response> {
        let mut req = self.client.get(url).timeout(timeout);
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        req.send().await
    }

    async fn snapshot(&self, base: &str) -> Result<Snapshot> {
        let resp = self
            .get(format!("{base}/v1/kv/snapshot"), SNAPSHOT_TIMEOUT)
            .await
            .map_err(|source| Error::Unreachable { url: base.into(), source })?;
        if !resp.status().is_success() {
            return Err(Error::Status {
                url: base.into(),
                what: "GET /v1/kv/snapshot",
                status: resp.status().as_u16(),
            });
        }
        let bytes = resp.bytes().await.map_err(|source| Error::Unreachable { url: base.into(), source })?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Malformed {
            url: base.into(),
            what: "snapshot",
            reason: e.to_string(),
        })
    }

    async fn events(&self, base: &str, since: u64) -> Result<EventsPage> {
        let url = format!("{base}/v1/kv/events?since={since}&wait_ms={}", self.wait.as_millis());
        let resp = self
            .get(url, self.wait + Duration::from_secs(5))
            .await
            .map_err(|source| Error::Unreachable { url: base.into(), source })?;
        if resp.status() == reqwest::StatusCode::GONE {
            return Err(Error::EventsGap { url: base.into() });
        }
        if !resp.status().is_success() {
            return Err(Error::Status { url: base.into(), what: "GET /v1/kv/events", status: resp.status().as_u16() });
        }
        let bytes = resp.bytes().await.map_err(|source| Error::Unreachable { url: base.into(), source })?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Malformed {
            url: base.into(),
            what: "events page",
            reason: e.to_string(),
        })
    }
}

/// Parses a snapshot's blocks; blocks in unknown tiers are skipped.
fn synced(snap: Snapshot, base: &str) -> Result<Synced> {
    let mut blocks = Vec::with_capacity(snap.blocks.len());
    for b in &snap.blocks {
        let Some(tier) = crate::index::Tier::parse(&b.tier) else { continue };
        let hash = wire::parse_hash(&b.hash).map_err(|e| Error::Malformed {
            url: base.into(),
            what: "snapshot block",
            reason: e.to_string(),
        })?;
        blocks.push((hash, tier));
    }
    Ok(Synced { epoch: snap.replica.epoch, next: snap.next, load: snap.load, blocks })
}

/// Follows replica `id` at `base` for ever (the task is aborted when the
/// router goes).
pub(crate) async fn follow(shared: Arc<Shared>, id: ReplicaId, base: Arc<str>, f: Follow) {
    let mut resync = false;
    // The last refusing status logged, so a replica that answers 404 (no
    // KV event API) or 401 (another metrics key) is logged once, not
    // every second.
    let mut said: Option<u16> = None;
    loop {
        // Read the snapshot.
        let snap = match f.snapshot(&base).await {
            Ok(s) => s,
            Err(Error::Status { status, .. }) => {
                if said.replace(status) != Some(status) {
                    let hint = match status {
                        401 | 403 => " (give the router the replicas' --metrics-key)",
                        404 => " (does it publish KV events? a kvserve without them is never routed to)",
                        _ => "",
                    };
                    tracing::warn!(replica = %base, status, "KV snapshot refused{hint}");
                }
                tokio::time::sleep(f.retry_delay).await;
                continue;
            }
            Err(e) => {
                tracing::debug!(replica = %base, error = %e, "KV snapshot unavailable");
                tokio::time::sleep(f.retry_delay).await;
                continue;
            }
        };
        said = None;
        if let Some(why) = f.expect.mismatch(&snap.replica) {
            if shared.refuse(id, why.clone()) {
                tracing::warn!(replica = %base, "replica refused, never routed to: {why}");
            }
            tokio::time::sleep(f.recheck).await;
            continue;
        }
        match synced(snap, &base) {
            Ok(s) => {
                tracing::info!(replica = %base, epoch = %s.epoch, blocks = s.blocks.len(), next = s.next, "KV index synced");
                shared.resync(id, s, resync);
            }
            Err(e) => {
                tracing::warn!(replica = %base, error = %e, "KV snapshot unreadable");
                tokio::time::sleep(f.retry_delay).await;
                continue;
            }
        }
        resync = true;
        poll(&shared, id, &base, &f).await;
    }
}

/// Long-polls events until the snapshot must be read again.
async fn poll(shared: &Shared, id: ReplicaId, base: &str, f: &Follow) {
    loop {
        let Some((epoch, since)) = shared.position(id) else { return };
        let page = match f.events(base, since).await {
            Ok(p) => p,
            Err(Error::EventsGap { .. }) => {
                tracing::info!(replica = %base, since, "KV events lost; reading the snapshot again");
                return;
            }
            Err(e) => {
                tracing::debug!(replica = %base, error = %e, "KV events unavailable");
                tokio::time::sleep(f.retry_delay).await;
                continue;
            }
        };
        if f.expect.mismatch(&page.replica).is_some() {
            return;
        }
        let mut events = Vec::with_capacity(page.events.len());
        for ev in &page.events {
            match ev.parse() {
                Ok(Some(e)) => events.push((ev.seq, e)),
                Ok(None) => {}
                Err(e) => {
                    // A block the index cannot name: only a snapshot
                    // brings the index back in line.
                    tracing::warn!(replica = %base, error = %e, "malformed KV event; reading the snapshot again");
                    return;
                }
            }
        }
        // The replica's oldest event, or the first it sent, past where
        // the index is: events were skipped.
        let first =
            page.events.first().map(|e| e.seq).into_iter().chain((page.first > since).then_some(page.first)).max();
        match shared.apply(id, &page.replica.epoch, first, &events, page.next, page.load) {
            Ok(_) => {}
            Err(Resync::Epoch) => {
                tracing::info!(replica = %base, old = %epoch, new = %page.replica.epoch, "replica restarted; reading the snapshot again");
                return;
            }
            Err(Resync::Gap) => {
                tracing::info!(replica = %base, since, "KV events skipped; reading the snapshot again");
                return;
            }
            Err(Resync::NotSynced) => return,
        }
    }
}
