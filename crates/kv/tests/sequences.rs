//! Single-threaded behaviour of `KvCache`: allocation, copy-on-write,
//! truncation, prefix reuse, eviction order, quotas, namespaces, windows.

mod common;

use common::{cache, computed_seq, ns, owner, shared, sliding_spec};
use kv::{BlockCopy, BlockId, Error, IndexChange, KvCache, Namespace, Slot};

#[test]
fn append_hands_out_one_slot_per_token_and_allocates_lazily() {
    let mut c = cache(8, 4);
    let a = owner("a");
    let s = c.create_sequence(&a, ns());
    let r = c.append(s, &[1, 2, 3]).unwrap();
    assert_eq!(r.copy, None);
    assert_eq!(r.slots.iter().map(|s| s.offset).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert!(r.slots.iter().all(|s| s.block == r.slots[0].block));
    let r2 = c.append(s, &[4, 5]).unwrap();
    assert_eq!(r2.slots[0], Slot { block: r.slots[0].block, offset: 3 });
    assert_ne!(r2.slots[1].block, r.slots[0].block);
    assert_eq!(c.block_table(s).unwrap().blocks().len(), 2);
    assert_eq!(c.tokens(s).unwrap(), &[1, 2, 3, 4, 5]);
    assert_eq!(c.stats().used_blocks, 2);
    c.check_invariants().unwrap();
}

#[test]
fn failed_append_takes_nothing_and_changes_nothing() {
    let mut c = cache(3, 4);
    let a = owner("a");
    let s = computed_seq(&mut c, &a, &[1, 2, 3, 4, 5]);
    let before = (c.snapshot(s).unwrap(), c.stats());
    // Needs 3 more blocks (positions 5..17), only 1 left.
    let err = c.append(s, &[0; 12]).unwrap_err();
    assert_eq!(err, Error::Exhausted { requested: 3, available: 1 });
    assert_eq!((c.snapshot(s).unwrap(), c.stats()), before);
    c.check_invariants().unwrap();
}

#[test]
fn raw_allocation_is_all_or_none_and_double_free_is_a_typed_error() {
    let mut c = cache(4, 4);
    let a = owner("a");
    let got = c.allocate(&a, 3).unwrap();
    assert_eq!(c.allocate(&a, 2), Err(Error::Exhausted { requested: 2, available: 1 }));
    assert_eq!(c.stats().free_blocks, 1);
    c.free(&a, &got[..1]).unwrap();
    assert_eq!(c.free(&a, &got[..1]), Err(Error::NotHeld { block: got[0], owner: a.clone() }));
    // A list naming a block twice is refused whole.
    assert!(matches!(c.free(&a, &[got[1], got[1]]), Err(Error::NotHeld { .. })));
    assert!(matches!(c.free(&owner("b"), &got[1..]), Err(Error::NotHeld { .. })));
    assert!(matches!(c.free(&a, &[BlockId::new(999)]), Err(Error::NotHeld { .. })));
    c.check_invariants().unwrap();
    c.free(&a, &got[1..]).unwrap();
    assert_eq!(c.stats().free_blocks, 4);
    assert_eq!(c.owner_usage(&a).held_blocks, 0);
    c.check_invariants().unwrap();
}

#[test]
fn a_sequence_freed_from_a_block_never_sees_it_again() {
    // Raw blocks cannot be released through another owner's sequence.
    let mut c = cache(4, 4);
    let a = owner("a");
    let s = computed_seq(&mut c, &a, &[1, 2]);
    let table_block = c.block_table(s).unwrap().blocks()[0];
    assert!(matches!(c.free(&a, &[table_block]), Err(Error::NotHeld { .. })));
    c.check_invariants().unwrap();
}

#[test]
fn each_owner_lists_its_own_sequences_forks_included() {
    let mut c = cache(8, 4);
    let (a, b) = (owner("a"), owner("b"));
    let sa = computed_seq(&mut c, &a, &[1, 2]);
    let sb = computed_seq(&mut c, &b, &[1, 2]);
    let fork = c.fork(sa).unwrap();
    let mut of_a = c.sequence_ids_of(&a);
    of_a.sort_unstable();
    let mut expected = vec![sa, fork];
    expected.sort_unstable();
    assert_eq!(of_a, expected);
    assert_eq!(c.sequence_ids_of(&b), vec![sb]);
    assert!(c.sequence_ids_of(&owner("nobody")).is_empty());
    c.remove(sb).unwrap();
    assert!(c.sequence_ids_of(&b).is_empty());
}

#[test]
fn fork_shares_every_block_and_the_first_writer_copies_the_partial_one() {
    let mut c = cache(8, 4);
    let a = owner("a");
    let parent = computed_seq(&mut c, &a, &[1, 2, 3, 4, 5, 6]);
    let used = c.stats().used_blocks;
    let child = c.fork(parent).unwrap();
    assert_eq!(c.stats().used_blocks, used, "a fork costs no block");
    assert_eq!(c.block_table(child).unwrap(), c.block_table(parent).unwrap());
    assert_eq!(c.owner_usage(&a).held_blocks, 2, "shared blocks count once per owner");

    let partial = c.block_table(parent).unwrap().blocks()[1];
    let r = c.append(child, &[70]).unwrap();
    let copy = r.copy.expect("child writes into a shared partial block");
    assert_eq!(copy.src, partial);
    assert_eq!(copy.tokens, 2);
    assert_eq!(r.slots, vec![Slot { block: copy.dst, offset: 2 }]);
    // The parent now owns the partial block alone and writes in place.
    let r = c.append(parent, &[7]).unwrap();
    assert_eq!(r.copy, None);
    assert_eq!(r.slots, vec![Slot { block: partial, offset: 2 }]);
    assert_eq!(c.tokens(child).unwrap(), &[1, 2, 3, 4, 5, 6, 70]);
    assert_eq!(c.tokens(parent).unwrap(), &[1, 2, 3, 4, 5, 6, 7]);
    c.check_invariants().unwrap();
    c.remove(parent).unwrap();
    c.remove(child).unwrap();
    assert_eq!(c.stats().used_blocks, 0);
    c.check_invariants().unwrap();
}

#[test]
fn truncating_into_a_published_block_copies_it_before_the_next_write() {
    let mut c = cache(8, 4);
    let a = owner("a");
    let s = computed_seq(&mut c, &a, &[1, 2, 3, 4, 5, 6, 7, 8]);
    let second = c.block_table(s).unwrap().blocks()[1];
    c.truncate(s, 6).unwrap();
    assert_eq!(c.block_table(s).unwrap().blocks()[1], second);
    let r = c.append(s, &[9]).unwrap();
    assert_eq!(r.copy, Some(BlockCopy { src: second, dst: r.slots[0].block, tokens: 2 }));
    // The published block still serves [1..8] to others.
    assert_eq!(c.lookup_prefix(ns(), &[1, 2, 3, 4, 5, 6, 7, 8]), 8);
    c.check_invariants().unwrap();
}

#[test]
fn truncate_rolls_back_and_frees_blocks() {
    let mut c = cache(8, 4);
    let a = owner("a");
    let s = computed_seq(&mut c, &a, &(0..10).collect::<Vec<_>>());
    assert_eq!(c.truncate(s, 11), Err(Error::TruncateBeyondEnd { seq: s, len: 10, requested: 11 }));
    c.truncate(s, 3).unwrap();
    assert_eq!(c.tokens(s).unwrap(), &[0, 1, 2]);
    assert_eq!(c.computed(s).unwrap(), 3);
    assert_eq!(c.block_table(s).unwrap().blocks().len(), 1);
    c.truncate(s, 0).unwrap();
    assert_eq!(c.block_table(s).unwrap().blocks().len(), 0);
    c.check_invariants().unwrap();
}

#[test]
fn only_computed_blocks_are_adopted_by_new_sequences() {
    let mut c = cache(8, 4);
    let a = owner("a");
    let s = c.create_sequence(&a, ns());
    c.append(s, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
    assert_eq!(c.lookup_prefix(ns(), &[1, 2, 3, 4, 5, 6, 7, 8, 9]), 0, "K/V not written yet");
    c.mark_computed(s, 5).unwrap();
    assert_eq!(c.lookup_prefix(ns(), &[1, 2, 3, 4, 5, 6, 7, 8, 9]), 4);
    c.mark_computed(s, 8).unwrap();
    let (t, adopted) = c.create_with_prefix(&a, ns(), &[1, 2, 3, 4, 5, 6, 7, 8, 9]).unwrap();
    assert_eq!(adopted, 8);
    assert_eq!(c.block_table(t).unwrap(), c.block_table(s).unwrap());
    assert_eq!(c.stats().prefix_hit_tokens, 8);
    assert_eq!(c.stats().prefix_lookup_tokens, 9);
    assert_eq!(c.mark_computed(s, 9), Err(Error::ComputedBeyondEnd { seq: s, len: 8, requested: 9 }));
    c.check_invariants().unwrap();
}

#[test]
fn released_prefixes_stay_cached_and_are_evicted_tail_first() {
    let mut c = cache(4, 2);
    let a = owner("a");
    let s = computed_seq(&mut c, &a, &[1, 2, 3, 4, 5, 6]);
    c.remove(s).unwrap();
    assert_eq!(c.stats().cached_blocks, 3);
    assert_eq!(c.stats().free_blocks, 1);
    // Two blocks needed: the free one, then the chain's tail.
    let t = computed_seq(&mut c, &a, &[9, 9, 9, 9]);
    assert_eq!(c.stats().evictions, 1);
    assert_eq!(c.lookup_prefix(ns(), &[1, 2, 3, 4, 5, 6]), 4, "the head of the chain survives");
    c.remove(t).unwrap();
    c.check_invariants().unwrap();
}

#[test]
fn adopted_blocks_are_no_longer_evictable() {
    let mut c = cache(3, 2);
    let a = owner("a");
    let s = computed_seq(&mut c, &a, &[1, 2, 3, 4]);
    c.remove(s).unwrap();
    let (t, adopted) = c.create_with_prefix(&a, ns(), &[1, 2, 3, 4]).unwrap();
    assert_eq!(adopted, 4);
    assert_eq!(c.stats().cached_blocks, 0);
    assert_eq!(c.allocate(&a, 2), Err(Error::Exhausted { requested: 2, available: 1 }));
    c.remove(t).unwrap();
    c.check_invariants().unwrap();
}

#[test]
fn namespaces_never_share_blocks() {
    let mut c = cache(8, 4);
    let a = owner("a");
    let tenant_b = Namespace::new(b"test-model", b"tenant-b");
    let other_model = Namespace::new(b"other-model", b"");
    computed_seq(&mut c, &a, &[1, 2, 3, 4, 5]);
    assert_eq!(c.lookup_prefix(ns(), &[1, 2, 3, 4, 5]), 4);
    assert_eq!(c.lookup_prefix(tenant_b, &[1, 2, 3, 4, 5]), 0);
    assert_eq!(c.lookup_prefix(other_model, &[1, 2, 3, 4, 5]), 0);
    let (t, adopted) = c.create_with_prefix(&a, tenant_b, &[1, 2, 3, 4, 5]).unwrap();
    assert_eq!(adopted, 0);
    c.append(t, &[1, 2, 3, 4]).unwrap();
    c.mark_computed(t, 4).unwrap();
    assert_eq!(c.stats().used_blocks, 3, "tenant b computed its own copy");
    c.check_invariants().unwrap();
}

#[test]
fn quotas_bound_distinct_blocks_per_owner() {
    let mut c = cache(16, 4);
    let a = owner("agent-a");
    c.set_quota(&a, Some(2));
    let s = computed_seq(&mut c, &a, &[1, 2, 3, 4, 5, 6]);
    let err = c.append(s, &[0; 4]).unwrap_err();
    assert_eq!(err, Error::QuotaExceeded { owner: a.clone(), quota: 2, held: 2, requested: 1 });
    // A fork costs no quota; its copy-on-write does.
    let f = c.fork(s).unwrap();
    assert!(matches!(c.append(f, &[7]), Err(Error::QuotaExceeded { .. })));
    assert!(matches!(c.allocate(&a, 1), Err(Error::QuotaExceeded { .. })));
    // Another owner adopting a's prefix is charged for it, within its own quota.
    let b = owner("agent-b");
    c.set_quota(&b, Some(0));
    assert!(matches!(c.create_with_prefix(&b, ns(), &[1, 2, 3, 4]), Err(Error::QuotaExceeded { .. })));
    c.set_quota(&b, None);
    let (t, adopted) = c.create_with_prefix(&b, ns(), &[1, 2, 3, 4]).unwrap();
    assert_eq!(adopted, 4);
    assert_eq!(c.owner_usage(&b).held_blocks, 1);
    c.set_quota(&a, None);
    c.append(f, &[7]).unwrap();
    c.check_invariants().unwrap();
    for id in [s, f, t] {
        c.remove(id).unwrap();
    }
    assert_eq!(c.owner_usage(&a).held_blocks, 0);
    c.check_invariants().unwrap();
}

#[test]
fn sliding_window_layers_hold_a_bounded_number_of_blocks() {
    // Window 8 tokens, blocks of 4: at most ceil(8/4) + 1 = 3 blocks held.
    let mut c = KvCache::new(sliding_spec(6, 4, 8));
    let a = owner("a");
    let s = c.create_sequence(&a, ns());
    for t in 0..100u32 {
        c.append(s, &[t]).unwrap();
        c.mark_computed(s, t as usize + 1).unwrap();
        assert!(c.block_table(s).unwrap().blocks().len() <= 3, "at {t}");
        c.check_invariants().unwrap();
    }
    let table = c.block_table(s).unwrap();
    // The next query (position 100) reads 93..=100; block 23 starts at 92.
    assert_eq!(table.first_block(), 23);
    assert!(table.slot(92, 4).is_some() && table.slot(91, 4).is_none());
    // At length 97 the next query would read from 90, in released block 22.
    assert_eq!(c.truncate(s, 97), Err(Error::WindowReleased { seq: s, requested: 97, earliest: 92 }));
    c.truncate(s, 99).unwrap();
    c.check_invariants().unwrap();
}

#[test]
fn sixteen_sequences_with_a_common_1024_token_prefix_hold_it_once() {
    let mut c = cache(1024, 16);
    let a = owner("a");
    let prefix: Vec<u32> = (0..1024).map(|i| i * 7 % 49152).collect();
    let first = computed_seq(&mut c, &a, &prefix);
    let mut seqs = vec![first];
    for i in 0..15u32 {
        let mut prompt = prefix.clone();
        prompt.extend([50_000 + i; 20]);
        let (s, adopted) = c.create_with_prefix(&a, ns(), &prompt).unwrap();
        assert_eq!(adopted, 1024);
        c.append(s, &prompt[adopted..]).unwrap();
        seqs.push(s);
    }
    // 64 prefix blocks once, plus 2 blocks of suffix for each of 15 sequences.
    assert_eq!(c.stats().used_blocks, 64 + 15 * 2);
    let shared_part = c.block_table(first).unwrap().blocks().to_vec();
    for &s in &seqs {
        assert_eq!(&c.block_table(s).unwrap().blocks()[..64], &shared_part[..]);
    }
    c.check_invariants().unwrap();
}

#[test]
fn dropping_handles_returns_every_block() {
    let c = shared(16, 4);
    let a = owner("a");
    {
        let alloc = c.allocate(&a, 3).unwrap();
        let s = c.create_sequence(&a, ns()).unwrap();
        c.append(s.id(), &[1; 9]).unwrap();
        let f = c.fork(s.id()).unwrap();
        c.append(f.id(), &[2]).unwrap();
        assert_eq!(c.stats().unwrap().used_blocks, 3 + 3 + 1);
        drop(alloc);
        c.check_invariants().unwrap();
    }
    let st = c.stats().unwrap();
    assert_eq!((st.free_blocks, st.used_blocks, st.sequences), (16, 0, 0));
    assert_eq!(c.owner_usage(&a).unwrap().held_blocks, 0);
    c.check_invariants().unwrap();

    let kept = c.create_sequence(&a, ns()).unwrap().detach();
    assert_eq!(c.stats().unwrap().sequences, 1);
    c.remove(kept).unwrap();
    assert_eq!(c.remove(kept), Err(Error::UnknownSequence(kept)));
}

#[test]
fn unknown_sequences_are_typed_errors_everywhere() {
    let mut c = cache(4, 4);
    let a = owner("a");
    let s = c.create_sequence(&a, ns());
    c.remove(s).unwrap();
    let e = Error::UnknownSequence(s);
    assert_eq!(c.append(s, &[1]).unwrap_err(), e);
    assert_eq!(c.fork(s).unwrap_err(), e);
    assert_eq!(c.truncate(s, 0).unwrap_err(), e);
    assert_eq!(c.mark_computed(s, 0).unwrap_err(), e);
    assert_eq!(c.tokens(s).unwrap_err(), e);
    assert_eq!(c.block_table(s).unwrap_err(), e);
    assert_eq!(c.remove(s).unwrap_err(), e);
}

#[test]
fn append_cost_counts_new_blocks_and_the_copy_of_a_shared_partial_block() {
    let mut c = cache(16, 4);
    let a = owner("a");
    let s = computed_seq(&mut c, &a, &[1, 2, 3, 4, 5]);
    assert_eq!(c.append_cost(s, 0).unwrap(), 0);
    assert_eq!(c.append_cost(s, 3).unwrap(), 0, "fits the partial block");
    assert_eq!(c.append_cost(s, 4).unwrap(), 1);
    let f = c.fork(s).unwrap();
    // The fork shares the partial block: its first append copies it.
    assert_eq!(c.append_cost(f, 1).unwrap(), 1);
    assert_eq!(c.append_cost(f, 8).unwrap(), 3);
    let used = c.stats().used_blocks;
    c.append(f, &[0; 8]).unwrap();
    assert_eq!(c.stats().used_blocks - used, 3, "the cost was exact");
    c.remove(f).unwrap();
    assert_eq!(c.append_cost(f, 1), Err(Error::UnknownSequence(f)));
    c.check_invariants().unwrap();
}

#[test]
fn evictions_are_reported_with_their_keys_only_while_asked() {
    let mut c = common::cache(2, 2);
    let a = common::owner("a");
    let ns = Namespace::new(b"m", b"");
    let s = c.create_sequence(&a, ns);
    c.append(s, &[1, 2, 3, 4]).unwrap();
    c.mark_computed(s, 4).unwrap();
    let hashes = c.block_hashes(s).unwrap().to_vec();
    assert_eq!(hashes.len(), 2);
    c.remove(s).unwrap();
    // Off: the pool evicts silently.
    let t = c.create_sequence(&a, Namespace::new(b"m", b"other"));
    c.append(t, &[9]).unwrap();
    assert!(c.take_evicted().is_empty());
    c.remove(t).unwrap();
    // On: the next eviction is reported with the block's whole key.
    c.report_evictions(true);
    let u = c.create_sequence(&a, Namespace::new(b"m", b"other"));
    c.append(u, &[9, 9, 9]).unwrap();
    let ev = c.take_evicted();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].key.hash, hashes[0], "the surviving head of the chain went last");
    assert_eq!(ev[0].key.tokens.as_ref(), &[1, 2]);
    assert_eq!(ev[0].key.parent, None);
    assert!(ev[0].key.is_consistent());
    assert!(c.take_evicted().is_empty(), "taken once");
    c.check_invariants().unwrap();
}

