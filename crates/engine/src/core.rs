//! The engine's state machine: queues, admission, batch planning,
//! preemption, sampling and finishing. Plain `&mut self`; the loop in
//! `engine/` owns it on one thread, so no lock guards any of this.
//!
//! # One step
//!
//! 1. **Plan** under a token budget (`max_batch_tokens`): every decode
//!    (one token each), then prefills, shortest remaining first, in three
//!    passes: running prefills one chunk finishes, and any that got no chunk
//!    for [`PREFILL_MAX_WAIT`] (oldest first: shortest-first cannot starve a
//!    long prompt); then admission (2.); then the long running prefills. A
//!    step takes no further prefill once it holds [`PREFILL_STEP_ROWS`]
//!    prefill rows: prompts then finish one after another, each answering
//!    as soon as its own prefill is done, instead of all at the end of one
//!    long shared step (the kernels are as efficient at 64 rows as at 500,
//!    so only the time to first token changes). Four agents whose ~90-token
//!    turns continue a shared, just-computed system prompt each get their
//!    first token after their own tail, not after every tail.
//!    A step with other work holds at most [`SHARED_CHUNK_ROWS`] prefill
//!    rows; only a prefill alone takes the whole budget. So a new short
//!    turn waits at most one step behind a long document, not for all of
//!    it (`kvserve bench agents` beside a stream of 2,500-token prompts: TTFT
//!    p50 3.6 s before, 0.45 s after), and decodes keep their pace.
//! 2. **Admit** waiting requests while budget and sequence slots remain, in
//!    priority order, FIFO within a priority; a request whose agent is mid-
//!    turn waits without blocking the others. Admission reuses cached K/V:
//!    an agent's held conversation (fork + truncate to the common prefix,
//!    partial blocks included; if the cut is impossible, e.g. a sliding
//!    window released those blocks, the prefix index) or else the prefix
//!    index (whole blocks). At least the last prompt token is always
//!    computed, for its logits. A request the *pool* cannot take now goes
//!    back to the queue head and the others wait behind it (so a large
//!    request is not starved). A request its *tenant's quota* cannot take
//!    next to the tenant's running work is skipped — other tenants go
//!    ahead — and fails with `QuotaExceeded` only if the tenant runs
//!    nothing that could give blocks back.
//! 3. **Make room**: the step's exact block need ([`KvCache::append_cost`])
//!    is compared with each tenant's quota, then with free + evictable
//!    blocks (the pool evicts cached blocks itself, LRU) and, on a hybrid
//!    model, with the sliding-window pages no live window holds (every new
//!    block gets a page; an idle agent's window holds its pages as its
//!    blocks are held, so pages run short as blocks do). Over a quota: that
//!    tenant's idle agents are released, then its newest lowest-priority
//!    request is preempted; its oldest request always progresses, so tenants
//!    whose requests fit only one at a time take turns instead of refusing
//!    each other's steps. Short of blocks or pages: release idle unpinned agents
//!    (lowest priority, least recently used first), then preempt the
//!    lowest-priority, most recently admitted running request (blocks freed,
//!    re-queued at its original place with its generated tokens, recomputed
//!    later — mostly from the prefix cache).
//! 4. **Run** the model on the batch. A cache refusal (never expected after
//!    step 3) frees something the same way and retries next step; any other
//!    error fails the batch's requests (the model rolled the cache back,
//!    their sequences are removed).
//! 5. **Sample** for every sequence whose known tokens are now all computed,
//!    stream the token's text, and finish on a stop id, stop string or
//!    `max_tokens`. A finished agent turn hands its sequence to the agent.
//!
//! Every exit path (finish, cancel, dropped stream, timeout, error,
//! shutdown) goes through [`EngineCore::end`], which removes the sequence or
//! gives it to the agent: after all requests end and all agents are deleted
//! the pool is full again (the leak tests check it).

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv::{KvCache, Namespace, OwnerId, SeqId};
use model::{Model, TextCodec};

use crate::agents::{AgentKey, Agents};
use crate::engine::EventSender;
use crate::error::{Error, Result};
use crate::grammar::{Accepted, Constraint, MaskWorker};
use crate::metrics::{EngineStats, RateWindow};
use crate::request::{Event, FinishReason, RequestId, TenantId, Usage, ValidRequest};
use crate::sampling::Sampler;
use crate::speculative::{self, Drafting, Source, Speculation, StepCosts, SuffixIndexes};
use crate::text::TextStream;
use crate::tiering::{ProducerId, Tiering};
use crate::EngineConfig;

mod admission;
mod agent_ops;
mod resume;
mod tier_ops;

pub(crate) use tier_ops::TierReuse;

/// Prefill rows after which a step takes no further prefill (the first
/// prefill in line always gets the chunk it can use). At 64 rows the
/// matmul tiles are full and the weights, streamed once per step, cost a
/// few percent.
const PREFILL_STEP_ROWS: usize = 64;

/// Prefill rows of a step that has other work (decodes, other prompts): a
/// step then lasts about as long as 128 rows take (~140 ms on a 2-vCPU
/// EPYC), so a decode, or a new short prompt, waits about that long behind
/// a long prompt instead of 512-row steps (~550 ms each, seconds for a
/// whole document). A prefill that is the step's only work takes the whole
/// budget (512 rows compute ~5% faster than 128).
const SHARED_CHUNK_ROWS: usize = 128;

/// A running prefill that got no chunk for this long goes first, before
/// shorter prompts: shortest-first cannot starve a long prompt.
const PREFILL_MAX_WAIT: Duration = Duration::from_millis(500);

/// Requests waiting for admission, in all and per tenant: one lock, so the
/// check against both limits and the reservation are one act.
#[derive(Debug, Default)]
pub(crate) struct QueueCounts {
    counts: std::sync::Mutex<Waiting>,
}

/// What [`QueueCounts`] guards.
#[derive(Debug, Default)]
struct Waiting {
    all: usize,
    by_tenant: std::collections::HashMap<TenantId, usize>,
}

/// A refused place: how many wait in all, and for the tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct QueueFull {
    pub(crate) all: usize,
    pub(crate) tenant: usize,
}

