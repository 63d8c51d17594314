//! Agent manifests: what the disk tier remembers of an agent so that its
//! next turn after a restart reuses its cached K/V.
//!
//! A manifest names the agent (tenant and id), its retention, priority and
//! turn count, the wall-clock time of its last turn (TTLs survive restarts),
//! its conversation's token ids and the chain of block records that hold
//! that conversation's K/V (layer group and address of each). It is
//! committed after the blocks it names are durable, by temp file, sync,
//! rename and directory sync, so a manifest that exists after a crash is
//! whole and its blocks are there.
//!
//! # The partial last block
//!
//! A conversation rarely ends on a block boundary: the K/V of its last
//! `len % block_size` computed tokens sit in a block that is not full,
//! which no prefix lookup can name. Without it a restored agent would
//! recompute those tokens (up to a block less one) on its next turn, where a
//! warm one computes only its new ones. So the manifest may name a *tail*:
//! a record of that partial block, addressed like any block
//! ([`kv::BlockKey`] of its parent and its own, fewer, tokens, so it can
//! never be mistaken for a full block), holding the whole block's payload
//! of which only its first `tokens` positions count. The tail belongs to the
//! manifest: only a manifest names it, and the disk tier deletes it when the
//! manifest that named it is replaced or deleted.
//!
//! # Format, version 2 (little-endian)
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 8 | magic `KVSAGENT` |
//! | 8 | 4 | format version (2; version 1, without the tail, is read too) |
//! | 12 | 4 | zero |
//! | 16 | 16 | store fingerprint |
//! | 32 | 8 | body length `B` |
//! | 40 | B | body (below) |
//! | 40 + B | 8 | checksum: xxh3-64 of bytes `0 .. 40 + B` |
//!
//! Body: tenant (u16 length, UTF-8), agent id (u16 length, UTF-8),
//! namespace (u128), retention (u8: 0 evictable, 1 pinned, 2 TTL) and TTL
//! seconds (u64), priority (i32), turns (u64), last use (u64, ms since the
//! Unix epoch), token count (u32) and tokens (u32 each), block count (u32)
//! and blocks (u8 group, u128 address each); from version 2, tail count (u32,
//! 0 or 1) and the tail (u8 group, u128 address, u32 token count).
//!
//! The file name is a hash of the tenant and agent id ([`ManifestId`]),
//! never the client's strings.

use kv::{BlockHash, Namespace, TokenId};
use xxhash_rust::xxh3::{xxh3_128, xxh3_64};

use crate::record::{RecordKey, Reject, StoreFingerprint};

/// The magic at offset 0.
pub const MAGIC: &[u8; 8] = b"KVSAGENT";
/// The format version written.
pub const VERSION: u32 = 2;
/// The oldest format version read.
pub const OLDEST_VERSION: u32 = 1;
/// Longest tenant or agent id stored (the engine allows 64).
pub const MAX_ID: usize = 255;
/// Most tokens a manifest may hold (far beyond any context).
pub const MAX_TOKENS: usize = 1 << 24;

/// How long the agent's cache is kept, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManifestRetention {
    /// Until memory (or disk) runs short.
    Evictable,
    /// Until deleted or unpinned; its blocks never leave the disk tier.
    Pinned,
    /// Forgotten this many seconds after its last turn (wall clock).
    Ttl {
        /// The TTL in seconds.
        seconds: u64,
    },
}

/// One agent as the disk tier keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentManifest {
    /// Its tenant.
    pub tenant: String,
    /// Its id.
    pub agent: String,
    /// The namespace its blocks are in.
    pub ns: Namespace,
    /// Retention.
    pub retention: ManifestRetention,
    /// Eviction priority.
    pub priority: i32,
    /// Turns completed.
    pub turns: u64,
    /// Its last turn's end, ms since the Unix epoch.
    pub last_used_unix_ms: u64,
    /// The conversation whose K/V the blocks hold.
    pub tokens: Vec<TokenId>,
    /// The block records of that conversation, in order.
    pub blocks: Vec<RecordKey>,
    /// The record of the conversation's partial last block, right after
    /// `blocks` (module doc).
    pub tail: Option<ManifestTail>,
}

