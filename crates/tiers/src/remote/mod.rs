//! T3: the remote tier. The disk tier's block records and agent manifests
//! in Redis, shared by every replica serving the same model, so that a
//! prefix computed on one replica is a hit on another and an agent can
//! resume wherever its next turn lands.
//!
//! # Design
//!
//! * **Client.** The `redis` crate's synchronous API, one connection per
//!   thread (a writer, `readers` readers, a pinger): this crate runs tier
//!   work on threads of its own and has no async runtime. Every call runs
//!   under a timeout (`connect_timeout`, then `timeout` per read or write
//!   of the socket). A failed call drops that thread's connection; the next
//!   use connects again, with backoff; a connection found closed (the
//!   store restarted) is replaced at once and the call retried, every call
//!   being idempotent (the `conn` module). Plain Redis commands, no
//!   protocol of our own.
//! * **Keys** are hashes only, never client strings, with the address in a
//!   hash tag so a cluster can spread them: `kvs:<fp>:{<address>}:g<group>`
//!   for a block, `kvs:<fp>:a:{<manifest id>}` for a manifest. The block
//!   address is `kv`'s chained hash, which already covers the namespace
//!   (model and tenant); `<fp>` is the [`StoreFingerprint`] (model, cache
//!   and payload layout).
//! * **Values.** A block is the disk tier's record unchanged (the header of
//!   [`crate::record::encode_header`], then the payload), read back with
//!   [`crate::record::verify`] exactly as the disk reader does. A value that fails
//!   verification is a miss: counted by reason, deleted, reported as the
//!   `Err` of its [`TierEvent::Loaded`].
//! * **Writes.** `SET key value NX PX <ttl>`: replicas writing the same
//!   block (bit-identical, by construction) never race, and the first copy
//!   stays (`existing` counts the others). The writer thread takes jobs from
//!   a [`JobQueue`] in batches and pipelines them: first every block of the
//!   batch (demotions and commits' blocks), then, in queue order, each
//!   commit's manifest (only if all its blocks were stored: data first,
//!   manifest last) and each deletion. A manifest is a hash (`turns`,
//!   `data`) written by a Lua script that refuses to replace a newer turn,
//!   so a late writer never rolls an agent back. Deleting an agent deletes
//!   its manifest only: other replicas' agents may share its blocks, which
//!   expire by TTL.
//! * **Reads.** [`Tier::load`] queues each load's tasks as one chain, in
//!   index order; a reader fetches it with pipelined `GETEX key PX <ttl>`
//!   (a hit refreshes the TTL), [`READ_CHUNK`] blocks per round trip, and
//!   stops at the first miss: that block enters the negative cache, and the
//!   chain's later blocks are reported missing without being fetched (the
//!   engine imports only a verified prefix). A chain longer than
//!   [`SPLIT_BLOCKS`] × readers is split into one part per reader, read in
//!   parallel over their own connections (a part after a miss may fetch
//!   blocks the engine then discards: a bounded waste, for about half the
//!   time on a long history).
//! * **Presence** ([`Tier::holds`]) never does I/O. It is optimistic: the
//!   store may hold any block another replica wrote, so every key is
//!   presumed present, except recent misses (the negative cache, entries
//!   live `negative_ttl`), and none while the tier is degraded. A wrong
//!   guess costs one round trip, then the negative cache answers.
//!   [`Tier::known`] (what a commit need not resend) is narrower: blocks
//!   this process wrote, queued or read within the TTL.
//! * **Health.** A pinger thread sends `PING` every `ping` interval, idle or
//!   not. A failure (or any failed call on another thread) marks the tier
//!   degraded: `holds` answers false, writes are dropped and counted (never
//!   waiting), reads fail at once. The next successful ping clears it.
//!
//! # Costs
//!
//! A store copies the payload once into the command buffer (header and
//! payload are written into it directly). A chain of `n` blocks costs
//! `ceil(n / 8)` round trips; a miss one round trip, then none for
//! `negative_ttl`. A manifest read ([`RemoteTier::manifest`]) opens a
//! connection of its own (rare: once per agent resumed from elsewhere). The
//! known set holds at most [`KNOWN_MAX`] keys (~90 MB at full), the
//! negative cache [`NEGATIVE_MAX`].
//!
//! # Invariants
//!
//! * Every [`LoadTask`] gets exactly one [`TierEvent::Loaded`], whatever
//!   the store does (a dead store answers within the timeouts; a closed
//!   queue or a shutdown answers at once).
//! * A payload is handed to the engine only after [`crate::record::verify`]
//!   passed against the block the engine expects.
//! * A manifest is written only after every block its commit carried was
//!   stored (or found present), and never over a newer turn.
//! * [`Tier::durable_turns`] answers only from manifests this process wrote
//!   successfully.
//! * Neither the password nor the query of the URL appears in logs, errors
//!   or `Debug` output (`redact_url`).
//!
//! # Concurrency
//!
//! One mutex (over `State`) guards the counters, the degraded reason, the
//! negative cache, the known set and the durable turns, so a stats read is
//! one snapshot and "degraded" and "drop this write" are decided together.
//! It is never held during network I/O, while calling the event sink or a
//! `done` callback, or while taking the job queues' own locks. One
//! condition variable on it wakes the pinger (to stop) and [`RemoteTier::flush`]
//! (the writer finished a job). Jobs reach the threads through two
//! [`JobQueue`]s that never block the engine thread. The writer is the only
//! thread that writes, so jobs apply in queue order: a deletion queued after
//! a commit always wins.
//!
//! [`Tier::durable_turns`]: crate::Tier::durable_turns
//! [`Tier::holds`]: crate::Tier::holds
//! [`Tier::known`]: crate::Tier::known
//! [`Tier::load`]: crate::Tier::load
//! [`TierEvent::Loaded`]: crate::TierEvent::Loaded

