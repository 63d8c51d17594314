//! The replicas' KV event API, as the router reads it.
//!
//! - `GET /v1/kv/snapshot` → `{"replica": ReplicaInfo, "next": seq,
//!   "load": Load, "blocks": [{"hash", "tier"}]}`: every block the replica
//!   holds now, and the sequence number its next event will have.
//! - `GET /v1/kv/events?since=N&wait_ms=M` → `{"replica", "first", "next",
//!   "events": [...], "load"}`: the events from `N` on, waiting up to `M`
//!   ms (the replica caps it at 10 s) when there are none. 410 with
//!   `{"error": {"code": "events_gap"}}` when `N` is older than the oldest
//!   event it still holds.
//!
//! Events: `{"seq", "type": "stored", "tier", "hash", "parent"}`,
//! `{"seq", "type": "removed", "tier", "hash"}`, `{"seq", "type":
//! "cleared", "tier"}`. Hashes are [`BlockHash`]es as 32 lowercase hex
//! digits. Parsing is lenient about what the router does not use (unknown
//! fields, event types and tiers are skipped) and strict about what it does
//! (a malformed hash is an error for that event).

use kv::BlockHash;
use serde::Deserialize;

use crate::index::Tier;

/// Who a replica is: what its block addresses mean.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct ReplicaInfo {
    /// 16 hex digits, new each time the replica process starts.
    pub epoch: String,
    /// Hex of the model fingerprint its namespaces use.
    pub model_fingerprint: String,
    /// Tokens per block.
    pub block_size: usize,
    /// What its namespaces fold in (`"model+tenant"`).
    pub namespacing: String,
}

/// A replica's load, as it reports it.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct Load {
    /// Sequences running.
    #[serde(default)]
    pub running: u64,
    /// Requests waiting.
    #[serde(default)]
    pub waiting: u64,
    /// Free KV blocks.
    #[serde(default)]
    pub free_blocks: u64,
    /// KV blocks in all.
    #[serde(default)]
    pub total_blocks: u64,
}

/// One block of a snapshot.
#[derive(Clone, Debug, Deserialize)]
pub struct SnapshotBlock {
    /// Its address.
    pub hash: String,
    /// Where.
    pub tier: String,
}

/// `GET /v1/kv/snapshot`.
#[derive(Clone, Debug, Deserialize)]
pub struct Snapshot {
    /// Who.
    pub replica: ReplicaInfo,
    /// The sequence number of the next event.
    pub next: u64,
    /// Its load now.
    #[serde(default)]
    pub load: Load,
    /// Every block it holds.
    #[serde(default)]
    pub blocks: Vec<SnapshotBlock>,
}

/// One event as sent.
#[derive(Clone, Debug, Deserialize)]
pub struct WireEvent {
    /// Its sequence number.
    pub seq: u64,
    /// `stored`, `removed` or `cleared`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The tier.
    #[serde(default)]
    pub tier: Option<String>,
    /// The block (`stored`, `removed`).
    #[serde(default)]
    pub hash: Option<String>,
}

/// `GET /v1/kv/events`.
#[derive(Clone, Debug, Deserialize)]
pub struct EventsPage {
    /// Who.
    pub replica: ReplicaInfo,
    /// The oldest sequence number it still holds.
    #[serde(default)]
    pub first: u64,
    /// The sequence number after the last one returned.
    pub next: u64,
    /// The events.
    #[serde(default)]
    pub events: Vec<WireEvent>,
    /// Its load now.
    #[serde(default)]
    pub load: Load,
}

/// An event the index applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The replica holds the block in the tier now.
    Stored(BlockHash, Tier),
    /// It no longer does.
    Removed(BlockHash, Tier),
    /// It holds nothing in the tier.
    Cleared(Tier),
}

/// Why an event could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadEvent {
    /// A hash that is not 32 hex digits.
    #[error("{0:?} is not a block hash (32 hex digits)")]
    Hash(String),
    /// `stored` or `removed` without a hash.
    #[error("a {0} event without a hash")]
    MissingHash(&'static str),
}

/// Parses a block hash as `BlockHash`'s `Display` writes it.
///
/// # Errors
/// [`BadEvent::Hash`] unless `s` is 32 hex digits.
pub fn parse_hash(s: &str) -> Result<BlockHash, BadEvent> {
    if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(BadEvent::Hash(s.chars().take(40).collect()));
    }
    u128::from_str_radix(s, 16).map(BlockHash::from_u128).map_err(|_| BadEvent::Hash(s.into()))
}

impl WireEvent {
    /// The event to apply; `Ok(None)` for a type or tier the router does
    /// not know (skipped).
    ///
    /// # Errors
    /// A `stored`/`removed` event without a readable hash.
    pub fn parse(&self) -> Result<Option<Event>, BadEvent> {
        let Some(tier) = self.tier.as_deref().and_then(Tier::parse) else { return Ok(None) };
        let hash = |kind| match self.hash.as_deref() {
            Some(h) => parse_hash(h),
            None => Err(BadEvent::MissingHash(kind)),
        };
        Ok(match self.kind.as_str() {
            "stored" => Some(Event::Stored(hash("stored")?, tier)),
            "removed" => Some(Event::Removed(hash("removed")?, tier)),
            "cleared" => Some(Event::Cleared(tier)),
            _ => None,
        })
    }
}

/// Lowercase hex of `bytes` (how replicas report their fingerprint).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_parse_as_display_prints_them() {
        let h = BlockHash::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        assert_eq!(parse_hash(&h.to_string()), Ok(h));
        assert!(parse_hash("xyz").is_err());
        assert!(parse_hash(&"g".repeat(32)).is_err());
        assert!(parse_hash("+0123456789abcdef0011223344556677").is_err());
    }

    #[test]
    fn unknown_event_types_and_tiers_are_skipped() {
        let ev = |json: &str| serde_json::from_str::<WireEvent>(json).map(|e| e.parse());
        let h = "0123456789abcdef0123456789abcdef";
        assert!(matches!(
            ev(&format!(r#"{{"seq":1,"type":"stored","tier":"ram","hash":"{h}","parent":null}}"#)),
            Ok(Ok(Some(Event::Stored(_, Tier::Ram))))
        ));
        assert!(matches!(ev(r#"{"seq":1,"type":"cleared","tier":"pool"}"#), Ok(Ok(Some(Event::Cleared(Tier::Pool))))));
        assert!(matches!(ev(&format!(r#"{{"seq":1,"type":"moved","tier":"ram","hash":"{h}"}}"#)), Ok(Ok(None))));
        assert!(matches!(ev(&format!(r#"{{"seq":1,"type":"stored","tier":"tape","hash":"{h}"}}"#)), Ok(Ok(None))));
        assert!(matches!(ev(r#"{"seq":1,"type":"removed","tier":"ram"}"#), Ok(Err(BadEvent::MissingHash(_)))));
    }
}
