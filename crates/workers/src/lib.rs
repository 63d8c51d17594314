//! Persistent step workers: the parallel regions of a forward pass (every
//! matmul's column runs, the attention tasks) run on threads that stay awake
//! between regions, instead of a rayon region each.
//!
//! Why: a decode step of SmolLM2 opens ~150 parallel regions of tens of
//! microseconds each. A rayon region started from the step's thread costs
//! 5–25 µs here (queueing, waking a worker that went to sleep in the gap,
//! the join latch), measured with a two-thread pool around 10–80 µs tasks;
//! a worker spinning on an atomic word picks the next region up in about
//! 1 µs. In the decode profile, the scheduler (rayon's yield and wake-ups)
//! fell from ~16% of samples to ~2%.
//!
//! Design:
//! - One global pool of `rayon::current_num_threads() - 1` workers, started
//!   on first use; the calling thread is the last worker, so a region uses
//!   exactly as many threads as the rayon pool it replaces.
//! - A region publishes its job (a borrowed `Fn(usize)`) and opens an epoch
//!   in one atomic state word; the caller and the workers claim task indices
//!   from one counter. The caller then closes the epoch and waits until no
//!   worker is inside it, so the borrowed job outlives every use. A worker
//!   registers (`active += 1`) before re-reading the state and leaves at
//!   once if the epoch closed: with a sequentially consistent fence between
//!   each side's write and read of the two words, either the caller waits
//!   for it or it never touches the job (a Dekker-style handshake;
//!   `tests/loom.rs` explores every interleaving, parking included; loom
//!   models `SeqCst` accesses as acquire/release but fences fully, so the
//!   fences are what it checks, and it found the handshake broken without
//!   them).
//! - After a region a worker spins briefly (`spin_loop`), then yields (so a
//!   thread that needs its core gets it), then parks on a condition
//!   variable; a caller wakes parked workers only when there are any.
//! - Only one region runs on the pool at a time. A region started while
//!   another is running (a second engine in the process, a nested region)
//!   runs on rayon instead, so nothing ever waits for the pool.
//! - A panicking task does not kill a worker: the payload is kept and
//!   resumed on the caller once every task has finished.
//!
//! Results do not depend on which thread runs a task when tasks write
//! disjoint outputs, as every caller's do: the pool changes no bit.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

#[cfg(loom)]
use loom::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering::SeqCst};
#[cfg(loom)]
use loom::sync::{Condvar, Mutex, MutexGuard};
#[cfg(not(loom))]
use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering::SeqCst};
#[cfg(not(loom))]
use std::sync::{Condvar, Mutex, MutexGuard};

type Job = &'static (dyn Fn(usize) + Sync);
type Panic = Box<dyn Any + Send>;

/// The state bit [`Pool::stop`] sets: workers return instead of waiting.
const STOPPED: u64 = 1 << 63;

/// The pool's shared state (see the crate doc). Public for the loom
/// models; use [`for_each`].
#[doc(hidden)]
pub struct Pool {
    /// Threads serving it (read by `for_each`, which loom builds lack).
    #[cfg_attr(loom, allow(dead_code))]
    workers: usize,
    /// `epoch << 1 | open`, and [`STOPPED`].
    state: AtomicU64,
    /// Workers inside the current epoch.
    active: AtomicUsize,
    /// The next task index to claim.
    next: AtomicUsize,
    /// The open epoch's job and task count.
    job: Mutex<Option<(Job, usize)>>,
    panic: Mutex<Option<Panic>>,
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
    /// Held by the one region running: a second caller's job would
    /// overwrite the slot that registered workers read.
    region: Mutex<()>,
}

#[cfg(not(loom))]
mod global {
    use std::sync::OnceLock;

    use rayon::prelude::*;

    use super::Pool;

