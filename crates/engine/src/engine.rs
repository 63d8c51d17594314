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

use crate::agents::{AgentInfo, AgentUpdate, BlockLocations};
use crate::core::{EngineCore, QueueCounts, Submission};
use crate::error::{Error, Result};
use crate::metrics::EngineStats;
use crate::request::{AgentId, Event, Prompt, Request, RequestId, TenantId, ValidRequest};
use crate::speculative::Speculation;
use crate::tiering::{TierConfig, Tiering};

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

/// Scheduling limits.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The model's name as the API reports it.
    pub model_name: String,
    /// Tokens per model step (decodes plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// Requests waiting for admission before new ones are `Overloaded`.
    pub max_waiting: usize,
    /// Requests one tenant may have waiting (so one tenant cannot fill the
    /// queue).
    pub max_waiting_per_tenant: usize,
    /// Reuse cached K/V of earlier requests and agents (off only to compare).
    pub prefix_cache: bool,
    /// Timeout of requests that set none.
    pub default_timeout: Option<Duration>,
    /// Agents one tenant may keep. A new agent past it makes the tenant
    /// forget its least recently used idle evictable agent; if it has none,
    /// the request is refused with `TooManyAgents`.
    pub max_agents_per_tenant: usize,
    /// Share of the pool one tenant's pinned agents may hold (0 to 1).
    /// Pinning past it is refused (`PinLimit`); a pinned agent whose turn
    /// takes its tenant past it becomes evictable. The same share of the
    /// disk tier's budget bounds their records there, and of a hybrid
    /// model's sliding-window pages the pages their windows hold.
    pub max_pinned_share: f64,
    /// Share of the pool (and of the disk tier's budget) all tenants'
    /// pinned agents may hold together (0 to 1): two tenants each within
    /// their share cannot pin the whole pool.
    pub max_pinned_share_total: f64,
    /// Admission weights per tenant (default 1): among waiting requests of
    /// the same priority, the one whose tenant has the fewest admitted
    /// requests per weight goes first, so one tenant cannot take every
    /// running slot.
    pub tenant_weights: std::collections::HashMap<TenantId, u32>,
    /// The tiers below the pool (RAM, disk). None by default.
    pub tiers: TierConfig,
    /// Whether decoding drafts tokens to verify several per step
    /// (`speculative.rs`).
    pub speculative: Speculation,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            model_name: "model".into(),
            max_batch_tokens: 512,
            max_running: 64,
            max_waiting: 256,
            max_waiting_per_tenant: 64,
            prefix_cache: true,
            default_timeout: Some(Duration::from_secs(600)),
            max_agents_per_tenant: 1024,
            max_pinned_share: 0.5,
            max_pinned_share_total: 0.8,
            tenant_weights: std::collections::HashMap::new(),
            tiers: TierConfig::default(),
            speculative: Speculation::default(),
        }
    }
}

enum Command {
    Submit(Box<Submission>),
    Cancel(RequestId),
    Agents(TenantId, oneshot::Sender<Vec<AgentInfo>>),
    PrefixTree(TenantId, oneshot::Sender<crate::PrefixTree>),
    Agent(TenantId, AgentId, oneshot::Sender<Result<AgentInfo>>),
    DeleteAgent(TenantId, AgentId, oneshot::Sender<Result<()>>),
    HandOverAgent(TenantId, AgentId, oneshot::Sender<Result<()>>),
    Offload(TenantId, AgentId, bool, oneshot::Sender<Result<BlockLocations>>),
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

/// Sizes a caller needs to validate requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The model's context length.
    pub max_positions: usize,
    /// Tokens the whole KV pool holds.
    pub cache_tokens: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Logit row length (valid token ids are below it).
    pub vocab_size: usize,
}

impl Limits {
    /// The most tokens one request (prompt plus answer) may span.
    pub fn max_request_tokens(&self) -> usize {
        self.max_positions.min(self.cache_tokens)
    }
}

