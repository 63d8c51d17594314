//! Agents: conversations whose K/V stays in the cache between turns.
//!
//! After a turn, the request's sequence (prompt and answer, all computed)
//! becomes the agent's: the blocks stay referenced, so nothing evicts them.
//! The next turn's prompt is compared token by token with the agent's
//! tokens; the engine forks the agent's sequence and truncates the fork to
//! the common prefix, so only the new tokens are prefilled — partial blocks
//! included (copy-on-write takes care of the one the new turn writes into).
//!
//! The history a client sends back is text, tokenized again; the model may
//! have generated that text with other tokens (under a grammar it can write
//! `"` then `,` where the tokenizer would write `",`). Where the new
//! prompt's text continues the agent's text exactly (control tokens never
//! stand in for literal text), the turn keeps the agent's own token ids
//! for it, so the whole previous turn is a cache hit and the model reads its
//! history as it wrote it. The splice depends only on the agent's recorded
//! tokens, never on what the cache holds.
//!
//! Retention decides how long an agent holds its blocks:
//! - [`Retention::Pinned`]: until deleted or unpinned;
//! - [`Retention::Ttl`]: for that long after its last turn, then the agent is
//!   forgotten (its blocks released);
//! - [`Retention::Evictable`] (default): until memory runs short.
//!
//! Under pressure the engine releases idle, unpinned agents' sequences in
//! order of (priority, last use): lowest priority and least recently used
//! first. A released agent keeps its settings but not its token history;
//! its full blocks stay *cached* in the prefix index until the pool's LRU
//! evicts them, so a later turn still reuses whatever survived.
//!
//! An agent exists from its first turn's admission; a first turn that ends
//! without an answer (cancelled, failed) leaves nothing behind. A tenant
//! keeps at most `max_agents_per_tenant` agents: a new one past that makes
//! it forget its least recently used idle evictable agent (pinned and TTL
//! agents are kept as promised; with none to forget, the new agent's request
//! is refused).

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use kv::{BlockHash, SeqId};
use serde::Serialize;

use crate::request::{AgentId, RequestId, TenantId};

/// How long an agent keeps its cache. Serialized as `"evictable"`,
/// `"pinned"` or `{"ttl_seconds": N}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Retention {
    /// Until memory runs short (released before running requests are
    /// preempted).
    #[default]
    Evictable,
    /// Until deleted or unpinned; never released for memory.
    Pinned,
    /// Forgotten this long after its last turn.
    Ttl(Duration),
}

impl Serialize for Retention {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            Self::Evictable => s.serialize_str("evictable"),
            Self::Pinned => s.serialize_str("pinned"),
            Self::Ttl(ttl) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("ttl_seconds", &ttl.as_secs())?;
                m.end()
            }
        }
    }
}

/// What the engine remembers of one agent.
#[derive(Debug)]
pub(crate) struct Agent {
    /// The sequence holding its conversation's blocks, while retained.
    pub(crate) seq: Option<SeqId>,
    /// The conversation so far (prompt and answer tokens with computed K/V).
    pub(crate) tokens: Vec<u32>,
    /// The addresses of its conversation's full blocks (what a tier holds
    /// them under).
    pub(crate) chain: Vec<BlockHash>,
    /// The durable tiers (a bit per position in the tier list) its latest
    /// turn is not committed to yet: the commit was deferred (write queue
    /// full, tier failing) or failed.
    pub(crate) dirty: u64,
    /// A dirty agent's commit is worth retrying (deferred, or the disk was
    /// failing and may resume), as opposed to refused for lack of room.
    pub(crate) retry_commit: bool,
    pub(crate) retention: Retention,
    pub(crate) priority: i32,
    pub(crate) last_used: Instant,
    pub(crate) last_used_wall: SystemTime,
    pub(crate) turns: u64,
    /// The request running a turn now; later turns wait for it.
    pub(crate) busy: Option<RequestId>,
}

/// One agent as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AgentInfo {
    /// Its id.
    pub id: AgentId,
    /// Its tenant.
    pub tenant: TenantId,
    /// Tokens of its conversation whose K/V is held.
    pub cached_tokens: usize,
    /// Blocks its sequence references (shared blocks count once here).
    pub blocks_held: usize,
    /// On a hybrid model (Gemma 3): the sliding-window pages its window
    /// holds (its last window's blocks; see `model::kv_store`), which its
    /// tenant's quota and pinned share count. Absent for other models.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_pages: Option<usize>,
    /// Turns completed.
    pub turns: u64,
    /// Retention policy.
    pub retention: Retention,
    /// Eviction priority (higher is kept longer).
    pub priority: i32,
    /// Last turn's end, seconds since the Unix epoch.
    pub last_used_unix: u64,
    /// A turn is running.
    pub busy: bool,
    /// Where its conversation's blocks are.
    pub blocks: BlockLocations,
}

/// Where an agent's blocks are: how many of its conversation's full
/// blocks the pool and each tier hold (a block on disk may be in the pool
/// or RAM too; the RAM tier never holds what the pool holds).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BlockLocations {
    /// In the pool (held by the agent, or cached).
    pub pool: usize,
    /// Per tier, by the tier's name ("ram", "disk", ...): serialized beside
    /// `pool`, one field per configured tier.
    #[serde(flatten)]
    pub tiers: std::collections::BTreeMap<&'static str, usize>,
    /// Its latest turn's manifest is durable in a durable tier: a crash now
    /// would bring it back at this turn.
    pub durable: bool,
}

