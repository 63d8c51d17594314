//! The engine thread and the cloneable [`EngineHandle`].
//!
//! # Concurrency
//!
//! One thread owns the model, the cache and every queue (the `EngineCore`);
//! nothing else touches them, so they need no lock. Callers talk to it over
//! a command channel (`std::sync::mpsc`, never blocking the sender) and hear
//! back over one unbounded `tokio` channel per request (usable from async
//! code and, with `blocking_recv`, from plain threads). Two pieces of state
//! are shared:
//! - the published [`EngineStats`] snapshot: one mutex, written once per loop
//!   iteration by the engine, read (cloned) by [`EngineHandle::stats`]; never
//!   held while calling out;
//! - the waiting counts (all, and per tenant): one mutex; [`EngineHandle::submit`]
//!   checks both limits and takes a place in one critical section, and a
//!   ticket gives it back when the request leaves the queue, whichever way
//!   it leaves.
//!
//! The loop: take commands (blocking only when idle, until the next deadline
//! or TTL expiry), drop cancelled and timed-out requests, run one step,
//! publish the snapshot. When every handle is gone it finishes the work in
//! hand and exits; [`EngineHandle::shutdown`] stops taking requests, lets the
//! running ones finish within a grace period, then ends the rest.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use model::{Model, TextCodec};
use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::agents::{AgentInfo, AgentKey, AgentUpdate, BlockLocations};
use crate::core::{EngineCore, QueueCounts, Submission};
use crate::error::{Error, Result};
use crate::metrics::EngineStats;
use crate::request::{AgentId, Event, Prompt, Request, RequestId, TenantId, ValidRequest};
use crate::speculative::Speculation;
use crate::tiering::{TierConfig, Tiering};

mod config;
mod events;
mod handle;
mod run;

pub use config::{EngineConfig, Limits};
pub(crate) use events::EventSender;
pub use events::EventStream;
use run::{run_loop, StopOnExit};

/// Longest the idle loop sleeps before looking at deadlines again.
const IDLE_TICK: Duration = Duration::from_millis(250);
/// Sleep when work exists but none could run (the pool is full of pinned
/// agents, or every waiting request waits for its agent).
const STALL_TICK: Duration = Duration::from_millis(5);
/// Commands handled between two scheduling steps at most. Tier threads
/// report as fast as they read (a restart's prewarm: thousands of blocks,
/// each report asking for the next read), so draining until the channel is
/// empty could keep a waiting turn from being admitted until they stop.
const COMMANDS_PER_STEP: usize = 32;
/// Longest shutdown grace honoured (a longer one is cut to this).
const MAX_GRACE: Duration = Duration::from_secs(24 * 3600);

pub(super) enum Command {
    Submit(Box<Submission>),
    Cancel(RequestId),
    Agents(TenantId, oneshot::Sender<Vec<AgentInfo>>),
    PrefixTree(TenantId, oneshot::Sender<crate::PrefixTree>),
    Agent(TenantId, AgentId, oneshot::Sender<Result<AgentInfo>>),
    DeleteAgent(TenantId, AgentId, oneshot::Sender<Result<()>>),
    HandOverAgent(TenantId, AgentId, oneshot::Sender<Result<()>>),
    Offload(TenantId, AgentId, crate::OffloadTo, oneshot::Sender<Result<BlockLocations>>),
    Flusher(oneshot::Sender<Option<tiers::Flusher>>),
    ForgetDiskCache(oneshot::Sender<()>),
    /// A report from the tier at this position in the tier list.
    Tier(usize, tiers::TierEvent),
    /// The last handle is gone (tier threads keep senders of their own, so
    /// the channel alone cannot tell).
    HandlesGone,
    UpdateAgent(TenantId, AgentId, AgentUpdate, oneshot::Sender<Result<AgentInfo>>),
    SetQuota(TenantId, Option<u32>, oneshot::Sender<Result<()>>),
    CheckInvariants(oneshot::Sender<Result<(), String>>),
    KvSnapshot(oneshot::Sender<crate::kv_events::KvSnapshot>),
    /// Publishes a fresh stats snapshot, then answers: what a caller reads
    /// from [`Engine::stats`] afterwards is no older than the call.
    Publish(oneshot::Sender<()>),
    Shutdown(Duration, oneshot::Sender<()>),
}

pub(super) struct Shared {
    pub(super) tx: mpsc::Sender<Command>,
    /// What the pool and tiers gain and lose (`kv_events.rs`).
    pub(super) kv_events: Arc<crate::kv_events::KvEvents>,
    /// The model's fingerprint (block namespaces derive from it).
    pub(super) fingerprint: Arc<[u8]>,
    /// Set by the engine thread as it stops, before it answers `shutdown`.
    pub(super) stopped: Arc<AtomicBool>,
    pub(super) stats: Arc<Mutex<EngineStats>>,
    pub(super) waiting: Arc<QueueCounts>,
    pub(super) next_id: AtomicU64,
    pub(super) codec: Arc<dyn TextCodec>,
    pub(super) grammars: crate::grammar::Grammars,
    pub(super) limits: Limits,
    pub(super) config: EngineConfig,
}

impl Drop for Shared {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::HandlesGone);
    }
}

