//! Real threads, many of them, on one `SharedKvCache`: the classic failures
//! of block managers (duplicate ids, double frees, over-allocation, torn
//! reads) must not happen. Every test starts its threads on a barrier so they
//! really contend, and checks the invariants at the end.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use common::{ns, owner, shared, with_watchdog};
use kv::{BlockAllocation, Error};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn many_threads_allocating_at_once_get_unique_blocks_within_the_pool() {
    with_watchdog(LIMIT, || {
        for threads in [10, 50, 200] {
            let cache = shared(1000, 16);
            let barrier = Arc::new(Barrier::new(threads));
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let (cache, barrier) = (cache.clone(), barrier.clone());
                    thread::spawn(move || {
                        let who = owner(&format!("t{t}"));
                        barrier.wait();
                        (0..5).map(|_| cache.allocate(&who, 1).expect("1000 blocks suffice")).collect::<Vec<_>>()
                    })
                })
                .collect();
            let allocations: Vec<BlockAllocation> =
                handles.into_iter().flat_map(|h| h.join().expect("no panic")).collect();
            let ids: HashSet<_> = allocations.iter().flat_map(|a| a.blocks().to_vec()).collect();
            assert_eq!(ids.len(), threads * 5, "a block was handed out twice");
            assert!(ids.iter().all(|b| b.index() < 1000));
            assert_eq!(cache.stats().unwrap().used_blocks, threads * 5);
            cache.check_invariants().unwrap();

            // Drop them from many threads at once.
            let barrier = Arc::new(Barrier::new(threads));
            let mut chunks: Vec<Vec<BlockAllocation>> = (0..threads).map(|_| Vec::new()).collect();
            for (i, a) in allocations.into_iter().enumerate() {
                chunks[i % threads].push(a);
            }
            let handles: Vec<_> = chunks
                .into_iter()
                .map(|chunk| {
                    let barrier = barrier.clone();
                    thread::spawn(move || {
                        barrier.wait();
                        drop(chunk);
                    })
                })
                .collect();
            handles.into_iter().for_each(|h| h.join().expect("no panic"));
            let st = cache.stats().unwrap();
            assert_eq!((st.free_blocks, st.used_blocks), (1000, 0));
            cache.check_invariants().unwrap();
        }
    });
}

#[test]
fn concurrent_frees_of_the_same_blocks_free_each_exactly_once() {
    with_watchdog(LIMIT, || {
        let cache = shared(256, 16);
        let who = owner("raw");
        let blocks = cache.with(|c| c.allocate(&who, 256)).unwrap().unwrap();
        let threads = 20;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (cache, barrier, who) = (cache.clone(), barrier.clone(), who.clone());
                let mut order = blocks.clone();
                let mut rng = StdRng::seed_from_u64(t as u64);
                for i in (1..order.len()).rev() {
                    order.swap(i, rng.random_range(0..=i));
                }
                thread::spawn(move || {
                    barrier.wait();
                    let mut freed = 0;
                    for b in order {
                        match cache.with(|c| c.free(&who, &[b])).unwrap() {
                            Ok(()) => freed += 1,
                            Err(Error::NotHeld { .. }) => {}
                            Err(e) => panic!("unexpected {e}"),
                        }
                    }
                    freed
                })
            })
            .collect();
        let freed: usize = handles.into_iter().map(|h| h.join().expect("no panic")).sum();
        assert_eq!(freed, 256, "every block freed exactly once");
        let st = cache.stats().unwrap();
        assert_eq!((st.free_blocks, st.used_blocks), (256, 0));
        cache.check_invariants().unwrap();
    });
}

#[test]
fn mixed_allocate_and_free_from_twenty_threads_ends_consistent() {
    with_watchdog(LIMIT, || {
        let cache = shared(128, 16);
        let threads = 20;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (cache, barrier) = (cache.clone(), barrier.clone());
                thread::spawn(move || {
                    let who = owner(&format!("t{}", t % 5));
                    let mut rng = StdRng::seed_from_u64(1000 + t as u64);
                    let mut held: Vec<BlockAllocation> = Vec::new();
                    barrier.wait();
                    for i in 0..3000 {
                        if rng.random_bool(0.55) {
                            match cache.allocate(&who, rng.random_range(1..=8)) {
                                Ok(a) => held.push(a),
                                Err(Error::Exhausted { .. }) => {}
                                Err(e) => panic!("unexpected {e}"),
                            }
                        } else if !held.is_empty() {
                            held.swap_remove(rng.random_range(0..held.len()));
                        }
                        if i % 300 == 0 {
                            cache.check_invariants().unwrap();
                        }
                    }
                })
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().expect("no panic"));
        let st = cache.stats().unwrap();
        assert_eq!((st.free_blocks, st.used_blocks), (128, 0));
        cache.check_invariants().unwrap();
    });
}

