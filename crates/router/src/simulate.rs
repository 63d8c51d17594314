//! The index and the choice at fleet scale, without HTTP: what `kvserve
//! bench route --simulate` measures.
//!
//! Synthetic fleet: `blocks` distinct blocks in chains of `chain_blocks`,
//! each chain held by one replica (its blocks spread over pool, RAM and
//! disk), one chain in ten also by a second replica (an agent that
//! overflowed), and a few hot prefixes (system prompts of 32 blocks) held
//! by every replica (spilled entries). Block addresses are seeded
//! pseudo-random 128-bit values: the index sees them exactly as it sees
//! xxh3 chains. Replicas report random loads (0 to 7).
//!
//! Each decision is the real path a request without an agent takes once
//! its addresses are known: the lock, the candidates, the prefix costs, the
//! bounded choice and the in-flight increment (given back after the
//! timing). Prompts are a known chain's first blocks (a random length)
//! followed by `chain_blocks / 4` new ones, or (one in five) wholly new.
//! Timings are single-threaded and include no tokenization.

use std::sync::Arc;
use std::time::Instant;

use kv::BlockHash;

use crate::index::{ReplicaId, Tier};
use crate::policy::Reason;
use crate::state::{Plan, Shared, Synced, Target, Weights};
use crate::wire::Load;

/// The fleet to simulate.
#[derive(Clone, Copy, Debug)]
pub struct SimParams {
    /// Replicas.
    pub replicas: usize,
    /// Distinct blocks indexed, in all.
    pub blocks: usize,
    /// Blocks per chain (a prompt of `chain_blocks × 16` tokens).
    pub chain_blocks: usize,
    /// Decisions to time.
    pub decisions: usize,
    /// Seed of the synthetic addresses and loads.
    pub seed: u64,
}

impl Default for SimParams {
    fn default() -> Self {
        Self { replicas: 100, blocks: 10_000_000, chain_blocks: 64, decisions: 200_000, seed: 1 }
    }
}

/// What was measured.
#[derive(Clone, Debug)]
pub struct SimReport {
    /// The fleet.
    pub params: SimParams,
    /// Distinct blocks in the index.
    pub indexed_blocks: usize,
    /// (replica, block) pairs, each replica's holdings counted.
    pub held_pairs: u64,
    /// Entries with more than four holders.
    pub spilled: usize,
    /// Seconds to build the index (every replica's snapshot applied).
    pub build_seconds: f64,
    /// The index's allocated bytes ([`crate::index::BlockIndex::memory_bytes`]).
    pub index_bytes: usize,
    /// Growth of the process's resident memory while the index was built
    /// (Linux; `None` elsewhere).
    pub rss_growth: Option<usize>,
    /// Seconds the timed decisions took in all.
    pub decide_seconds: f64,
    /// Per-decision latency percentiles, microseconds: p50, p99, p99.9, max.
    pub micros: [f64; 4],
    /// Decisions per reason, in [`Reason::ALL`] order.
    pub reasons: [u64; 4],
    /// Mean prompt length in blocks.
    pub prompt_blocks: f64,
}

/// A splitmix64 step.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The address of block `i` of chain `c` (hot prefixes are chains
/// `u64::MAX - k`; new blocks use `salt`).
fn address(seed: u64, c: u64, i: u64) -> BlockHash {
    let a = mix(mix(seed ^ mix(c)).wrapping_add(i));
    let b = mix(a ^ 0x6a09_e667_f3bc_c908);
    BlockHash::from_u128((u128::from(a) << 64) | u128::from(b))
}

const HOT_PREFIXES: u64 = 16;
const HOT_BLOCKS: u64 = 32;

