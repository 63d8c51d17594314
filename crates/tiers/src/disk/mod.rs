//! T2: the disk tier. Block records and agent manifests in a directory per
//! [`StoreFingerprint`], a writer thread and reader threads.
//!
//! [`DiskTier::open`] creates the directories (0700), takes the advisory
//! lock (a second live server on the same directory gets
//! [`Error::Locked`]; the kernel releases the lock of a process that died,
//! so `kill -9` never leaves a stale one), removes temporary files a crash
//! left, indexes the records by name (no record is read at start: each is
//! verified when loaded) and reads every manifest, deleting bad ones. The
//! agents come back in [`Opened`].
//!
//! The engine then, from its own thread and never waiting:
//! * asks which records are present ([`DiskTier::present`]);
//! * queues demotions ([`DiskTier::demote`], refused when the queue holds
//!   `queue_bytes` already), agent commits ([`DiskTier::commit`]) and
//!   deletions ([`DiskTier::delete_agent`], never refused);
//! * queues loads ([`DiskTier::load`]): reader threads read and verify each
//!   record and report it through the callback given at open, as a
//!   [`TierEvent`].
//!
//! Writes that fail (disk full, directory gone, I/O error) put the tier in a
//! degraded state: writes are skipped and counted, the reason is in
//! [`DiskStats::degraded`], and every few seconds the writer recreates the
//! directories and tries again, resuming by itself when it can.
//!
//! # Concurrency
//!
//! One mutex guards the record [`index::Index`] and the counters together
//! (so a stats read is one consistent snapshot). Renames into final names
//! and unlinks of final names happen while holding it, so the index and the
//! directory change together, except a budget eviction's: its records
//! leave the index under the lock, then the writer reads them back (when a
//! tier below takes evictions, [`Tier::pass_evictions`]) and unlinks them
//! without it; no reader opens a record the index lacks, and the writer,
//! the only thread that creates records, cannot bring one back meanwhile. A
//! reader that found a record corrupt removes
//! it only if it is still the generation it read (the writer may have
//! replaced it), and an eviction can race a read only in the safe way (an
//! open file outlives its name; a read after the unlink is a miss). Writing
//! a temporary file, syncing and reading happen without it. The writer is
//! the only thread that writes, so jobs apply in queue order: a deletion
//! queued after a commit always wins, and one queued before it cannot be
//! undone by it. Lock order: the tier's lock is never held while calling
//! the callback or taking any other lock.

mod index;
mod reader;
pub mod stores;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kv::BlockKey;

use crate::error::{Error, Result};
use crate::fs::{Fs, LockGuard, StdFs};
use crate::manifest::{AgentManifest, ManifestId};
use crate::queue::JobQueue;
use crate::record::{self, GroupId, RecordKey, Reject, StoreFingerprint};
use crate::stats::DiskStats;
use crate::sync::{Arc, Condvar, Mutex, MutexGuard};
pub(crate) use crate::tier::TierEvent;
use crate::tier::{Done, EventSink, LoadTask, Loading, QueueFull, Stored, Tier, TierSnapshot};

pub(crate) use index::Index;

/// How the disk tier is set up.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    /// The cache directory; the store lives in a subdirectory named by its
    /// fingerprint.
    pub root: PathBuf,
    /// Bytes of records kept at most.
    pub budget: u64,
    /// Bytes of payload the write queue holds before it refuses demotions
    /// (and defers commits).
    pub queue_bytes: u64,
    /// Reader threads.
    pub readers: usize,
    /// How long a degraded tier waits between attempts to resume.
    pub retry: Duration,
    /// The file system (real files unless a test injects faults).
    pub fs: std::sync::Arc<dyn Fs>,
    /// Which model and layout the store holds, in words, written to its
    /// `MODEL` file for people ([`stores`]); empty: none written.
    pub label: String,
}

impl DiskConfig {
    /// Real files under `root`, at most `budget` bytes, 256 MiB of queue,
    /// four readers (I/O-bound: more reads in flight keep the device busy),
    /// a retry every 2 s.
    pub fn new(root: impl Into<PathBuf>, budget: u64) -> Self {
        Self {
            root: root.into(),
            budget,
            queue_bytes: 256 << 20,
            readers: 4,
            retry: Duration::from_secs(2),
            fs: std::sync::Arc::new(StdFs),
            label: String::new(),
        }
    }
}

