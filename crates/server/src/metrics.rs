//! `GET /metrics`: the engine's snapshot in Prometheus' text format.
//!
//! Written by hand rather than through the `prometheus` crate: the numbers
//! already exist as one consistent [`EngineStats`] snapshot (taken under one
//! lock by the engine), and re-registering them into a second registry of
//! atomics would only add a second, unsynchronised copy. The format is the
//! documented text exposition format 0.0.4.

use std::fmt::Write;

use engine::{EngineStats, Histogram, TIER_LATENCY_BUCKETS};

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
    if let Some((pages, held)) = s.sliding_pages {
        let help = "Sliding-window pages of a hybrid model (its sliding layers' K/V).";
        gauge(&mut o, "kvserve_kv_sliding_pages_total", help, "gauge", pages as f64);
        let help = "Sliding-window pages holding a block's K/V (live windows and reclaimable cache).";
        gauge(&mut o, "kvserve_kv_sliding_pages_held", help, "gauge", held as f64);
    }
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
    gauge(
        &mut o,
        "kvserve_speculative_drafted_tokens_total",
        "Tokens drafted for speculative decoding.",
        "counter",
        s.drafted_tokens as f64,
    );
    gauge(
        &mut o,
        "kvserve_speculative_accepted_tokens_total",
        "Drafted tokens the model agreed with (generated without a step of their own).",
        "counter",
        s.accepted_tokens as f64,
    );
    gauge(
        &mut o,
        "kvserve_speculative_verifications_total",
        "Decode entries that verified drafted tokens (one per sequence and step).",
        "counter",
        s.draft_verifications as f64,
    );
    let (drafted, accepted, checks) = (s.drafted_tokens as f64, s.accepted_tokens as f64, s.draft_verifications as f64);
    gauge(
        &mut o,
        "kvserve_speculative_acceptance_rate",
        "Share of drafted tokens the model agreed with, since start (0 before any draft).",
        "gauge",
        if drafted > 0.0 { accepted / drafted } else { 0.0 },
    );
    gauge(
        &mut o,
        "kvserve_speculative_tokens_per_step",
        "Tokens a sequence generated per step that verified drafts (1 plus the accepted ones), since start.",
        "gauge",
        if checks > 0.0 { (checks + accepted) / checks } else { 0.0 },
    );
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
    tiers(&mut o, s);
    o
}

