//! The writer thread: blocks and manifests to the store, in batches,
//! pipelined.
//!
//! For one batch (everything queued when it wakes, up to [`MAX_BATCH`]
//! jobs):
//!
//! 1. deletions that failed earlier are sent again (in queue order they
//!    come before anything of this batch);
//! 2. every block of the batch, demotions and commits' blocks alike, as
//!    `SET key record NX PX <ttl>`, pipelined in round trips of at most
//!    [`PIPE_CMDS`] commands and [`PIPE_BYTES`] bytes. `OK`: written; nil:
//!    the store had it (another replica, or an earlier write), which is as
//!    good;
//! 3. in queue order, each commit's manifest (the `PUT_MANIFEST` script,
//!    only if every block of that commit was stored: data first, manifest
//!    last) and each deletion (`DEL` of the manifest), in one round trip.
//!
//! A call that fails (connection lost, timeout) drops the connection and
//! degrades the tier; what the batch had not done yet is dropped and
//! counted: blocks leave the known set (so they are offered again), commits
//! are reported as [`TierEvent::CommitFailed`] with `retry` (the engine
//! commits again once the tier resumes), deletions hear `Err` and are kept
//! to be sent again when the store answers. While the tier is degraded, or
//! once a drop's drain time has passed, jobs are dropped the same way
//! without a call. A server error on one command (out of memory, wrong
//! type) fails that command only; its commit is reported without `retry`.
//!
//! Events and `done` callbacks are delivered after the batch, never under
//! the tier's lock.

use std::time::Instant;

use kv::BlockKey;
use redis::Value;

use super::conn::{Conn, RecordArg};
use super::{Shared, WriteJob};
use crate::manifest::{AgentManifest, ManifestId};
use crate::record::{encode_header, GroupId, RecordKey};
use crate::tier::{Done, TierEvent};

/// Jobs taken per batch at most.
pub(super) const MAX_BATCH: usize = 256;
/// Commands per pipelined round trip of block writes, at most.
pub(super) const PIPE_CMDS: usize = 64;
/// Bytes of values per round trip of block writes, at most (one larger
/// value still goes alone).
pub(super) const PIPE_BYTES: usize = 4 << 20;

/// One block to store.
struct BlockWrite {
    group: GroupId,
    key: BlockKey,
    payload: Vec<u8>,
    /// The commit it belongs to, if any (index into the batch's commits).
    commit: Option<usize>,
}

/// A commit of the batch.
struct Pending {
    manifest: AgentManifest,
    /// Every block it carried was stored (or found present).
    blocks_ok: bool,
}

/// Step 3's work, in queue order.
enum Tail {
    Manifest(usize),
    Delete { id: ManifestId, done: Done },
}

/// What a batch owes the engine, delivered without the lock.
#[derive(Default)]
struct Replies {
    events: Vec<TierEvent>,
    dones: Vec<(Done, Result<(), String>)>,
}

impl Replies {
    fn deliver(self, shared: &Shared) {
        for ev in self.events {
            (shared.sink)(ev);
        }
        for (done, result) in self.dones {
            done(result);
        }
    }
}

struct Writer<'a> {
    shared: &'a Shared,
    conn: Conn,
    /// Deletions that failed: sent again when the store answers.
    failed_deletes: Vec<ManifestId>,
}

/// The thread's loop: until the queue is closed and drained.
pub(super) fn run(shared: &Shared) {
    let mut w = Writer { shared, conn: Conn::new(), failed_deletes: Vec::new() };
    loop {
        // With deletions to send again, wake up now and then even if idle.
        let timeout = (!w.failed_deletes.is_empty()).then_some(shared.limits.ping);
        let Some(jobs) = shared.writes.pop_batch(MAX_BATCH, timeout) else { break };
        let last = jobs.iter().map(|(n, _)| *n).max();
        w.batch(jobs.into_iter().map(|(_, j)| j).collect());
        if let Some(n) = last {
            shared.finished(n);
        }
    }
}