struct Shared {
    tx: mpsc::Sender<Command>,
    /// What the pool and tiers gain and lose (`kv_events.rs`).
    kv_events: Arc<crate::kv_events::KvEvents>,
    /// The model's fingerprint (block namespaces derive from it).
    fingerprint: Arc<[u8]>,
    /// Set by the engine thread as it stops, before it answers `shutdown`.
    stopped: Arc<AtomicBool>,
    stats: Arc<Mutex<EngineStats>>,
    waiting: Arc<QueueCounts>,
    next_id: AtomicU64,
    codec: Arc<dyn TextCodec>,
    grammars: crate::grammar::Grammars,
    limits: Limits,
    config: EngineConfig,
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
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle").field("limits", &self.shared.limits).finish_non_exhaustive()
    }
}

impl EngineConfig {
    /// Checks that requests can make progress under these numbers.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the first problem.
    pub fn validate(&self) -> Result<()> {
        let problem = if self.max_batch_tokens == 0 {
            "max_batch_tokens must be at least 1"
        } else if self.max_running == 0 {
            "max_running must be at least 1"
        } else if self.max_waiting == 0 || self.max_waiting_per_tenant == 0 {
            "max_waiting and max_waiting_per_tenant must be at least 1"
        } else if self.max_agents_per_tenant == 0 {
            "max_agents_per_tenant must be at least 1"
        } else if !(0.0..=1.0).contains(&self.max_pinned_share) || !(0.0..=1.0).contains(&self.max_pinned_share_total) {
            "max_pinned_share and max_pinned_share_total must be between 0 and 1"
        } else if self.tenant_weights.values().any(|&w| w == 0) {
            "tenant weights must be at least 1"
        } else if self.default_timeout.is_some_and(|t| t.is_zero() || t > crate::request::MAX_TIMEOUT) {
            "default_timeout must be positive and at most a year"
        } else if self.max_running > self.max_batch_tokens {
            // Every running sequence must get its decode token each step,
            // or the newest ones would wait while older ones finish.
            "max_running must not exceed max_batch_tokens"
        } else {
            return Ok(());
        };
        Err(Error::InvalidConfig(problem.into()))
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

/// Sets the engine's `stopped` flag when dropped.
struct StopOnExit(Arc<AtomicBool>);

impl Drop for StopOnExit {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A shutdown under way: when in-flight work is cut off, and every caller
/// waiting for the engine to stop.
struct Stopping {
    deadline: Instant,
    waiters: Vec<oneshot::Sender<()>>,
}

fn run_loop(mut core: EngineCore, rx: &mpsc::Receiver<Command>, published: &Mutex<EngineStats>, stopped: &AtomicBool) {
    let mut shutdown: Option<Stopping> = None;
    let mut waiters = Vec::new();
    let mut stalled = false;
    let mut disconnected = false;
    loop {
        let wait = if !core.has_work() {
            let now = Instant::now();
            core.next_wakeup().map_or(IDLE_TICK, |t| t.saturating_duration_since(now).min(IDLE_TICK))
        } else if stalled {
            STALL_TICK
        } else {
            Duration::ZERO
        };
        let first = if wait.is_zero() {
            rx.try_recv().map_err(|e| matches!(e, TryRecvError::Disconnected))
        } else if disconnected {
            // No handle can send any more; wait without spinning, then take
            // what the tier threads reported meanwhile.
            std::thread::sleep(wait);
            rx.try_recv().map_err(|_| true)
        } else {
            rx.recv_timeout(wait).map_err(|e| matches!(e, RecvTimeoutError::Disconnected))
        };
        let mut next = first;
        for handled in 1.. {
            match next {
                Ok(Command::HandlesGone) => disconnected = true,
                Ok(Command::Publish(reply)) => {
                    let snapshot = core.snapshot(Instant::now());
                    if let Ok(mut s) = published.lock() {
                        *s = snapshot;
                    }
                    let _ = reply.send(());
                }
                Ok(cmd) => handle(&mut core, cmd, &mut shutdown),
                Err(gone) => {
                    disconnected |= gone;
                    break;
                }
            }
            if handled == COMMANDS_PER_STEP {
                break;
            }
            next = rx.try_recv().map_err(|e| matches!(e, TryRecvError::Disconnected));
        }
        let now = Instant::now();
        core.housekeeping(now);
        stalled = core.has_work() && !core.step();
        core.flush_kv_events();
        let snapshot = core.snapshot(Instant::now());
        if let Ok(mut s) = published.lock() {
            *s = snapshot;
        }
        if let Some(stopping) = &shutdown {
            if !core.has_work() || Instant::now() >= stopping.deadline {
                stopped.store(true, Ordering::SeqCst);
                core.abort_all(&Error::EngineStopped);
                waiters = shutdown.take().map(|s| s.waiters).unwrap_or_default();
                break;
            }
        }
        if disconnected && !core.has_work() {
            break;
        }
    }
    stopped.store(true, Ordering::SeqCst);
    let snapshot = core.snapshot(Instant::now());
    if let Ok(mut s) = published.lock() {
        *s = snapshot;
    }
    // The tiers finish their queued writes and release the cache directory
    // before `shutdown` returns, so a new engine can open it at once.
    drop(core);
    for done in waiters {
        let _ = done.send(());
    }
    tracing::info!("engine stopped");
}

fn handle(core: &mut EngineCore, cmd: Command, shutdown: &mut Option<Stopping>) {
    match cmd {
        Command::Submit(s) if shutdown.is_some() => {
            let _ = s.events.send(Event::Error(Error::EngineStopped));
        }
        Command::Submit(s) => {
            tracing::trace!(request = s.id.0, "submitted");
            core.submit(*s)
        }
        Command::Cancel(id) => core.cancel(id),
        Command::Agents(tenant, reply) => {
            let _ = reply.send(core.agent_infos(&tenant));
        }
        Command::PrefixTree(tenant, reply) => {
            let _ = reply.send(core.prefix_tree(&tenant));
        }
        Command::Agent(tenant, id, reply) => {
            let key = (tenant, id.clone());
            let _ = reply.send(core.agent_info(&key).ok_or_else(|| Error::UnknownAgent(id.to_string())));
        }
        Command::DeleteAgent(tenant, id, reply) => core.delete_agent(&(tenant, id), reply),
        Command::HandOverAgent(tenant, id, reply) => core.hand_over_agent(&(tenant, id), reply),
        Command::Offload(tenant, id, to_disk, reply) => {
            let _ = reply.send(core.offload_agent(&(tenant, id), to_disk));
        }
        Command::Flusher(reply) => {
            let _ = reply.send(core.disk_flusher());
        }
        Command::ForgetDiskCache(reply) => {
            core.forget_disk_cache();
            let _ = reply.send(());
        }
        Command::Tier(tier, ev) => core.on_tier_event(tier, ev),
        Command::KvSnapshot(reply) => {
            let _ = reply.send(core.kv_snapshot());
        }
        Command::HandlesGone | Command::Publish(_) => {} // run_loop handles these
        Command::UpdateAgent(tenant, id, update, reply) => {
            let _ = reply.send(core.update_agent(&(tenant, id), update));
        }
        Command::SetQuota(tenant, quota, reply) => {
            let _ = reply.send(core.set_quota(&tenant, quota));
        }
        Command::CheckInvariants(reply) => {
            let _ = reply.send(core.check_invariants());
        }
        Command::Shutdown(grace, done) => {
            // A later call may shorten the grace, never lengthen it; every
            // caller is answered when the engine has stopped.
            let now = Instant::now();
            let deadline = now.checked_add(grace.min(MAX_GRACE)).unwrap_or(now);
            let stopping = shutdown.get_or_insert_with(|| Stopping { deadline, waiters: Vec::new() });
            stopping.deadline = stopping.deadline.min(deadline);
            stopping.waiters.push(done);
        }
    }
}

/// What the engine sends a request's stream: its events, and the moment it
/// was admitted (which [`EventStream::admitted`] waits for).
#[derive(Debug)]
pub(crate) enum StreamMsg {
    Admitted,
    Event(Event),
}

/// The engine's end of one request's stream.
#[derive(Debug)]
pub(crate) struct EventSender(pub(crate) tmpsc::UnboundedSender<StreamMsg>);

impl EventSender {
    /// Sends an event; an error if the stream was dropped (cancelled).
    pub(crate) fn send(&self, ev: Event) -> std::result::Result<(), ()> {
        self.0.send(StreamMsg::Event(ev)).map_err(|_| ())
    }

    /// Tells the stream its request was admitted.
    pub(crate) fn admitted(&self) {
        let _ = self.0.send(StreamMsg::Admitted);
    }

    /// Whether the stream was dropped.
    pub(crate) fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// The events of one request, in order, ending with `Finished` or `Error`.
/// Dropping it cancels the request (the engine notices and frees its blocks).
#[derive(Debug)]
pub struct EventStream {
    id: RequestId,
    rx: tmpsc::UnboundedReceiver<StreamMsg>,
    /// An event read while waiting for admission, returned next.
    held: Option<Event>,
    done: bool,
}

impl EventStream {
    /// The request's id (for [`EngineHandle::cancel`]).
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// Waits until the request is admitted (it runs, or loads its cached
    /// prefix), so that what could refuse it on the way in (the agent
    /// limit, the tenant's quota, a full cache) has been decided. A
    /// streaming response sends its headers after this.
    ///
    /// # Errors
    /// The request's error if it ended first (then the stream is over).
    pub async fn admitted(&mut self) -> Result<()> {
        while !self.done && self.held.is_none() {
            match self.rx.recv().await {
                Some(StreamMsg::Admitted) => return Ok(()),
                Some(StreamMsg::Event(Event::Error(e))) => {
                    self.done = true;
                    return Err(e);
                }
                Some(StreamMsg::Event(ev)) => self.held = Some(ev),
                None => {
                    self.done = true;
                    return Err(Error::EngineStopped);
                }
            }
        }
        Ok(())
    }

    /// The next event; `None` after the last. If the engine dies first, one
    /// `Error(EngineStopped)` is returned instead of silence.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(ev) = self.held.take() {
                return self.settle(Some(ev));
            }
            if self.done {
                return None;
            }
            match self.rx.recv().await {
                Some(StreamMsg::Admitted) => {}
                Some(StreamMsg::Event(ev)) => return self.settle(Some(ev)),
                None => return self.settle(None),
            }
        }
    }

    /// [`EventStream::next`] for a plain thread.
    ///
    /// # Panics
    /// If called from inside an async runtime (tokio forbids blocking there).
    pub fn blocking_next(&mut self) -> Option<Event> {
        loop {
            if let Some(ev) = self.held.take() {
                return self.settle(Some(ev));
            }
            if self.done {
                return None;
            }
            match self.rx.blocking_recv() {
                Some(StreamMsg::Admitted) => {}
                Some(StreamMsg::Event(ev)) => return self.settle(Some(ev)),
                None => return self.settle(None),
            }
        }
    }

    fn settle(&mut self, ev: Option<Event>) -> Option<Event> {
        match ev {
            Some(ev @ (Event::Finished { .. } | Event::Error(_))) => {
                self.done = true;
                Some(ev)
            }
            Some(ev) => Some(ev),
            None => {
                self.done = true;
                Some(Event::Error(Error::EngineStopped))
            }
        }
    }
}

impl EngineHandle {
    /// Limits requests are checked against.
    pub fn limits(&self) -> Limits {
        self.shared.limits
    }

