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
//! "Its text" is the text the agent *sent*, which is what a client sends
//! back: a token sequence that is not valid UTF-8 on its own (byte tokens
//! of a character the model never finished, or wrote wrongly) reached the
//! client as U+FFFD, and a character left incomplete at the very end of a
//! reply was never released at all ([`sent_text`]). The splice compares
//! the prompt with that, in one pass over the agent's tail and the prompt
//! (linear, bounded by the context: no cap on a reply's length).
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

use kv::{BlockHash, BlockKey, SeqId};
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
    /// The partial block after `chain` that durable tiers hold (its
    /// manifest's tail, `tiers::manifest`): its position in the chain and
    /// its key. Content-addressed, so a stale one is only a miss: a prompt
    /// uses it where the prompt's tokens and parent are the key's.
    pub(crate) tail: Option<(usize, BlockKey)>,
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

/// How far [`crate::EngineHandle::offload_agent`] moves an agent's blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffloadTo {
    /// Out of the pool into the first tier (RAM), as memory pressure would.
    FirstTier,
    /// On past the first tier to the next (disk).
    SecondTier,
}

/// Changes to an agent's retention.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentUpdate {
    /// New retention, if given.
    pub retention: Option<Retention>,
    /// New priority, if given.
    pub priority: Option<i32>,
}

/// An agent's key: its tenant and its id (two tenants may name agents
/// alike; they are different agents).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct AgentKey {
    pub(crate) tenant: TenantId,
    pub(crate) id: AgentId,
}

