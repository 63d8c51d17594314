//! From a request to its routing inputs: the tenant (from the API key, as
//! `serve` maps it), the agent (the body's `agent_id` or the `x-agent-id`
//! header) and, for a prompt, its block addresses.
//!
//! Addresses are computed exactly as a replica computes them: the body is
//! planned by the server crate's own [`server::prompt_of`] (the function
//! the replica's handler uses: roles, content parts, tool rendering), the
//! prompt encoded with the model's codec ([`model::TextCodec`]: chat
//! template, BOS), and the tokens hashed into a chain with
//! [`kv::PrefixHashes`] in the namespace of the model fingerprint and the
//! tenant. Agents are routed by name, so their prompts are not encoded.
//!
//! Encoding takes CPU time proportional to the prompt: it runs on the
//! blocking pool, a few at a time, so the async threads keep answering.
//! A body the router cannot plan (malformed JSON, an unknown shape) is
//! still forwarded; the replica gives the real error.

use std::sync::Arc;

use axum::http::HeaderMap;
use kv::{BlockHash, Namespace, PrefixHashes};
use model::TextCodec;
use server::{Endpoint, Prompt};

use crate::error::{Error, Result};
use crate::state::Target;

/// What the router needs to compute block addresses.
pub(crate) struct Planner {
    pub(crate) codec: Arc<dyn TextCodec>,
    pub(crate) fingerprint: Arc<[u8]>,
    pub(crate) block_size: usize,
    /// Prompts encoded at once.
    pub(crate) prep: Arc<tokio::sync::Semaphore>,
}

impl Planner {
    /// The block addresses of `prompt` for `tenant`.
    ///
    /// # Errors
    /// [`Error::Prompt`] if the codec cannot encode it.
    pub(crate) fn chain(&self, tenant: &str, prompt: &Prompt) -> Result<Vec<BlockHash>> {
        let tokens = match prompt {
            Prompt::Text(t) => self.codec.encode_prompt(t),
            Prompt::Chat(m) => self.codec.encode_chat(m),
            Prompt::Tokens(t) => Ok(t.clone()),
        }
        .map_err(|e| Error::Prompt(e.to_string()))?;
        let ns = Namespace::new(&self.fingerprint, tenant.as_bytes());
        Ok(PrefixHashes::compute(ns, &tokens, self.block_size).hashes().to_vec())
    }

    /// The target of a completion body sent to `endpoint` (`None`: an
    /// endpoint whose prompt the router does not read).
    pub(crate) async fn completion(
        self: &Arc<Self>,
        endpoint: Option<Endpoint>,
        tenant: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Target {
        let value: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let agent = value
            .as_ref()
            .and_then(|v| v.get("agent_id"))
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
            .or_else(|| header_agent(headers));
        if agent.is_some() {
            return Target::Completion { agent, chain: None };
        }
        let prompt = match (endpoint, &value) {
            (Some(e), Some(v)) => server::prompt_of(e, v).ok(),
            _ => None,
        };
        let Some(prompt) = prompt else { return Target::Completion { agent: None, chain: None } };
        let Ok(permit) = Arc::clone(&self.prep).acquire_owned().await else {
            return Target::Completion { agent: None, chain: None };
        };
        let (planner, tenant) = (Arc::clone(self), tenant.to_owned());
        let chain = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            planner.chain(&tenant, &prompt)
        })
        .await;
        match chain {
            Ok(Ok(chain)) => Target::Completion { agent: None, chain: Some(chain) },
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "prompt not planned; routing by load");
                Target::Completion { agent: None, chain: None }
            }
            Err(e) => {
                tracing::error!(error = %e, "planning a prompt failed");
                Target::Completion { agent: None, chain: None }
            }
        }
    }
}

/// The agent the `x-agent-id` header names.
pub(crate) fn header_agent(headers: &HeaderMap) -> Option<String> {
    headers.get(server::AGENT_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned)
}