/// The partial last block a manifest names (module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManifestTail {
    /// Its record.
    pub record: RecordKey,
    /// The tokens of the conversation it holds, fewer than a block.
    pub tokens: u32,
}

/// Names an agent's manifest: a hash of its tenant and id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ManifestId(u128);

impl ManifestId {
    /// The id of `tenant`'s agent `agent`.
    pub fn of(tenant: &str, agent: &str) -> Self {
        let mut b = Vec::with_capacity(32 + tenant.len() + agent.len());
        b.extend_from_slice(b"kvserve-agent-v1\0");
        b.extend_from_slice(&(tenant.len() as u64).to_le_bytes());
        b.extend_from_slice(tenant.as_bytes());
        b.extend_from_slice(&(agent.len() as u64).to_le_bytes());
        b.extend_from_slice(agent.as_bytes());
        Self(xxh3_128(&b))
    }

    /// 32 lowercase hex digits: the id in file names and remote keys.
    pub fn hex(&self) -> String {
        format!("{:032x}", self.0)
    }

    /// The manifest's file name.
    pub fn file_name(&self) -> String {
        format!("{}.kva", self.hex())
    }

    /// Parses a name made by [`ManifestId::file_name`].
    pub fn from_file_name(name: &str) -> Option<Self> {
        let hex = name.strip_suffix(".kva").filter(|h| h.len() == 32)?;
        let id = Self(u128::from_str_radix(hex, 16).ok()?);
        (id.file_name() == name).then_some(id)
    }
}

impl AgentManifest {
    /// Its id.
    pub fn id(&self) -> ManifestId {
        ManifestId::of(&self.tenant, &self.agent)
    }