impl QueueCounts {
    /// Takes a place for `tenant` if the queue has fewer than `limit` and the
    /// tenant fewer than `per_tenant`; otherwise how many wait.
    pub(crate) fn reserve(
        self: &Arc<Self>,
        tenant: &TenantId,
        limit: usize,
        per_tenant: usize,
    ) -> std::result::Result<QueueTicket, QueueFull> {
        let mut c = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mine = c.by_tenant.get(tenant).copied().unwrap_or(0);
        if c.all >= limit || mine >= per_tenant {
            return Err(QueueFull { all: c.all, tenant: mine });
        }
        c.all += 1;
        *c.by_tenant.entry(tenant.clone()).or_default() += 1;
        Ok(QueueTicket { counts: Arc::clone(self), tenant: tenant.clone() })
    }

    fn release(&self, tenant: &TenantId) {
        let mut c = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        c.all = c.all.saturating_sub(1);
        if let Some(n) = c.by_tenant.get_mut(tenant) {
            *n -= 1;
            if *n == 0 {
                c.by_tenant.remove(tenant);
            }
        }
    }
}

/// A place in the queue; given back when dropped, so every way a request
/// leaves the queue gives its place back.
#[derive(Debug)]
pub(crate) struct QueueTicket {
    counts: Arc<QueueCounts>,
    tenant: TenantId,
}

impl Drop for QueueTicket {
    fn drop(&mut self) {
        self.counts.release(&self.tenant);
    }
}

/// A request handed to the engine.
#[derive(Debug)]
pub(crate) struct Submission {
    pub(crate) id: RequestId,
    pub(crate) req: ValidRequest,
    pub(crate) events: EventSender,
    pub(crate) ticket: QueueTicket,
    /// Its agent's manifest was looked for in the tiers already.
    pub(crate) looked_up: bool,
}

/// A request in flight, waiting or running.
struct Active {
    id: RequestId,
    req: ValidRequest,
    owner: OwnerId,
    agent: Option<AgentKey>,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    seq: Option<SeqId>,
    usage: Usage,
    admitted: bool,
    /// Admission order of the latest admission (preemption picks the newest).
    admission: u64,
    /// Queue order (kept across preemptions, so a preempted request returns
    /// to its place).
    arrival: u64,
    sampler: Sampler,
    /// The request's grammar (`grammar.rs`), if its output is constrained.
    constraint: Option<Constraint>,
    text: TextStream,
    events: EventSender,
    started: Instant,
    deadline: Option<(Instant, Duration)>,
    last_token: Option<Instant>,
    /// When the last step it ran in ended (at first: when it arrived, or
    /// when its tier load finished): a prefill kept waiting past
    /// [`PREFILL_MAX_WAIT`] goes before shorter prompts.
    progressed: Instant,
    ticket: Option<QueueTicket>,
    /// The next block it needs is on its way into the pool (a load, or
    /// another request computing it): admission skips it while that block
    /// is pending from that producer (`tiering.rs`).
    waits_for: Option<(ProducerId, kv::BlockHash)>,
    /// While running: the producer under which it registered the prompt
    /// blocks it computes, so requests sharing its prefix wait for them.
    producing: Option<ProducerId>,
    /// Prompt tokens its latest admission found, by tier (counted when it
    /// is admitted, once).
    tier_hits: TierHits,
    /// The prompt's log-probabilities so far, when asked for
    /// (`Request::prompt_logprobs`), until sent.
    prompt_logprobs: Option<Vec<Option<crate::Logprobs>>>,
    /// Tokens drafted for the step being planned (`speculative.rs`).
    draft: Vec<u32>,
    /// The proposer `draft` came from.
    draft_source: Source,
    /// Its drafting record.
    drafting: Drafting,
}

/// Prompt tokens an admission found in the pool and in each tier (by
/// position in the tier list).
#[derive(Clone, Debug, Default)]
struct TierHits {
    pool: usize,
    tiers: Vec<usize>,
}

impl TierHits {
    fn add(&mut self, tier: usize, tokens: usize) {
        if self.tiers.len() <= tier {
            self.tiers.resize(tier + 1, 0);
        }
        self.tiers[tier] += tokens;
    }
}

impl Active {
    fn key(&self) -> (Reverse<i32>, u64) {
        (Reverse(self.req.req.priority), self.arrival)
    }
}

/// What became of a request after one token ([`EngineCore::take_token`]).
enum Taken {
    /// It goes on; this token was taken.
    Next(u32),
    /// It ends so.
    Last(End),
}

/// How a request ended.
enum End {
    Finished(FinishReason, String),
    Failed(Error),
}

/// See the module doc.
pub(crate) struct EngineCore {
    model: Box<dyn Model>,
    codec: Arc<dyn TextCodec>,
    cache: KvCache,
    config: EngineConfig,
    waiting: BTreeMap<(Reverse<i32>, u64), Active>,
    running: Vec<Active>,
    /// Admitted requests whose blocks are being loaded from a tier.
    loading: Vec<Active>,
    tiers: Tiering,
    agents: Agents,
    stats: EngineStats,
    rate: RateWindow,
    counter: u64,
    /// Computes grammar masks beside the forward pass (started on the first
    /// constrained step).
    masks: Option<MaskWorker>,
    /// Tenants' recent answers, for drafting (`speculative.rs`).
    suffixes: SuffixIndexes,
    /// Steps' wall time by rows, for deciding what to draft.
    step_costs: StepCosts,
}

impl EngineCore {
    pub(crate) fn new(
        model: Box<dyn Model>,
        codec: Arc<dyn TextCodec>,
        config: EngineConfig,
        mut tiers: Tiering,
    ) -> Self {
        tiers.partial_evictions = model.tracks_windows();
        let mut cache = KvCache::new(model.spec().clone());
        // With a tier below the pool, every evicted block's payload is
        // copied out before the block is reused.
        cache.report_evictions(tiers.enabled());
        // What the prefix index gains and loses is told to routers.
        cache.report_changes(true);
        Self {
            model,
            codec,
            cache,
            config,
            waiting: BTreeMap::new(),
            running: Vec::new(),
            loading: Vec::new(),
            tiers,
            agents: Agents::default(),
            stats: EngineStats::default(),
            rate: RateWindow::default(),
            counter: 0,
            masks: None,
            suffixes: SuffixIndexes::default(),
            step_costs: StepCosts::default(),
        }
    }

