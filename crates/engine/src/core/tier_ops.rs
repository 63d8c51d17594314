//! The scheduler's use of the KV tiers (`tiers` crate): where evicted
//! blocks go, how a prefix lookup continues past the pool, loads, durable
//! agents. Same state machine as `core.rs` (one thread owns it). The tiers
//! are one ordered list (`Tiering::list`: RAM, disk, ...), walked the same
//! way whatever they are.
//!
//! * **Down**: every block the pool evicts is exported (the `kv` crate
//!   reports it before the block is written again) and offered to the
//!   first tier; what a tier pushes out to stay in its budget is offered to
//!   the next (RAM's overflow is queued for the disk), and what the last
//!   tier cannot keep is dropped and counted.
//! * **Up**: at admission the block chain continues past the pool; each
//!   next block is asked of the first tier that holds it, up to the first
//!   block none holds (or one another producer is bringing in). The
//!   leading run from tiers that answer at once (RAM) is taken out and
//!   imported into fresh pool blocks at once (a memcpy each), then
//!   published.
//! * **Up, queued**: the rest of the run is loaded if the cost model says
//!   loading beats recomputing: the request's sequence gets blocks for
//!   them, the request waits in `loading` while the tiers' threads read and
//!   verify the records, and other requests keep stepping. When all reads
//!   are back (or the deadline, the estimated recompute time, passes) the
//!   verified prefix of them is imported and published, the rest is cut
//!   and recomputed, and the request runs. Requests meeting those blocks
//!   meanwhile wait for the load (pending blocks) rather than loading them
//!   twice.
//! * **Agents**: after each finished turn the agent's manifest and the
//!   blocks of its conversation a durable tier does not have yet are queued
//!   for a commit to it; a full queue defers the commit (retried). Agents
//!   are restored from their manifests at start. Deleting an agent removes
//!   its blocks nobody else uses from every tier and its manifests.
//! * **Tails**: the conversation's partial last block goes with the
//!   commit as the manifest's tail (`tiers::manifest`), a block key of
//!   fewer tokens. At admission, a chain from the tiers that reaches the
//!   agent's tail position ends with the tail when the prompt continues its
//!   tokens (`agent_tail`): the load imports it like any block and marks
//!   only its tokens computed, so a restored agent prefills only its new
//!   tokens. It is never published nor registered as pending for others.

use std::time::{Duration, Instant, SystemTime};

use kv::{BlockHash, BlockId, BlockKey, BlockStorage, Evicted, Namespace, PrefixHashes, SeqId};
use tiers::{AgentManifest, LoadTask, Loading, ManifestId, ManifestRetention, Payload, RecordKey, Reject, Stored};
use tiers::{Tier, TierEvent};

use crate::kv_events::{KvEventKind, KvEvents};

use super::{Active, EngineCore};
use crate::agents::{AgentKey, BlockLocations, Retention};
use crate::request::{AgentId, RequestId, TenantId};
use crate::tiering::{Load, LoadPolicy, ProducerId, TierStats, Tiering};

/// The one layer group of a uniform model. (A hybrid model will have one
/// per attention kind; records and chain lookups already carry it.)
const GROUP: tiers::GroupId = 0;

/// How often a deferred agent commit is retried at most.
const COMMIT_RETRY: Duration = Duration::from_millis(100);

/// What the tiers added to a request's reused prefix.
pub(crate) enum TierReuse {
    /// This many more tokens are in its sequence now (from tiers that
    /// answer at once).
    Extended(usize),
    /// Its next block is on its way into the pool: wait for that producer.
    Blocked((ProducerId, kv::BlockHash)),
    /// Blocks are being loaded into its sequence from queued tiers.
    Loading,
}

/// Keeps the payloads of blocks the pool evicted (see the module doc).
/// Called before anything writes to those blocks again.
pub(super) fn stash(tiers: &mut Tiering, storage: &mut dyn BlockStorage, evicted: Vec<Evicted>) {
    if !tiers.enabled() {
        return;
    }
    let started = Instant::now();
    let len = storage.block_bytes();
    for e in evicted {
        let mut payload = vec![0u8; len];
        if let Err(err) = storage.export_block(e.block, &mut payload) {
            tracing::warn!(error = %err, "cannot export an evicted block; it is dropped");
            tiers.counters.dropped += 1;
            continue;
        }
        offer(tiers, 0, key_payload(e.key, payload));
    }
    tiers.counters.stash_seconds += started.elapsed().as_secs_f64();
}

/// Keeps a block that came back from a queued tier in the first tier (RAM)
/// and those below it, as the pool's evictions are kept.
pub(super) fn keep_in_first(tiers: &mut Tiering, key: BlockKey, payload: Payload) {
    tiers.counters.prefetched += 1;
    offer(tiers, 0, key_payload(key, payload.bytes().to_vec()));
}

fn key_payload(key: BlockKey, payload: Vec<u8>) -> tiers::Overflow {
    tiers::Overflow { group: GROUP, key, payload }
}

/// Offers a block to tier `first`, what that tier pushes out to the next,
/// and so on down the list; what no tier keeps is counted as dropped.
/// Every block a tier takes or lets go is told as a KV event.
fn offer(tiers: &mut Tiering, first: usize, block: tiers::Overflow) {
    let Tiering { list, counters, events, partial_evictions, .. } = tiers;
    let mut told = Vec::new();
    let mut moving = vec![block];
    for (t, tier) in list.iter_mut().enumerate().skip(first) {
        if !tier.takes_evictions() || (*partial_evictions && tier.keeps_first_copy()) {
            continue;
        }
        let name = tier.name();
        let mut next = Vec::new();
        for b in moving {
            let hash = b.key.hash;
            match tier.store(b.group, b.key, b.payload) {
                Stored::Kept(out) => {
                    counters.tiers[t].stored += 1;
                    told.push((KvEventKind::Stored, name, Some(hash), None));
                    told.extend(out.iter().map(|o| (KvEventKind::Removed, name, Some(o.key.hash), None)));
                    next.extend(out);
                }
                Stored::Queued => {
                    counters.tiers[t].stored += 1;
                    told.push((KvEventKind::Stored, name, Some(hash), None));
                }
                Stored::Known => {}
                Stored::Dropped => counters.dropped += 1,
            }
        }
        moving = next;
        if moving.is_empty() {
            break;
        }
    }
    counters.dropped += moving.len() as u64;
    events.push(told);
}

