//! The writer thread: records and manifests, in batches, durably.
//!
//! For one batch of jobs (everything queued when it wakes, up to
//! [`MAX_BATCH`]):
//!
//! 1. each new record is written to a temporary name, then renamed into
//!    place under the tier's lock (and indexed): readable at once, durable
//!    at step 3;
//! 2. each committed agent's manifest is written to a temporary name;
//! 3. one `sync_batch` makes the records, their names and the manifests'
//!    bytes durable (one device flush for the batch);
//! 4. the manifests are renamed into place (under the lock, their
//!    references indexed) and `agents/` is synced: the commit point;
//! 5. deletions (in queue order with the rest) unlink manifests and
//!    orphaned records, and `agents/` is synced before their callers hear
//!    back; records past the budget are evicted, and told to the engine
//!    as a [`TierEvent::Evicted`] (with their blocks when asked).
//!
//! A failed write, sync or rename marks the tier degraded: later writes of
//! the batch are skipped (counted), temporary files are removed, failed
//! commits are reported to the engine, and every `retry` the writer
//! recreates the directories, re-takes the lock if the directory vanished,
//! and probes with a small write; when that works it resumes.

use std::io;
use std::path::PathBuf;
use std::time::Instant;

use kv::BlockKey;

use super::{Shared, TierEvent, WriteJob};
use crate::manifest::{AgentManifest, ManifestId};
use crate::record::{self, encode_header, GroupId, RecordKey};
use crate::tier::Overflow;

/// Jobs taken per batch at most.
pub(crate) const MAX_BATCH: usize = 256;

/// A manifest written to a temporary name, waiting for the batch's sync.
struct Staged {
    id: ManifestId,
    tmp: PathBuf,
    manifest: AgentManifest,
    ended: Instant,
}

struct Writer<'a> {
    shared: &'a Shared,
    retry_at: Option<Instant>,
    /// Deletions that failed: redone when the tier resumes.
    failed_deletes: Vec<ManifestId>,
}

/// The thread's loop: until the queue is closed and drained.
#[cfg_attr(loom, allow(dead_code))] // loom models drive the batches themselves
pub(crate) fn run(shared: &Shared) {
    let mut w = Writer { shared, retry_at: None, failed_deletes: Vec::new() };
    loop {
        let timeout = w.retry_at.map(|_| shared.retry);
        let Some(jobs) = shared.writes.pop_batch(MAX_BATCH, timeout) else { break };
        w.maybe_resume();
        let last = jobs.iter().map(|(n, _)| *n).max();
        w.batch(jobs.into_iter().map(|(_, j)| j).collect());
        if let Some(n) = last {
            shared.finished(n);
        }
    }
}

