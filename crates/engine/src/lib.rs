//! The engine of kvserve: one thread that owns the model and the paged KV
//! cache and runs continuous batching over them, and a cloneable handle that
//! takes validated requests and hands back a stream of events.
//!
//! | concept | file |
//! |---|---|
//! | requests, ids, events, validation rules | `request.rs` |
//! | the engine thread and its concurrency (`# Concurrency`) | `engine/mod.rs` |
//! | its settings and limits | `engine/config.rs` |
//! | the loop and what each command does | `engine/run.rs` |
//! | a request's event stream | `engine/events.rs` |
//! | the handle's methods | `engine/handle.rs` |
//! | scheduling: admission, chunked prefill, preemption, finishing | `core.rs` |
//! | one step's cache transaction around the model's forward pass | `txn.rs` |
//! | agents and their retention | `agents.rs` |
//! | admission: reuse from the pool and the tiers, fitting the step | `core/admission.rs` |
//! | the tiers below the pool: config, loads, pending blocks, costs | `tiering.rs` |
//! | the scheduler's use of the tiers, durable agents | `core/tier_ops.rs` |
//! | agents' operations: info, delete, hand over, retention | `core/agent_ops.rs` |
//! | agents that come back on another replica (a shared tier) | `core/resume.rs` |
//! | choosing tokens | `sampling.rs` |
//! | constrained decoding (grammars, masks) | `grammar.rs` |
//! | JSON schemas as compiled: bounded values, strict objects, layout | `schema.rs` |
//! | streamed text and stop strings | `text.rs` |
//! | the metrics snapshot | `metrics.rs` |
//! | KV events and the snapshot a router follows | `kv_events.rs` |
//! | speculative decoding: proposers, step costs, choosing drafts | `speculative.rs` |
//! | a tenant's prefix tree, for the web page | `prefix_tree.rs` |
//! | a fake model and codec for tests | `testing.rs` |
//! | errors | `error.rs` |
//!
//! ```
//! use std::sync::Arc;
//! use engine::testing::{FakeCodec, FakeModel};
//! use engine::{EngineConfig, Event, Prompt, Request, SamplingParams};
//!
//! let (model, _control) = FakeModel::new(16, 64);
//! let engine = engine::start(Box::new(model), Arc::new(FakeCodec::new()), EngineConfig::default())?;
//! let mut req = Request::new(Prompt::Text("hello".into()));
//! req.sampling = SamplingParams::greedy();
//! req.max_tokens = Some(5);
//! let mut events = engine.generate(req)?;
//! let mut text = String::new();
//! while let Some(event) = events.blocking_next() {
//!     match event {
//!         Event::Token { text: t, .. } => text.push_str(&t),
//!         Event::Finished { text: t, usage, .. } => {
//!             text.push_str(&t);
//!             assert_eq!(usage.completion_tokens, 5);
//!         }
//!         Event::Error(e) => return Err(e.into()),
//!         Event::Prompt { .. } => {} // only with `Request::prompt_logprobs`
//!     }
//! }
//! assert_eq!(text.len(), 5);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod agents;
mod core;
mod engine;
mod error;
mod grammar;
mod kv_events;
mod metrics;
mod prefix_tree;
mod request;
mod sampling;
mod schema;
mod speculative;
pub mod testing;
mod text;
mod tiering;
pub mod txn;

pub use agents::{AgentInfo, AgentUpdate, BlockLocations, OffloadTo, Retention};
pub use engine::{start, EngineConfig, EngineHandle, EventStream, Limits};
pub use error::{Error, Result};
pub use grammar::{CompiledGrammar, Grammar, GrammarSpec, MAX_GRAMMAR_BYTES};
pub use kv_events::{Gap, KvEvent, KvEventBatch, KvEventKind, KvEvents, KvSnapshot, EVENT_LOG_CAPACITY};
pub use metrics::{EngineStats, Finished, Histogram, LATENCY_BUCKETS};
pub use model::{tools, Message};
pub use prefix_tree::{PrefixTree, TreeNode, NOWHERE};
pub use request::{
    AgentId, Event, FinishReason, Logprobs, Prompt, Request, RequestId, SamplingParams, TenantId, Usage, ValidRequest,
    MAX_ID_LEN, MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS, MAX_TIMEOUT,
};
pub use schema::{grammar_schema, FRACTION_DIGITS, MAX_STRING_CHARS, NUMBER_LIMIT};
pub use speculative::Speculation;
pub use tiering::{LoadPolicy, TierConfig, TierCounters, TierMoves, TierStats};
pub use tiers::{
    DiskConfig, DiskStats, RemoteConfig, RemoteStats, TierSnapshot, LATENCY_BUCKETS_S as TIER_LATENCY_BUCKETS,
};