/// The key of block `i` of a prompt whose chained hashes are `hashes`.
fn block_key(ns: Namespace, hashes: &[BlockHash], tokens: &[u32], i: usize, bs: usize) -> BlockKey {
    BlockKey {
        hash: hashes[i],
        parent: i.checked_sub(1).map(|p| hashes[p]),
        ns,
        tokens: tokens[i * bs..(i + 1) * bs].into(),
    }
}

/// Tokens `keys` cover: a block each, the last one perhaps a tail.
fn tokens_of(keys: &[BlockKey]) -> usize {
    keys.iter().map(|k| k.tokens.len()).sum()
}

fn manifest_retention(r: Retention) -> ManifestRetention {
    match r {
        Retention::Evictable => ManifestRetention::Evictable,
        Retention::Pinned => ManifestRetention::Pinned,
        Retention::Ttl(ttl) => ManifestRetention::Ttl { seconds: ttl.as_secs().max(1) },
    }
}

/// Asks each tier that `pick` accepts for its part of a load: the tasks of
/// the blocks read from it. Results of tiers that answer at once go into
/// `results`; the others come back as [`TierEvent::Loaded`].
fn dispatch(
    list: &mut [Box<dyn Tier>],
    events: &KvEvents,
    load: u64,
    expected: &[BlockKey],
    from: &[usize],
    results: &mut [Option<Result<Payload, Reject>>],
    pick: impl Fn(&dyn Tier) -> bool,
) {
    for (t, tier) in list.iter_mut().enumerate() {
        if !pick(tier.as_ref()) {
            continue;
        }
        let tasks: Vec<LoadTask> = expected
            .iter()
            .zip(from)
            .enumerate()
            .filter(|(_, (_, f))| **f == t)
            .map(|(index, (k, _))| LoadTask { load, index, group: GROUP, expected: k.clone() })
            .collect();
        if tasks.is_empty() {
            continue;
        }
        let indices: Vec<usize> = tasks.iter().map(|t| t.index).collect();
        if let Loading::Done(done) = tier.load(tasks) {
            // A tier answering at once hands its blocks over: they left it.
            let left = indices.iter().zip(&done).filter(|(_, r)| r.is_ok());
            events.push(left.map(|(&i, _)| (KvEventKind::Removed, tier.name(), Some(expected[i].hash), None)));
            for (i, r) in indices.into_iter().zip(done) {
                results[i] = Some(r);
            }
        }
    }
}

/// How many of the blocks read from tiers `from` (one entry per block) each
/// queued tier serves: what the cost model weighs (tiers answering at once
/// cost nothing to wait for).
fn queued_per_tier(list: &[Box<dyn Tier>], from: &[usize]) -> Vec<usize> {
    let mut per_tier = vec![0; list.len()];
    for &t in from {
        if !list[t].at_once() {
            per_tier[t] += 1;
        }
    }
    per_tier
}

/// Gives blocks a tier handed over at once (`results[j]`, read from tier
/// `from[j]`), but that did not go into the pool, back to their tiers.
fn give_back(
    tiers: &mut Tiering,
    expected: &[BlockKey],
    from: &[usize],
    results: Vec<Option<Result<Payload, Reject>>>,
    skip: usize,
) {
    for (j, r) in results.into_iter().enumerate().skip(skip) {
        if let (true, Some(Ok(p))) = (tiers.list[from[j]].at_once(), r) {
            let block = key_payload(expected[j].clone(), p.bytes().to_vec());
            offer(tiers, from[j], block);
        }
    }
}

impl EngineCore {
    fn block_size(&self) -> usize {
        self.cache.spec().block_size()
    }

    /// Keeps what the cache evicted since the last call (after an append
    /// outside a model step, before anything is imported).
    pub(super) fn stash_evicted(&mut self) {
        let evicted = self.cache.take_evicted();
        if !evicted.is_empty() {
            stash(&mut self.tiers, self.model.storage(), evicted);
        }
    }

