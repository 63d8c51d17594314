//! The block index: which replica holds which KV block, in which tier, as
//! the replicas' events report it. A plain `&mut self` state machine; the
//! router wraps it in its one lock (`state.rs`).
//!
//! # Design
//!
//! One hash map from a block's address ([`BlockHash`], the chained hash the
//! replicas' `kv` crate computes) to an 8-byte entry. Most blocks are held
//! by a few replicas, so the entry keeps up to four *slots* inline, each 15
//! bits: the replica (11 bits, index + 1, 0 = empty) and a mask of the tiers
//! it holds the block in (pool, RAM, disk, remote: a replica may hold a
//! block in several at once, for example on disk and back in the pool). A
//! block held by more than four replicas (a fleet-wide system prompt)
//! *spills*: the entry's top bit is set and its low 32 bits index a side
//! table of slot lists.
//!
//! A block in the remote tier (the shared Redis store) is available to every
//! replica at fetch cost. It is still recorded against the replica that
//! reported it, so that replica's resync or restart drops only its own
//! claims; any slot with the remote bit makes the block remote for all.
//!
//! # Costs
//!
//! - Memory: a bucket is 24 bytes (16-byte key, 8-byte entry) plus one
//!   control byte; at the map's load factor (between 7/16 and 7/8) that is
//!   29 to 57 bytes per indexed block, plus spilled lists for widely shared
//!   blocks (`kvserve bench route --simulate` measures it).
//! - [`BlockIndex::store`], [`BlockIndex::remove`]: one map operation.
//! - [`BlockIndex::prefix_costs`]: one lookup per block of the prompt's
//!   chain until no replica's run continues, plus O(replicas) to set up.
//! - [`BlockIndex::clear_tier`] and [`BlockIndex::drop_replica`] scan the
//!   whole map (tens of milliseconds at ten million blocks): they follow a
//!   replica's `cleared` event, restart or lost events, all rare. A replica
//!   that holds nothing is skipped without a scan.
//!
//! # Invariants
//!
//! - An entry has at least one slot; a slot has at least one tier bit; a
//!   replica has at most one slot per entry.
//! - An entry is spilled if and only if it has more than four slots.
//! - `held[r]` is the number of entries with a slot for replica `r`.
//!
//! [`BlockIndex::check_invariants`] verifies all three (tests call it after
//! every step).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};

use kv::BlockHash;

/// A replica's place in the router's table (its `--replica` position).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplicaId(u16);

impl ReplicaId {
    /// Most replicas one index tracks.
    pub const MAX: usize = (1 << REPLICA_BITS) - 1;

    /// The id of the replica at `index`; `None` from [`ReplicaId::MAX`] on.
    pub fn new(index: usize) -> Option<Self> {
        (index < Self::MAX).then_some(Self(index as u16))
    }

    /// Its position in the table.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

impl std::fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Where a replica keeps a block, fastest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    /// The KV pool on the accelerator (or in the CPU model's arenas).
    Pool,
    /// Host RAM.
    Ram,
    /// Local disk.
    Disk,
    /// The shared remote store: every replica can fetch it.
    Remote,
}

impl Tier {
    /// Every tier, fastest first.
    pub const ALL: [Tier; 4] = [Tier::Pool, Tier::Ram, Tier::Disk, Tier::Remote];

    /// Its name on the wire (`"pool"`, `"ram"`, `"disk"`, `"remote"`).
    pub fn name(self) -> &'static str {
        match self {
            Tier::Pool => "pool",
            Tier::Ram => "ram",
            Tier::Disk => "disk",
            Tier::Remote => "remote",
        }
    }

    /// The tier of a wire name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// What serving a block from here costs, in blocks of prefill (a
    /// recomputed block costs [`MISS_COST`]).
    pub fn cost(self) -> f32 {
        match self {
            Tier::Pool => 0.0,
            Tier::Ram => 0.05,
            Tier::Disk => 0.2,
            Tier::Remote => 0.3,
        }
    }

    const fn bit(self) -> u16 {
        match self {
            Tier::Pool => 1,
            Tier::Ram => 2,
            Tier::Disk => 4,
            Tier::Remote => 8,
        }
    }
}

