//! KV events: what this replica's cache holds, as an ordered stream a
//! router follows (Dynamo's `Stored`/`Removed`/`Cleared`, llm-d's
//! `BlockStored`/`BlockRemoved`).
//!
//! # Design
//!
//! Every event names a block by the address `kv` already gives it (the
//! chained hash of namespace, parent and tokens: a router that tokenizes a
//! prompt as the replica does computes the same addresses, no second
//! hashing scheme) and the tier it entered or left:
//!
//! | event | when |
//! |---|---|
//! | `stored` pool (with the parent) | a block is published to the prefix index (`kv::IndexChange`) |
//! | `removed` pool | it leaves the index (evicted, an agent deleted) |
//! | `stored` ram / `removed` ram | the RAM tier keeps a block the pool evicted / hands it back, or lets it go for room |
//! | `stored` disk / `stored` remote | a block is queued to the disk or the remote store (demotion, agent commit) |
//! | `removed` *tier* | an agent's blocks leave a tier when it is deleted |
//! | `removed` disk | the disk tier's writer evicts a record for its budget (told when the tier's event reaches the engine thread) |
//!
//! A block in "remote" is in the store every replica shares; it leaves by
//! its TTL, which nobody tells (a router treats a remote block as a hint
//! with a cost, and a miss costs a recompute, never a wrong answer).
//!
//! Events carry consecutive sequence numbers from 0 and the log keeps the
//! last [`EVENT_LOG_CAPACITY`]; a reader that asks from before the oldest
//! kept gets a [`Gap`] and re-reads the snapshot (the engine's
//! `kv_snapshot`, taken on the engine thread, so it is exact as of the
//! `next` it carries). Each process start has a new random `epoch`: a
//! reader that sees it change knows the replica restarted and its index
//! of that replica is void.
//!
//! # Concurrency
//!
//! One mutex over the log. The engine thread appends (a few events per
//! step, taken in one lock per batch); HTTP handlers read. Neither holds it
//! while doing anything else. Waiting readers are woken through a
//! `tokio::sync::watch` channel carrying the next sequence number, sent
//! after the lock is released.

use std::collections::VecDeque;

use kv::BlockHash;

use std::sync::Mutex;

/// Events the log keeps; older ones are dropped (a reader that fell
/// further behind resyncs from the snapshot).
pub const EVENT_LOG_CAPACITY: usize = 1 << 16;

/// What happened to a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvEventKind {
    /// The block is held in the tier now.
    Stored,
    /// It left the tier.
    Removed,
    /// Every block left the tier.
    Cleared,
}

impl KvEventKind {
    /// Its name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::Removed => "removed",
            Self::Cleared => "cleared",
        }
    }
}

/// One event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvEvent {
    /// Its sequence number (consecutive from 0 in each epoch).
    pub seq: u64,
    /// What happened.
    pub kind: KvEventKind,
    /// The tier ("pool", "ram", "disk", "remote").
    pub tier: &'static str,
    /// The block (none for `Cleared`).
    pub hash: Option<BlockHash>,
    /// The block before it in its chain (`Stored` in the pool).
    pub parent: Option<BlockHash>,
}

/// Events read from the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvEventBatch {
    /// The replica's epoch (new at each process start).
    pub epoch: u64,
    /// The oldest sequence number the log still holds.
    pub first: u64,
    /// The sequence number the next event will have.
    pub next: u64,
    /// Events from the one asked for, at most the number asked.
    pub events: Vec<KvEvent>,
}

/// What a replica holds, as of one point of its event log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvSnapshot {
    /// The replica's epoch.
    pub epoch: u64,
    /// Events from this sequence number on follow the snapshot.
    pub next: u64,
    /// The model's fingerprint (namespaces are derived from it and the
    /// tenant: `kv::Namespace::new(fingerprint, tenant)`).
    pub model_fingerprint: Vec<u8>,
    /// Tokens per block.
    pub block_size: usize,
    /// Every block held, with its tier (a block may be in several).
    pub blocks: Vec<(BlockHash, &'static str)>,
}

/// The events asked for are no longer kept: re-read the snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("events before {first} are no longer kept (asked from {since}); read the snapshot again")]
pub struct Gap {
    /// What was asked.
    pub since: u64,
    /// The oldest kept.
    pub first: u64,
    /// The next to come.
    pub next: u64,
}

