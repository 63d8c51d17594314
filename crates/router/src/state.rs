//! The routing state: the replica table, the block index and the counters,
//! behind one lock.
//!
//! Each replica is in one of these states:
//!
//! | sync | health | routed to |
//! |---|---|---|
//! | pending (no snapshot read yet) | any | no |
//! | refused (its snapshot names another model, block size or namespacing) | any | never |
//! | synced (epoch and next event known) | down | no |
//! | synced | up | yes |
//!
//! Load is counted at dispatch: a decision adds one to the chosen
//! replica's in-flight count under the same lock, and the [`InFlight`]
//! ticket it returns takes it off when dropped (the response body ended,
//! failed, or the client went away). The next decision sees it at once:
//! a router that waited for the replica to report its queue would send a
//! burst to one replica (vllm-project/router #179).
//!
//! The state is a hint: a stale index costs a cache miss, never a wrong
//! answer (the replica computes what it does not hold).
//!
//! # Concurrency
//!
//! [`Shared`] guards [`Inner`] with one mutex (`sync.rs`). Every method
//! takes it, does its work and lets go: it is never held across an
//! `.await`, never while calling out (HTTP, tokenizing), and nothing else
//! is locked under it. A check and the act that depends on it (a
//! decision and its in-flight increment; an epoch check and the events it
//! admits) happen under one acquisition. A poisoned lock is taken over
//! (the index and counters stay consistent between operations, and a hint
//! is better than a router that stops).

use std::collections::HashMap;
use std::sync::Arc;

use kv::BlockHash;

use crate::index::{BlockIndex, ReplicaId, Tier};
use crate::metrics::{Counters, ReplicaLine, Snapshot};
use crate::policy::{self, Candidate, Choice, Reason};
use crate::sync::{Mutex, MutexGuard, PoisonError};
use crate::wire::{Event, Load};

/// Where a replica's events stand.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SyncState {
    /// No snapshot read yet.
    Pending,
    /// Its snapshot does not match the router; why.
    Refused(String),
    /// The index holds its snapshot and the events up to `next`.
    Synced {
        /// Its process's epoch.
        epoch: String,
        /// The sequence number of the next event.
        next: u64,
    },
}

/// One replica.
#[derive(Debug)]
pub(crate) struct Replica {
    pub(crate) url: Arc<str>,
    /// Its last `/health` answered 200 (and no request failed to connect
    /// since).
    healthy: bool,
    sync: SyncState,
    /// As it last reported.
    load: Load,
    /// Requests this router has in flight to it.
    in_flight: u64,
}

impl Replica {
    fn routable(&self) -> bool {
        self.healthy && matches!(self.sync, SyncState::Synced { .. })
    }

    fn load(&self) -> f64 {
        (self.load.running + self.load.waiting + self.in_flight) as f64
    }
}

/// A replica as [`crate::KvRouter::replicas`] reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaStatus {
    /// Its URL.
    pub url: String,
    /// It answers `/health`.
    pub healthy: bool,
    /// Its snapshot was read and matched.
    pub synced: bool,
    /// Why it is refused, if it is.
    pub refused: Option<String>,
    /// Its epoch, once synced.
    pub epoch: Option<String>,
    /// Running plus waiting as reported, plus in flight from this router.
    pub load: f64,
    /// Requests this router has in flight to it.
    pub in_flight: u64,
    /// Blocks the index says it holds.
    pub blocks: u64,
}

/// What the lock guards.
pub(crate) struct Inner {
    index: BlockIndex,
    replicas: Vec<Replica>,
    counters: Counters,
    /// Decisions made: rotates ties.
    turn: usize,
    /// Where each agent's last turn was sent: its turns stay there (a moved
    /// agent does not move back), and a move hands it over.
    homes: HashMap<(String, String), ReplicaId>,
}

/// Agents whose replica the router remembers at most; past it the map
/// starts over (an agent then goes to its rendezvous home again).
pub(crate) const MAX_HOMES: usize = 1 << 20;

/// What a request asks of the choice.
#[derive(Clone, Debug)]
pub(crate) enum Target {
    /// A completion: its agent's home within the load bound, or the
    /// cheapest replica for its chain within the bound, or (nothing known)
    /// the least loaded. Counted in the decision metrics.
    Completion {
        /// The agent it names.
        agent: Option<String>,
        /// Its prompt's block addresses, when the router could plan it.
        chain: Option<Vec<BlockHash>>,
    },
    /// The agent API: the agent's rendezvous home, whatever its load.
    AgentHome(String),
    /// Anything (`/v1/models`): the least loaded replica.
    Any,
}

