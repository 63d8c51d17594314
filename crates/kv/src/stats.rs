//! One consistent snapshot of the cache's counters, read under one lock.

use serde::{Deserialize, Serialize};

/// Counters of one cache, all read at the same instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStats {
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub total_blocks: usize,
    /// Blocks on the free list.
    pub free_blocks: usize,
    /// Blocks referenced by a sequence or a raw allocation.
    pub used_blocks: usize,
    /// Unreferenced blocks kept for prefix reuse, evictable in LRU order.
    pub cached_blocks: usize,
    /// Live sequences.
    pub sequences: usize,
    /// Prompt tokens offered to prefix lookups that create sequences.
    pub prefix_lookup_tokens: u64,
    /// Of those, tokens served from cached blocks.
    pub prefix_hit_tokens: u64,
    /// Cached blocks evicted to satisfy allocations.
    pub evictions: u64,
}

impl CacheStats {
    /// Blocks an allocation could get now: free plus evictable.
    pub fn available_blocks(&self) -> usize {
        self.free_blocks + self.cached_blocks
    }

    /// Share of looked-up prompt tokens served from cache (0 when none).
    pub fn prefix_hit_rate(&self) -> f64 {
        if self.prefix_lookup_tokens == 0 {
            0.0
        } else {
            self.prefix_hit_tokens as f64 / self.prefix_lookup_tokens as f64
        }
    }
}
