//! `SharedKvCache`: the thread-safe face of [`KvCache`], plus the RAII
//! handles that give blocks and sequences back on drop.
//!
//! # Concurrency
//!
//! * **What is guarded.** All mutable state (pool, free list, LRU, prefix
//!   index, owners, sequences, counters) lives in one [`KvCache`] behind one
//!   mutex. There is no other lock in the crate, so there is no lock order to
//!   get wrong, and every check happens under the same lock as the act that
//!   depends on it (`allocate(n)` counts free + evictable blocks and takes them
//!   in one critical section).
//! * **What is not.** The [`CacheSpec`] is immutable and read without the
//!   lock. Prefix hashes are computed before taking the lock, so the longest
//!   piece of work (hashing an 8k-token prompt) never blocks other threads.
//! * **Never held across** an `.await` (no method is async and no guard
//!   escapes), a callback into user code (except [`SharedKvCache::with`],
//!   whose closure *is* the critical section and must not call back into the
//!   same cache), or a drop of user data.
//! * **Handles.** [`BlockAllocation`] and [`SeqHandle`] take the lock in
//!   `Drop` to give their blocks back. A poisoned lock (a thread panicked
//!   inside a critical section) makes every call return
//!   [`Error::Poisoned`]; a handle dropped then leaks its blocks rather than
//!   touching state that may be torn.
//! * **loom.** Lock types come from `crate::sync`, so `--cfg loom` builds
//!   model-check this exact code (`tests/loom.rs`).

use std::fmt;

use crate::cache::KvCache;
use crate::error::{Error, Result};
use crate::hash::{Namespace, PrefixHashes};
use crate::ids::{BlockId, OwnerId, SeqId, TokenId};
use crate::invariants::InvariantViolation;
use crate::owners::OwnerUsage;
use crate::sequence::{Appended, BlockTable, SequenceSnapshot};
use crate::spec::CacheSpec;
use crate::stats::CacheStats;
use crate::sync::{Arc, Mutex, MutexGuard};

struct Inner {
    spec: CacheSpec,
    state: Mutex<KvCache>,
}

/// A [`KvCache`] shared between threads. Cloning is cheap and shares state.
#[derive(Clone)]
pub struct SharedKvCache {
    inner: Arc<Inner>,
}

impl fmt::Debug for SharedKvCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedKvCache").field("spec", &self.inner.spec).finish_non_exhaustive()
    }
}

impl SharedKvCache {
    /// An empty shared cache.
    pub fn new(spec: CacheSpec) -> Self {
        Self { inner: Arc::new(Inner { state: Mutex::new(KvCache::new(spec.clone())), spec }) }
    }

    /// The layout (immutable; read without locking).
    pub fn spec(&self) -> &CacheSpec {
        &self.inner.spec
    }