/// A job for the writer.
pub(crate) enum WriteJob {
    /// Write one record (a demotion).
    Block { group: GroupId, key: BlockKey, payload: Vec<u8> },
    /// Write an agent's new records, then its manifest.
    Commit(Box<Commit>),
    /// Delete an agent's manifest and the records nobody else names.
    Delete { id: ManifestId, done: Option<Done> },
    /// Nothing to do; marks a point in the queue for [`DiskTier::flush`].
    Barrier,
}

/// An agent's commit: its new records, then its manifest.
pub(crate) struct Commit {
    pub(crate) manifest: AgentManifest,
    pub(crate) blocks: Vec<(GroupId, BlockKey, Vec<u8>)>,
    /// When the turn ended (for the durability lag).
    pub(crate) ended: Instant,
}

/// The counters (the rest of [`DiskStats`] comes from the index).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) stats: DiskStats,
    /// Reject reasons already logged at warn level.
    pub(crate) logged: std::collections::BTreeSet<&'static str>,
}

/// Index and counters: what the one lock guards.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) index: Index,
    pub(crate) counters: Counters,
}

/// What the tier's threads share.
pub(crate) struct Shared {
    pub(crate) fs: std::sync::Arc<dyn Fs>,
    pub(crate) dir: PathBuf,
    pub(crate) blocks: PathBuf,
    pub(crate) agents: PathBuf,
    pub(crate) fp: StoreFingerprint,
    pub(crate) payload_len: usize,
    pub(crate) record_len: u64,
    pub(crate) queue_bytes: u64,
    pub(crate) retry: Duration,
    pub(crate) state: Mutex<State>,
    pub(crate) writes: JobQueue<(u64, WriteJob)>,
    pub(crate) reads: JobQueue<LoadTask>,
    /// The highest job number the writer has finished, and its signal.
    pub(crate) done: Mutex<u64>,
    pub(crate) done_cv: Condvar,
    pub(crate) next_job: AtomicU64,
    pub(crate) tmp_counter: AtomicU64,
    pub(crate) sink: EventSink,
    /// Whether budget evictions are read back and reported with their
    /// payloads ([`Tier::pass_evictions`]).
    pub(crate) pass_evictions: AtomicBool,
    pub(crate) lock: Mutex<Option<Box<dyn LockGuard>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        // A panic inside a critical section leaves counters at worst; the
        // index is updated by single statements. Keep serving.
        match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    pub(crate) fn record_path(&self, k: &RecordKey) -> PathBuf {
        self.blocks.join(k.file_name())
    }

    pub(crate) fn manifest_path(&self, id: &ManifestId) -> PathBuf {
        self.agents.join(id.file_name())
    }

    /// A fresh temporary name beside `final_path`.
    pub(crate) fn temp_path(&self, final_path: &Path) -> PathBuf {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let name = final_path.file_name().and_then(|n| n.to_str()).unwrap_or("x");
        final_path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
    }

    fn push(&self, job: WriteJob, bytes: u64, limit: Option<u64>) -> std::result::Result<u64, WriteJob> {
        let n = self.next_job.fetch_add(1, Ordering::SeqCst) + 1;
        self.writes.push((n, job), bytes, limit).map(|()| n).map_err(|(_, job)| job)
    }

    #[cfg_attr(loom, allow(dead_code))] // loom models drive the batches themselves
    pub(crate) fn finished(&self, n: u64) {
        if let Ok(mut d) = self.done.lock() {
            *d = (*d).max(n);
        }
        self.done_cv.notify_all();
    }
}

/// What [`DiskTier::open`] found.
#[derive(Debug)]
pub struct Opened {
    /// The tier, with its threads running.
    pub tier: DiskTier,
    /// Every agent with a valid manifest.
    pub agents: Vec<AgentManifest>,
    /// Records indexed.
    pub blocks: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Manifests or records deleted as unusable at start.
    pub rejected: usize,
    /// Temporary files of interrupted writes removed.
    pub temps_removed: usize,
    /// How long opening took.
    pub elapsed: Duration,
}