    /// Every record it names: its blocks, then its tail.
    pub fn records(&self) -> impl Iterator<Item = RecordKey> + '_ {
        self.blocks.iter().copied().chain(self.tail.map(|t| t.record))
    }

    /// Whether its blocks must stay on disk.
    pub fn pinned(&self) -> bool {
        self.retention == ManifestRetention::Pinned
    }

    /// The file's bytes.
    pub fn encode(&self, fp: &StoreFingerprint) -> Vec<u8> {
        let mut body = Vec::with_capacity(64 + 4 * self.tokens.len() + 17 * self.blocks.len());
        for s in [&self.tenant, &self.agent] {
            let s = &s.as_bytes()[..s.len().min(MAX_ID)];
            body.extend_from_slice(&(s.len() as u16).to_le_bytes());
            body.extend_from_slice(s);
        }
        body.extend_from_slice(&self.ns.to_u128().to_le_bytes());
        let (kind, ttl) = match self.retention {
            ManifestRetention::Evictable => (0u8, 0u64),
            ManifestRetention::Pinned => (1, 0),
            ManifestRetention::Ttl { seconds } => (2, seconds),
        };
        body.push(kind);
        body.extend_from_slice(&ttl.to_le_bytes());
        body.extend_from_slice(&self.priority.to_le_bytes());
        body.extend_from_slice(&self.turns.to_le_bytes());
        body.extend_from_slice(&self.last_used_unix_ms.to_le_bytes());
        body.extend_from_slice(&(self.tokens.len() as u32).to_le_bytes());
        for t in &self.tokens {
            body.extend_from_slice(&t.to_le_bytes());
        }
        body.extend_from_slice(&(self.blocks.len() as u32).to_le_bytes());
        for k in &self.blocks {
            body.push(k.group);
            body.extend_from_slice(&k.hash.to_u128().to_le_bytes());
        }
        body.extend_from_slice(&u32::from(self.tail.is_some()).to_le_bytes());
        if let Some(t) = &self.tail {
            body.push(t.record.group);
            body.extend_from_slice(&t.record.hash.to_u128().to_le_bytes());
            body.extend_from_slice(&t.tokens.to_le_bytes());
        }
        let mut out = Vec::with_capacity(48 + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(fp.as_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&body);
        let sum = xxh3_64(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Parses and checks a manifest file.
    ///
    /// # Errors
    /// The [`Reject`] that applies: truncated, bad magic, another version
    /// or store, a checksum mismatch, or a body that does not parse.
    pub fn decode(b: &[u8], fp: &StoreFingerprint) -> Result<Self, Reject> {
        if b.len() < 48 {
            return Err(Reject::Truncated { len: b.len() });
        }
        if &b[..8] != MAGIC {
            return Err(Reject::BadMagic);
        }
        let mut r = Reader { b, at: 8 };
        let version = r.u32()?;
        if !(OLDEST_VERSION..=VERSION).contains(&version) {
            return Err(Reject::Version(version));
        }
        r.at = 32;
        let body_len = usize::try_from(r.u64()?).map_err(|_| Reject::Truncated { len: b.len() })?;
        let end = body_len.checked_add(40).filter(|&e| e.checked_add(8) == Some(b.len()));
        let Some(end) = end else { return Err(Reject::Truncated { len: b.len() }) };
        if xxh3_64(&b[..end]) != (Reader { b, at: end }).u64()? {
            return Err(Reject::HeaderChecksum);
        }
        if b[16..32] != fp.as_bytes()[..] {
            return Err(Reject::Fingerprint);
        }
        let mut r = Reader { b: &b[..end], at: 40 };
        let tenant = r.string()?;
        let agent = r.string()?;
        let ns = Namespace::from_u128(r.u128()?);
        let kind = r.u8()?;
        let ttl = r.u64()?;
        let retention = match kind {
            0 => ManifestRetention::Evictable,
            1 => ManifestRetention::Pinned,
            2 => ManifestRetention::Ttl { seconds: ttl },
            _ => return Err(Reject::OtherBlock { what: "retention" }),
        };
        let priority = r.u32()? as i32;
        let turns = r.u64()?;
        let last_used_unix_ms = r.u64()?;
        let n = r.count(4)?;
        let tokens = (0..n).map(|_| r.u32()).collect::<Result<Vec<_>, _>>()?;
        let m = r.count(17)?;
        let mut blocks = Vec::with_capacity(m);
        for _ in 0..m {
            let group = r.u8()?;
            blocks.push(RecordKey::new(group, BlockHash::from_u128(r.u128()?)));
        }
        let tail = match version {
            1 => None,
            _ => match r.u32()? {
                0 => None,
                1 => {
                    let group = r.u8()?;
                    let record = RecordKey::new(group, BlockHash::from_u128(r.u128()?));
                    Some(ManifestTail { record, tokens: r.u32()? })
                }
                _ => return Err(Reject::OtherBlock { what: "tail count" }),
            },
        };
        if r.at != end {
            return Err(Reject::OtherBlock { what: "body length" });
        }
        Ok(Self { tenant, agent, ns, retention, priority, turns, last_used_unix_ms, tokens, blocks, tail })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], Reject> {
        let end =
            self.at.checked_add(n).filter(|&e| e <= self.b.len()).ok_or(Reject::Truncated { len: self.b.len() })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, Reject> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, Reject> {
        let mut x = [0; 4];
        x.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(x))
    }

    fn u64(&mut self) -> Result<u64, Reject> {
        let mut x = [0; 8];
        x.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(x))
    }

    fn u128(&mut self) -> Result<u128, Reject> {
        let mut x = [0; 16];
        x.copy_from_slice(self.take(16)?);
        Ok(u128::from_le_bytes(x))
    }

    fn string(&mut self) -> Result<String, Reject> {
        let mut n = [0; 2];
        n.copy_from_slice(self.take(2)?);
        let n = usize::from(u16::from_le_bytes(n));
        if n > MAX_ID {
            return Err(Reject::OtherBlock { what: "id length" });
        }
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| Reject::OtherBlock { what: "id encoding" })
    }

    /// A count of items of `size` bytes each, checked against what is left
    /// before anything is allocated.
    fn count(&mut self, size: usize) -> Result<usize, Reject> {
        let n = self.u32()? as usize;
        if n > MAX_TOKENS || n.saturating_mul(size) > self.b.len() - self.at {
            return Err(Reject::Truncated { len: self.b.len() });
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp() -> StoreFingerprint {
        StoreFingerprint::from_bytes([1; 16])
    }

    fn manifest() -> AgentManifest {
        AgentManifest {
            tenant: "acme".into(),
            agent: "bot-1".into(),
            ns: Namespace::new(b"m", b"acme"),
            retention: ManifestRetention::Ttl { seconds: 600 },
            priority: -3,
            turns: 4,
            last_used_unix_ms: 1_764_000_000_123,
            tokens: (0..37).collect(),
            blocks: vec![
                RecordKey::new(0, BlockHash::from_u128(5)),
                RecordKey::new(1, BlockHash::from_u128(u128::MAX)),
            ],
            tail: Some(ManifestTail { record: RecordKey::new(0, BlockHash::from_u128(9)), tokens: 5 }),
        }
    }

    #[test]
    fn round_trip() {
        let m = manifest();
        assert_eq!(AgentManifest::decode(&m.encode(&fp()), &fp()), Ok(m.clone()));
        assert_eq!(ManifestId::from_file_name(&m.id().file_name()), Some(m.id()));
        assert_ne!(m.id(), ManifestId::of("acm", "ebot-1"), "fields are length-prefixed");
    }

    #[test]
    fn truncation_bit_flips_version_and_store_are_rejected() {
        let b = manifest().encode(&fp());
        for cut in 0..b.len() {
            assert!(AgentManifest::decode(&b[..cut], &fp()).is_err(), "cut at {cut} accepted");
        }
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x10;
            assert!(AgentManifest::decode(&bad, &fp()).is_err(), "flip at {i} accepted");
        }
        let mut v3 = b.clone();
        v3[8] = 3;
        assert_eq!(AgentManifest::decode(&v3, &fp()), Err(Reject::Version(3)));
        assert_eq!(AgentManifest::decode(&b, &StoreFingerprint::from_bytes([2; 16])), Err(Reject::Fingerprint));
    }

    #[test]
    fn a_huge_count_is_refused_before_allocating() {
        let mut m = manifest();
        m.tokens.clear();
        m.blocks.clear();
        m.tail = None;
        let mut b = m.encode(&fp());
        // Point the token count at u32::MAX and re-seal the checksum: a
        // well-formed file that lies about its sizes.
        let at = b.len() - 8 - 4 - 4 - 4;
        b[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let end = b.len() - 8;
        let sum = xxh3_64(&b[..end]);
        b[end..].copy_from_slice(&sum.to_le_bytes());
        assert!(matches!(AgentManifest::decode(&b, &fp()), Err(Reject::Truncated { .. })));
    }

    /// A manifest written before tails existed (version 1: no tail section)
    /// still restores its agent, without a tail.
    #[test]
    fn a_version_1_manifest_reads_without_a_tail() {
        let m = AgentManifest { tail: None, ..manifest() };
        let mut b = m.encode(&fp());
        // Version 1 is version 2 without the trailing tail count.
        b.truncate(b.len() - 8 - 4);
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        let body = (b.len() - 40) as u64;
        b[32..40].copy_from_slice(&body.to_le_bytes());
        let sum = xxh3_64(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        assert_eq!(AgentManifest::decode(&b, &fp()), Ok(m));
    }
}
