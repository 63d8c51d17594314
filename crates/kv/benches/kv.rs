//! Criterion benchmarks of the KV core. Targets (issue #2): an uncontended
//! block operation at or under 100 ns; a prefix match of an 8k-token prompt
//! at or under 50 µs.
//!
//! `cargo bench -p kv` runs them all; `cargo bench -p kv -- prefix` a group.
#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::hint::black_box;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kv::{AttentionKind, CacheSpec, CacheSpecParams, KvCache, Namespace, OwnerId, SharedKvCache};

fn spec(num_blocks: u32) -> CacheSpec {
    // The default model's layout: 30 layers, 3 KV heads of 64, blocks of 16.
    CacheSpec::new(CacheSpecParams::uniform(30, AttentionKind::Full, 3, 64, num_blocks)).expect("valid")
}

fn owner() -> OwnerId {
    OwnerId::new("bench").expect("valid")
}

fn ns() -> Namespace {
    Namespace::new(b"smollm2-135m-q4_1", b"")
}

fn prompt(len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| i.wrapping_mul(2_654_435_761) % 49_152).collect()
}

fn block_ops(c: &mut Criterion) {
    let mut g = c.benchmark_group("block");
    let who = owner();
    let mut core = KvCache::new(spec(4096));
    g.bench_function("allocate+free/core", |b| {
        b.iter(|| {
            let blocks = core.allocate(&who, 1).expect("room");
            core.free(&who, black_box(&blocks)).expect("held");
        })
    });
    let shared = SharedKvCache::new(spec(4096));
    g.bench_function("allocate+free/shared", |b| b.iter(|| drop(black_box(shared.allocate(&who, 1).expect("room")))));
    g.bench_function("allocate+free/shared x16", |b| {
        b.iter(|| drop(black_box(shared.allocate(&who, 16).expect("room"))))
    });
    g.finish();
}

fn sequence_ops(c: &mut Criterion) {
    let mut g = c.benchmark_group("sequence");
    let who = owner();
    let shared = SharedKvCache::new(spec(8192));
    // Append one token at a time, as decode does; the sequence is recycled
    // every 4096 tokens outside the timed region.
    let appends = |iters: u64, mark: bool| {
        let mut total = Duration::ZERO;
        let mut left = iters;
        while left > 0 {
            let n = left.min(4096);
            let seq = shared.create_sequence(&who, ns()).expect("ok");
            let start = Instant::now();
            for t in 0..n as u32 {
                black_box(shared.append(seq.id(), &[t]).expect("room"));
                if mark {
                    shared.mark_computed(seq.id(), t as usize + 1).expect("appended");
                }
            }
            total += start.elapsed();
            left -= n;
        }
        total
    };
    g.bench_function("append 1 token", |b| b.iter_custom(|iters| appends(iters, false)));
    g.bench_function("append+mark_computed 1 token", |b| b.iter_custom(|iters| appends(iters, true)));
    let base = shared.create_sequence(&who, ns()).expect("ok");
    shared.append(base.id(), &prompt(1000)).expect("room");
    g.bench_function("fork+remove of a 1000-token sequence", |b| {
        b.iter(|| drop(black_box(shared.fork(base.id()).expect("alive"))))
    });
    g.finish();
}

fn prefix_ops(c: &mut Criterion) {
    let mut g = c.benchmark_group("prefix");
    let who = owner();
    let shared = SharedKvCache::new(spec(2048));
    for len in [1024usize, 8192] {
        let tokens = prompt(len);
        let seq = shared.create_sequence(&who, ns()).expect("ok");
        shared.append(seq.id(), &tokens).expect("room");
        shared.mark_computed(seq.id(), len).expect("appended");
        drop(seq); // its blocks stay cached
        g.throughput(Throughput::Elements(len as u64));
        g.bench_with_input(BenchmarkId::new("match (hash + lookup)", len), &tokens, |b, t| {
            b.iter(|| assert_eq!(shared.lookup_prefix(ns(), black_box(t)).expect("ok"), len))
        });
        g.bench_with_input(BenchmarkId::new("adopt + release", len), &tokens, |b, t| {
            b.iter(|| drop(black_box(shared.create_with_prefix(&who, ns(), t).expect("ok"))))
        });
    }
    g.finish();
}

/// The same operations from 1, 2, 4 and 8 threads at once; reported time is
/// wall time per operation over all threads (so lower means more aggregate
/// throughput; on two cores more than two threads only adds contention).
fn contended(c: &mut Criterion) {
    let mut g = c.benchmark_group("contended");
    g.measurement_time(Duration::from_secs(3));
    let tokens = prompt(1024);
    for threads in [1usize, 2, 4, 8] {
        let shared = SharedKvCache::new(spec(8192));
        {
            let seq = shared.create_sequence(&owner(), ns()).expect("ok");
            shared.append(seq.id(), &tokens).expect("room");
            shared.mark_computed(seq.id(), tokens.len()).expect("ok");
        }
        let run = |iters: u64, op: &(dyn Fn(&SharedKvCache, &OwnerId) + Sync)| {
            let per = iters.div_ceil(threads as u64);
            let barrier = Barrier::new(threads + 1);
            thread::scope(|s| {
                for t in 0..threads {
                    let (shared, barrier) = (&shared, &barrier);
                    s.spawn(move || {
                        let who = OwnerId::new(format!("t{t}")).expect("valid");
                        barrier.wait();
                        for _ in 0..per {
                            op(shared, &who);
                        }
                        barrier.wait();
                    });
                }
                barrier.wait();
                let start = Instant::now();
                barrier.wait();
                start.elapsed()
            })
        };
        g.bench_function(BenchmarkId::new("allocate+free", threads), |b| {
            b.iter_custom(|iters| run(iters, &|c, w| drop(black_box(c.allocate(w, 1).expect("room")))))
        });
        g.bench_function(BenchmarkId::new("append 16 + remove", threads), |b| {
            b.iter_custom(|iters| {
                run(iters, &|c, w| {
                    let s = c.create_sequence(w, ns()).expect("ok");
                    black_box(c.append(s.id(), &tokens[..16]).expect("room"));
                })
            })
        });
        g.bench_function(BenchmarkId::new("fork+remove", threads), |b| {
            b.iter_custom(|iters| {
                let base = shared.create_with_prefix(&owner(), ns(), &tokens).expect("ok").0;
                let id = base.id();
                run(iters, &move |c, _| drop(black_box(c.fork(id).expect("alive"))))
            })
        });
        g.bench_function(BenchmarkId::new("prefix match 1k", threads), |b| {
            b.iter_custom(|iters| run(iters, &|c, _| assert_eq!(c.lookup_prefix(ns(), &tokens).expect("ok"), 1024)))
        });
    }
    g.finish();
}

criterion_group!(benches, block_ops, sequence_ops, prefix_ops, contended);
criterion_main!(benches);