mod cache;
mod config;
mod conn;
mod health;
mod reader;
mod tier;
mod writer;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kv::BlockKey;

use crate::error::{Error, Result};
use crate::manifest::{AgentManifest, ManifestId};
use crate::queue::JobQueue;
use crate::record::{GroupId, RecordKey, Reject, StoreFingerprint};
use crate::stats::RemoteStats;
use crate::sync::{Arc, Condvar, Mutex, MutexGuard};
use crate::tier::{Done, EventSink, LoadTask};

use cache::ExpiringSet;
pub use config::RemoteConfig;
pub use conn::redact_url;

/// Blocks fetched per pipelined round trip.
pub const READ_CHUNK: usize = 8;
/// Blocks per reader below which a chain is read by one reader alone.
pub const SPLIT_BLOCKS: usize = 4 * READ_CHUNK;
/// Most keys the known set holds; the oldest go first.
pub const KNOWN_MAX: usize = 1 << 20;
/// Most keys the negative cache holds; the oldest go first.
pub const NEGATIVE_MAX: usize = 1 << 16;
/// On drop, the writer finishes queued jobs for at most this many call
/// timeouts, then drops the rest (counted).
const DRAIN_TIMEOUTS: u32 = 10;

/// A job for the writer.
enum WriteJob {
    /// Store one block (a demotion).
    Block { group: GroupId, key: BlockKey, payload: Vec<u8> },
    /// Store an agent's blocks, then its manifest.
    Commit(Box<Commit>),
    /// Delete an agent's manifest.
    Delete { id: ManifestId, done: Done },
    /// Nothing to do; marks a point in the queue for [`RemoteTier::flush`].
    Barrier,
}

/// A job for a reader.
enum ReadJob {
    /// One load's tasks, in index order.
    Chain(Vec<LoadTask>),
    /// An agent's manifest, answered as a [`crate::TierEvent::Agent`].
    Agent(ManifestId),
}

