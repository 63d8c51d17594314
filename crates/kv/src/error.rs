//! The crate's one error type.
//!
//! Running out of blocks or of quota is an expected outcome that callers match
//! on (the engine evicts, preempts or queues), so each has its own variant with
//! the numbers a caller needs to decide. Misuse (an unknown sequence, freeing a
//! block one does not hold) is also a typed error and leaves the state as it
//! was: every operation checks everything before it changes anything.

use crate::ids::{BlockId, OwnerId, SeqId};

/// What can go wrong in the KV core.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Not enough free or evictable blocks; nothing was allocated.
    #[error("out of KV blocks: {requested} requested, {available} free or evictable")]
    Exhausted {
        /// Blocks the operation needed.
        requested: usize,
        /// Blocks that were free or evictable at the time.
        available: usize,
    },
    /// The owner's block quota would be exceeded; nothing was allocated.
    #[error("owner {owner} would exceed its quota of {quota} blocks (holds {held}, needs {requested} more)")]
    QuotaExceeded {
        /// The owner whose quota applies.
        owner: OwnerId,
        /// Its quota in blocks.
        quota: u32,
        /// Blocks it holds now.
        held: u32,
        /// Further blocks the operation needed.
        requested: u32,
    },
    /// No sequence with this id exists (never created, or already removed).
    #[error("unknown sequence {0}")]
    UnknownSequence(SeqId),
    /// A raw block release named a block the owner does not hold (a double
    /// free, a foreign block, or an out-of-range id); nothing was released.
    #[error("block {block} is not held by owner {owner}")]
    NotHeld {
        /// The block named.
        block: BlockId,
        /// The owner that tried to release it.
        owner: OwnerId,
    },
    /// The cache layout is unusable.
    #[error("invalid cache spec: {field} {problem}")]
    InvalidSpec {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// An owner id failed validation.
    #[error("invalid owner id {id:?}: {reason}")]
    InvalidOwnerId {
        /// The rejected text (truncated to 64 characters).
        id: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A namespace or block size in precomputed prefix hashes does not match.
    #[error("prefix hashes were computed for another namespace or block size")]
    HashMismatch,
    /// Truncation can only shorten a sequence.
    #[error("sequence {seq} has {len} tokens; cannot truncate to {requested}")]
    TruncateBeyondEnd {
        /// The sequence.
        seq: SeqId,
        /// Its length.
        len: usize,
        /// The length asked for.
        requested: usize,
    },
    /// Truncation would need blocks that already left the sliding window and
    /// were released.
    #[error("sequence {seq}: blocks before token {earliest} left the sliding window; cannot truncate to {requested}")]
    WindowReleased {
        /// The sequence.
        seq: SeqId,
        /// The length asked for.
        requested: usize,
        /// The first token position whose block is still held.
        earliest: usize,
    },
    /// Only tokens that were appended can be marked computed.
    #[error("sequence {seq} has {len} tokens; cannot mark {requested} computed")]
    ComputedBeyondEnd {
        /// The sequence.
        seq: SeqId,
        /// Its length.
        len: usize,
        /// The watermark asked for.
        requested: usize,
    },
    /// A block payload operation named a block outside the storage.
    #[error("block {block} is outside the {blocks} blocks of the storage")]
    BlockOutOfRange {
        /// The block named.
        block: BlockId,
        /// Blocks the storage holds.
        blocks: usize,
    },
    /// A block payload of the wrong size was handed to or asked of the
    /// storage.
    #[error("a block payload is {expected} bytes, not {got}")]
    PayloadLength {
        /// Bytes of one block's payload.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// A thread panicked while holding the cache lock; the state may be torn,
    /// so the shared cache refuses further use.
    #[error("the KV cache lock was poisoned by a panicking thread")]
    Poisoned,
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
