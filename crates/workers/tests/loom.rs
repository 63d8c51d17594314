//! Loom models of the step pool's handshake, run against the real `Pool`
//! (a `--cfg loom` build swaps its atomics, mutexes and condition variable
//! for loom's, and makes an idle worker park at once, so the park/wake path
//! is explored too). Every interleaving of the threads is checked.
//!
//! Run with:
//! `RUSTFLAGS="--cfg loom" cargo test -p workers --test loom --release --target-dir target/loom`
#![cfg(loom)]
#![allow(unsafe_code)] // loom's UnsafeCell: the race detector for the job's data

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;
use workers::Pool;

/// One cell per task.
struct Cells(Vec<UnsafeCell<u32>>);

// SAFETY: each task touches only its own cell, and the caller reads them
// only after `run` returns: exactly the claim under test, which loom's
// UnsafeCell checks on every access.
unsafe impl Sync for Cells {}

impl Cells {
    fn new(n: usize) -> Self {
        Self((0..n).map(|_| UnsafeCell::new(0)).collect())
    }

    fn bump(&self, i: usize) {
        self.0[i].with_mut(|c| unsafe { *c += 1 });
    }

    fn assert_each_once(&self, region: usize) {
        for (i, c) in self.0.iter().enumerate() {
            c.with_mut(|c| assert_eq!(unsafe { *c }, 1, "region {region} task {i} ran once"));
        }
    }
}

/// The shape every model below checks: `workers` threads, each serving
/// `serves` times, and one region of `tasks[r]` tasks per entry on the
/// caller, each checked to have run every task once; then the pool stops
/// (waking a worker still parked) and every worker is joined. Preemptions
/// are bounded by `bound`.
fn model(bound: usize, workers: usize, serves: usize, tasks: &'static [usize]) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(bound);
    b.check(move || {
        let pool = Arc::new(Pool::new(workers));
        let threads: Vec<_> = (0..workers)
            .map(|_| {
                let pool = pool.clone();
                thread::spawn(move || {
                    let mut epoch = 0;
                    for _ in 0..serves {
                        pool.serve(&mut epoch);
                    }
                })
            })
            .collect();
        for (region, &n) in tasks.iter().enumerate() {
            let cells = Cells::new(n);
            pool.run(n, &|i| cells.bump(i));
            cells.assert_each_once(region);
        }
        pool.stop();
        for t in threads {
            t.join().expect("the worker finishes");
        }
    });
}

/// One region with a worker that may be spinning, registering late, or
/// parked: every task runs exactly once, and when `run` returns no worker
/// still touches the job's data. Each task writes its own cell and the
/// caller then reads them all; a worker still inside the job would be a
/// data race, which loom reports.
#[test]
fn a_region_runs_every_task_once_and_no_worker_outlives_it() {
    model(3, 1, 2, &[2]);
}

/// Two regions back to back with the worker between them: a worker that
/// served the first never re-enters it, and the second region's tasks run
/// once each whether or not the worker joins it.
#[test]
fn back_to_back_regions_keep_their_tasks_apart() {
    model(2, 1, 2, &[2, 2]);
}

/// Two workers and three tasks: any split of the tasks among three threads
/// runs each exactly once, and a worker parked through the whole region is
/// woken by the stop, not lost.
#[test]
fn two_workers_share_a_region() {
    model(2, 2, 1, &[3]);
}
