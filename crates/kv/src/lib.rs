//! The KV cache core of kvserve: bookkeeping for a paged, shared, evictable
//! K/V cache. It owns *which* block holds *what*, never the K/V payload: the
//! model keeps per-layer K and V arenas indexed by this crate's [`BlockId`]s.
//!
//! # The pieces
//!
//! | concept | file |
//! |---|---|
//! | layout: block size, block count, per-layer attention kind, bytes | [`spec`] |
//! | ids: [`BlockId`], [`SeqId`], validated [`OwnerId`] | `ids.rs` |
//! | content addresses of full blocks, namespaces | `hash.rs` |
//! | block states, refcounts, free list, LRU, prefix index | `pool.rs`, `lru.rs` |
//! | owners and quotas | `owners.rs` |
//! | sequences, block tables, slots, copy-on-write | `sequence.rs` |
//! | the `&mut self` state machine tying them together | `cache.rs` |
//! | the seam to block payloads (export/import/copy), no I/O | `storage.rs` |
//! | the whole-state consistency check | `invariants.rs` |
//! | thread-safe wrapper and RAII handles (`# Concurrency`) | `shared.rs`, `sync.rs` |
//!
//! # Life of a block
//!
//! A block is *free*, *used* (referenced by sequences or a raw allocation) or
//! *cached* (unreferenced but published under its content address, kept for
//! prefix reuse and evicted in LRU order when the free list is empty). An
//! eviction can be reported ([`KvCache::report_evictions`]) with the block's
//! [`BlockKey`], so that the engine copies the payload to a slower tier
//! before the block is reused; this crate itself never does I/O.
//! `free + used + cached = total` always; [`KvCache::check_invariants`]
//! verifies it and the rest.
//!
//! # Life of a sequence
//!
//! 1. [`KvCache::create_with_prefix`] adopts the longest cached run of whole
//!    blocks matching the prompt (their K/V is already there);
//! 2. [`KvCache::append`] reserves a slot per new token (allocating blocks,
//!    copying a shared partial block first);
//! 3. the model writes K/V into the slots and calls
//!    [`KvCache::mark_computed`], which publishes full blocks;
//! 4. [`KvCache::fork`] shares every block; [`KvCache::truncate`] rolls back;
//!    [`KvCache::remove`] releases, leaving published blocks cached.
//!
//! # Example
//!
//! ```
//! use kv::{AttentionKind, CacheSpec, CacheSpecParams, Namespace, OwnerId, SharedKvCache};
//!
//! let spec = CacheSpec::new(CacheSpecParams::uniform(30, AttentionKind::Full, 3, 64, 1024))?;
//! let cache = SharedKvCache::new(spec);
//! let ns = Namespace::new(b"smollm2-135m", b"");
//! let agent = OwnerId::new("agent-1")?;
//!
//! let prompt: Vec<u32> = (0..40).collect();
//! let (seq, cached) = cache.create_with_prefix(&agent, ns, &prompt)?;
//! assert_eq!(cached, 0);
//! let appended = cache.append(seq.id(), &prompt)?;
//! assert_eq!(appended.slots.len(), 40); // the model writes K/V here
//! cache.mark_computed(seq.id(), 40)?;
//! drop(seq); // blocks released; the two full ones stay cached
//!
//! let (again, cached) = cache.create_with_prefix(&agent, ns, &prompt)?;
//! assert_eq!(cached, 32);
//! # drop(again);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

mod cache;
mod error;
mod hash;
mod ids;
mod invariants;
mod lru;
mod owners;
mod pool;
mod sequence;
mod shared;
pub mod spec;
mod stats;
mod storage;
mod sync;

pub use cache::KvCache;
pub use error::{Error, Result};
pub use hash::{BlockHash, BlockKey, Namespace, PrefixHashes};
pub use ids::{BlockId, OwnerId, SeqId, TokenId};
pub use invariants::InvariantViolation;
pub use owners::OwnerUsage;
pub use pool::{Evicted, IndexChange};
pub use sequence::{Appended, BlockCopy, BlockTable, SequenceSnapshot, Slot};
pub use shared::{BlockAllocation, SeqHandle, SharedKvCache};
pub use spec::{AttentionKind, CacheSpec, CacheSpecParams, KvDType, LayerGroup};
pub use stats::CacheStats;
pub use storage::BlockStorage;