impl BlockLocations {
    /// Blocks the tier named `name` holds (0 without such a tier).
    pub fn tier(&self, name: &str) -> usize {
        self.tiers.get(name).copied().unwrap_or(0)
    }
}

/// Changes to an agent's retention.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentUpdate {
    /// New retention, if given.
    pub retention: Option<Retention>,
    /// New priority, if given.
    pub priority: Option<i32>,
}

pub(crate) type AgentKey = (TenantId, AgentId);

/// All agents, keyed by tenant and id (tenants cannot see each other's).
#[derive(Debug, Default)]
pub(crate) struct Agents {
    map: HashMap<AgentKey, Agent>,
}

impl Agents {
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn get(&self, key: &AgentKey) -> Option<&Agent> {
        self.map.get(key)
    }

    pub(crate) fn get_mut(&mut self, key: &AgentKey) -> Option<&mut Agent> {
        self.map.get_mut(key)
    }

    /// The agent, created empty on first use.
    pub(crate) fn entry(&mut self, key: AgentKey) -> &mut Agent {
        self.map.entry(key).or_insert_with(|| Agent {
            seq: None,
            tokens: Vec::new(),
            chain: Vec::new(),
            dirty: 0,
            retry_commit: false,
            retention: Retention::default(),
            priority: 0,
            last_used: Instant::now(),
            last_used_wall: SystemTime::now(),
            turns: 0,
            busy: None,
        })
    }

    pub(crate) fn remove(&mut self, key: &AgentKey) -> Option<Agent> {
        self.map.remove(key)
    }

    /// Agents `tenant` has.
    pub(crate) fn count_of(&self, tenant: &TenantId) -> usize {
        self.map.keys().filter(|k| &k.0 == tenant).count()
    }

    /// The agent `tenant` should forget to make room for a new one: idle,
    /// evictable, with at least one turn done (an agent with none is
    /// waiting for its first), lowest priority, then least recently used.
    pub(crate) fn forget_candidate(&self, tenant: &TenantId) -> Option<AgentKey> {
        self.map
            .iter()
            .filter(|(k, a)| &k.0 == tenant && a.busy.is_none() && a.turns > 0 && a.retention == Retention::Evictable)
            .min_by_key(|(_, a)| (a.priority, a.last_used))
            .map(|(k, _)| k.clone())
    }

    /// Every agent.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&AgentKey, &Agent)> {
        self.map.iter()
    }

    /// Every agent's key.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &AgentKey> {
        self.map.keys()
    }

    /// Agents whose latest turn still has to be committed to a durable
    /// tier, and worth trying again, with the tiers that lack it.
    pub(crate) fn dirty(&self) -> Vec<(AgentKey, u64)> {
        self.map
            .iter()
            .filter(|(_, a)| a.dirty != 0 && a.retry_commit && a.busy.is_none())
            .map(|(k, a)| (k.clone(), a.dirty))
            .collect()
    }

    pub(crate) fn keys_of(&self, tenant: &TenantId) -> Vec<AgentKey> {
        let mut keys: Vec<AgentKey> = self.map.keys().filter(|k| &k.0 == tenant).cloned().collect();
        keys.sort();
        keys
    }

    /// Agents whose TTL ran out by `now` and that are not mid-turn.
    pub(crate) fn expired(&self, now: Instant) -> Vec<AgentKey> {
        self.map
            .iter()
            .filter(|(_, a)| {
                a.busy.is_none() && matches!(a.retention, Retention::Ttl(ttl) if now.duration_since(a.last_used) >= ttl)
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The earliest TTL expiry, to bound how long the engine may sleep.
    pub(crate) fn next_expiry(&self) -> Option<Instant> {
        self.map
            .values()
            .filter_map(|a| match a.retention {
                // A TTL too long for the clock never expires.
                Retention::Ttl(ttl) if a.busy.is_none() => a.last_used.checked_add(ttl),
                _ => None,
            })
            .min()
    }

    /// The idle, unpinned agent holding a sequence that should give it up
    /// first: lowest priority, then least recently used; only `tenant`'s
    /// when given; never `except` (the agent a waiting turn is about to
    /// reuse).
    pub(crate) fn release_candidate(&self, tenant: Option<&TenantId>, except: Option<&AgentKey>) -> Option<AgentKey> {
        self.map
            .iter()
            .filter(|(k, a)| {
                a.seq.is_some()
                    && a.busy.is_none()
                    && a.retention != Retention::Pinned
                    && Some(*k) != except
                    && tenant.is_none_or(|t| &k.0 == t)
            })
            .min_by_key(|(_, a)| (a.priority, a.last_used))
            .map(|(k, _)| k.clone())
    }

    pub(crate) fn info(&self, key: &AgentKey, blocks_held: usize, blocks: BlockLocations) -> Option<AgentInfo> {
        let a = self.map.get(key)?;
        Some(AgentInfo {
            id: key.1.clone(),
            tenant: key.0.clone(),
            cached_tokens: if a.seq.is_some() { a.tokens.len() } else { 0 },
            blocks_held,
            window_pages: None,
            turns: a.turns,
            retention: a.retention,
            priority: a.priority,
            last_used_unix: a.last_used_wall.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            busy: a.busy.is_some(),
            blocks,
        })
    }
}
