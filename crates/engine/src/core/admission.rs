//! Admission: taking waiting requests into the batch, reusing every cached
//! block they can. Same state machine as `core.rs` (one thread owns it);
//! split out because several features meet here.
//!
//! For each waiting request, in priority then arrival order, while the step
//! has budget, sequence slots and room for prefill rows (`core.rs`):
//!
//! 1. **Skip** it if its agent is mid-turn, or if it waits for blocks a
//!    producer is bringing into the pool (`tiering.rs`, pending blocks).
//!    Otherwise an agent's turn is matched against the agent's history now
//!    (`agents::splice`: its own token ids where the text is what it sent),
//!    since the previous turn may have ended after this one arrived.
//! 2. **Reuse the pool**: the agent's held conversation (fork and truncate
//!    to the common prefix, partial blocks included) or the prefix index
//!    (whole blocks), whichever covers more.
//! 3. **Reuse the tiers** (`tier_ops.rs`), continuing the block chain where
//!    the pool stopped: blocks in RAM are imported at once; a block another
//!    producer is bringing in makes the request wait for it; blocks on disk
//!    are loaded while the engine keeps stepping (the request waits in
//!    `loading`), if loading is estimated to beat recomputing.
//! 4. **Fit**: the first prefill chunk must fit the pool next to the step's
//!    other work (else the request goes back to the head of the queue and
//!    later ones wait: a large request is not starved) and its tenant's
//!    quota (else it is skipped while the tenant's running requests give
//!    blocks back, or fails if it cannot fit even alone).
//!
//! At least the last prompt token is always computed, for its logits.

use kv::{Namespace, OwnerId, PrefixHashes, SeqId};

use super::{Active, End, EngineCore, TierHits, TierReuse};
use crate::error::{Error, Result};
use crate::tiering::ProducerId;

/// What admitting a request came to.
pub(super) enum Admission {
    /// Running, with its first chunk of this many tokens.
    Admitted(Active, usize),
    /// Its sequence holds blocks being loaded from a tier; it runs when
    /// they are in.
    Loading(Active),
    /// It waits for blocks a producer is bringing into the pool.
    Blocked(Active, (ProducerId, kv::BlockHash)),
    /// The pool cannot take its first chunk next to the step's other work.
    Short { request: Active, needed: usize, available: usize },
    /// Its tenant's quota cannot take its first chunk next to the tenant's
    /// other work in this step.
    OverQuota { request: Active, quota: u32 },
    /// The cache refused for a reason waiting cannot fix.
    Failed(Active, Error),
}

impl EngineCore {
    /// Sequences admitted: running, and waiting for a load.
    pub(super) fn admitted_count(&self) -> usize {
        self.running.len() + self.loading.len()
    }

    /// The waiting request to consider next: the highest priority; within
    /// it, the one whose tenant has the fewest admitted requests per unit
    /// of weight (fair shares of the running slots), then the oldest.
    fn next_waiting(&self) -> Option<(std::cmp::Reverse<i32>, u64)> {
        let first = *self.waiting.keys().next()?;
        let mut load: std::collections::HashMap<&crate::request::TenantId, usize> = std::collections::HashMap::new();
        for a in self.running.iter().chain(&self.loading) {
            *load.entry(&a.req.req.tenant).or_default() += 1;
        }
        let share = |a: &Active| {
            let t = &a.req.req.tenant;
            let w = self.config.tenant_weights.get(t).copied().unwrap_or(1).max(1) as usize;
            // Compared as fractions load/weight without dividing.
            (load.get(t).copied().unwrap_or(0), w)
        };
        self.waiting
            .range(first..)
            .take_while(|(k, _)| k.0 == first.0)
            .min_by(|(ka, a), (kb, b)| {
                let ((la, wa), (lb, wb)) = (share(a), share(b));
                (la * wb).cmp(&(lb * wa)).then(ka.1.cmp(&kb.1))
            })
            .map(|(k, _)| *k)
    }