    /// True once the engine has stopped (or is stopping after a shutdown).
    pub fn is_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::SeqCst)
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    /// Builds the grammar compiler (the vocabulary's token trie) now, so
    /// the first constrained request does not pay for it. Blocking: call
    /// it off any async runtime.
    pub fn warm_grammars(&self) {
        self.shared.grammars.warm();
    }

    /// The model's codec (tokenizer and chat template).
    pub fn codec(&self) -> &Arc<dyn TextCodec> {
        &self.shared.codec
    }

    /// Renders and tokenizes the prompt (client text literal: only the chat
    /// template's markup becomes control tokens) and checks every limit.
    /// CPU-bound for long prompts: async callers run it off their runtime.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`], [`Error::PromptTooLong`],
    /// [`Error::ContextExceeded`] or [`Error::Prompt`].
    pub fn validate(&self, req: Request) -> Result<ValidRequest> {
        req.validate_params()?;
        let codec = &self.shared.codec;
        let limits = self.shared.limits;
        // Text alone too long for the context is refused before the (costly)
        // tokenization: no token stands for more than `max_token_bytes`.
        let text_bytes = match &req.prompt {
            Prompt::Text(t) => t.len(),
            Prompt::Chat(m) => m.iter().map(|m| m.content.len()).sum(),
            Prompt::Tokens(_) => 0,
        };
        let min_tokens = text_bytes / codec.max_token_bytes().max(1);
        if min_tokens >= limits.max_request_tokens() {
            return Err(Error::PromptTooLong { bytes: text_bytes, min_tokens, limit: limits.max_request_tokens() });
        }
        let prompt = match &req.prompt {
            Prompt::Text(t) => codec.encode_prompt(t),
            Prompt::Chat(m) => codec.encode_chat(m),
            Prompt::Tokens(t) => Ok(t.clone()),
        }
        .map_err(|e| Error::Prompt(e.to_string()))?;
        let vocab = limits.vocab_size as u32;
        let ids_of: [(&'static str, Vec<u32>); 3] = [
            ("prompt", prompt.clone()),
            ("stop_token_ids", req.stop_token_ids.clone()),
            ("logit_bias", req.logit_bias.iter().map(|b| b.0).collect()),
        ];
        for (field, ids) in ids_of {
            if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
                return Err(Error::InvalidRequest {
                    field,
                    problem: format!("token id {bad} is outside the vocabulary of {vocab}"),
                });
            }
        }
        if prompt.is_empty() {
            return Err(Error::InvalidRequest { field: "prompt", problem: "encodes to no tokens".into() });
        }
        let limit = limits.max_request_tokens();
        let max_tokens = match req.max_tokens {
            Some(n) => n,
            None => limit.saturating_sub(prompt.len()),
        };
        let nothing = max_tokens == 0 && req.prompt_logprobs.is_none();
        if nothing || prompt.len().saturating_add(max_tokens) > limit {
            return Err(Error::ContextExceeded { prompt: prompt.len(), max_tokens, limit });
        }
        let mut stop_ids = req.stop_token_ids.clone();
        if !req.ignore_eos {
            stop_ids.extend_from_slice(codec.stop_ids());
        }
        let grammar = req.grammar.as_ref().map(|g| self.shared.grammars.compile(g)).transpose()?;
        Ok(ValidRequest { prompt, max_tokens, stop_ids, grammar, req })
    }