#[test]
fn two_hundred_threads_asking_for_more_than_exists_get_clean_exhausted_outcomes() {
    with_watchdog(LIMIT, || {
        let cache = shared(100, 16);
        let threads = 200;
        let start = Arc::new(Barrier::new(threads));
        let hold = Arc::new(Barrier::new(threads + 1));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (cache, start, hold) = (cache.clone(), start.clone(), hold.clone());
                thread::spawn(move || {
                    let who = owner("greedy");
                    start.wait();
                    let got = cache.allocate(&who, 1 + t % 10);
                    hold.wait(); // keep what we got until everyone has asked
                    hold.wait();
                    got.map(|a| a.blocks().len())
                })
            })
            .collect();
        hold.wait();
        let st = cache.stats().unwrap();
        assert!(st.used_blocks <= 100);
        cache.check_invariants().unwrap();
        hold.wait();
        let mut granted = 0;
        let mut refused = 0;
        for h in handles {
            match h.join().expect("no panic") {
                Ok(n) => granted += n,
                Err(Error::Exhausted { requested, available }) => {
                    assert!(requested > available);
                    refused += 1;
                }
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert!(granted <= 100 && refused > 0, "granted {granted}, refused {refused}");
        assert_eq!(st.used_blocks, granted);
        let st = cache.stats().unwrap();
        assert_eq!((st.free_blocks, st.used_blocks), (100, 0));
        cache.check_invariants().unwrap();
    });
}

#[test]
fn readers_never_see_a_torn_sequence_while_another_thread_appends() {
    with_watchdog(LIMIT, || {
        let cache = shared(512, 4);
        let seq = cache.create_sequence(&owner("writer"), ns()).unwrap();
        let id = seq.id();
        let readers = 8;
        let barrier = Arc::new(Barrier::new(readers + 1));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handles: Vec<_> = (0..readers)
            .map(|_| {
                let (cache, barrier, done) = (cache.clone(), barrier.clone(), done.clone());
                thread::spawn(move || {
                    barrier.wait();
                    let mut last_len = 0;
                    let mut reads = 0u64;
                    while !done.load(std::sync::atomic::Ordering::Acquire) || reads == 0 {
                        let snap = cache.snapshot(id).expect("alive until the writer is done");
                        let len = snap.tokens.len();
                        assert!(len >= last_len, "length went backwards");
                        assert!(snap.tokens.iter().enumerate().all(|(i, &t)| t == i as u32), "torn tokens");
                        assert_eq!(snap.table.logical_len(), len.div_ceil(4), "table does not cover the tokens");
                        assert!(snap.computed <= len);
                        let unique: HashSet<_> = snap.table.blocks().iter().collect();
                        assert_eq!(unique.len(), snap.table.blocks().len());
                        last_len = len;
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        barrier.wait();
        for t in 0..2000u32 {
            cache.append(id, &[t]).unwrap();
            cache.mark_computed(id, t as usize + 1).unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Release);
        for h in handles {
            assert!(h.join().expect("no panic") > 0);
        }
        drop(seq);
        assert_eq!(cache.stats().unwrap().used_blocks, 0);
        cache.check_invariants().unwrap();
    });
}

#[test]
fn removal_while_other_threads_read_gives_typed_errors_never_partial_reads() {
    with_watchdog(LIMIT, || {
        let cache = shared(1024, 4);
        let who = owner("w");
        let ids: Vec<_> = (0..100u32)
            .map(|i| {
                let s = cache.create_sequence(&who, ns()).unwrap().detach();
                cache.append(s, &vec![i; 1 + i as usize % 13]).unwrap();
                s
            })
            .collect();
        let readers = 16;
        let barrier = Arc::new(Barrier::new(readers + 1));
        let handles: Vec<_> = (0..readers)
            .map(|r| {
                let (cache, barrier, ids) = (cache.clone(), barrier.clone(), ids.clone());
                thread::spawn(move || {
                    let mut gone = HashSet::new();
                    barrier.wait();
                    for round in 0..200 {
                        for (i, &id) in ids.iter().enumerate().skip((r + round) % 7) {
                            match cache.snapshot(id) {
                                Ok(snap) => {
                                    assert!(!gone.contains(&id), "{id} came back after removal");
                                    assert_eq!(snap.tokens, vec![i as u32; 1 + i % 13]);
                                    assert_eq!(snap.table.blocks().len(), (1 + i % 13).div_ceil(4));
                                }
                                Err(Error::UnknownSequence(s)) => {
                                    assert_eq!(s, id);
                                    gone.insert(id);
                                }
                                Err(e) => panic!("unexpected {e}"),
                            }
                        }
                    }
                })
            })
            .collect();
        barrier.wait();
        for &id in &ids {
            cache.remove(id).unwrap();
            thread::yield_now();
        }
        handles.into_iter().for_each(|h| h.join().expect("no panic"));
        assert_eq!(cache.stats().unwrap().used_blocks, 0);
        cache.check_invariants().unwrap();
    });
}