/// See the module doc.
#[derive(Debug)]
pub struct DiskTier {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn io_err(dir: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { dir: dir.to_path_buf(), source }
}

/// The store's advisory lock in `dir`, without waiting: [`Error::Locked`]
/// while another live process (a server) holds it.
fn take_lock(fs: &dyn Fs, dir: &Path) -> Result<Box<dyn LockGuard>> {
    match fs.lock(&dir.join("LOCK")) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(Error::Locked { dir: dir.to_path_buf() }),
        Err(e) => Err(io_err(dir)(e)),
    }
}

impl DiskTier {
    /// Opens (creating if needed) the store of `fp` under `config.root`;
    /// records hold payloads of `payload_len` bytes for blocks of
    /// `block_size` tokens. `sink` receives load results and failed commits.
    ///
    /// # Errors
    /// [`Error::Locked`] if another live process holds the store,
    /// [`Error::Io`] if it cannot be created or read, [`Error::Config`] for a
    /// zero payload length or budget, [`Error::Thread`].
    pub fn open(
        config: DiskConfig,
        fp: StoreFingerprint,
        block_size: usize,
        payload_len: usize,
        sink: EventSink,
    ) -> Result<Opened> {
        let started = Instant::now();
        if payload_len == 0 || config.budget == 0 {
            return Err(Error::Config("the disk tier needs a payload size and a budget".into()));
        }
        let fs = std::sync::Arc::clone(&config.fs);
        let dir = config.root.join(fp.hex());
        let blocks = dir.join("blocks");
        let agents = dir.join("agents");
        for d in [&config.root, &dir, &blocks, &agents] {
            fs.create_dir_all(d).map_err(io_err(d))?;
        }
        let lock = take_lock(fs.as_ref(), &dir)?;
        if !config.label.is_empty() {
            // For people only: a failure here costs nothing else.
            let _ = fs.write_new(&dir.join(stores::LABEL_FILE), &[config.label.as_bytes(), b"\n"]);
        }
        let record_len = (record::header_len(block_size) + payload_len) as u64;
        let mut index = Index::new(config.budget);
        let mut temps_removed = 0;
        let mut rejected = 0;

        let mut found = fs.list(&blocks).map_err(io_err(&blocks))?;
        found.sort_by_key(|item| item.modified);
        for (tick, item) in found.iter().enumerate() {
            let path = blocks.join(&item.name);
            if item.name.contains(".tmp-") {
                temps_removed += usize::from(fs.remove_file(&path).is_ok());
            } else if let Some(k) = RecordKey::from_file_name(&item.name) {
                if item.len == record_len {
                    index.install(k, item.len, Some(tick as u64 + 1));
                } else {
                    // Truncated, empty, or another layout's: never loadable.
                    rejected += usize::from(fs.remove_file(&path).is_ok());
                }
            }
        }
        let mut manifests = Vec::new();
        for item in fs.list(&agents).map_err(io_err(&agents))? {
            let path = agents.join(&item.name);
            if item.name.contains(".tmp-") {
                temps_removed += usize::from(fs.remove_file(&path).is_ok());
                continue;
            }
            let Some(id) = ManifestId::from_file_name(&item.name) else { continue };
            let parsed = fs
                .read(&path)
                .map_err(|e| Reject::Unreadable(e.to_string()))
                .and_then(|b| AgentManifest::decode(&b, &fp))
                .and_then(|m| if m.id() == id { Ok(m) } else { Err(Reject::OtherBlock { what: "agent" }) });
            match parsed {
                Ok(m) => {
                    let _ = index.set_agent(id, m.blocks.clone(), m.tail.map(|t| t.record), m.pinned());
                    index.durable(id, m.turns);
                    manifests.push(m);
                }
                Err(r) => {
                    tracing::warn!(file = %path.display(), reason = %r, "dropping an unusable agent manifest");
                    rejected += usize::from(fs.remove_file(&path).is_ok());
                }
            }
        }
        if temps_removed > 0 || rejected > 0 {
            // Make the clean-up stick before anything new is written.
            let _ = fs.sync_dir(&blocks);
            let _ = fs.sync_dir(&agents);
        }
        // The budget may have shrunk since the last run.
        for k in index.evict_for(0) {
            let _ = fs.remove_file(&blocks.join(k.file_name()));
        }
        let (nblocks, nbytes) = (index.present_count(), index.bytes());
        let mut counters = Counters::default();
        counters.stats.evictions = 0;
        let shared = Arc::new(Shared {
            fs,
            dir,
            blocks,
            agents,
            fp,
            payload_len,
            record_len,
            queue_bytes: config.queue_bytes,
            retry: config.retry,
            state: Mutex::new(State { index, counters }),
            writes: JobQueue::new(),
            reads: JobQueue::new(),
            done: Mutex::new(0),
            done_cv: Condvar::new(),
            next_job: AtomicU64::new(0),
            tmp_counter: AtomicU64::new(0),
            sink,
            pass_evictions: AtomicBool::new(false),
            lock: Mutex::new(Some(lock)),
        });
        #[allow(unused_mut)] // no threads in a loom build: the model drives them
        let mut threads = Vec::new();
        #[cfg(not(loom))]
        {
            let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
                std::thread::Builder::new()
                    .name(name)
                    .spawn(f)
                    .map_err(|source| Error::Thread { what: "disk tier", source })
            };
            let s = Arc::clone(&shared);
            threads.push(spawn("kvserve-tier-writer".into(), Box::new(move || writer::run(&s)))?);
            for i in 0..config.readers.max(1) {
                let s = Arc::clone(&shared);
                threads.push(spawn(format!("kvserve-tier-reader-{i}"), Box::new(move || reader::run(&s)))?);
            }
        }
        let tier = DiskTier { shared, threads };
        Ok(Opened {
            tier,
            agents: manifests,
            blocks: nblocks,
            bytes: nbytes,
            rejected,
            temps_removed,
            elapsed: started.elapsed(),
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Bytes of one record file.
    pub fn record_len(&self) -> u64 {
        self.shared.record_len
    }

    /// For each key, whether its record is on disk now (one lock for all).
    pub fn present(&self, keys: &[RecordKey]) -> Vec<bool> {
        let s = self.shared.state();
        keys.iter().map(|k| s.index.present(k).is_some()).collect()
    }

    /// Whether the record is on disk or queued to be written.
    pub fn is_known(&self, key: &RecordKey) -> bool {
        self.shared.state().index.state(key).is_some()
    }

    /// Queues a block (evicted from RAM, or from the pool without a RAM
    /// tier) to be written. Never waits: a full queue or a failing disk
    /// drops it (counted).
    pub fn demote(&self, group: GroupId, key: BlockKey, payload: Vec<u8>) -> Demotion {
        let rk = RecordKey::new(group, key.hash);
        {
            let mut s = self.shared.state();
            if s.index.state(&rk).is_some() {
                return Demotion::Known;
            }
            if s.counters.stats.degraded.is_some() {
                s.counters.stats.dropped_writes += 1;
                return Demotion::Dropped;
            }
            s.index.mark_queued(rk);
        }
        let bytes = payload.len() as u64;
        match self.shared.push(WriteJob::Block { group, key, payload }, bytes, Some(self.shared.queue_bytes)) {
            Ok(_) => Demotion::Queued,
            Err(_) => {
                let mut s = self.shared.state();
                s.index.unqueue(&rk);
                s.counters.stats.dropped_writes += 1;
                Demotion::Dropped
            }
        }
    }

    /// For each key, whether its record is on disk or queued (one lock).
    pub fn known(&self, keys: &[RecordKey]) -> Vec<bool> {
        let s = self.shared.state();
        keys.iter().map(|k| s.index.state(k).is_some()).collect()
    }

    /// A handle that can wait for the writer from another thread.
    pub fn flusher(&self) -> Flusher {
        Flusher { shared: Arc::clone(&self.shared) }
    }

    /// Queues an agent's commit: `blocks` (those of its chain not on disk
    /// or queued yet; others given are skipped) then its manifest. Refused
    /// when the queue is full: the caller keeps the agent for a later try.
    ///
    /// # Errors
    /// [`QueueFull`]; nothing was queued.
    pub fn commit(
        &self,
        manifest: AgentManifest,
        blocks: Vec<(GroupId, BlockKey, Vec<u8>)>,
        ended: Instant,
    ) -> std::result::Result<(), QueueFull> {
        // Claim the records not on disk or queued yet; the others are
        // skipped (and must not be unclaimed below).
        let (blocks, keys): (Vec<_>, Vec<RecordKey>) = {
            let mut s = self.shared.state();
            blocks
                .into_iter()
                .map(|b| {
                    let k = RecordKey::new(b.0, b.1.hash);
                    (b, k)
                })
                .filter(|(_, k)| s.index.mark_queued(*k))
                .unzip()
        };
        let bytes: u64 = blocks.iter().map(|b| b.2.len() as u64).sum();
        // A commit with no new blocks always fits; one with blocks must fit
        // the queue unless it is empty (a single huge commit still goes).
        let limit = (bytes > 0 && !self.shared.writes.is_empty()).then_some(self.shared.queue_bytes);
        if self.shared.push(WriteJob::Commit(Box::new(Commit { manifest, blocks, ended })), bytes, limit).is_ok() {
            return Ok(());
        }
        let mut s = self.shared.state();
        for k in &keys {
            s.index.unqueue(k);
        }
        Err(QueueFull)
    }

    /// Queues the deletion of an agent's manifest and of the records no
    /// other manifest names; `done` hears when the deletion is durable, or
    /// that it failed (then it is retried when the tier resumes). Never
    /// refused.
    pub fn delete_agent(&self, id: ManifestId, done: Option<Done>) {
        if let Err(WriteJob::Delete { done: Some(done), .. }) = self.shared.push(WriteJob::Delete { id, done }, 0, None)
        {
            done(Err("the disk tier is shutting down".into()));
        }
    }

    /// Whether an agent has a manifest on disk.
    pub fn has_agent(&self, id: &ManifestId) -> bool {
        self.shared.state().index.has_agent(id)
    }

    /// The turn count of the agent's manifest that is durable on disk (the
    /// turn it would come back at after a crash now).
    pub fn durable_turns(&self, id: &ManifestId) -> Option<u64> {
        self.shared.state().index.durable_turns(id)
    }

    /// Queues reads; each result comes back as a [`TierEvent::Loaded`].
    pub fn load(&self, tasks: Vec<LoadTask>) {
        for t in tasks {
            if let Err(t) = self.shared.reads.push(t, 0, None) {
                (self.shared.sink)(TierEvent::Loaded { load: t.load, index: t.index, result: Err(Reject::Missing) });
            }
        }
    }

    /// Waits until every job queued before this call is done (written and
    /// synced, or dropped); false if `timeout` passed first.
    pub fn flush(&self, timeout: Duration) -> bool {
        flush(&self.shared, timeout)
    }

    /// Drops every record's pages from the page cache (a benchmark's cold
    /// read).
    pub fn forget_cached(&self) {
        if let Ok(items) = self.shared.fs.list(&self.shared.blocks) {
            for item in items {
                self.shared.fs.forget_cached(&self.shared.blocks.join(item.name));
            }
        }
    }

    /// One consistent snapshot of the tier's numbers.
    pub fn stats(&self) -> DiskStats {
        let s = self.shared.state();
        let mut out = s.counters.stats.clone();
        out.blocks = s.index.present_count() as u64;
        out.bytes = s.index.bytes();
        out.budget = s.index.budget();
        out.pinned_bytes = s.index.pinned_bytes();
        out.agents = s.index.agent_count() as u64;
        drop(s);
        out.queued_bytes = self.shared.writes.queued_bytes();
        out
    }

    /// Why the tier is not writing, if it is not.
    pub fn degraded(&self) -> Option<String> {
        self.shared.state().counters.stats.degraded.clone()
    }

    /// Runs what the writer has queued, on this thread (loom models drive
    /// the tier's threads themselves).
    #[cfg(loom)]
    pub fn model_write(&self) {
        while let Some(jobs) = self.shared.writes.pop_batch(writer::MAX_BATCH, Some(Duration::ZERO)) {
            if jobs.is_empty() {
                break;
            }
            writer::run_batch_for_model(&self.shared, jobs.into_iter().map(|(_, j)| j).collect());
        }
    }

    /// Serves the queued reads on this thread (loom models).
    #[cfg(loom)]
    pub fn model_read(&self) {
        while let Some(tasks) = self.shared.reads.pop_batch(usize::MAX, Some(Duration::ZERO)) {
            if tasks.is_empty() {
                break;
            }
            for t in tasks {
                reader::serve(&self.shared, t);
            }
        }
    }

    /// Whether each key's record file exists exactly when the index says
    /// it is present (tests and loom models).
    ///
    /// # Errors
    /// The first key where they disagree.
    pub fn check_files(&self, keys: &[RecordKey]) -> std::result::Result<(), String> {
        let s = self.shared.state();
        for k in keys {
            let file = self.shared.fs.read(&self.shared.record_path(k)).is_ok();
            if file != s.index.present(k).is_some() {
                return Err(format!("{k:?}: file {file}, index {:?}", s.index.state(k)));
            }
        }
        Ok(())
    }

    /// The index's whole-state check (tests).
    ///
    /// # Errors
    /// The first inconsistency found.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        self.shared.state().index.check()
    }
}

/// What became of a demotion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Demotion {
    /// Queued for the writer.
    Queued,
    /// Already on disk or queued: nothing to do.
    Known,
    /// Not kept: the queue is full or the disk is failing (counted).
    Dropped,
}