    fn lock(&self) -> Result<MutexGuard<'_, KvCache>> {
        self.inner.state.lock().map_err(|_| Error::Poisoned)
    }

    /// Runs `f` on the cache under the lock: several operations as one
    /// atomic step (an engine step building its batch, say).
    ///
    /// `f` must not call back into this cache; it would deadlock.
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn with<R>(&self, f: impl FnOnce(&mut KvCache) -> R) -> Result<R> {
        Ok(f(&mut *self.lock()?))
    }

    /// Takes `n` blocks for `owner`, all or none; they come back when the
    /// returned allocation drops.
    ///
    /// # Errors
    /// [`Error::Exhausted`], [`Error::QuotaExceeded`], [`Error::Poisoned`].
    pub fn allocate(&self, owner: &OwnerId, n: usize) -> Result<BlockAllocation> {
        let blocks = self.lock()?.allocate(owner, n)?;
        Ok(BlockAllocation { cache: self.clone(), owner: owner.clone(), blocks })
    }

    /// A new empty sequence, removed when the handle drops.
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn create_sequence(&self, owner: &OwnerId, ns: Namespace) -> Result<SeqHandle> {
        let id = self.lock()?.create_sequence(owner, ns);
        Ok(self.handle(id))
    }

    /// A new sequence adopting the longest cached prefix of `tokens`; see
    /// [`KvCache::create_with_prefix`]. Hashing happens before locking.
    ///
    /// # Errors
    /// [`Error::QuotaExceeded`], [`Error::Poisoned`].
    pub fn create_with_prefix(&self, owner: &OwnerId, ns: Namespace, tokens: &[TokenId]) -> Result<(SeqHandle, usize)> {
        let hashes = PrefixHashes::compute(ns, tokens, self.spec().block_size());
        let (id, adopted) = self.lock()?.create_with_prefix_hashes(owner, tokens, &hashes)?;
        Ok((self.handle(id), adopted))
    }

    /// How many leading tokens would be adopted now (hashing before locking).
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn lookup_prefix(&self, ns: Namespace, tokens: &[TokenId]) -> Result<usize> {
        let hashes = PrefixHashes::compute(ns, tokens, self.spec().block_size());
        let cache = self.lock()?;
        Ok(cache.lookup_prefix_hashes(tokens, &hashes))
    }

    fn handle(&self, id: SeqId) -> SeqHandle {
        SeqHandle { cache: self.clone(), id, armed: true }
    }

    /// See [`KvCache::append`].
    ///
    /// # Errors
    /// As there, plus [`Error::Poisoned`].
    pub fn append(&self, seq: SeqId, tokens: &[TokenId]) -> Result<Appended> {
        self.lock()?.append(seq, tokens)
    }

    /// See [`KvCache::mark_computed`].
    ///
    /// # Errors
    /// As there, plus [`Error::Poisoned`].
    pub fn mark_computed(&self, seq: SeqId, upto: usize) -> Result<()> {
        self.lock()?.mark_computed(seq, upto)
    }

    /// See [`KvCache::fork`]; the child is removed when its handle drops.
    ///
    /// # Errors
    /// As there, plus [`Error::Poisoned`].
    pub fn fork(&self, seq: SeqId) -> Result<SeqHandle> {
        let id = self.lock()?.fork(seq)?;
        Ok(self.handle(id))
    }

    /// See [`KvCache::truncate`].
    ///
    /// # Errors
    /// As there, plus [`Error::Poisoned`].
    pub fn truncate(&self, seq: SeqId, len: usize) -> Result<()> {
        self.lock()?.truncate(seq, len)
    }

    /// See [`KvCache::remove`].
    ///
    /// # Errors
    /// As there, plus [`Error::Poisoned`].
    pub fn remove(&self, seq: SeqId) -> Result<()> {
        self.lock()?.remove(seq)
    }

    /// A copy of the sequence's tokens.
    ///
    /// # Errors
    /// [`Error::UnknownSequence`], [`Error::Poisoned`].
    pub fn tokens(&self, seq: SeqId) -> Result<Vec<TokenId>> {
        Ok(self.lock()?.tokens(seq)?.to_vec())
    }

    /// The sequence's length.
    ///
    /// # Errors
    /// [`Error::UnknownSequence`], [`Error::Poisoned`].
    pub fn seq_len(&self, seq: SeqId) -> Result<usize> {
        self.lock()?.seq_len(seq)
    }

    /// A copy of the block table.
    ///
    /// # Errors
    /// [`Error::UnknownSequence`], [`Error::Poisoned`].
    pub fn block_table(&self, seq: SeqId) -> Result<BlockTable> {
        Ok(self.lock()?.block_table(seq)?.clone())
    }

    /// Tokens, table and watermark read together.
    ///
    /// # Errors
    /// [`Error::UnknownSequence`], [`Error::Poisoned`].
    pub fn snapshot(&self, seq: SeqId) -> Result<SequenceSnapshot> {
        self.lock()?.snapshot(seq)
    }

    /// See [`KvCache::set_quota`].
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn set_quota(&self, owner: &OwnerId, quota: Option<u32>) -> Result<()> {
        self.lock()?.set_quota(owner, quota);
        Ok(())
    }

    /// See [`KvCache::owner_usage`].
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn owner_usage(&self, owner: &OwnerId) -> Result<OwnerUsage> {
        Ok(self.lock()?.owner_usage(owner))
    }

    /// All counters, read in one critical section.
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn stats(&self) -> Result<CacheStats> {
        Ok(self.lock()?.stats())
    }

    /// [`KvCache::check_invariants`] under the lock.
    ///
    /// # Errors
    /// The first violation; a poisoned lock counts as one.
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        let cache = self.lock().map_err(|e| InvariantViolation(e.to_string()))?;
        cache.check_invariants()
    }
}

/// Blocks taken by [`SharedKvCache::allocate`]; freed when dropped.
#[derive(Debug)]
pub struct BlockAllocation {
    cache: SharedKvCache,
    owner: OwnerId,
    blocks: Vec<BlockId>,
}

impl BlockAllocation {
    /// The blocks.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Who they are charged to.
    pub fn owner(&self) -> &OwnerId {
        &self.owner
    }
}

impl Drop for BlockAllocation {
    fn drop(&mut self) {
        if let Ok(mut cache) = self.cache.lock() {
            let freed = cache.free(&self.owner, &self.blocks);
            debug_assert!(freed.is_ok(), "an allocation frees exactly what it took: {freed:?}");
        }
    }
}

/// A sequence in a [`SharedKvCache`], removed (its blocks released) when
/// dropped unless [`SeqHandle::detach`]ed. Other threads can address it by
/// [`SeqHandle::id`].
#[derive(Debug)]
pub struct SeqHandle {
    cache: SharedKvCache,
    id: SeqId,
    armed: bool,
}

impl SeqHandle {
    /// The sequence's id.
    pub fn id(&self) -> SeqId {
        self.id
    }

    /// Keeps the sequence alive past this handle; the caller removes it by id.
    pub fn detach(mut self) -> SeqId {
        self.armed = false;
        self.id
    }
}

impl Drop for SeqHandle {
    fn drop(&mut self) {
        if self.armed {
            if let Ok(mut cache) = self.cache.lock() {
                // Already removed by id from elsewhere is fine.
                let _ = cache.remove(self.id);
            }
        }
    }
}
