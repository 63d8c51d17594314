//! The engine's side of the KV tiers: its configuration, the state it keeps
//! about loads and pending blocks, and the cost model that decides whether
//! loading beats recomputing. The tiers themselves (RAM, disk) are in the
//! `tiers` crate, each a [`tiers::Tier`]; the engine keeps them as one
//! ordered list (fastest first) and reports everything per tier by the
//! tier's name. The scheduler's use of them is in `core/tier_ops.rs`.
//!
//! # Pending blocks: one wait for blocks that are on their way
//!
//! A request whose prefix continues into blocks that are *on their way into
//! the pool* waits for them instead of computing them again. Two ways in:
//! a load from the disk tier, and another running request computing them
//! (in-flight prefix sharing: requests that arrive together with a shared,
//! uncached system prompt compute it once). A *producer* (identified by a
//! [`ProducerId`]) registers the addresses it will publish, by block index;
//! a request that meets one of them at admission waits for that one address
//! and is skipped by admission until it is no longer pending: published
//! (a computing request's step passed it), or its producer ended (a load
//! done, a request finished, failed, cancelled or preempted). It is then
//! admitted as usual and adopts whatever the pool has, which may make it wait
//! again for the producer's next block. A waiter is therefore never held
//! longer than the producer takes to compute what the waiter would have
//! computed itself, and never past the producer's end.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kv::{BlockHash, BlockId, BlockKey, SeqId};
use tiers::{DiskConfig, Payload, RamTier, Reject, Tier, TierSnapshot};

use crate::metrics::Histogram;
use crate::request::RequestId;

/// Where evicted blocks go, and how.
#[derive(Clone, Debug, Default)]
pub struct TierConfig {
    /// Host RAM for blocks the pool evicts (T1), in bytes; 0 disables it.
    /// Memory is taken as blocks arrive, never reserved.
    pub ram_bytes: u64,
    /// The disk tier (T2): block records and durable agents. `None`
    /// disables it (nothing survives a restart).
    pub disk: Option<DiskConfig>,
    /// The remote tier (T3): a store shared by replicas, below the disk.
    /// `None` disables it.
    pub remote: Option<tiers::RemoteConfig>,
    /// When blocks found on disk are loaded rather than recomputed.
    pub load: LoadPolicy,
}

/// When blocks found on disk are loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoadPolicy {
    /// When loading them is estimated to take less time than recomputing
    /// them, from measured load and prefill speeds (the default).
    #[default]
    Measured,
    /// Always (benchmarks of the load path, tests with a model that
    /// computes for free), giving up on a load after `deadline`.
    Always {
        /// How long a load may take before the request recomputes.
        deadline: Duration,
    },
}

/// Identifies something that will publish blocks: a load from a tier
/// (and, with in-flight prefix sharing, a request computing them).
pub(crate) type ProducerId = u64;

/// Addresses on their way into the pool, by producer.
#[derive(Debug, Default)]
pub(crate) struct PendingBlocks {
    by_hash: HashMap<BlockHash, ProducerId>,
    /// Each producer's pending addresses with their block index.
    by_producer: HashMap<ProducerId, Vec<(usize, BlockHash)>>,
}

impl PendingBlocks {
    /// `producer` will publish `hashes`, the blocks from index `first` on
    /// (those already claimed by another producer stay with it).
    pub(crate) fn register(&mut self, producer: ProducerId, first: usize, hashes: &[BlockHash]) {
        let mut mine = Vec::new();
        for (i, h) in hashes.iter().enumerate() {
            if !self.by_hash.contains_key(h) {
                self.by_hash.insert(*h, producer);
                mine.push((first + i, *h));
            }
        }
        self.by_producer.entry(producer).or_default().extend(mine);
    }

    /// `producer` has computed (and published) its blocks below index
    /// `blocks`: they are no longer pending.
    pub(crate) fn published_below(&mut self, producer: ProducerId, blocks: usize) {
        let Some(list) = self.by_producer.get_mut(&producer) else { return };
        let by_hash = &mut self.by_hash;
        list.retain(|&(i, h)| {
            let done = i < blocks;
            if done {
                by_hash.remove(&h);
            }
            !done
        });
    }

