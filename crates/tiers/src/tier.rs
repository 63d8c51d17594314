//! A tier as the engine sees it: one trait over RAM, disk and remote
//! stores, so the engine walks an ordered list of tiers instead of naming
//! each one.
//!
//! # The contract
//!
//! | operation | what it does | RAM (T1) | disk (T2) | remote (T3) |
//! |---|---|---|---|---|
//! | [`Tier::holds`] | which of a chain's blocks the tier has, as far as it knows now, never waiting on I/O | its map | its index | optimistic: all, except recent misses, and none while degraded |
//! | [`Tier::load`] | reads blocks for a prefix lookup; each result is verified against the expected [`BlockKey`] | at once ([`Loading::Done`]), *taking* the blocks out (tiers below the pool are exclusive of it) | queued ([`Loading::Queued`]): reader threads report each result as a [`TierEvent::Loaded`] | queued: pipelined reads of the chain, stopping at the first miss |
//! | [`Tier::store`] | keeps a block that left the tier above | keeps it, handing back what its budget pushes out ([`Stored::Kept`]) for the next tier | queues a write ([`Stored::Queued`]), or refuses ([`Stored::Dropped`]) | as disk; the store's TTL evicts |
//! | [`Tier::commit`] | an agent's turn: its blocks the tier lacks, then its manifest | not durable: nothing | write-through, data first, manifest last | as disk; a manifest never replaces a newer turn |
//! | [`Tier::forget`] | an agent is deleted: its manifest and the blocks only it used | drops the blocks | deletes manifest and unshared records, `done` when durable | deletes the manifest only (replicas share blocks; they expire) |
//! | [`Tier::snapshot`] | blocks, bytes, budget, why degraded | | | |
//!
//! A load that completes at once and one that completes on another thread
//! meet in the same place in the engine: a load's results, one per block,
//! in chain order, the verified prefix of which is imported. So a chain
//! whose blocks are spread over several tiers (the newest in RAM, older
//! ones on disk, the oldest remote) is one load, each block asked of the
//! first tier in the list that holds it.
//!
//! A queued tier reports through an [`EventSink`] given when it is opened;
//! it never calls back while holding a lock of its own.
//!
//! # Names
//!
//! [`Tier::name`] keys everything the engine reports per tier: hit tokens,
//! moves, metrics labels, where an agent's blocks are. Names are fixed
//! lowercase words ("ram", "disk", "remote"), never client strings.

use std::time::Instant;

use kv::BlockKey;

use crate::manifest::{AgentManifest, ManifestId};
use crate::record::{GroupId, Payload, RecordKey, Reject};
use crate::stats::{DiskStats, RemoteStats};

/// One block to read for a load.
#[derive(Clone, Debug)]
pub struct LoadTask {
    /// The load it belongs to (echoed in [`TierEvent::Loaded`]).
    pub load: u64,
    /// Its position in that load.
    pub index: usize,
    /// Its layer group.
    pub group: GroupId,
    /// Exactly the block expected (the record must match it).
    pub expected: BlockKey,
}

/// What a queued tier tells the engine, from its threads.
#[derive(Debug)]
pub enum TierEvent {
    /// A block asked for by [`Tier::load`] was read (or not).
    Loaded {
        /// The load it belongs to.
        load: u64,
        /// Its position in that load.
        index: usize,
        /// The verified payload, or why it is a miss.
        result: std::result::Result<Payload, Reject>,
    },
    /// The answer to [`Tier::fetch_agent`]: the agent's manifest as the
    /// tier holds it (written by this or another replica), or `None`
    /// (absent, unusable, or the tier failed to answer).
    Agent {
        /// The agent asked for.
        agent: ManifestId,
        /// Its manifest, verified.
        manifest: Option<Box<AgentManifest>>,
    },
    /// An agent's commit could not be made durable: the tier's manifest,
    /// if any, is an older turn's.
    CommitFailed {
        /// The agent.
        agent: ManifestId,
        /// The tier was failing (worth retrying once it resumes), as
        /// opposed to full of pinned records (not worth retrying).
        retry: bool,
    },
    /// Blocks the tier let go of on its own threads to keep its budget (a
    /// disk tier's writer making room): told as removed, and, when the tier
    /// was asked to pass its evictions on ([`Tier::pass_evictions`]), offered
    /// to the tiers below it.
    Evicted {
        /// Every record that left.
        gone: Vec<RecordKey>,
        /// Those of them read back whole, to pass on.
        blocks: Vec<Overflow>,
    },
}