/// Waits for the disk tier's writer from any thread (see
/// [`DiskTier::flush`]).
#[derive(Clone, Debug)]
pub struct Flusher {
    shared: Arc<Shared>,
}

impl Flusher {
    /// As [`DiskTier::flush`].
    pub fn flush(&self, timeout: Duration) -> bool {
        flush(&self.shared, timeout)
    }
}

fn flush(shared: &Shared, timeout: Duration) -> bool {
    let Ok(n) = shared.push(WriteJob::Barrier, 0, None) else { return false };
    let deadline = Instant::now() + timeout;
    let Ok(mut done) = shared.done.lock() else { return false };
    while *done < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        done = match shared.done_cv.wait_timeout(done, left) {
            Ok((d, _)) => d,
            Err(_) => return false,
        };
    }
    true
}

impl Tier for DiskTier {
    fn name(&self) -> &'static str {
        "disk"
    }

    fn durable(&self) -> bool {
        true
    }

    fn holds(&self, keys: &[RecordKey]) -> Vec<bool> {
        self.present(keys)
    }

    fn pass_evictions(&mut self, on: bool) {
        self.shared.pass_evictions.store(on, Ordering::Relaxed);
    }

    fn load(&mut self, tasks: Vec<LoadTask>) -> Loading {
        DiskTier::load(self, tasks);
        Loading::Queued
    }

    fn store(&mut self, group: GroupId, key: BlockKey, payload: Vec<u8>) -> Stored {
        match self.demote(group, key, payload) {
            Demotion::Queued => Stored::Queued,
            Demotion::Known => Stored::Known,
            Demotion::Dropped => Stored::Dropped,
        }
    }

    fn known(&self, keys: &[RecordKey]) -> Vec<bool> {
        DiskTier::known(self, keys)
    }

    fn commit(
        &mut self,
        manifest: AgentManifest,
        blocks: Vec<(GroupId, BlockKey, Vec<u8>)>,
        ended: Instant,
    ) -> std::result::Result<(), QueueFull> {
        DiskTier::commit(self, manifest, blocks, ended)
    }

    /// The records only this agent named go with its manifest (the index
    /// knows which); `blocks` is not needed.
    fn forget(&mut self, agent: ManifestId, _blocks: &[RecordKey], done: Done) {
        self.delete_agent(agent, Some(done));
    }

    fn durable_turns(&self, agent: &ManifestId) -> Option<u64> {
        DiskTier::durable_turns(self, agent)
    }

    fn inventory(&self) -> Vec<RecordKey> {
        self.shared.state().index.present_keys()
    }

    fn records_in(&self, bytes: f64) -> Option<usize> {
        Some((bytes / self.record_len().max(1) as f64) as usize)
    }

    fn snapshot(&self) -> TierSnapshot {
        let d = self.stats();
        TierSnapshot {
            name: "disk",
            blocks: d.blocks,
            bytes: d.bytes,
            budget: d.budget,
            degraded: d.degraded.clone(),
            disk: Some(d),
            remote: None,
        }
    }

    fn flusher(&self) -> Option<Flusher> {
        Some(DiskTier::flusher(self))
    }

    fn forget_cached(&self) {
        DiskTier::forget_cached(self);
    }
}

impl Drop for DiskTier {
    /// Finishes every queued write (the queue is bounded), stops the
    /// threads and releases the lock.
    fn drop(&mut self) {
        self.shared.writes.close();
        self.shared.reads.close();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Ok(mut l) = self.shared.lock.lock() {
            l.take();
        }
    }
}
