//! The router's errors: one enum, a variant per failure a caller can act
//! on.

/// What can go wrong starting or running the router.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No `--replica` was given.
    #[error("no replicas: give at least one --replica URL (or KVSERVE_REPLICAS)")]
    NoReplicas,
    /// More replicas than an index can track.
    #[error("{count} replicas; at most {max} are supported")]
    TooManyReplicas {
        /// How many were given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A replica URL that is not `http://host:port`.
    #[error("replica URL {url:?}: {reason}")]
    BadReplicaUrl {
        /// The URL as given.
        url: String,
        /// Why.
        reason: String,
    },
    /// The same replica twice.
    #[error("replica {url} is listed twice")]
    DuplicateReplica {
        /// Its URL.
        url: String,
    },
    /// A setting that cannot work.
    #[error("invalid router setting: {0}")]
    InvalidConfig(&'static str),
    /// The HTTP client could not be built.
    #[error("building the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    /// A prompt the router cannot encode.
    #[error("planning the prompt: {0}")]
    Prompt(String),
    /// A replica did not answer (connection refused, reset, timeout).
    #[error("replica {url}: {source}")]
    Unreachable {
        /// The replica.
        url: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// A replica answered with an unexpected status.
    #[error("replica {url} answered {status} to {what}")]
    Status {
        /// The replica.
        url: String,
        /// What was asked.
        what: &'static str,
        /// The status.
        status: u16,
    },
    /// The events the router asked for are gone (410 `events_gap`).
    #[error("replica {url} no longer holds the events the router needs")]
    EventsGap {
        /// The replica.
        url: String,
    },
    /// A body that does not parse as the KV event API says.
    #[error("replica {url}: malformed {what}: {reason}")]
    Malformed {
        /// The replica.
        url: String,
        /// What was read.
        what: &'static str,
        /// Why it does not parse.
        reason: String,
    },
}

/// The router's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
