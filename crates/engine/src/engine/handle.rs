//! [`EngineHandle`]'s methods: submit, cancel, agents, tiers, stats,
//! shutdown, each a command to the engine thread.

#[allow(clippy::wildcard_imports)]
use super::*;

impl EngineHandle {
    /// Limits requests are checked against.
    pub fn limits(&self) -> Limits {
        self.shared.limits
    }

    /// True once the engine has stopped (or is stopping after a shutdown).
    pub fn is_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::SeqCst)
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    /// Builds the grammar compiler (the vocabulary's token trie) now, so
    /// the first constrained request does not pay for it. Blocking: call
    /// it off any async runtime.
    pub fn warm_grammars(&self) {
        self.shared.grammars.warm();
    }

    /// The model's codec (tokenizer and chat template).
    pub fn codec(&self) -> &Arc<dyn TextCodec> {
        &self.shared.codec
    }

    /// Renders and tokenizes the prompt (client text literal: only the chat
    /// template's markup becomes control tokens) and checks every limit.
    /// CPU-bound for long prompts: async callers run it off their runtime.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`], [`Error::PromptTooLong`],
    /// [`Error::ContextExceeded`] or [`Error::Prompt`].
    pub fn validate(&self, req: Request) -> Result<ValidRequest> {
        req.validate_params()?;
        let codec = &self.shared.codec;
        let limits = self.shared.limits;
        // Text alone too long for the context is refused before the (costly)
        // tokenization: no token stands for more than `max_token_bytes`.
        let text_bytes = match &req.prompt {
            Prompt::Text(t) => t.len(),
            Prompt::Chat(m) => m.iter().map(|m| m.content.len()).sum(),
            Prompt::Tokens(_) => 0,
        };
        let min_tokens = text_bytes / codec.max_token_bytes().max(1);
        if min_tokens >= limits.max_request_tokens() {
            return Err(Error::PromptTooLong { bytes: text_bytes, min_tokens, limit: limits.max_request_tokens() });
        }
        let prompt = match &req.prompt {
            Prompt::Text(t) => codec.encode_prompt(t),
            Prompt::Chat(m) => codec.encode_chat(m),
            Prompt::Tokens(t) => Ok(t.clone()),
        }
        .map_err(|e| Error::Prompt(e.to_string()))?;
        let vocab = limits.vocab_size as u32;
        let ids_of: [(&'static str, Vec<u32>); 3] = [
            ("prompt", prompt.clone()),
            ("stop_token_ids", req.stop_token_ids.clone()),
            ("logit_bias", req.logit_bias.iter().map(|b| b.0).collect()),
        ];
        for (field, ids) in ids_of {
            if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
                return Err(Error::InvalidRequest {
                    field,
                    problem: format!("token id {bad} is outside the vocabulary of {vocab}"),
                });
            }
        }
        if prompt.is_empty() {
            return Err(Error::InvalidRequest { field: "prompt", problem: "encodes to no tokens".into() });
        }
        let limit = limits.max_request_tokens();
        let max_tokens = match req.max_tokens {
            Some(n) => n,
            None => limit.saturating_sub(prompt.len()),
        };
        let nothing = max_tokens == 0 && req.prompt_logprobs.is_none();
        if nothing || prompt.len().saturating_add(max_tokens) > limit {
            return Err(Error::ContextExceeded { prompt: prompt.len(), max_tokens, limit });
        }
        let mut stop_ids = req.stop_token_ids.clone();
        if !req.ignore_eos {
            stop_ids.extend_from_slice(codec.stop_ids());
        }
        let grammar = req.grammar.as_ref().map(|g| self.shared.grammars.compile(g)).transpose()?;
        Ok(ValidRequest { prompt, max_tokens, stop_ids, grammar, req })
    }

    /// Queues a validated request.
    ///
    /// # Errors
    /// [`Error::Overloaded`] when the queue is full, [`Error::EngineStopped`].
    pub fn submit(&self, req: ValidRequest) -> Result<EventStream> {
        if self.shared.stopped.load(Ordering::SeqCst) {
            return Err(Error::EngineStopped);
        }
        let config = &self.shared.config;
        let (limit, per_tenant) = (config.max_waiting, config.max_waiting_per_tenant);
        let ticket = match self.shared.waiting.reserve(&req.req.tenant, limit, per_tenant) {
            Ok(t) => t,
            Err(full) if full.all >= limit => return Err(Error::Overloaded { queued: full.all, limit }),
            Err(full) => return Err(Error::Overloaded { queued: full.tenant, limit: per_tenant }),
        };
        let id = RequestId(self.shared.next_id.fetch_add(1, Ordering::Relaxed));
        let (events, rx) = tmpsc::unbounded_channel();
        let sub = Submission { id, req, events: EventSender(events), ticket, looked_up: false };
        self.shared.tx.send(Command::Submit(Box::new(sub))).map_err(|_| Error::EngineStopped)?;
        Ok(EventStream { id, rx, held: None, done: false })
    }

    /// [`EngineHandle::validate`] then [`EngineHandle::submit`].
    ///
    /// # Errors
    /// As those two.
    pub fn generate(&self, req: Request) -> Result<EventStream> {
        self.submit(self.validate(req)?)
    }

    /// Cancels a request; its stream ends with `Finished(Cancelled)`.
    /// Unknown or finished ids are ignored.
    ///
    /// # Errors
    /// [`Error::EngineStopped`].
    pub fn cancel(&self, id: RequestId) -> Result<()> {
        self.send(Command::Cancel(id))
    }

    /// One consistent snapshot of the engine's numbers.
    pub fn stats(&self) -> EngineStats {
        self.shared.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn send(&self, cmd: Command) -> Result<()> {
        self.shared.tx.send(cmd).map_err(|_| Error::EngineStopped)
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        rx.await.map_err(|_| Error::EngineStopped)
    }

    /// The tenant's agents, by id.
    ///
    /// # Errors
    /// [`Error::EngineStopped`].
    pub async fn agents(&self, tenant: &TenantId) -> Result<Vec<AgentInfo>> {
        let tenant = tenant.clone();
        self.ask(|r| Command::Agents(tenant, r)).await
    }

    /// The prefix tree of a tenant's agents: their shared and own blocks,
    /// and where those are (`prefix_tree.rs`).
    ///
    /// # Errors
    /// [`Error::EngineStopped`].
    pub async fn prefix_tree(&self, tenant: &TenantId) -> Result<crate::PrefixTree> {
        let tenant = tenant.clone();
        self.ask(|r| Command::PrefixTree(tenant, r)).await
    }

    /// One agent.
    ///
    /// # Errors
    /// [`Error::UnknownAgent`], [`Error::EngineStopped`].
    pub async fn agent(&self, tenant: &TenantId, id: &AgentId) -> Result<AgentInfo> {
        let (tenant, id) = (tenant.clone(), id.clone());
        self.ask(|r| Command::Agent(tenant, id, r)).await?
    }

    /// Forgets an agent and frees its blocks (a turn in progress finishes
    /// but is not kept).
    ///
    /// # Errors
    /// [`Error::UnknownAgent`], [`Error::EngineStopped`].
    pub async fn delete_agent(&self, tenant: &TenantId, id: &AgentId) -> Result<()> {
        let (tenant, id) = (tenant.clone(), id.clone());
        self.ask(|r| Command::DeleteAgent(tenant, id, r)).await?
    }

    /// Hands an idle agent over to another replica: forgotten here, kept in
    /// the shared (remote) tier its next turn resumes from.
    ///
    /// # Errors
    /// [`Error::UnknownAgent`]; [`Error::InvalidRequest`] while a turn runs
    /// or without a shared tier; [`Error::Storage`]; [`Error::EngineStopped`].
    pub async fn hand_over_agent(&self, tenant: &TenantId, id: &AgentId) -> Result<()> {
        let (tenant, id) = (tenant.clone(), id.clone());
        self.ask(|r| Command::HandOverAgent(tenant, id, r)).await?
    }

    /// Changes an agent's retention or priority.
    ///
    /// # Errors
    /// [`Error::UnknownAgent`], [`Error::EngineStopped`].
    pub async fn update_agent(&self, tenant: &TenantId, id: &AgentId, update: AgentUpdate) -> Result<AgentInfo> {
        let (tenant, id) = (tenant.clone(), id.clone());
        self.ask(|r| Command::UpdateAgent(tenant, id, update, r)).await?
    }

    /// Moves an idle agent's blocks out of the pool into the RAM tier, or
    /// with [`crate::OffloadTo::SecondTier`] on to the disk tier, as memory pressure would (for
    /// benchmarks and operators; the next turn brings them back). Returns
    /// where its blocks are then.
    ///
    /// # Errors
    /// [`Error::UnknownAgent`], [`Error::InvalidRequest`] if a turn is
    /// running, [`Error::EngineStopped`].
    pub async fn offload_agent(&self, tenant: &TenantId, id: &AgentId, to: crate::OffloadTo) -> Result<BlockLocations> {
        let (tenant, id) = (tenant.clone(), id.clone());
        self.ask(|r| Command::Offload(tenant, id, to, r)).await?
    }

    /// Waits until everything queued for the disk tier so far is written
    /// and durable (agents' latest turns included); false if `timeout`
    /// passed first or there is no disk tier.
    ///
    /// # Errors
    /// [`Error::EngineStopped`].
    pub async fn flush_tiers(&self, timeout: Duration) -> Result<bool> {
        let Some(flusher) = self.ask(Command::Flusher).await? else { return Ok(false) };
        let (tx, rx) = oneshot::channel();
        std::thread::spawn(move || {
            let _ = tx.send(flusher.flush(timeout));
        });
        let flushed = rx.await.map_err(|_| Error::EngineStopped)?;
        // The stats (and `degraded`) a caller reads next include what the
        // flush did.
        self.ask(Command::Publish).await?;
        Ok(flushed)
    }

    /// Every block this replica holds, by tier, exact as of the event log's
    /// `next` (what a router's index starts from).
    ///
    /// # Errors
    /// [`Error::EngineStopped`].
    pub async fn kv_snapshot(&self) -> Result<crate::kv_events::KvSnapshot> {
        self.ask(Command::KvSnapshot).await
    }

    /// The model's fingerprint: a block's namespace is
    /// `kv::Namespace::new(fingerprint, tenant)`.
    pub fn model_fingerprint(&self) -> &[u8] {
        &self.shared.fingerprint
    }

    /// The log of blocks entering and leaving the pool and the tiers.
    pub fn kv_events(&self) -> &crate::kv_events::KvEvents {
        &self.shared.kv_events
    }

    /// Drops the disk tier's records from the page cache, so the next loads
    /// read the device (benchmarks).
    ///
    /// # Errors
    /// [`Error::EngineStopped`].
    pub async fn forget_disk_cache(&self) -> Result<()> {
        self.ask(Command::ForgetDiskCache).await
    }

    /// Why a tier is not serving fully, if one is degraded: "<tier> tier:
    /// <reason>" for each such tier.
    pub fn degraded(&self) -> Option<String> {
        let reasons: Vec<String> = self
            .stats()
            .tiers
            .tiers
            .iter()
            .filter_map(|t| t.degraded.as_ref().map(|d| format!("{} tier: {d}", t.name)))
            .collect();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    /// Sets (or with `None` lifts) a tenant's block quota.
    ///
    /// # Errors
    /// [`Error::EngineStopped`].
    pub async fn set_quota(&self, tenant: &TenantId, quota: Option<u32>) -> Result<()> {
        let tenant = tenant.clone();
        self.ask(|r| Command::SetQuota(tenant, quota, r)).await?
    }

    /// Runs the cache's full consistency check (tests and debugging).
    ///
    /// # Errors
    /// The violation found, or [`Error::EngineStopped`] as text.
    pub async fn check_invariants(&self) -> Result<(), String> {
        self.ask(Command::CheckInvariants).await.map_err(|e| e.to_string())?
    }

    /// Stops taking requests, lets running ones finish for up to `grace`,
    /// ends the rest with [`Error::EngineStopped`], and stops the loop.
    ///
    /// # Errors
    /// [`Error::EngineStopped`] if it had already stopped.
    pub async fn shutdown(&self, grace: Duration) -> Result<()> {
        self.ask(|r| Command::Shutdown(grace, r)).await
    }
}