/// A request's routing inputs.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    /// Its tenant (part of an agent's rendezvous key).
    pub(crate) tenant: String,
    pub(crate) target: Target,
}

/// A replica's load taken by a dispatched request; given back on drop,
/// when `then` (if set) runs: what follows the whole answer.
pub(crate) struct InFlight {
    shared: Arc<Shared>,
    id: ReplicaId,
    pub(crate) then: Option<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        {
            let mut g = self.shared.lock();
            if let Some(r) = g.replicas.get_mut(self.id.index()) {
                debug_assert!(r.in_flight > 0, "an in-flight ticket outlived its count");
                r.in_flight = r.in_flight.saturating_sub(1);
            }
        }
        if let Some(then) = self.then.take() {
            then();
        }
    }
}

/// A decision: where to send the request, and the load it takes there.
#[derive(Debug)]
pub(crate) struct Dispatch {
    pub(crate) id: ReplicaId,
    pub(crate) url: Arc<str>,
    pub(crate) reason: Reason,
    pub(crate) ticket: InFlight,
    /// An agent's turn sent away from the replica its last turn ran on:
    /// that replica's URL (it hands the agent over once this turn is
    /// answered).
    pub(crate) moved_from: Option<Arc<str>>,
}

/// The load bound and weight of decisions.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Weights {
    pub(crate) bound: f64,
    pub(crate) load_weight: f64,
}

/// The routing state (see the module doc's `# Concurrency`).
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    weights: Weights,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("weights", &self.weights).finish_non_exhaustive()
    }
}

/// A replica's snapshot, parsed.
pub(crate) struct Synced {
    pub(crate) epoch: String,
    pub(crate) next: u64,
    pub(crate) load: Load,
    pub(crate) blocks: Vec<(BlockHash, Tier)>,
}

/// Why events cannot be applied: the caller re-reads the snapshot.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Resync {
    /// The replica's epoch changed (it restarted).
    Epoch,
    /// Events were skipped.
    Gap,
    /// The replica is not synced (refused meanwhile, or never).
    NotSynced,
}