/// An agent's commit: blocks, then manifest.
struct Commit {
    manifest: AgentManifest,
    blocks: Vec<(GroupId, BlockKey, Vec<u8>)>,
}

/// What the one lock guards.
struct State {
    /// Counters, `connected` and `degraded` included.
    stats: RemoteStats,
    /// Recent misses.
    negative: ExpiringSet,
    /// Blocks written, queued or read within the TTL.
    known: ExpiringSet,
    /// The turn of each agent's manifest this process wrote.
    durable: HashMap<ManifestId, u64>,
    /// Reject reasons already logged at warn level.
    logged: BTreeSet<&'static str>,
    /// How many times the tier came back from degraded (connections in
    /// backoff try again at once after a recovery).
    recoveries: u64,
    /// The highest job number the writer has finished.
    finished: u64,
    /// Set on drop: until when the writer may drain its queue.
    stopping: Option<Instant>,
}

/// The configured times and sizes the threads work within.
struct Limits {
    /// Reader threads (a long chain is split among them).
    readers: usize,
    ttl: Duration,
    timeout: Duration,
    connect_timeout: Duration,
    ping: Duration,
    queue_bytes: u64,
    take_evictions: bool,
}

/// The Lua scripts the tier runs (by hash, loaded on first use).
struct Scripts {
    /// Writes a manifest unless the store holds a newer turn.
    put_manifest: redis::Script,
    /// Deletes a manifest if it still holds the bytes read.
    del_manifest_if: redis::Script,
}

/// What the tier's threads share.
struct Shared {
    client: redis::Client,
    /// The URL, redacted: for logs and errors.
    url: String,
    fp: StoreFingerprint,
    fp_hex: String,
    payload_len: usize,
    limits: Limits,
    scripts: Scripts,
    state: Mutex<State>,
    wake: Condvar,
    writes: JobQueue<(u64, WriteJob)>,
    reads: JobQueue<ReadJob>,
    next_job: AtomicU64,
    sink: EventSink,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic inside a critical section leaves counters at worst; keep
        // serving.
        match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn recoveries(&self) -> u64 {
        self.state().recoveries
    }

    /// The TTL in ms, as `PX` takes it.
    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.limits.ttl.as_millis()).unwrap_or(u64::MAX).max(1)
    }

    fn block_key(&self, k: &RecordKey) -> String {
        conn::block_key(&self.fp_hex, k)
    }

    fn manifest_key(&self, id: &ManifestId) -> String {
        conn::manifest_key(&self.fp_hex, id)
    }

    /// A call failed: counts it and marks the tier degraded (logged when
    /// it starts).
    fn degrade(&self, reason: &str) {
        let started = {
            let mut s = self.state();
            s.stats.errors += 1;
            s.stats.connected = false;
            let started = s.stats.degraded.is_none();
            if started {
                s.stats.degraded = Some(reason.to_string());
            }
            started
        };
        if started {
            tracing::warn!(url = %self.url, %reason, "the remote KV tier is unavailable: lookups skip it and its writes are dropped until it answers again");
        }
    }

    /// A health check passed: clears the degraded state.
    fn healthy(&self) {
        let resumed = {
            let mut s = self.state();
            s.stats.connected = true;
            let was = s.stats.degraded.take();
            if was.is_some() {
                s.recoveries += 1;
            }
            was
        };
        if let Some(was) = resumed {
            tracing::info!(url = %self.url, after = %was, "the remote KV tier is serving");
        }
    }

    fn push(&self, job: WriteJob, bytes: u64, limit: Option<u64>) -> std::result::Result<u64, WriteJob> {
        let n = self.next_job.fetch_add(1, Ordering::SeqCst) + 1;
        self.writes.push((n, job), bytes, limit).map(|()| n).map_err(|(_, job)| job)
    }

    /// The writer finished every job up to `n`.
    fn finished(&self, n: u64) {
        {
            let mut s = self.state();
            s.finished = s.finished.max(n);
        }
        self.wake.notify_all();
    }

    /// Counts a rejected value or manifest; true the first time this
    /// reason is seen (logged at warn level then, at debug after).
    fn count_reject(s: &mut State, r: &Reject) -> bool {
        *s.stats.rejected.entry(r.label()).or_default() += 1;
        s.logged.insert(r.label())
    }
}

