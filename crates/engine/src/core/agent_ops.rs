//! The engine's agent operations: the API's list/inspect/delete/update,
//! the per-tenant agent limit, the pinned share, quotas, and giving an
//! agent's blocks back. Same state machine as `core.rs` (one thread owns
//! it); split out so the scheduler reads on its own.

use std::time::Instant;

use kv::OwnerId;

use super::{Active, EngineCore};
use crate::agents::{AgentInfo, AgentKey, AgentUpdate, Retention};
use crate::error::{Error, Result};
use crate::request::TenantId;

impl EngineCore {
    /// Continues an agent's conversation with its own token ids: where the
    /// prompt's text is what the agent sent (`agents::splice`), the prompt
    /// takes the agent's tokens, if it and `max_tokens` still fit. Done when
    /// the request is admitted (its agent not busy), not when it arrives: a
    /// client sends the next turn as soon as it has the last token, often
    /// before the engine has handed the finished sequence to the agent, and
    /// matched against the older history the whole last reply was prefilled
    /// again (`kvserve bench agents`: 606 of 720 tokens cached, not 704).
    /// Matching again on a later attempt is harmless (the text is the same).
    pub(super) fn continue_agent_turn(&self, a: &mut Active) {
        if a.admitted {
            return;
        }
        let Some(had) = a.agent.as_ref().and_then(|k| self.agents.get(k)).map(|ag| &ag.tokens) else { return };
        let Some(prompt) = crate::agents::splice(had, &a.req.prompt, self.codec.as_ref()) else { return };
        let Some(prompt) = self.fits(prompt, a.req.max_tokens) else { return };
        a.tokens.clone_from(&prompt);
        a.usage.prompt_tokens = prompt.len();
        a.req.prompt = prompt;
    }

    /// `prompt` if it and `max_tokens` still fit what validation allows
    /// (the context and the cache).
    fn fits(&self, prompt: Vec<u32>, max_tokens: usize) -> Option<Vec<u32>> {
        let spec = self.model.spec();
        let limit = self.model.max_positions().min(spec.num_blocks() * spec.block_size());
        (prompt.len().saturating_add(max_tokens) <= limit).then_some(prompt)
    }

    /// Gives an agent's blocks back to the pool (published ones stay
    /// cached, and go down the tiers as the pool evicts them). With a disk
    /// tier the agent keeps its history (its manifest names it, its next
    /// turn finds its blocks in the tiers); without, it forgets it.
    pub(super) fn release_agent(&mut self, key: &AgentKey) {
        let durable = self.tiers.durable();
        if let Some(ag) = self.agents.get_mut(key) {
            if !durable {
                ag.tokens = Vec::new();
                ag.chain = Vec::new();
                ag.tail = None;
            }
            if let Some(seq) = ag.seq.take() {
                let _ = self.cache.remove(seq);
            }
        }
    }

    /// Room for `key` under the tenant's agent limit: nothing to do if it
    /// exists, else forget the tenant's best candidate if at the limit.
    pub(super) fn make_agent_room(&mut self, key: &AgentKey) -> Result<()> {
        let limit = self.config.max_agents_per_tenant;
        if self.agents.get(key).is_some() || self.agents.count_of(&key.tenant) < limit {
            return Ok(());
        }
        let forget = self.agents.forget_candidate(&key.tenant);
        let Some(old) = forget else { return Err(Error::TooManyAgents { tenant: key.tenant.to_string(), limit }) };
        tracing::debug!(tenant = %key.tenant, agent = %old.id, "agent limit reached; forgetting the least recently used");
        self.forget_agent(&old);
        self.stats.agents_forgotten += 1;
        Ok(())
    }

    /// Removes an agent that never completed a turn and has nothing
    /// running or waiting (its first turn was cancelled or failed).
    pub(super) fn drop_if_unborn(&mut self, key: Option<&AgentKey>) {
        let Some(key) = key else { return };
        let unborn = self.agents.get(key).is_some_and(|ag| ag.turns == 0 && ag.busy.is_none() && ag.seq.is_none());
        if unborn && !self.waiting.values().chain(&self.running).any(|a| a.agent.as_ref() == Some(key)) {
            self.agents.remove(key);
        }
    }

    /// Releases an idle agent's blocks because memory or its tenant's quota
    /// ran short (counted in the stats).
    pub(super) fn release_for_room(&mut self, key: &AgentKey) {
        self.release_agent(key);
        self.stats.agent_releases += 1;
    }

