//! The engine's one error type. Every variant is something a caller can act
//! on; the server maps each to an HTTP status. Errors are `Clone` because one
//! failed step reports the same error to every request in its batch.

use std::time::Duration;

/// What can go wrong between submitting a request and its last event.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The engine loop has stopped (shut down, or it died); nothing more
    /// will be served by this handle.
    #[error("the engine has stopped")]
    EngineStopped,
    /// The waiting queue is full; try again later.
    #[error("overloaded: {queued} requests are waiting (limit {limit})")]
    Overloaded {
        /// Requests waiting when this one was refused.
        queued: usize,
        /// The queue limit.
        limit: usize,
    },
    /// A request field has an invalid value.
    #[error("invalid {field}: {problem}")]
    InvalidRequest {
        /// The offending field, as the API names it.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The prompt and the tokens asked for do not fit.
    #[error("the prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceeds the limit of {limit} tokens")]
    ContextExceeded {
        /// Prompt tokens.
        prompt: usize,
        /// Tokens asked for.
        max_tokens: usize,
        /// The model's context or the cache's capacity, whichever is smaller.
        limit: usize,
    },
    /// The prompt's text is longer than the context could hold however it
    /// tokenized (found from its byte length, before tokenizing).
    #[error("the prompt ({bytes} bytes, at least {min_tokens} tokens) exceeds the limit of {limit} tokens")]
    PromptTooLong {
        /// Bytes of prompt text.
        bytes: usize,
        /// Tokens it must encode to at least.
        min_tokens: usize,
        /// The model's context or the cache's capacity, whichever is smaller.
        limit: usize,
    },
    /// An agent or tenant id failed validation.
    #[error("invalid {what} id {id:?}: {reason}")]
    InvalidId {
        /// `agent` or `tenant`.
        what: &'static str,
        /// The rejected text (at most 64 characters of it).
        id: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// No agent with this id exists for the tenant.
    #[error("unknown agent {0:?}")]
    UnknownAgent(String),
    /// The request ran past its deadline; its blocks were freed.
    #[error("the request timed out after {0:?}")]
    Timeout(Duration),
    /// The tenant's block quota cannot hold this request even alone (on a
    /// hybrid model its sliding-window pages count too, each as the blocks
    /// its bytes make).
    #[error("tenant {tenant:?} is over its quota of {quota} blocks")]
    QuotaExceeded {
        /// The tenant.
        tenant: String,
        /// Its quota.
        quota: u32,
    },
    /// The tenant already has as many agents as it may, none of which can
    /// be forgotten (pinned, kept for a TTL, or mid-turn).
    #[error("tenant {tenant:?} has {limit} agents, the most it may keep; delete some")]
    TooManyAgents {
        /// The tenant.
        tenant: String,
        /// Agents a tenant may keep.
        limit: usize,
    },
    /// Pinning this agent would take its tenant's pinned agents past their
    /// share of the pool.
    #[error("tenant {tenant:?} may pin at most {limit} {what}; this would make {wanted}")]
    PinLimit {
        /// The tenant.
        tenant: String,
        /// What runs short: "blocks", "sliding-window pages" or "disk
        /// records".
        what: &'static str,
        /// How many of them its pinned agents may hold.
        limit: usize,
        /// How many they would hold.
        wanted: usize,
    },
    /// The cache cannot hold this request next to what is pinned.
    #[error("the KV cache is full: the step needs {needed} blocks, {available} can be freed (on a hybrid model: blocks or sliding-window pages, whichever is shorter)")]
    CacheFull {
        /// Blocks the request needed.
        needed: usize,
        /// Blocks free or evictable (and as many sliding-window pages on
        /// a hybrid model).
        available: usize,
    },
    /// The KV tiers' storage cannot be used (found at start): the cache
    /// directory is locked by another server, or cannot be created.
    #[error("KV storage: {0}")]
    Storage(String),
    /// The engine's configuration cannot work (found at start).
    #[error("invalid engine configuration: {0}")]
    InvalidConfig(String),
    /// Tokenizing or rendering the prompt failed.
    #[error("cannot read the prompt: {0}")]
    Prompt(String),
    /// The model failed during a step (logged in full; the requests of
    /// that step ended, their blocks were freed).
    #[error("the model failed: {0}")]
    Model(String),
    /// A request's grammar failed while generating (its per-token budget
    /// ran out, or it allowed no token): the request ends, nothing else.
    #[error("constrained decoding failed: {0}")]
    Grammar(String),
}

/// `Result` with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
