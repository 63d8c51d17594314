//! The one place that names lock types.
//!
//! Everything in this crate that is shared between threads goes through these
//! re-exports, so that a `--cfg loom` build swaps in loom's model-checked
//! versions and the loom tests (`tests/loom.rs`) explore every interleaving of
//! the real code, not of a copy (the pattern of tokio's `src/loom/mod.rs`).

#[cfg(loom)]
pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};
#[cfg(not(loom))]
pub(crate) use std::sync::{Arc, Mutex, MutexGuard};