#[test]
fn evict_cached_moves_only_unreferenced_blocks_out() {
    let mut c = common::cache(4, 2);
    c.report_evictions(true);
    let a = common::owner("a");
    let ns = Namespace::new(b"m", b"");
    let s = c.create_sequence(&a, ns);
    c.append(s, &[1, 2, 3, 4]).unwrap();
    c.mark_computed(s, 4).unwrap();
    let hashes = c.block_hashes(s).unwrap().to_vec();
    assert_eq!(c.evict_cached(&hashes), 0, "in use: left alone");
    c.remove(s).unwrap();
    assert!(c.is_indexed(hashes[0]));
    assert_eq!(c.evict_cached(&hashes), 2);
    assert!(!c.is_indexed(hashes[0]));
    assert_eq!(c.take_evicted().len(), 2);
    let st = c.stats();
    assert_eq!((st.free_blocks, st.cached_blocks, st.evictions), (4, 0, 2));
    c.check_invariants().unwrap();
}

/// A block computed again (its cached copy was unusable to the caller)
/// takes the old copy's place in the prefix index when asked: later
/// lookups adopt the new block; the old one, cached or still held, is
/// freed rather than cached once nobody holds it.
#[test]
fn a_recomputed_block_supersedes_its_older_copy_when_asked() {
    let mut c = cache(8, 4);
    let a = owner("a");
    let tokens = [1, 2, 3, 4, 5, 6, 7, 8];
    // `old` holds the first copy (used); a cached copy of the second block
    // goes with it when `old` is removed below.
    let old = computed_seq(&mut c, &a, &tokens);
    let old_blocks = c.block_table(old).unwrap().blocks().to_vec();
    // A second sequence computes the same tokens without adopting them.
    let new = c.create_sequence(&a, ns());
    c.append(new, &tokens).unwrap();
    let new_blocks = c.block_table(new).unwrap().blocks().to_vec();
    assert!(new_blocks.iter().all(|b| !old_blocks.contains(b)));
    // Only the first block is superseded.
    let mut asked = Vec::new();
    c.mark_computed_superseding(new, 8, |indexed, ours| {
        asked.push((indexed, ours));
        ours == new_blocks[0]
    })
    .unwrap();
    assert_eq!(asked, vec![(old_blocks[0], new_blocks[0]), (old_blocks[1], new_blocks[1])]);
    c.check_invariants().unwrap();
    let (probe, adopted) = c.create_with_prefix(&a, ns(), &tokens).unwrap();
    assert_eq!(adopted, 8);
    assert_eq!(c.block_table(probe).unwrap().blocks(), &[new_blocks[0], old_blocks[1]]);
    c.remove(probe).unwrap();
    // The superseded block is freed with its last holder; the other stays cached.
    let free = c.stats().free_blocks;
    c.remove(old).unwrap();
    assert_eq!(c.stats().free_blocks, free + 1);
    c.check_invariants().unwrap();
    // A cached copy superseded goes to the free list at once.
    c.remove(new).unwrap();
    let (free, cached) = (c.stats().free_blocks, c.stats().cached_blocks);
    let again = c.create_sequence(&a, ns());
    c.append(again, &tokens).unwrap();
    c.mark_computed_superseding(again, 8, |_, _| true).unwrap();
    assert_eq!(c.stats().cached_blocks, cached - 2);
    assert_eq!(c.stats().free_blocks, free, "two blocks taken, the two cached copies freed");
    c.check_invariants().unwrap();
}