    /// Whether a request waiting for `hash` from `producer` must still wait.
    pub(crate) fn still_pending(&self, producer: ProducerId, hash: &BlockHash) -> bool {
        self.by_hash.get(hash) == Some(&producer)
    }

    /// Who is producing `hash`, if anyone.
    pub(crate) fn producer_of(&self, hash: &BlockHash) -> Option<ProducerId> {
        self.by_hash.get(hash).copied()
    }

    /// `producer` brought `hash` in (it is in a tier that answers at once
    /// now): no longer pending.
    pub(crate) fn arrived(&mut self, producer: ProducerId, hash: &BlockHash) {
        if self.by_hash.get(hash) == Some(&producer) {
            self.by_hash.remove(hash);
        }
        if let Some(list) = self.by_producer.get_mut(&producer) {
            list.retain(|(_, h)| h != hash);
        }
    }

    /// `producer` is done (whatever it published is in the pool now).
    pub(crate) fn resolve(&mut self, producer: ProducerId) {
        for (_, h) in self.by_producer.remove(&producer).unwrap_or_default() {
            if self.by_hash.get(&h) == Some(&producer) {
                self.by_hash.remove(&h);
            }
        }
    }
}

/// A load from the disk tier in flight: the request's sequence has blocks
/// allocated for the records (not yet computed), which are imported as the
/// reads come back.
#[derive(Debug)]
pub(crate) struct Load {
    pub(crate) request: RequestId,
    pub(crate) seq: SeqId,
    /// Tokens of the sequence before the loaded blocks.
    pub(crate) base: usize,
    /// The blocks expected, in order.
    pub(crate) keys: Vec<BlockKey>,
    /// The pool blocks they go to.
    pub(crate) blocks: Vec<BlockId>,
    /// The tier each block is read from (an index into the tier list).
    pub(crate) from: Vec<usize>,
    pub(crate) results: Vec<Option<Result<Payload, Reject>>>,
    pub(crate) started: Instant,
    pub(crate) deadline: Instant,
}

impl Load {
    /// Whether every read has come back.
    pub(crate) fn complete(&self) -> bool {
        self.results.iter().all(Option::is_some)
    }
}

/// Running estimates of what a block costs to load from each queued tier
/// and a token to prefill, so a load is started only when it should beat
/// recomputing (a slow disk or network falls back to prefill; SGLang's
/// issue #26305 measured a file-tier hit slower than recompute, LMCache
/// #914 a remote one).
#[derive(Debug)]
pub(crate) struct CostModel {
    /// Seconds per block loaded, per tier (exponential moving average).
    load_per_block: Vec<f64>,
    /// Seconds per prefilled token.
    prefill_per_token: f64,
}

impl CostModel {
    const ALPHA: f64 = 0.2;
    /// Deliberately pessimistic about stores, optimistic about compute,
    /// until measured: 5 ms per block read, 0.5 ms per token computed.
    const FIRST_LOAD_PER_BLOCK: f64 = 5e-3;

    fn new(tiers: usize) -> Self {
        Self { load_per_block: vec![Self::FIRST_LOAD_PER_BLOCK; tiers], prefill_per_token: 5e-4 }
    }

    /// A step of `tokens` prefill tokens took `took`.
    pub(crate) fn prefilled(&mut self, tokens: usize, took: Duration) {
        if tokens >= 16 {
            let x = took.as_secs_f64() / tokens as f64;
            self.prefill_per_token += Self::ALPHA * (x - self.prefill_per_token);
        }
    }

    /// A load of `blocks` blocks, `per_tier` of them from each tier, took
    /// `took` (the tiers read in parallel: each is charged the whole time
    /// over all the load's blocks, a bound on its own rate).
    pub(crate) fn loaded(&mut self, per_tier: &[usize], took: Duration) {
        let blocks: usize = per_tier.iter().sum();
        if blocks == 0 {
            return;
        }
        let x = took.as_secs_f64() / blocks as f64;
        for (t, n) in per_tier.iter().enumerate() {
            if let (true, Some(rate)) = (*n > 0, self.load_per_block.get_mut(t)) {
                *rate += Self::ALPHA * (x - *rate);
            }
        }
    }