impl Shared {
    pub(crate) fn new(urls: &[Arc<str>], weights: Weights) -> Self {
        let replicas = urls
            .iter()
            .map(|url| Replica {
                url: Arc::clone(url),
                healthy: false,
                sync: SyncState::Pending,
                load: Load::default(),
                in_flight: 0,
            })
            .collect();
        let inner =
            Inner { index: BlockIndex::new(), replicas, counters: Counters::default(), turn: 0, homes: HashMap::new() };
        Self { inner: Mutex::new(inner), weights }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Chooses a replica for `plan` among the routable ones not in
    /// `exclude`, and takes one unit of its load. `None` when no replica
    /// can take it.
    pub(crate) fn decide(self: &Arc<Self>, plan: &Plan, exclude: &[ReplicaId]) -> Option<Dispatch> {
        let mut g = self.lock();
        let inner = &mut *g;
        let candidates: Vec<Candidate> = inner
            .replicas
            .iter()
            .enumerate()
            .filter(|(_, r)| r.routable())
            .filter_map(|(i, r)| ReplicaId::new(i).map(|id| Candidate { id, load: r.load() }))
            .filter(|c| !exclude.contains(&c.id))
            .collect();
        inner.turn = inner.turn.wrapping_add(1);
        let limit = policy::load_limit(&candidates, self.weights.bound);
        let urls = |c: &Candidate| (c.id, &*inner.replicas[c.id.index()].url);
        let mut moved_from = None;
        let (choice, counted): (Choice, bool) = match &plan.target {
            Target::Completion { agent: Some(agent), .. } => {
                let mut order = policy::rendezvous_order(&plan.tenant, agent, candidates.iter().map(urls));
                let key = (plan.tenant.clone(), agent.clone());
                let last = inner.homes.get(&key).copied();
                // Where its last turn ran comes first: a moved agent stays.
                if let Some(pos) = last.and_then(|l| order.iter().position(|&id| id == l)) {
                    let l = order.remove(pos);
                    order.insert(0, l);
                }
                let c = policy::choose_agent(&order, &candidates, limit)?;
                if let Some(l) = last.filter(|&l| l != c.id) {
                    moved_from = inner.replicas.get(l.index()).map(|r| Arc::clone(&r.url));
                }
                if inner.homes.len() >= MAX_HOMES {
                    inner.homes.clear();
                }
                inner.homes.insert(key, c.id);
                (c, true)
            }
            Target::Completion { agent: None, chain: Some(chain) } => {
                let costs = inner.index.prefix_costs(chain, inner.replicas.len());
                let c = policy::choose_by_cost(&candidates, &costs, self.weights.load_weight, limit, inner.turn)?;
                inner.counters.overlap.observe(f64::from(c.overlap));
                (c, true)
            }
            Target::Completion { agent: None, chain: None } => {
                (policy::choose_fallback(&candidates, inner.turn)?, true)
            }
            Target::AgentHome(agent) => {
                let order = policy::rendezvous_order(&plan.tenant, agent, candidates.iter().map(urls));
                let id = *order.first()?;
                (Choice { id, reason: Reason::Affinity, overlap: 0 }, false)
            }
            Target::Any => (policy::choose_fallback(&candidates, inner.turn)?, false),
        };
        if counted {
            inner.counters.decided(choice.reason);
        }
        let r = &mut inner.replicas[choice.id.index()];
        r.in_flight += 1;
        let url = Arc::clone(&r.url);
        drop(g);
        Some(Dispatch {
            id: choice.id,
            url,
            reason: choice.reason,
            ticket: InFlight { shared: Arc::clone(self), id: choice.id, then: None },
            moved_from,
        })
    }

    /// The routable replicas, `tenant`'s `agent`'s home first when given.
    pub(crate) fn routable(&self, home_of: Option<(&str, &str)>) -> Vec<(ReplicaId, Arc<str>)> {
        let g = self.lock();
        let up: Vec<(ReplicaId, Arc<str>)> = g
            .replicas
            .iter()
            .enumerate()
            .filter(|(_, r)| r.routable())
            .filter_map(|(i, r)| ReplicaId::new(i).map(|id| (id, Arc::clone(&r.url))))
            .collect();
        drop(g);
        match home_of {
            None => up,
            Some((tenant, agent)) => {
                let order = policy::rendezvous_order(tenant, agent, up.iter().map(|(id, u)| (*id, &**u)));
                order.into_iter().filter_map(|id| up.iter().find(|(i, _)| *i == id).cloned()).collect()
            }
        }
    }

    /// Every replica's id and URL.
    pub(crate) fn all(&self) -> Vec<(ReplicaId, Arc<str>)> {
        let g = self.lock();
        g.replicas
            .iter()
            .enumerate()
            .filter_map(|(i, r)| ReplicaId::new(i).map(|id| (id, Arc::clone(&r.url))))
            .collect()
    }

    /// Records a `/health` answer; whether the replica's health changed.
    pub(crate) fn set_health(&self, id: ReplicaId, healthy: bool) -> bool {
        let mut g = self.lock();
        let Some(r) = g.replicas.get_mut(id.index()) else { return false };
        std::mem::replace(&mut r.healthy, healthy) != healthy
    }

    /// A request could not reach `id`: it is down until `/health` says
    /// otherwise.
    pub(crate) fn mark_down(&self, id: ReplicaId) {
        self.set_health(id, false);
    }

    /// A request was sent again after a failure.
    pub(crate) fn count_retry(&self) {
        self.lock().counters.retries += 1;
    }

    /// Time spent choosing for one request.
    pub(crate) fn observe_route_time(&self, seconds: f64) {
        self.lock().counters.route_seconds.observe(seconds);
    }

    /// Replaces what the index holds for `id` with its snapshot; `resync`
    /// counts it as a re-read (after lost events or a restart).
    pub(crate) fn resync(&self, id: ReplicaId, snap: Synced, resync: bool) {
        let mut g = self.lock();
        let inner = &mut *g;
        inner.index.drop_replica(id);
        inner.index.reserve(snap.blocks.len());
        for (hash, tier) in snap.blocks {
            inner.index.store(id, hash, tier);
        }
        if resync {
            inner.counters.resyncs += 1;
        }
        if let Some(r) = inner.replicas.get_mut(id.index()) {
            r.sync = SyncState::Synced { epoch: snap.epoch, next: snap.next };
            r.load = snap.load;
        }
    }

    /// Refuses `id` (its snapshot does not match), forgetting its blocks;
    /// whether it was not refused for this reason already.
    pub(crate) fn refuse(&self, id: ReplicaId, why: String) -> bool {
        let mut g = self.lock();
        let inner = &mut *g;
        inner.index.drop_replica(id);
        let Some(r) = inner.replicas.get_mut(id.index()) else { return false };
        let new = r.sync != SyncState::Refused(why.clone());
        r.sync = SyncState::Refused(why);
        new
    }

    /// The epoch and next sequence number of a synced replica.
    pub(crate) fn position(&self, id: ReplicaId) -> Option<(String, u64)> {
        let g = self.lock();
        match &g.replicas.get(id.index())?.sync {
            SyncState::Synced { epoch, next } => Some((epoch.clone(), *next)),
            _ => None,
        }
    }

    /// Applies a page of `id`'s events that starts at `first_seq` and ends
    /// before `next`, if the replica is still at `epoch` and the page
    /// continues where the index is.
    ///
    /// # Errors
    /// [`Resync`] when the page cannot be applied; nothing is changed.
    pub(crate) fn apply(
        &self,
        id: ReplicaId,
        epoch: &str,
        first_seq: Option<u64>,
        events: &[(u64, Event)],
        next: u64,
        load: Load,
    ) -> Result<usize, Resync> {
        let mut g = self.lock();
        let inner = &mut *g;
        let Some(r) = inner.replicas.get_mut(id.index()) else { return Err(Resync::NotSynced) };
        let SyncState::Synced { epoch: mine, next: at } = &mut r.sync else { return Err(Resync::NotSynced) };
        if mine != epoch {
            return Err(Resync::Epoch);
        }
        if first_seq.is_some_and(|s| s > *at) || next < *at {
            return Err(Resync::Gap);
        }
        let from = *at;
        *at = next;
        r.load = load;
        let mut applied = 0;
        for &(seq, ev) in events.iter().filter(|(seq, _)| *seq >= from) {
            debug_assert!(seq < next, "an event at or past the page's next");
            match ev {
                Event::Stored(h, t) => inner.index.store(id, h, t),
                Event::Removed(h, t) => inner.index.remove(id, h, t),
                Event::Cleared(t) => inner.index.clear_tier(id, t),
            }
            applied += 1;
        }
        inner.counters.events += applied as u64;
        Ok(applied)
    }

    /// Routable replicas and all replicas.
    pub(crate) fn health_summary(&self) -> (usize, usize) {
        let g = self.lock();
        (g.replicas.iter().filter(|r| r.routable()).count(), g.replicas.len())
    }

    /// Every replica's state.
    pub(crate) fn replicas(&self) -> Vec<ReplicaStatus> {
        let g = self.lock();
        g.replicas
            .iter()
            .enumerate()
            .map(|(i, r)| ReplicaStatus {
                url: r.url.to_string(),
                healthy: r.healthy,
                synced: matches!(r.sync, SyncState::Synced { .. }),
                refused: match &r.sync {
                    SyncState::Refused(why) => Some(why.clone()),
                    _ => None,
                },
                epoch: match &r.sync {
                    SyncState::Synced { epoch, .. } => Some(epoch.clone()),
                    _ => None,
                },
                load: r.load(),
                in_flight: r.in_flight,
                blocks: ReplicaId::new(i).map_or(0, |id| g.index.held_by(id)),
            })
            .collect()
    }

    /// The index's blocks, bytes, (replica, block) pairs and spilled
    /// entries.
    pub(crate) fn index_stats(&self) -> (usize, usize, u64, usize) {
        let g = self.lock();
        let pairs = (0..g.replicas.len()).filter_map(ReplicaId::new).map(|id| g.index.held_by(id)).sum();
        (g.index.len(), g.index.memory_bytes(), pairs, g.index.spilled())
    }

    /// What `/metrics` shows, copied at one moment.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let g = self.lock();
        Snapshot {
            counters: g.counters.clone(),
            replicas: g
                .replicas
                .iter()
                .map(|r| ReplicaLine {
                    url: r.url.to_string(),
                    load: r.load(),
                    in_flight: r.in_flight,
                    healthy: r.routable(),
                    refused: matches!(r.sync, SyncState::Refused(_)),
                })
                .collect(),
            index_blocks: g.index.len(),
            index_bytes: g.index.memory_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(n: usize) -> Arc<Shared> {
        let urls: Vec<Arc<str>> = (0..n).map(|i| Arc::from(format!("http://r{i}"))).collect();
        let s = Arc::new(Shared::new(&urls, Weights { bound: 1.5, load_weight: 1.0 }));
        for i in 0..n {
            let id = ReplicaId::new(i).unwrap();
            s.resync(id, Synced { epoch: "e1".into(), next: 0, load: Load::default(), blocks: Vec::new() }, false);
            s.set_health(id, true);
        }
        s
    }

    fn prompt(chain: Vec<BlockHash>) -> Plan {
        Plan { tenant: "default".into(), target: Target::Completion { agent: None, chain: Some(chain) } }
    }

    /// vllm-project/router #179: load known only from the replicas' own
    /// reports sent a burst to one replica. Counted at dispatch, a burst
    /// of identical requests spreads at once.
    #[test]
    fn a_burst_spreads_because_load_is_counted_at_dispatch() {
        let s = shared(4);
        let held: Vec<Dispatch> = (0..8).map(|_| s.decide(&prompt(Vec::new()), &[]).unwrap()).collect();
        let mut per = [0; 4];
        for d in &held {
            per[d.id.index()] += 1;
        }
        assert_eq!(per, [2, 2, 2, 2]);
        drop(held);
        assert!(s.replicas().iter().all(|r| r.in_flight == 0), "tickets give the load back");
    }

    /// An agent moved off its home for load stays where its last turn ran
    /// (no ping-pong), and the move names the replica it left, which then
    /// hands it over: the agent lives on one replica at a time.
    #[test]
    fn a_moved_agent_stays_moved_and_names_the_replica_it_left() {
        let s = shared(3);
        let plan = Plan { tenant: "t".into(), target: Target::Completion { agent: Some("a".into()), chain: None } };
        let first = s.decide(&plan, &[]).unwrap();
        assert_eq!(first.moved_from, None, "a first turn moves nothing");
        let home = first.id;
        drop(first);
        // The home is busy: hold enough of its load to pass the bound.
        let busy: Vec<Dispatch> = (0..6)
            .map(|_| {
                let p = Plan { tenant: "t".into(), target: Target::AgentHome("a".into()) };
                s.decide(&p, &[]).unwrap()
            })
            .collect();
        assert!(busy.iter().all(|d| d.id == home));
        let moved = s.decide(&plan, &[]).unwrap();
        assert_ne!(moved.id, home, "over the bound: moved");
        assert_eq!(moved.moved_from.as_deref(), Some(&*s.all()[home.index()].1));
        let there = moved.id;
        drop((moved, busy));
        let next = s.decide(&plan, &[]).unwrap();
        assert_eq!((next.id, next.moved_from.clone()), (there, None), "it stays where it ran last");
    }

    #[test]
    fn events_apply_in_order_and_gaps_or_new_epochs_ask_for_a_resync() {
        let s = shared(1);
        let id = ReplicaId::new(0).unwrap();
        let b = BlockHash::from_u128(42);
        let stored = [(0, Event::Stored(b, Tier::Pool)), (1, Event::Stored(b, Tier::Disk))];
        assert_eq!(s.apply(id, "e1", Some(0), &stored, 2, Load::default()), Ok(2));
        assert_eq!(s.position(id), Some(("e1".into(), 2)));
        // Replayed events (seq below `next`) are skipped.
        assert_eq!(s.apply(id, "e1", Some(1), &stored[1..], 2, Load::default()), Ok(0));
        // A page that starts past `next`: events were lost.
        let later = [(5, Event::Removed(b, Tier::Pool))];
        assert_eq!(s.apply(id, "e1", Some(5), &later, 6, Load::default()), Err(Resync::Gap));
        // Another epoch: the replica restarted.
        assert_eq!(s.apply(id, "e2", Some(2), &later, 6, Load::default()), Err(Resync::Epoch));
        assert_eq!(s.replicas()[0].blocks, 1, "nothing applied from refused pages");
        let cleared = [(2, Event::Cleared(Tier::Pool)), (3, Event::Removed(b, Tier::Disk))];
        assert_eq!(s.apply(id, "e1", Some(2), &cleared, 4, Load { running: 3, ..Load::default() }), Ok(2));
        let st = &s.replicas()[0];
        assert_eq!((st.blocks, st.load), (0, 3.0));
        // A resync replaces what was there.
        s.resync(id, Synced { epoch: "e2".into(), next: 9, load: Load::default(), blocks: vec![(b, Tier::Ram)] }, true);
        assert_eq!((s.replicas()[0].blocks, s.position(id)), (1, Some(("e2".into(), 9))));
        assert_eq!(s.snapshot().counters.resyncs, 1);
    }

    #[test]
    fn refused_and_down_replicas_are_never_chosen() {
        let s = shared(3);
        assert!(s.refuse(ReplicaId::new(0).unwrap(), "another model".into()));
        assert!(!s.refuse(ReplicaId::new(0).unwrap(), "another model".into()), "logged once");
        s.mark_down(ReplicaId::new(1).unwrap());
        for _ in 0..5 {
            assert_eq!(s.decide(&prompt(Vec::new()), &[]).unwrap().id.index(), 2);
        }
        assert!(s.decide(&prompt(Vec::new()), &[ReplicaId::new(2).unwrap()]).is_none());
        assert_eq!(s.health_summary(), (1, 3));
    }
}