impl Writer<'_> {
    fn degraded(&self) -> bool {
        self.retry_at.is_some()
    }

    /// Runs one batch (see the module doc). Public to the crate so the loom
    /// models can drive it without the thread.
    fn batch(&mut self, jobs: Vec<WriteJob>) {
        let mut written: Vec<PathBuf> = Vec::new();
        let mut staged: Vec<Staged> = Vec::new();
        let mut deleted: Vec<(Option<super::Done>, Result<(), String>)> = Vec::new();
        // The records this batch's commits name are kept while it runs:
        // evicting one to make room for another would leave its manifest
        // naming a record that is gone.
        let committing: Vec<RecordKey> = jobs
            .iter()
            .filter_map(|j| match j {
                WriteJob::Commit(c) => Some(c.manifest.records()),
                _ => None,
            })
            .flatten()
            .collect();
        self.shared.state().index.protect(&committing);
        for job in jobs {
            match job {
                WriteJob::Block { group, key, payload } => {
                    self.write_block(group, &key, &payload, &mut written);
                }
                WriteJob::Commit(commit) => {
                    let super::Commit { manifest, blocks, ended } = *commit;
                    let mut ok = true;
                    for (group, key, payload) in &blocks {
                        ok &= self.write_block(*group, key, payload, &mut written);
                    }
                    match (ok, self.degraded()) {
                        (true, false) => match self.stage(&manifest) {
                            Ok(tmp) => staged.push(Staged { id: manifest.id(), tmp, manifest, ended }),
                            Err(e) => {
                                self.fail("writing a manifest", &e);
                                self.commit_failed(manifest.id());
                            }
                        },
                        _ => self.commit_failed(manifest.id()),
                    }
                }
                WriteJob::Delete { id, done } => {
                    // A commit of this agent earlier in the batch is undone
                    // before it is ever visible, its new records with it.
                    let mut cancelled = Vec::new();
                    for s in staged.extract_if(.., |s| s.id == id) {
                        let _ = self.shared.fs.remove_file(&s.tmp);
                        cancelled.extend(s.manifest.records());
                    }
                    let result = self.delete_agent(id, &cancelled);
                    deleted.push((done, result));
                }
                WriteJob::Barrier => {}
            }
        }
        self.commit(written, staged);
        self.shared.state().index.protect(&[]);
        if !deleted.is_empty() {
            if let Err(e) = self.shared.fs.sync_dir(&self.shared.agents) {
                self.fail("syncing deletions", &e);
                for (_, result) in &mut deleted {
                    *result = Err(format!("syncing the deletion: {e}"));
                }
            }
        }
        for (done, result) in deleted {
            if let Some(done) = done {
                done(result);
            }
        }
    }

    /// Steps 3 and 4: one sync for the batch, then the manifests' renames
    /// and the directory sync.
    fn commit(&mut self, written: Vec<PathBuf>, staged: Vec<Staged>) {
        if written.is_empty() && staged.is_empty() {
            return;
        }
        let shared = self.shared;
        let mut files = written.clone();
        files.extend(staged.iter().map(|s| s.tmp.clone()));
        if let Err(e) = shared.fs.sync_batch(&files, std::slice::from_ref(&shared.blocks)) {
            self.fail("syncing a batch", &e);
            self.abandon(staged);
            return;
        }
        shared.state().counters.stats.syncs += 1;
        let mut renamed = Vec::new();
        // Replaced manifests' tails, out of the index already (nobody loads
        // them now): unlinked once the new manifests are durable.
        let mut old_tails = Vec::new();
        for s in staged {
            let path = shared.manifest_path(&s.id);
            let mut st = shared.state();
            match shared.fs.rename(&s.tmp, &path) {
                Ok(()) => {
                    let m = &s.manifest;
                    old_tails.extend(st.index.set_agent(s.id, m.blocks.clone(), m.tail.map(|t| t.record), m.pinned()));
                    drop(st);
                    renamed.push(s);
                }
                Err(e) => {
                    drop(st);
                    self.fail("renaming a manifest", &e);
                    let _ = shared.fs.remove_file(&s.tmp);
                    self.commit_failed(s.id);
                }
            }
        }
        if !renamed.is_empty() {
            if let Err(e) = shared.fs.sync_dir(&shared.agents) {
                self.fail("syncing agents/", &e);
                for s in renamed {
                    self.commit_failed(s.id);
                }
                return;
            }
            let now = Instant::now();
            let mut st = shared.state();
            for s in &renamed {
                st.index.durable(s.id, s.manifest.turns);
                st.counters.stats.commits += 1;
                st.counters.stats.durability_lag.observe(now.saturating_duration_since(s.ended));
            }
        }
        for k in old_tails {
            let mut st = shared.state();
            if st.index.is_named(&k) {
                // Another manifest of this batch names the same tail (two
                // agents with one history): it stays.
                st.index.install(k, shared.record_len, None);
            } else {
                drop(st);
                let _ = shared.fs.remove_file(&shared.record_path(&k));
            }
        }
        // Durable now: their pages need not stay cached.
        for f in &written {
            shared.fs.forget_cached(f);
        }
    }

    fn abandon(&mut self, staged: Vec<Staged>) {
        for s in staged {
            let _ = self.shared.fs.remove_file(&s.tmp);
            self.commit_failed(s.id);
        }
    }

    fn commit_failed(&self, agent: ManifestId) {
        self.shared.state().counters.stats.failed_commits += 1;
        (self.shared.sink)(TierEvent::CommitFailed { agent, retry: self.degraded() });
    }

    /// Writes one record if it is still wanted (queued, not written or
    /// cancelled since); false if it could not be written.
    fn write_block(&mut self, group: GroupId, key: &BlockKey, payload: &[u8], written: &mut Vec<PathBuf>) -> bool {
        let shared = self.shared;
        let rk = RecordKey::new(group, key.hash);
        {
            let mut st = shared.state();
            match st.index.state(&rk) {
                Some(super::index::State::Queued) => {}
                // Already on disk, or an agent deletion cancelled it.
                Some(super::index::State::Present { .. }) => return true,
                None => return false,
            }
            if self.degraded() {
                st.index.unqueue(&rk);
                st.counters.stats.dropped_writes += 1;
                return false;
            }
            // Room first; only pinned records left means no room at all.
            let victims = st.index.evict_for(shared.record_len);
            st.counters.stats.evictions += victims.len() as u64;
            let room = st.index.bytes() + shared.record_len <= st.index.budget();
            if !room {
                st.index.unqueue(&rk);
                st.counters.stats.dropped_writes += 1;
            }
            drop(st);
            // Out of the index already, so no reader opens them now; only
            // this thread writes records, so none comes back meanwhile.
            self.evict(victims);
            if !room {
                return false;
            }
        }
        let path = shared.record_path(&rk);
        let tmp = shared.temp_path(&path);
        let header = encode_header(&shared.fp, group, key, payload);
        if let Err(e) = shared.fs.write_new(&tmp, &[&header, payload]) {
            let _ = shared.fs.remove_file(&tmp);
            shared.state().index.unqueue(&rk);
            self.fail("writing a block record", &e);
            return false;
        }
        let mut st = shared.state();
        if st.index.state(&rk) != Some(super::index::State::Queued) {
            drop(st);
            let _ = shared.fs.remove_file(&tmp);
            return true;
        }
        if let Err(e) = shared.fs.rename(&tmp, &path) {
            st.index.unqueue(&rk);
            drop(st);
            let _ = shared.fs.remove_file(&tmp);
            self.fail("renaming a block record", &e);
            return false;
        }
        st.index.install(rk, shared.record_len, None);
        st.counters.stats.written_blocks += 1;
        st.counters.stats.written_bytes += shared.record_len;
        drop(st);
        written.push(path);
        true
    }

    /// Deletes records the budget pushed out and tells the engine, with the
    /// blocks read back first when a tier below takes them (a record that
    /// no longer reads whole is only deleted).
    fn evict(&self, victims: Vec<RecordKey>) {
        if victims.is_empty() {
            return;
        }
        let shared = self.shared;
        let pass = shared.pass_evictions.load(std::sync::atomic::Ordering::Relaxed);
        let mut blocks = Vec::new();
        for v in &victims {
            let path = shared.record_path(v);
            if pass {
                let read = shared.fs.read_record(&path, shared.record_len as usize);
                let block = read.ok().and_then(|r| record::decode(r, &shared.fp, shared.payload_len).ok());
                if let Some((h, payload)) = block.filter(|(h, _)| h.group == v.group && h.key.hash == v.hash) {
                    blocks.push(Overflow { group: h.group, key: h.key, payload: payload.bytes().to_vec() });
                }
            }
            let _ = shared.fs.remove_file(&path);
        }
        (shared.sink)(TierEvent::Evicted { gone: victims, blocks });
    }

    /// Step 2: the manifest under a temporary name.
    fn stage(&mut self, m: &AgentManifest) -> io::Result<PathBuf> {
        let tmp = self.shared.temp_path(&self.shared.manifest_path(&m.id()));
        let bytes = m.encode(&self.shared.fp);
        if let Err(e) = self.shared.fs.write_new(&tmp, &[&bytes]) {
            let _ = self.shared.fs.remove_file(&tmp);
            return Err(e);
        }
        Ok(tmp)
    }

    /// Unlinks the manifest, then the records only it named (and those of
    /// `cancelled`, a commit of it that never became visible, that nobody
    /// names), under the lock. If the manifest cannot be unlinked nothing
    /// changes and the deletion is retried when the tier resumes.
    fn delete_agent(&mut self, id: ManifestId, cancelled: &[RecordKey]) -> Result<(), String> {
        let shared = self.shared;
        let mut st = shared.state();
        if let Err(e) = shared.fs.remove_file(&shared.manifest_path(&id)) {
            if e.kind() != io::ErrorKind::NotFound {
                drop(st);
                self.fail("deleting a manifest", &e);
                self.failed_deletes.push(id);
                return Err(format!("deleting the manifest: {e}"));
            }
        }
        let mut gone = st.index.remove_agent(id);
        gone.extend(st.index.remove_unnamed(cancelled));
        for k in gone {
            if let Err(e) = shared.fs.remove_file(&shared.record_path(&k)) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(error = %e, "deleting an agent's block record");
                }
            }
        }
        Ok(())
    }

    /// Enters the degraded state (logging the first failure).
    fn fail(&mut self, what: &str, e: &io::Error) {
        let reason = format!("{what}: {e}");
        let mut st = self.shared.state();
        st.counters.stats.io_errors += 1;
        if st.counters.stats.degraded.is_none() {
            tracing::error!(dir = %self.shared.dir.display(), "disk tier degraded ({reason}); serving goes on without it");
            st.counters.stats.degraded = Some(reason);
        }
        self.retry_at = Some(Instant::now() + self.shared.retry);
    }

    /// If degraded and the retry time has come: recreate the directories,
    /// re-take the lock if the directory vanished, probe with a write.
    #[cfg_attr(loom, allow(dead_code))] // loom models drive the batches themselves
    fn maybe_resume(&mut self) {
        let Some(at) = self.retry_at else { return };
        if Instant::now() < at {
            return;
        }
        match self.probe() {
            Ok(()) => {
                self.retry_at = None;
                self.shared.state().counters.stats.degraded = None;
                tracing::info!(dir = %self.shared.dir.display(), "disk tier resumed");
                let retry: Vec<super::WriteJob> =
                    self.failed_deletes.drain(..).map(|id| super::WriteJob::Delete { id, done: None }).collect();
                if !retry.is_empty() {
                    self.batch(retry);
                }
            }
            Err(e) => {
                self.retry_at = Some(Instant::now() + self.shared.retry);
                tracing::debug!(error = %e, "disk tier still unavailable");
            }
        }
    }

    #[cfg_attr(loom, allow(dead_code))] // loom models drive the batches themselves
    fn probe(&self) -> io::Result<()> {
        let fs = &self.shared.fs;
        for d in [&self.shared.dir, &self.shared.blocks, &self.shared.agents] {
            fs.create_dir_all(d)?;
        }
        let lock_path = self.shared.dir.join("LOCK");
        if !lock_exists(fs.as_ref(), &self.shared.dir) {
            // The directory was removed under us: our lock went with it.
            let guard = fs.lock(&lock_path)?;
            if let Ok(mut l) = self.shared.lock.lock() {
                *l = Some(guard);
            }
        }
        let probe = self.shared.temp_path(&self.shared.blocks.join("probe"));
        let written =
            fs.write_new(&probe, &[&[0u8; 4096][..]]).and_then(|()| fs.sync_batch(std::slice::from_ref(&probe), &[]));
        let _ = fs.remove_file(&probe);
        written
    }
}

#[cfg_attr(loom, allow(dead_code))] // loom models drive the batches themselves
fn lock_exists(fs: &dyn crate::fs::Fs, dir: &std::path::Path) -> bool {
    fs.list(dir).is_ok_and(|items| items.iter().any(|i| i.name == "LOCK"))
}

#[cfg(loom)]
pub(crate) fn run_batch_for_model(shared: &Shared, jobs: Vec<WriteJob>) {
    Writer { shared, retry_at: None, failed_deletes: Vec::new() }.batch(jobs);
}
