//! The scheduler's use of the KV tiers (`tiers` crate): where evicted
//! blocks go, how a prefix lookup continues past the pool, loads from disk,
//! durable agents. Same state machine as `core.rs` (one thread owns it).
//!
//! * **Down**: every block the pool evicts is exported (the `kv` crate
//!   reports it before the block is written again) and kept in RAM; RAM's
//!   overflow is queued for the disk (dropped, and counted, when the queue
//!   is full). Without a RAM tier, evicted blocks go to disk directly.
//! * **Up, from RAM**: at admission the block chain continues past the
//!   pool; consecutive blocks found in RAM are taken out and imported into
//!   fresh pool blocks at once (a memcpy each), then published.
//! * **Up, from disk**: consecutive records on disk after that are loaded
//!   if the cost model says loading beats recomputing: the request's
//!   sequence gets blocks for them, the request waits in `loading` while
//!   reader threads read and verify the records, and other requests keep
//!   stepping. When all reads are back (or the deadline, the estimated
//!   recompute time, passes) the verified prefix of them is imported and
//!   published, the rest is cut and recomputed, and the request runs.
//!   Requests meeting those blocks meanwhile wait for the load (pending
//!   blocks) rather than loading them twice.
//! * **Agents**: after each finished turn the agent's manifest and the
//!   blocks of its conversation the disk does not have yet are queued for a
//!   durable commit; a full queue defers the commit (retried). Agents are
//!   restored from their manifests at start. Deleting an agent removes its
//!   blocks nobody else uses from every tier and its manifest from disk.

use std::time::{Duration, Instant, SystemTime};

use kv::{BlockHash, BlockId, BlockKey, BlockStorage, Evicted, Namespace, PrefixHashes, SeqId};
use tiers::{chain_len, AgentManifest, Demotion, GroupRule, LoadTask, ManifestId, ManifestRetention, RecordKey};
use tiers::{DiskTier, TierEvent};

use super::{Active, EngineCore};
use crate::agents::{AgentKey, BlockLocations, Retention};
use crate::request::{AgentId, RequestId, TenantId};
use crate::tiering::{Load, LoadPolicy, ProducerId, TierCounters, TierStats, Tiering};

/// The one layer group of a uniform model. (A hybrid model will have one
/// per attention kind; records and chain lookups already carry it.)
const GROUP: tiers::GroupId = 0;

/// How often a deferred agent commit is retried at most.
const COMMIT_RETRY: Duration = Duration::from_millis(100);

/// What the tiers added to a request's reused prefix.
pub(crate) enum TierReuse {
    /// This many more tokens are in its sequence now (from RAM).
    Extended(usize),
    /// Its next block is on its way into the pool: wait for that producer.
    Blocked((ProducerId, kv::BlockHash)),
    /// Blocks are being loaded into its sequence from disk.
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
        keep(tiers, e.key, payload);
    }
    tiers.counters.stash_seconds += started.elapsed().as_secs_f64();
}

/// Into RAM (its overflow down to disk), or straight to disk.
fn keep(tiers: &mut Tiering, key: BlockKey, payload: Vec<u8>) {
    let Tiering { ram, disk, counters, .. } = tiers;
    match ram {
        Some(ram) => {
            counters.demotions_ram += 1;
            for o in ram.insert(GROUP, key, payload) {
                demote(disk.as_ref(), counters, o.key, o.payload);
            }
        }
        None => demote(disk.as_ref(), counters, key, payload),
    }
}

