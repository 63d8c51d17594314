//! The engine's settings ([`EngineConfig`]) and the sizes callers validate
//! against ([`Limits`]).

#[allow(clippy::wildcard_imports)]
use super::*;

/// Scheduling limits.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The model's name as the API reports it.
    pub model_name: String,
    /// Tokens per model step (decodes plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// Requests waiting for admission before new ones are `Overloaded`.
    pub max_waiting: usize,
    /// Requests one tenant may have waiting (so one tenant cannot fill the
    /// queue).
    pub max_waiting_per_tenant: usize,
    /// Reuse cached K/V of earlier requests and agents (off only to compare).
    pub prefix_cache: bool,
    /// Timeout of requests that set none.
    pub default_timeout: Option<Duration>,
    /// Agents one tenant may keep. A new agent past it makes the tenant
    /// forget its least recently used idle evictable agent; if it has none,
    /// the request is refused with `TooManyAgents`.
    pub max_agents_per_tenant: usize,
    /// Share of the pool one tenant's pinned agents may hold (0 to 1).
    /// Pinning past it is refused (`PinLimit`); a pinned agent whose turn
    /// takes its tenant past it becomes evictable. The same share of the
    /// disk tier's budget bounds their records there, and of a hybrid
    /// model's sliding-window pages the pages their windows hold.
    pub max_pinned_share: f64,
    /// Share of the pool (and of the disk tier's budget) all tenants'
    /// pinned agents may hold together (0 to 1): two tenants each within
    /// their share cannot pin the whole pool.
    pub max_pinned_share_total: f64,
    /// Admission weights per tenant (default 1): among waiting requests of
    /// the same priority, the one whose tenant has the fewest admitted
    /// requests per weight goes first, so one tenant cannot take every
    /// running slot.
    pub tenant_weights: std::collections::HashMap<TenantId, u32>,
    /// The tiers below the pool (RAM, disk). None by default.
    pub tiers: TierConfig,
    /// Whether decoding drafts tokens to verify several per step
    /// (`speculative.rs`).
    pub speculative: Speculation,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            model_name: "model".into(),
            max_batch_tokens: 512,
            max_running: 64,
            max_waiting: 256,
            max_waiting_per_tenant: 64,
            prefix_cache: true,
            default_timeout: Some(Duration::from_secs(600)),
            max_agents_per_tenant: 1024,
            max_pinned_share: 0.5,
            max_pinned_share_total: 0.8,
            tenant_weights: std::collections::HashMap::new(),
            tiers: TierConfig::default(),
            speculative: Speculation::default(),
        }
    }
}

/// Sizes a caller needs to validate requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The model's context length.
    pub max_positions: usize,
    /// Tokens the whole KV pool holds.
    pub cache_tokens: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Logit row length (valid token ids are below it).
    pub vocab_size: usize,
}

impl Limits {
    /// The most tokens one request (prompt plus answer) may span.
    pub fn max_request_tokens(&self) -> usize {
        self.max_positions.min(self.cache_tokens)
    }
}

impl EngineConfig {
    /// Checks that requests can make progress under these numbers.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the first problem.
    pub fn validate(&self) -> Result<()> {
        let problem = if self.max_batch_tokens == 0 {
            "max_batch_tokens must be at least 1"
        } else if self.max_running == 0 {
            "max_running must be at least 1"
        } else if self.max_waiting == 0 || self.max_waiting_per_tenant == 0 {
            "max_waiting and max_waiting_per_tenant must be at least 1"
        } else if self.max_agents_per_tenant == 0 {
            "max_agents_per_tenant must be at least 1"
        } else if !(0.0..=1.0).contains(&self.max_pinned_share) || !(0.0..=1.0).contains(&self.max_pinned_share_total) {
            "max_pinned_share and max_pinned_share_total must be between 0 and 1"
        } else if self.tenant_weights.values().any(|&w| w == 0) {
            "tenant weights must be at least 1"
        } else if self.default_timeout.is_some_and(|t| t.is_zero() || t > crate::request::MAX_TIMEOUT) {
            "default_timeout must be positive and at most a year"
        } else if self.max_running > self.max_batch_tokens {
            // Every running sequence must get its decode token each step,
            // or the newest ones would wait while older ones finish.
            "max_running must not exceed max_batch_tokens"
        } else {
            return Ok(());
        };
        Err(Error::InvalidConfig(problem.into()))
    }
}