    /// Queues a validated request.
    ///
    /// # Errors
    /// [`Error::Overloaded`] when the queue is full, [`Error::EngineStopped`].
    pub fn submit(&self, req: ValidRequest) -> Result<EventStream> {
        if self.shared.stopped.load(Ordering::SeqCst) {
            return Err(Error::EngineStopped);
        }
        let config = &self.shared.config;
        let (limit, per_tenant) = (config.max_waiting, config.max_waiting_per_tenant);
        let ticket = match self.shared.waiting.reserve(&req.req.tenant, limit, per_tenant) {
            Ok(t) => t,
            Err((queued, _)) if queued >= limit => return Err(Error::Overloaded { queued, limit }),
            Err((_, mine)) => return Err(Error::Overloaded { queued: mine, limit: per_tenant }),
        };
        let id = RequestId(self.shared.next_id.fetch_add(1, Ordering::Relaxed));
        let (events, rx) = tmpsc::unbounded_channel();
        let sub = Submission { id, req, events: EventSender(events), ticket, looked_up: false };
        self.shared.tx.send(Command::Submit(Box::new(sub))).map_err(|_| Error::EngineStopped)?;
        Ok(EventStream { id, rx, held: None, done: false })
    }

    /// [`EngineHandle::validate`] then [`EngineHandle::submit`].
    ///
    /// # Errors
    /// As those two.
    pub fn generate(&self, req: Request) -> Result<EventStream> {
        self.submit(self.validate(req)?)
    }

