//! The engine's counters, published as one snapshot.
//!
//! The engine loop is the only writer: it updates an [`EngineStats`] as it
//! works and, once per iteration, copies it (with the cache's own counters)
//! into a mutex the handle reads. A reader gets every number from the same
//! instant with one lock and one clone; nothing is assembled from several
//! separately locked reads.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use kv::CacheStats;
use serde::Serialize;

/// Upper bounds (seconds) of the latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 14] =
    [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A cumulative-bucket histogram in Prometheus' shape.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Histogram {
    /// Upper bound of each bucket (seconds); an implicit `+Inf` follows.
    pub bounds: &'static [f64],
    /// Observations at or below each bound (cumulative), then the total.
    pub cumulative: Vec<u64>,
    /// Sum of all observations.
    pub sum: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self { bounds: &LATENCY_BUCKETS, cumulative: vec![0; LATENCY_BUCKETS.len() + 1], sum: 0.0 }
    }
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        let first = self.bounds.iter().position(|&b| s <= b).unwrap_or(self.bounds.len());
        for c in &mut self.cumulative[first..] {
            *c += 1;
        }
        self.sum += s;
    }

    /// Observations recorded.
    pub fn count(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }
}

/// Everything the engine reports, as of one instant.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EngineStats {
    /// Requests waiting for admission.
    pub waiting: usize,
    /// Requests being prefilled or decoded.
    pub running: usize,
    /// The block pool (free, used, cached, evictions).
    pub cache: CacheStats,
    /// Agents known.
    pub agents: usize,
    /// Prompt tokens admitted (recomputations after preemption excluded).
    pub prompt_tokens: u64,
    /// Of those, tokens served from cached K/V.
    pub cached_prompt_tokens: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Tokens drafted for speculative decoding.
    pub drafted_tokens: u64,
    /// Of those, the ones the model agreed with.
    pub accepted_tokens: u64,
    /// Decode entries that carried drafts (one per sequence and step).
    pub draft_verifications: u64,
    /// Requests finished, by outcome.
    pub finished: Finished,
    /// Running requests preempted for lack of blocks.
    pub preemptions: u64,
    /// Agents whose cache was released for lack of blocks.
    pub agent_releases: u64,
    /// Agents forgotten to keep a tenant within its agent limit.
    pub agents_forgotten: u64,
    /// Model steps run.
    pub steps: u64,
    /// Time to first token.
    pub ttft: Histogram,
    /// Time between consecutive tokens of a request.
    pub inter_token: Histogram,
    /// Generated tokens per second over the last few seconds.
    pub tokens_per_second: f64,
    /// The tiers below the pool.
    pub tiers: crate::tiering::TierStats,
    /// A hybrid model's sliding-window pages: in all, and holding a
    /// block's K/V (`None` for other models).
    pub sliding_pages: Option<(usize, usize)>,
}

/// Finished requests by outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Finished {
    /// Stop token or string.
    pub stop: u64,
    /// `max_tokens`.
    pub length: u64,
    /// Cancelled or dropped by the client.
    pub cancelled: u64,
    /// Past their deadline.
    pub timeout: u64,
    /// Failed (model error, quota).
    pub error: u64,
}

impl EngineStats {
    /// Share of admitted prompt tokens served from cache.
    pub fn prefix_hit_rate(&self) -> f64 {
        if self.prompt_tokens == 0 {
            0.0
        } else {
            self.cached_prompt_tokens as f64 / self.prompt_tokens as f64
        }
    }
}

/// Generated-token counts over a sliding window, for a rate.
#[derive(Debug, Default)]
pub(crate) struct RateWindow {
    events: VecDeque<(Instant, u64)>,
}

impl RateWindow {
    const SPAN: Duration = Duration::from_secs(5);

    pub(crate) fn add(&mut self, now: Instant, tokens: u64) {
        self.events.push_back((now, tokens));
        self.trim(now);
    }

    pub(crate) fn rate(&mut self, now: Instant) -> f64 {
        self.trim(now);
        let total: u64 = self.events.iter().map(|e| e.1).sum();
        total as f64 / Self::SPAN.as_secs_f64()
    }

    fn trim(&mut self, now: Instant) {
        while self.events.front().is_some_and(|e| now.duration_since(e.0) > Self::SPAN) {
            self.events.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(60));
        h.observe(Duration::from_secs(100));
        assert_eq!(h.cumulative[0], 1);
        assert_eq!(h.cumulative[4], 2, "0.075 bucket holds 3 ms and 60 ms");
        assert_eq!(h.cumulative[LATENCY_BUCKETS.len() - 1], 2);
        assert_eq!(h.count(), 3);
        assert!((h.sum - 100.063).abs() < 1e-9);
    }
}
