//! The KV tiers below kvserve's block pool: host RAM (T1), local disk (T2)
//! and a remote store shared by replicas (T3), and the agent manifests that
//! make a conversation's cache survive a restart or a `kill -9`.
//!
//! # The hierarchy
//!
//! | tier | holds | filled by | read by |
//! |---|---|---|---|
//! | T0, the pool (`kv` + the model's arenas) | blocks being used, and cached ones | the forward pass | attention |
//! | T1, [`RamTier`] | blocks the pool evicted, LRU within a byte budget | the engine, as the pool evicts (a copy of ~368 KB per block) | a prefix lookup that continues past the pool: hits are promoted back into pool blocks |
//! | T2, [`DiskTier`] | content-addressed block records under a byte budget, and agent manifests | T1's evictions (demotion, asynchronous, dropped when the queue is full) and every finished agent turn (write-through) | a prefix lookup that continues past T1: loads run on reader threads while the engine keeps stepping |
//! | T3, [`RemoteTier`] | the same records and manifests in Redis, under a TTL, shared by every replica of the model | demotions and agent turns, as T2 (asynchronous, `SET NX`: replicas never race) | a prefix lookup past T2, or an agent resumed on another replica: pipelined reads on reader threads, every record verified |
//!
//! This crate knows blocks as [`kv::BlockKey`]s (address, parent, namespace,
//! tokens) plus a layer group and a payload of bytes; it never sees tensors,
//! and the `kv` crate never sees I/O. The engine moves payloads between the
//! model's storage (`kv::BlockStorage`) and the tiers.
//!
//! # Identity: what makes a stored block valid
//!
//! A block's address is `kv`'s chained hash of (namespace, parent address,
//! tokens), fixed and seedless, so it is the same in every process. The
//! namespace folds in the model's fingerprint (a hash of every byte of the
//! GGUF file: weights, tokenizer, template) and the tenant, so tenants never
//! share blocks on disk either. On top of that, every tier directory and
//! every record carries a [`StoreFingerprint`]: the model fingerprint plus
//! the cache layout (block size, element type, layers, heads, head size)
//! and the storage's payload layout. Another model, tokenizer, block size or
//! element type lands in another directory and, should a file be copied
//! across, fails the header check.
//!
//! # Files
//!
//! ```text
//! <cache dir>/                          0700, e.g. ~/.cache/kvserve/kv
//!   <store fingerprint, 32 hex>/        0700, one per model and layout
//!     LOCK                              advisory lock (flock) of the live server
//!     blocks/<hash, 32 hex>-g<group>.kvb   one record per block, 0600
//!     agents/<hash of tenant+agent>.kva    one manifest per agent, 0600
//!     (.<name>.tmp-<pid>-<n>)           a write in progress; removed at start
//! ```
//!
//! Names come from hashes only, never from client strings. One file per
//! block (rather than an append-only segment store) makes eviction an
//! `unlink`, keeps every record independently verifiable, and lets a read
//! race an eviction safely (an open file outlives its name). A record is a
//! 4 KiB header (see [`record`]) and the payload, so payloads stay
//! page-aligned for direct I/O. The budget is enforced by LRU eviction of
//! unpinned records (blocks no agent needs go first).
//!
//! # Durability
//!
//! The writer thread takes jobs in batches. For a batch: each new block is
//! written to a temporary name and renamed into place; each agent's
//! manifest is written to a temporary name; then one `sync` makes all of it
//! durable (`syncfs` on Linux: one flush for the whole batch, where a
//! per-file `fdatasync` costs a flush each); then the manifests are renamed
//! into place and the `agents/` directory is synced. Data first, manifest
//! last: a manifest that survives a crash names blocks that survived too.
//! A crash at any point leaves either the old manifest or the new one, and
//! records that are complete or fail their checksums (a miss, recomputed).
//!
//! # Never wrong
//!
//! A record is used only if its header checksum, format version, store
//! fingerprint, namespace, address, parent, tokens, payload length and
//! payload checksum all match what the lookup expected; anything else is a
//! miss, counted, logged and deleted. A manifest must pass its checksum and
//! fingerprint, or it is deleted.
//!
//! # Concurrency
//!
//! The engine thread owns T1 (`&mut self`, no lock). T2 is shared between
//! the engine thread (lookups, queueing), one writer thread and two reader
//! threads through one mutex over the record index ([`disk`]'s `Index`);
//! file renames and unlinks of final names happen under that mutex, so
//! "the index says present" and "the file exists" change together. Jobs go
//! to the threads through a queue bounded in bytes that refuses instead of
//! blocking ([`queue`]), and results come back through a callback the
//! engine gives (it turns them into engine commands). Lock types come from
//! `crate::sync`, so the loom models (`tests/loom.rs`) check this code.
//!
//! T3 ([`remote`]) has the same shape: one mutex over its counters,
//! negative cache and known set; a writer, readers and a pinger, each with
//! its own Redis connection, fed by the same kind of queue. It is left out
//! of the loom build (sockets and timeouts are outside what loom models)
//! and tested against a real `redis-server` (`tests/remote.rs`).

pub mod chain;
pub mod disk;
mod error;
pub mod fs;
pub mod manifest;
pub mod queue;
pub mod ram;
pub mod record;
#[cfg(not(loom))] // its threads and sockets are outside what loom models
pub mod remote;
mod stats;
mod sync;
pub mod tier;

pub use chain::{chain_len, GroupRule};
pub use disk::{Demotion, DiskConfig, DiskTier, Flusher, Opened};
pub use error::{Error, Result};
pub use manifest::{AgentManifest, ManifestId, ManifestRetention, ManifestTail};
pub use ram::RamTier;
pub use record::{GroupId, Payload, RecordKey, Reject, StoreFingerprint};
#[cfg(not(loom))]
pub use remote::{RemoteConfig, RemoteTier};
pub use stats::{DiskStats, LatencyHistogram, RemoteStats, LATENCY_BUCKETS_S};
pub use tier::{
    split_done, Done, EventSink, LoadTask, Loading, Overflow, QueueFull, Stored, Tier, TierEvent, TierSnapshot,
};
