//! The router's counters and their Prometheus text.
//!
//! The counters live with the rest of the routing state under its one lock
//! (`state.rs`); `/metrics` renders a [`Snapshot`] copied under it, so a
//! scrape sees one consistent moment.
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `kvserve_router_decisions_total{reason}` | counter | routing decisions by reason (`affinity`, `overlap`, `load`, `fallback`) |
//! | `kvserve_router_overlap_blocks` | histogram | leading prompt blocks the chosen replica will not recompute, per decision |
//! | `kvserve_router_route_seconds` | histogram | time the router spent choosing (planning the prompt included), per request |
//! | `kvserve_router_replica_load{replica}` | gauge | running + waiting (as reported) + in flight from this router |
//! | `kvserve_router_replica_in_flight{replica}` | gauge | requests this router has in flight to it |
//! | `kvserve_router_replica_healthy{replica}` | gauge | 1 while it answers `/health` and its snapshot matched |
//! | `kvserve_router_retries_total` | counter | requests sent again to another replica after one failed before its first byte |
//! | `kvserve_router_index_blocks` | gauge | blocks in the index |
//! | `kvserve_router_index_bytes` | gauge | memory of the index |
//! | `kvserve_router_events_total` | counter | KV events applied |
//! | `kvserve_router_resyncs_total` | counter | snapshots re-read after lost events or a replica restart |
//! | `kvserve_router_refused_replicas` | gauge | replicas refused (another model, block size or namespacing) |

use std::fmt::Write as _;

use crate::policy::Reason;

/// Bucket bounds of the overlap histogram, in blocks.
const OVERLAP_BUCKETS: [f64; 11] = [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// Bucket bounds of the routing time histogram, in seconds.
const ROUTE_BUCKETS: [f64; 10] = [0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5];

/// A Prometheus histogram with fixed buckets.
#[derive(Clone, Debug)]
pub(crate) struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); the last is `+Inf`.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: vec![0; bounds.len() + 1], sum: 0.0, count: 0 }
    }

    pub(crate) fn observe(&mut self, v: f64) {
        let at = self.bounds.iter().position(|&b| v <= b).unwrap_or(self.bounds.len());
        self.counts[at] += 1;
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c;
            match self.bounds.get(i) {
                Some(b) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

/// The router's own counters.
#[derive(Clone, Debug)]
pub(crate) struct Counters {
    /// Per [`Reason::ALL`] entry.
    pub(crate) decisions: [u64; 4],
    pub(crate) overlap: Histogram,
    pub(crate) route_seconds: Histogram,
    pub(crate) retries: u64,
    pub(crate) events: u64,
    pub(crate) resyncs: u64,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            decisions: [0; 4],
            overlap: Histogram::new(&OVERLAP_BUCKETS),
            route_seconds: Histogram::new(&ROUTE_BUCKETS),
            retries: 0,
            events: 0,
            resyncs: 0,
        }
    }
}

impl Counters {
    pub(crate) fn decided(&mut self, reason: Reason) {
        if let Some(i) = Reason::ALL.iter().position(|&r| r == reason) {
            self.decisions[i] += 1;
        }
    }
}

/// One replica's line of the snapshot.
#[derive(Clone, Debug)]
pub(crate) struct ReplicaLine {
    pub(crate) url: String,
    pub(crate) load: f64,
    pub(crate) in_flight: u64,
    pub(crate) healthy: bool,
    pub(crate) refused: bool,
}

/// Everything `/metrics` shows, copied under the lock.
#[derive(Clone, Debug)]
pub(crate) struct Snapshot {
    pub(crate) counters: Counters,
    pub(crate) replicas: Vec<ReplicaLine>,
    pub(crate) index_blocks: usize,
    pub(crate) index_bytes: usize,
}

/// A label value with `\`, `"` and newlines escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Prometheus text of `s`.
pub(crate) fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let c = &s.counters;
    out.push_str("# HELP kvserve_router_decisions_total Routing decisions by reason.\n");
    out.push_str("# TYPE kvserve_router_decisions_total counter\n");
    for (r, n) in Reason::ALL.iter().zip(c.decisions) {
        let _ = writeln!(out, "kvserve_router_decisions_total{{reason=\"{}\"}} {n}", r.name());
    }
    c.overlap.render(
        &mut out,
        "kvserve_router_overlap_blocks",
        "Leading prompt blocks the chosen replica will not recompute, per decision.",
    );
    c.route_seconds.render(
        &mut out,
        "kvserve_router_route_seconds",
        "Time the router spent choosing a replica (prompt planning included).",
    );
    let gauge = |out: &mut String, name: &str, help: &str, f: &dyn Fn(&ReplicaLine) -> String| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for r in &s.replicas {
            let _ = writeln!(out, "{name}{{replica=\"{}\"}} {}", label(&r.url), f(r));
        }
    };
    gauge(
        &mut out,
        "kvserve_router_replica_load",
        "Requests running and waiting (as reported) plus in flight from this router.",
        &|r| r.load.to_string(),
    );
    gauge(&mut out, "kvserve_router_replica_in_flight", "Requests this router has in flight to the replica.", &|r| {
        r.in_flight.to_string()
    });
    gauge(
        &mut out,
        "kvserve_router_replica_healthy",
        "1 while the replica answers /health and its KV snapshot matched.",
        &|r| u8::from(r.healthy).to_string(),
    );
    let counter = |out: &mut String, name: &str, help: &str, kind: &str, v: String| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    };
    counter(
        &mut out,
        "kvserve_router_retries_total",
        "Requests sent to another replica after one failed before its first byte.",
        "counter",
        c.retries.to_string(),
    );
    counter(&mut out, "kvserve_router_index_blocks", "Blocks in the index.", "gauge", s.index_blocks.to_string());
    counter(&mut out, "kvserve_router_index_bytes", "Memory of the index.", "gauge", s.index_bytes.to_string());
    counter(&mut out, "kvserve_router_events_total", "KV events applied.", "counter", c.events.to_string());
    counter(
        &mut out,
        "kvserve_router_resyncs_total",
        "Snapshots re-read after lost events or a replica restart.",
        "counter",
        c.resyncs.to_string(),
    );
    let refused = s.replicas.iter().filter(|r| r.refused).count();
    counter(
        &mut out,
        "kvserve_router_refused_replicas",
        "Replicas refused for another model, block size or namespacing.",
        "gauge",
        refused.to_string(),
    );
    out
}
