//! Reader threads: load records for the engine, verify them, report.
//!
//! A record is read whole, checked by [`crate::record::verify`] against the
//! block the engine expects, and handed back as a [`Payload`] (no copy). A
//! record that fails is deleted, but only if the index still holds the
//! generation that was read: the writer may have replaced it with a good
//! one meanwhile. Each reject reason is logged at warn level once, then at
//! debug; all are counted.

use super::{LoadTask, Shared, TierEvent};
use crate::record::{verify_at, Payload, Reject};

/// The thread's loop: until the queue is closed and drained.
#[cfg_attr(loom, allow(dead_code))] // loom models drive the batches themselves
pub(crate) fn run(shared: &Shared) {
    while let Some(tasks) = shared.reads.pop_batch(1, None) {
        for t in tasks {
            serve(shared, t);
        }
    }
}

/// Reads one record and reports it.
pub(crate) fn serve(shared: &Shared, t: LoadTask) {
    let result = read(shared, &t);
    (shared.sink)(TierEvent::Loaded { load: t.load, index: t.index, result });
}

fn read(shared: &Shared, t: &LoadTask) -> Result<Payload, Reject> {
    let key = crate::record::RecordKey::new(t.group, t.expected.hash);
    let Some(gen) = shared.state().index.present(&key) else { return Err(Reject::Missing) };
    let path = shared.record_path(&key);
    let result = match shared.fs.read_record(&path, shared.record_len as usize) {
        Ok(read) => verify_at(read, &shared.fp, t.group, &t.expected, shared.payload_len),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Reject::Missing),
        Err(e) => Err(Reject::Unreadable(e.to_string())),
    };
    let mut st = shared.state();
    match &result {
        Ok(p) => {
            st.index.touch(&key);
            st.counters.stats.read_blocks += 1;
            st.counters.stats.read_bytes += p.len() as u64;
        }
        Err(r) => {
            *st.counters.stats.rejected.entry(r.label()).or_default() += 1;
            let first = st.counters.logged.insert(r.label());
            // A record that is bad, or gone, leaves the index (only the
            // generation read: a fresh rewrite is kept); one that could not
            // be read for a passing reason stays.
            let gone = matches!(r, Reject::Missing) || r.is_corrupt();
            if gone && st.index.remove(&key, Some(gen)) && r.is_corrupt() {
                let _ = shared.fs.remove_file(&path);
            }
            drop(st);
            if r.is_corrupt() {
                if first {
                    tracing::warn!(file = %path.display(), reason = %r, "rejected a stored KV block (a miss: it is recomputed); further rejects of this kind are logged at debug level");
                } else {
                    tracing::debug!(file = %path.display(), reason = %r, "rejected a stored KV block");
                }
            }
        }
    }
    result
}