/// A callback for [`TierEvent`]s; called from a tier's threads. (A std
/// `Arc`: configuration shared once, not part of what loom models.)
pub type EventSink = std::sync::Arc<dyn Fn(TierEvent) + Send + Sync>;

/// A callback run when a deletion is durable (`Ok`), or could not be made
/// so (`Err` with the reason; the tier retries it when it resumes).
pub type Done = Box<dyn FnOnce(Result<(), String>) + Send>;

/// A write queue is full (or closed); nothing was queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the tier's write queue is full")]
pub struct QueueFull;

/// A block leaving a tier for lack of room: the caller offers it to the
/// next tier (or drops it).
#[derive(Debug)]
pub struct Overflow {
    /// Its layer group.
    pub group: GroupId,
    /// What it holds.
    pub key: BlockKey,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// How a load is served.
#[derive(Debug)]
pub enum Loading {
    /// At once: one result per task, in the order given.
    Done(Vec<std::result::Result<Payload, Reject>>),
    /// On the tier's threads: each result comes as a [`TierEvent::Loaded`].
    Queued,
}

/// What became of a block offered to [`Tier::store`].
#[derive(Debug)]
pub enum Stored {
    /// Kept; these blocks left the tier to make room (for the next tier).
    Kept(Vec<Overflow>),
    /// Queued to be written.
    Queued,
    /// The tier has it already (or has it queued): nothing to do.
    Known,
    /// Not kept: a full queue or a failing store (counted by the caller).
    Dropped,
}

/// A tier's numbers as of one instant (one lock, or the owner's thread).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TierSnapshot {
    /// The tier's name.
    pub name: &'static str,
    /// Blocks held.
    pub blocks: u64,
    /// Their bytes.
    pub bytes: u64,
    /// The byte budget (0: none of its own, such as a remote store's).
    pub budget: u64,
    /// Why the tier is not serving fully, while it is not.
    pub degraded: Option<String>,
    /// The disk tier's own counters.
    pub disk: Option<DiskStats>,
    /// The remote tier's own counters.
    pub remote: Option<RemoteStats>,
}

/// One tier below the pool: see the module doc. The engine thread owns the
/// list of tiers, so methods take `&mut self`; a queued tier shares its
/// state with its own threads behind its own lock.
pub trait Tier: Send + std::fmt::Debug {
    /// Its name in metrics and reports.
    fn name(&self) -> &'static str;

    /// Whether [`Tier::load`] answers at once ([`Loading::Done`]), so the
    /// engine can import its blocks within the admission that found them.
    fn at_once(&self) -> bool {
        false
    }

    /// Whether blocks evicted from the tiers above are offered to it (a
    /// remote store may take agents' turns only).
    fn takes_evictions(&self) -> bool {
        true
    }

    /// Asks a tier that evicts on its own threads to read what it evicts
    /// back and report it in [`TierEvent::Evicted`], because a tier below
    /// takes evictions. Tiers that hand their overflow back from
    /// [`Tier::store`] ignore it.
    fn pass_evictions(&mut self, on: bool) {
        let _ = on;
    }

    /// For each key, whether the tier is sure it has that block (what
    /// reports count): [`Tier::holds`] may presume, this may not.
    fn confirmed(&self, keys: &[RecordKey]) -> Vec<bool> {
        self.holds(keys)
    }

    /// Asks for an agent's manifest that this process may not know (an
    /// agent whose turns ran on another replica); true if the answer will
    /// come as a [`TierEvent::Agent`]. A tier without shared manifests
    /// answers false at once.
    fn fetch_agent(&mut self, agent: ManifestId) -> bool {
        let _ = agent;
        false
    }

    /// Whether a block stored once stays as first written, a later copy
    /// never replacing it (a store shared by replicas writes with `SET NX`):
    /// then a block whose K/V is not whole (a hybrid model's block kept
    /// without its sliding window) must never be sent to it.
    fn keeps_first_copy(&self) -> bool {
        false
    }

    /// Whether other replicas read and write it too (a remote store): an
    /// agent handed over to another replica keeps its copy there.
    fn shared(&self) -> bool {
        false
    }

    /// Whether it keeps agents' manifests, so they survive a restart.
    fn durable(&self) -> bool {
        false
    }

