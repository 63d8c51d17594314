//! The one place that names lock types: the routing state's one lock
//! (`state.rs`) is this `Mutex`. A std mutex, not tokio's: it is never held
//! across an `.await`, and its critical sections are short (a decision, a
//! page of events), except a replica's resync (see `index.rs`'s costs).

pub(crate) use std::sync::{Mutex, MutexGuard, PoisonError};