    /// Forgets an agent everywhere (with `keep_shared`, everywhere but the
    /// tiers other replicas share): its blocks nobody else uses leave the
    /// tiers, its manifests go; `done` runs when that is durable.
    pub(super) fn forget_agent_then(&mut self, key: &AgentKey, keep_shared: bool, done: Option<tiers::Done>) {
        let chain = self.agents.get(key).map(|ag| ag.chain.clone()).unwrap_or_default();
        if let Some(ag) = self.agents.get_mut(key) {
            if let Some(seq) = ag.seq.take() {
                let _ = self.cache.remove(seq);
            }
        }
        self.discard_agent(key, &chain, keep_shared, done);
        self.agents.remove(key);
    }

    pub(super) fn forget_agent(&mut self, key: &AgentKey) {
        self.forget_agent_then(key, false, None);
    }

    pub(crate) fn agent_infos(&self, tenant: &TenantId) -> Vec<AgentInfo> {
        self.agents.keys_of(tenant).iter().filter_map(|k| self.agent_info(k)).collect()
    }

    pub(crate) fn agent_info(&self, key: &AgentKey) -> Option<AgentInfo> {
        let mut info = self.agents.info(key, self.agent_blocks(key), self.block_locations(key))?;
        info.window_pages = self.agent_pages(&[key]).map(|(held, _)| held);
        Some(info)
    }

    /// Hands an idle agent over to another replica: it is forgotten here
    /// (pool, RAM, disk) but stays in the tiers replicas share, from which
    /// its next turn resumes wherever it lands. What a router asks of the
    /// replica an agent moved away from, so that an agent lives on one
    /// replica at a time. `reply` hears back once that is durable.
    pub(crate) fn hand_over_agent(&mut self, key: &AgentKey, reply: tokio::sync::oneshot::Sender<Result<()>>) {
        let Some(ag) = self.agents.get(key) else {
            let _ = reply.send(Err(Error::UnknownAgent(key.id.to_string())));
            return;
        };
        if ag.busy.is_some() {
            let _ = reply.send(Err(Error::InvalidRequest { field: "agent", problem: "a turn is running".into() }));
            return;
        }
        if !self.tiers.list.iter().any(|t| t.shared()) {
            let _ = reply.send(Err(Error::InvalidRequest {
                field: "agent",
                problem: "no shared tier (--remote-cache) to hand it over through".into(),
            }));
            return;
        }
        let done = move |result: std::result::Result<(), String>| {
            let _ = reply.send(result.map_err(Error::Storage));
        };
        self.forget_agent_then(key, true, Some(Box::new(done)));
    }

    /// Deletes an agent; `reply` hears back once the deletion is durable
    /// (its manifest can no longer bring it back after a restart).
    pub(crate) fn delete_agent(&mut self, key: &AgentKey, reply: tokio::sync::oneshot::Sender<Result<()>>) {
        if self.agents.get(key).is_none() {
            let _ = reply.send(Err(Error::UnknownAgent(key.id.to_string())));
            return;
        }
        let done = move |result: std::result::Result<(), String>| {
            let _ = reply.send(result.map_err(|e| {
                tracing::error!(error = %e, "an agent was forgotten but its disk state could not be removed yet (retried when the disk tier resumes)");
                Error::Storage(e)
            }));
        };
        // Its turns still queued or running finish as plain requests: none
        // may bring a deleted agent back when it ends.
        for a in self.waiting.values_mut().chain(&mut self.running).chain(&mut self.loading) {
            if a.agent.as_ref() == Some(key) {
                a.agent = None;
            }
        }
        self.forget_agent_then(key, false, Some(Box::new(done)));
    }

