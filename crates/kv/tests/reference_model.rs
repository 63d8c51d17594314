//! Seeded randomized test of `KvCache` against a plain reference model.
//!
//! The reference keeps each sequence's tokens in a `Vec`. A simulated model
//! writes, into every slot the cache hands out, a fingerprint of the token's
//! whole prefix (its namespace included), and performs every copy the cache
//! asks for. After each operation, every sequence's tokens must equal the
//! reference's, every position its table holds must read back the fingerprint
//! of exactly its own prefix (so a wrongly shared, wrongly adopted, evicted
//! while in use, or uncopied block shows up), and all invariants must hold.
//! A failed operation must leave the state exactly as it was.

mod common;

use std::collections::HashMap;

use common::owner;
use kv::{AttentionKind, CacheSpec, CacheSpecParams, Error, KvCache, Namespace, OwnerId, SeqId, SequenceSnapshot};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

struct Config {
    block_size: u32,
    num_blocks: u32,
    vocab: u32,
    window: Option<u32>,
    rounds: usize,
}

/// What the "model" wrote into each slot: `payload[block * bs + offset]`.
struct SimModel {
    bs: usize,
    payload: Vec<Option<u64>>,
}

impl SimModel {
    fn apply(&mut self, appended: &kv::Appended, fingerprints: &[u64]) {
        if let Some(copy) = appended.copy {
            for o in 0..copy.tokens as usize {
                self.payload[copy.dst.index() * self.bs + o] = self.payload[copy.src.index() * self.bs + o];
            }
        }
        for (slot, fp) in appended.slots.iter().zip(fingerprints) {
            self.payload[slot.block.index() * self.bs + slot.offset as usize] = Some(*fp);
        }
    }
}

fn fingerprints(ns: Namespace, tokens: &[u32]) -> Vec<u64> {
    let mut h = ns.to_u128() as u64 | 1;
    tokens
        .iter()
        .map(|&t| {
            h = h.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17) ^ u64::from(t + 1);
            h
        })
        .collect()
}

struct Harness {
    cache: KvCache,
    model: SimModel,
    reference: HashMap<SeqId, (Namespace, Vec<u32>)>,
    owners: Vec<OwnerId>,
    namespaces: Vec<Namespace>,
    prompts: Vec<Vec<u32>>,
}

impl Harness {
    fn check(&self, context: &str) {
        if let Err(v) = self.cache.check_invariants() {
            panic!("{context}: {v}");
        }
        let bs = self.model.bs;
        assert_eq!(self.cache.stats().sequences, self.reference.len(), "{context}");
        for (&id, (ns, tokens)) in &self.reference {
            let snap = self.cache.snapshot(id).unwrap_or_else(|e| panic!("{context}: {e}"));
            assert_eq!(&snap.tokens, tokens, "{context}: tokens of {id}");
            let fps = fingerprints(*ns, tokens);
            for (p, fp) in fps.iter().enumerate() {
                if let Some(slot) = snap.table.slot(p, bs) {
                    let got = self.model.payload[slot.block.index() * bs + slot.offset as usize];
                    assert_eq!(got, Some(*fp), "{context}: {id} position {p} reads another prefix's K/V");
                }
            }
        }
    }

    fn state(&self) -> (kv::CacheStats, Vec<(SeqId, SequenceSnapshot)>) {
        let mut snaps: Vec<_> = self.reference.keys().map(|&id| (id, self.cache.snapshot(id).expect("live"))).collect();
        snaps.sort_by_key(|(id, _)| *id);
        (self.cache.stats(), snaps)
    }

    fn append(&mut self, id: SeqId, new: &[u32]) -> Result<(), Error> {
        let appended = self.cache.append(id, new)?;
        let (ns, tokens) = self.reference.get_mut(&id).expect("reference tracks it");
        let start = tokens.len();
        tokens.extend_from_slice(new);
        let fps = fingerprints(*ns, tokens);
        self.model.apply(&appended, &fps[start..]);
        Ok(())
    }