    pub(super) fn admit(&mut self, plan: &mut Vec<(usize, usize)>, budget: &mut usize) {
        let mut skipped = Vec::new();
        while *budget > 0 && self.admitted_count() < self.config.max_running && Self::takes_more_prefill(plan) {
            let Some(key) = self.next_waiting() else { break };
            let Some(mut a) = self.waiting.remove(&key) else { break };
            let busy =
                a.agent.as_ref().and_then(|k| self.agents.get(k)).and_then(|ag| ag.busy).is_some_and(|r| r != a.id);
            if a.waits_for.is_some_and(|(p, h)| !self.tiers.pending.still_pending(p, &h)) {
                a.waits_for = None;
            }
            if busy || a.waits_for.is_some() {
                skipped.push((key, a));
                continue;
            }
            self.continue_agent_turn(&mut a);
            match self.try_admit(a, *budget, plan) {
                Admission::Admitted(a, n) => {
                    tracing::trace!(request = a.id.0, cached = a.usage.cached_tokens, first_chunk = n, "admitted");
                    a.events.admitted();
                    *budget -= n;
                    self.running.push(a);
                    plan.push((self.running.len() - 1, n));
                }
                Admission::Loading(a) => {
                    // Admitted (the stream's headers go out) once loaded.
                    self.loading.push(a);
                }
                Admission::Blocked(mut a, waits_for) => {
                    tracing::trace!(request = a.id.0, producer = ?waits_for.0, block = %waits_for.1, "waits for a block on its way");
                    a.waits_for = Some(waits_for);
                    skipped.push((key, a));
                }
                Admission::Short { request, needed, available } => {
                    if let Some(agent) = self.agents.release_candidate(None, request.agent.as_ref()) {
                        self.release_for_room(&agent);
                        self.waiting.insert(key, request);
                    } else if self.admitted_count() == 0 {
                        // Nothing will ever free more: pinned agents hold it.
                        self.end(request, End::Failed(Error::CacheFull { needed, available }));
                    } else {
                        // The pool is shared: later requests wait behind
                        // this one, so a large request is not starved.
                        self.waiting.insert(key, request);
                        break;
                    }
                }
                Admission::OverQuota { request, quota } => {
                    let tenant = &request.req.req.tenant;
                    if let Some(agent) = self.agents.release_candidate(Some(tenant), request.agent.as_ref()) {
                        self.release_for_room(&agent);
                        self.waiting.insert(key, request);
                    } else if self.running.iter().chain(&self.loading).any(|r| r.owner == request.owner) {
                        // The tenant's running requests will give their
                        // blocks back; other tenants go ahead meanwhile.
                        skipped.push((key, request));
                    } else {
                        let err = Error::QuotaExceeded { tenant: tenant.to_string(), quota };
                        self.end(request, End::Failed(err));
                    }
                }
                Admission::Failed(a, err) => self.end(a, End::Failed(err)),
            }
        }
        self.waiting.extend(skipped);
    }

    /// Creates the request's sequence, reusing cached K/V from the pool and
    /// the tiers; gives the request back if the pool or its tenant's quota
    /// cannot take its first chunk next to `plan`.
    fn try_admit(&mut self, mut a: Active, budget: usize, plan: &[(usize, usize)]) -> Admission {
        let ns = self.namespace(&a.req.req.tenant);
        let limit = a.tokens.len() - 1;
        let hashes = PrefixHashes::compute(ns, &a.tokens[..limit], self.cache.spec().block_size());
        let (seq, mut reused) = match self.reuse_pool(&a, ns, limit, &hashes) {
            Ok(x) => x,
            Err(e) => return Admission::Failed(a, e),
        };
        a.tier_hits = TierHits { pool: reused.min(a.req.prompt.len()), ..TierHits::default() };
        if self.reuses_cache(&a) && self.tiers.enabled() {
            match self.extend_from_tiers(&mut a, seq, &hashes, plan) {
                TierReuse::Extended(n) => reused += n,
                TierReuse::Blocked(waits_for) => {
                    let _ = self.cache.remove(seq);
                    return Admission::Blocked(a, waits_for);
                }
                TierReuse::Loading => {
                    a.seq = Some(seq);
                    a.admission = self.next_counter();
                    if let Some(key) = &a.agent {
                        self.agents.entry(key.clone()).busy = Some(a.id);
                    }
                    return Admission::Loading(a);
                }
            }
        }
        // A hybrid model may have dropped the sliding-window K/V the cut
        // needs: continue from where it still has it. Checked here, after
        // the tiers, not in the pool's lookup: a pool chain whose window
        // pages are gone is still the full layers' prefix, and blocks the
        // tiers add past it come back with their window. (Cutting before
        // the tiers halved Gemma-3 agents' cache hits, measured.)
        let usable = self.cut_to_usable(seq, reused);
        if usable < reused {
            a.tier_hits.pool = a.tier_hits.pool.min(usable);
            reused = usable;
        }
        // In-flight prefix sharing: the next block is being computed by a
        // running request (or loaded): wait for it rather than compute it
        // twice.
        let bs = self.cache.spec().block_size();
        if self.reuses_cache(&a) && reused % bs == 0 {
            if let Some(&h) = hashes.hashes().get(reused / bs) {
                if let Some(p) = self.tiers.pending.producer_of(&h) {
                    let _ = self.cache.remove(seq);
                    return Admission::Blocked(a, (p, h));
                }
            }
        }
        // A long prompt's first chunk is a shared one unless nothing else
        // runs in this step (`core.rs`, SHARED_CHUNK_ROWS).
        let mut n = (a.tokens.len() - reused).min(budget).min(self.prefill_cap(plan, false).max(1));
        let planned = self.plan_cost(plan);
        let mut cost = self.cache.append_cost(seq, n).unwrap_or(usize::MAX);
        let needed = planned.saturating_add(cost);
        let blocks = self.cache.stats().available_blocks();
        if needed > blocks {
            let _ = self.cache.remove(seq);
            return Admission::Short { request: a, needed, available: blocks };
        }
        // A hybrid model's pages are only needed while a chunk is written:
        // short of them, a shorter first chunk, as in `make_room` (down to a
        // window's length while an idle agent could be released instead).
        if let Some(pages) = self.free_pages().filter(|&p| needed > p) {
            let m = self.longest_chunk(seq, n, planned, pages);
            let releasable = self.agents.release_candidate(None, a.agent.as_ref()).is_some();
            let least = if releasable { self.least_chunk() } else { 1 };
            if m < least {
                let _ = self.cache.remove(seq);
                return Admission::Short { request: a, needed, available: pages };
            }
            n = m;
            cost = self.cache.append_cost(seq, n).unwrap_or(usize::MAX);
        }
        let quota = self.quota_need(&a.owner, plan, cost);
        if let Some((quota, _)) = quota.filter(|&(q, need)| need > q as usize) {
            let _ = self.cache.remove(seq);
            return Admission::OverQuota { request: a, quota };
        }
        a.seq = Some(seq);
        a.admission = self.next_counter();
        self.count_admission(&mut a, reused);
        // What it will compute of its prompt, others may wait for.
        if self.config.prefix_cache {
            let first = reused / bs;
            if let Some(rest) = hashes.hashes().get(first..).filter(|r| !r.is_empty()) {
                let id = self.tiers.next_producer();
                self.tiers.pending.register(id, first, rest);
                a.producing = Some(id);
            }
        }
        if let Some(key) = &a.agent {
            self.agents.entry(key.clone()).busy = Some(a.id);
        }
        Admission::Admitted(a, n)
    }