    /// Pinned agents: `tenant`'s, or every tenant's with `None`; never
    /// `except`.
    fn pinned<'a>(&'a self, tenant: Option<&'a TenantId>, except: Option<&'a AgentKey>) -> Vec<&'a AgentKey> {
        self.agents
            .keys()
            .filter(|k| tenant.is_none_or(|t| &k.tenant == t) && Some(*k) != except)
            .filter(|k| self.agents.get(k).is_some_and(|ag| ag.retention == Retention::Pinned))
            .collect()
    }

    /// Blocks held by pinned agents (see [`Self::pinned`]; a block two of
    /// them share counts twice: a bound, cheap to keep exact enough).
    fn pinned_blocks(&self, tenant: Option<&TenantId>, except: Option<&AgentKey>) -> usize {
        self.pinned(tenant, except).into_iter().map(|k| self.agent_blocks(k)).sum()
    }

    /// Records on disk pinned agents need (a record two of them share
    /// counts twice: a bound).
    fn pinned_records(&self, tenant: Option<&TenantId>, except: Option<&AgentKey>) -> usize {
        self.pinned(tenant, except).into_iter().filter_map(|k| self.agents.get(k)).map(|ag| ag.chain.len()).sum()
    }

    fn agent_blocks(&self, key: &AgentKey) -> usize {
        self.agents
            .get(key)
            .and_then(|ag| ag.seq)
            .and_then(|s| self.cache.block_table(s).ok())
            .map_or(0, |t| t.blocks().len())
    }

    /// Records `share` of the disk budget holds.
    fn disk_pin_limit(&self, share: f64) -> Option<usize> {
        let disk = self.tiers.list.iter().find(|t| t.durable())?;
        disk.records_in(disk.snapshot().budget as f64 * share)
    }

    /// Blocks `share` of the pool holds.
    fn pin_limit(&self, share: f64) -> usize {
        (self.cache.spec().num_blocks() as f64 * share) as usize
    }

    /// Whether pinning `key` (or keeping it pinned) stays within its
    /// tenant's share and the total share, of the pool and of the disk;
    /// the first limit passed otherwise.
    fn pin_room(&self, key: &AgentKey) -> Result<()> {
        let (me, records) = (self.agent_blocks(key), self.agents.get(key).map_or(0, |a| a.chain.len()));
        let c = &self.config;
        let refuse = |what, limit, wanted| Err(Error::PinLimit { tenant: key.tenant.to_string(), what, limit, wanted });
        for (tenant, share) in [(Some(&key.tenant), c.max_pinned_share), (None, c.max_pinned_share_total)] {
            let (limit, wanted) = (self.pin_limit(share), self.pinned_blocks(tenant, Some(key)) + me);
            if wanted > limit {
                return refuse("blocks", limit, wanted);
            }
            // A hybrid model's pages are fewer than its blocks, and an
            // agent's window holds as many as its last 512 tokens make: the
            // same share of them.
            let mut pinned = self.pinned(tenant, Some(key));
            pinned.push(key);
            if let Some((wanted, total)) = self.agent_pages(&pinned) {
                let limit = (total as f64 * share) as usize;
                if wanted > limit {
                    return refuse("sliding-window pages", limit, wanted);
                }
            }
            // A pinned agent's records never leave the disk: they count
            // against the same share of the disk budget.
            if let Some(limit) = self.disk_pin_limit(share) {
                let wanted = self.pinned_records(tenant, Some(key)) + records;
                if wanted > limit {
                    return refuse("disk records", limit, wanted);
                }
            }
        }
        Ok(())
    }

    /// Sliding-window pages (hybrid models) the windows of `keys`' held
    /// conversations hold, each counted once, and the pages in all.
    fn agent_pages(&self, keys: &[&AgentKey]) -> Option<(usize, usize)> {
        let seqs: Vec<_> = keys.iter().filter_map(|k| self.agents.get(k)?.seq).collect();
        self.pages_held(&seqs)
    }

    /// After a turn of `key`: if it is pinned and pinned agents now hold
    /// more than their share (its tenant's, or all together), it becomes
    /// evictable.
    pub(super) fn unpin_past_share(&mut self, key: &AgentKey) {
        let pinned = self.agents.get(key).is_some_and(|ag| ag.retention == Retention::Pinned);
        if pinned && self.pin_room(key).is_err() {
            tracing::warn!(tenant = %key.tenant, agent = %key.id, "pinned agents past their share; unpinned");
            if let Some(ag) = self.agents.get_mut(key) {
                ag.retention = Retention::Evictable;
            }
        }
    }

    pub(crate) fn update_agent(&mut self, key: &AgentKey, update: AgentUpdate) -> Result<AgentInfo> {
        if self.agents.get(key).is_none() {
            return Err(Error::UnknownAgent(key.id.to_string()));
        }
        if update.retention == Some(Retention::Pinned) {
            self.pin_room(key)?;
        }
        let ag = self.agents.get_mut(key).ok_or_else(|| Error::UnknownAgent(key.id.to_string()))?;
        if let Some(r) = update.retention {
            ag.retention = r;
            ag.last_used = Instant::now();
        }
        if let Some(p) = update.priority {
            ag.priority = p;
        }
        if ag.turns > 0 {
            // The manifest carries retention and priority: rewrite it.
            self.commit_agent(key, Instant::now());
        }
        self.agent_info(key).ok_or_else(|| Error::UnknownAgent(key.id.to_string()))
    }

    pub(crate) fn set_quota(&mut self, tenant: &TenantId, quota: Option<u32>) -> Result<()> {
        let owner = OwnerId::new(tenant.as_str()).map_err(|_| Error::InvalidId {
            what: "tenant",
            id: tenant.to_string(),
            reason: "not a valid owner",
        })?;
        self.cache.set_quota(&owner, quota);
        Ok(())
    }
}
