//! kvserve's KV-aware router (`kvserve route`): one address in front of
//! several `kvserve serve` replicas of one model, sending each request
//! where its prompt's KV blocks already are.
//!
//! | concept | file |
//! |---|---|
//! | which replica holds which block, per tier; prefix costs | `index.rs` |
//! | the choice: rendezvous homes for agents, cost + load bound for prompts | `policy.rs` |
//! | the replica table, the index and counters under one lock; load counted at dispatch | `state.rs` |
//! | the replicas' KV event API (snapshot, long-polled events) | `wire.rs` |
//! | following each replica's events, resyncs, refusing a replica of another model | `events.rs` |
//! | `/health` polling | `health.rs` |
//! | request → tenant, agent, block addresses (the server's own prompt planning, the model's codec) | `plan.rs` |
//! | forwarding, retry before the first byte, streaming back, SSE error events | `proxy.rs` |
//! | routes, the agent API across replicas, `/health`, `/metrics` | `app.rs`, `metrics.rs` |
//! | the index and the choice at scale, without HTTP (`kvserve bench route --simulate`) | `simulate.rs` |
//!
//! # How a request is routed
//!
//! 1. The tenant comes from the API key (as `serve` maps it), the agent
//!    from the body's `agent_id` or the `x-agent-id` header.
//! 2. An agent goes where its last turn ran, else to its home (rendezvous
//!    hashing over the healthy replicas), unless that replica's load
//!    exceeds `bound × mean + 1`; then the next replica in its rendezvous
//!    order within the bound. A turn moved away from where the agent's
//!    last one ran asks that replica, once answered, to hand the agent
//!    over (`POST /v1/agents/{id}/hand-over`: forgotten there, kept in the
//!    shared remote tier), so an agent lives on one replica at a time.
//! 3. Otherwise the prompt is planned and encoded as a replica would, its
//!    block addresses computed ([`kv::PrefixHashes`] in the namespace of
//!    the model fingerprint and the tenant), and each replica's cost is
//!    the prefill it would do (leading blocks held in the pool cost 0, in
//!    RAM 0.05, on disk 0.2, only in the shared remote store 0.3, anything
//!    else 1) plus `load weight × load`; the cheapest within the bound
//!    wins.
//! 4. Load is running + waiting (as the replica last reported) + what this
//!    router has in flight there, counted at dispatch.
//!
//! The index is a hint fed by the replicas' events: stale, it costs a
//! cache miss, never a wrong answer. A replica whose snapshot names
//! another model, block size or namespacing is never routed to.
//!
//! # Dependencies
//!
//! `router -> {server (prompt planning, the guard, error bodies), model
//! (the codec: tokenizer and chat template, and the fingerprint), kv
//! (block addresses)}`. It never loads model weights.

mod app;
mod error;
mod events;
mod health;
pub mod index;
mod metrics;
mod plan;
pub mod policy;
mod proxy;
pub mod simulate;
mod state;
mod sync;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use kv::BlockHash;
use model::TextCodec;
use server::{Endpoint, Guard};

pub use error::{Error, Result};
pub use state::ReplicaStatus;

/// How often and how patiently the router talks to replicas.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Between two rounds of `/health` checks (1 s).
    pub health_interval: Duration,
    /// Longest a `/health` answer may take (1 s).
    pub health_timeout: Duration,
    /// Long-poll wait asked of `/v1/kv/events` (5 s; replicas cap it at
    /// 10 s).
    pub events_wait: Duration,
    /// Pause after a failed event request (1 s).
    pub retry_delay: Duration,
    /// Pause before reading a refused replica's snapshot again (5 s).
    pub recheck: Duration,
    /// Longest a connection to a replica may take to open (2 s).
    pub connect_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            health_interval: Duration::from_secs(1),
            health_timeout: Duration::from_secs(1),
            events_wait: Duration::from_secs(5),
            retry_delay: Duration::from_secs(1),
            recheck: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// What the router routes to, and how.
pub struct Config {
    /// Replica base URLs (`http://host:port`).
    pub replicas: Vec<String>,
    /// The model's tokenizer and chat template.
    pub codec: Arc<dyn TextCodec>,
    /// The model's fingerprint ([`model::model_fingerprint`]).
    pub fingerprint: Vec<u8>,
    /// Tokens per KV block: the replicas' `--block-size`.
    pub block_size: usize,
    /// API keys, host rules and the metrics key, as `serve` has them.
    pub guard: Guard,
    /// Sent as `Authorization: Bearer` to the replicas' KV event API (the
    /// replicas' metrics key, or an API key when they have no metrics key).
    pub replica_key: Option<String>,
    /// A replica is skipped for a request while its load exceeds
    /// `load_bound × mean load + 1` (1.5).
    pub load_bound: f64,
    /// Blocks of prefill one unit of load weighs against (1).
    pub load_weight: f64,
    /// Largest request body (4 MiB).
    pub max_body_bytes: usize,
    /// Longest a request body may take to arrive (60 s).
    pub body_timeout: Duration,
    /// Talking to replicas.
    pub timing: Timing,
}

impl Config {
    /// The defaults for these replicas and this model.
    pub fn new(replicas: Vec<String>, codec: Arc<dyn TextCodec>, fingerprint: Vec<u8>) -> Self {
        Self {
            replicas,
            codec,
            fingerprint,
            block_size: 16,
            guard: Guard::default(),
            replica_key: None,
            load_bound: 1.5,
            load_weight: 1.0,
            max_body_bytes: 4 << 20,
            body_timeout: Duration::from_secs(60),
            timing: Timing::default(),
        }
    }
}