    /// Cancels a request; its stream ends with `Finished(Cancelled)`.
    /// Unknown or finished ids are ignored.
    ///
    /// # Errors
    /// [`Error::EngineStopped`].
    pub fn cancel(&self, id: RequestId) -> Result<()> {
        self.send(Command::Cancel(id))
    }

    /// One consistent snapshot of the engine's numbers.
    pub fn stats(&self) -> EngineStats {
        self.shared.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn send(&self, cmd: Command) -> Result<()> {
        self.shared.tx.send(cmd).map_err(|_| Error::EngineStopped)
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        rx.await.map_err(|_| Error::EngineStopped)
    }

    /// The tenant's agents, by id.
    ///
    /// # Errors
    /// [`Error::EngineStopped`].
    pub async fn agents(&self, tenant: &TenantId) -> Result<Vec<AgentInfo>> {
        let tenant = tenant.clone();
        self.ask(|r| Command::Agents(tenant, r)).await
    }

    /// The prefix tree of a tenant's agents: their shared and own blocks,
    /// and where those are (`prefix_tree.rs`).
    ///
    /// # Errors
    /// [`Error::EngineStopped`].
    pub async fn prefix_tree(&self, tenant: &TenantId) -> Result<crate::PrefixTree> {
        let tenant = tenant.clone();
        self.ask(|r| Command::PrefixTree(tenant, r)).await
    }

    /// One agent.
    ///
    /// # Errors
    /// [`Error::UnknownAgent`], [`Error::EngineStopped`].
    pub async fn agent(&self, tenant: &TenantId, id: &AgentId) -> Result<AgentInfo> {
        let (tenant, id) = (tenant.clone(), id.clone());
        self.ask(|r| Command::Agent(tenant, id, r)).await?
    }

    /// Forgets an agent and frees its blocks (a turn in progress finishes
    /// but is not kept).
    ///
    /// # Errors
    /// [`Error::UnknownAgent`], [`Error::EngineStopped`].
    pub async fn delete_agent(&self, tenant: &TenantId, id: &AgentId) -> Result<()> {
        let (tenant, id) = (tenant.clone(), id.clone());
        self.ask(|r| Command::DeleteAgent(tenant, id, r)).await?
    }

    /// Hands an idle agent over to another replica: forgotten here, kept in
    /// the shared (remote) tier its next turn resumes from.
    ///
    /// # Errors
    /// [`Error::UnknownAgent`]; [`Error::InvalidRequest`] while a turn runs
    /// or without a shared tier; [`Error::Storage`]; [`Error::EngineStopped`].
    pub async fn hand_over_agent(&self, tenant: &TenantId, id: &AgentId) -> Result<()> {
        let (tenant, id) = (tenant.clone(), id.clone());
        self.ask(|r| Command::HandOverAgent(tenant, id, r)).await?
    }

    /// Changes an agent's retention or priority.
    ///
    /// # Errors
    /// [`Error::UnknownAgent`], [`Error::EngineStopped`].
    pub async fn update_agent(&self, tenant: &TenantId, id: &AgentId, update: AgentUpdate) -> Result<AgentInfo> {
        let (tenant, id) = (tenant.clone(), id.clone());
        self.ask(|r| Command::UpdateAgent(tenant, id, update, r)).await?
    }

    /// Moves an idle agent's blocks out of the pool into the RAM tier, or
    /// with `to_disk` on to the disk tier, as memory pressure would (for
    /// benchmarks and operators; the next turn brings them back). Returns
    /// where its blocks are then.
    ///
    /// # Errors
    /// [`Error::UnknownAgent`], [`Error::InvalidRequest`] if a turn is
    /// running, [`Error::EngineStopped`].
    pub async fn offload_agent(&self, tenant: &TenantId, id: &AgentId, to_disk: bool) -> Result<BlockLocations> {
        let (tenant, id) = (tenant.clone(), id.clone());
        self.ask(|r| Command::Offload(tenant, id, to_disk, r)).await?
    }

    /// Waits until everything queued for the disk tier so far is written
    /// and durable (agents' latest turns included); false if `timeout`
    /// passed first or there is no disk tier.
    ///
    /// # Errors
    /// [`Error::EngineStopped`].
    pub async fn flush_tiers(&self, timeout: Duration) -> Result<bool> {
        let Some(flusher) = self.ask(Command::Flusher).await? else { return Ok(false) };
        let (tx, rx) = oneshot::channel();
        std::thread::spawn(move || {
            let _ = tx.send(flusher.flush(timeout));
        });
        let flushed = rx.await.map_err(|_| Error::EngineStopped)?;
        // The stats (and `degraded`) a caller reads next include what the
        // flush did.
        self.ask(Command::Publish).await?;
        Ok(flushed)
    }

    /// Every block this replica holds, by tier, exact as of the event log's
    /// `next` (what a router's index starts from).
    ///
    /// # Errors
    /// [`Error::EngineStopped`].
    pub async fn kv_snapshot(&self) -> Result<crate::kv_events::KvSnapshot> {
        self.ask(Command::KvSnapshot).await
    }

    /// The model's fingerprint: a block's namespace is
    /// `kv::Namespace::new(fingerprint, tenant)`.
    pub fn model_fingerprint(&self) -> &[u8] {
        &self.shared.fingerprint
    }

    /// The log of blocks entering and leaving the pool and the tiers.
    pub fn kv_events(&self) -> &crate::kv_events::KvEvents {
        &self.shared.kv_events
    }

    /// Drops the disk tier's records from the page cache, so the next loads
    /// read the device (benchmarks).
    ///
    /// # Errors
    /// [`Error::EngineStopped`].
    pub async fn forget_disk_cache(&self) -> Result<()> {
        self.ask(Command::ForgetDiskCache).await
    }

    /// Why a tier is not serving fully, if one is degraded: "<tier> tier:
    /// <reason>" for each such tier.
    pub fn degraded(&self) -> Option<String> {
        let reasons: Vec<String> = self
            .stats()
            .tiers
            .tiers
            .iter()
            .filter_map(|t| t.degraded.as_ref().map(|d| format!("{} tier: {d}", t.name)))
            .collect();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    /// Sets (or with `None` lifts) a tenant's block quota.
    ///
    /// # Errors
    /// [`Error::EngineStopped`].
    pub async fn set_quota(&self, tenant: &TenantId, quota: Option<u32>) -> Result<()> {
        let tenant = tenant.clone();
        self.ask(|r| Command::SetQuota(tenant, quota, r)).await?
    }

    /// Runs the cache's full consistency check (tests and debugging).
    ///
    /// # Errors
    /// The violation found, or [`Error::EngineStopped`] as text.
    pub async fn check_invariants(&self) -> Result<(), String> {
        self.ask(Command::CheckInvariants).await.map_err(|e| e.to_string())?
    }

    /// Stops taking requests, lets running ones finish for up to `grace`,
    /// ends the rest with [`Error::EngineStopped`], and stops the loop.
    ///
    /// # Errors
    /// [`Error::EngineStopped`] if it had already stopped.
    pub async fn shutdown(&self, grace: Duration) -> Result<()> {
        self.ask(|r| Command::Shutdown(grace, r)).await
    }
}