/// The cost of a block no tier holds: it is prefilled.
pub const MISS_COST: f32 = 1.0;

/// What a prompt's chain would cost on one replica.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PrefixCost {
    /// Leading blocks of the chain the replica would not recompute (held
    /// locally or in the remote store).
    pub run: u32,
    /// Of those, the ones it holds itself (pool, RAM or disk).
    pub local: u32,
    /// Prefill cost in blocks: each block of the run at its best tier's
    /// [`Tier::cost`], every block after it at [`MISS_COST`].
    pub cost: f32,
}

const REPLICA_BITS: u32 = 11;
const REPLICA_MASK: u16 = (1 << REPLICA_BITS) - 1;
const SLOT_BITS: u32 = 15;
const INLINE: usize = 4;
const SPILLED: u64 = 1 << 63;

/// A slot: replica + 1 in the low bits, its tier mask above.
fn slot(r: ReplicaId, tiers: u16) -> u16 {
    (r.0 + 1) | (tiers << REPLICA_BITS)
}

fn slot_replica(s: u16) -> usize {
    usize::from(s & REPLICA_MASK) - 1
}

fn slot_tiers(s: u16) -> u16 {
    s >> REPLICA_BITS
}

/// The cost of a block for a replica with these tier bits; `None` when it
/// holds it in no local tier.
fn local_cost(tiers: u16) -> Option<f32> {
    if tiers & Tier::Pool.bit() != 0 {
        Some(Tier::Pool.cost())
    } else if tiers & Tier::Ram.bit() != 0 {
        Some(Tier::Ram.cost())
    } else if tiers & Tier::Disk.bit() != 0 {
        Some(Tier::Disk.cost())
    } else {
        None
    }
}

/// A block address as a map key: 8-byte aligned (a `u128` is 16-byte
/// aligned, which would pad every bucket to 32 bytes).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key {
    lo: u64,
    hi: u64,
}

impl From<BlockHash> for Key {
    fn from(h: BlockHash) -> Self {
        let v = h.to_u128();
        Self { lo: v as u64, hi: (v >> 64) as u64 }
    }
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.lo ^ self.hi.rotate_left(29));
    }
}

/// The key is already a uniform hash (xxh3-128): folding it is enough.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 ^= v;
    }
}

/// Up to four inline slots, or an index into the spill table.
#[derive(Clone, Copy, Debug)]
struct Entry(u64);

impl Entry {
    fn inline(slots: &[u16]) -> Self {
        debug_assert!(slots.len() <= INLINE && !slots.is_empty());
        let mut v = 0u64;
        for (i, s) in slots.iter().enumerate() {
            v |= u64::from(*s) << (SLOT_BITS * i as u32);
        }
        Self(v)
    }

    fn spilled(at: u32) -> Self {
        Self(SPILLED | u64::from(at))
    }

    fn spill_index(self) -> Option<usize> {
        (self.0 & SPILLED != 0).then_some((self.0 & u64::from(u32::MAX)) as usize)
    }

    /// The inline slots into `out`; their count.
    fn unpack(self, out: &mut [u16; INLINE]) -> usize {
        let mut n = 0;
        for i in 0..INLINE {
            let s = ((self.0 >> (SLOT_BITS * i as u32)) & ((1 << SLOT_BITS) - 1)) as u16;
            if s != 0 {
                out[n] = s;
                n += 1;
            }
        }
        n
    }
}

/// Which replicas hold which blocks (see the module doc).
#[derive(Default)]
pub struct BlockIndex {
    map: HashMap<Key, Entry, BuildHasherDefault<KeyHasher>>,
    /// Slot lists of spilled entries (more than four holders each).
    spill: Vec<Vec<u16>>,
    /// Free places in `spill`.
    free: Vec<u32>,
    /// Per replica, the entries with a slot for it.
    held: Vec<u64>,
}

impl std::fmt::Debug for BlockIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockIndex").field("blocks", &self.map.len()).field("spilled", &self.spilled()).finish()
    }
}