    /// Continues `seq` (holding the pool's part of `a`'s prompt) with what
    /// the tiers hold: see the module doc. Takes no more blocks than the
    /// pool and the tenant's quota have next to the step's `plan`, so
    /// bringing a prefix back never starves running requests.
    pub(super) fn extend_from_tiers(
        &mut self,
        a: &mut Active,
        seq: SeqId,
        hashes: &PrefixHashes,
        plan: &[(usize, usize)],
    ) -> TierReuse {
        let bs = self.block_size();
        let Ok(len) = self.cache.seq_len(seq) else { return TierReuse::Extended(0) };
        if len % bs != 0 {
            // The agent's own sequence, cut inside a block: the pool has
            // everything the tiers could add before that cut.
            return TierReuse::Extended(0);
        }
        let ns = self.namespace(&a.req.req.tenant);
        // Only the last window's blocks come back with their pages
        // (`import_blocks`): pages limit how many blocks come back only
        // when fewer than a window's are free (blocks without their window
        // would be cut away again).
        let planned = self.plan_cost(plan);
        let window = self.model.window_blocks();
        let mut room = self.cache.stats().available_blocks().saturating_sub(planned);
        if let (Some(free), Some(window)) = (self.free_pages(), window) {
            let spare = free.saturating_sub(planned);
            if spare < window {
                room = room.min(spare);
            }
        }
        if let Some((quota, need)) = self.quota_need(&a.owner, plan, 0) {
            let window = self.charge(0, window.unwrap_or(0));
            room = room.min((quota as usize).saturating_sub(need.saturating_add(window)));
        }
        // Runs from tiers that answer at once go in now; then the walk is
        // redone from where they end, since what the import evicted from
        // the pool may have pushed blocks of this chain down a tier.
        let start = len / bs;
        let (mut promoted, mut tokens) = (0, 0);
        let (keys, from) = loop {
            let (keys, from) = self.find_run(a, ns, hashes, start + promoted, room - promoted);
            let lead = from.iter().take_while(|&&t| self.tiers.list[t].at_once()).count();
            if lead == 0 {
                break (keys, from);
            }
            let took = self.take_now(a, seq, (start + promoted) * bs, &keys[..lead], &from[..lead]);
            promoted += took;
            tokens += tokens_of(&keys[..took]);
            if took < lead || keys[..took].last().is_some_and(|k| k.tokens.len() < bs) {
                // Not all came in (no room after all, or a miss): the rest
                // of the prompt is computed. Or the tail came in: nothing
                // follows it.
                return TierReuse::Extended(tokens);
            }
        };
        let next = start + promoted;
        // The next block, or the agent's tail there, on its way in (a
        // prefetch): wait for it.
        let tail = self.agent_tail(a, ns, hashes, next).map(|k| k.hash);
        for h in hashes.hashes().get(next).copied().into_iter().chain(tail) {
            if let Some(p) = self.tiers.pending.producer_of(&h) {
                return TierReuse::Blocked((p, h));
            }
        }
        if self.start_load(a, seq, next * bs, keys, &from) {
            return TierReuse::Loading;
        }
        TierReuse::Extended(tokens)
    }

    /// The agent's stored tail (`Agent::tail`) if `a`'s prompt continues
    /// it at block `at`: its parent is the prompt's block before, its
    /// tokens the prompt's next ones, and at least one prompt token is
    /// left to compute after it.
    fn agent_tail(&self, a: &Active, ns: Namespace, hashes: &PrefixHashes, at: usize) -> Option<BlockKey> {
        let (k, key) = a.agent.as_ref().and_then(|k| self.agents.get(k))?.tail.as_ref()?;
        let from = at * self.block_size();
        let fits = from + key.tokens.len() < a.tokens.len();
        let parent = at.checked_sub(1).map(|p| hashes.hashes().get(p).copied());
        let same = *k == at && key.ns == ns && parent.is_none_or(|p| p == key.parent) && fits;
        (same && a.tokens[from..from + key.tokens.len()] == *key.tokens).then(|| key.clone())
    }

    /// The run of blocks from block `start` on (at most `room`) that the
    /// tiers hold ([`Self::find_in_tiers`]), ended by the agent's tail if
    /// the run reaches it: their keys and the tier of each.
    fn find_run(
        &self,
        a: &Active,
        ns: Namespace,
        hashes: &PrefixHashes,
        start: usize,
        room: usize,
    ) -> (Vec<BlockKey>, Vec<usize>) {
        let (hs, bs) = (hashes.hashes(), self.block_size());
        let mut from = self.find_in_tiers(hs, start, room);
        let mut keys: Vec<BlockKey> =
            (start..start + from.len()).map(|i| block_key(ns, hs, &a.tokens, i, bs)).collect();
        let next = start + from.len();
        if from.len() < room {
            if let Some(tail) = self.agent_tail(a, ns, hashes, next) {
                let rk = [RecordKey::new(GROUP, tail.hash)];
                let pending = self.tiers.pending.producer_of(&tail.hash).is_some();
                if let Some(t) = self.tiers.list.iter().position(|t| t.holds(&rk) == [true]).filter(|_| !pending) {
                    from.push(t);
                    keys.push(tail);
                }
            }
        }
        (keys, from)
    }

    /// For the blocks from `start` on (at most `room`), the first tier that
    /// holds each, up to the first block no tier holds or another producer
    /// is bringing in.
    fn find_in_tiers(&self, hs: &[BlockHash], start: usize, room: usize) -> Vec<usize> {
        let end = hs.len().min(start.saturating_add(room));
        if start >= end || self.tiers.list.is_empty() {
            return Vec::new();
        }
        let keys: Vec<RecordKey> = hs[start..end].iter().map(|h| RecordKey::new(GROUP, *h)).collect();
        let held: Vec<Vec<bool>> = self.tiers.list.iter().map(|t| t.holds(&keys)).collect();
        let pending = &self.tiers.pending;
        (0..keys.len())
            .map_while(|i| {
                if pending.producer_of(&hs[start + i]).is_some() {
                    return None;
                }
                held.iter().position(|h| h.get(i).copied().unwrap_or(false))
            })
            .collect()
    }

    /// Imports the blocks `keys` (the sequence's next ones, from token
    /// `at`) that tiers answering at once hold (`from[j]`: the tier of
    /// `keys[j]`); returns how many went in. Blocks that do not fit stay
    /// where they were.
    fn take_now(&mut self, a: &mut Active, seq: SeqId, at: usize, keys: &[BlockKey], from: &[usize]) -> usize {
        if from.is_empty() {
            return 0;
        }
        let bs = self.block_size();
        let started = Instant::now();
        let n = from.len();
        let len = tokens_of(keys);
        // Taken out first, so what the append evicts into the same tiers
        // cannot push them further down meanwhile.
        let mut results: Vec<Option<Result<Payload, Reject>>> = (0..n).map(|_| None).collect();
        dispatch(&mut self.tiers.list, &self.tiers.events, 0, keys, from, &mut results, |_| true);
        let Ok(appended) = self.cache.append(seq, &a.tokens[at..at + len]) else {
            // No room or quota for them now: they go back.
            give_back(&mut self.tiers, keys, from, results, 0);
            return 0;
        };
        // The append may have evicted blocks it now reuses: keep their
        // payloads before importing over them.
        self.stash_evicted();
        let blocks: Vec<BlockId> = (0..n).map(|j| appended.slots[j * bs].block).collect();
        let verified: Vec<&[u8]> =
            results.iter().map_while(|r| r.as_ref()?.as_ref().ok().map(Payload::bytes)).collect();
        let imported = self.import_blocks(&blocks[..verified.len()], verified.into_iter());
        let upto = at + tokens_of(&keys[..imported]);
        let _ = self.cache.mark_computed(seq, upto);
        if imported < n {
            let _ = self.cache.truncate(seq, upto);
        }
        // Taken but not imported (a miss before them, or an import that
        // failed): back where they came from.
        give_back(&mut self.tiers, keys, from, results, imported);
        self.count_tier_hits(a, at, &keys[..imported], &from[..imported]);
        self.tiers.counters.promote_seconds += started.elapsed().as_secs_f64();
        imported
    }