impl AgentKey {
    pub(crate) fn new(tenant: TenantId, id: AgentId) -> Self {
        Self { tenant, id }
    }
}

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
            tail: None,
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
        self.map.keys().filter(|k| &k.tenant == tenant).count()
    }

    /// The agent `tenant` should forget to make room for a new one: idle,
    /// evictable, with at least one turn done (an agent with none is
    /// waiting for its first), lowest priority, then least recently used.
    pub(crate) fn forget_candidate(&self, tenant: &TenantId) -> Option<AgentKey> {
        self.map
            .iter()
            .filter(|(k, a)| {
                &k.tenant == tenant && a.busy.is_none() && a.turns > 0 && a.retention == Retention::Evictable
            })
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
        let mut keys: Vec<AgentKey> = self.map.keys().filter(|k| &k.tenant == tenant).cloned().collect();
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
                    && tenant.is_none_or(|t| &k.tenant == t)
            })
            .min_by_key(|(_, a)| (a.priority, a.last_used))
            .map(|(k, _)| k.clone())
    }

    pub(crate) fn info(&self, key: &AgentKey, blocks_held: usize, blocks: BlockLocations) -> Option<AgentInfo> {
        let a = self.map.get(key)?;
        Some(AgentInfo {
            id: key.id.clone(),
            tenant: key.tenant.clone(),
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

/// The text a client received for `bytes` of an agent's output, as the
/// engine's text stream released it: each invalid UTF-8 sequence as one
/// U+FFFD (as `String::from_utf8_lossy`), and a character left incomplete
/// at the very end dropped (held back waiting for a token that never came).
pub(crate) fn sent_text(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    let mut chunks = bytes.utf8_chunks().peekable();
    while let Some(c) = chunks.next() {
        out.push_str(c.valid());
        let bad = c.invalid();
        let incomplete_at_end =
            chunks.peek().is_none() && std::str::from_utf8(bad).is_err_and(|e| e.error_len().is_none());
        if !bad.is_empty() && !incomplete_at_end {
            out.push('\u{fffd}');
        }
    }
    out
}

/// The prompt of an agent's next turn with the agent's own token ids where
/// the prompt's text is what the agent sent (see the module doc): `had` is
/// the agent's tokens, `prompt` the turn's, tokenized from the client's
/// text. Control tokens must match id for id; the text between them must
/// be [`sent_text`] of the agent's. `None` when there is nothing to splice
/// or the texts differ (the caller falls back to the common token prefix).
pub(crate) fn splice(had: &[u32], prompt: &[u32], codec: &dyn model::TextCodec) -> Option<Vec<u32>> {
    let common = had.iter().zip(prompt).take_while(|(a, b)| a == b).count();
    if common == had.len() || common == prompt.len() {
        return None;
    }
    let control = |t: u32| codec.is_control(t);
    let bytes = |ids: &[u32]| -> Option<Vec<u8>> {
        let mut out = Vec::new();
        for &t in ids {
            out.extend(codec.token_bytes(t).ok()?);
        }
        Some(out)
    };
    // The text run of `ids` from `at` up to its next control token.
    let run_end = |ids: &[u32], at: usize| ids[at..].iter().position(|&t| control(t)).map_or(ids.len(), |n| at + n);
    let (mut i, mut j) = (common, common);
    let mut out = had[..common].to_vec();
    while i < had.len() {
        let a_end = run_end(had, i);
        let sent = sent_text(&bytes(&had[i..a_end])?);
        if a_end < had.len() {
            // A whole run, then the same control token.
            let p_end = run_end(prompt, j);
            if bytes(&prompt[j..p_end])? != sent.as_bytes() || prompt.get(p_end) != had.get(a_end) {
                return None;
            }
            out.extend_from_slice(&had[i..=a_end]);
            (i, j) = (a_end + 1, p_end + 1);
            continue;
        }
        // The agent's last run: the prompt's text continues it. Take
        // prompt tokens until they cover it; one that straddles its end
        // gives the rest of its bytes, encoded as the text they are.
        let mut seen = Vec::with_capacity(sent.len() + 16);
        while seen.len() < sent.len() {
            let &t = prompt.get(j)?;
            if control(t) {
                return None;
            }
            seen.extend(codec.token_bytes(t).ok()?);
            j += 1;
        }
        let rest = seen.strip_prefix(sent.as_bytes())?;
        out.extend_from_slice(&had[i..]);
        if !rest.is_empty() {
            out.extend(codec.encode(std::str::from_utf8(rest).ok()?).ok()?);
        }
        out.extend_from_slice(&prompt[j..]);
        return Some(out);
    }
    // The agent's tokens ended with a control token the prompt also has.
    out.extend_from_slice(&prompt[j..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{FakeCodec, FAKE_EOS};

    fn ids(b: &[u8]) -> Vec<u32> {
        b.iter().map(|&x| u32::from(x)).collect()
    }

    #[test]
    fn sent_text_is_lossy_and_drops_an_incomplete_last_character() {
        assert_eq!(sent_text(b"plain"), "plain");
        assert_eq!(sent_text(&[b'a', 0xE2, 0x82, b'b']), "a\u{fffd}b", "a broken character in the middle");
        assert_eq!(sent_text(&[b'a', 0xFF, 0xFE]), "a\u{fffd}\u{fffd}", "bytes that start nothing");
        assert_eq!(sent_text(&[b'x', 0xE2, 0x82]), "x", "never finished: never released");
        assert_eq!(sent_text("é€".as_bytes()), "é€");
    }

    #[test]
    fn a_reply_the_client_decoded_lossily_is_recognised() {
        let codec = FakeCodec::new();
        let mut had = ids(b"user: hi\nassistant: ");
        had.extend(ids(&[b'a', 0xE2, 0x82, b'b', b'c']));
        let prompt = ids("user: hi\nassistant: a\u{fffd}bc\nuser: next\nassistant: ".as_bytes());
        let got = splice(&had, &prompt, &codec).expect("spliced");
        let mut want = had.clone();
        want.extend(ids(b"\nuser: next\nassistant: "));
        assert_eq!(got, want, "the agent's own bytes, then the new message");
    }

    #[test]
    fn an_incomplete_last_character_the_client_never_saw_still_splices() {
        let codec = FakeCodec::new();
        let mut had = ids(b"user: hi\nassistant: x");
        had.extend([0xE2, 0x82]);
        let prompt = ids(b"user: hi\nassistant: x\nuser: more\nassistant: ");
        let got = splice(&had, &prompt, &codec).expect("spliced");
        assert_eq!(&got[..had.len()], &had[..]);
        assert_eq!(&got[had.len()..], &ids(b"\nuser: more\nassistant: ")[..]);
    }

    #[test]
    fn runs_between_control_tokens_compare_as_sent_text() {
        let codec = FakeCodec::new();
        let mut had = ids(b"q: ");
        had.extend([0xFF, u32::from(b'z'), FAKE_EOS]);
        had.extend(ids(b"next"));
        let mut prompt = ids("q: \u{fffd}z".as_bytes());
        prompt.push(FAKE_EOS);
        prompt.extend(ids(b"next more"));
        let got = splice(&had, &prompt, &codec).expect("spliced");
        let mut want = had.clone();
        want.extend(ids(b" more"));
        assert_eq!(got, want);
        // Other text, or another control token, is no splice.
        let mut edited = prompt.clone();
        edited[3] = u32::from(b'y');
        assert_eq!(splice(&had, &edited, &codec), None);
    }

    #[test]
    fn a_reply_far_longer_than_any_cap_splices_in_one_pass() {
        let codec = FakeCodec::new();
        let reply: Vec<u8> = (0..20_000).map(|i| if i % 997 == 500 { 0xFF } else { b'a' + (i % 26) as u8 }).collect();
        let mut had = ids(b"user: write\nassistant: ");
        had.extend(ids(&reply));
        let text = format!("user: write\nassistant: {}\nuser: title?\nassistant: ", String::from_utf8_lossy(&reply));
        let got = splice(&had, &ids(text.as_bytes()), &codec).expect("spliced");
        assert_eq!(&got[..had.len()], &had[..], "the whole reply from the agent's own tokens");
        assert_eq!(&got[had.len()..], &ids(b"\nuser: title?\nassistant: ")[..]);
    }
}