    fn step(&mut self, rng: &mut StdRng, vocab: u32) {
        let ids: Vec<SeqId> = {
            let mut v: Vec<_> = self.reference.keys().copied().collect();
            v.sort();
            v
        };
        let pick = |rng: &mut StdRng| ids[rng.random_range(0..ids.len())];
        let before = self.state();
        let op = rng.random_range(0..100);
        let result = match op {
            0..=19 => {
                let who = self.owners[rng.random_range(0..self.owners.len())].clone();
                let ns = self.namespaces[rng.random_range(0..self.namespaces.len())];
                let mut prompt = self.prompts[rng.random_range(0..self.prompts.len())].clone();
                prompt.truncate(rng.random_range(0..=prompt.len()));
                prompt.extend((0..rng.random_range(0..12)).map(|_| rng.random_range(0..vocab)));
                match self.cache.create_with_prefix(&who, ns, &prompt) {
                    Ok((id, adopted)) => {
                        self.reference.insert(id, (ns, prompt[..adopted].to_vec()));
                        let rest = self.append(id, &prompt[adopted..]);
                        if rest.is_ok() && rng.random_bool(0.7) {
                            self.cache.mark_computed(id, prompt.len()).expect("appended");
                        }
                        if rng.random_bool(0.3) {
                            self.prompts.push(prompt);
                        }
                        // The creation itself succeeded; a failed append is checked below.
                        rest.map_or(Ok(()), |()| Ok(()))
                    }
                    Err(e) => Err(e),
                }
            }
            _ if ids.is_empty() => Ok(()),
            20..=49 => {
                let id = pick(rng);
                let new: Vec<u32> = (0..rng.random_range(1..20)).map(|_| rng.random_range(0..vocab)).collect();
                self.append(id, &new)
            }
            50..=64 => {
                let id = pick(rng);
                let len = self.reference[&id].1.len();
                let upto = rng.random_range(0..=len);
                // Identical content either way: half of the new blocks
                // take over their address from an older copy.
                self.cache.mark_computed_superseding(id, upto, |_, _| rng.random_bool(0.5))
            }
            65..=74 => {
                let id = pick(rng);
                self.cache.fork(id).map(|child| {
                    let entry = self.reference[&id].clone();
                    self.reference.insert(child, entry);
                })
            }
            75..=84 => {
                let id = pick(rng);
                let len = self.reference[&id].1.len();
                let to = rng.random_range(0..=len);
                self.cache.truncate(id, to).map(|()| {
                    self.reference.get_mut(&id).expect("tracked").1.truncate(to);
                })
            }
            _ => {
                let id = pick(rng);
                self.cache.remove(id).map(|()| {
                    self.reference.remove(&id);
                })
            }
        };
        match result {
            Ok(()) => {}
            Err(Error::Exhausted { .. } | Error::QuotaExceeded { .. } | Error::WindowReleased { .. }) => {
                // An append inside create may fail after the sequence exists; that
                // sequence is tracked, so compare only the sequences that existed.
                if op >= 20 {
                    assert_eq!(self.state(), before, "a failed operation changed the state");
                }
            }
            Err(e) => panic!("unexpected error {e}"),
        }
        // Keep the pool from filling up with sequences forever.
        if self.reference.len() > 24 {
            let mut ids: Vec<_> = self.reference.keys().copied().collect();
            ids.sort();
            let id = ids[rng.random_range(0..ids.len())];
            self.cache.remove(id).expect("live");
            self.reference.remove(&id);
        }
    }
}

fn run(cfg: &Config, seed: u64) {
    let kind = cfg.window.map_or(AttentionKind::Full, |window| AttentionKind::SlidingWindow { window });
    let spec = CacheSpec::new(CacheSpecParams {
        block_size: cfg.block_size,
        ..CacheSpecParams::uniform(1, kind, 1, 4, cfg.num_blocks)
    })
    .expect("valid");
    let bs = spec.block_size();
    let mut cache = KvCache::new(spec);
    let owners = vec![owner("a"), owner("b"), owner("c")];
    cache.set_quota(&owners[2], Some(cfg.num_blocks / 4));
    let mut rng = StdRng::seed_from_u64(seed);
    let prompts =
        (0..4).map(|_| (0..rng.random_range(0..40)).map(|_| rng.random_range(0..cfg.vocab)).collect()).collect();
    let mut h = Harness {
        cache,
        model: SimModel { bs, payload: vec![None; cfg.num_blocks as usize * bs] },
        reference: HashMap::new(),
        owners,
        namespaces: vec![Namespace::new(b"m", b""), Namespace::new(b"m", b"tenant-2")],
        prompts,
    };
    for round in 0..cfg.rounds {
        h.step(&mut rng, cfg.vocab);
        h.check(&format!("seed {seed} round {round}"));
    }
    let ids: Vec<_> = h.reference.keys().copied().collect();
    for id in ids {
        h.cache.remove(id).expect("live");
    }
    let st = h.cache.stats();
    assert_eq!(st.used_blocks, 0, "seed {seed}: blocks leaked");
    assert_eq!(st.free_blocks + st.cached_blocks, st.total_blocks);
    h.cache.check_invariants().expect("empty cache is consistent");
}

#[test]
fn matches_reference_with_a_wide_vocabulary() {
    for seed in 0..8 {
        run(&Config { block_size: 4, num_blocks: 96, vocab: 1000, window: None, rounds: 2500 }, seed);
    }
}

#[test]
fn matches_reference_with_a_two_token_vocabulary_forcing_heavy_sharing() {
    for seed in 100..108 {
        run(&Config { block_size: 2, num_blocks: 64, vocab: 2, window: None, rounds: 2500 }, seed);
    }
}

#[test]
fn matches_reference_under_a_sliding_window() {
    for seed in 200..206 {
        run(&Config { block_size: 4, num_blocks: 96, vocab: 3, window: Some(10), rounds: 2500 }, seed);
    }
}
