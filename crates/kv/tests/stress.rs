//! Stress: 128 threads doing random allocate / create-with-prefix / append /
//! mark-computed / fork / truncate / remove / lookup / read on one shared
//! cache for three phases, on each other's sequences too. Invariants are
//! checked by every thread as it goes (under the lock, so on a consistent
//! state) and by the main thread between phases, while all workers wait. A
//! watchdog fails the test instead of hanging if anything deadlocks. At the
//! end every handle is dropped and the pool must be whole again.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{owner, with_watchdog};
use kv::{
    AttentionKind, BlockAllocation, CacheSpec, CacheSpecParams, Error, Namespace, SeqHandle, SeqId, SharedKvCache,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const THREADS: usize = 128;
const PHASES: usize = 3;
const PHASE_TIME: Duration = Duration::from_millis(1000);

fn stress(spec: CacheSpec, seed: u64) {
    let cache = SharedKvCache::new(spec);
    cache.set_quota(&owner("capped"), Some(40)).expect("not poisoned");
    // Sequences any thread may fork, read or remove.
    let public: Arc<Mutex<Vec<SeqId>>> = Arc::new(Mutex::new(Vec::new()));
    let barrier = Arc::new(Barrier::new(THREADS + 1));
    let ops = Arc::new(AtomicU64::new(0));
    let prompts: Arc<Vec<Vec<u32>>> =
        Arc::new((0..6u32).map(|p| (0..(p * 23 % 97)).map(|i| (i * (p + 1)) % 5).collect()).collect());

    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (cache, public, barrier, ops, prompts) =
                (cache.clone(), public.clone(), barrier.clone(), ops.clone(), prompts.clone());
            thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed * 1000 + t as u64);
                let who = owner(["a", "b", "capped", "d"][t % 4]);
                let ns = Namespace::new(b"stress", if t % 8 == 0 { b"other-tenant" } else { b"" });
                let mut mine: Vec<SeqHandle> = Vec::new();
                let mut raw: Vec<BlockAllocation> = Vec::new();
                for _ in 0..PHASES {
                    barrier.wait();
                    let until = Instant::now() + PHASE_TIME;
                    let mut n = 0u64;
                    while Instant::now() < until {
                        n += 1;
                        let target = if rng.random_bool(0.7) || mine.is_empty() {
                            let p = public.lock().expect("registry");
                            (!p.is_empty()).then(|| p[rng.random_range(0..p.len())])
                        } else {
                            Some(mine[rng.random_range(0..mine.len())].id())
                        };
                        let outcome: Result<(), Error> = match rng.random_range(0..100) {
                            0..=14 => {
                                let mut prompt = prompts[rng.random_range(0..prompts.len())].clone();
                                prompt.extend((0..rng.random_range(0..8)).map(|_| rng.random_range(0..5)));
                                cache.create_with_prefix(&who, ns, &prompt).and_then(|(h, adopted)| {
                                    let id = h.id();
                                    if rng.random_bool(0.3) {
                                        public.lock().expect("registry").push(id);
                                    }
                                    mine.push(h);
                                    // Another thread may truncate a public sequence at any
                                    // time: append and mark under one lock.
                                    cache.with(|c| {
                                        c.append(id, &prompt[adopted..])?;
                                        let len = c.seq_len(id)?;
                                        c.mark_computed(id, len)
                                    })?
                                })
                            }
                            15..=39 => target.map_or(Ok(()), |id| {
                                let new: Vec<u32> =
                                    (0..rng.random_range(1..6)).map(|_| rng.random_range(0..5)).collect();
                                cache.append(id, &new).map(|_| ())
                            }),
                            40..=49 => target.map_or(Ok(()), |id| {
                                // Check and act under one lock (a separate seq_len
                                // call could be stale by the time we act).
                                cache.with(|c| c.seq_len(id).and_then(|len| c.mark_computed(id, len)))?
                            }),
                            50..=57 => target.map_or(Ok(()), |id| cache.fork(id).map(|h| mine.push(h))),
                            58..=64 => target.map_or(Ok(()), |id| {
                                let cut = rng.random_range(0..=8);
                                cache.with(|c| c.seq_len(id).and_then(|len| c.truncate(id, len.saturating_sub(cut))))?
                            }),
                            65..=74 => {
                                if !mine.is_empty() {
                                    mine.swap_remove(rng.random_range(0..mine.len()));
                                }
                                Ok(())
                            }
                            75..=79 => target.map_or(Ok(()), |id| cache.remove(id)),
                            80..=87 => {
                                let p = &prompts[rng.random_range(0..prompts.len())];
                                cache.lookup_prefix(ns, p).map(|n| assert!(n <= p.len()))
                            }
                            88..=93 => {
                                if rng.random_bool(0.5) || raw.is_empty() {
                                    cache.allocate(&who, rng.random_range(1..4)).map(|a| raw.push(a))
                                } else {
                                    raw.swap_remove(rng.random_range(0..raw.len()));
                                    Ok(())
                                }
                            }
                            _ => target.map_or(Ok(()), |id| {
                                let snap = cache.snapshot(id)?;
                                let bs = cache.spec().block_size();
                                assert_eq!(snap.table.logical_len(), snap.tokens.len().div_ceil(bs), "torn read");
                                assert!(snap.computed <= snap.tokens.len());
                                Ok(())
                            }),
                        };
                        match outcome {
                            Ok(())
                            | Err(Error::Exhausted { .. })
                            | Err(Error::QuotaExceeded { .. })
                            | Err(Error::UnknownSequence(_))
                            | Err(Error::WindowReleased { .. }) => {}
                            Err(e) => panic!("unexpected error {e}"),
                        }
                        if n.is_multiple_of(64) {
                            if let Err(v) = cache.check_invariants() {
                                panic!("thread {t}: {v}");
                            }
                        }
                    }
                    ops.fetch_add(n, Ordering::Relaxed);
                    barrier.wait(); // phase over: main checks while we wait
                }
                drop(mine);
                drop(raw);
            })
        })
        .collect();

    for phase in 0..PHASES {
        barrier.wait();
        barrier.wait();
        if let Err(v) = cache.check_invariants() {
            panic!("after phase {phase}: {v}");
        }
    }
    for w in workers {
        w.join().expect("worker panicked");
    }
    // Only the sequences someone removed by id are gone; the rest went with
    // their handles. The pool must be whole again.
    let st = cache.stats().expect("not poisoned");
    assert_eq!(st.sequences, 0);
    assert_eq!(st.used_blocks, 0, "blocks leaked");
    assert_eq!(st.free_blocks + st.cached_blocks, st.total_blocks);
    cache.check_invariants().expect("consistent at the end");
    eprintln!("{} operations, {st:?}", ops.load(Ordering::Relaxed));
    assert!(ops.load(Ordering::Relaxed) > 10_000, "too little work to prove anything");
}

#[test]
fn one_hundred_twenty_eight_threads_of_random_operations_keep_every_invariant() {
    with_watchdog(Duration::from_secs(180), || {
        let spec = CacheSpec::new(CacheSpecParams {
            block_size: 4,
            ..CacheSpecParams::uniform(2, AttentionKind::Full, 1, 8, 512)
        })
        .expect("valid");
        stress(spec, 1);
    });
}

#[test]
fn stress_under_a_sliding_window_keeps_every_invariant() {
    with_watchdog(Duration::from_secs(180), || {
        let spec = CacheSpec::new(CacheSpecParams {
            block_size: 4,
            ..CacheSpecParams::uniform(2, AttentionKind::SlidingWindow { window: 9 }, 1, 8, 512)
        })
        .expect("valid");
        stress(spec, 2);
    });
}
