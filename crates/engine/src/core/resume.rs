//! Agents that come back on another replica. With a tier shared by replicas
//! (the remote tier), an agent's turns may land here while its history was
//! written elsewhere. A turn of an agent this process does not know waits
//! (parked, not queued) while the first tier that can look finds the
//! agent's manifest; the agent is then restored from it as at start
//! (checked against its own tokens, counted against the tenant's agent
//! limit like a local one) and the turn is submitted again, so the turn's
//! prompt splices onto the agent's own tokens and its prefix lookup finds
//! the blocks the other replica stored. Turns of the same agent arriving
//! meanwhile wait for the same lookup. The wait is bounded by
//! [`FETCH_DEADLINE`]: past it, or when no manifest is found, the turn runs
//! as a new agent's (a miss costs time, never a wrong answer).
//!
//! After a restart, agents come back from the disk tier's manifests with
//! their blocks on disk: the first turn of each would wait for a load.
//! [`EngineCore::prewarm`] starts loading them back into the RAM tier at
//! once, in the background (the disk's reader threads), the most recently
//! used agents first, as many blocks as the RAM budget holds, a window of
//! [`PREFETCH_WINDOW`] reads at a time. The blocks in flight are registered
//! as pending under the prefetch, so a turn that arrives mid-way waits for
//! each of those it needs (the pending-blocks mechanism of `tiering.rs`)
//! and takes it from RAM as it lands, instead of loading it a second time;
//! blocks not asked for yet it loads itself, with at most a window of
//! prefetch reads ahead of it in the queue, and the prefetch skips them.

use std::time::Instant;

use kv::{BlockKey, Namespace};
use tiers::{AgentManifest, LoadTask, ManifestId, Payload, RecordKey, Reject};

use super::{EngineCore, Submission};
use crate::agents::AgentKey;
use crate::request::RequestId;
use crate::tiering::{AgentFetch, Prefetch, FETCH_DEADLINE, PREFETCH_WINDOW};

impl EngineCore {
    /// Parks `s` while its agent's manifest is looked for, if this process
    /// does not know the agent and a tier can look (`None`); otherwise
    /// hands `s` back.
    pub(super) fn look_up_agent(&mut self, key: &AgentKey, s: Submission) -> Option<Submission> {
        if s.looked_up || self.agents.get(key).is_some() {
            return Some(s);
        }
        let id = ManifestId::of(key.tenant.as_str(), key.id.as_str());
        if let Some(f) = self.tiers.fetches.get_mut(&id) {
            f.waiting.push(s);
            return None;
        }
        if !self.tiers.list.iter_mut().any(|t| t.fetch_agent(id)) {
            return Some(s);
        }
        let fetch = AgentFetch { key: key.clone(), waiting: vec![s], deadline: Instant::now() + FETCH_DEADLINE };
        self.tiers.fetches.insert(id, fetch);
        None
    }

    /// A tier's answer to an agent lookup: restores the agent (if it is
    /// still unknown and its tenant has room) and submits its turns.
    pub(crate) fn on_agent_manifest(&mut self, agent: ManifestId, manifest: Option<AgentManifest>) {
        let Some(fetch) = self.tiers.fetches.remove(&agent) else { return };
        if let Some(m) = manifest {
            let unknown = self.agents.get(&fetch.key).is_none();
            if unknown && m.id() == agent && self.make_agent_room(&fetch.key).is_ok() {
                let resumed = self.restore_agents(vec![m]) as u64;
                // Counted as resumed, not as restored at start.
                self.tiers.counters.agents_restored -= resumed;
                self.tiers.counters.agents_resumed += resumed;
            }
        }
        self.resubmit(fetch);
    }

    /// Submits the turns of lookups past their deadline, as new agents'.
    pub(super) fn expire_fetches(&mut self, now: Instant) {
        let late: Vec<ManifestId> =
            self.tiers.fetches.iter().filter(|(_, f)| now >= f.deadline).map(|(id, _)| *id).collect();
        for id in late {
            if let Some(fetch) = self.tiers.fetches.remove(&id) {
                tracing::debug!(tenant = %fetch.key.tenant, agent = %fetch.key.id, "no answer in time from the tiers about an agent: its turn runs without its stored history");
                self.resubmit(fetch);
            }
        }
    }

    fn resubmit(&mut self, fetch: AgentFetch) {
        for mut s in fetch.waiting {
            s.looked_up = true;
            self.submit(s);
        }
    }

    /// Drops a parked turn the caller cancelled; true if there was one.
    pub(super) fn cancel_parked(&mut self, id: RequestId) -> bool {
        for f in self.tiers.fetches.values_mut() {
            if let Some(i) = f.waiting.iter().position(|s| s.id == id) {
                // Its ticket and event channel go with it: the caller is
                // gone.
                f.waiting.swap_remove(i);
                return true;
            }
        }
        false
    }

    /// When the earliest lookup runs out.
    pub(super) fn next_fetch_deadline(&self) -> Option<Instant> {
        self.tiers.fetches.values().map(|f| f.deadline).min()
    }
}