fn labelled(out: &mut String, name: &str, help: &str, kind: &str, label: &str, values: &[(&str, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (l, v) in values {
        let _ = writeln!(out, "{name}{{{label}=\"{l}\"}} {v}");
    }
}

/// The tiers below the pool: blocks and bytes per tier, hits per tier,
/// movements between tiers, loads, durability.
fn tiers(o: &mut String, s: &EngineStats) {
    let t = &s.tiers;
    let c = &t.counters;
    let d = t.disk.clone().unwrap_or_default();
    let pool_blocks = (s.cache.used_blocks + s.cache.cached_blocks) as f64;
    let per = |f: &dyn Fn(&engine::TierSnapshot) -> f64| -> Vec<(&str, f64)> {
        t.tiers.iter().map(|x| (x.name, f(x))).collect()
    };
    let mut blocks = vec![("pool", pool_blocks)];
    blocks.extend(per(&|x| x.blocks as f64));
    labelled(o, "kvserve_tier_blocks", "Blocks held per tier (pool: used and cached).", "gauge", "tier", &blocks);
    labelled(
        o,
        "kvserve_tier_bytes",
        "Bytes held per tier below the pool.",
        "gauge",
        "tier",
        &per(&|x| x.bytes as f64),
    );
    labelled(
        o,
        "kvserve_tier_budget_bytes",
        "Byte budget per tier below the pool (0: none of its own).",
        "gauge",
        "tier",
        &per(&|x| x.budget as f64),
    );
    labelled(
        o,
        "kvserve_tier_degraded",
        "1 while a tier cannot serve fully (serving continues without it).",
        "gauge",
        "tier",
        &per(&|x| f64::from(u8::from(x.degraded.is_some()))),
    );
    let mut hits = vec![("pool", c.hit_tokens_pool as f64)];
    hits.extend(c.tiers.iter().map(|m| (m.name, m.hit_tokens as f64)));
    labelled(
        o,
        "kvserve_tier_hit_tokens_total",
        "Prompt tokens served from cached K/V, by the tier that held them.",
        "counter",
        "tier",
        &hits,
    );
    let moves: Vec<(String, f64)> = c
        .tiers
        .iter()
        .flat_map(|m| [(format!("to_{}", m.name), m.stored as f64), (format!("{}_to_pool", m.name), m.to_pool as f64)])
        .collect();
    let moves: Vec<(&str, f64)> = moves.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    labelled(o, "kvserve_tier_moves_total", "Blocks moved between tiers.", "counter", "move", &moves);
    gauge(
        o,
        "kvserve_tier_dropped_blocks_total",
        "Blocks that left the pool or RAM and were kept nowhere (write queue full, disk failing).",
        "counter",
        (c.dropped + d.dropped_writes) as f64,
    );
    gauge(
        o,
        "kvserve_tier_disk_written_bytes_total",
        "Bytes of block records written.",
        "counter",
        d.written_bytes as f64,
    );
    gauge(o, "kvserve_tier_disk_read_bytes_total", "Bytes of block records read back.", "counter", d.read_bytes as f64);
    gauge(
        o,
        "kvserve_tier_disk_evictions_total",
        "Records evicted from disk for its budget.",
        "counter",
        d.evictions as f64,
    );
    let mut rejected: Vec<(&str, f64)> = d.rejected.iter().map(|(k, v)| (*k, *v as f64)).collect();
    if rejected.is_empty() {
        rejected.push(("payload_checksum", 0.0));
    }
    labelled(
        o,
        "kvserve_tier_rejected_total",
        "Stored records rejected when read (checksum, header, fingerprint, namespace or tokens); each was deleted and recomputed.",
        "counter",
        "reason",
        &rejected,
    );
    gauge(
        o,
        "kvserve_tier_load_timeouts_total",
        "Tier loads that ran past their deadline.",
        "counter",
        c.load_timeouts as f64,
    );
    gauge(
        o,
        "kvserve_tier_loads_skipped_total",
        "Tier hits recomputed because that was estimated faster.",
        "counter",
        c.loads_skipped as f64,
    );
    histogram(
        o,
        "kvserve_tier_load_seconds",
        "Time to load blocks from queued tiers (disk, remote) into the pool.",
        &c.load_latency,
    );
    labelled(
        o,
        "kvserve_tier_engine_seconds_total",
        "Engine-thread time spent on the tiers: exporting evicted blocks, importing from RAM, preparing agent commits.",
        "counter",
        "work",
        &[("stash", c.stash_seconds), ("promote", c.promote_seconds), ("commit", c.commit_seconds)],
    );
    gauge(o, "kvserve_agent_commits_total", "Agent turns committed durably to disk.", "counter", d.commits as f64);
    gauge(
        o,
        "kvserve_agent_commits_failed_total",
        "Agent commits that failed (disk failing).",
        "counter",
        d.failed_commits as f64,
    );
    gauge(
        o,
        "kvserve_agent_commits_deferred_total",
        "Agent commits deferred because the write queue was full.",
        "counter",
        c.commits_deferred as f64,
    );
    let lag = Histogram {
        bounds: &TIER_LATENCY_BUCKETS,
        cumulative: d.durability_lag.cumulative.clone(),
        sum: d.durability_lag.sum,
    };
    if lag.cumulative.len() == TIER_LATENCY_BUCKETS.len() + 1 {
        histogram(o, "kvserve_durability_lag_seconds", "Time from a turn's end to its manifest being durable.", &lag);
    }
    gauge(
        o,
        "kvserve_agents_restored_total",
        "Agents restored from disk at start.",
        "counter",
        c.agents_restored as f64,
    );
    gauge(
        o,
        "kvserve_tier_disk_io_errors_total",
        "Disk tier write, sync or delete errors.",
        "counter",
        d.io_errors as f64,
    );
    gauge(
        o,
        "kvserve_tier_disk_degraded",
        "1 while the disk tier cannot write (serving continues without it).",
        "gauge",
        f64::from(u8::from(d.degraded.is_some())),
    );
    gauge(o, "kvserve_tier_disk_queued_bytes", "Bytes waiting to be written to disk.", "gauge", d.queued_bytes as f64);
    gauge(
        o,
        "kvserve_agents_resumed_total",
        "Agents this replica did not know, resumed from a manifest another replica wrote to the remote tier.",
        "counter",
        c.agents_resumed as f64,
    );
    if let Some(r) = t.tiers.iter().find_map(|x| x.remote.as_ref()) {
        remote(o, r);
    }
}

/// The remote tier's own counters (present with `--remote-cache`).
fn remote(o: &mut String, r: &engine::RemoteStats) {
    let counters: [(&str, &str, u64); 12] = [
        ("written_blocks", "Blocks written to the remote store.", r.written_blocks),
        ("written_bytes", "Bytes of block records written to the remote store.", r.written_bytes),
        ("existing_blocks", "Blocks another replica had written already (SET NX kept the first).", r.existing),
        ("read_blocks", "Blocks read back from the remote store and verified.", r.read_blocks),
        ("read_bytes", "Bytes of block records read back from the remote store.", r.read_bytes),
        ("misses", "Blocks asked of the remote store that it did not hold.", r.misses),
        (
            "negative_cache_hits",
            "Lookups answered by the recent-miss cache, without a round trip.",
            r.negative_cache_hits,
        ),
        ("commits", "Agent turns committed to the remote store.", r.commits),
        ("stale_manifests", "Manifest writes refused because the store held a newer turn.", r.stale_manifests),
        ("errors", "Failed or timed-out calls to the remote store.", r.errors),
        ("reconnects", "Connections to the remote store made again.", r.reconnects),
        ("dropped_writes", "Writes not made: queue full or store unavailable.", r.dropped_writes),
    ];
    for (name, help, v) in counters {
        gauge(o, &format!("kvserve_tier_remote_{name}_total"), help, "counter", v as f64);
    }
    let mut rejected: Vec<(&str, f64)> = r.rejected.iter().map(|(k, v)| (*k, *v as f64)).collect();
    if rejected.is_empty() {
        rejected.push(("payload_checksum", 0.0));
    }
    labelled(
        o,
        "kvserve_tier_remote_rejected_total",
        "Remote values rejected when read (checksum, header, fingerprint, namespace or tokens); each was deleted and recomputed.",
        "counter",
        "reason",
        &rejected,
    );
    gauge(
        o,
        "kvserve_tier_remote_queued_bytes",
        "Bytes waiting to be written to the remote store.",
        "gauge",
        r.queued_bytes as f64,
    );
    gauge(
        o,
        "kvserve_tier_remote_connected",
        "1 while the remote store answers.",
        "gauge",
        f64::from(u8::from(r.connected)),
    );
    let fetch = Histogram {
        bounds: &TIER_LATENCY_BUCKETS,
        cumulative: r.fetch_latency.cumulative.clone(),
        sum: r.fetch_latency.sum,
    };
    if fetch.cumulative.len() == TIER_LATENCY_BUCKETS.len() + 1 {
        histogram(
            o,
            "kvserve_tier_remote_fetch_seconds",
            "Time of one pipelined read round trip to the remote store.",
            &fetch,
        );
    }
}