impl BlockIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Blocks indexed (each counted once, however many replicas hold it).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Blocks `r` holds in any tier.
    pub fn held_by(&self, r: ReplicaId) -> u64 {
        self.held.get(r.index()).copied().unwrap_or(0)
    }

    /// Entries whose holders spilled out of line.
    pub fn spilled(&self) -> usize {
        self.spill.len() - self.free.len()
    }

    /// Bytes the index has allocated: the map's buckets and control bytes
    /// (hashbrown's layout: a power-of-two bucket count, capacity 7/8 of
    /// it) and the spill table.
    pub fn memory_bytes(&self) -> usize {
        let buckets = if self.map.capacity() == 0 { 0 } else { (self.map.capacity() * 8 / 7).next_power_of_two() };
        let map = buckets * (std::mem::size_of::<(Key, Entry)>() + 1) + 16;
        let lists: usize = self.spill.iter().map(|v| v.capacity() * 2).sum();
        map + self.spill.capacity() * std::mem::size_of::<Vec<u16>>()
            + lists
            + self.free.capacity() * 4
            + self.held.capacity() * 8
    }

    /// Reserves room for `more` blocks.
    pub fn reserve(&mut self, more: usize) {
        self.map.reserve(more);
    }

    /// Records that `r` holds `hash` in `tier`.
    pub fn store(&mut self, r: ReplicaId, hash: BlockHash, tier: Tier) {
        self.modify(r, hash, |t| t | tier.bit());
    }

    /// Records that `r` no longer holds `hash` in `tier`.
    pub fn remove(&mut self, r: ReplicaId, hash: BlockHash, tier: Tier) {
        self.modify(r, hash, |t| t & !tier.bit());
    }

    /// The tiers `r` holds `hash` in, fastest first.
    pub fn tiers(&self, r: ReplicaId, hash: BlockHash) -> Vec<Tier> {
        let mut bits = 0;
        self.for_each_slot(hash, |s| {
            if slot_replica(s) == r.index() {
                bits = slot_tiers(s);
            }
        });
        Tier::ALL.into_iter().filter(|t| bits & t.bit() != 0).collect()
    }

    /// Forgets that `r` holds anything in `tier` (its `cleared` event).
    pub fn clear_tier(&mut self, r: ReplicaId, tier: Tier) {
        self.strip(r, tier.bit());
    }

    /// Forgets everything `r` holds (it restarted, or events were lost).
    pub fn drop_replica(&mut self, r: ReplicaId) {
        self.strip(r, u16::MAX);
    }

    /// What `chain` (a prompt's block addresses, in order) would cost on
    /// each of the first `replicas` replicas (see [`PrefixCost`]). A
    /// replica's run is the leading blocks it holds itself or can fetch
    /// from the remote store; it ends at the first block that is neither.
    pub fn prefix_costs(&self, chain: &[BlockHash], replicas: usize) -> Vec<PrefixCost> {
        let n = chain.len();
        let mut out = vec![PrefixCost::default(); replicas];
        // Phase 1 (`alive` is `None`): every replica's run goes on, as long
        // as the blocks are in the remote store. Each replica has paid
        // `base` (the remote cost of each of them) plus the adjustment in
        // `out[r].cost` for those it holds itself.
        // Phase 2: only the replicas in `alive` go on.
        let mut base = 0.0f32;
        let mut alive: Option<Vec<usize>> = None;
        let mut slots: Vec<u16> = Vec::with_capacity(INLINE);
        for (i, &hash) in chain.iter().enumerate() {
            slots.clear();
            self.for_each_slot(hash, |s| slots.push(s));
            let remote = slots.iter().any(|&s| slot_tiers(s) & Tier::Remote.bit() != 0);
            let left = (n - i) as f32 * MISS_COST;
            match &mut alive {
                None if remote => {
                    base += Tier::Remote.cost();
                    for &s in &slots {
                        if let (Some(c), Some(o)) = (local_cost(slot_tiers(s)), out.get_mut(slot_replica(s))) {
                            o.cost += c - Tier::Remote.cost();
                            o.local += 1;
                        }
                    }
                }
                None => {
                    // Local holders go on; everyone else's run ends here.
                    let mut going = vec![false; replicas];
                    let mut next = Vec::with_capacity(slots.len());
                    for &s in &slots {
                        let r = slot_replica(s);
                        if let (Some(c), Some(o)) = (local_cost(slot_tiers(s)), out.get_mut(r)) {
                            o.cost += c;
                            o.local += 1;
                            going[r] = true;
                            next.push(r);
                        }
                    }
                    for (o, going) in out.iter_mut().zip(going) {
                        o.cost += base;
                        if !going {
                            o.run = i as u32;
                            o.cost += left;
                        }
                    }
                    alive = Some(next);
                }
                Some(list) => {
                    list.retain(|&r| {
                        let mine =
                            slots.iter().find(|&&s| slot_replica(s) == r).and_then(|&s| local_cost(slot_tiers(s)));
                        let o = &mut out[r];
                        match (mine, remote) {
                            (Some(c), _) => {
                                o.cost += c;
                                o.local += 1;
                                true
                            }
                            (None, true) => {
                                o.cost += Tier::Remote.cost();
                                true
                            }
                            (None, false) => {
                                o.run = i as u32;
                                o.cost += left;
                                false
                            }
                        }
                    });
                }
            }
            if alive.as_ref().is_some_and(Vec::is_empty) {
                return out;
            }
        }
        match alive {
            None => {
                for o in &mut out {
                    o.run = n as u32;
                    o.cost += base;
                }
            }
            Some(list) => {
                for r in list {
                    out[r].run = n as u32;
                }
            }
        }
        out
    }

    /// Calls `f` with every slot of `hash`'s entry.
    fn for_each_slot(&self, hash: BlockHash, mut f: impl FnMut(u16)) {
        let Some(&e) = self.map.get(&Key::from(hash)) else { return };
        match e.spill_index() {
            Some(at) => self.spill.get(at).into_iter().flatten().for_each(|&s| f(s)),
            None => {
                let mut buf = [0u16; INLINE];
                let k = e.unpack(&mut buf);
                buf[..k].iter().for_each(|&s| f(s));
            }
        }
    }

    fn count(&mut self, r: usize, delta: i64) {
        if self.held.len() <= r {
            self.held.resize(r + 1, 0);
        }
        self.held[r] = self.held[r].saturating_add_signed(delta);
    }

    /// Sets `r`'s tiers for `hash` to `change(old)`.
    fn modify(&mut self, r: ReplicaId, hash: BlockHash, change: impl FnOnce(u16) -> u16) {
        let key = Key::from(hash);
        let entry = self.map.get(&key).copied();
        let mut slots: Vec<u16> = match entry {
            None => Vec::new(),
            Some(e) => match e.spill_index() {
                Some(at) => self.spill.get(at).cloned().unwrap_or_default(),
                None => {
                    let mut buf = [0u16; INLINE];
                    let k = e.unpack(&mut buf);
                    buf[..k].to_vec()
                }
            },
        };
        let at = slots.iter().position(|&s| slot_replica(s) == r.index());
        let old = at.map_or(0, |a| slot_tiers(slots[a]));
        let new = change(old) & 0xF;
        if old == new {
            return;
        }
        match (at, new) {
            (Some(a), 0) => {
                slots.swap_remove(a);
                self.count(r.index(), -1);
            }
            (Some(a), t) => slots[a] = slot(r, t),
            (None, t) => {
                slots.push(slot(r, t));
                self.count(r.index(), 1);
            }
        }
        self.put(key, entry.and_then(Entry::spill_index), slots);
    }

    /// Writes `key`'s slots back: removed when none, inline up to four,
    /// else spilled (reusing `was_spilled`'s place when it had one).
    fn put(&mut self, key: Key, was_spilled: Option<usize>, slots: Vec<u16>) {
        if slots.len() > INLINE {
            let at = match was_spilled {
                Some(at) => at,
                None => match self.free.pop() {
                    Some(at) => at as usize,
                    None => {
                        self.spill.push(Vec::new());
                        self.spill.len() - 1
                    }
                },
            };
            self.spill[at] = slots;
            self.map.insert(key, Entry::spilled(at as u32));
            return;
        }
        if let Some(at) = was_spilled {
            self.spill[at] = Vec::new();
            self.free.push(at as u32);
        }
        if slots.is_empty() {
            self.map.remove(&key);
        } else {
            self.map.insert(key, Entry::inline(&slots));
        }
    }

    /// Clears the tier bits `mask` of `r` in every entry.
    fn strip(&mut self, r: ReplicaId, mask: u16) {
        if self.held_by(r) == 0 {
            return;
        }
        let Self { map, spill, free, held } = self;
        let mut dropped = 0u64;
        let mut strip_slots = |slots: &mut Vec<u16>| {
            if let Some(a) = slots.iter().position(|&s| slot_replica(s) == r.index()) {
                let t = slot_tiers(slots[a]) & !mask;
                if t == 0 {
                    slots.swap_remove(a);
                    dropped += 1;
                } else {
                    slots[a] = slot(r, t);
                }
            }
        };
        map.retain(|_, e| match e.spill_index() {
            Some(at) => {
                let list = &mut spill[at];
                strip_slots(list);
                if list.len() <= INLINE {
                    let slots = std::mem::take(list);
                    free.push(at as u32);
                    *e = Entry::inline(&slots);
                }
                true
            }
            None => {
                let mut buf = [0u16; INLINE];
                let k = e.unpack(&mut buf);
                let mut slots = buf[..k].to_vec();
                strip_slots(&mut slots);
                if slots.is_empty() {
                    return false;
                }
                *e = Entry::inline(&slots);
                true
            }
        });
        if let Some(h) = held.get_mut(r.index()) {
            *h = h.saturating_sub(dropped);
        }
    }

    /// Checks the invariants of the module doc.
    ///
    /// # Errors
    /// The first one broken, described.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut held = vec![0u64; self.held.len()];
        let mut spilled = 0;
        for e in self.map.values() {
            let slots: Vec<u16> = match e.spill_index() {
                Some(at) => {
                    spilled += 1;
                    let list = self.spill.get(at).ok_or("a spilled entry points past the table")?;
                    if list.len() <= INLINE {
                        return Err(format!("a spilled entry has only {} slots", list.len()));
                    }
                    list.clone()
                }
                None => {
                    let mut buf = [0u16; INLINE];
                    let k = e.unpack(&mut buf);
                    buf[..k].to_vec()
                }
            };
            if slots.is_empty() {
                return Err("an entry has no slot".into());
            }
            let mut seen = std::collections::HashSet::new();
            for s in slots {
                if slot_tiers(s) == 0 {
                    return Err("a slot has no tier".into());
                }
                let r = slot_replica(s);
                if !seen.insert(r) {
                    return Err(format!("replica {r} has two slots in one entry"));
                }
                *held.get_mut(r).ok_or("a slot names a replica never counted")? += 1;
            }
        }
        if spilled != self.spilled() {
            return Err(format!("{spilled} spilled entries, the table says {}", self.spilled()));
        }
        if held != self.held {
            return Err(format!("per-replica counts {:?} differ from the entries' {held:?}", self.held));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn r(i: usize) -> ReplicaId {
        ReplicaId::new(i).unwrap()
    }

    fn h(i: u64) -> BlockHash {
        BlockHash::from_u128(u128::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835) | 1)
    }

    #[test]
    fn store_remove_clear_and_drop_round_trip() {
        let mut ix = BlockIndex::new();
        ix.store(r(0), h(1), Tier::Pool);
        ix.store(r(0), h(1), Tier::Disk);
        ix.store(r(1), h(1), Tier::Ram);
        ix.store(r(0), h(2), Tier::Pool);
        ix.check_invariants().unwrap();
        assert_eq!(ix.tiers(r(0), h(1)), vec![Tier::Pool, Tier::Disk]);
        assert_eq!((ix.len(), ix.held_by(r(0)), ix.held_by(r(1))), (2, 2, 1));
        // Removing one tier keeps the others.
        ix.remove(r(0), h(1), Tier::Pool);
        assert_eq!(ix.tiers(r(0), h(1)), vec![Tier::Disk]);
        // Removing what is not there changes nothing.
        ix.remove(r(2), h(1), Tier::Pool);
        ix.check_invariants().unwrap();
        // `cleared` for the pool drops h(2) (pool only), keeps h(1) on disk.
        ix.clear_tier(r(0), Tier::Pool);
        assert!(ix.tiers(r(0), h(2)).is_empty());
        assert_eq!(ix.tiers(r(0), h(1)), vec![Tier::Disk]);
        assert_eq!(ix.len(), 1);
        ix.check_invariants().unwrap();
        // A restart (new epoch) or lost events drop everything of r(0).
        ix.drop_replica(r(0));
        assert!(ix.tiers(r(0), h(1)).is_empty());
        assert_eq!(ix.tiers(r(1), h(1)), vec![Tier::Ram]);
        assert_eq!((ix.held_by(r(0)), ix.len()), (0, 1));
        ix.check_invariants().unwrap();
        ix.remove(r(1), h(1), Tier::Ram);
        assert!(ix.is_empty());
        ix.check_invariants().unwrap();
    }

    #[test]
    fn a_block_held_by_many_replicas_spills_and_comes_back_inline() {
        let mut ix = BlockIndex::new();
        for i in 0..9 {
            ix.store(r(i), h(7), Tier::Pool);
            ix.check_invariants().unwrap();
        }
        assert_eq!(ix.spilled(), 1);
        for i in 0..9 {
            assert_eq!(ix.tiers(r(i), h(7)), vec![Tier::Pool]);
        }
        ix.clear_tier(r(3), Tier::Pool);
        ix.drop_replica(r(4));
        for i in 5..8 {
            ix.remove(r(i), h(7), Tier::Pool);
        }
        ix.check_invariants().unwrap();
        assert_eq!(ix.spilled(), 0, "four holders fit inline again");
        // Spill places are reused.
        for i in 10..16 {
            ix.store(r(i), h(7), Tier::Ram);
        }
        assert_eq!((ix.spilled(), ix.spill.len()), (1, 1));
        ix.check_invariants().unwrap();
    }

    /// The reference: (replica, block) → tier bits, and prefix costs
    /// computed the slow, obvious way.
    fn reference_costs(model: &HashMap<(usize, u64), u16>, chain: &[u64], replicas: usize) -> Vec<PrefixCost> {
        (0..replicas)
            .map(|rep| {
                let mut out = PrefixCost::default();
                for (i, b) in chain.iter().enumerate() {
                    let mine = model.get(&(rep, *b)).copied().unwrap_or(0);
                    let remote = (0..replicas).any(|o| model.get(&(o, *b)).is_some_and(|t| t & 8 != 0));
                    match (local_cost(mine), remote) {
                        (Some(c), _) => {
                            out.cost += c;
                            out.local += 1;
                        }
                        (None, true) => out.cost += Tier::Remote.cost(),
                        (None, false) => {
                            out.run = i as u32;
                            out.cost += (chain.len() - i) as f32 * MISS_COST;
                            return out;
                        }
                    }
                }
                out.run = chain.len() as u32;
                out
            })
            .collect()
    }

    /// Seeded random operations over a few blocks and replicas (so entries
    /// spill and come back, tiers pile up and clear), checked against the
    /// reference model and the invariants after every step.
    #[test]
    fn random_operations_agree_with_a_reference_model() {
        const REPLICAS: usize = 9;
        const BLOCKS: u64 = 12;
        let mut ix = BlockIndex::new();
        let mut model: HashMap<(usize, u64), u16> = HashMap::new();
        let mut seed = 0x5eed_u64;
        let mut next = move || {
            seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        for step in 0..20_000 {
            let (rep, block, tier) =
                ((next() % REPLICAS as u64) as usize, next() % BLOCKS, Tier::ALL[(next() % 4) as usize]);
            match next() % 100 {
                0..=54 => {
                    ix.store(r(rep), h(block), tier);
                    *model.entry((rep, block)).or_default() |= tier.bit();
                }
                55..=94 => {
                    ix.remove(r(rep), h(block), tier);
                    if let Some(t) = model.get_mut(&(rep, block)) {
                        *t &= !tier.bit();
                    }
                }
                95..=97 => {
                    ix.clear_tier(r(rep), tier);
                    model.iter_mut().filter(|((x, _), _)| *x == rep).for_each(|(_, t)| *t &= !tier.bit());
                }
                _ => {
                    ix.drop_replica(r(rep));
                    model.retain(|(x, _), _| *x != rep);
                }
            }
            model.retain(|_, t| *t != 0);
            ix.check_invariants().unwrap_or_else(|e| panic!("step {step}: {e}"));
            assert_eq!(ix.len(), model.keys().map(|(_, b)| b).collect::<std::collections::HashSet<_>>().len());
            for rep in 0..REPLICAS {
                for block in 0..BLOCKS {
                    let want: Vec<Tier> = Tier::ALL
                        .into_iter()
                        .filter(|t| model.get(&(rep, block)).is_some_and(|bits| bits & t.bit() != 0))
                        .collect();
                    assert_eq!(ix.tiers(r(rep), h(block)), want, "step {step}");
                }
            }
            let len = (next() % 8) as usize;
            let chain: Vec<u64> = (0..len).map(|_| next() % (BLOCKS + 2)).collect();
            let hashes: Vec<BlockHash> = chain.iter().map(|&b| h(b)).collect();
            let got = ix.prefix_costs(&hashes, REPLICAS);
            let want = reference_costs(&model, &chain, REPLICAS);
            for (g, w) in got.iter().zip(&want) {
                assert_eq!((g.run, g.local), (w.run, w.local), "step {step}, chain {chain:?}");
                assert!((g.cost - w.cost).abs() < 1e-4, "step {step}: cost {} vs {}", g.cost, w.cost);
            }
        }
    }

    #[test]
    fn prefix_costs_count_tiers_and_stop_at_the_first_miss() {
        let mut ix = BlockIndex::new();
        let chain: Vec<BlockHash> = (0..6).map(h).collect();
        // r0 holds 4 leading blocks in the pool; r1 holds 2 in RAM and 1 on
        // disk; block 3 is in the remote store (reported by r2).
        for b in &chain[..4] {
            ix.store(r(0), *b, Tier::Pool);
        }
        ix.store(r(1), chain[0], Tier::Ram);
        ix.store(r(1), chain[1], Tier::Ram);
        ix.store(r(1), chain[2], Tier::Disk);
        ix.store(r(2), chain[3], Tier::Remote);
        // A later block alone does not count: the run stopped before it.
        ix.store(r(3), chain[5], Tier::Pool);
        let c = ix.prefix_costs(&chain, 4);
        assert_eq!((c[0].run, c[0].local), (4, 4));
        assert!((c[0].cost - 2.0).abs() < 1e-6, "4 pool blocks free, 2 to prefill: {}", c[0].cost);
        // r1: 0.05 + 0.05 + 0.2 + 0.3 (remote) + 2 misses.
        assert_eq!((c[1].run, c[1].local), (4, 3));
        assert!((c[1].cost - 2.6).abs() < 1e-6, "{}", c[1].cost);
        assert_eq!((c[2].run, c[2].cost), (0, 6.0));
        assert_eq!((c[3].run, c[3].cost), (0, 6.0));
    }

    /// Not a benchmark: prints what an indexed block costs in memory, and
    /// guards the layout's promise (at most 64 bytes a block whatever the
    /// map's fill).
    #[test]
    fn memory_per_indexed_block_is_measured() {
        let mut ix = BlockIndex::new();
        let n = 300_000u64;
        for i in 0..n {
            ix.store(r((i % 100) as usize), h(i), Tier::Pool);
        }
        let per_block = ix.memory_bytes() as f64 / ix.len() as f64;
        println!(
            "index: {} blocks, {} bytes, {per_block:.1} bytes per block (bucket {} bytes + 1 control byte)",
            ix.len(),
            ix.memory_bytes(),
            std::mem::size_of::<(Key, Entry)>()
        );
        assert_eq!(std::mem::size_of::<(Key, Entry)>(), 24);
        assert!(per_block <= 64.0, "{per_block} bytes per indexed block");
    }
}
