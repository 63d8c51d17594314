//! Reader threads: fetch a load's chain, verify every block, report each.
//!
//! A job is one load's tasks in index order, or an agent's manifest (read
//! as [`super::RemoteTier::manifest`] does, answered as a
//! [`TierEvent::Agent`], `None` for a miss or a failure). The reader first cuts the
//! chain at the first key in the negative cache (a recent miss: no need to
//! ask), then fetches the rest [`READ_CHUNK`] blocks per pipelined round
//! trip of `GETEX key PX <ttl>`. Each value is checked by
//! [`record::verify`] against the block the engine expects, without the
//! lock. The chain stops at the first block that is not a verified hit:
//!
//! | reply | that task gets | and |
//! |---|---|---|
//! | a value that verifies | `Ok(payload)` | the key is known (a commit need not resend it) |
//! | nil | `Err(Missing)` | the key enters the negative cache |
//! | a value that fails | `Err(reject)` | counted by reason, deleted (logged at warn once per reason) |
//! | a server error (wrong type, …) | `Err(Unreadable)` | counted as an error |
//! | no reply (connection lost, timeout) | `Err(Unreadable)`, as every task left | the connection is dropped (see the `conn` module) and the tier degraded |
//!
//! The tasks after the stop get `Err(Missing)` without being fetched. Each
//! chunk's results are counted under one lock, then reported (the sink is
//! called without it), so the engine sees early blocks while later ones
//! are still on the wire.

use std::time::Instant;

use redis::Value;

use super::conn::Conn;
use super::{read_manifest, ReadJob, Shared, READ_CHUNK};
use crate::record::{self, Payload, RecordKey, Reject};
use crate::tier::{LoadTask, TierEvent};

/// The thread's loop: until the queue is closed and drained.
pub(super) fn run(shared: &Shared) {
    let mut conn = Conn::new();
    while let Some(jobs) = shared.reads.pop_batch(1, None) {
        for job in jobs {
            match job {
                ReadJob::Chain(chain) => serve(shared, &mut conn, &chain),
                ReadJob::Agent(agent) => {
                    let manifest = read_manifest(shared, &agent).ok().flatten().map(Box::new);
                    (shared.sink)(TierEvent::Agent { agent, manifest });
                }
            }
        }
    }
}

fn key_of(t: &LoadTask) -> RecordKey {
    RecordKey::new(t.group, t.expected.hash)
}

/// Reports `results` for `tasks`, in order.
fn report(shared: &Shared, tasks: &[LoadTask], results: impl IntoIterator<Item = Result<Payload, Reject>>) {
    for (t, result) in tasks.iter().zip(results) {
        (shared.sink)(TierEvent::Loaded { load: t.load, index: t.index, result });
    }
}

fn all(tasks: &[LoadTask], r: &Reject) -> Vec<Result<Payload, Reject>> {
    tasks.iter().map(|_| Err(r.clone())).collect()
}

/// Reads one chain and reports every task of it.
fn serve(shared: &Shared, conn: &mut Conn, chain: &[LoadTask]) {
    let (blocked, cut) = {
        let mut s = shared.state();
        let now = Instant::now();
        let blocked = if s.stopping.is_some() {
            Some("the remote tier is shutting down".to_string())
        } else {
            s.stats.degraded.as_ref().map(|r| format!("the remote store is unavailable: {r}"))
        };
        let cut = chain.iter().position(|t| s.negative.contains(&key_of(t), now));
        if blocked.is_none() && cut.is_some() {
            s.stats.negative_cache_hits += 1;
        }
        (blocked, cut)
    };
    if let Some(reason) = blocked {
        report(shared, chain, all(chain, &Reject::Unreadable(reason)));
        return;
    }
    let fetch = cut.unwrap_or(chain.len());
    let mut at = 0;
    while at < fetch {
        let end = (at + READ_CHUNK).min(fetch);
        match fetch_chunk(shared, conn, &chain[at..end]) {
            Ok((results, go_on)) => {
                report(shared, &chain[at..end], results);
                at = end;
                if !go_on {
                    break;
                }
            }
            Err(reason) => {
                report(shared, &chain[at..], all(&chain[at..], &Reject::Unreadable(reason)));
                return;
            }
        }
    }
    report(shared, &chain[at..], all(&chain[at..], &Reject::Missing));
}

