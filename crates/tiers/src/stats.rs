//! The disk and remote tiers' numbers, each read as one snapshot under its
//! tier's one lock.

use std::collections::BTreeMap;
use std::time::Duration;

/// Upper bounds (seconds) of the tier latency histograms (durability lag,
/// load latency).
pub const LATENCY_BUCKETS_S: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// A cumulative histogram over [`LATENCY_BUCKETS_S`].
#[derive(Clone, Debug, PartialEq)]
pub struct LatencyHistogram {
    /// Observations at or below each bound, then the total.
    pub cumulative: Vec<u64>,
    /// Sum of all observations, seconds.
    pub sum: f64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self { cumulative: vec![0; LATENCY_BUCKETS_S.len() + 1], sum: 0.0 }
    }
}

impl LatencyHistogram {
    /// Records one observation.
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        let first = LATENCY_BUCKETS_S.iter().position(|&b| s <= b).unwrap_or(LATENCY_BUCKETS_S.len());
        for c in &mut self.cumulative[first..] {
            *c += 1;
        }
        self.sum += s;
    }

    /// Observations.
    pub fn count(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }
}

/// Everything the disk tier reports, as of one instant.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DiskStats {
    /// Records on disk.
    pub blocks: u64,
    /// Their bytes.
    pub bytes: u64,
    /// The byte budget.
    pub budget: u64,
    /// Bytes of records pinned agents need (never evicted).
    pub pinned_bytes: u64,
    /// Agents with a manifest.
    pub agents: u64,
    /// Records written (demotions and agent blocks).
    pub written_blocks: u64,
    /// Their bytes.
    pub written_bytes: u64,
    /// Records read back and verified.
    pub read_blocks: u64,
    /// Their bytes.
    pub read_bytes: u64,
    /// Writes not done: refused by the queue (full), skipped while the
    /// disk was failing, or past the budget with only pinned records left.
    pub dropped_writes: u64,
    /// Records evicted to stay within the budget.
    pub evictions: u64,
    /// Records or manifests rejected when read, by reason (checksum,
    /// fingerprint, truncated, …); each was deleted.
    pub rejected: BTreeMap<&'static str, u64>,
    /// Manifests committed durably.
    pub commits: u64,
    /// Agent commits that failed (the disk was failing).
    pub failed_commits: u64,
    /// Write, sync or delete errors seen.
    pub io_errors: u64,
    /// Why the tier is not writing, while it is not.
    pub degraded: Option<String>,
    /// Time from a turn's end to its manifest being durable.
    pub durability_lag: LatencyHistogram,
    /// Bytes waiting in the write queue.
    pub queued_bytes: u64,
    /// Sync calls (one per batch with writes).
    pub syncs: u64,
}

impl DiskStats {
    /// Records rejected for any reason.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }
}

/// Everything the remote tier reports, as of one instant.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RemoteStats {
    /// Whether the last health check reached the store.
    pub connected: bool,
    /// Why the tier is not serving, while it is not (the store is
    /// unreachable, timing out or failing).
    pub degraded: Option<String>,
    /// Blocks written (`SET NX` that stored a value).
    pub written_blocks: u64,
    /// Their bytes (records: header and payload).
    pub written_bytes: u64,
    /// Blocks offered that the store had already (`SET NX` found the key:
    /// this or another replica wrote it).
    pub existing: u64,
    /// Blocks read back and verified.
    pub read_blocks: u64,
    /// Their payload bytes.
    pub read_bytes: u64,
    /// Blocks asked for that the store did not have.
    pub misses: u64,
    /// Blocks answered as absent from the negative cache (a recent miss),
    /// without asking the store.
    pub negative_cache_hits: u64,
    /// Values or manifests rejected when read, by reason (checksum,
    /// fingerprint, truncated, …); each was deleted.
    pub rejected: BTreeMap<&'static str, u64>,
    /// Manifests written.
    pub commits: u64,
    /// Manifests not written because the store held a newer turn.
    pub stale_manifests: u64,
    /// Calls that failed: connection errors, timeouts, server errors.
    pub errors: u64,
    /// Connections made again after one was lost.
    pub reconnects: u64,
    /// Writes not done: refused by the queue (full), or dropped while the
    /// store was failing (blocks, and commits refused).
    pub dropped_writes: u64,
    /// Bytes waiting in the write queue.
    pub queued_bytes: u64,
    /// Entries in the set of blocks this process wrote or read within the
    /// TTL (what a commit need not resend).
    pub known_blocks: u64,
    /// Round-trip time of each pipelined read.
    pub fetch_latency: LatencyHistogram,
}

impl RemoteStats {
    /// Values rejected for any reason.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }
}
