//! The choice of a replica, as pure functions over what the router knows:
//! each candidate's load and, for a prompt, what its chain costs there.
//!
//! | request | choice | reason |
//! |---|---|---|
//! | names an agent | its rendezvous home, unless its load is over the bound; then the next in rendezvous order within it | `affinity`, `load` when it moved |
//! | a prompt whose blocks are known | least `prefill cost + load weight × load` among replicas within the bound | `overlap` (the chosen one holds some of the prefix), `load` (none does, or the bound moved it) |
//! | nothing known (a body the router cannot plan) | least loaded | `fallback` |
//!
//! **The bound is per decision.** A replica is skipped for one request when
//! its load exceeds `bound × mean load + 1`; the next request looks again.
//! A hot agent or a hot prefix thus overflows to other replicas instead of
//! piling onto one (SGLang's one-hot-worker problem), and one busy replica
//! never switches affinity off for the whole fleet (vllm router #238). The
//! least loaded candidate is always within the bound (its load is at most
//! the mean), so there is always a choice.
//!
//! **Rendezvous hashing** (highest random weight): an agent's replicas in
//! order of `xxh3(tenant, agent, replica url)`. Adding or removing a
//! replica moves only the agents whose first choice it is or becomes; the
//! order depends on the URL, not the replica's position, so restarting the
//! router with the replicas listed in another order moves nobody.

use xxhash_rust::xxh3::xxh3_64;

use crate::index::{PrefixCost, ReplicaId};

/// Why a replica was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The agent's rendezvous home.
    Affinity,
    /// The replica holds the longest (cheapest) part of the prompt.
    Overlap,
    /// Load decided: no replica holds any of the prompt, or the bound moved
    /// the request (or the agent) off its first choice.
    Load,
    /// Nothing was known about the request: the least loaded replica.
    Fallback,
}

impl Reason {
    /// Every reason, in metric order.
    pub const ALL: [Reason; 4] = [Reason::Affinity, Reason::Overlap, Reason::Load, Reason::Fallback];

    /// Its label in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Affinity => "affinity",
            Reason::Overlap => "overlap",
            Reason::Load => "load",
            Reason::Fallback => "fallback",
        }
    }
}

/// A replica that can take the request now, with its load (requests
/// running and waiting there plus those the router has in flight to it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    /// Which replica.
    pub id: ReplicaId,
    /// Its load.
    pub load: f64,
}

/// A decision.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Choice {
    /// The replica.
    pub id: ReplicaId,
    /// Why.
    pub reason: Reason,
    /// Leading blocks of the prompt it will not recompute.
    pub overlap: u32,
}

/// The highest load a replica may have and still be preferred:
/// `bound × mean load + 1` over `candidates`.
pub fn load_limit(candidates: &[Candidate], bound: f64) -> f64 {
    if candidates.is_empty() {
        return f64::INFINITY;
    }
    let mean = candidates.iter().map(|c| c.load).sum::<f64>() / candidates.len() as f64;
    bound * mean + 1.0
}

/// The rendezvous weight of `replica` (its URL) for `tenant`'s `agent`.
/// Fields are length-prefixed, so no two (tenant, agent) pairs share a
/// byte string.
pub fn rendezvous_weight(tenant: &str, agent: &str, replica: &str) -> u64 {
    let mut buf = Vec::with_capacity(24 + tenant.len() + agent.len() + replica.len());
    for part in [tenant, agent, replica] {
        buf.extend_from_slice(&(part.len() as u64).to_le_bytes());
        buf.extend_from_slice(part.as_bytes());
    }
    xxh3_64(&buf)
}

/// `replicas` (id and URL) in `tenant`'s `agent`'s rendezvous order: its
/// home first.
pub fn rendezvous_order<'a>(
    tenant: &str,
    agent: &str,
    replicas: impl IntoIterator<Item = (ReplicaId, &'a str)>,
) -> Vec<ReplicaId> {
    let mut weighted: Vec<(u64, &str, ReplicaId)> =
        replicas.into_iter().map(|(id, url)| (rendezvous_weight(tenant, agent, url), url, id)).collect();
    // Highest weight first; the URL breaks a (vanishingly rare) tie the
    // same way on every router.
    weighted.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    weighted.into_iter().map(|(_, _, id)| id).collect()
}