/// See the module doc.
pub struct RemoteTier {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for RemoteTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteTier").field("url", &self.shared.url).finish_non_exhaustive()
    }
}

impl RemoteTier {
    /// Starts the tier on the store at `config.url`, for records of
    /// `payload_len` bytes of blocks of `block_size` tokens under `fp`.
    /// `sink` receives load results and failed commits. It checks the
    /// store once before returning (within `connect_timeout` and
    /// `timeout`); a store that is down does not fail the call: the tier
    /// starts degraded and resumes by itself when the store answers.
    ///
    /// # Errors
    /// [`Error::Config`] for a URL that does not parse (the message shows
    /// it redacted) or an unusable setting, [`Error::Thread`].
    pub fn open(
        config: RemoteConfig,
        fp: StoreFingerprint,
        block_size: usize,
        payload_len: usize,
        sink: EventSink,
    ) -> Result<Self> {
        config.validate()?;
        if payload_len == 0 || block_size == 0 {
            return Err(Error::Config("the remote tier needs a block and payload size".into()));
        }
        let url = redact_url(&config.url);
        let client = conn::client(&config)
            .map_err(|e| Error::Config(format!("invalid Redis URL {url}: {}", conn::describe(&e))))?;
        let state = State {
            stats: RemoteStats { degraded: Some(format!("not connected yet to {url}")), ..RemoteStats::default() },
            negative: ExpiringSet::new(config.negative_ttl, NEGATIVE_MAX),
            known: ExpiringSet::new(config.ttl, KNOWN_MAX),
            durable: HashMap::new(),
            logged: BTreeSet::new(),
            recoveries: 0,
            finished: 0,
            stopping: None,
        };
        let shared = Arc::new(Shared {
            client,
            url,
            fp,
            fp_hex: conn::fp_hex(&fp),
            payload_len,
            limits: Limits {
                readers: config.readers,
                ttl: config.ttl,
                timeout: config.timeout,
                connect_timeout: config.connect_timeout,
                ping: config.ping,
                queue_bytes: config.queue_bytes,
                take_evictions: config.take_evictions,
            },
            scripts: Scripts {
                put_manifest: redis::Script::new(conn::PUT_MANIFEST),
                del_manifest_if: redis::Script::new(conn::DEL_MANIFEST_IF),
            },
            state: Mutex::new(state),
            wake: Condvar::new(),
            writes: JobQueue::new(),
            reads: JobQueue::new(),
            next_job: AtomicU64::new(0),
            sink,
        });
        let mut pinger = conn::Conn::new();
        health::check(&shared, &mut pinger);
        // Threads go into the tier as they start: if one cannot, dropping
        // the tier stops those already running.
        let mut tier = RemoteTier { shared, threads: Vec::new() };
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map_err(|source| Error::Thread { what: "remote tier", source })
        };
        let s = Arc::clone(&tier.shared);
        tier.threads.push(spawn("kvserve-remote-ping".into(), Box::new(move || health::run(&s, pinger)))?);
        let s = Arc::clone(&tier.shared);
        tier.threads.push(spawn("kvserve-remote-writer".into(), Box::new(move || writer::run(&s)))?);
        for i in 0..config.readers {
            let s = Arc::clone(&tier.shared);
            tier.threads.push(spawn(format!("kvserve-remote-reader-{i}"), Box::new(move || reader::run(&s)))?);
        }
        Ok(tier)
    }

    /// The store's URL, with credentials hidden.
    pub fn url(&self) -> &str {
        &self.shared.url
    }

    /// Reads an agent's manifest, written by this or another replica, now
    /// (blocking, within the timeouts). A manifest that fails its checks
    /// (checksum, fingerprint, another agent's) is counted, deleted unless
    /// rewritten meanwhile, and reported as absent.
    ///
    /// # Errors
    /// [`Error::Remote`] while the tier is degraded, or when the store
    /// cannot be reached or fails the call.
    pub fn manifest(&self, id: &ManifestId) -> Result<Option<AgentManifest>> {
        read_manifest(&self.shared, id)
    }

    /// One consistent snapshot of the tier's numbers.
    pub fn stats(&self) -> RemoteStats {
        let s = self.shared.state();
        let mut out = s.stats.clone();
        out.known_blocks = s.known.len() as u64;
        drop(s);
        out.queued_bytes = self.shared.writes.queued_bytes();
        out
    }

    /// Why the tier is not serving, if it is not.
    pub fn degraded(&self) -> Option<String> {
        self.shared.state().stats.degraded.clone()
    }

    /// Waits until every write queued before this call is done (stored,
    /// or dropped and counted); false if `timeout` passed first.
    pub fn flush(&self, timeout: Duration) -> bool {
        let Ok(n) = self.shared.push(WriteJob::Barrier, 0, None) else { return false };
        let deadline = Instant::now() + timeout;
        let mut s = self.shared.state();
        while s.finished < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = match self.shared.wake.wait_timeout(s, left) {
                Ok((g, _)) => g,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }
}

