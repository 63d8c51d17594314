//! The web page at `/`: a chat with the model, and a live view of the
//! cache (pool, tiers, throughput and TTFT over the last minutes, the
//! tenant's agents and their prefix tree).
//!
//! | path | what |
//! |---|---|
//! | `GET /` | the page (`ui/index.html`) |
//! | `GET /ui/app.js`, `/ui/app.css`, `/favicon.svg`, `/favicon.ico` | its parts |
//! | `GET /v1/dashboard` | what the cache view shows, as JSON, polled once a second |
//!
//! The assets are built into the binary (`include_str!`): no CDN, no
//! network at run time, 29 KB in all (9 KB gzipped). Plain JavaScript, CSS and SVG
//! with no build step and no library (charts are SVG polylines, the prefix
//! tree an SVG icicle): nothing to vendor, and `cargo build` needs nothing
//! but Rust. Every page response carries a strict Content-Security-Policy
//! (only this origin's scripts and styles, nothing inline, no framing) and
//! passes the same Host and Origin rules as the API (`guard.rs`); the
//! page's own POSTs and DELETEs carry an `Origin` equal to the server's
//! own, which the guard allows. `--no-ui` leaves these routes out.
//!
//! The dashboard answers per tenant: its agents and their prefix tree. The
//! server-wide numbers (pool, tiers, throughput) are those of `/metrics`,
//! so with API keys they come only with a key `/metrics` accepts; other
//! tenants' pages get `"server": null`, and the metrics key alone gets the
//! numbers without agents. The throughput and TTFT history is
//! sampled once a second by a task that runs while the router lives (five
//! minutes kept), so a page opened now draws the last minutes at once.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use engine::{EngineHandle, EngineStats};
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::AppState;

const INDEX: &str = include_str!("../ui/index.html");
const APP_JS: &str = include_str!("../ui/app.js");
const APP_CSS: &str = include_str!("../ui/app.css");
const FAVICON: &str = include_str!("../ui/favicon.svg");

/// The page's Content-Security-Policy: its own scripts, styles, images and
/// fetches only; no inline script or style, no plugins, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Samples of the history kept: five minutes at one a second.
const HISTORY: usize = 300;
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// One second's counters, for the charts (the page draws the differences).
#[derive(Clone, Copy, Debug, Serialize)]
struct Sample {
    /// Milliseconds since the Unix epoch.
    t_ms: u64,
    /// Tokens generated so far.
    generated: u64,
    /// Prompt tokens computed so far (admitted minus served from cache).
    prefilled: u64,
    /// Sum and count of time-to-first-token observations so far.
    ttft_sum: f64,
    ttft_count: u64,
}

impl Sample {
    fn of(s: &EngineStats) -> Self {
        let t_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        Self {
            t_ms,
            generated: s.generated_tokens,
            prefilled: s.prompt_tokens.saturating_sub(s.cached_prompt_tokens),
            ttft_sum: s.ttft.sum,
            ttft_count: s.ttft.count(),
        }
    }
}

/// The page's server-side state: the history of samples.
#[derive(Debug, Default)]
pub(crate) struct Ui {
    history: Mutex<VecDeque<Sample>>,
}

impl Ui {
    fn push(&self, sample: Sample) {
        if let Ok(mut h) = self.history.lock() {
            if h.len() == HISTORY {
                h.pop_front();
            }
            h.push_back(sample);
        }
    }

    fn history(&self) -> Vec<Sample> {
        self.history.lock().map(|h| h.iter().copied().collect()).unwrap_or_default()
    }
}

/// The page's state, and its sampler started on the current runtime (none
/// outside one): it stops once the router holding the state is gone.
pub(crate) fn start(engine: &EngineHandle) -> Arc<Ui> {
    let ui = Arc::new(Ui::default());
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(sample(Arc::downgrade(&ui), engine.clone()));
    }
    ui
}

async fn sample(ui: Weak<Ui>, engine: EngineHandle) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let Some(ui) = ui.upgrade() else { return };
        if engine.is_stopped() {
            return;
        }
        ui.push(Sample::of(&engine.stats()));
    }
}

/// The page's routes (module doc).
pub(crate) fn routes(router: Router<AppState>) -> Router<AppState> {
    router
        .route("/", get(|| async { page(INDEX, "text/html; charset=utf-8") }))
        .route("/ui/app.js", get(|| async { page(APP_JS, "text/javascript; charset=utf-8") }))
        .route("/ui/app.css", get(|| async { page(APP_CSS, "text/css; charset=utf-8") }))
        .route("/favicon.svg", get(|| async { page(FAVICON, "image/svg+xml") }))
        .route("/favicon.ico", get(|| async { page(FAVICON, "image/svg+xml") }))
        .route("/v1/dashboard", get(dashboard))
}

fn page(body: &'static str, kind: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// `GET /v1/dashboard`: the tenant's agents and prefix tree, and the
/// server-wide numbers where `/metrics` would answer (module doc). The
/// metrics key alone (`--metrics-key`, not an API key) gets the numbers and
/// no agents: an operator's view.
async fn dashboard(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let metrics = state.guard.check_metrics(&headers).is_ok();
    let (agents, tree) = match state.guard.tenant(&headers) {
        Ok(tenant) => {
            let agents = state.engine.agents(&tenant).await?;
            let tree = state.engine.prefix_tree(&tenant).await?;
            (serde_json::to_value(agents).unwrap_or_default(), serde_json::to_value(tree).unwrap_or_default())
        }
        Err(_) if metrics => (json!([]), json!({"block_size": state.engine.stats().cache.block_size, "nodes": []})),
        Err(e) => return Err(e),
    };
    let server = match (metrics, &state.ui) {
        (true, Some(ui)) => server_view(&state.engine.stats(), ui.history()),
        _ => Value::Null,
    };
    Ok(Json(json!({
        "object": "dashboard",
        "model": &*state.model_name,
        "keys_required": state.guard.has_keys(),
        "server": server,
        "agents": agents,
        "tree": tree,
    })))
}

fn server_view(s: &EngineStats, history: Vec<Sample>) -> Value {
    let prompt = s.prompt_tokens.max(1) as f64;
    let moves = &s.tiers.counters.tiers;
    let tiers: Vec<Value> = s
        .tiers
        .tiers
        .iter()
        .map(|t| {
            let hits = moves.iter().find(|m| m.name == t.name).map_or(0, |m| m.hit_tokens);
            json!({
                "name": t.name,
                "blocks": t.blocks,
                "bytes": t.bytes,
                "budget": t.budget,
                "degraded": t.degraded,
                "hit_tokens": hits,
                "hit_share": hits as f64 / prompt,
            })
        })
        .collect();
    json!({
        "pool": s.cache,
        // A hybrid model's second memory: its sliding-window pages.
        "sliding_pages": s.sliding_pages.map(|(total, held)| json!({"total": total, "held": held})),
        "running": s.running,
        "waiting": s.waiting,
        "tokens_per_second": s.tokens_per_second,
        "prefix_hit_rate": s.prefix_hit_rate(),
        "pool_hit_tokens": s.tiers.counters.hit_tokens_pool,
        "tiers": tiers,
        "history": history,
    })
}