/// An agent's replica: the first of `order` (its rendezvous order over the
/// candidates) whose load is within `limit`. `None` only when `order` is
/// empty.
pub fn choose_agent(order: &[ReplicaId], candidates: &[Candidate], limit: f64) -> Option<Choice> {
    let load = |id: ReplicaId| candidates.iter().find(|c| c.id == id).map_or(f64::INFINITY, |c| c.load);
    let home = *order.first()?;
    let within = order.iter().copied().find(|&id| load(id) <= limit);
    let id = match within {
        Some(id) => id,
        // Only if `order` misses the least loaded candidates: the least
        // loaded of `order`.
        None => order.iter().copied().min_by(|a, b| load(*a).total_cmp(&load(*b))).unwrap_or(home),
    };
    let reason = if id == home { Reason::Affinity } else { Reason::Load };
    Some(Choice { id, reason, overlap: 0 })
}

/// The candidate with the least `costs[id].cost + load_weight × load` among
/// those within `limit` (`costs` is indexed by replica). Ties go to the
/// first in the candidates' order rotated by `start`, so equal replicas
/// take turns. `None` only without candidates.
pub fn choose_by_cost(
    candidates: &[Candidate],
    costs: &[PrefixCost],
    load_weight: f64,
    limit: f64,
    start: usize,
) -> Option<Choice> {
    let n = candidates.len();
    if n == 0 {
        return None;
    }
    let cost = |c: &Candidate| costs.get(c.id.index()).copied().unwrap_or_default();
    let total = |c: &Candidate| f64::from(cost(c).cost) + load_weight * c.load;
    let mut preferred: Option<(f64, &Candidate)> = None;
    let mut best: Option<(f64, &Candidate)> = None;
    for k in 0..n {
        let c = &candidates[(start + k) % n];
        let t = total(c);
        if preferred.is_none_or(|(p, _)| t < p) {
            preferred = Some((t, c));
        }
        if c.load <= limit && best.is_none_or(|(b, _)| t < b) {
            best = Some((t, c));
        }
    }
    // Nothing within the limit only if it was computed over other
    // candidates: fall back to the least loaded.
    let best = match best {
        Some((_, c)) => c,
        None => candidates.iter().min_by(|a, b| a.load.total_cmp(&b.load))?,
    };
    let overlap = cost(best).run;
    let moved = preferred.is_some_and(|(_, p)| p.id != best.id);
    let reason = if !moved && overlap > 0 { Reason::Overlap } else { Reason::Load };
    Some(Choice { id: best.id, reason, overlap })
}