/// [`RemoteTier::manifest`], from any of the tier's threads.
fn read_manifest(shared: &Shared, id: &ManifestId) -> Result<Option<AgentManifest>> {
    if let Some(reason) = shared.state().stats.degraded.clone() {
        return Err(Error::Remote { reason });
    }
    let failed = |reason: String| {
        shared.state().stats.errors += 1;
        Error::Remote { reason }
    };
    let key = shared.manifest_key(id);
    let mut con = conn::connect(shared).map_err(|e| failed(format!("cannot connect to {}: {e}", shared.url)))?;
    let (data,): (Option<Vec<u8>>,) = redis::pipe()
        .cmd("HGET")
        .arg(&key)
        .arg("data")
        .cmd("PEXPIRE")
        .arg(&key)
        .arg(shared.ttl_ms())
        .ignore()
        .query(&mut con)
        .map_err(|e| failed(conn::describe(&e)))?;
    let Some(bytes) = data else { return Ok(None) };
    let parsed = AgentManifest::decode(&bytes, &shared.fp).and_then(|m| {
        if m.id() == *id {
            Ok(m)
        } else {
            Err(Reject::OtherBlock { what: "agent" })
        }
    });
    match parsed {
        Ok(m) => Ok(Some(m)),
        Err(r) => {
            let first = Shared::count_reject(&mut shared.state(), &r);
            let deleted = shared.scripts.del_manifest_if.key(&key).arg(bytes).invoke::<i64>(&mut con);
            if first {
                tracing::warn!(key = %key, reason = %r, "dropping an unusable agent manifest from the remote store");
            } else {
                tracing::debug!(key = %key, reason = %r, "dropping an unusable agent manifest from the remote store");
            }
            if let Err(e) = deleted {
                shared.state().stats.errors += 1;
                tracing::debug!(key = %key, error = %conn::describe(&e), "could not delete a bad manifest");
            }
            Ok(None)
        }
    }
}

impl Drop for RemoteTier {
    /// Lets the writer finish what is queued (for at most
    /// `DRAIN_TIMEOUTS` call timeouts), answers pending loads, stops the
    /// threads.
    fn drop(&mut self) {
        {
            let mut s = self.shared.state();
            s.stopping = Some(Instant::now() + self.shared.limits.timeout * DRAIN_TIMEOUTS);
        }
        self.shared.wake.notify_all();
        self.shared.writes.close();
        self.shared.reads.close();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
