//! [`Tier`] for [`RemoteTier`]: what the engine thread does, never waiting
//! on the network. Presence and "known" are answered from the tier's own
//! sets, writes and reads are queued for its threads.

use std::collections::BTreeMap;
use std::time::Instant;

use kv::BlockKey;

use super::{Commit, ReadJob, RemoteTier, WriteJob};
use crate::manifest::{AgentManifest, ManifestId};
use crate::record::{GroupId, RecordKey, Reject};
use crate::tier::{Done, LoadTask, Loading, QueueFull, Stored, Tier, TierEvent, TierSnapshot};

/// Groups `tasks` by load, each in index order (a load's chain).
fn chains(tasks: Vec<LoadTask>) -> Vec<Vec<LoadTask>> {
    let mut by_load: BTreeMap<u64, Vec<LoadTask>> = BTreeMap::new();
    for t in tasks {
        by_load.entry(t.load).or_default().push(t);
    }
    by_load
        .into_values()
        .map(|mut c| {
            c.sort_by_key(|t| t.index);
            c
        })
        .collect()
}

/// A chain in `readers` consecutive parts when each gets at least
/// [`SPLIT_BLOCKS`](super::SPLIT_BLOCKS) blocks; whole otherwise.
fn split(mut chain: Vec<LoadTask>, readers: usize) -> Vec<Vec<LoadTask>> {
    let parts = readers.min(chain.len() / super::SPLIT_BLOCKS).max(1);
    let per = chain.len().div_ceil(parts);
    let mut out = Vec::with_capacity(parts);
    while chain.len() > per {
        let rest = chain.split_off(per);
        out.push(chain);
        chain = rest;
    }
    out.push(chain);
    out
}