/// Fetches, verifies and counts one chunk; returns its results and whether
/// the chain goes on after it.
///
/// # Errors
/// The call failed (the connection is dropped and the tier degraded).
fn fetch_chunk(
    shared: &Shared,
    conn: &mut Conn,
    part: &[LoadTask],
) -> Result<(Vec<Result<Payload, Reject>>, bool), String> {
    let keys: Vec<String> = part.iter().map(|t| shared.block_key(&key_of(t))).collect();
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for k in &keys {
        pipe.cmd("GETEX").arg(k).arg("PX").arg(shared.ttl_ms());
    }
    let started = Instant::now();
    let values = match conn.call(shared, false, |con| pipe.query::<Vec<Value>>(con)) {
        Ok(v) if v.len() == part.len() => v,
        Ok(v) => return Err(fail(shared, format!("{} replies to {} reads", v.len(), part.len()))),
        Err(reason) => return Err(fail(shared, reason)),
    };
    let elapsed = started.elapsed();

    // Verify without the lock (a checksum over each payload).
    let mut results = Vec::with_capacity(part.len());
    let mut stop = None;
    for (i, (t, v)) in part.iter().zip(values).enumerate() {
        if stop.is_some() {
            results.push(Err(Reject::Missing));
            continue;
        }
        let r = match v {
            Value::Nil => Err(Reject::Missing),
            Value::BulkString(buf) => record::verify(buf, &shared.fp, t.group, &t.expected, shared.payload_len),
            Value::ServerError(e) => Err(Reject::Unreadable(format!("the store answered {}", e.code()))),
            _ => Err(Reject::Unreadable("an unexpected reply to GETEX".into())),
        };
        if r.is_err() {
            stop = Some(i);
        }
        results.push(r);
    }

    let mut warn = None;
    {
        let mut s = shared.state();
        let now = Instant::now();
        s.stats.fetch_latency.observe(elapsed);
        let counted = stop.map_or(part.len(), |i| i + 1);
        for (t, r) in part.iter().zip(&results).take(counted) {
            let k = key_of(t);
            match r {
                Ok(p) => {
                    s.stats.read_blocks += 1;
                    s.stats.read_bytes += p.len() as u64;
                    s.known.insert(k, now);
                }
                Err(Reject::Missing) => {
                    s.stats.misses += 1;
                    s.negative.insert(k, now);
                    s.known.remove(&k);
                }
                Err(Reject::Unreadable(_)) => s.stats.errors += 1,
                Err(r) => {
                    let first = Shared::count_reject(&mut s, r);
                    s.known.remove(&k);
                    warn = Some((first, r.clone()));
                }
            }
        }
    }
    if let (Some(i), Some((first, r))) = (stop, warn) {
        let key = &keys[i];
        if first {
            tracing::warn!(%key, reason = %r, "rejected a KV block from the remote store (a miss: it is recomputed); further rejects of this kind are logged at debug level");
        } else {
            tracing::debug!(%key, reason = %r, "rejected a KV block from the remote store");
        }
        // A bad value is deleted so that it is written again. (Between the
        // read and this, no replica can have replaced it: SET NX does not
        // overwrite. It can only have expired.)
        let deleted = conn.call(shared, false, |con| redis::cmd("DEL").arg(key).query::<Value>(con));
        if let Err(e) = deleted {
            shared.state().stats.errors += 1;
            tracing::debug!(%key, error = %e, "could not delete a rejected block");
        }
    }
    Ok((results, stop.is_none()))
}

/// A call failed: degrades the tier; returns the reason for the tasks.
fn fail(shared: &Shared, reason: String) -> String {
    shared.degrade(&reason);
    reason
}
