//! `GET /metrics`: the engine's snapshot in Prometheus' text format.
//!
//! Written by hand rather than through the `prometheus` crate: the numbers
//! already exist as one consistent [`EngineStats`] snapshot (taken under one
//! lock by the engine), and re-registering them into a second registry of
//! atomics would only add a second, unsynchronised copy. The format is the
//! documented text exposition format 0.0.4.

use std::fmt::Write;

use engine::{EngineStats, Histogram};

fn gauge(out: &mut String, name: &str, help: &str, kind: &str, value: f64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (bound, count) in h.bounds.iter().zip(&h.cumulative) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count());
    let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", h.sum, h.count());
}

/// The text exposition of one snapshot.
pub fn render(s: &EngineStats) -> String {
    let mut o = String::with_capacity(4096);
    let c = &s.cache;
    gauge(&mut o, "kvserve_queue_depth", "Requests waiting for admission.", "gauge", s.waiting as f64);
    gauge(&mut o, "kvserve_running_sequences", "Requests being prefilled or decoded.", "gauge", s.running as f64);
    gauge(&mut o, "kvserve_kv_blocks_total", "Blocks in the KV pool.", "gauge", c.total_blocks as f64);
    gauge(&mut o, "kvserve_kv_blocks_free", "Blocks on the free list.", "gauge", c.free_blocks as f64);
    gauge(&mut o, "kvserve_kv_blocks_used", "Blocks referenced by sequences.", "gauge", c.used_blocks as f64);
    gauge(
        &mut o,
        "kvserve_kv_blocks_cached",
        "Unreferenced blocks kept for prefix reuse.",
        "gauge",
        c.cached_blocks as f64,
    );
    gauge(&mut o, "kvserve_agents", "Agents known.", "gauge", s.agents as f64);
    gauge(&mut o, "kvserve_prompt_tokens_total", "Prompt tokens admitted.", "counter", s.prompt_tokens as f64);
    gauge(
        &mut o,
        "kvserve_prompt_tokens_cached_total",
        "Prompt tokens served from cached K/V.",
        "counter",
        s.cached_prompt_tokens as f64,
    );
    gauge(&mut o, "kvserve_prefix_hit_rate", "Share of prompt tokens served from cache.", "gauge", s.prefix_hit_rate());
    gauge(&mut o, "kvserve_generated_tokens_total", "Tokens generated.", "counter", s.generated_tokens as f64);
    gauge(&mut o, "kvserve_kv_evictions_total", "Cached blocks evicted.", "counter", c.evictions as f64);
    gauge(
        &mut o,
        "kvserve_preemptions_total",
        "Running requests preempted for lack of blocks.",
        "counter",
        s.preemptions as f64,
    );
    gauge(
        &mut o,
        "kvserve_agent_releases_total",
        "Agent caches released for lack of blocks.",
        "counter",
        s.agent_releases as f64,
    );
    gauge(
        &mut o,
        "kvserve_agents_forgotten_total",
        "Agents forgotten to keep a tenant within its agent limit.",
        "counter",
        s.agents_forgotten as f64,
    );
    gauge(&mut o, "kvserve_steps_total", "Model steps run.", "counter", s.steps as f64);
    gauge(
        &mut o,
        "kvserve_tokens_per_second",
        "Generated tokens per second, last 5 seconds.",
        "gauge",
        s.tokens_per_second,
    );
    let _ = writeln!(o, "# HELP kvserve_requests_finished_total Requests finished, by outcome.\n# TYPE kvserve_requests_finished_total counter");
    let f = &s.finished;
    for (label, n) in
        [("stop", f.stop), ("length", f.length), ("cancelled", f.cancelled), ("timeout", f.timeout), ("error", f.error)]
    {
        let _ = writeln!(o, "kvserve_requests_finished_total{{reason=\"{label}\"}} {n}");
    }
    histogram(&mut o, "kvserve_time_to_first_token_seconds", "Time to first token.", &s.ttft);
    histogram(&mut o, "kvserve_inter_token_latency_seconds", "Time between tokens of a request.", &s.inter_token);
    o
}