    /// Counts blocks brought into `a`'s sequence from tiers (`keys[j]`
    /// from tier `from[j]`, the first after token `base`): hit tokens
    /// (counted when the request is admitted, as it may not be now) and
    /// moves.
    fn count_tier_hits(&mut self, a: &mut Active, base: usize, keys: &[BlockKey], from: &[usize]) {
        let prompt = a.req.prompt.len();
        let mut first = base;
        for (k, &t) in keys.iter().zip(from) {
            a.tier_hits.add(t, k.tokens.len().min(prompt.saturating_sub(first)));
            first += k.tokens.len();
            self.tiers.counters.tiers[t].to_pool += 1;
        }
    }

    /// Starts loading the blocks `keys` (the sequence's next ones, from
    /// token `at`) that the tiers hold (`from[j]`: the tier of `keys[j]`),
    /// if that beats recomputing them; true if a load started.
    fn start_load(&mut self, a: &Active, seq: SeqId, at: usize, keys: Vec<BlockKey>, from: &[usize]) -> bool {
        let bs = self.block_size();
        let n = from.len();
        if n == 0 {
            return false;
        }
        let len = tokens_of(&keys);
        let per_tier = queued_per_tier(&self.tiers.list, from);
        let (load_time, compute_time) = (self.tiers.costs.load_time(&per_tier), self.tiers.costs.compute_time(len));
        let budget = match self.tiers.policy {
            LoadPolicy::Measured if load_time >= compute_time => {
                self.tiers.counters.loads_skipped += 1;
                return false;
            }
            // Past the time recomputing would take, the load has lost.
            LoadPolicy::Measured => compute_time + Duration::from_millis(100),
            LoadPolicy::Always { deadline } => deadline,
        };
        let id = self.tiers.next_producer();
        // Blocks of tiers that answer at once are taken before the append
        // (see `take_now`); the queued tiers are asked once the pool
        // blocks exist.
        let mut results: Vec<Option<Result<Payload, Reject>>> = (0..n).map(|_| None).collect();
        dispatch(&mut self.tiers.list, &self.tiers.events, id, &keys, from, &mut results, |t| t.at_once());
        let Ok(appended) = self.cache.append(seq, &a.tokens[at..at + len]) else {
            give_back(&mut self.tiers, &keys, from, results, 0);
            return false;
        };
        self.stash_evicted();
        let blocks: Vec<BlockId> = (0..n).map(|j| appended.slots[j * bs].block).collect();
        // Others may wait for its full blocks (a tail is the agent's own).
        let full: Vec<BlockHash> = keys.iter().filter(|k| k.tokens.len() == bs).map(|k| k.hash).collect();
        self.tiers.pending.register(id, at / bs, &full);
        let now = Instant::now();
        let mut load = Load {
            request: a.id,
            seq,
            base: at,
            keys,
            blocks,
            from: from.to_vec(),
            results,
            started: now,
            deadline: now + budget,
        };
        dispatch(&mut self.tiers.list, &self.tiers.events, id, &load.keys, from, &mut load.results, |t| !t.at_once());
        self.tiers.loads.insert(id, load);
        true
    }

    /// A report from the thread of the tier at position `tier`.
    pub(crate) fn on_tier_event(&mut self, tier: usize, ev: TierEvent) {
        match ev {
            TierEvent::Loaded { load, index, result } => {
                let Err(result) = self.on_prefetched(load, index, result) else { return };
                // A load already finished (deadline) or abandoned: stale.
                let Some(l) = self.tiers.loads.get_mut(&load) else { return };
                if let Some(slot) = l.results.get_mut(index) {
                    *slot = Some(result);
                }
                if l.complete() {
                    self.finish_load(load, false);
                }
            }
            TierEvent::Evicted { gone, blocks } => {
                let name = self.tiers.list.get(tier).map_or("?", |t| t.name());
                self.tiers.events.push(gone.iter().map(|k| (KvEventKind::Removed, name, Some(k.hash), None)));
                for b in blocks {
                    offer(&mut self.tiers, tier + 1, b);
                }
            }
            TierEvent::Agent { agent, manifest } => self.on_agent_manifest(agent, manifest.map(|m| *m)),
            TierEvent::CommitFailed { agent, retry } => {
                let key =
                    self.agents.keys().find(|k| ManifestId::of(k.tenant.as_str(), k.id.as_str()) == agent).cloned();
                // A failing tier: retried once it resumes. A tier full of
                // pinned records: not (the next turn tries again).
                if let Some(ag) = key.and_then(|k| self.agents.get_mut(&k)) {
                    ag.dirty |= 1 << tier;
                    ag.retry_commit = retry;
                }
            }
        }
    }

