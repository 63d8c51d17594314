//! Loom models of the races that matter, run against the real
//! `SharedKvCache` (its lock comes from `kv::sync`, which a `--cfg loom`
//! build points at loom). Every interleaving of the threads is explored.
//!
//! Run with:
//! `RUSTFLAGS="--cfg loom" cargo test -p kv --test loom --release --target-dir target/loom`
#![cfg(loom)]

use kv::{AttentionKind, CacheSpec, CacheSpecParams, Error, Namespace, OwnerId, SharedKvCache};
use loom::thread;

fn cache(num_blocks: u32, block_size: u32) -> SharedKvCache {
    SharedKvCache::new(
        CacheSpec::new(CacheSpecParams {
            block_size,
            ..CacheSpecParams::uniform(1, AttentionKind::Full, 1, 4, num_blocks)
        })
        .expect("valid"),
    )
}

fn who(name: &str) -> OwnerId {
    OwnerId::new(name).expect("valid")
}

fn ns() -> Namespace {
    Namespace::new(b"loom", b"")
}

#[test]
fn allocate_races_free() {
    loom::model(|| {
        let c = cache(3, 2);
        let held = c.allocate(&who("a"), 2).expect("fresh pool");
        let c1 = c.clone();
        let freer = thread::spawn(move || drop(held));
        let c2 = c.clone();
        let taker = thread::spawn(move || c2.allocate(&who("b"), 2));
        freer.join().expect("no panic");
        let got = taker.join().expect("no panic");
        match &got {
            Ok(a) => assert_eq!(a.blocks().len(), 2),
            Err(Error::Exhausted { requested: 2, available: 1 }) => {}
            Err(e) => panic!("unexpected {e}"),
        }
        c1.check_invariants().expect("consistent");
        drop(got);
        let st = c.stats().expect("not poisoned");
        assert_eq!((st.free_blocks, st.used_blocks), (3, 0));
    });
}

#[test]
fn last_reference_drop_races_an_allocation_that_needs_eviction() {
    loom::model(|| {
        let c = cache(2, 2);
        let a = who("a");
        let seq = c.create_sequence(&a, ns()).expect("not poisoned");
        c.append(seq.id(), &[1, 2, 3, 4]).expect("two blocks");
        c.mark_computed(seq.id(), 4).expect("appended");
        let dropper = thread::spawn(move || drop(seq));
        let c2 = c.clone();
        let taker = thread::spawn(move || c2.allocate(&who("b"), 1));
        let c3 = c.clone();
        let adopter = thread::spawn(move || c3.create_with_prefix(&who("c"), ns(), &[1, 2, 3, 4]));
        dropper.join().expect("no panic");
        let got = taker.join().expect("no panic");
        let (adopted_seq, adopted) = adopter.join().expect("no panic").expect("adoption never fails here");
        c.check_invariants().expect("consistent");
        match &got {
            // Before the drop nothing is free or evictable; after it, one block is evicted.
            Err(Error::Exhausted { requested: 1, available: 0 }) => {}
            Ok(_) => assert_eq!(c.stats().expect("ok").evictions, 1),
            Err(e) => panic!("unexpected {e}"),
        }
        // Whatever the adopter got is a prefix whose blocks nobody can evict now.
        assert!(adopted == 0 || adopted == 2 || adopted == 4);
        assert_eq!(c.seq_len(adopted_seq.id()).expect("alive"), adopted);
        drop(got);
        drop(adopted_seq);
        let st = c.stats().expect("ok");
        assert_eq!(st.used_blocks, 0);
        c.check_invariants().expect("consistent");
    });
}

#[test]
fn fork_races_removal_of_the_parent() {
    loom::model(|| {
        let c = cache(4, 2);
        let parent = c.create_sequence(&who("a"), ns()).expect("ok").detach();
        c.append(parent, &[7, 8, 9]).expect("two blocks");
        let c1 = c.clone();
        let forker = thread::spawn(move || c1.fork(parent));
        let c2 = c.clone();
        let remover = thread::spawn(move || c2.remove(parent));
        let child = forker.join().expect("no panic");
        remover.join().expect("no panic").expect("removed exactly once");
        c.check_invariants().expect("consistent");
        match child {
            Ok(child) => {
                assert_eq!(c.tokens(child.id()).expect("alive"), vec![7, 8, 9]);
                assert_eq!(c.stats().expect("ok").used_blocks, 2);
                // The child now owns the formerly shared partial block alone.
                assert_eq!(c.append(child.id(), &[10]).expect("room").copy, None);
            }
            Err(e) => assert_eq!(e, Error::UnknownSequence(parent)),
        }
        let st = c.stats().expect("ok");
        assert_eq!((st.used_blocks, st.sequences), (0, 0));
        c.check_invariants().expect("consistent");
    });
}