impl Tier for RemoteTier {
    fn name(&self) -> &'static str {
        "remote"
    }

    fn durable(&self) -> bool {
        true
    }

    fn keeps_first_copy(&self) -> bool {
        true
    }

    fn shared(&self) -> bool {
        true
    }

    fn takes_evictions(&self) -> bool {
        self.shared.limits.take_evictions
    }

    /// Blocks this process wrote or read within the TTL (what it can vouch
    /// for; [`Tier::holds`] presumes every block).
    fn confirmed(&self, keys: &[RecordKey]) -> Vec<bool> {
        self.known(keys)
    }

    fn fetch_agent(&mut self, agent: ManifestId) -> bool {
        if self.shared.state().stats.degraded.is_some() {
            return false;
        }
        self.shared.reads.push(ReadJob::Agent(agent), 0, None).is_ok()
    }

    fn holds(&self, keys: &[RecordKey]) -> Vec<bool> {
        let mut s = self.shared.state();
        if s.stats.degraded.is_some() {
            return vec![false; keys.len()];
        }
        let now = Instant::now();
        let out: Vec<bool> = keys.iter().map(|k| !s.negative.contains(k, now)).collect();
        s.stats.negative_cache_hits += out.iter().filter(|&&h| !h).count() as u64;
        out
    }

    fn load(&mut self, tasks: Vec<LoadTask>) -> Loading {
        let readers = self.shared.limits.readers.max(1);
        for chain in chains(tasks).into_iter().flat_map(|c| split(c, readers)) {
            if let Err(ReadJob::Chain(chain)) = self.shared.reads.push(ReadJob::Chain(chain), 0, None) {
                for t in chain {
                    let reason = "the remote tier is shutting down".to_string();
                    (self.shared.sink)(TierEvent::Loaded {
                        load: t.load,
                        index: t.index,
                        result: Err(Reject::Unreadable(reason)),
                    });
                }
            }
        }
        Loading::Queued
    }

    fn store(&mut self, group: GroupId, key: BlockKey, payload: Vec<u8>) -> Stored {
        let rk = RecordKey::new(group, key.hash);
        {
            let mut s = self.shared.state();
            let now = Instant::now();
            if s.known.contains(&rk, now) {
                return Stored::Known;
            }
            if s.stats.degraded.is_some() {
                s.stats.dropped_writes += 1;
                return Stored::Dropped;
            }
            s.known.insert(rk, now);
        }
        let bytes = payload.len() as u64;
        match self.shared.push(WriteJob::Block { group, key, payload }, bytes, Some(self.shared.limits.queue_bytes)) {
            Ok(_) => Stored::Queued,
            Err(_) => {
                let mut s = self.shared.state();
                s.known.remove(&rk);
                s.stats.dropped_writes += 1;
                Stored::Dropped
            }
        }
    }

    fn known(&self, keys: &[RecordKey]) -> Vec<bool> {
        let s = self.shared.state();
        let now = Instant::now();
        keys.iter().map(|k| s.known.contains(k, now)).collect()
    }

    /// Refused ([`QueueFull`]) while the tier is degraded, as when its queue
    /// is full: the engine keeps the agent and tries again.
    fn commit(
        &mut self,
        manifest: AgentManifest,
        blocks: Vec<(GroupId, BlockKey, Vec<u8>)>,
        _ended: Instant,
    ) -> std::result::Result<(), QueueFull> {
        // Claim the blocks not known yet; the others are skipped (and must
        // not be unclaimed below).
        let (blocks, keys): (Vec<_>, Vec<RecordKey>) = {
            let mut s = self.shared.state();
            if s.stats.degraded.is_some() {
                s.stats.dropped_writes += blocks.len() as u64 + 1;
                return Err(QueueFull);
            }
            let now = Instant::now();
            blocks
                .into_iter()
                .map(|b| {
                    let k = RecordKey::new(b.0, b.1.hash);
                    (b, k)
                })
                .filter(|(_, k)| s.known.insert(*k, now))
                .unzip()
        };
        let bytes: u64 = blocks.iter().map(|b| b.2.len() as u64).sum();
        // As the disk tier: a commit with blocks must fit unless the queue
        // is empty (a single huge commit still goes).
        let limit = (bytes > 0 && !self.shared.writes.is_empty()).then_some(self.shared.limits.queue_bytes);
        if self.shared.push(WriteJob::Commit(Box::new(Commit { manifest, blocks })), bytes, limit).is_ok() {
            return Ok(());
        }
        let mut s = self.shared.state();
        for k in &keys {
            s.known.remove(k);
        }
        Err(QueueFull)
    }

    /// Deletes the agent's manifest only: other replicas' agents may name
    /// the same blocks, which expire by TTL. `blocks` is not needed.
    fn forget(&mut self, agent: ManifestId, _blocks: &[RecordKey], done: Done) {
        if let Err(WriteJob::Delete { done, .. }) = self.shared.push(WriteJob::Delete { id: agent, done }, 0, None) {
            done(Err("the remote tier is shutting down".into()));
        }
    }

    fn durable_turns(&self, agent: &ManifestId) -> Option<u64> {
        self.shared.state().durable.get(agent).copied()
    }

    /// The store's contents are not counted here (other replicas write to
    /// it, and its TTL evicts): `blocks`, `bytes` and `budget` are 0.
    fn snapshot(&self) -> TierSnapshot {
        let r = self.stats();
        TierSnapshot {
            name: "remote",
            blocks: 0,
            bytes: 0,
            budget: 0,
            degraded: r.degraded.clone(),
            disk: None,
            remote: Some(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv::Namespace;

    fn tasks(n: usize) -> Vec<LoadTask> {
        let ns = Namespace::new(b"m", b"");
        (0..n)
            .map(|i| LoadTask { load: 1, index: i, group: 0, expected: BlockKey::new(ns, None, &[i as u32]) })
            .collect()
    }

    #[test]
    fn a_long_chain_is_split_in_order_among_the_readers_and_a_short_one_is_not() {
        let short = split(tasks(super::super::SPLIT_BLOCKS * 2 - 1), 2);
        assert_eq!(short.len(), 1);
        let parts = split(tasks(257), 2);
        assert_eq!(parts.iter().map(Vec::len).collect::<Vec<_>>(), vec![129, 128]);
        let order: Vec<usize> = parts.iter().flatten().map(|t| t.index).collect();
        assert_eq!(order, (0..257).collect::<Vec<_>>(), "consecutive parts, every task once");
        assert_eq!(split(tasks(257), 1).len(), 1);
    }
}