/// A cloneable way in to the engine. Cheap to clone; the engine stops when
/// the last clone is dropped (after finishing its work) or on
/// [`EngineHandle::shutdown`].
#[derive(Clone)]
pub struct EngineHandle {
    pub(super) shared: Arc<Shared>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle").field("limits", &self.shared.limits).finish_non_exhaustive()
    }
}

/// Starts an engine over `model` on a thread of its own.
///
/// # Errors
/// [`Error::InvalidConfig`] if `config` cannot work ([`EngineConfig::validate`]);
/// [`Error::Model`] if the thread cannot be spawned.
pub fn start(mut model: Box<dyn Model>, codec: Arc<dyn TextCodec>, config: EngineConfig) -> Result<EngineHandle> {
    config.validate()?;
    let spec = model.spec();
    let limits = Limits {
        max_positions: model.max_positions(),
        cache_tokens: spec.num_blocks() * spec.block_size(),
        block_size: spec.block_size(),
        vocab_size: model.vocab_size(),
    };
    let (tx, rx) = mpsc::channel();
    let stats = Arc::new(Mutex::new(EngineStats::default()));
    let (tiers, manifests) = open_tiers(model.as_mut(), &config.tiers, &tx)?;
    let kv_events = Arc::clone(&tiers.events);
    let fingerprint: Arc<[u8]> = Arc::from(model.fingerprint());
    let mut core = EngineCore::new(model, Arc::clone(&codec), config.clone(), tiers);
    if !manifests.is_empty() {
        let restored = core.restore_agents(manifests);
        let prewarm = core.prewarm();
        tracing::info!(
            agents = restored,
            prewarm_blocks = prewarm,
            "agents restored from the disk tier; their blocks are being loaded back into RAM, most recent first"
        );
    }
    // Readers see the engine's real state from the start, not defaults.
    if let Ok(mut s) = stats.lock() {
        *s = core.snapshot(Instant::now());
    }
    let published = Arc::clone(&stats);
    let stopped = Arc::new(AtomicBool::new(false));
    let stopping = Arc::clone(&stopped);
    std::thread::Builder::new()
        .name("kvserve-engine".into())
        .spawn(move || {
            // Marks the engine stopped however the loop ends, a panic
            // included, so callers get `EngineStopped` and health says so.
            let _stop = StopOnExit(Arc::clone(&stopping));
            run_loop(core, &rx, &published, &stopping);
        })
        .map_err(|e| Error::Model(format!("cannot start the engine thread: {e}")))?;
    let shared = Shared {
        tx,
        kv_events,
        fingerprint,
        stopped,
        stats,
        waiting: Arc::new(QueueCounts::default()),
        next_id: AtomicU64::new(1),
        grammars: crate::grammar::Grammars::new(Arc::clone(&codec), limits.vocab_size),
        codec,
        limits,
        config,
    };
    Ok(EngineHandle { shared: Arc::new(shared) })
}

/// Opens the tiers `config` asks for, fastest first (RAM, disk, remote);
/// the queued tiers' threads report to the engine over `tx`. Returns the
/// manifests of the agents found on disk.
fn open_tiers(
    model: &mut dyn Model,
    config: &TierConfig,
    tx: &mpsc::Sender<Command>,
) -> Result<(Tiering, Vec<tiers::AgentManifest>)> {
    let layout = model.storage().layout();
    let payload = model.storage().block_bytes();
    let block_size = model.spec().block_size();
    let fp = tiers::StoreFingerprint::new(model.fingerprint(), model.spec(), &[layout]);
    // Each queued tier's reports name its position in the list (after
    // RAM, if there is one).
    let sink = |position: usize| -> tiers::EventSink {
        let tx = tx.clone();
        Arc::new(move |ev| {
            let _ = tx.send(Command::Tier(position, ev));
        })
    };
    let first = usize::from(config.ram_bytes > 0);
    let mut below: Vec<Box<dyn tiers::Tier>> = Vec::new();
    let mut agents = Vec::new();
    if let Some(disk) = &config.disk {
        let opened = tiers::DiskTier::open(disk.clone(), fp, block_size, payload, sink(first + below.len()))
            .map_err(|e| Error::Storage(e.to_string()))?;
        tracing::info!(
            dir = %opened.tier.dir().display(),
            agents = opened.agents.len(),
            blocks = opened.blocks,
            mib = opened.bytes >> 20,
            rejected = opened.rejected,
            temps_removed = opened.temps_removed,
            ms = opened.elapsed.as_millis() as u64,
            "disk tier opened: recovered its agents and blocks"
        );
        below.push(Box::new(opened.tier));
        agents = opened.agents;
    }
    if let Some(remote) = &config.remote {
        let tier = tiers::RemoteTier::open(remote.clone(), fp, block_size, payload, sink(first + below.len()))
            .map_err(|e| Error::Storage(e.to_string()))?;
        match tier.degraded() {
            None => tracing::info!(url = tier.url(), "remote tier connected"),
            Some(reason) => {
                tracing::warn!(url = tier.url(), %reason, "remote tier not reachable yet: serving from the local tiers, retrying in the background");
            }
        }
        below.push(Box::new(tier));
    }
    Ok((Tiering::with_ram(config.ram_bytes, below, config.load), agents))
}
