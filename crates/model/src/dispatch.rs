//! Measured dispatch: which code runs a matmul, chosen by measured cost.
//!
//! A quantized weight can be multiplied two ways: by the quantized kernels
//! (`quant.rs`: reads 4-bit weights, best when few activation rows share
//! them, as in decode), or by a dense f32 GEMM over weights dequantized once
//! at load (candle's gemm: more memory, best when many rows amortise it, as in
//! prefill). Which wins depends on the shape, the batch and the machine, so
//! the tracker measures instead of guessing.
//!
//! Per key (output size, input size, rows rounded up to a power of two) it
//! keeps an exponentially weighted mean of nanoseconds per call for each
//! path, with single samples clipped at twice the mean once it is
//! established (a preempted thread must not flip a decision). A decision reads one snapshot under the one lock: a path with fewer
//! than [`WARMUP`] samples is tried next (so both get measured), otherwise
//! the cheaper mean wins. After every call the time is recorded. Every
//! [`REPROBE`]th decision for a key re-measures the losing path, so a change
//! in conditions (another process, thermal limits) is noticed.
//!
//! # Concurrency
//! One `Mutex` guards the whole table; it is held only to read or update a
//! few numbers, never across the matmul itself.

use std::collections::HashMap;
use std::sync::Mutex;

/// Calls a path gets before its mean is trusted.
pub const WARMUP: u32 = 3;
/// Every this many decisions, the losing path is measured again.
pub const REPROBE: u64 = 64;
/// Weight of a new sample in the running mean.
const ALPHA: f64 = 0.2;

/// The ways to run a quantized matmul.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Path {
    /// The quantized kernels.
    Quantized,
    /// Dense f32 GEMM over dequantized weights.
    DenseGemm,
}

impl Path {
    /// Both paths.
    pub const ALL: [Path; 2] = [Path::Quantized, Path::DenseGemm];

    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::Quantized => "quantized",
            Self::DenseGemm => "dense-gemm",
        }
    }
}

/// What the tracker decides for: output size, input size, rows bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShapeKey {
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// Activation rows rounded up to a power of two (at most 1024).
    pub rows: usize,
}

impl ShapeKey {
    /// The key of an `[m, k] x [k, n]` product.
    pub fn new(n: usize, k: usize, m: usize) -> Self {
        Self { n, k, rows: m.max(1).next_power_of_two().min(1024) }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Timing {
    mean_ns: f64,
    samples: u32,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Entry {
    timings: [Timing; 2],
    decisions: u64,
}

/// One row of a snapshot.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PathStats {
    /// The shape.
    pub key: ShapeKey,
    /// Mean ns per call and samples, quantized path.
    pub quantized: (f64, u32),
    /// Mean ns per call and samples, dense path.
    pub dense: (f64, u32),
    /// The path a decision would take now.
    pub choice: Path,
}

/// The measured-cost table. Cheap to share behind an `Arc`.
#[derive(Debug, Default)]
pub struct PerfTracker {
    table: Mutex<HashMap<ShapeKey, Entry>>,
}

fn idx(p: Path) -> usize {
    match p {
        Path::Quantized => 0,
        Path::DenseGemm => 1,
    }
}

fn pick(e: &Entry) -> Path {
    let [q, d] = e.timings;
    if q.samples < WARMUP {
        return Path::Quantized;
    }
    if d.samples < WARMUP {
        return Path::DenseGemm;
    }
    if q.mean_ns <= d.mean_ns {
        Path::Quantized
    } else {
        Path::DenseGemm
    }
}

impl PerfTracker {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ShapeKey, Entry>> {
        // The table holds only timings: after a panic elsewhere it is still
        // a valid (if possibly one sample short) table.
        self.table.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The path to run `key` with now (one read of one consistent entry).
    pub fn choose(&self, key: ShapeKey) -> Path {
        let mut table = self.lock();
        let e = table.entry(key).or_default();
        e.decisions += 1;
        let best = pick(e);
        if e.decisions.is_multiple_of(REPROBE) && e.timings.iter().all(|t| t.samples >= WARMUP) {
            // Re-measure the loser now and then.
            return if best == Path::Quantized { Path::DenseGemm } else { Path::Quantized };
        }
        best
    }

    /// Records how long a call took.
    pub fn record(&self, key: ShapeKey, path: Path, ns: u64) {
        let mut table = self.lock();
        let t = &mut table.entry(key).or_default().timings[idx(path)];
        let ns = ns as f64;
        t.mean_ns = match t.samples {
            0 => ns,
            // An outlier (a preempted thread, a page fault) moves the mean
            // at most as far as a sample of twice the mean would.
            s if s >= WARMUP => t.mean_ns + ALPHA * (ns.min(2.0 * t.mean_ns) - t.mean_ns),
            _ => t.mean_ns + ALPHA * (ns - t.mean_ns),
        };
        t.samples = t.samples.saturating_add(1);
    }

    /// Every key's timings and current choice, read under one lock.
    pub fn snapshot(&self) -> Vec<PathStats> {
        let table = self.lock();
        let mut rows: Vec<PathStats> = table
            .iter()
            .map(|(k, e)| PathStats {
                key: *k,
                quantized: (e.timings[0].mean_ns, e.timings[0].samples),
                dense: (e.timings[1].mean_ns, e.timings[1].samples),
                choice: pick(e),
            })
            .collect();
        rows.sort_by_key(|r| r.key);
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_paths_are_measured_then_the_cheaper_wins_and_the_loser_is_reprobed() {
        let t = PerfTracker::new();
        let key = ShapeKey::new(576, 576, 3);
        assert_eq!(key.rows, 4);
        let mut seen = Vec::new();
        for _ in 0..2 * WARMUP {
            let p = t.choose(key);
            seen.push(p);
            t.record(key, p, if p == Path::Quantized { 1000 } else { 5000 });
        }
        assert_eq!(seen.iter().filter(|p| **p == Path::Quantized).count(), WARMUP as usize);
        assert_eq!(t.choose(key), Path::Quantized);
        let mut reprobes = 0;
        for _ in 0..REPROBE * 2 {
            let p = t.choose(key);
            reprobes += usize::from(p == Path::DenseGemm);
            t.record(key, p, if p == Path::Quantized { 1000 } else { 5000 });
        }
        assert_eq!(reprobes, 2);
        // Conditions change: the dense path becomes cheaper and takes over.
        for _ in 0..40 {
            t.record(key, Path::Quantized, 9000);
        }
        assert_eq!(t.choose(key), Path::DenseGemm);
        let snap = t.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].choice, Path::DenseGemm);
    }

    #[test]
    fn concurrent_decisions_and_records_stay_consistent() {
        let t = std::sync::Arc::new(PerfTracker::new());
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for j in 0..500 {
                        let key = ShapeKey::new(64 * (1 + i % 3), 64, j % 7 + 1);
                        let p = t.choose(key);
                        t.record(key, p, 100 + (j as u64 % 13));
                    }
                })
            })
            .collect();
        for h in threads {
            h.join().unwrap();
        }
        let total: u32 = t.snapshot().iter().map(|r| r.quantized.1 + r.dense.1).sum();
        assert_eq!(total, 16 * 500);
    }
}