    /// The one pool.
    fn pool() -> &'static Pool {
        static POOL: OnceLock<&'static Pool> = OnceLock::new();
        POOL.get_or_init(|| {
            let workers = rayon::current_num_threads().saturating_sub(1);
            let pool: &'static Pool = Box::leak(Box::new(Pool::new(workers)));
            for i in 0..workers {
                let spawned = std::thread::Builder::new().name(format!("kvserve-step-{i}")).spawn(move || {
                    let mut served = 0;
                    loop {
                        pool.serve(&mut served);
                    }
                });
                if spawned.is_err() {
                    // Without its workers the pool still completes every
                    // region: the caller claims all the tasks itself.
                    tracing::warn!("could not start step worker {i}; regions run with fewer threads");
                }
            }
            pool
        })
    }

    /// Runs `f(0)`, …, `f(tasks - 1)` in parallel and returns when all are
    /// done. A task's panic is resumed here once every task has finished.
    pub fn for_each(tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if tasks <= 1 {
            (0..tasks).for_each(f);
            return;
        }
        let pool = pool();
        if pool.workers == 0 {
            (0..tasks).for_each(f);
            return;
        }
        // Busy (a second engine in the process, a nested region): rayon.
        if !pool.try_run(tasks, f) {
            (0..tasks).into_par_iter().for_each(f);
        }
    }
}

#[cfg(not(loom))]
pub use global::for_each;

/// Busy-wait step: a CPU hint, or a loom yield so the model can progress.
fn relax(spins: u32) {
    #[cfg(loom)]
    {
        let _ = spins;
        loom::thread::yield_now();
    }
    #[cfg(not(loom))]
    {
        if spins.is_multiple_of(256) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

impl Pool {
    /// A pool state for `workers` threads (which the caller starts, each
    /// looping on [`Pool::serve`]).
    pub fn new(workers: usize) -> Self {
        Self {
            workers,
            state: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            job: Mutex::new(None),
            panic: Mutex::new(None),
            sleepers: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            region: Mutex::new(()),
        }
    }

    /// [`Pool::run`] if no other region is running; `false` (nothing run)
    /// otherwise.
    pub fn try_run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) -> bool {
        let _region = match self.region.try_lock() {
            Ok(g) => g,
            // A region resumed a task's panic while holding the lock; the
            // pool itself is consistent.
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return false,
        };
        self.run_alone(tasks, f);
        true
    }

    /// One region: `f(0..tasks)` on the caller and the workers, after any
    /// region already running (so never from inside a task: that waits for
    /// itself; [`for_each`] uses [`Pool::try_run`] instead).
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        let _region = lock(&self.region);
        self.run_alone(tasks, f);
    }

    /// [`Pool::run`] with `region` held.
    #[allow(unsafe_code)] // the job's lifetime is erased for the workers; see SAFETY
    fn run_alone(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        // SAFETY: the reference is used only by workers registered in this
        // epoch, and this function does not return before the epoch is
        // closed and no worker is registered (see the crate doc), so `f`
        // outlives every use. The slot is cleared before returning.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
        *lock(&self.job) = Some((job, tasks));
        self.next.store(0, SeqCst);
        let state = self.state.load(SeqCst);
        let (stopped, epoch) = (state & STOPPED, ((state & !STOPPED) >> 1) + 1);
        self.state.store(stopped | epoch << 1 | 1, SeqCst);
        // Store, fence, load against the worker's increment, fence, load:
        // a parking worker either sees the epoch or is counted here.
        fence(SeqCst);
        if self.sleepers.load(SeqCst) > 0 {
            let _guard = lock(&self.sleep);
            self.wake.notify_all();
        }
        self.claim(job, tasks);
        self.state.store(stopped | epoch << 1, SeqCst);
        // The close against a worker's registration (see the crate doc).
        fence(SeqCst);
        let mut spins = 0u32;
        while self.active.load(SeqCst) != 0 {
            spins = spins.wrapping_add(1);
            relax(spins);
        }
        *lock(&self.job) = None;
        if let Some(p) = lock(&self.panic).take() {
            resume_unwind(p);
        }
    }

    /// Claims and runs tasks until none is left.
    fn claim(&self, job: Job, tasks: usize) {
        loop {
            let i = self.next.fetch_add(1, SeqCst);
            if i >= tasks {
                return;
            }
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| job(i))) {
                lock(&self.panic).get_or_insert(p);
            }
        }
    }

    /// A worker's turn: waits for an open epoch after `served` and serves
    /// it (or finds it closed already and comes back).
    pub fn serve(&self, served: &mut u64) {
        let state = self.wait_for_epoch(*served);
        if state & STOPPED != 0 {
            return;
        }
        self.active.fetch_add(1, SeqCst);
        fence(SeqCst);
        if self.state.load(SeqCst) == state {
            *served = (state & !STOPPED) >> 1;
            let job = *lock(&self.job);
            if let Some((job, tasks)) = job {
                self.claim(job, tasks);
            }
        }
        self.active.fetch_sub(1, SeqCst);
    }

    /// Makes every worker's [`Pool::serve`] return from now on, parked ones
    /// included (the loom models end their workers so).
    pub fn stop(&self) {
        self.state.fetch_or(STOPPED, SeqCst);
        let _guard = lock(&self.sleep);
        self.wake.notify_all();
    }

    /// Spins, then yields, then parks until an epoch after `served` opens
    /// (or the pool stops); returns the state word. (Under loom: parks at
    /// once, so the models cover the park/wake handshake.)
    fn wait_for_epoch(&self, served: u64) -> u64 {
        let open = |s: u64| s & STOPPED != 0 || (s & 1 == 1 && (s & !STOPPED) >> 1 != served);
        #[cfg(not(loom))]
        {
            use std::time::{Duration, Instant};
            /// How long an idle worker spins before it starts yielding, and
            /// yields before it parks.
            const SPIN: Duration = Duration::from_micros(50);
            const YIELD: Duration = Duration::from_micros(2000);
            let start = Instant::now();
            let mut spins = 0u32;
            loop {
                let s = self.state.load(SeqCst);
                if open(s) {
                    return s;
                }
                spins = spins.wrapping_add(1);
                if !spins.is_multiple_of(64) {
                    std::hint::spin_loop();
                    continue;
                }
                let idle = start.elapsed();
                if idle < SPIN {
                    std::hint::spin_loop();
                } else if idle < YIELD {
                    std::thread::yield_now();
                } else {
                    break;
                }
            }
        }
        let mut guard = lock(&self.sleep);
        self.sleepers.fetch_add(1, SeqCst);
        fence(SeqCst);
        while !open(self.state.load(SeqCst)) {
            guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
        self.sleepers.fetch_sub(1, SeqCst);
        self.state.load(SeqCst)
    }
}