#[derive(Debug)]
struct Log {
    first: u64,
    events: VecDeque<KvEvent>,
}

impl Log {
    fn next(&self) -> u64 {
        self.first + self.events.len() as u64
    }
}

/// See the module doc.
#[derive(Debug)]
pub struct KvEvents {
    epoch: u64,
    log: Mutex<Log>,
    notify: tokio::sync::watch::Sender<u64>,
}

impl Default for KvEvents {
    fn default() -> Self {
        Self::new()
    }
}

impl KvEvents {
    /// An empty log with a fresh random epoch.
    pub fn new() -> Self {
        Self {
            epoch: rand::random(),
            log: Mutex::new(Log { first: 0, events: VecDeque::new() }),
            notify: tokio::sync::watch::channel(0).0,
        }
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        // Appends and reads are single statements over plain data: a
        // panic elsewhere leaves the log consistent.
        match self.log.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// This process's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The sequence number the next event will have.
    pub fn next(&self) -> u64 {
        self.log().next()
    }

    /// Appends events, numbered in order (engine thread).
    pub(crate) fn push(
        &self,
        batch: impl IntoIterator<Item = (KvEventKind, &'static str, Option<BlockHash>, Option<BlockHash>)>,
    ) {
        let next = {
            let mut log = self.log();
            let before = log.next();
            for (kind, tier, hash, parent) in batch {
                let seq = log.next();
                log.events.push_back(KvEvent { seq, kind, tier, hash, parent });
                if log.events.len() > EVENT_LOG_CAPACITY {
                    log.events.pop_front();
                    log.first += 1;
                }
            }
            let next = log.next();
            (next != before).then_some(next)
        };
        if let Some(next) = next {
            self.notify.send_replace(next);
        }
    }

    /// Up to `max` events from sequence number `since` on.
    ///
    /// # Errors
    /// [`Gap`] when `since` is older than the oldest event kept, or past
    /// the next one (a number from another epoch).
    pub fn read(&self, since: u64, max: usize) -> Result<KvEventBatch, Gap> {
        let log = self.log();
        let (first, next) = (log.first, log.next());
        if since < first || since > next {
            return Err(Gap { since, first, next });
        }
        let from = usize::try_from(since - first).unwrap_or(usize::MAX);
        let events = log.events.iter().skip(from).take(max).copied().collect();
        Ok(KvEventBatch { epoch: self.epoch, first, next, events })
    }

    /// A receiver that changes whenever events are appended (its value:
    /// the next sequence number).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.notify.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u128) -> Option<BlockHash> {
        Some(BlockHash::from_u128(i))
    }

    #[test]
    fn events_are_numbered_in_order_and_a_reader_too_far_behind_gets_a_gap() {
        let log = KvEvents::new();
        log.push([(KvEventKind::Stored, "pool", h(1), None), (KvEventKind::Stored, "pool", h(2), h(1))]);
        let b = log.read(0, 10).expect("kept");
        assert_eq!((b.first, b.next), (0, 2));
        assert_eq!(b.events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(b.events[1].parent, h(1));
        assert_eq!(log.read(1, 10).expect("kept").events.len(), 1);
        assert!(log.read(2, 10).expect("nothing new").events.is_empty());
        assert!(log.read(3, 10).is_err(), "a number from the future (another epoch)");
        let many = (0..EVENT_LOG_CAPACITY as u128).map(|i| (KvEventKind::Removed, "ram", h(i), None));
        log.push(many);
        let gap = log.read(0, 10).expect_err("the first two were dropped");
        assert_eq!((gap.first, gap.next), (2, 2 + EVENT_LOG_CAPACITY as u64));
        assert_eq!(log.read(gap.first, 1).expect("kept").events[0].seq, 2);
    }

    #[test]
    fn a_subscriber_sees_the_next_number_change() {
        let log = KvEvents::new();
        let mut rx = log.subscribe();
        assert!(!rx.has_changed().expect("open"));
        log.push([(KvEventKind::Cleared, "pool", None, None)]);
        assert!(rx.has_changed().expect("open"));
        assert_eq!(*rx.borrow_and_update(), 1);
        log.push([]);
        assert!(!rx.has_changed().expect("open"), "an empty batch wakes nobody");
    }
}