    /// For each key, whether the tier has that block now, as far as it
    /// knows without waiting (a load still verifies every block).
    fn holds(&self, keys: &[RecordKey]) -> Vec<bool>;

    /// Reads `tasks`' blocks: see [`Loading`]. Every task gets exactly one
    /// result, a miss included.
    fn load(&mut self, tasks: Vec<LoadTask>) -> Loading;

    /// Offers a block that left the tier above.
    fn store(&mut self, group: GroupId, key: BlockKey, payload: Vec<u8>) -> Stored;

    /// For each key, whether the tier has the block or has it queued (what
    /// an agent's commit need not send again).
    fn known(&self, keys: &[RecordKey]) -> Vec<bool> {
        self.holds(keys)
    }

    /// Queues an agent's turn: `blocks` (the tier skips those it knows),
    /// then `manifest`. A tier that is not durable ignores it.
    ///
    /// # Errors
    /// [`QueueFull`]: nothing was queued; the caller retries later.
    fn commit(
        &mut self,
        manifest: AgentManifest,
        blocks: Vec<(GroupId, BlockKey, Vec<u8>)>,
        ended: Instant,
    ) -> std::result::Result<(), QueueFull> {
        let _ = (manifest, blocks, ended);
        Ok(())
    }

    /// An agent is being deleted: its manifest goes, and of `blocks`
    /// (those of its chain no other agent uses) what the tier holds. `done`
    /// hears when that is durable; a tier that is not durable calls it at
    /// once.
    fn forget(&mut self, agent: ManifestId, blocks: &[RecordKey], done: Done);

    /// The turn of the agent's manifest the tier holds durably.
    fn durable_turns(&self, agent: &ManifestId) -> Option<u64> {
        let _ = agent;
        None
    }

    /// How many records `bytes` of this tier hold (pin limits); `None`
    /// without a budget.
    fn records_in(&self, bytes: f64) -> Option<usize> {
        let _ = bytes;
        None
    }

    /// Every block the tier is sure it holds now (what a router's index of
    /// this replica starts from); a shared store lists none.
    fn inventory(&self) -> Vec<RecordKey> {
        Vec::new()
    }

    /// Its numbers now.
    fn snapshot(&self) -> TierSnapshot;

    /// Waits for the tier's writes from another thread, if it queues any.
    fn flusher(&self) -> Option<crate::disk::Flusher> {
        None
    }

    /// Drops what the OS caches of the tier's data (a benchmark's cold
    /// read).
    fn forget_cached(&self) {}
}

/// Splits `done` into `n` callbacks: the original runs once all `n` have
/// run, with the first error any of them reported.
pub fn split_done(done: Done, n: usize) -> Vec<Done> {
    struct Join {
        left: usize,
        err: Option<String>,
        done: Option<Done>,
    }
    if n == 0 {
        done(Ok(()));
        return Vec::new();
    }
    let join = std::sync::Arc::new(std::sync::Mutex::new(Join { left: n, err: None, done: Some(done) }));
    (0..n)
        .map(|_| {
            let join = std::sync::Arc::clone(&join);
            Box::new(move |r: Result<(), String>| {
                let fire = {
                    let Ok(mut j) = join.lock() else { return };
                    if let Err(e) = r {
                        j.err.get_or_insert(e);
                    }
                    j.left -= 1;
                    if j.left == 0 {
                        j.done.take().map(|d| (d, j.err.take()))
                    } else {
                        None
                    }
                };
                if let Some((d, err)) = fire {
                    d(err.map_or(Ok(()), Err));
                }
            }) as Done
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_done_runs_once_after_all_with_the_first_error() {
        let (tx, rx) = std::sync::mpsc::channel();
        let parts = split_done(Box::new(move |r| tx.send(r).expect("receiver alive")), 3);
        let mut parts = parts.into_iter();
        parts.next().expect("three parts")(Ok(()));
        assert!(rx.try_recv().is_err(), "not before all ran");
        parts.next().expect("three parts")(Err("disk".into()));
        parts.next().expect("three parts")(Err("later".into()));
        assert_eq!(rx.try_recv(), Ok(Err("disk".into())));
        assert!(rx.try_recv().is_err(), "once");
        let (tx, rx) = std::sync::mpsc::channel();
        assert!(split_done(Box::new(move |r| tx.send(r).expect("receiver alive")), 0).is_empty());
        assert_eq!(rx.try_recv(), Ok(Ok(())), "no parts: done at once");
    }
}
