//! Loom models of the disk tier's cross-thread hand-offs, run against the
//! real code (its locks come from `tiers::sync`, which a `--cfg loom` build
//! points at loom; files live in a `MemFs` behind the same locks).
//!
//! Run with:
//! `RUSTFLAGS="--cfg loom" cargo test -p tiers --test loom --release --target-dir target/loom`
#![cfg(loom)]
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed model

use std::sync::Arc;
use std::time::Duration;

use kv::{AttentionKind, BlockKey, CacheSpec, CacheSpecParams, Namespace};
use loom::sync::Mutex;
use loom::thread;
use tiers::fs::MemFs;
use tiers::queue::JobQueue;
use tiers::{DiskConfig, DiskTier, LoadTask, RecordKey, Reject, StoreFingerprint, TierEvent};

const BS: usize = 2;
const PAYLOAD: usize = 8;

fn fp() -> StoreFingerprint {
    let spec = CacheSpec::new(CacheSpecParams::uniform(1, AttentionKind::Full, 1, 2, 2)).unwrap();
    StoreFingerprint::new(b"loom", &spec, &["loom".into()])
}

fn key(i: u32) -> BlockKey {
    BlockKey::new(Namespace::new(b"loom", b""), None, &[i, i])
}

fn payload(i: u32) -> Vec<u8> {
    vec![i as u8; PAYLOAD]
}

/// A tier over an in-memory file system with room for `records` records;
/// loads report into the returned list.
fn tier(records: u64) -> (Arc<DiskTier>, Arc<Mutex<Vec<TierEvent>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink_events = Arc::clone(&events);
    let sink: tiers::EventSink = Arc::new(move |ev| sink_events.lock().unwrap().push(ev));
    let record = (tiers::record::header_len(BS) + PAYLOAD) as u64;
    let config = DiskConfig { fs: Arc::new(MemFs::new()), ..DiskConfig::new("/kv", records * record) };
    let opened = DiskTier::open(config, fp(), BS, PAYLOAD, sink).unwrap();
    (Arc::new(opened.tier), events)
}

/// A reader loads block 1 while the writer installs block 2, whose room
/// means evicting block 1: the reader gets block 1's bytes or a miss,
/// never anything else, and the index and the files agree afterwards.
#[test]
fn a_read_racing_the_eviction_of_its_record_gets_it_whole_or_a_miss() {
    loom::model(|| {
        let (t, events) = tier(1);
        t.demote(0, key(1), payload(1));
        t.model_write();
        let writer = {
            let t = Arc::clone(&t);
            thread::spawn(move || {
                t.demote(0, key(2), payload(2));
                t.model_write();
            })
        };
        let reader = {
            let t = Arc::clone(&t);
            thread::spawn(move || {
                t.load(vec![LoadTask { load: 1, index: 0, group: 0, expected: key(1) }]);
                t.model_read();
            })
        };
        writer.join().unwrap();
        reader.join().unwrap();
        let events = events.lock().unwrap();
        let loaded: Vec<_> = events.iter().filter(|e| matches!(e, TierEvent::Loaded { .. })).collect();
        assert_eq!(loaded.len(), 1);
        match loaded[0] {
            TierEvent::Loaded { result: Ok(p), .. } => assert_eq!(p.bytes(), &payload(1)[..]),
            TierEvent::Loaded { result: Err(Reject::Missing), .. } => {}
            other => panic!("unexpected {other:?}"),
        }
        // The eviction was told (unlinked after leaving the index, outside
        // the lock: the read above is still whole or a miss).
        let evicted: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                TierEvent::Evicted { gone, .. } => Some(gone.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(evicted, vec![vec![RecordKey::new(0, key(1).hash)]]);
        t.check_invariants().unwrap();
        t.check_files(&[RecordKey::new(0, key(1).hash), RecordKey::new(0, key(2).hash)]).unwrap();
        assert!(t.present(&[RecordKey::new(0, key(2).hash)])[0], "the newer record stays");
    });
}

/// Two threads demote the same block at once (two writers of one block):
/// it is queued once, written once, counted once.
#[test]
fn two_writers_of_the_same_block_write_it_once() {
    loom::model(|| {
        let (t, _) = tier(4);
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let t = Arc::clone(&t);
                thread::spawn(move || {
                    t.demote(0, key(3), payload(3));
                    t.model_write();
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        t.model_write();
        let st = t.stats();
        assert_eq!((st.blocks, st.written_blocks), (1, 1));
        t.check_invariants().unwrap();
        t.check_files(&[RecordKey::new(0, key(3).hash)]).unwrap();
    });
}

/// The engine's hand-off queue: a producer that never blocks (bounded in
/// bytes) and a consumer that sleeps until work or close. Every accepted
/// job is popped exactly once, refused ones are handed back, the byte
/// count returns to zero, and close wakes the consumer.
#[test]
fn the_job_queue_loses_nothing_and_close_wakes_the_consumer() {
    loom::model(|| {
        let q = Arc::new(JobQueue::new());
        let consumer = {
            let q = Arc::clone(&q);
            thread::spawn(move || {
                let mut got = Vec::new();
                while let Some(batch) = q.pop_batch(8, None) {
                    got.extend(batch);
                }
                got
            })
        };
        let accepted: Vec<u32> = (0..3).filter(|&i| q.push(i, 4, Some(8)).is_ok()).collect();
        q.close();
        let got = consumer.join().unwrap();
        assert_eq!(got, accepted);
        assert_eq!(q.queued_bytes(), 0);
        assert!(!accepted.is_empty());
    });
}

/// A deletion queued after a commit by the engine, while the writer runs:
/// whatever the interleaving, the agent is gone at the end.
#[test]
fn a_delete_after_a_commit_wins_whatever_the_writer_is_doing() {
    loom::model(|| {
        let (t, _) = tier(4);
        let m = tiers::AgentManifest {
            tenant: "t".into(),
            agent: "a".into(),
            ns: Namespace::new(b"loom", b""),
            retention: tiers::ManifestRetention::Evictable,
            priority: 0,
            turns: 1,
            last_used_unix_ms: 0,
            tokens: vec![4, 4],
            blocks: vec![RecordKey::new(0, key(4).hash)],
            tail: None,
        };
        let id = m.id();
        let writer = {
            let t = Arc::clone(&t);
            thread::spawn(move || t.model_write())
        };
        t.commit(m, vec![(0, key(4), payload(4))], std::time::Instant::now()).unwrap();
        t.delete_agent(id, None);
        writer.join().unwrap();
        t.model_write();
        assert!(!t.has_agent(&id));
        assert_eq!(t.stats().blocks, 0, "its record went with it");
        t.check_invariants().unwrap();
        t.check_files(&[RecordKey::new(0, key(4).hash)]).unwrap();
        let _ = Duration::ZERO;
    });
}