    /// What recomputing `tokens` would take.
    pub(crate) fn compute_time(&self, tokens: usize) -> Duration {
        Duration::from_secs_f64(self.prefill_per_token * tokens as f64)
    }

    /// What loading `per_tier[t]` blocks from each tier `t` should take.
    pub(crate) fn load_time(&self, per_tier: &[usize]) -> Duration {
        let s: f64 = per_tier.iter().zip(&self.load_per_block).map(|(n, rate)| *n as f64 * rate).fold(0.0, f64::max);
        Duration::from_secs_f64(s)
    }
}

/// The tiers and what the engine tracks about them. Owned by the engine
/// thread.
#[derive(Debug)]
pub(crate) struct Tiering {
    /// The tiers, fastest first: a block the pool evicts is offered to the
    /// first, what it pushes out to the next; a prefix lookup asks each
    /// block of the first tier that holds it.
    pub(crate) list: Vec<Box<dyn Tier>>,
    pub(crate) loads: HashMap<ProducerId, Load>,
    pub(crate) pending: PendingBlocks,
    pub(crate) costs: CostModel,
    pub(crate) policy: LoadPolicy,
    pub(crate) counters: TierCounters,
    /// When deferred agent commits may be retried next.
    pub(crate) next_commit_retry: Option<Instant>,
    /// The load that brings restored agents' blocks back into the first
    /// tier (RAM) after a start (`core/resume.rs`).
    pub(crate) prefetch: Option<(ProducerId, Prefetch)>,
    /// Turns of agents this process does not know, waiting while a tier
    /// looks for their manifests (`core/resume.rs`).
    pub(crate) fetches: HashMap<tiers::ManifestId, AgentFetch>,
    /// Blocks the pool evicts may lack part of their K/V (a hybrid model's
    /// sliding window): they are not offered to tiers that keep a first
    /// copy for good.
    pub(crate) partial_evictions: bool,
    /// Where blocks entering and leaving the pool and the tiers are told
    /// (`kv_events.rs`).
    pub(crate) events: std::sync::Arc<crate::kv_events::KvEvents>,
    next_producer: ProducerId,
}

/// Blocks a prefetch has asked the tiers for at most at once: a turn that
/// needs other blocks finds at most this many reads ahead of its own.
pub(crate) const PREFETCH_WINDOW: usize = 16;

/// Restored agents' blocks on their way back into RAM.
#[derive(Debug, Default)]
pub(crate) struct Prefetch {
    /// Not asked for yet, in order: chain position, block, tier to read it
    /// from.
    pub(crate) queue: std::collections::VecDeque<(usize, BlockKey, usize)>,
    /// Asked for, by task index.
    pub(crate) in_flight: HashMap<usize, BlockKey>,
    /// The next task index.
    pub(crate) next_index: usize,
    /// When it started (its duration is logged at the end).
    pub(crate) started: Option<std::time::Instant>,
}

/// How long an agent's turn waits for a tier to find the agent's manifest
/// before it runs without (as a new agent).
pub(crate) const FETCH_DEADLINE: Duration = Duration::from_secs(2);

/// A lookup of an agent's manifest in the tiers, and the turns waiting for
/// it.
#[derive(Debug)]
pub(crate) struct AgentFetch {
    pub(crate) key: crate::agents::AgentKey,
    pub(crate) waiting: Vec<crate::core::Submission>,
    pub(crate) deadline: Instant,
}

impl Default for Tiering {
    fn default() -> Self {
        Self::new(Vec::new(), LoadPolicy::default())
    }
}

impl Tiering {
    /// `list`: the tiers, fastest first.
    pub(crate) fn new(mut list: Vec<Box<dyn Tier>>, policy: LoadPolicy) -> Self {
        // A tier evicting on its own threads passes its evictions on only
        // when a tier below it takes them.
        for t in 0..list.len() {
            let below = list[t + 1..].iter().any(|b| b.takes_evictions());
            list[t].pass_evictions(below);
        }
        let counters = TierCounters {
            tiers: list.iter().map(|t| TierMoves { name: t.name(), ..TierMoves::default() }).collect(),
            ..TierCounters::default()
        };
        Self {
            costs: CostModel::new(list.len()),
            list,
            loads: HashMap::new(),
            pending: PendingBlocks::default(),
            policy,
            counters,
            next_commit_retry: None,
            fetches: HashMap::new(),
            prefetch: None,
            partial_evictions: false,
            events: std::sync::Arc::new(crate::kv_events::KvEvents::new()),
            next_producer: 0,
        }
    }