fn demote(disk: Option<&DiskTier>, counters: &mut TierCounters, key: BlockKey, payload: Vec<u8>) {
    match disk.map(|d| d.demote(GROUP, key, payload)) {
        Some(Demotion::Queued) => counters.demotions_disk += 1,
        Some(Demotion::Known) => {}
        Some(Demotion::Dropped) | None => counters.dropped += 1,
    }
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

fn manifest_retention(r: Retention) -> ManifestRetention {
    match r {
        Retention::Evictable => ManifestRetention::Evictable,
        Retention::Pinned => ManifestRetention::Pinned,
        Retention::Ttl(ttl) => ManifestRetention::Ttl { seconds: ttl.as_secs().max(1) },
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
        let promoted = self.promote_from_ram(a, seq, ns, hashes, len / bs, room);
        let next = len / bs + promoted;
        if let Some(&h) = hashes.hashes().get(next) {
            if let Some(p) = self.tiers.pending.producer_of(&h) {
                return TierReuse::Blocked((p, h));
            }
        }
        if self.start_load(a, seq, ns, hashes, next, room - promoted) {
            return TierReuse::Loading;
        }
        TierReuse::Extended(promoted * bs)
    }

    /// Imports the consecutive blocks from block `start` on that RAM holds,
    /// at most `room` of them; returns how many.
    fn promote_from_ram(
        &mut self,
        a: &mut Active,
        seq: SeqId,
        ns: Namespace,
        hashes: &PrefixHashes,
        start: usize,
        room: usize,
    ) -> usize {
        let bs = self.block_size();
        let hs = hashes.hashes();
        let started = Instant::now();
        let Some(ram) = self.tiers.ram.as_mut() else { return 0 };
        let mut taken = Vec::new();
        for i in start..hs.len().min(start + room) {
            if !ram.contains(&RecordKey::new(GROUP, hs[i])) {
                break;
            }
            let key = block_key(ns, hs, &a.tokens, i, bs);
            match ram.take(GROUP, &key) {
                Some(p) => taken.push((key, p)),
                None => break,
            }
        }
        if taken.is_empty() {
            return 0;
        }
        let from = start * bs;
        let appended = match self.cache.append(seq, &a.tokens[from..from + taken.len() * bs]) {
            Ok(app) => app,
            Err(_) => {
                // No room or quota for them now: they stay in RAM.
                let ram = self.tiers.ram.as_mut().expect("taken from this RAM tier above");
                for (key, p) in taken {
                    for o in ram.insert(GROUP, key, p) {
                        demote(self.tiers.disk.as_ref(), &mut self.tiers.counters, o.key, o.payload);
                    }
                }
                return 0;
            }
        };
        // The append may have evicted blocks it now reuses: keep their
        // payloads before importing over them.
        self.stash_evicted();
        let blocks: Vec<BlockId> = (0..taken.len()).map(|j| appended.slots[j * bs].block).collect();
        let imported = self.import_blocks(&blocks, taken.iter().map(|(_, p)| p.as_slice()));
        let upto = from + imported * bs;
        let _ = self.cache.mark_computed(seq, upto);
        if imported < taken.len() {
            let _ = self.cache.truncate(seq, upto);
            // Never expected (sizes match): keep what was not imported.
            let ram = self.tiers.ram.as_mut().expect("taken from this RAM tier above");
            for (key, p) in taken.drain(imported..) {
                for o in ram.insert(GROUP, key, p) {
                    demote(self.tiers.disk.as_ref(), &mut self.tiers.counters, o.key, o.payload);
                }
            }
        }
        // Counted as hits when the request is admitted (it may not be now).
        a.tier_hits.ram += (imported * bs).min(a.req.prompt.len().saturating_sub(from));
        self.tiers.counters.promotions += imported as u64;
        self.tiers.counters.promote_seconds += started.elapsed().as_secs_f64();
        imported
    }

    /// Starts loading the consecutive records on disk from block `start`
    /// on (at most `room`), if that beats recomputing them; true if a load
    /// started.
    fn start_load(
        &mut self,
        a: &Active,
        seq: SeqId,
        ns: Namespace,
        hashes: &PrefixHashes,
        start: usize,
        room: usize,
    ) -> bool {
        let bs = self.block_size();
        let hs = hashes.hashes();
        let Some(disk) = self.tiers.disk.as_ref() else { return false };
        if start >= hs.len() || room == 0 {
            return false;
        }
        let keys: Vec<RecordKey> =
            hs[start..hs.len().min(start + room)].iter().map(|h| RecordKey::new(GROUP, *h)).collect();
        let present = disk.present(&keys);
        let pending = &self.tiers.pending;
        let n = chain_len(keys.len(), &[GroupRule::Full], |_, i| {
            present[i] && pending.producer_of(&hs[start + i]).is_none()
        });
        if n == 0 {
            return false;
        }
        let (load_time, compute_time) = (self.tiers.costs.load_time(n), self.tiers.costs.compute_time(n * bs));
        let budget = match self.tiers.policy {
            LoadPolicy::Measured if load_time >= compute_time => {
                self.tiers.counters.loads_skipped += 1;
                return false;
            }
            // Past the time recomputing would take, the load has lost.
            LoadPolicy::Measured => compute_time + Duration::from_millis(100),
            LoadPolicy::Always { deadline } => deadline,
        };
        let from = start * bs;
        let Ok(appended) = self.cache.append(seq, &a.tokens[from..from + n * bs]) else { return false };
        self.stash_evicted();
        let id = self.tiers.next_producer();
        let expected: Vec<BlockKey> = (start..start + n).map(|i| block_key(ns, hs, &a.tokens, i, bs)).collect();
        let blocks: Vec<BlockId> = (0..n).map(|j| appended.slots[j * bs].block).collect();
        let tasks = expected
            .iter()
            .enumerate()
            .map(|(index, k)| LoadTask { load: id, index, group: GROUP, expected: k.clone() })
            .collect();
        self.tiers.pending.register(id, start, &hs[start..start + n]);
        let now = Instant::now();
        let deadline = now + budget;
        let load = Load {
            request: a.id,
            seq,
            base: from,
            keys: expected,
            blocks,
            results: (0..n).map(|_| None).collect(),
            started: now,
            deadline,
        };
        self.tiers.loads.insert(id, load);
        if let Some(disk) = self.tiers.disk.as_ref() {
            disk.load(tasks);
        }
        true
    }

    /// A report from a tier thread.
    pub(crate) fn on_tier_event(&mut self, ev: TierEvent) {
        match ev {
            TierEvent::Loaded { load, index, result } => {
                // A load already finished (deadline) or abandoned: stale.
                let Some(l) = self.tiers.loads.get_mut(&load) else { return };
                if let Some(slot) = l.results.get_mut(index) {
                    *slot = Some(result);
                }
                if l.complete() {
                    self.finish_load(load, false);
                }
            }
            TierEvent::CommitFailed { agent, retry } => {
                let key = self.agents.keys().find(|k| ManifestId::of(k.0.as_str(), k.1.as_str()) == agent).cloned();
                // A failing disk: retried once it resumes. A disk full of
                // pinned records: not (the next turn tries again).
                if let Some(ag) = key.and_then(|k| self.agents.get_mut(&k)) {
                    ag.dirty = true;
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
        let Some(i) = self.loading.iter().position(|a| a.id == load.request) else { return };
        let mut a = self.loading.swap_remove(i);
        let bs = self.block_size();
        let verified: Vec<&[u8]> =
            load.results.iter().map_while(|r| r.as_ref()?.as_ref().ok().map(|p| p.bytes())).collect();
        if let Some(Some(Err(reject))) = load.results.get(verified.len()) {
            if reject.is_corrupt() {
                self.tiers.counters.load_rejects += 1;
            }
        }
        let imported = self.import_blocks(&load.blocks[..verified.len()], verified.into_iter());
        let upto = load.base + imported * bs;
        let _ = self.cache.mark_computed(load.seq, upto);
        let _ = self.cache.truncate(load.seq, upto);
        let upto = self.cut_to_usable(load.seq, upto);
        let took = load.started.elapsed();
        a.tier_hits.disk += (imported * bs).min(a.req.prompt.len().saturating_sub(load.base));
        let c = &mut self.tiers.counters;
        c.loaded_blocks += imported as u64;
        c.load_latency.observe(took);
        if timed_out {
            c.load_timeouts += 1;
        }
        self.tiers.costs.loaded(load.keys.len(), took);
        self.count_admission(&mut a, upto);
        a.events.admitted();
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
    /// it; late reads are ignored).
    pub(super) fn abandon_load(&mut self, request: RequestId) {
        let id = self.tiers.loads.iter().find(|(_, l)| l.request == request).map(|(id, _)| *id);
        if let Some(id) = id {
            self.tiers.loads.remove(&id);
            self.tiers.pending.resolve(id);
        }
    }

    /// Queues a durable commit of `key`'s latest turn: its manifest, and
    /// the blocks of its conversation the disk lacks (exported from the
    /// pool). A full queue defers it.
    pub(super) fn commit_agent(&mut self, key: &AgentKey, ended: Instant) {
        let started = Instant::now();
        let Some(disk) = self.tiers.disk.as_ref() else { return };
        let Some(ag) = self.agents.get(key) else { return };
        let ns = Namespace::new(self.model.fingerprint(), key.0.as_str().as_bytes());
        let bs = self.cache.spec().block_size();
        let chain = &ag.chain[..ag.chain.len().min(ag.tokens.len() / bs)];
        let records: Vec<RecordKey> = chain.iter().map(|h| RecordKey::new(GROUP, *h)).collect();
        let known = disk.known(&records);
        // The blocks the agent's sequence holds, by position in the chain
        // (a sliding window may have released the first ones).
        let table = ag.seq.and_then(|s| self.cache.block_table(s).ok());
        let held = |i: usize| table.and_then(|t| t.blocks().get(i.checked_sub(t.first_block())?)).copied();
        let storage = self.model.storage();
        let mut blocks = Vec::new();
        // The manifest names the chain as far as the disk has it or gets it
        // with this commit: data first, so it never names a block that was
        // never written (a block released meanwhile ends the chain there).
        let mut named = 0;
        for (i, &on_disk) in known.iter().enumerate() {
            if !on_disk {
                let Some(block) = held(i) else { break };
                let mut payload = vec![0u8; storage.block_bytes()];
                if storage.export_block(block, &mut payload).is_err() {
                    break;
                }
                blocks.push((GROUP, block_key(ns, chain, &ag.tokens, i, bs), payload));
            }
            named = i + 1;
        }
        let manifest = AgentManifest {
            tenant: key.0.as_str().into(),
            agent: key.1.as_str().into(),
            ns,
            retention: manifest_retention(ag.retention),
            priority: ag.priority,
            turns: ag.turns,
            last_used_unix_ms: ag
                .last_used_wall
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            tokens: ag.tokens.clone(),
            blocks: records[..named].to_vec(),
        };
        let queued = disk.commit(manifest, blocks, ended).is_ok();
        if !queued {
            self.tiers.counters.commits_deferred += 1;
        }
        self.tiers.counters.commit_seconds += started.elapsed().as_secs_f64();
        if let Some(ag) = self.agents.get_mut(key) {
            ag.dirty = !queued;
            ag.retry_commit = !queued;
        }
    }

    /// Retries deferred commits (at most every [`COMMIT_RETRY`]).
    pub(super) fn retry_commits(&mut self) {
        let Some(disk) = self.tiers.disk.as_ref() else { return };
        let now = Instant::now();
        if self.tiers.next_commit_retry.is_some_and(|t| t > now) || disk.degraded().is_some() {
            return;
        }
        self.tiers.next_commit_retry = Some(now + COMMIT_RETRY);
        let dirty: Vec<AgentKey> = self.agents.dirty();
        for key in dirty {
            self.commit_agent(&key, now);
        }
    }

    /// Agents from the disk tier's manifests, at start. Manifests that are
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
            let ag = self.agents.entry((tenant, agent));
            ag.tokens = m.tokens;
            ag.chain = chain;
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

    fn delete_manifest(&self, id: ManifestId) {
        if let Some(disk) = &self.tiers.disk {
            disk.delete_agent(id, None);
        }
    }

    /// An agent is being forgotten: its blocks that no other agent of its
    /// tenant and no running request uses leave the pool's cache and RAM,
    /// and its manifest and unshared records leave the disk. `done` runs
    /// once that is durable (at once without a disk tier).
    pub(super) fn discard_agent(&mut self, key: &AgentKey, chain: &[BlockHash], done: Option<tiers::Done>) {
        if self.tiers.enabled() {
            let others: std::collections::HashSet<BlockHash> = self
                .agents
                .keys_of(&key.0)
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
            if let Some(ram) = self.tiers.ram.as_mut() {
                for h in &mine {
                    ram.discard(&RecordKey::new(GROUP, *h));
                }
            }
        }
        match &self.tiers.disk {
            Some(disk) => disk.delete_agent(ManifestId::of(key.0.as_str(), key.1.as_str()), done),
            None => {
                if let Some(done) = done {
                    done(Ok(()));
                }
            }
        }
    }

    /// Where an agent's blocks are now.
    pub(super) fn block_locations(&self, key: &AgentKey) -> BlockLocations {
        let Some(ag) = self.agents.get(key) else { return BlockLocations::default() };
        let table = ag.seq.and_then(|s| self.cache.block_table(s).ok());
        let held = |i: usize| table.is_some_and(|t| i >= t.first_block() && i < t.logical_len());
        let mut loc = BlockLocations::default();
        let on_disk = match &self.tiers.disk {
            Some(d) => d.present(&ag.chain.iter().map(|h| RecordKey::new(GROUP, *h)).collect::<Vec<_>>()),
            None => vec![false; ag.chain.len()],
        };
        for (i, h) in ag.chain.iter().enumerate() {
            if held(i) || self.cache.is_indexed(*h) {
                loc.pool += 1;
            } else if self.tiers.ram.as_ref().is_some_and(|r| r.contains(&RecordKey::new(GROUP, *h))) {
                loc.ram += 1;
            }
            loc.disk += usize::from(on_disk[i]);
        }
        let id = ManifestId::of(key.0.as_str(), key.1.as_str());
        loc.durable = self.tiers.disk.as_ref().and_then(|d| d.durable_turns(&id)) == Some(ag.turns);
        loc
    }

    /// Moves an idle agent's blocks out of the pool, into RAM or (with
    /// `to_disk`) on to the disk, as memory pressure would: for benchmarks
    /// and operators. Returns where its blocks are afterwards.
    pub(crate) fn offload_agent(&mut self, key: &AgentKey, to_disk: bool) -> crate::Result<BlockLocations> {
        let Some(ag) = self.agents.get(key) else { return Err(crate::Error::UnknownAgent(key.1.to_string())) };
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
        if to_disk {
            let ns = self.namespace(&key.0);
            let bs = self.block_size();
            let tokens = self.agents.get(key).map(|a| a.tokens.clone()).unwrap_or_default();
            for i in 0..chain.len() {
                let block = block_key(ns, &chain, &tokens, i, bs);
                let payload = self.tiers.ram.as_mut().and_then(|r| r.take(GROUP, &block));
                if let Some(p) = payload {
                    demote(self.tiers.disk.as_ref(), &mut self.tiers.counters, block, p);
                }
            }
        }
        Ok(self.block_locations(key))
    }

    /// A way to wait for the disk tier's writer from another thread.
    pub(crate) fn disk_flusher(&self) -> Option<tiers::Flusher> {
        self.tiers.disk.as_ref().map(DiskTier::flusher)
    }

    /// Drops the disk tier's records from the page cache (benchmarks).
    pub(crate) fn forget_disk_cache(&self) {
        if let Some(d) = &self.tiers.disk {
            d.forget_cached();
        }
    }

    pub(super) fn tier_stats(&self) -> TierStats {
        TierStats {
            ram_blocks: self.tiers.ram.as_ref().map_or(0, |r| r.len() as u64),
            ram_bytes: self.tiers.ram.as_ref().map_or(0, tiers::RamTier::bytes),
            ram_budget: self.tiers.ram.as_ref().map_or(0, tiers::RamTier::budget),
            counters: self.tiers.counters.clone(),
            disk: self.tiers.disk.as_ref().map(DiskTier::stats),
        }
    }
}