    /// Imports `payloads` into a sequence's last `blocks`, in order, until one
    /// fails; returns how many went in. On a hybrid model only the blocks
    /// the sequence's next window reads (the last
    /// [`model::Model::window_blocks`]) take a page for their sliding K/V:
    /// a long history comes back with one window's pages, not one per block.
    fn import_blocks<'p>(&mut self, blocks: &[BlockId], payloads: impl Iterator<Item = &'p [u8]>) -> usize {
        self.protect_windows();
        let keep_from = blocks.len().saturating_sub(self.model.window_blocks().unwrap_or(blocks.len()));
        let mut imported = 0;
        for (j, (&block, p)) in blocks.iter().zip(payloads).enumerate() {
            let done = if j >= keep_from {
                self.model.storage().import_block(block, p)
            } else {
                self.model.import_block_outside_window(block, p)
            };
            if done.is_err() {
                break;
            }
            imported += 1;
        }
        imported
    }

    /// Imports what a load brought (its verified prefix), publishes it, cuts
    /// the rest, and lets the request run.
    fn finish_load(&mut self, id: ProducerId, timed_out: bool) {
        let Some(load) = self.tiers.loads.remove(&id) else { return };
        self.tiers.pending.resolve(id);
        let Some(i) = self.loading.iter().position(|a| a.id == load.request) else {
            give_back(&mut self.tiers, &load.keys, &load.from, load.results, 0);
            return;
        };
        let mut a = self.loading.swap_remove(i);
        let verified: Vec<&[u8]> =
            load.results.iter().map_while(|r| r.as_ref()?.as_ref().ok().map(|p| p.bytes())).collect();
        if let Some(Some(Err(reject))) = load.results.get(verified.len()) {
            if reject.is_corrupt() {
                self.tiers.counters.load_rejects += 1;
            }
        }
        let imported = self.import_blocks(&load.blocks[..verified.len()], verified.into_iter());
        let upto = load.base + tokens_of(&load.keys[..imported]);
        let _ = self.cache.mark_computed(load.seq, upto);
        let _ = self.cache.truncate(load.seq, upto);
        let upto = self.cut_to_usable(load.seq, upto);
        let took = load.started.elapsed();
        self.count_tier_hits(&mut a, load.base, &load.keys[..imported], &load.from[..imported]);
        // Rates from what came in (a miss ends a chain early and says
        // nothing of how fast the rest would have come).
        let per_tier = queued_per_tier(&self.tiers.list, &load.from[..imported]);
        give_back(&mut self.tiers, &load.keys, &load.from, load.results, imported);
        let c = &mut self.tiers.counters;
        c.load_latency.observe(took);
        if timed_out {
            c.load_timeouts += 1;
        }
        self.tiers.costs.loaded(&per_tier, took);
        self.count_admission(&mut a, upto);
        a.events.admitted();
        a.progressed = Instant::now();
        self.running.push(a);
    }

    /// Finishes loads past their deadline with what they have.
    pub(super) fn expire_loads(&mut self, now: Instant) {
        let late: Vec<ProducerId> =
            self.tiers.loads.iter().filter(|(_, l)| now >= l.deadline).map(|(id, _)| *id).collect();
        for id in late {
            self.finish_load(id, true);
        }
    }

    /// Forgets the load of a request that ended (its sequence goes with
    /// it; late reads are ignored). Blocks a tier handed over at once go
    /// back to it.
    pub(super) fn abandon_load(&mut self, request: RequestId) {
        let Some(id) = self.tiers.loads.iter().find(|(_, l)| l.request == request).map(|(id, _)| *id) else { return };
        let Some(load) = self.tiers.loads.remove(&id) else { return };
        self.tiers.pending.resolve(id);
        give_back(&mut self.tiers, &load.keys, &load.from, load.results, 0);
    }

    /// Queues a durable commit of `key`'s latest turn to each durable tier:
    /// its manifest, and the blocks of its conversation the tier lacks
    /// (exported from the pool once, whichever tiers need them). A full
    /// queue (or a failing tier) defers it for that tier.
    pub(super) fn commit_agent(&mut self, key: &AgentKey, ended: Instant) {
        self.commit_agent_to(key, ended, u64::MAX);
    }

    /// [`Self::commit_agent`] to the durable tiers in `mask` (a bit per
    /// position in the tier list).
    fn commit_agent_to(&mut self, key: &AgentKey, ended: Instant, mask: u64) {
        let started = Instant::now();
        if !self.tiers.durable() {
            return;
        }
        let Some(ag) = self.agents.get(key) else { return };
        let ns = Namespace::new(self.model.fingerprint(), key.tenant.as_str().as_bytes());
        let bs = self.cache.spec().block_size();
        let chain = &ag.chain[..ag.chain.len().min(ag.tokens.len() / bs)];
        let records: Vec<RecordKey> = chain.iter().map(|h| RecordKey::new(GROUP, *h)).collect();
        // The blocks the agent's sequence holds, by position in the chain
        // (a sliding window may have released the first ones).
        let table = ag.seq.and_then(|s| self.cache.block_table(s).ok());
        let held = |i: usize| table.and_then(|t| t.blocks().get(i.checked_sub(t.first_block())?)).copied();
        /// One durable tier's part of the commit.
        struct Part {
            tier: usize,
            known: Vec<bool>,
            tail_known: bool,
            /// The tier keeps the first copy of a block for good: a block
            /// whose K/V is not whole (a hybrid model's, outside its
            /// window) must not reach it.
            whole_only: bool,
            blocks: Vec<(tiers::GroupId, BlockKey, Vec<u8>)>,
            named: usize,
            ended: bool,
        }
        // The partial block after the chain (the manifest's tail): the
        // tokens of a block not full yet, whose K/V a restored agent would
        // otherwise recompute. Only right after a whole chain, and only in
        // a record the size of a full block's.
        let computed = ag.seq.and_then(|s| self.cache.computed(s).ok()).unwrap_or(0).min(ag.tokens.len());
        let tail = (computed / bs == chain.len()
            && computed % bs != 0
            && tiers::record::header_len(computed % bs) == tiers::record::header_len(bs))
        .then(|| BlockKey::new(ns, chain.last().copied(), &ag.tokens[chain.len() * bs..computed]));
        let tail_record = tail.as_ref().map(|k| RecordKey::new(GROUP, k.hash));
        let mut parts: Vec<Part> = (0..self.tiers.list.len())
            .filter(|&t| self.tiers.list[t].durable() && mask & (1 << t) != 0)
            .map(|tier| {
                let t = &self.tiers.list[tier];
                Part {
                    tier,
                    known: t.known(&records),
                    tail_known: tail_record.is_some_and(|k| t.known(&[k]) == [true]),
                    whole_only: t.keeps_first_copy(),
                    blocks: Vec::new(),
                    named: 0,
                    ended: false,
                }
            })
            .collect();
        let whole: Vec<bool> =
            (0..=records.len()).map(|i| held(i).is_some_and(|b| self.model.holds_window_kv(b))).collect();
        let storage = self.model.storage();
        let export = |i: usize| {
            let mut payload = vec![0u8; storage.block_bytes()];
            held(i).filter(|&b| storage.export_block(b, &mut payload).is_ok()).map(|_| payload)
        };
        // Each tier's manifest names the chain as far as the tier has it or
        // gets it with this commit: data first, so it never names a block
        // that was never written (a block released meanwhile ends the
        // chain there). A block is exported once, whichever tiers lack it.
        for (i, &whole) in whole[..records.len()].iter().enumerate() {
            let lacking = parts.iter().any(|p| !p.ended && !p.known[i]);
            let payload = lacking.then(|| export(i));
            for p in parts.iter_mut().filter(|p| !p.ended) {
                if p.known[i] {
                    p.named = i + 1;
                } else if p.whole_only && !whole {
                    p.ended = true;
                } else if let Some(Some(payload)) = &payload {
                    p.blocks.push((GROUP, block_key(ns, chain, &ag.tokens, i, bs), payload.clone()));
                    p.named = i + 1;
                } else {
                    p.ended = true;
                }
            }
        }
        // The tail goes where the whole chain went.
        let tail_whole = whole[records.len()];
        let mut tail_named = vec![false; parts.len()];
        if let Some(key) = &tail {
            let wanting = |p: &Part| p.named == records.len() && (tail_whole || !p.whole_only);
            let lacking = parts.iter().any(|p| wanting(p) && !p.tail_known);
            let payload = if lacking { export(records.len()) } else { None };
            for (p, named) in parts.iter_mut().zip(&mut tail_named) {
                if !wanting(p) {
                    continue;
                }
                if p.tail_known {
                    *named = true;
                } else if let Some(payload) = &payload {
                    p.blocks.push((GROUP, key.clone(), payload.clone()));
                    *named = true;
                }
            }
        }
        let manifest = AgentManifest {
            tenant: key.tenant.as_str().into(),
            agent: key.id.as_str().into(),
            ns,
            retention: manifest_retention(ag.retention),
            priority: ag.priority,
            turns: ag.turns,
            last_used_unix_ms: ag
                .last_used_wall
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            tokens: ag.tokens.clone(),
            blocks: Vec::new(),
            tail: None,
        };
        let mut deferred = 0u64;
        let mut tail_kept = false;
        for (p, named) in parts.into_iter().zip(tail_named) {
            let tail = tail_record
                .filter(|_| named)
                .map(|record| tiers::ManifestTail { record, tokens: (computed % bs) as u32 });
            let manifest = AgentManifest { blocks: records[..p.named].to_vec(), tail, ..manifest.clone() };
            let tier = &mut self.tiers.list[p.tier];
            // A tail is no block a router could look up: not told.
            let sent: Vec<BlockHash> =
                p.blocks.iter().map(|b| b.1.hash).filter(|h| tail_record.is_none_or(|t| t.hash != *h)).collect();
            if tier.commit(manifest, p.blocks, ended).is_err() {
                deferred |= 1 << p.tier;
            } else {
                tail_kept |= named;
                let name = tier.name();
                self.tiers.events.push(sent.into_iter().map(|h| (KvEventKind::Stored, name, Some(h), None)));
            }
        }
        if deferred != 0 {
            self.tiers.counters.commits_deferred += 1;
        }
        self.tiers.counters.commit_seconds += started.elapsed().as_secs_f64();
        if let Some(ag) = self.agents.get_mut(key) {
            ag.dirty = (ag.dirty & !mask) | deferred;
            ag.retry_commit = deferred != 0;
            if let Some(t) = tail.filter(|_| tail_kept) {
                ag.tail = Some((computed / bs, t));
            }
        }
    }

    /// Retries deferred commits (at most every [`COMMIT_RETRY`]), each to
    /// the tiers that lack it and are not failing now.
    pub(super) fn retry_commits(&mut self) {
        let now = Instant::now();
        if self.tiers.next_commit_retry.is_some_and(|t| t > now) {
            return;
        }
        let serving: u64 = (0..self.tiers.list.len())
            .filter(|&t| self.tiers.list[t].durable() && self.tiers.list[t].snapshot().degraded.is_none())
            .fold(0, |m, t| m | 1 << t);
        if serving == 0 {
            return;
        }
        self.tiers.next_commit_retry = Some(now + COMMIT_RETRY);
        for (key, dirty) in self.agents.dirty() {
            if dirty & serving != 0 {
                self.commit_agent_to(&key, now, dirty & serving);
            }
        }
    }

    /// Agents from the durable tiers' manifests, at start. Manifests that are
    /// unusable (ids this build refuses, another namespace) or whose TTL
    /// ran out while the server was down are deleted.
    pub(crate) fn restore_agents(&mut self, manifests: Vec<AgentManifest>) -> usize {
        let mut restored = 0;
        let now_wall = SystemTime::now();
        for m in manifests {
            let ids = (TenantId::new(&m.tenant), AgentId::new(&m.agent));
            let (Ok(tenant), Ok(agent)) = ids else {
                self.delete_manifest(m.id());
                continue;
            };
            let ns = self.namespace(&tenant);
            // The chain must be the addresses of the manifest's own tokens
            // (which also bounds it by them): a manifest that passed its
            // checksum but disagrees with itself is not trusted.
            let computed = PrefixHashes::compute(ns, &m.tokens, self.block_size());
            let chain: Vec<BlockHash> = m.blocks.iter().filter(|k| k.group == GROUP).map(|k| k.hash).collect();
            if m.ns != ns || !computed.hashes().starts_with(&chain) {
                tracing::warn!(tenant = %tenant, agent = %agent, "dropping an agent manifest that does not match its tokens");
                self.delete_manifest(m.id());
                continue;
            }
            // Its tail must be the partial block right after that chain,
            // of the manifest's own tokens; otherwise it is ignored (the
            // tokens are recomputed).
            let bs = self.block_size();
            let tail = m.tail.and_then(|t| {
                let (at, n) = (chain.len() * bs, t.tokens as usize);
                let tokens = m.tokens.get(at..at + n).filter(|_| n > 0 && n < bs && t.record.group == GROUP)?;
                let key = BlockKey::new(ns, chain.last().copied(), tokens);
                (key.hash == t.record.hash).then_some((chain.len(), key))
            });
            let last_wall = SystemTime::UNIX_EPOCH + Duration::from_millis(m.last_used_unix_ms);
            let age = now_wall.duration_since(last_wall).unwrap_or(Duration::ZERO);
            let retention = match m.retention {
                ManifestRetention::Evictable => Retention::Evictable,
                ManifestRetention::Pinned => Retention::Pinned,
                ManifestRetention::Ttl { seconds } => {
                    let ttl = Duration::from_secs(seconds);
                    if age >= ttl {
                        self.delete_manifest(m.id());
                        continue;
                    }
                    Retention::Ttl(ttl)
                }
            };
            let now = Instant::now();
            let ag = self.agents.entry(AgentKey::new(tenant, agent));
            ag.tokens = m.tokens;
            ag.chain = chain;
            ag.tail = tail;
            ag.retention = retention;
            ag.priority = m.priority;
            ag.turns = m.turns;
            ag.last_used = now.checked_sub(age).unwrap_or(now);
            ag.last_used_wall = last_wall;
            restored += 1;
        }
        self.tiers.counters.agents_restored += restored as u64;
        restored as usize
    }

    fn delete_manifest(&mut self, id: ManifestId) {
        for t in self.tiers.list.iter_mut().filter(|t| t.durable()) {
            t.forget(id, &[], Box::new(|_| {}));
        }
    }

    /// An agent is being forgotten: its blocks that no other agent of its
    /// tenant and no running request uses leave the pool's cache and every
    /// tier (with `keep_shared`, every tier but those other replicas share),
    /// and so do its manifests. `done` runs once that is durable (at once
    /// without a durable tier).
    pub(super) fn discard_agent(
        &mut self,
        key: &AgentKey,
        chain: &[BlockHash],
        keep_shared: bool,
        done: Option<tiers::Done>,
    ) {
        let done = done.unwrap_or_else(|| Box::new(|_| {}));
        if !self.tiers.enabled() {
            done(Ok(()));
            return;
        }
        let others: std::collections::HashSet<BlockHash> = self
            .agents
            .keys_of(&key.tenant)
            .iter()
            .filter(|k| *k != key)
            .filter_map(|k| self.agents.get(k))
            .flat_map(|ag| ag.chain.iter().copied())
            .collect();
        let mine: Vec<BlockHash> = chain.iter().copied().filter(|h| !others.contains(h)).collect();
        // Out of the pool's cache (blocks in use stay), never stashed.
        self.cache.evict_cached(&mine);
        let mine_set: std::collections::HashSet<&BlockHash> = mine.iter().collect();
        let others: Vec<Evicted> =
            self.cache.take_evicted().into_iter().filter(|e| !mine_set.contains(&e.key.hash)).collect();
        if !others.is_empty() {
            stash(&mut self.tiers, self.model.storage(), others);
        }
        let mut records: Vec<RecordKey> = mine.iter().map(|h| RecordKey::new(GROUP, *h)).collect();
        // Its tail is its own (a disk tier deletes it with the manifest).
        records
            .extend(self.agents.get(key).and_then(|ag| ag.tail.as_ref()).map(|(_, k)| RecordKey::new(GROUP, k.hash)));
        let id = ManifestId::of(key.tenant.as_str(), key.id.as_str());
        let here: Vec<&mut Box<dyn Tier>> =
            self.tiers.list.iter_mut().filter(|t| !(keep_shared && t.shared())).collect();
        let parts = tiers::split_done(done, here.len());
        for (t, part) in here.into_iter().zip(parts) {
            let held = t.confirmed(&records);
            let gone = records
                .iter()
                .zip(held)
                .filter(|(_, h)| *h)
                .map(|(k, _)| (KvEventKind::Removed, t.name(), Some(k.hash), None));
            self.tiers.events.push(gone);
            t.forget(id, &records, part);
        }
    }

    /// Whether block `i` of `ag`'s chain is in the pool: held by its
    /// sequence, or cached there.
    fn in_pool<'a>(&'a self, ag: &'a crate::agents::Agent) -> impl Fn(usize) -> bool + 'a {
        let table = ag.seq.and_then(|s| self.cache.block_table(s).ok());
        move |i| {
            table.is_some_and(|t| i >= t.first_block() && i < t.logical_len())
                || ag.chain.get(i).is_some_and(|h| self.cache.is_indexed(*h))
        }
    }

    /// Where an agent's blocks are now.
    pub(super) fn block_locations(&self, key: &AgentKey) -> BlockLocations {
        let Some(ag) = self.agents.get(key) else { return BlockLocations::default() };
        let in_pool = self.in_pool(ag);
        let pool = (0..ag.chain.len()).filter(|&i| in_pool(i)).count();
        let mut loc = BlockLocations { pool, ..BlockLocations::default() };
        let keys: Vec<RecordKey> = ag.chain.iter().map(|h| RecordKey::new(GROUP, *h)).collect();
        let id = ManifestId::of(key.tenant.as_str(), key.id.as_str());
        for t in &self.tiers.list {
            loc.tiers.insert(t.name(), t.confirmed(&keys).into_iter().filter(|&h| h).count());
            loc.durable |= t.durable_turns(&id) == Some(ag.turns);
        }
        loc
    }

    /// The prefix tree of `tenant`'s agents (`prefix_tree.rs`): each
    /// distinct block's place is the pool where the pool holds it (the
    /// agent's sequence, or cached), else the first tier that confirms it.
    pub(crate) fn prefix_tree(&self, tenant: &crate::TenantId) -> crate::PrefixTree {
        let keys = self.agents.keys_of(tenant);
        let agents: Vec<_> = keys.iter().filter_map(|k| self.agents.get(k).map(|ag| (k.id.clone(), ag))).collect();
        let chains: Vec<(crate::AgentId, &[kv::BlockHash])> =
            agents.iter().map(|(id, ag)| (id.clone(), ag.chain.as_slice())).collect();
        crate::prefix_tree::build(self.block_size(), &chains, |a, indices| {
            let ag = agents[a].1;
            let in_pool = self.in_pool(ag);
            let mut places: Vec<Option<&'static str>> = indices.iter().map(|&i| in_pool(i).then_some("pool")).collect();
            for t in &self.tiers.list {
                let missing: Vec<usize> = (0..indices.len()).filter(|&j| places[j].is_none()).collect();
                if missing.is_empty() {
                    break;
                }
                let keys: Vec<RecordKey> =
                    missing.iter().map(|&j| RecordKey::new(GROUP, ag.chain[indices[j]])).collect();
                for (&j, found) in missing.iter().zip(t.confirmed(&keys)) {
                    if found {
                        places[j] = Some(t.name());
                    }
                }
            }
            places.into_iter().map(|p| p.unwrap_or(crate::NOWHERE)).collect()
        })
    }

    /// Moves an idle agent's blocks out of the pool into the first tier or
    /// ([`crate::OffloadTo::SecondTier`]) on past it to the next, as memory pressure would:
    /// for benchmarks and operators. Returns where its blocks are
    /// afterwards.
    pub(crate) fn offload_agent(&mut self, key: &AgentKey, to: crate::OffloadTo) -> crate::Result<BlockLocations> {
        let Some(ag) = self.agents.get(key) else { return Err(crate::Error::UnknownAgent(key.id.to_string())) };
        if ag.busy.is_some() {
            return Err(crate::Error::InvalidRequest { field: "agent", problem: "a turn is running".into() });
        }
        let chain = ag.chain.clone();
        let tokens = ag.tokens.clone();
        self.release_agent(key);
        if let Some(ag) = self.agents.get_mut(key) {
            // The history stays known (for the next turn's lookup and the
            // manifest), as after a restart.
            ag.tokens = tokens;
            ag.chain.clone_from(&chain);
        }
        self.cache.evict_cached(&chain);
        self.stash_evicted();
        let first_at_once = self.tiers.list.first().is_some_and(|t| t.at_once());
        if to == crate::OffloadTo::SecondTier && first_at_once {
            let ns = self.namespace(&key.tenant);
            let bs = self.block_size();
            let tokens = self.agents.get(key).map(|a| a.tokens.clone()).unwrap_or_default();
            let expected: Vec<BlockKey> = (0..chain.len()).map(|i| block_key(ns, &chain, &tokens, i, bs)).collect();
            let mut results: Vec<Option<Result<Payload, Reject>>> = (0..chain.len()).map(|_| None).collect();
            dispatch(
                &mut self.tiers.list[..1],
                &self.tiers.events,
                0,
                &expected,
                &vec![0; chain.len()],
                &mut results,
                |_| true,
            );
            for (k, r) in expected.into_iter().zip(results) {
                if let Some(Ok(p)) = r {
                    offer(&mut self.tiers, 1, key_payload(k, p.bytes().to_vec()));
                }
            }
        }
        Ok(self.block_locations(key))
    }

    /// A way to wait for the durable tier's writer from another thread.
    pub(crate) fn disk_flusher(&self) -> Option<tiers::Flusher> {
        self.tiers.list.iter().find_map(|t| t.flusher())
    }

    /// Drops the tiers' records from the OS cache (benchmarks).
    pub(crate) fn forget_disk_cache(&self) {
        for t in &self.tiers.list {
            t.forget_cached();
        }
    }

    /// Tells the pool's index changes since the last call as KV events
    /// (once per loop iteration).
    pub(crate) fn flush_kv_events(&mut self) {
        let changes = self.cache.take_changes();
        if changes.is_empty() {
            return;
        }
        self.tiers.events.push(changes.into_iter().map(|c| match c {
            kv::IndexChange::Published { hash, parent } => (KvEventKind::Stored, "pool", Some(hash), parent),
            kv::IndexChange::Unpublished { hash } => (KvEventKind::Removed, "pool", Some(hash), None),
        }));
    }

    /// What this replica holds, exact as of the event log's `next` (taken
    /// on the engine thread, which alone appends).
    pub(crate) fn kv_snapshot(&mut self) -> crate::kv_events::KvSnapshot {
        self.flush_kv_events();
        let mut blocks: Vec<(BlockHash, &'static str)> =
            self.cache.published().into_iter().map(|h| (h, "pool")).collect();
        for t in &self.tiers.list {
            blocks.extend(t.inventory().into_iter().map(|k| (k.hash, t.name())));
        }
        crate::kv_events::KvSnapshot {
            epoch: self.tiers.events.epoch(),
            next: self.tiers.events.next(),
            model_fingerprint: self.model.fingerprint().to_vec(),
            block_size: self.block_size(),
            blocks,
        }
    }

    pub(super) fn tier_stats(&self) -> TierStats {
        let tiers: Vec<tiers::TierSnapshot> = self.tiers.list.iter().map(|t| t.snapshot()).collect();
        TierStats { counters: self.tiers.counters.clone(), disk: tiers.iter().find_map(|t| t.disk.clone()), tiers }
    }
}
