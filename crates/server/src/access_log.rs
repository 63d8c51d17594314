//! One log line per request, as vLLM and llama-server print them: method,
//! path, status and duration, and for a generation the agent, prompt /
//! cached / generated tokens and the time to the first token.
//!
//! # Design
//!
//! A middleware ([`log_requests`]) puts an empty [`GenerationLog`] in the
//! request's extensions; the completion handlers fill it as the request
//! runs (agent at admission, TTFT at the first token, usage at the end).
//! The line is written when the response *body* ends or is dropped
//! (`end_body.rs`), not when the handler returns: a streamed answer is logged once, complete,
//! with the status it was sent with (a client that went away mid-stream
//! shows as `ended early`). The body is wrapped, never buffered or
//! re-chunked; its size hint passes through, so `Content-Length` stays.
//!
//! `/health` and `/metrics` are logged at debug level (probes and scrapers
//! would drown the rest); everything else at info, under the
//! `kvserve::request` target (`--log kvserve::request=warn` silences it).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use crate::end_body::EndBody;

/// What a generation adds to its request's line.
#[derive(Debug, Default)]
struct Generation {
    agent: Option<String>,
    ttft: Option<Duration>,
    usage: Option<engine::Usage>,
}

/// The generation facts of one request, filled by its handler.
#[derive(Clone, Debug)]
pub(crate) struct GenerationLog {
    started: Instant,
    facts: Arc<Mutex<Generation>>,
}

impl GenerationLog {
    fn new(started: Instant) -> Self {
        Self { started, facts: Arc::default() }
    }

    fn with(&self, f: impl FnOnce(&mut Generation)) {
        // A poisoned lock only loses a log line's detail.
        if let Ok(mut g) = self.facts.lock() {
            f(&mut g);
        }
    }

    /// The request runs as this agent's turn.
    pub(crate) fn agent(&self, agent: Option<&engine::AgentId>) {
        let name = agent.map(|a| a.as_str().to_owned());
        self.with(|g| g.agent = name);
    }

    /// A token arrived (the first one sets the TTFT).
    pub(crate) fn token(&self) {
        let at = self.started.elapsed();
        self.with(|g| {
            g.ttft.get_or_insert(at);
        });
    }

    /// The request finished with these counts.
    pub(crate) fn finished(&self, usage: engine::Usage) {
        self.with(|g| g.usage = Some(usage));
    }
}

/// The middleware: see the module doc.
pub(crate) async fn log_requests(mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let log = GenerationLog::new(started);
    req.extensions_mut().insert(log.clone());
    let response = next.run(req).await;
    let line = Line { method, path, status: response.status(), log };
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, Body::new(EndBody::new(body, move |complete| line.write(complete))))
}

/// The line of one request, written once.
struct Line {
    method: Method,
    path: String,
    status: StatusCode,
    log: GenerationLog,
}

impl Line {
    /// Writes it; `complete`: the body was sent to its end.
    fn write(self, complete: bool) {
        let ms = self.log.started.elapsed().as_secs_f64() * 1e3;
        let (method, path, status) = (self.method.as_str(), self.path.as_str(), self.status.as_u16());
        let ended = if complete { "" } else { " (ended early)" };
        let g = self.log.facts.lock().map(|mut g| std::mem::take(&mut *g)).unwrap_or_default();
        if g.usage.is_some() || g.ttft.is_some() {
            let u = g.usage.unwrap_or_default();
            let agent = g.agent.as_deref().unwrap_or("-");
            let ttft = g.ttft.map_or_else(|| "-".to_owned(), |t| format!("{:.1}", t.as_secs_f64() * 1e3));
            tracing::info!(
                target: "kvserve::request",
                "{method} {path} {status} agent={agent} prompt={} cached={} generated={} ttft_ms={ttft} ms={ms:.1}{ended}",
                u.prompt_tokens,
                u.cached_tokens,
                u.completion_tokens,
            );
        } else if path == "/health" || path == "/metrics" {
            tracing::debug!(target: "kvserve::request", "{method} {path} {status} ms={ms:.1}{ended}");
        } else {
            tracing::info!(target: "kvserve::request", "{method} {path} {status} ms={ms:.1}{ended}");
        }
    }
}