    /// Whether `a` may start from cached K/V: not when it asked for its
    /// prompt's log-probabilities, which need every prompt row computed.
    fn reuses_cache(&self, a: &Active) -> bool {
        self.config.prefix_cache && a.prompt_logprobs.is_none()
    }

    /// Counts a request's first admission: its prompt tokens, how many came
    /// from cache (`reused`), and from which tier.
    pub(super) fn count_admission(&mut self, a: &mut Active, reused: usize) {
        a.ticket = None;
        if a.admitted {
            return;
        }
        a.admitted = true;
        a.usage.cached_tokens = reused.min(a.req.prompt.len());
        self.stats.prompt_tokens += a.req.prompt.len() as u64;
        self.stats.cached_prompt_tokens += a.usage.cached_tokens as u64;
        let c = &mut self.tiers.counters;
        c.hit_tokens_pool += a.tier_hits.pool as u64;
        for (moves, hits) in c.tiers.iter_mut().zip(&a.tier_hits.tiers) {
            moves.hit_tokens += *hits as u64;
        }
    }

    /// A sequence for `a` holding the longest cached prefix the pool has:
    /// the agent's own conversation (fork and cut) or the prefix index,
    /// whichever covers more. Returns it and the tokens it covers.
    fn reuse_pool(&mut self, a: &Active, ns: Namespace, limit: usize, hashes: &PrefixHashes) -> Result<(SeqId, usize)> {
        if !self.reuses_cache(a) {
            return Ok((self.cache.create_sequence(&a.owner, ns), 0));
        }
        let prompt = &a.tokens[..limit];
        let held = a.agent.as_ref().and_then(|k| self.agents.get(k)).and_then(|ag| {
            let common = ag.tokens.iter().zip(&a.tokens).take_while(|(x, y)| x == y).count();
            ag.seq.map(|s| (s, common.min(limit)))
        });
        let indexed = self.cache.lookup_prefix_hashes(prompt, hashes);
        let forked = match held {
            Some((agent_seq, common)) if common > 0 && common >= indexed => self
                .fork_to(agent_seq, common)
                // E.g. a sliding window already released the blocks the
                // cut needs: start from the prefix index instead.
                .inspect_err(|e| tracing::debug!(error = %e, "cannot reuse the agent's sequence"))
                .ok(),
            _ => None,
        };
        match forked.map(Ok).unwrap_or_else(|| self.cache.create_with_prefix_hashes(&a.owner, prompt, hashes)) {
            Ok(x) => Ok(x),
            // Adopting the cached prefix alone is over quota: start empty,
            // and let the quota check decide.
            Err(kv::Error::QuotaExceeded { .. }) => Ok((self.cache.create_sequence(&a.owner, ns), 0)),
            Err(e) => {
                tracing::error!(error = %e, "admission failed");
                Err(Error::Model(format!("cache refused the request: {e}")))
            }
        }
    }