/// A superseded block still held by several sequences stays theirs until
/// the last lets go, then is freed (not cached). No longer indexed, it is
/// written in place by a lone holder that truncates into it and appends,
/// where a published block would be copied first.
#[test]
fn a_superseded_block_is_freed_with_its_last_holder_and_written_in_place_by_a_lone_one() {
    let mut c = cache(8, 4);
    let a = owner("a");
    let tokens = [1, 2, 3, 4];
    let old = computed_seq(&mut c, &a, &tokens);
    let fork = c.fork(old).unwrap();
    let stale = c.block_table(old).unwrap().blocks()[0];
    let new = c.create_sequence(&a, ns());
    c.append(new, &tokens).unwrap();
    c.mark_computed_superseding(new, 4, |_, _| true).unwrap();
    c.check_invariants().unwrap();
    // A lone holder's truncation into the superseded block: no copy.
    let free = c.stats().free_blocks;
    c.remove(fork).unwrap();
    assert_eq!(c.stats().free_blocks, free, "still held by the other sequence");
    c.check_invariants().unwrap();
    c.truncate(old, 2).unwrap();
    let r = c.append(old, &[9]).unwrap();
    assert_eq!(r.copy, None, "nobody else reads it: written in place");
    assert_eq!(r.slots[0].block, stale);
    let free = c.stats().free_blocks;
    c.remove(old).unwrap();
    assert_eq!(c.stats().free_blocks, free + 1, "freed, not cached");
    // The new copy is what the index finds.
    let (probe, adopted) = c.create_with_prefix(&a, ns(), &[1, 2, 3, 4, 5]).unwrap();
    assert_eq!((adopted, c.block_table(probe).unwrap().blocks()[0]), (4, c.block_table(new).unwrap().blocks()[0]));
    c.check_invariants().unwrap();
}

