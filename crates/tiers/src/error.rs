//! The crate's one error type: what can stop a tier from being used at all.
//! A bad record is not an error but a [`crate::Reject`] (a miss); a failed
//! background write degrades the disk tier, it does not fail a request.

use std::path::PathBuf;

/// What can go wrong opening or using a tier.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another live process holds the cache directory.
    #[error("the KV cache directory {dir} is in use by another kvserve process (its lock is held); use another --cache-dir or stop the other server")]
    Locked {
        /// The directory.
        dir: PathBuf,
    },
    /// The cache directory cannot be created, locked or read.
    #[error("KV cache directory {dir}: {source}")]
    Io {
        /// The directory or file.
        dir: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// A configuration value is unusable.
    #[error("invalid tier configuration: {0}")]
    Config(String),
    /// The remote store could not be reached, timed out, or answered with
    /// an error (worth retrying later; the tier reconnects by itself).
    #[error("remote KV store: {reason}")]
    Remote {
        /// What failed (never the store's credentials).
        reason: String,
    },
    /// A background thread could not be started.
    #[error("cannot start the {what} thread: {source}")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// What the system said.
        source: std::io::Error,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
