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

use std::time::Instant;

use tiers::{AgentManifest, ManifestId};

use super::{EngineCore, Submission};
use crate::agents::AgentKey;
use crate::request::RequestId;
use crate::tiering::{AgentFetch, FETCH_DEADLINE};

impl EngineCore {
    /// Parks `s` while its agent's manifest is looked for, if this process
    /// does not know the agent and a tier can look (`None`); otherwise
    /// hands `s` back.
    pub(super) fn look_up_agent(&mut self, key: &AgentKey, s: Submission) -> Option<Submission> {
        if s.looked_up || self.agents.get(key).is_some() {
            return Some(s);
        }
        let id = ManifestId::of(key.0.as_str(), key.1.as_str());
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
                tracing::debug!(tenant = %fetch.key.0, agent = %fetch.key.1, "no answer in time from the tiers about an agent: its turn runs without its stored history");
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
