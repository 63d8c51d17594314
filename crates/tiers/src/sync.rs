//! The one place that names lock types, so that a `--cfg loom` build swaps
//! in loom's model-checked versions and `tests/loom.rs` explores the real
//! code (the pattern of `kv::sync` and tokio's `src/loom/mod.rs`).

#[cfg(loom)]
pub(crate) use loom::sync::{Arc, Condvar, Mutex, MutexGuard};
#[cfg(not(loom))]
pub(crate) use std::sync::{Arc, Condvar, Mutex, MutexGuard};