fn resident_bytes() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Builds the fleet's index and times `params.decisions` decisions.
///
/// # Panics
/// If `params.replicas` is 0 or more than [`ReplicaId::MAX`].
pub fn simulate(params: SimParams) -> SimReport {
    assert!((1..=ReplicaId::MAX).contains(&params.replicas), "1 to {} replicas", ReplicaId::MAX);
    let p = params;
    let r_count = p.replicas as u64;
    let chain = p.chain_blocks.max(1) as u64;
    let chains = (p.blocks as u64 / chain).max(1);
    let urls: Vec<Arc<str>> = (0..p.replicas).map(|i| Arc::from(format!("http://replica-{i}:8080"))).collect();
    let shared = Arc::new(Shared::new(&urls, Weights { bound: 1.5, load_weight: 1.0 }));
    let tiers = [Tier::Pool, Tier::Pool, Tier::Ram, Tier::Disk];

    let before = resident_bytes();
    let started = Instant::now();
    for r in 0..r_count {
        let mut blocks = Vec::with_capacity((chains / r_count * chain) as usize + 1024);
        // Chains whose home is r, and those it holds as the second copy.
        let mut c = r;
        while c < chains {
            for i in 0..chain {
                blocks.push((address(p.seed, c, i), tiers[(mix(c ^ i) % 4) as usize]));
            }
            c += r_count;
        }
        let mut c = (r + 1) % r_count;
        while c < chains {
            if mix(c).is_multiple_of(10) {
                for i in 0..chain {
                    blocks.push((address(p.seed, c, i), Tier::Pool));
                }
            }
            c += r_count;
        }
        for h in 0..HOT_PREFIXES {
            for i in 0..HOT_BLOCKS {
                blocks.push((address(p.seed, u64::MAX - h, i), Tier::Pool));
            }
        }
        let load = Load { running: mix(p.seed ^ r) % 8, ..Load::default() };
        let id = ReplicaId::new(r as usize).unwrap_or_else(|| unreachable!("checked against ReplicaId::MAX above"));
        shared.resync(id, Synced { epoch: "0000000000000000".into(), next: 0, load, blocks }, false);
        shared.set_health(id, true);
    }
    let build_seconds = started.elapsed().as_secs_f64();
    let rss_growth = before.zip(resident_bytes()).map(|(b, a)| a.saturating_sub(b));
    let (indexed_blocks, index_bytes, held_pairs, spilled) = shared.index_stats();

    let mut micros = Vec::with_capacity(p.decisions);
    let mut reasons = [0u64; 4];
    let mut total_blocks = 0usize;
    let mut rng = mix(p.seed ^ 0xdec1_5105);
    for d in 0..p.decisions as u64 {
        rng = mix(rng);
        let c = rng % chains;
        let known = if rng.is_multiple_of(5) { 0 } else { 1 + (rng >> 8) % chain };
        let fresh = chain / 4 + 1;
        let mut prompt: Vec<BlockHash> = (0..known).map(|i| address(p.seed, c, i)).collect();
        prompt.extend((0..fresh).map(|i| address(p.seed ^ 0xf00d, d, i)));
        total_blocks += prompt.len();
        let plan = Plan { tenant: "default".into(), target: Target::Completion { agent: None, chain: Some(prompt) } };
        let t = Instant::now();
        let dispatch = shared.decide(&plan, &[]);
        micros.push(t.elapsed().as_secs_f64() * 1e6);
        if let Some(d) = dispatch {
            if let Some(i) = Reason::ALL.iter().position(|&r| r == d.reason) {
                reasons[i] += 1;
            }
        }
    }
    let decide_seconds = micros.iter().sum::<f64>() / 1e6;
    micros.sort_by(f64::total_cmp);
    let at = |q: f64| micros.get(((micros.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0);
    SimReport {
        params: p,
        indexed_blocks,
        held_pairs,
        spilled,
        build_seconds,
        index_bytes,
        rss_growth,
        decide_seconds,
        micros: [at(0.5), at(0.99), at(0.999), at(1.0)],
        reasons,
        prompt_blocks: total_blocks as f64 / p.decisions.max(1) as f64,
    }
}