/// The least loaded candidate (ties rotated by `start`), for a request
/// nothing is known about.
pub fn choose_fallback(candidates: &[Candidate], start: usize) -> Option<Choice> {
    let none = vec![PrefixCost::default(); candidates.iter().map(|c| c.id.index() + 1).max().unwrap_or(0)];
    choose_by_cost(candidates, &none, 1.0, f64::INFINITY, start).map(|c| Choice {
        reason: Reason::Fallback,
        overlap: 0,
        ..c
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{BlockIndex, Tier};
    use kv::BlockHash;

    fn id(i: usize) -> ReplicaId {
        ReplicaId::new(i).unwrap()
    }

    fn urls(n: usize) -> Vec<(ReplicaId, String)> {
        (0..n).map(|i| (id(i), format!("http://10.0.0.{i}:8080"))).collect()
    }

    fn home(tenant: &str, agent: &str, replicas: &[(ReplicaId, String)]) -> ReplicaId {
        rendezvous_order(tenant, agent, replicas.iter().map(|(i, u)| (*i, u.as_str())))[0]
    }

    #[test]
    fn rendezvous_is_stable_and_spreads_agents_evenly() {
        let replicas = urls(8);
        let mut reversed = replicas.clone();
        reversed.reverse();
        let mut per = [0usize; 8];
        for a in 0..8000 {
            let agent = format!("agent-{a}");
            let h = home("default", &agent, &replicas);
            // The same home whatever the order the replicas are listed in,
            // and on every call.
            assert_eq!(h, home("default", &agent, &reversed));
            assert_eq!(h, home("default", &agent, &replicas));
            per[h.index()] += 1;
        }
        // 1000 each on average; a fair hash stays well within ±20%.
        assert!(per.iter().all(|&n| (800..=1200).contains(&n)), "{per:?}");
        // Tenants do not share homes by name.
        let differ = (0..200).filter(|a| {
            let agent = format!("agent-{a}");
            home("acme", &agent, &replicas) != home("default", &agent, &replicas)
        });
        assert!(differ.count() > 100);
    }

    #[test]
    fn removing_a_replica_moves_only_its_agents() {
        let replicas = urls(6);
        let without: Vec<_> = replicas.iter().filter(|(i, _)| *i != id(2)).cloned().collect();
        let mut moved = 0;
        for a in 0..3000 {
            let agent = format!("a{a}");
            let before = home("t", &agent, &replicas);
            let after = home("t", &agent, &without);
            if before == id(2) {
                moved += 1;
                assert_ne!(after, id(2));
            } else {
                assert_eq!(before, after, "an agent of another replica moved");
            }
        }
        assert!(moved > 300, "replica 2 had {moved} agents of 3000");
    }

    #[test]
    fn cost_picks_the_replica_with_the_longest_held_prefix() {
        let chain: Vec<BlockHash> = (1..=10u128).map(BlockHash::from_u128).collect();
        let mut ix = BlockIndex::new();
        for (r, held) in [(0, 2), (1, 7), (2, 4)] {
            for b in &chain[..held] {
                ix.store(id(r), *b, Tier::Pool);
            }
        }
        let costs = ix.prefix_costs(&chain, 3);
        let cands: Vec<Candidate> = (0..3).map(|i| Candidate { id: id(i), load: 1.0 }).collect();
        let c = choose_by_cost(&cands, &costs, 1.0, load_limit(&cands, 1.5), 0).unwrap();
        assert_eq!((c.id, c.reason, c.overlap), (id(1), Reason::Overlap, 7));
        // Some load does not outweigh 3 blocks of prefill...
        let mut busy = cands.clone();
        busy[1].load = 3.0;
        let c = choose_by_cost(&busy, &costs, 1.0, load_limit(&busy, 1.5), 0).unwrap();
        assert_eq!(c.id, id(1));
        // ...nothing known: load decides, and the reason says so.
        let none = ix.prefix_costs(&[BlockHash::from_u128(99)], 3);
        let c = choose_by_cost(&busy, &none, 1.0, load_limit(&busy, 1.5), 0).unwrap();
        assert_eq!(c.reason, Reason::Load);
        assert_ne!(c.id, id(1));
    }

    /// SGLang's one hot worker: a prefix everybody sends must not pull
    /// everything to the replica that holds it once that one is loaded.
    #[test]
    fn the_load_bound_moves_a_hot_prefix() {
        let chain: Vec<BlockHash> = (1..=200u128).map(BlockHash::from_u128).collect();
        let mut ix = BlockIndex::new();
        for b in &chain {
            ix.store(id(0), *b, Tier::Pool);
        }
        let costs = ix.prefix_costs(&chain, 4);
        // Holding 200 blocks beats any load by cost; only the bound moves it.
        let mut cands: Vec<Candidate> = (0..4).map(|i| Candidate { id: id(i), load: 2.0 }).collect();
        assert_eq!(choose_by_cost(&cands, &costs, 1.0, load_limit(&cands, 1.5), 0).unwrap().id, id(0));
        cands[0].load = 9.0; // mean 3.75, limit 6.6
        let c = choose_by_cost(&cands, &costs, 1.0, load_limit(&cands, 1.5), 0).unwrap();
        assert_ne!(c.id, id(0));
        assert_eq!(c.reason, Reason::Load, "moved by the bound");
    }

    #[test]
    fn the_load_bound_moves_a_hot_agent_to_its_next_home_only() {
        let replicas = urls(5);
        let order = rendezvous_order("t", "hot", replicas.iter().map(|(i, u)| (*i, u.as_str())));
        let mut cands: Vec<Candidate> = (0..5).map(|i| Candidate { id: id(i), load: 1.0 }).collect();
        let c = choose_agent(&order, &cands, load_limit(&cands, 1.5)).unwrap();
        assert_eq!((c.id, c.reason), (order[0], Reason::Affinity));
        cands[order[0].index()].load = 6.0; // mean 2, limit 4
        let c = choose_agent(&order, &cands, load_limit(&cands, 1.5)).unwrap();
        assert_eq!((c.id, c.reason), (order[1], Reason::Load));
        // The bound is per decision: the home is back once its load is.
        cands[order[0].index()].load = 2.0;
        let c = choose_agent(&order, &cands, load_limit(&cands, 1.5)).unwrap();
        assert_eq!(c.id, order[0]);
    }

    #[test]
    fn equal_replicas_take_turns() {
        let cands: Vec<Candidate> = (0..3).map(|i| Candidate { id: id(i), load: 0.0 }).collect();
        let picks: std::collections::HashSet<_> = (0..3).map(|s| choose_fallback(&cands, s).unwrap().id).collect();
        assert_eq!(picks.len(), 3);
        assert_eq!(choose_fallback(&cands, 0).unwrap().reason, Reason::Fallback);
        assert!(choose_fallback(&[], 0).is_none());
    }
}