impl Writer<'_> {
    /// Why no call should be made now, if so.
    fn blocked(&self) -> Option<String> {
        let s = self.shared.state();
        if s.stopping.is_some_and(|deadline| Instant::now() >= deadline) {
            return Some("the remote tier was dropped before this write".into());
        }
        s.stats.degraded.as_ref().map(|r| format!("the remote store is unavailable: {r}"))
    }

    /// A call failed: degrades the tier; returns the reason.
    fn fail(&self, reason: String) -> String {
        self.shared.degrade(&reason);
        reason
    }

    /// Runs one batch; see the module doc.
    fn batch(&mut self, jobs: Vec<WriteJob>) {
        let mut writes = Vec::new();
        let mut commits = Vec::new();
        let mut tail = Vec::new();
        for job in jobs {
            match job {
                WriteJob::Block { group, key, payload } => {
                    writes.push(BlockWrite { group, key, payload, commit: None });
                }
                WriteJob::Commit(c) => {
                    let i = commits.len();
                    let super::Commit { manifest, blocks } = *c;
                    writes.extend(blocks.into_iter().map(|(group, key, payload)| BlockWrite {
                        group,
                        key,
                        payload,
                        commit: Some(i),
                    }));
                    commits.push(Pending { manifest, blocks_ok: true });
                    tail.push(Tail::Manifest(i));
                }
                WriteJob::Delete { id, done } => tail.push(Tail::Delete { id, done }),
                WriteJob::Barrier => {}
            }
        }
        let mut replies = Replies::default();
        let failed = match self.blocked() {
            Some(reason) => Some((0, reason)),
            None => match self.retry_deletes() {
                Err(reason) => Some((0, reason)),
                Ok(()) => self.write_blocks(&writes, &mut commits).err(),
            },
        };
        match failed {
            None => self.write_tail(tail, &commits, &mut replies),
            Some((from, reason)) => self.drop_rest(&writes[from..], &commits, tail, &reason, &mut replies),
        }
        replies.deliver(self.shared);
    }

    /// Step 1.
    fn retry_deletes(&mut self) -> Result<(), String> {
        if self.failed_deletes.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for id in &self.failed_deletes {
            pipe.cmd("DEL").arg(self.shared.manifest_key(id));
        }
        let values = match self.conn.call(self.shared, false, |con| pipe.query::<Vec<Value>>(con)) {
            Ok(v) if v.len() == self.failed_deletes.len() => v,
            Ok(_) => return Err(self.fail("a short reply to DEL".into())),
            Err(reason) => return Err(self.fail(reason)),
        };
        let mut s = self.shared.state();
        let ids = std::mem::take(&mut self.failed_deletes);
        for (id, v) in ids.into_iter().zip(values) {
            if matches!(v, Value::Int(_)) {
                s.durable.remove(&id);
            } else {
                s.stats.errors += 1;
                self.failed_deletes.push(id);
            }
        }
        Ok(())
    }

    /// Step 2.
    ///
    /// # Errors
    /// The index of the first write not done, and why.
    fn write_blocks(&mut self, writes: &[BlockWrite], commits: &mut [Pending]) -> Result<(), (usize, String)> {
        let shared = self.shared;
        let mut at = 0;
        while at < writes.len() {
            if let Some(reason) = self.blocked().filter(|_| at > 0) {
                return Err((at, reason));
            }
            let mut end = at;
            let mut bytes = 0;
            while end < writes.len()
                && end - at < PIPE_CMDS
                && (end == at || bytes + writes[end].payload.len() <= PIPE_BYTES)
            {
                bytes += writes[end].payload.len();
                end += 1;
            }
            let part = &writes[at..end];
            let headers: Vec<Vec<u8>> =
                part.iter().map(|w| encode_header(&shared.fp, w.group, &w.key, &w.payload)).collect();
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for (w, header) in part.iter().zip(&headers) {
                pipe.cmd("SET")
                    .arg(shared.block_key(&RecordKey::new(w.group, w.key.hash)))
                    .arg(RecordArg { header, payload: &w.payload })
                    .arg("NX")
                    .arg("PX")
                    .arg(shared.ttl_ms());
            }
            let values = match self.conn.call(shared, false, |con| pipe.query::<Vec<Value>>(con)) {
                Ok(v) if v.len() == part.len() => v,
                Ok(_) => return Err((at, self.fail("a short reply to SET".into()))),
                Err(reason) => return Err((at, self.fail(reason))),
            };
            let mut refused = None;
            {
                let mut s = shared.state();
                let now = Instant::now();
                for ((w, header), v) in part.iter().zip(&headers).zip(values) {
                    let k = RecordKey::new(w.group, w.key.hash);
                    match v {
                        Value::Okay | Value::SimpleString(_) => {
                            s.stats.written_blocks += 1;
                            s.stats.written_bytes += (header.len() + w.payload.len()) as u64;
                        }
                        Value::Nil => s.stats.existing += 1,
                        other => {
                            s.stats.errors += 1;
                            s.stats.dropped_writes += 1;
                            s.known.remove(&k);
                            if let Some(c) = w.commit {
                                commits[c].blocks_ok = false;
                            }
                            refused.get_or_insert(other);
                            continue;
                        }
                    }
                    s.known.insert(k, now);
                    s.negative.remove(&k);
                }
            }
            if let Some(v) = refused {
                tracing::warn!(url = %shared.url, reply = ?v, "the remote store refused a KV block");
            }
            at = end;
        }
        Ok(())
    }

    /// Step 3.
    fn write_tail(&mut self, tail: Vec<Tail>, commits: &[Pending], replies: &mut Replies) {
        let shared = self.shared;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut sent = Vec::new();
        for t in tail {
            match t {
                Tail::Manifest(i) if !commits[i].blocks_ok => {
                    shared.state().stats.dropped_writes += 1;
                    replies.events.push(TierEvent::CommitFailed { agent: commits[i].manifest.id(), retry: false });
                }
                Tail::Manifest(i) => {
                    let m = &commits[i].manifest;
                    let id = m.id();
                    self.failed_deletes.retain(|d| *d != id);
                    pipe.cmd("EVALSHA")
                        .arg(shared.scripts.put_manifest.get_hash())
                        .arg(1)
                        .arg(shared.manifest_key(&id))
                        .arg(m.turns.to_string())
                        .arg(m.encode(&shared.fp))
                        .arg(shared.ttl_ms());
                    sent.push(Tail::Manifest(i));
                }
                Tail::Delete { id, done } => {
                    self.failed_deletes.retain(|d| *d != id);
                    pipe.cmd("DEL").arg(shared.manifest_key(&id));
                    sent.push(Tail::Delete { id, done });
                }
            }
        }
        if sent.is_empty() {
            return;
        }
        let values = match self.conn.call(shared, true, |con| pipe.query::<Vec<Value>>(con)) {
            Ok(v) if v.len() == sent.len() => v,
            Ok(_) => {
                let reason = self.fail("a short reply to a manifest write".into());
                return self.drop_rest(&[], commits, sent, &reason, replies);
            }
            Err(reason) => {
                let reason = self.fail(reason);
                return self.drop_rest(&[], commits, sent, &reason, replies);
            }
        };
        let mut noscript = false;
        let mut refused = None;
        {
            let mut s = shared.state();
            for (t, v) in sent.into_iter().zip(values) {
                match (t, v) {
                    (Tail::Manifest(i), Value::Int(written)) => {
                        let m = &commits[i].manifest;
                        if written == 1 {
                            s.stats.commits += 1;
                            let turns = s.durable.entry(m.id()).or_default();
                            *turns = (*turns).max(m.turns);
                        } else {
                            s.stats.stale_manifests += 1;
                        }
                    }
                    (Tail::Manifest(i), v) => {
                        s.stats.errors += 1;
                        s.stats.dropped_writes += 1;
                        let missing_script = matches!(&v, Value::ServerError(e) if e.code() == "NOSCRIPT");
                        noscript |= missing_script;
                        refused.get_or_insert(v);
                        let agent = commits[i].manifest.id();
                        replies.events.push(TierEvent::CommitFailed { agent, retry: missing_script });
                    }
                    (Tail::Delete { id, done }, Value::Int(_)) => {
                        s.durable.remove(&id);
                        replies.dones.push((done, Ok(())));
                    }
                    (Tail::Delete { id, done }, v) => {
                        s.stats.errors += 1;
                        self.failed_deletes.push(id);
                        replies.dones.push((done, Err(format!("the remote store refused the deletion: {v:?}"))));
                        refused.get_or_insert(v);
                    }
                }
            }
        }
        if noscript {
            self.conn.forget_scripts();
        }
        if let Some(v) = refused {
            tracing::warn!(url = %shared.url, reply = ?v, "the remote store refused an agent manifest write");
        }
    }

    /// Drops what a batch had not done: `writes` left, the commits and
    /// deletions of `tail`.
    fn drop_rest(
        &mut self,
        writes: &[BlockWrite],
        commits: &[Pending],
        tail: Vec<Tail>,
        reason: &str,
        replies: &mut Replies,
    ) {
        let mut s = self.shared.state();
        for w in writes {
            s.known.remove(&RecordKey::new(w.group, w.key.hash));
            s.stats.dropped_writes += 1;
        }
        for t in tail {
            match t {
                Tail::Manifest(i) => {
                    s.stats.dropped_writes += 1;
                    replies.events.push(TierEvent::CommitFailed { agent: commits[i].manifest.id(), retry: true });
                }
                Tail::Delete { id, done } => {
                    if !self.failed_deletes.contains(&id) {
                        self.failed_deletes.push(id);
                    }
                    replies.dones.push((done, Err(reason.to_string())));
                }
            }
        }
    }
}