    /// The RAM tier (if `ram_bytes > 0`) above the given ones.
    pub(crate) fn with_ram(ram_bytes: u64, below: Vec<Box<dyn Tier>>, policy: LoadPolicy) -> Self {
        let mut list: Vec<Box<dyn Tier>> = Vec::new();
        if ram_bytes > 0 {
            list.push(Box::new(RamTier::new(ram_bytes)));
        }
        list.extend(below);
        Self::new(list, policy)
    }

    /// Whether evicted blocks are kept anywhere.
    pub(crate) fn enabled(&self) -> bool {
        !self.list.is_empty()
    }

    /// Whether some tier keeps agents across a restart.
    pub(crate) fn durable(&self) -> bool {
        self.list.iter().any(|t| t.durable())
    }

    pub(crate) fn next_producer(&mut self) -> ProducerId {
        self.next_producer += 1;
        self.next_producer
    }
}

/// What moved through one tier, by the engine's count.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct TierMoves {
    /// The tier's name.
    pub name: &'static str,
    /// Prompt tokens served from it.
    pub hit_tokens: u64,
    /// Blocks given to it (evicted from the pool or the tier above, and
    /// kept or queued).
    pub stored: u64,
    /// Blocks brought from it into the pool.
    pub to_pool: u64,
}

/// Engine-side tier counters (each tier keeps its own too).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct TierCounters {
    /// Prompt tokens served from blocks already in the pool.
    pub hit_tokens_pool: u64,
    /// Per tier, in the tiers' order.
    pub tiers: Vec<TierMoves>,
    /// Blocks that left the pool or a tier and were kept nowhere (queue
    /// full, no tier below, a store failing).
    pub dropped: u64,
    /// Loads that ran past their deadline (the rest was recomputed).
    pub load_timeouts: u64,
    /// Blocks that failed verification when loaded (recomputed).
    pub load_rejects: u64,
    /// Tier hits not loaded because recomputing was estimated faster.
    pub loads_skipped: u64,
    /// Agent commits deferred because a write queue was full.
    pub commits_deferred: u64,
    /// Time from a load's start to its blocks being in the pool.
    pub load_latency: Histogram,
    /// Engine-thread seconds spent importing blocks that a tier returned at
    /// once (RAM).
    pub promote_seconds: f64,
    /// Engine-thread seconds spent exporting evicted blocks (to RAM or a
    /// write queue).
    pub stash_seconds: f64,
    /// Engine-thread seconds spent preparing agent commits (exporting new
    /// blocks, building manifests): what durability costs the step loop.
    pub commit_seconds: f64,
    /// Agents restored from durable tiers at start.
    pub agents_restored: u64,
    /// Blocks of restored agents brought back into RAM after a start.
    pub prefetched: u64,
    /// Agents this process did not know, resumed on a turn from a manifest
    /// another replica wrote to a shared tier.
    pub agents_resumed: u64,
}

impl TierCounters {
    /// The counters of the tier named `name` (zero if there is none).
    pub fn tier(&self, name: &str) -> TierMoves {
        self.tiers.iter().find(|t| t.name == name).cloned().unwrap_or_default()
    }
}

/// The tiers' numbers, in the engine's snapshot.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct TierStats {
    /// The engine's counters.
    pub counters: TierCounters,
    /// Each tier's own snapshot, in order.
    #[serde(skip)]
    pub tiers: Vec<TierSnapshot>,
    /// The disk tier's own counters, if there is one.
    #[serde(skip)]
    pub disk: Option<tiers::DiskStats>,
}

impl TierStats {
    /// The snapshot of the tier named `name`.
    pub fn tier(&self, name: &str) -> Option<&TierSnapshot> {
        self.tiers.iter().find(|t| t.name == name)
    }
}
