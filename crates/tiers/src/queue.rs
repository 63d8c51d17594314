//! The hand-off from the engine thread to the tier threads: a FIFO queue,
//! bounded in bytes, that never blocks the producer.
//!
//! A push names the job's size and, optionally, a limit: if the bytes
//! already queued plus this job's would pass the limit, the job is handed
//! back (the engine counts a dropped demotion, or keeps an agent's commit
//! for later) instead of waiting. Jobs without a limit (deletions, which
//! must not be lost and carry no payload) always go in. Consumers block
//! until there is work or the queue is closed; a batch pop takes what is
//! queued at once, so one sync serves many jobs. Bytes are released as jobs
//! are popped.
//!
//! # Concurrency
//!
//! One mutex over the jobs, the byte count and the closed flag, and one
//! condition variable for consumers. Never held while running a job. Lock
//! types come from `crate::sync`, so `tests/loom.rs` checks that every
//! accepted job is popped exactly once, that the byte count returns to zero,
//! and that closing wakes every consumer.

use std::collections::VecDeque;
use std::time::Duration;

use crate::sync::{Condvar, Mutex};

struct State<T> {
    jobs: VecDeque<(T, u64)>,
    bytes: u64,
    closed: bool,
}

/// See the module doc.
pub struct JobQueue<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

impl<T> std::fmt::Debug for JobQueue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobQueue").finish_non_exhaustive()
    }
}

impl<T> Default for JobQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> JobQueue<T> {
    /// An empty, open queue.
    pub fn new() -> Self {
        Self { state: Mutex::new(State { jobs: VecDeque::new(), bytes: 0, closed: false }), ready: Condvar::new() }
    }

    /// Queues `job` of `bytes`, unless `limit` is given and the queued bytes
    /// would pass it, or the queue is closed: then the job comes back.
    ///
    /// # Errors
    /// The job itself, not queued.
    pub fn push(&self, job: T, bytes: u64, limit: Option<u64>) -> Result<(), T> {
        let Ok(mut s) = self.state.lock() else { return Err(job) };
        if s.closed || limit.is_some_and(|l| s.bytes.saturating_add(bytes) > l) {
            return Err(job);
        }
        s.bytes += bytes;
        s.jobs.push_back((job, bytes));
        drop(s);
        self.ready.notify_one();
        Ok(())
    }

    /// Waits until a job is queued (or `timeout` passes, if given), then
    /// takes up to `max` jobs in order. `None` once the queue is closed and
    /// empty; an empty batch when the timeout passed.
    pub fn pop_batch(&self, max: usize, timeout: Option<Duration>) -> Option<Vec<T>> {
        let mut s = self.state.lock().ok()?;
        while s.jobs.is_empty() {
            if s.closed {
                return None;
            }
            if timeout == Some(Duration::ZERO) {
                return Some(Vec::new());
            }
            s = match timeout {
                None => self.ready.wait(s).ok()?,
                Some(t) => {
                    let (s, timed_out) = self.ready.wait_timeout(s, t).ok()?;
                    if timed_out.timed_out() && s.jobs.is_empty() {
                        return (!s.closed).then(Vec::new);
                    }
                    s
                }
            };
        }
        let n = s.jobs.len().min(max.max(1));
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            if let Some((job, bytes)) = s.jobs.pop_front() {
                s.bytes -= bytes;
                out.push(job);
            }
        }
        Some(out)
    }

    /// Refuses further jobs and wakes every consumer; jobs already queued
    /// are still popped.
    pub fn close(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.closed = true;
        }
        self.ready.notify_all();
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> u64 {
        self.state.lock().map_or(0, |s| s.bytes)
    }

    /// Jobs queued now.
    pub fn len(&self) -> usize {
        self.state.lock().map_or(0, |s| s.jobs.len())
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn refuses_past_the_byte_limit_and_releases_bytes_on_pop() {
        let q = JobQueue::new();
        assert!(q.push(1, 60, Some(100)).is_ok());
        assert_eq!(q.push(2, 60, Some(100)), Err(2));
        assert!(q.push(3, 60, None).is_ok(), "unlimited jobs always go in");
        assert_eq!(q.queued_bytes(), 120);
        assert_eq!(q.pop_batch(8, None), Some(vec![1, 3]));
        assert_eq!(q.queued_bytes(), 0);
        q.close();
        assert_eq!(q.pop_batch(8, None), None);
        assert_eq!(q.push(4, 1, None), Err(4));
    }

    #[test]
    fn many_producers_and_consumers_lose_nothing() {
        let q = Arc::new(JobQueue::new());
        let consumers: Vec<_> = (0..4)
            .map(|_| {
                let q = Arc::clone(&q);
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    while let Some(batch) = q.pop_batch(5, None) {
                        got.extend(batch);
                    }
                    got
                })
            })
            .collect();
        let producers: Vec<_> = (0..8u64)
            .map(|p| {
                let q = Arc::clone(&q);
                std::thread::spawn(move || {
                    let mut accepted = Vec::new();
                    for i in 0..500 {
                        let job = p * 1000 + i;
                        if q.push(job, 3, Some(300)).is_ok() {
                            accepted.push(job);
                        }
                    }
                    accepted
                })
            })
            .collect();
        let mut accepted: Vec<u64> = producers.into_iter().flat_map(|h| h.join().unwrap()).collect();
        q.close();
        let mut got: Vec<u64> = consumers.into_iter().flat_map(|h| h.join().unwrap()).collect();
        accepted.sort_unstable();
        got.sort_unstable();
        assert_eq!(accepted, got, "every accepted job popped exactly once");
        assert_eq!(q.queued_bytes(), 0);
    }
}