    pub(crate) fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty() || !self.loading.is_empty()
    }

    fn next_counter(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    fn namespace(&self, tenant: &TenantId) -> Namespace {
        Namespace::new(self.model.fingerprint(), tenant.as_str().as_bytes())
    }

    pub(crate) fn submit(&mut self, mut s: Submission) {
        let tenant = s.req.req.tenant.clone();
        let owner = match OwnerId::new(tenant.as_str()) {
            Ok(o) => o,
            Err(e) => {
                let _ = s.events.send(Event::Error(Error::InvalidId {
                    what: "tenant",
                    id: tenant.to_string(),
                    reason: if matches!(e, kv::Error::InvalidOwnerId { .. }) { "not a valid owner" } else { "invalid" },
                }));
                return;
            }
        };
        let agent = s.req.req.agent.clone().map(|a| AgentKey::new(tenant, a));
        if let Some(key) = &agent {
            // An agent this process does not know may have run its turns on
            // another replica: wait for its manifest if a tier can look.
            let Some(back) = self.look_up_agent(key, s) else { return };
            s = back;
            if let Err(e) = self.make_agent_room(key) {
                let _ = s.events.send(Event::Error(e));
                return;
            }
            self.agents.entry(key.clone());
        }
        let now = Instant::now();
        let timeout = s.req.req.timeout.or(self.config.default_timeout);
        let active = Active {
            id: s.id,
            owner,
            agent,
            tokens: s.req.prompt.clone(),
            seq: None,
            usage: Usage { prompt_tokens: s.req.prompt.len(), ..Usage::default() },
            admitted: false,
            admission: 0,
            arrival: self.next_counter(),
            sampler: Sampler::new(s.req.req.sampling, s.req.req.logit_bias.clone()),
            // Stop strings could only cut a structure short: with a grammar,
            // the grammar decides where the output ends.
            text: TextStream::new(if s.req.grammar.is_some() { Vec::new() } else { s.req.req.stop.clone() }),
            constraint: s.req.grammar.take().map(Constraint::new),
            events: s.events,
            started: now,
            deadline: timeout.map(|t| (now + t, t)),
            last_token: None,
            progressed: now,
            ticket: Some(s.ticket),
            waits_for: None,
            producing: None,
            tier_hits: TierHits::default(),
            prompt_logprobs: s.req.req.prompt_logprobs.map(|_| vec![None]),
            draft: Vec::new(),
            draft_source: Source::Lookup,
            drafting: Drafting::default(),
            req: s.req,
        };
        self.waiting.insert(active.key(), active);
    }

    /// Ends a request the caller cancelled.
    pub(crate) fn cancel(&mut self, id: RequestId) {
        if self.cancel_parked(id) {
            return;
        }
        if let Some(key) = self.waiting.iter().find(|(_, a)| a.id == id).map(|(k, _)| *k) {
            if let Some(a) = self.waiting.remove(&key) {
                self.end(a, End::Finished(FinishReason::Cancelled, String::new()));
            }
        } else if let Some(i) = self.running.iter().position(|a| a.id == id) {
            let a = self.running.swap_remove(i);
            self.end(a, End::Finished(FinishReason::Cancelled, String::new()));
        } else if let Some(i) = self.loading.iter().position(|a| a.id == id) {
            let a = self.loading.swap_remove(i);
            self.end(a, End::Finished(FinishReason::Cancelled, String::new()));
        }
    }

    /// Ends every request (shutdown) with `err`.
    pub(crate) fn abort_all(&mut self, err: &Error) {
        let all: Vec<Active> = std::mem::take(&mut self.waiting)
            .into_values()
            .chain(std::mem::take(&mut self.running))
            .chain(std::mem::take(&mut self.loading))
            .collect();
        for a in all {
            self.end(a, End::Failed(err.clone()));
        }
    }

    /// Drops requests whose stream is gone or whose deadline passed, and
    /// agents whose TTL ran out.
    pub(crate) fn housekeeping(&mut self, now: Instant) {
        let expired = |a: &Active| a.deadline.filter(|d| now >= d.0).map(|d| d.1);
        let gone: Vec<_> = self
            .waiting
            .iter()
            .filter(|(_, a)| a.events.is_closed() || expired(a).is_some())
            .map(|(k, _)| *k)
            .collect();
        for k in gone {
            if let Some(a) = self.waiting.remove(&k) {
                self.end_abandoned(a, now);
            }
        }
        let mut gone = Vec::new();
        for list in [&mut self.running, &mut self.loading] {
            let mut i = 0;
            while i < list.len() {
                if list[i].events.is_closed() || expired(&list[i]).is_some() {
                    gone.push(list.swap_remove(i));
                } else {
                    i += 1;
                }
            }
        }
        for a in gone {
            self.end_abandoned(a, now);
        }
        self.expire_loads(now);
        self.expire_fetches(now);
        self.retry_commits();
        for key in self.agents.expired(now) {
            self.forget_agent(&key);
        }
    }

    fn end_abandoned(&mut self, a: Active, now: Instant) {
        match a.deadline.filter(|d| now >= d.0) {
            Some((_, t)) if !a.events.is_closed() => self.end(a, End::Failed(Error::Timeout(t))),
            _ => self.end(a, End::Finished(FinishReason::Cancelled, String::new())),
        }
    }

    /// When the loop must wake up next even without commands.
    pub(crate) fn next_wakeup(&self) -> Option<Instant> {
        let deadlines =
            self.waiting.values().chain(&self.running).chain(&self.loading).filter_map(|a| a.deadline.map(|d| d.0));
        let loads = self.tiers.loads.values().map(|l| l.deadline);
        deadlines.chain(loads).chain(self.agents.next_expiry()).chain(self.next_fetch_deadline()).min()
    }

    /// One scheduling step; false when nothing could run.
    pub(crate) fn step(&mut self) -> bool {
        let mut budget = self.config.max_batch_tokens;
        let now = Instant::now();
        let mut plan = self.plan_running(&mut budget, now);
        self.admit(&mut plan, &mut budget);
        self.plan_prefills(&mut plan, &mut budget, now, true);
        self.plan_drafts(&mut plan, &mut budget);
        if !self.make_room(&mut plan) {
            for &(i, _) in &plan {
                self.running[i].draft.clear();
            }
            return false;
        }
        // Plan entries and model rows stay aligned: an entry whose sequence
        // cannot be read (never expected) leaves both lists together.
        let mut work: Vec<(SeqId, Vec<u32>)> = Vec::with_capacity(plan.len());
        // Logit rows per entry: a prompt's own log-probabilities need every
        // row of its prefill, a decode with drafts every row, everything
        // else the last one.
        let mut rows: Vec<usize> = Vec::with_capacity(plan.len());
        // Drafted tokens per entry (`speculative.rs`).
        let mut drafts: Vec<Vec<u32>> = Vec::with_capacity(plan.len());
        let running = &mut self.running;
        let cache = &self.cache;
        plan.retain(|&(i, n)| {
            let a = &mut running[i];
            let draft = std::mem::take(&mut a.draft);
            let chunk = a.seq.and_then(|seq| {
                let done = cache.seq_len(seq).ok()?;
                if !draft.is_empty() && n == 1 + draft.len() {
                    let mut t = a.tokens.get(done..done + 1)?.to_vec();
                    t.extend_from_slice(&draft);
                    return Some(((seq, t), n));
                }
                let all = a.prompt_logprobs.is_some() && done < a.req.prompt.len();
                Some(((seq, a.tokens.get(done..done + n)?.to_vec()), if all { n } else { 1 }))
            });
            // Drafts are verified only as the entry they were planned for.
            let draft = if n == 1 + draft.len() { draft } else { Vec::new() };
            chunk.map(|(c, r)| (work.push(c), rows.push(r), drafts.push(draft))).is_some()
        });
        if plan.is_empty() {
            return false;
        }
        let refs: Vec<(SeqId, &[u32])> = work.iter().map(|(s, t)| (*s, t.as_slice())).collect();
        let tentative: Vec<usize> = drafts.iter().map(Vec::len).collect();
        self.stats.steps += 1;
        let prefill: usize =
            work.iter().zip(&drafts).filter(|(_, d)| d.is_empty()).map(|((_, t), _)| t.len()).filter(|&n| n > 1).sum();
        let started = Instant::now();
        // Every live sequence's window (the admitted ones included), so
        // this step's copies and page allocations reclaim none of it.
        self.protect_windows();
        let tiers = &mut self.tiers;
        let mut stash = |storage: &mut dyn kv::BlockStorage, evicted| tier_ops::stash(tiers, storage, evicted);
        // Constrained rows' masks depend only on the tokens generated so
        // far: the mask worker computes them all while the forward pass runs
        // (tens to hundreds of microseconds each; not through rayon, whose
        // workers the forward pass keeps busy).
        let constrained: Vec<(usize, Constraint)> =
            plan.iter().filter_map(|&(i, _)| self.running[i].constraint.take().map(|c| (i, c))).collect();
        if !constrained.is_empty() && self.masks.is_none() {
            self.masks = MaskWorker::start();
        }
        let (model, cache) = (self.model.as_mut(), &mut self.cache);
        let (handed, mut kept) = match (&self.masks, constrained.is_empty()) {
            (Some(worker), false) => match worker.send(constrained) {
                Ok(()) => (true, Vec::new()),
                Err(back) => (false, back),
            },
            (_, _) => (false, constrained),
        };
        let result = crate::txn::run_step_drafts(model, cache, &refs, &rows, &tentative, &mut stash);
        // Waits are counted from the end of a request's last step: a
        // 512-row step alone must not make its prefill overdue at once.
        let ended = Instant::now();
        tracing::trace!(entries = plan.len(), prefill, us = (ended - started).as_micros() as u64, "step");
        for &(i, _) in &plan {
            self.running[i].progressed = ended;
        }
        if handed {
            match self.masks.as_ref().and_then(MaskWorker::recv) {
                Some(back) => kept = back,
                None => {
                    // Their constraints went with the worker: these rows
                    // must not go on unconstrained.
                    self.masks = None;
                    let err = Error::Grammar("the mask worker stopped".into());
                    tracing::error!("the grammar mask worker stopped");
                    self.fail_planned(&plan, &err);
                    return true;
                }
            }
        }
        for (i, c) in kept {
            self.running[i].constraint = Some(c);
        }
        match result {
            Ok(logits) => {
                self.tiers.costs.prefilled(prefill, started.elapsed());
                self.published(&plan);
                self.after_step(&plan, &rows, &drafts, logits);
                // After the step's sampling and masks: a drafted row's cost
                // is all of it.
                self.step_costs.record(work.iter().map(|(_, t)| t.len()).sum(), started.elapsed());
            }
            Err(model::Error::Kv(e @ (kv::Error::QuotaExceeded { .. } | kv::Error::Exhausted { .. }))) => {
                self.on_refused(&plan, &e);
            }
            Err(e) => {
                tracing::error!(error = %e, batch = plan.len(), "model step failed");
                let msg = e.to_string();
                self.fail_planned(&plan, &Error::Model(msg));
            }
        }
        true
    }

    /// Running requests' share of the budget before admission: every
    /// decode (one row each), then the prefills that go before new prompts:
    /// those kept waiting past [`PREFILL_MAX_WAIT`], and those one shared
    /// chunk finishes.
    fn plan_running(&self, budget: &mut usize, now: Instant) -> Vec<(usize, usize)> {
        let mut plan = Vec::new();
        for (i, a) in self.running.iter().enumerate() {
            if self.remaining(a) == 1 && *budget > 0 {
                plan.push((i, 1));
                *budget -= 1;
            }
        }
        self.plan_prefills(&mut plan, budget, now, false);
        plan
    }

    /// Tokens of `a` its sequence has not computed yet: 1 for a decode (the
    /// token it sampled last), the rest of its prompt for a prefill; 0 if
    /// its sequence is gone.
    fn remaining(&self, a: &Active) -> usize {
        a.seq.and_then(|s| self.cache.seq_len(s).ok()).map_or(0, |done| a.tokens.len().saturating_sub(done))
    }

    /// Adds running prefills to `plan`, shortest first (those kept waiting
    /// past [`PREFILL_MAX_WAIT`] before all, oldest first), while the step
    /// has budget and room for prefill rows. Before admission (`long`
    /// false) only the waiting ones and those a shared chunk finishes: new
    /// prompts go before long ones. A chunk is at most [`SHARED_CHUNK_ROWS`]
    /// unless it is the step's only work.
    fn plan_prefills(&self, plan: &mut Vec<(usize, usize)>, budget: &mut usize, now: Instant, long: bool) {
        let mut order: Vec<(bool, usize, u64, usize)> = Vec::new();
        for (i, a) in self.running.iter().enumerate() {
            let left = self.remaining(a);
            if left <= 1 || plan.iter().any(|&(j, _)| j == i) {
                continue;
            }
            let due = now.saturating_duration_since(a.progressed) >= PREFILL_MAX_WAIT;
            if long || due || left <= SHARED_CHUNK_ROWS {
                // Waiting ones by how long they waited, the rest by size.
                let rank = if due { 0 } else { left };
                order.push((!due, rank, a.admission, i));
            }
        }
        order.sort_unstable();
        for (_, _, _, i) in order {
            if *budget == 0 || !Self::takes_more_prefill(plan) {
                break;
            }
            let n = self.remaining(&self.running[i]).min(*budget).min(self.prefill_cap(plan, true));
            if n == 0 {
                break;
            }
            plan.push((i, n));
            *budget -= n;
        }
    }

    /// The most rows a prefill may add to `plan`: any number if it is the
    /// step's only work (nothing planned, no other request running; `running`
    /// says whether it is itself one of the running ones), else what is left
    /// of [`SHARED_CHUNK_ROWS`] prefill rows.
    pub(super) fn prefill_cap(&self, plan: &[(usize, usize)], running: bool) -> usize {
        let others = self.running.len() - usize::from(running);
        if plan.is_empty() && others == 0 {
            return usize::MAX;
        }
        let rows: usize = plan.iter().map(|&(_, n)| n).filter(|&n| n > 1).sum();
        SHARED_CHUNK_ROWS.saturating_sub(rows)
    }

    /// Whether `plan` leaves room for another prefill (see
    /// [`PREFILL_STEP_ROWS`]); decode rows do not count.
    pub(super) fn takes_more_prefill(plan: &[(usize, usize)]) -> bool {
        plan.iter().map(|&(_, n)| n).filter(|&n| n > 1).sum::<usize>() < PREFILL_STEP_ROWS
    }

    /// Blocks the planned appends need now.
    fn plan_cost(&self, plan: &[(usize, usize)]) -> usize {
        plan.iter().filter_map(|&(i, n)| self.cache.append_cost(self.running[i].seq?, n).ok()).sum()
    }

    /// Tells a hybrid model which windows every sequence the cache holds
    /// reads from next, so that no page they hold is reclaimed: before each
    /// step, and before imports from the tiers (a sequence admitted since
    /// the last step holds a window that step never saw).
    pub(super) fn protect_windows(&mut self) {
        if self.model.tracks_windows() {
            let ids = self.cache.sequence_ids();
            self.model.keep_windows(&windows(&self.cache, &ids));
        }
    }

    /// Blocks a step can still have: free or evictable ones, and on a
    /// hybrid model no more than the sliding-window pages no live window
    /// holds (every new block gets a page; [`Model::window_pages`]).
    pub(super) fn available_blocks(&self) -> usize {
        let blocks = self.cache.stats().available_blocks();
        self.free_pages().map_or(blocks, |pages| blocks.min(pages))
    }

    /// Sliding-window pages no live window holds (hybrid models): free, or
    /// reclaimable by the step's new blocks.
    pub(super) fn free_pages(&self) -> Option<usize> {
        let (held, total) = self.pages_held(&self.cache.sequence_ids())?;
        Some(total.saturating_sub(held))
    }

    /// Sliding-window pages (hybrid models) the windows of sequences `seqs`
    /// hold, each counted once, and the pages in all; `None` for other
    /// models.
    pub(super) fn pages_held(&self, seqs: &[SeqId]) -> Option<(usize, usize)> {
        if !self.model.tracks_windows() {
            return None;
        }
        self.model.window_pages(&windows(&self.cache, seqs))
    }

    /// The longest chunk of `seq`'s next tokens, shorter than `n`, whose
    /// new blocks and `others` fit in `room`; 0 if not even one token does.
    /// A hybrid model's pages are held for a step's every new block but
    /// kept only for the last window, so a chunk too long for the free pages
    /// goes through as several shorter ones (the same bits: chunking never
    /// changes a row's result).
    pub(super) fn longest_chunk(&self, seq: SeqId, n: usize, others: usize, room: usize) -> usize {
        let fits = |m: usize| self.cache.append_cost(seq, m).is_ok_and(|c| c.saturating_add(others) <= room);
        // Costs grow with m: the longest m in 1..n that fits.
        let (mut lo, mut hi) = (0, n);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// The shortest prefill chunk worth cutting to before an idle agent is
    /// released for pages: one window's tokens (a chunk as long holds as
    /// many pages as the agent's window frees). Shorter cuts come only when
    /// no agent can be released, rather than preempting.
    pub(super) fn least_chunk(&self) -> usize {
        self.model.window_blocks().unwrap_or(1) * self.cache.spec().block_size()
    }

    /// Cuts a planned prefill chunk (the last one that can be cut) to the
    /// longest that fits `room` with the rest of `plan`, if that is at
    /// least `least` tokens; true if one was cut.
    fn shrink_chunk(&self, plan: &mut [(usize, usize)], room: usize, least: usize) -> bool {
        for k in (0..plan.len()).rev() {
            let (i, n) = plan[k];
            let Some(seq) = self.running[i].seq.filter(|_| n > 1) else { continue };
            let others = self.plan_cost(&plan[..k]) + self.plan_cost(&plan[k + 1..]);
            let m = self.longest_chunk(seq, n, others, room);
            if m >= least.max(1) {
                plan[k] = (i, m);
                return true;
            }
        }
        false
    }

    /// Frees blocks (and sliding-window pages) until the plan fits the pool
    /// and every tenant's quota: idle agents first, then preemption. False
    /// if nothing can run.
    fn make_room(&mut self, plan: &mut Vec<(usize, usize)>) -> bool {
        loop {
            if let Some((owner, quota)) = self.over_quota(plan) {
                if self.make_quota_room(&owner, quota, plan) {
                    continue;
                }
                return false;
            }
            let need = self.plan_cost(plan);
            let available = self.available_blocks();
            if need <= available {
                return !plan.is_empty();
            }
            // Short of pages but not of blocks: a prefill chunk holds pages
            // only while it is written, so a shorter one goes first; down to
            // a window's length before an idle agent is released (each
            // release frees about as much), down to one token before a
            // request is preempted (which loses its window).
            let pages_short = need <= self.cache.stats().available_blocks();
            if pages_short && self.shrink_chunk(plan, available, self.least_chunk()) {
                continue;
            }
            if let Some(key) = self.agents.release_candidate(None, None) {
                self.release_for_room(&key);
                continue;
            }
            if pages_short && self.shrink_chunk(plan, available, 1) {
                continue;
            }
            let Some(victim) = self.victim(None) else { return false };
            if self.running.len() == 1 {
                let a = self.take_running(victim, plan);
                let err = Error::CacheFull { needed: need, available };
                self.end(a, End::Failed(err));
                return false;
            }
            self.preempt(victim, plan);
        }
    }

    /// One move toward fitting `owner`'s planned work in its quota: release
    /// one of its idle agents, else preempt its lowest-priority, newest
    /// request, else (its only request cannot fit) fail that request. Each
    /// move takes something away, so repeating it ends; false if there was
    /// nothing to take (the owner runs nothing).
    fn make_quota_room(&mut self, owner: &OwnerId, quota: u32, plan: &mut Vec<(usize, usize)>) -> bool {
        let tenant = self.running.iter().find(|a| &a.owner == owner).map(|a| a.req.req.tenant.clone());
        if let Some(key) = tenant.and_then(|t| self.agents.release_candidate(Some(&t), None)) {
            self.release_for_room(&key);
            return true;
        }
        let own = self.running.iter().filter(|a| &a.owner == owner).count();
        let Some(victim) = self.victim(Some(owner)) else { return false };
        if own > 1 {
            self.preempt(victim, plan);
        } else {
            let a = self.take_running(victim, plan);
            let err = Error::QuotaExceeded { tenant: owner.to_string(), quota };
            self.end(a, End::Failed(err));
        }
        true
    }

    /// The running request to preempt: lowest priority, then most recently
    /// admitted; only the tenant's own when `owner` is given.
    fn victim(&self, owner: Option<&OwnerId>) -> Option<usize> {
        (0..self.running.len())
            .filter(|&i| owner.is_none_or(|o| &self.running[i].owner == o))
            .min_by_key(|&i| (self.running[i].req.req.priority, Reverse(self.running[i].admission)))
    }

    /// Takes running request `i` out, keeping `plan`'s indices right.
    fn take_running(&mut self, i: usize, plan: &mut Vec<(usize, usize)>) -> Active {
        let last = self.running.len() - 1;
        let mut a = self.running.swap_remove(i);
        // Its drafts were for this step only.
        a.draft.clear();
        plan.retain(|&(j, _)| j != i);
        for entry in plan.iter_mut() {
            if entry.0 == last {
                entry.0 = i;
            }
        }
        a
    }

    /// After a step: the blocks the planned requests computed are in the
    /// pool, so those who wait for them may go.
    fn published(&mut self, plan: &[(usize, usize)]) {
        let bs = self.cache.spec().block_size();
        for &(i, _) in plan {
            let a = &self.running[i];
            if let (Some(p), Some(len)) = (a.producing, a.seq.and_then(|s| self.cache.seq_len(s).ok())) {
                self.tiers.pending.published_below(p, len / bs);
            }
        }
    }

    /// Its pending blocks are no longer coming from it: waiters compute or
    /// adopt them themselves.
    fn stop_producing(&mut self, a: &mut Active) {
        if let Some(p) = a.producing.take() {
            self.tiers.pending.resolve(p);
        }
    }

    fn preempt(&mut self, victim: usize, plan: &mut Vec<(usize, usize)>) {
        let mut a = self.take_running(victim, plan);
        self.stop_producing(&mut a);
        if let Some(seq) = a.seq.take() {
            let _ = self.cache.remove(seq);
        }
        self.stats.preemptions += 1;
        tracing::debug!(request = a.id.0, "preempted for lack of blocks");
        self.waiting.insert(a.key(), a);
    }

    /// The cache refused a step that `make_room` let through (never
    /// expected): free something the same way and try again next step.
    fn on_refused(&mut self, plan: &[(usize, usize)], e: &kv::Error) {
        tracing::warn!(error = %e, "the cache refused a planned step");
        let mut plan = plan.to_vec();
        match e {
            kv::Error::QuotaExceeded { owner, quota, .. } => {
                self.make_quota_room(owner, *quota, &mut plan);
            }
            _ => {
                if let Some(key) = self.agents.release_candidate(None, None) {
                    self.release_for_room(&key);
                } else if let Some(v) = self.victim(None) {
                    self.preempt(v, &mut plan);
                }
            }
        }
    }

    fn fail_planned(&mut self, plan: &[(usize, usize)], err: &Error) {
        let mut idx: Vec<usize> = plan.iter().map(|p| p.0).collect();
        idx.sort_unstable_by_key(|&i| Reverse(i));
        for i in idx {
            let a = self.running.swap_remove(i);
            self.end(a, End::Failed(err.clone()));
        }
    }

    fn after_step(&mut self, plan: &[(usize, usize)], rows: &[usize], drafts: &[Vec<u32>], logits: Vec<Vec<f32>>) {
        let now = Instant::now();
        let mut ended = Vec::new();
        let mut generated = 0;
        let mut logits = logits.into_iter();
        for ((&(i, _), &k), draft) in plan.iter().zip(rows).zip(drafts) {
            let entry: Vec<Vec<f32>> = logits.by_ref().take(k).collect();
            if entry.is_empty() {
                continue;
            }
            let a = &mut self.running[i];
            let Some(done) = a.seq.and_then(|s| self.cache.seq_len(s).ok()) else { continue };
            if let Some(lps) = a.prompt_logprobs.as_mut() {
                // Row `r` of the chunk is position `done - k + r`, and
                // predicts the prompt token after it.
                let top = a.req.req.prompt_logprobs.unwrap_or(0);
                for (r, l) in entry.iter().enumerate() {
                    let next = done - k + r + 1;
                    // Once per position (a recomputed chunk adds nothing).
                    if next == lps.len() && next < a.req.prompt.len() {
                        lps.push(Some(crate::sampling::logprobs_of(l, a.req.prompt[next], top)));
                    }
                }
            }
            if done < a.tokens.len() {
                continue; // a prefill chunk short of the end
            }
            if let Some(lps) = a.prompt_logprobs.take() {
                if a.events.send(Event::Prompt { logprobs: lps }).is_err() {
                    ended.push((i, End::Finished(FinishReason::Cancelled, String::new())));
                    continue;
                }
            }
            if a.req.max_tokens == 0 {
                ended.push((i, End::Finished(FinishReason::Length, String::new())));
                continue;
            }
            // Without drafts the last row gives the next token. With them,
            // row `r` is valid while the tokens before it were the drafts:
            // each row's token is taken until one differs from its draft
            // (or the request ends), exactly what plain decoding produces.
            let from = if draft.is_empty() { entry.len() - 1 } else { 0 };
            for (r, row) in entry[from..].iter().enumerate() {
                match self.take_token(i, row, now, &mut generated) {
                    Taken::Next(token) if draft.get(r) == Some(&token) => {}
                    Taken::Next(_) => break,
                    Taken::Last(how) => {
                        ended.push((i, how));
                        break;
                    }
                }
            }
            if !draft.is_empty() {
                self.settle_drafts(i, draft.len());
            }
        }
        self.stats.generated_tokens += generated;
        self.rate.add(now, generated);
        ended.sort_unstable_by_key(|e| Reverse(e.0));
        for (i, how) in ended {
            let a = self.running.swap_remove(i);
            self.end(a, how);
        }
    }

    /// Samples request `i`'s next token from `row` and hands it on: to its
    /// tokens, its grammar, its stream. `Last` when the request ends with
    /// it (or without it: a sampling or grammar failure).
    fn take_token(&mut self, i: usize, row: &[f32], now: Instant, generated: &mut u64) -> Taken {
        let a = &mut self.running[i];
        let (prompt, answer) = (&a.req.prompt, &a.tokens[a.req.prompt.len()..]);
        let sampled = match a.constraint.as_mut() {
            None => Ok(a.sampler.sample(row, prompt, answer)),
            Some(c) => a.sampler.sample_masked(row, prompt, answer, |l| c.apply(l, &a.req.stop_ids)),
        };
        let (token, logprobs) = match sampled {
            Ok(t) => t,
            Err(e) => return Taken::Last(End::Failed(e)),
        };
        a.sampler.accept(token);
        a.tokens.push(token);
        a.usage.completion_tokens += 1;
        *generated += 1;
        match a.last_token {
            None => self.stats.ttft.observe(now - a.started),
            Some(t) => self.stats.inter_token.observe(now - t),
        }
        a.last_token = Some(now);
        // With a grammar, a stop id ends only where the grammar may end.
        let is_end = match &a.constraint {
            Some(c) => c.is_end(token, &a.req.stop_ids),
            None => a.req.stop_ids.contains(&token),
        };
        if is_end {
            return Taken::Last(End::Finished(FinishReason::Stop, a.text.flush()));
        }
        let grammar_done = match a.constraint.as_mut().map(|c| c.accept(token)) {
            Some(Ok(step)) => step == Accepted::Complete,
            Some(Err(e)) => return Taken::Last(End::Failed(e)),
            None => false,
        };
        let released = match a.text.push(self.codec.as_ref(), token) {
            Ok(r) => r,
            Err(e) => return Taken::Last(End::Failed(Error::Model(e.to_string()))),
        };
        let stopped = released.stopped;
        if a.events.send(Event::Token { id: token, text: released.text, logprobs }).is_err() {
            Taken::Last(End::Finished(FinishReason::Cancelled, String::new()))
        } else if stopped {
            Taken::Last(End::Finished(FinishReason::Stop, String::new()))
        } else if grammar_done {
            Taken::Last(End::Finished(FinishReason::Stop, a.text.flush()))
        } else if a.usage.completion_tokens >= a.req.max_tokens {
            Taken::Last(End::Finished(FinishReason::Length, a.text.flush()))
        } else {
            Taken::Next(token)
        }
    }

    /// Drafts tokens for the plan's decodes where they pay
    /// (`speculative.rs`): requests that did not opt out, on a model without
    /// sliding windows, with the pool's room for them and no quota to meet;
    /// how many each carries is [`speculative::choose`]'s call, from the
    /// measured step costs and each sequence's acceptance. Each drafted
    /// token takes a budget row.
    fn plan_drafts(&mut self, plan: &mut [(usize, usize)], budget: &mut usize) {
        if self.config.speculative == Speculation::Off || self.model.window_blocks().is_some() {
            return;
        }
        let decodes: Vec<usize> = plan
            .iter()
            .enumerate()
            .filter(|(_, &(i, n))| n == 1 && self.remaining(&self.running[i]) == 1)
            .map(|(j, _)| j)
            .collect();
        if decodes.is_empty() || decodes.len() > speculative::MAX_BATCH {
            return;
        }
        let rows: usize = plan.iter().map(|&(_, n)| n).sum();
        let count = decodes.len();
        // Not even the likeliest single token could pay: no proposals.
        let likeliest = decodes.iter().map(|&j| self.running[plan[j].0].drafting.likeliest()).fold(0.0_f32, f32::max);
        let curve = self.step_costs.curve();
        if speculative::choose(&curve, rows, count, &[(likeliest, 1)]) == [0] {
            for j in decodes {
                self.running[plan[j].0].drafting.skipped();
            }
            return;
        }
        // Each decode's proposal: the sequence's own repeats, the tenant's
        // recent answers, a grammar's forced bytes (module doc); a draft the
        // grammar forbids is simply rejected.
        let mut offers: Vec<(usize, Vec<u32>, Source)> = Vec::with_capacity(decodes.len());
        for j in decodes {
            let a = &mut self.running[plan[j].0];
            let eligible = a.req.req.speculative && a.prompt_logprobs.is_none() && a.seq.is_some();
            // The first row's token is the model's own: drafts past the
            // request's last token would be wasted.
            let k = speculative::MAX_DRAFT.min(a.req.max_tokens.saturating_sub(a.usage.completion_tokens + 1));
            if !eligible || k == 0 || self.cache.owner_usage(&a.owner).quota.is_some() {
                continue;
            }
            let mut offer = (speculative::propose(&a.tokens, k), Source::Lookup);
            if offer.0.is_empty() {
                offer = (self.suffixes.propose(&a.req.req.tenant, &a.tokens, k), Source::Suffix);
            }
            if offer.0.is_empty() {
                let forced = a.constraint.as_mut().map(|c| c.forced(k, self.codec.as_ref()));
                offer = (forced.unwrap_or_default(), Source::Forced);
            }
            if !offer.0.is_empty() {
                offers.push((j, offer.0, offer.1));
            }
        }
        let rates: Vec<(f32, usize)> =
            offers.iter().map(|(j, d, src)| (self.running[plan[*j].0].drafting.rate(*src), d.len())).collect();
        let keep = speculative::choose(&curve, rows, count, &rates);
        let mut spare = self.cache.stats().available_blocks().saturating_sub(self.plan_cost(plan));
        for ((j, mut draft, source), k) in offers.into_iter().zip(keep) {
            let i = plan[j].0;
            draft.truncate(k.min(*budget));
            let Some(seq) = self.running[i].seq else { continue };
            let cost = |n| self.cache.append_cost(seq, n).unwrap_or(usize::MAX);
            let extra = cost(1 + draft.len()).saturating_sub(cost(1));
            if draft.is_empty() || extra > spare {
                self.running[i].drafting.skipped();
                continue;
            }
            spare -= extra;
            *budget -= draft.len();
            plan[j].1 = 1 + draft.len();
            let a = &mut self.running[i];
            a.draft = draft;
            a.draft_source = source;
        }
    }

    /// After a step that verified `drafted` drafts of request `i`: its
    /// sequence keeps the K/V of every token it took but the newest (as
    /// after any decode), the rejected drafts' K/V is cut before anything
    /// publishes it, and the acceptance is counted.
    fn settle_drafts(&mut self, i: usize, drafted: usize) {
        let a = &mut self.running[i];
        let Some(seq) = a.seq else { return };
        let Ok(len) = self.cache.seq_len(seq) else { return };
        // The step appended the last token and the drafts.
        let start = len - 1 - drafted;
        let keep = (a.tokens.len() - 1).min(len);
        let accepted = keep.saturating_sub(start + 1);
        let _ = self.cache.truncate(seq, keep);
        let _ = self.cache.mark_computed(seq, keep);
        a.usage.drafted_tokens += drafted;
        a.usage.accepted_tokens += accepted;
        a.drafting.record(a.draft_source, drafted, accepted);
        self.stats.drafted_tokens += drafted as u64;
        self.stats.draft_verifications += 1;
        self.stats.accepted_tokens += accepted as u64;
    }

    /// The one exit: report, then give the sequence to the agent or free it.
    fn end(&mut self, mut a: Active, how: End) {
        if matches!(how, End::Finished(FinishReason::Stop | FinishReason::Length, _))
            && self.config.speculative != Speculation::Off
        {
            let answer = a.tokens.get(a.req.prompt.len()..).unwrap_or_default();
            self.suffixes.add(&a.req.req.tenant, answer);
        }
        self.abandon_load(a.id);
        self.stop_producing(&mut a);
        let agent = a.agent.as_ref().and_then(|k| self.agents.get_mut(k)).filter(|ag| ag.busy == Some(a.id));
        let keep = matches!(how, End::Finished(FinishReason::Stop | FinishReason::Length, _));
        match (agent, a.seq) {
            (Some(ag), Some(seq)) if keep => {
                let old = ag.seq.replace(seq);
                ag.tokens = self.cache.tokens(seq).map(<[u32]>::to_vec).unwrap_or_default();
                ag.chain = self.cache.block_hashes(seq).map(<[_]>::to_vec).unwrap_or_default();
                ag.turns += 1;
                ag.last_used = Instant::now();
                ag.last_used_wall = std::time::SystemTime::now();
                ag.busy = None;
                if let Some(old) = old {
                    let _ = self.cache.remove(old);
                }
                if let Some(key) = &a.agent {
                    self.commit_agent(key, Instant::now());
                }
            }
            (agent, seq) => {
                if let Some(ag) = agent {
                    ag.busy = None;
                }
                if let Some(seq) = seq {
                    let _ = self.cache.remove(seq);
                }
            }
        }
        self.drop_if_unborn(a.agent.as_ref());
        if let Some(key) = &a.agent {
            self.unpin_past_share(key);
        }
        let f = &mut self.stats.finished;
        let event = match how {
            End::Finished(reason, text) => {
                match reason {
                    FinishReason::Stop => f.stop += 1,
                    FinishReason::Length => f.length += 1,
                    FinishReason::Cancelled => f.cancelled += 1,
                }
                Event::Finished { reason, text, usage: a.usage }
            }
            End::Failed(err) => {
                match err {
                    Error::Timeout(_) => f.timeout += 1,
                    _ => f.error += 1,
                }
                Event::Error(err)
            }
        };
        let _ = a.events.send(event);
    }

    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        self.cache.check_invariants().map_err(|e| e.to_string())
    }

    /// The current numbers, with the cache's, as one value.
    pub(crate) fn snapshot(&mut self, now: Instant) -> EngineStats {
        let mut s = self.stats.clone();
        s.waiting = self.waiting.len();
        s.running = self.running.len();
        s.cache = self.cache.stats();
        s.agents = self.agents.len();
        s.tokens_per_second = self.rate.rate(now);
        s.tiers = self.tier_stats();
        s.sliding_pages = self.model.pages();
        s
    }
}

/// The windows sequences `ids` read from next (block table, computed
/// tokens), for a hybrid model's page bookkeeping.
fn windows<'c>(cache: &'c KvCache, ids: &[SeqId]) -> Vec<(&'c kv::BlockTable, usize)> {
    ids.iter().filter_map(|&id| Some((cache.block_table(id).ok()?, cache.computed(id).ok()?))).collect()
}