/// A running router: its background tasks (health checks, one event
/// follower per replica) live as long as it does.
pub struct KvRouter {
    shared: Arc<state::Shared>,
    planner: Arc<plan::Planner>,
    app: axum::Router,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for KvRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvRouter").field("replicas", &self.shared.all().len()).finish_non_exhaustive()
    }
}

impl Drop for KvRouter {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// `http://host:port` without a trailing slash.
fn normalize(url: &str) -> Result<Arc<str>> {
    let trimmed = url.trim().trim_end_matches('/');
    let parsed =
        reqwest::Url::parse(trimmed).map_err(|e| Error::BadReplicaUrl { url: url.into(), reason: e.to_string() })?;
    if parsed.scheme() != "http" {
        return Err(Error::BadReplicaUrl { url: url.into(), reason: "only http:// replicas are supported".into() });
    }
    if parsed.host_str().is_none() || parsed.query().is_some() || parsed.path() != "/" {
        return Err(Error::BadReplicaUrl { url: url.into(), reason: "give http://host:port, no path".into() });
    }
    Ok(trimmed.into())
}

impl KvRouter {
    /// Starts the background tasks and builds the routes. Replicas are
    /// routed to once their `/health` answers and their KV snapshot
    /// matches (within a second or so of start).
    ///
    /// # Errors
    /// [`Error::NoReplicas`], [`Error::TooManyReplicas`],
    /// [`Error::BadReplicaUrl`], [`Error::DuplicateReplica`],
    /// [`Error::InvalidConfig`] for a setting that cannot work,
    /// [`Error::Client`] if the HTTP client cannot be built.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn start(config: Config) -> Result<Self> {
        if config.replicas.is_empty() {
            return Err(Error::NoReplicas);
        }
        if config.replicas.len() > index::ReplicaId::MAX {
            return Err(Error::TooManyReplicas { count: config.replicas.len(), max: index::ReplicaId::MAX });
        }
        if !(config.load_bound >= 1.0 && config.load_bound.is_finite()) {
            return Err(Error::InvalidConfig("the load bound must be at least 1"));
        }
        if !(config.load_weight >= 0.0 && config.load_weight.is_finite()) {
            return Err(Error::InvalidConfig("the load weight must be 0 or more"));
        }
        if config.block_size == 0 {
            return Err(Error::InvalidConfig("the block size must be at least 1"));
        }
        let mut urls: Vec<Arc<str>> = Vec::with_capacity(config.replicas.len());
        for r in &config.replicas {
            let url = normalize(r)?;
            if urls.contains(&url) {
                return Err(Error::DuplicateReplica { url: url.to_string() });
            }
            urls.push(url);
        }
        let t = config.timing;
        let client = reqwest::Client::builder()
            .connect_timeout(t.connect_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(Error::Client)?;
        let weights = state::Weights { bound: config.load_bound, load_weight: config.load_weight };
        let shared = Arc::new(state::Shared::new(&urls, weights));
        let expect = events::Expect { fingerprint: wire::hex(&config.fingerprint), block_size: config.block_size };
        let follow = events::Follow {
            client: client.clone(),
            key: config.replica_key.as_deref().map(Arc::from),
            expect,
            wait: t.events_wait,
            retry_delay: t.retry_delay,
            recheck: t.recheck,
        };
        let mut tasks =
            vec![tokio::spawn(health::watch(Arc::clone(&shared), client.clone(), t.health_interval, t.health_timeout))];
        for (id, url) in shared.all() {
            tasks.push(tokio::spawn(events::follow(Arc::clone(&shared), id, url, follow.clone())));
        }
        let planner = Arc::new(plan::Planner {
            codec: config.codec,
            fingerprint: config.fingerprint.into(),
            block_size: config.block_size,
            prep: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get).max(2),
            )),
        });
        let app = app::routes(app::App {
            shared: Arc::clone(&shared),
            client,
            planner: Arc::clone(&planner),
            guard: Arc::new(config.guard),
            max_body: config.max_body_bytes,
            body_timeout: config.body_timeout,
        });
        Ok(Self { shared, planner, app, tasks })
    }

    /// The routes, to serve (`axum::serve`, `server::conn`).
    pub fn app(&self) -> axum::Router {
        self.app.clone()
    }

    /// Every replica's state, in `--replica` order.
    pub fn replicas(&self) -> Vec<ReplicaStatus> {
        self.shared.replicas()
    }

    /// The Prometheus text `/metrics` serves.
    pub fn metrics_text(&self) -> String {
        metrics::render(&self.shared.snapshot())
    }

    /// The block addresses a replica would give the prompt of `body` sent
    /// to `endpoint` by `tenant` (what the router routes on).
    ///
    /// # Errors
    /// [`Error::Prompt`] for a body the endpoint would refuse or the codec
    /// cannot encode.
    pub fn chain_of(&self, tenant: &str, endpoint: Endpoint, body: &serde_json::Value) -> Result<Vec<BlockHash>> {
        let prompt = server::prompt_of(endpoint, body).map_err(|e| Error::Prompt(e.message))?;
        self.planner.chain(tenant, &prompt)
    }
}