#[test]
fn index_changes_are_reported_in_order_publish_then_eviction() {
    let mut c = common::cache(3, 2);
    let a = common::owner("a");
    let ns = Namespace::new(b"m", b"");
    // Off: nothing is kept.
    let s = c.create_sequence(&a, ns);
    c.append(s, &[1, 2]).unwrap();
    c.mark_computed(s, 2).unwrap();
    assert!(c.take_changes().is_empty());
    c.report_changes(true);
    c.append(s, &[3, 4]).unwrap();
    c.mark_computed(s, 4).unwrap();
    let hashes = c.block_hashes(s).unwrap().to_vec();
    assert_eq!(c.take_changes(), vec![IndexChange::Published { hash: hashes[1], parent: Some(hashes[0]) }]);
    let mut published = c.published();
    published.sort();
    let mut want = hashes.clone();
    want.sort();
    assert_eq!(published, want, "the snapshot lists every indexed address");
    c.remove(s).unwrap();
    // Another namespace needs all three blocks: both cached ones go.
    let t = c.create_sequence(&a, Namespace::new(b"m", b"other"));
    c.append(t, &[9, 9, 9, 9, 9]).unwrap();
    let changes = c.take_changes();
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert!(changes.iter().all(|ch| matches!(ch, IndexChange::Unpublished { .. })));
    assert!(c.take_changes().is_empty(), "taken once");
    assert!(c.published().is_empty());
    c.check_invariants().unwrap();
}