/// Locks, ignoring poisoning: every critical section here leaves its data
/// consistent (a slot write or take).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    /// The tests below that need the pool to themselves (a region that
    /// falls back to rayon stops a panicking task's neighbours) take this.
    static ALONE: Mutex<()> = Mutex::new(());

    /// Many regions back to back, from several threads at once (one gets
    /// the pool, the rest fall back to rayon): every task runs exactly once
    /// per region, and a region returns only when all of its tasks are done.
    #[test]
    fn every_task_runs_exactly_once_whoever_runs_it() {
        let _alone = lock(&ALONE);
        std::thread::scope(|s| {
            for t in 0..4 {
                s.spawn(move || {
                    for round in 0..300 {
                        let tasks = 1 + (round * 7 + t) % 37;
                        let hits: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
                        for_each(tasks, &|i| {
                            if i % 5 == 0 {
                                std::thread::sleep(Duration::from_micros(20));
                            }
                            hits[i].fetch_add(1, SeqCst);
                        });
                        assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "thread {t} round {round}");
                    }
                });
            }
        });
    }

    /// A panicking task reaches the caller after the other tasks finished,
    /// and the pool serves the next region normally.
    #[test]
    fn a_panicking_task_is_resumed_on_the_caller_and_the_pool_survives() {
        let _alone = lock(&ALONE);
        let done = AtomicU32::new(0);
        let caught = catch_unwind(AssertUnwindSafe(|| {
            for_each(16, &|i| {
                if i == 3 {
                    panic!("task 3 fails");
                }
                done.fetch_add(1, SeqCst);
            })
        }));
        assert!(caught.is_err());
        assert_eq!(done.load(SeqCst), 15, "every other task ran");
        let again = AtomicU32::new(0);
        for_each(64, &|_| {
            again.fetch_add(1, SeqCst);
        });
        assert_eq!(again.load(SeqCst), 64);
    }

    /// After a long idle gap (workers parked) regions still complete.
    #[test]
    fn parked_workers_wake_for_the_next_region() {
        let _alone = lock(&ALONE);
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(10));
            let n = AtomicU32::new(0);
            for_each(32, &|_| {
                n.fetch_add(1, SeqCst);
            });
            assert_eq!(n.load(SeqCst), 32);
        }
    }
}