impl EngineCore {
    /// Starts loading restored agents' blocks back into the RAM tier (see
    /// the module doc); returns how many blocks were asked for.
    pub(crate) fn prewarm(&mut self) -> usize {
        let Some(ram) = self.tiers.list.first().filter(|t| t.at_once()) else { return 0 };
        let bs = self.cache.spec().block_size();
        // A RAM entry costs its payload, its tokens and some bookkeeping;
        // staying under the budget keeps the first agents' blocks from
        // being pushed out by the last ones.
        let per_block = (self.model.storage().block_bytes() + 4 * bs + 128) as u64;
        let snap = ram.snapshot();
        let mut room = (snap.budget.saturating_sub(snap.bytes) / per_block) as usize;
        let mut agents: Vec<(&AgentKey, &crate::agents::Agent)> = self.agents.iter().collect();
        agents.sort_by_key(|(_, a)| std::cmp::Reverse(a.last_used));
        let mut wanted: Vec<(usize, BlockKey)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (key, ag) in agents {
            let ns = Namespace::new(self.model.fingerprint(), key.tenant.as_str().as_bytes());
            let chain = &ag.chain[..ag.chain.len().min(ag.tokens.len() / bs)];
            for (i, h) in chain.iter().enumerate() {
                if room == 0 {
                    break;
                }
                if self.cache.is_indexed(*h) || !seen.insert(*h) {
                    continue;
                }
                let tokens = ag.tokens[i * bs..(i + 1) * bs].into();
                wanted.push((i, BlockKey { hash: *h, parent: i.checked_sub(1).map(|p| chain[p]), ns, tokens }));
                room -= 1;
            }
            // And the partial block after them (`Agent::tail`).
            if let Some((k, key)) = ag.tail.as_ref().filter(|(k, _)| *k == chain.len() && room > 0) {
                if seen.insert(key.hash) {
                    wanted.push((*k, key.clone()));
                    room -= 1;
                }
            }
        }
        let keys: Vec<RecordKey> = wanted.iter().map(|(_, k)| RecordKey::new(0, k.hash)).collect();
        // Each block from the first queued tier that holds it.
        let mut from: Vec<Option<usize>> = vec![None; keys.len()];
        for (t, tier) in self.tiers.list.iter().enumerate().skip(1) {
            for (f, held) in from.iter_mut().zip(tier.holds(&keys)) {
                if f.is_none() && held {
                    *f = Some(t);
                }
            }
        }
        let queue: std::collections::VecDeque<(usize, BlockKey, usize)> =
            wanted.into_iter().zip(from).filter_map(|((i, key), f)| Some((i, key, f?))).collect();
        let n = queue.len();
        if n > 0 {
            let id = self.tiers.next_producer();
            let started = Some(Instant::now());
            self.tiers.prefetch = Some((id, Prefetch { queue, started, ..Prefetch::default() }));
            self.prefetch_more();
        }
        n
    }

    /// Keeps [`PREFETCH_WINDOW`] prefetch reads in flight: blocks still
    /// wanted (not in the pool or RAM, not being brought in by a load) are
    /// registered as pending and asked of their tier. Only what is in
    /// flight is pending: a turn that needs blocks further down the queue
    /// loads them itself (the prefetch then skips them).
    fn prefetch_more(&mut self) {
        let Some((id, mut pf)) = self.tiers.prefetch.take() else { return };
        let mut per_tier: Vec<Vec<LoadTask>> = vec![Vec::new(); self.tiers.list.len()];
        while pf.in_flight.len() < PREFETCH_WINDOW {
            let Some((i, key, t)) = pf.queue.pop_front() else { break };
            let rk = RecordKey::new(0, key.hash);
            let in_ram = self.tiers.list.first().is_some_and(|r| r.holds(&[rk]) == [true]);
            if in_ram || self.cache.is_indexed(key.hash) || self.tiers.pending.producer_of(&key.hash).is_some() {
                continue;
            }
            self.tiers.pending.register(id, i, &[key.hash]);
            per_tier[t].push(LoadTask { load: id, index: pf.next_index, group: 0, expected: key.clone() });
            pf.in_flight.insert(pf.next_index, key);
            pf.next_index += 1;
        }
        if pf.in_flight.is_empty() {
            self.tiers.pending.resolve(id);
            let ms = pf.started.map_or(0, |t| t.elapsed().as_millis() as u64);
            tracing::debug!(blocks = pf.next_index, ms, "restored agents' blocks are back in RAM");
            return;
        }
        self.tiers.prefetch = Some((id, pf));
        for (t, tasks) in per_tier.into_iter().enumerate() {
            if !tasks.is_empty() {
                // Queued tiers answer through events (`on_prefetched`).
                let _ = self.tiers.list[t].load(tasks);
            }
        }
    }

    /// A prefetched block came back (or not): into the RAM tier, no longer
    /// pending, and the next one asked for. The result is handed back if
    /// `load` is no prefetch.
    pub(super) fn on_prefetched(
        &mut self,
        load: u64,
        index: usize,
        result: Result<Payload, Reject>,
    ) -> Result<(), Result<Payload, Reject>> {
        let Some((_, pf)) = self.tiers.prefetch.as_mut().filter(|(id, _)| *id == load) else { return Err(result) };
        let Some(key) = pf.in_flight.remove(&index) else { return Ok(()) };
        let hash = key.hash;
        if let Ok(p) = result {
            super::tier_ops::keep_in_first(&mut self.tiers, key, p);
        }
        self.tiers.pending.arrived(load, &hash);
        self.prefetch_more();
        Ok(())
    }
}