    /// The owner's quota and the blocks it would hold after its share of
    /// `plan` and `extra` more new blocks ([`EngineCore::charge`]: sliding-
    /// window pages included); `None` without a quota. Counts every planned
    /// block as new to the owner (a copy-on-write of a block it alone held
    /// costs it nothing), so a plan that passes never meets a quota refusal.
    /// On a hybrid model each new block may bring a page, but after the step
    /// a sequence's window holds at most [`model::Model::window_blocks`]
    /// pages: what a tenant holds, not how long its chunks are, decides.
    pub(super) fn quota_need(&self, owner: &OwnerId, plan: &[(usize, usize)], extra: usize) -> Option<(u32, usize)> {
        let usage = self.cache.owner_usage(owner);
        let quota = usage.quota?;
        let own: Vec<(usize, usize)> = plan.iter().copied().filter(|&(i, _)| &self.running[i].owner == owner).collect();
        let new = self.plan_cost(&own).saturating_add(extra);
        let pages = match self.model.window_blocks() {
            Some(per_window) => {
                let (held, seqs) = self.owner_pages(owner);
                held.saturating_add(new).min(seqs.saturating_mul(per_window))
            }
            None => 0,
        };
        Some((quota, self.charge(usage.held_blocks as usize + new, pages)))
    }

    /// What `blocks` blocks and `pages` sliding-window pages count against
    /// a quota, in blocks: a page weighs the blocks its K/V bytes make,
    /// rounded up (a Gemma-3 page holds fifteen sliding layers, a block the
    /// three full ones: five blocks). Plain models have no pages.
    pub(super) fn charge(&self, blocks: usize, pages: usize) -> usize {
        let (block, page) = self.model.kv_bytes();
        if page == 0 || pages == 0 {
            return blocks;
        }
        let weighed = (pages as u64).saturating_mul(page).div_ceil(block.max(1));
        blocks.saturating_add(usize::try_from(weighed).unwrap_or(usize::MAX))
    }

    /// Sliding-window pages the windows of `owner`'s sequences hold (its
    /// running requests and its agents'), each counted once, and how many
    /// sequences it has; 0 pages on a plain model.
    fn owner_pages(&self, owner: &OwnerId) -> (usize, usize) {
        let ids = self.cache.sequence_ids_of(owner);
        (self.pages_held(&ids).map_or(0, |(held, _)| held), ids.len())
    }

    /// The first tenant in `plan` whose planned blocks exceed its quota.
    pub(super) fn over_quota(&self, plan: &[(usize, usize)]) -> Option<(OwnerId, u32)> {
        let mut seen: Vec<&OwnerId> = Vec::new();
        plan.iter().map(|&(i, _)| &self.running[i].owner).find_map(|owner| {
            if seen.contains(&owner) {
                return None;
            }
            seen.push(owner);
            let (quota, need) = self.quota_need(owner, plan, 0)?;
            (need > quota as usize).then(|| (owner.clone(), quota))
        })
    }

    /// A fork of `seq` cut to its first `len` tokens (nothing left behind
    /// if the cut fails).
    /// Shortens `seq` (holding `len` computed tokens) to the longest prefix
    /// the model can continue from ([`model::Model::usable_prefix`]);
    /// returns its length.
    pub(super) fn cut_to_usable(&mut self, seq: SeqId, len: usize) -> usize {
        if !self.model.tracks_windows() || len == 0 {
            return len;
        }
        let usable = match self.cache.block_table(seq) {
            Ok(table) => self.model.usable_prefix(table, len),
            Err(_) => return len,
        };
        if usable < len && self.cache.truncate(seq, usable).is_err() {
            // Cannot cut (never expected): start the sequence over.
            let _ = self.cache.truncate(seq, 0);
            return 0;
        }
        usable
    }

    fn fork_to(&mut self, seq: SeqId, len: usize) -> kv::Result<(SeqId, usize)> {
        let fork = self.cache.fork(seq)?;
        if let Err(e) = self.cache.truncate(fork, len) {
            let _ = self.cache.remove(fork);
            return Err(e);
        }
        Ok((fork, len))
    }
}
