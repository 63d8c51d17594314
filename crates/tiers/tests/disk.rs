//! The disk tier on real files: round trips, the budget, agents and their
//! deletion, every way a record can be wrong, concurrent writers and
//! readers, the lock, leftovers of crashes, permissions, a full and a
//! vanished disk.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv::BlockKey;
use tiers::fs::{Fs, HookedFs, StdFs};
use tiers::{
    AgentManifest, DiskConfig, DiskTier, Error, LoadTask, ManifestId, ManifestRetention, Opened, Payload, RecordKey,
    Reject, StoreFingerprint, Tier, TierEvent,
};

use common::{ns, sink, BS};

const PAYLOAD: usize = 3 * 4096;

fn fp() -> StoreFingerprint {
    common::fp(b"test-model")
}

/// The keys of a chain of `n` blocks, block `i` holding tokens `seed*1000 + i*16 ..`.
fn chain(seed: u32, n: usize) -> Vec<BlockKey> {
    let mut out: Vec<BlockKey> = Vec::new();
    for i in 0..n {
        let tokens: Vec<u32> = (0..BS as u32).map(|t| seed * 1000 + i as u32 * 16 + t).collect();
        out.push(BlockKey::new(ns(), out.last().map(|k| k.hash), &tokens));
    }
    out
}

fn payload(k: &BlockKey) -> Vec<u8> {
    common::payload(k, PAYLOAD)
}

struct Store {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Store {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("kv");
        Self { _dir: dir, root }
    }

    fn config(&self, budget: u64) -> DiskConfig {
        DiskConfig { retry: Duration::from_millis(50), ..DiskConfig::new(&self.root, budget) }
    }

    fn open(&self, budget: u64) -> (Opened, mpsc::Receiver<TierEvent>) {
        self.open_with(self.config(budget))
    }

    fn open_with(&self, config: DiskConfig) -> (Opened, mpsc::Receiver<TierEvent>) {
        let (sink, rx) = sink();
        (DiskTier::open(config, fp(), BS, PAYLOAD, sink).unwrap(), rx)
    }

    fn store_dir(&self) -> PathBuf {
        self.root.join(fp().hex())
    }

    fn record_path(&self, k: &BlockKey) -> PathBuf {
        self.store_dir().join("blocks").join(RecordKey::new(0, k.hash).file_name())
    }
}

fn manifest(agent: &str, keys: &[BlockKey], retention: ManifestRetention) -> AgentManifest {
    AgentManifest {
        tenant: "tenant".into(),
        agent: agent.into(),
        ns: ns(),
        retention,
        priority: 0,
        turns: 1,
        last_used_unix_ms: 1,
        tokens: keys.iter().flat_map(|k| k.tokens.iter().copied()).collect(),
        blocks: keys.iter().map(|k| RecordKey::new(0, k.hash)).collect(),
        tail: None,
    }
}

fn commit(tier: &DiskTier, agent: &str, keys: &[BlockKey], retention: ManifestRetention) {
    let blocks = keys.iter().map(|k| (0, k.clone(), payload(k))).collect();
    tier.commit(manifest(agent, keys, retention), blocks, Instant::now()).unwrap();
    assert!(tier.flush(Duration::from_secs(10)));
}

/// Loads `keys` and collects the results in order.
fn load(tier: &DiskTier, rx: &mpsc::Receiver<TierEvent>, keys: &[BlockKey]) -> Vec<Result<Payload, Reject>> {
    common::load(tier, rx, 7, keys)
}

#[test]
fn committed_blocks_come_back_exactly_after_a_reopen() {
    let s = Store::new();
    let keys = chain(1, 5);
    {
        let (o, rx) = s.open(1 << 30);
        assert_eq!((o.blocks, o.agents.len()), (0, 0));
        commit(&o.tier, "a", &keys, ManifestRetention::Evictable);
        for (k, r) in keys.iter().zip(load(&o.tier, &rx, &keys)) {
            assert_eq!(r.unwrap().bytes(), &payload(k)[..]);
        }
        o.tier.check_invariants().unwrap();
    }
    let (o, rx) = s.open(1 << 30);
    assert_eq!(o.blocks, 5);
    assert_eq!(o.agents, vec![manifest("a", &keys, ManifestRetention::Evictable)]);
    for (k, r) in keys.iter().zip(load(&o.tier, &rx, &keys)) {
        assert_eq!(r.unwrap().bytes(), &payload(k)[..]);
    }
    let st = o.tier.stats();
    assert_eq!((st.blocks, st.agents, st.read_blocks, st.rejected_total()), (5, 1, 5, 0));
}

#[cfg(unix)]
#[test]
fn the_cache_dir_is_0700_and_files_0600_named_by_hashes_only() {
    use std::os::unix::fs::PermissionsExt;
    let s = Store::new();
    let (o, _rx) = s.open(1 << 30);
    commit(&o.tier, "client-chosen/../name", &chain(2, 1), ManifestRetention::Evictable);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&s.root), 0o700);
    assert_eq!(mode(&s.store_dir()), 0o700);
    for sub in ["blocks", "agents"] {
        let d = s.store_dir().join(sub);
        assert_eq!(mode(&d), 0o700);
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            assert_eq!(mode(&e.path()), 0o600);
            let name = e.file_name().into_string().unwrap();
            let stem = name.split(['-', '.']).next().unwrap();
            assert!(stem.len() == 32 && stem.bytes().all(|b| b.is_ascii_hexdigit()), "{name}");
        }
    }
}

#[test]
fn the_budget_evicts_least_recently_used_records_never_pinned_ones() {
    let s = Store::new();
    let record = (tiers::record::header_len(BS) + PAYLOAD) as u64;
    let (o, rx) = s.open(6 * record);
    let pinned = chain(3, 2);
    commit(&o.tier, "p", &pinned, ManifestRetention::Pinned);
    let plain = chain(4, 6);
    for k in &plain {
        o.tier.demote(0, k.clone(), payload(k));
        assert!(o.tier.flush(Duration::from_secs(10)));
    }
    let st = o.tier.stats();
    assert!(st.bytes <= 6 * record && st.blocks == 6, "{st:?}");
    assert_eq!(st.evictions, 2);
    assert_eq!(st.pinned_bytes, 2 * record);
    // Both evictions were told, without payloads: nobody asked for them.
    let told: Vec<_> = rx
        .try_iter()
        .filter_map(|e| match e {
            TierEvent::Evicted { gone, blocks } => Some((gone, blocks.len())),
            _ => None,
        })
        .collect();
    let gone: Vec<RecordKey> = told.iter().flat_map(|(g, _)| g.iter().copied()).collect();
    assert_eq!(gone, vec![RecordKey::new(0, plain[0].hash), RecordKey::new(0, plain[1].hash)]);
    assert!(told.iter().all(|(_, n)| *n == 0));
    // The pinned agent's blocks are all there; the oldest plain ones went.
    assert!(load(&o.tier, &rx, &pinned).iter().all(Result::is_ok));
    let present = o.tier.present(&plain.iter().map(|k| RecordKey::new(0, k.hash)).collect::<Vec<_>>());
    assert_eq!(present, vec![false, false, true, true, true, true]);
    assert!(!s.record_path(&plain[0]).exists());
    o.tier.check_invariants().unwrap();
}

#[test]
fn evictions_asked_for_come_back_whole_for_the_tier_below() {
    let s = Store::new();
    let record = (tiers::record::header_len(BS) + PAYLOAD) as u64;
    let (mut o, rx) = s.open(3 * record);
    Tier::pass_evictions(&mut o.tier, true);
    let keys = chain(5, 5);
    for k in &keys {
        o.tier.demote(0, k.clone(), payload(k));
        assert!(o.tier.flush(Duration::from_secs(10)));
    }
    let mut passed = Vec::new();
    for e in rx.try_iter() {
        if let TierEvent::Evicted { gone, blocks } = e {
            assert_eq!(gone.len(), blocks.len(), "every victim read back whole");
            passed.extend(blocks);
        }
    }
    assert_eq!(passed.len(), 2);
    for (b, k) in passed.iter().zip(&keys) {
        assert_eq!((b.group, &b.key), (0, k), "oldest first, exactly the block");
        assert_eq!(b.payload, payload(k));
    }
    assert!(!s.record_path(&keys[0]).exists() && !s.record_path(&keys[1]).exists());
    o.tier.check_invariants().unwrap();
}

#[test]
fn deleting_an_agent_removes_its_manifest_and_the_records_only_it_named() {
    let s = Store::new();
    let shared = chain(5, 2);
    let mut a = shared.clone();
    a.extend(chain(6, 2));
    let mut b = shared.clone();
    b.extend(chain(7, 1));
    {
        let (o, _rx) = s.open(1 << 30);
        commit(&o.tier, "a", &a, ManifestRetention::Evictable);
        commit(&o.tier, "b", &b, ManifestRetention::Evictable);
        let (tx, done) = mpsc::channel();
        o.tier.delete_agent(
            ManifestId::of("tenant", "a"),
            Some(Box::new(move |r: Result<(), String>| tx.send(r).unwrap())),
        );
        done.recv_timeout(Duration::from_secs(10)).unwrap().expect("a durable deletion");
        assert!(!o.tier.has_agent(&ManifestId::of("tenant", "a")));
    }
    let (o, _rx) = s.open(1 << 30);
    assert_eq!(o.agents.len(), 1);
    assert_eq!(o.agents[0].agent, "b");
    assert_eq!(o.blocks, 3, "b's three records stay, a's own two are gone");
    assert!(!s.record_path(&a[2]).exists() && s.record_path(&shared[0]).exists());
}

#[test]
fn a_delete_queued_after_a_commit_always_wins() {
    let s = Store::new();
    let (o, _rx) = s.open(1 << 30);
    let keys = chain(8, 3);
    // Commit and delete queued back to back, before the writer runs them.
    let blocks = keys.iter().map(|k| (0, k.clone(), payload(k))).collect();
    o.tier.commit(manifest("a", &keys, ManifestRetention::Evictable), blocks, Instant::now()).unwrap();
    o.tier.delete_agent(ManifestId::of("tenant", "a"), None);
    assert!(o.tier.flush(Duration::from_secs(10)));
    drop(o);
    let (o, _rx) = s.open(1 << 30);
    assert!(o.agents.is_empty());
    assert_eq!(o.blocks, 0);
}

/// Writes one record, then damages its file with `f`.
fn damaged(f: impl FnOnce(&mut Vec<u8>)) -> (Store, BlockKey) {
    let s = Store::new();
    let k = chain(9, 1).remove(0);
    {
        let (o, _rx) = s.open(1 << 30);
        o.tier.demote(0, k.clone(), payload(&k));
        assert!(o.tier.flush(Duration::from_secs(10)));
    }
    let path = s.record_path(&k);
    let mut b = std::fs::read(&path).unwrap();
    f(&mut b);
    std::fs::write(&path, b).unwrap();
    (s, k)
}

#[test]
fn bit_flips_are_rejected_counted_and_deleted() {
    for at in [3usize, 20, 60, 100, 4096, 4096 + PAYLOAD - 1] {
        let (s, k) = damaged(|b| b[at] ^= 0x01);
        let (o, rx) = s.open(1 << 30);
        let r = load(&o.tier, &rx, std::slice::from_ref(&k)).remove(0);
        assert!(matches!(r, Err(ref e) if e.is_corrupt()), "flip at {at}: {r:?}");
        assert!(!s.record_path(&k).exists(), "deleted");
        assert_eq!(o.tier.stats().rejected_total(), 1);
        assert_eq!(load(&o.tier, &rx, &[k]).remove(0), Err(Reject::Missing), "a miss from then on");
    }
}

#[test]
fn truncated_and_zero_length_records_are_dropped_at_start() {
    for len in [0usize, 100, 4096, 4096 + PAYLOAD - 1] {
        let (s, k) = damaged(|b| b.truncate(len));
        let (o, rx) = s.open(1 << 30);
        assert_eq!((o.blocks, o.rejected), (0, 1), "len {len}");
        assert!(!s.record_path(&k).exists());
        assert_eq!(load(&o.tier, &rx, &[k]).remove(0), Err(Reject::Missing));
    }
}

#[test]
fn a_misfiled_record_is_another_blocks_and_rejected() {
    let s = Store::new();
    let keys = chain(10, 2);
    {
        let (o, _rx) = s.open(1 << 30);
        o.tier.demote(0, keys[0].clone(), payload(&keys[0]));
        assert!(o.tier.flush(Duration::from_secs(10)));
    }
    // Block 0's record under block 1's name.
    std::fs::rename(s.record_path(&keys[0]), s.record_path(&keys[1])).unwrap();
    let (o, rx) = s.open(1 << 30);
    let r = load(&o.tier, &rx, &keys[1..]).remove(0);
    assert_eq!(r, Err(Reject::OtherBlock { what: "address" }));
}

#[test]
fn another_models_or_layouts_records_are_never_read() {
    let s = Store::new();
    let k = chain(11, 1).remove(0);
    {
        let (o, _rx) = s.open(1 << 30);
        o.tier.demote(0, k.clone(), payload(&k));
        assert!(o.tier.flush(Duration::from_secs(10)));
    }
    // Another fingerprint (another model, block size or dtype) opens its own
    // directory: nothing of the first is indexed.
    let other = common::fp(b"retrained-model");
    let sink: tiers::EventSink = Arc::new(|_| {});
    let o = DiskTier::open(s.config(1 << 30), other, BS, PAYLOAD, Arc::clone(&sink)).unwrap();
    assert_eq!(o.blocks, 0);
    drop(o);
    // And a record copied across into it fails the header check.
    let target = s.root.join(other.hex()).join("blocks").join(RecordKey::new(0, k.hash).file_name());
    std::fs::copy(s.record_path(&k), &target).unwrap();
    let (events, rx) = common::sink();
    let o = DiskTier::open(s.config(1 << 30), other, BS, PAYLOAD, events).unwrap();
    assert_eq!(load(&o.tier, &rx, &[k]).remove(0), Err(Reject::Fingerprint));
}

#[test]
fn leftover_temporary_files_are_removed_at_start() {
    let s = Store::new();
    {
        let (o, _rx) = s.open(1 << 30);
        commit(&o.tier, "a", &chain(12, 1), ManifestRetention::Evictable);
    }
    for (sub, name) in [("blocks", ".x.kvb.tmp-1-1"), ("agents", ".y.kva.tmp-1-2")] {
        std::fs::write(s.store_dir().join(sub).join(name), b"half a write").unwrap();
    }
    let (o, _rx) = s.open(1 << 30);
    assert_eq!((o.temps_removed, o.blocks, o.agents.len()), (2, 1, 1));
}

#[test]
fn a_corrupt_manifest_is_dropped_and_the_others_load() {
    let s = Store::new();
    {
        let (o, _rx) = s.open(1 << 30);
        commit(&o.tier, "a", &chain(13, 1), ManifestRetention::Evictable);
        commit(&o.tier, "b", &chain(14, 1), ManifestRetention::Pinned);
    }
    let path = s.store_dir().join("agents").join(ManifestId::of("tenant", "a").file_name());
    let mut b = std::fs::read(&path).unwrap();
    b[50] ^= 0xff;
    std::fs::write(&path, b).unwrap();
    let (o, _rx) = s.open(1 << 30);
    assert_eq!(o.agents.len(), 1);
    assert_eq!(o.agents[0].agent, "b");
    assert_eq!(o.rejected, 1);
    assert!(!path.exists());
}

#[test]
fn a_second_live_process_on_the_same_store_is_refused_and_a_dead_ones_lock_is_free() {
    let s = Store::new();
    let (o, _rx) = s.open(1 << 30);
    let sink: tiers::EventSink = Arc::new(|_| {});
    match DiskTier::open(s.config(1 << 30), fp(), BS, PAYLOAD, Arc::clone(&sink)) {
        Err(Error::Locked { dir }) => assert_eq!(dir, s.store_dir()),
        other => panic!("expected Locked, got {other:?}"),
    }
    drop(o);
    assert!(DiskTier::open(s.config(1 << 30), fp(), BS, PAYLOAD, sink).is_ok());
}

#[test]
fn two_writers_of_the_same_blocks_and_readers_racing_evictions_stay_consistent() {
    let s = Store::new();
    let record = (tiers::record::header_len(BS) + PAYLOAD) as u64;
    // Room for 8 records while 16 distinct blocks are written over and over:
    // evictions run all the time, under the readers.
    let (o, rx) = s.open(8 * record);
    let tier = Arc::new(o.tier);
    let keys = Arc::new(chain(15, 16));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (tier, keys, stop) = (Arc::clone(&tier), Arc::clone(&keys), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut i = w;
                while !stop.load(Ordering::SeqCst) {
                    let k = &keys[i % keys.len()];
                    tier.demote(0, k.clone(), payload(k));
                    i += 3;
                }
            })
        })
        .collect();
    let mut loaded = 0;
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut round = 0;
    while Instant::now() < deadline {
        round += 1;
        let tasks = keys
            .iter()
            .enumerate()
            .map(|(i, k)| LoadTask { load: round, index: i, group: 0, expected: k.clone() })
            .collect();
        tier.load(tasks);
        let mut left = keys.len();
        while left > 0 {
            match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
                TierEvent::Loaded { index, result, .. } => match result {
                    Ok(p) => {
                        assert_eq!(p.bytes(), &payload(&keys[index])[..], "a load returned another block's bytes");
                        loaded += 1;
                        left -= 1;
                    }
                    Err(r) => {
                        assert!(!r.is_corrupt(), "a race produced a corrupt read: {r}");
                        left -= 1;
                    }
                },
                TierEvent::Evicted { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    assert!(tier.flush(Duration::from_secs(10)));
    tier.check_invariants().unwrap();
    let st = tier.stats();
    assert!(loaded > 0 && st.evictions > 0, "{loaded} loaded, {st:?}");
    assert!(st.bytes <= 8 * record);
    // The index and the directory agree.
    let files = std::fs::read_dir(s.store_dir().join("blocks")).unwrap().count();
    assert_eq!(files as u64, st.blocks);
}

/// Real files that can fill up: while `full`, a write leaves a partial
/// file and fails with ENOSPC, as a real full disk does.
fn full_disk(full: Arc<AtomicBool>) -> HookedFs {
    HookedFs::new().on_write(move |path, parts| {
        full.load(Ordering::SeqCst).then(|| {
            let _ = StdFs.write_new(path, &[&parts[0][..parts[0].len().min(100)]]);
            Err(io::Error::from_raw_os_error(28))
        })
    })
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn enospc_degrades_the_tier_without_leftovers_and_it_resumes_when_space_returns() {
    let s = Store::new();
    let full = Arc::new(AtomicBool::new(false));
    let (o, rx) = s.open_with(DiskConfig { fs: Arc::new(full_disk(Arc::clone(&full))), ..s.config(1 << 30) });
    full.store(true, Ordering::SeqCst);
    let keys = chain(16, 3);
    let blocks = keys.iter().map(|k| (0, k.clone(), payload(k))).collect();
    o.tier.commit(manifest("a", &keys, ManifestRetention::Evictable), blocks, Instant::now()).unwrap();
    assert!(o.tier.flush(Duration::from_secs(10)));
    let st = o.tier.stats();
    assert!(st.degraded.as_deref().is_some_and(|r| r.contains("No space left")), "{st:?}");
    assert_eq!((st.blocks, st.failed_commits), (0, 1));
    assert!(matches!(rx.try_recv(), Ok(TierEvent::CommitFailed { .. })));
    // While degraded, demotions are dropped at once.
    assert_eq!(o.tier.demote(0, keys[0].clone(), payload(&keys[0])), tiers::Demotion::Dropped);
    full.store(false, Ordering::SeqCst);
    wait_until("the tier to resume", || o.tier.degraded().is_none());
    commit(&o.tier, "a", &keys, ManifestRetention::Evictable);
    assert_eq!(o.tier.stats().blocks, 3);
    for sub in ["blocks", "agents"] {
        for e in std::fs::read_dir(s.store_dir().join(sub)).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            assert!(!name.contains(".tmp-"), "{name} left behind");
        }
    }
}

#[test]
fn a_vanished_directory_degrades_the_tier_and_it_comes_back_by_itself() {
    let s = Store::new();
    let (o, _rx) = s.open(1 << 30);
    commit(&o.tier, "a", &chain(17, 1), ManifestRetention::Evictable);
    std::fs::remove_dir_all(&s.root).unwrap();
    let k = chain(18, 1).remove(0);
    o.tier.demote(0, k.clone(), payload(&k));
    assert!(o.tier.flush(Duration::from_secs(10)));
    assert!(o.tier.degraded().is_some());
    // The writer recreates the directories (and re-takes the lock) on its own.
    wait_until("the tier to resume", || o.tier.degraded().is_none());
    commit(&o.tier, "b", &chain(19, 2), ManifestRetention::Evictable);
    assert!(s.store_dir().join("LOCK").exists());
    let sink: tiers::EventSink = Arc::new(|_| {});
    assert!(
        matches!(DiskTier::open(s.config(1 << 30), fp(), BS, PAYLOAD, sink), Err(Error::Locked { .. })),
        "the recreated directory is locked again"
    );
}

/// Only where the test may mount a tmpfs (root, as on these machines): a
/// real ENOSPC from the kernel, not an injected one.
#[cfg(target_os = "linux")]
#[test]
fn a_really_full_tmpfs_degrades_the_tier_and_freed_space_resumes_it() {
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("small");
    std::fs::create_dir(&mount).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&mount)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("cannot mount a tmpfs here (not root?): the injected-ENOSPC test covers this path");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.clone());
    let filler = mount.join("filler");
    std::fs::write(&filler, vec![0u8; 200 << 10]).unwrap();
    let sink: tiers::EventSink = Arc::new(|_| {});
    let config = DiskConfig { retry: Duration::from_millis(50), ..DiskConfig::new(mount.join("kv"), 1 << 30) };
    let o = DiskTier::open(config, fp(), BS, PAYLOAD, sink).unwrap();
    let keys = chain(20, 8);
    for k in &keys {
        o.tier.demote(0, k.clone(), payload(k));
    }
    assert!(o.tier.flush(Duration::from_secs(10)));
    let reason = o.tier.degraded().expect("degraded by a real ENOSPC");
    assert!(reason.contains("No space left"), "{reason}");
    std::fs::remove_file(&filler).unwrap();
    wait_until("the tier to resume", || o.tier.degraded().is_none());
    o.tier.demote(0, keys[0].clone(), payload(&keys[0]));
    assert!(o.tier.flush(Duration::from_secs(10)));
    assert!(o.tier.stats().blocks >= 1);
}

#[test]
fn a_full_write_queue_drops_demotions_without_ever_blocking_the_caller() {
    let s = Store::new();
    // A busy disk: every write takes 50 ms.
    let slow = HookedFs::new().on_write(|_, _| {
        std::thread::sleep(Duration::from_millis(50));
        None
    });
    let config = DiskConfig { fs: Arc::new(slow), queue_bytes: 2 * PAYLOAD as u64, ..s.config(1 << 30) };
    let (o, _rx) = s.open_with(config);
    let keys = chain(21, 40);
    let started = Instant::now();
    let outcomes: Vec<tiers::Demotion> = keys.iter().map(|k| o.tier.demote(0, k.clone(), payload(k))).collect();
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "demoting never waits for the disk: {:?}",
        started.elapsed()
    );
    let dropped = outcomes.iter().filter(|d| **d == tiers::Demotion::Dropped).count();
    assert!(dropped > 0, "{outcomes:?}");
    assert!(o.tier.flush(Duration::from_secs(30)));
    let st = o.tier.stats();
    assert_eq!(st.dropped_writes as usize, dropped);
    assert_eq!(st.blocks as usize, keys.len() - dropped, "every queued demotion was written");
    // A dropped block is not claimed: it can be queued again later.
    let first_dropped = outcomes.iter().position(|d| *d == tiers::Demotion::Dropped).unwrap();
    let k = &keys[first_dropped];
    assert_eq!(o.tier.demote(0, k.clone(), payload(k)), tiers::Demotion::Queued);
    o.tier.check_invariants().unwrap();
}

/// `kvserve cache`'s work: a store lists its agents; clearing one agent
/// keeps the records another agent names; clearing is refused while a
/// tier holds the store; a whole store goes.
#[test]
fn a_store_lists_its_agents_and_clears_one_without_touching_shared_records() {
    use tiers::disk::stores;
    let s = Store::new();
    let shared = chain(60, 2);
    let mut a = shared.clone();
    a.extend(chain(61, 2));
    let mut b = shared.clone();
    b.extend(chain(62, 1));
    {
        let config = DiskConfig { label: "test model".into(), ..s.config(1 << 30) };
        let (o, _rx) = s.open_with(config);
        commit(&o.tier, "a", &a, ManifestRetention::Evictable);
        commit(&o.tier, "b", &b, ManifestRetention::Pinned);
        let listed = stores::list(&s.root).unwrap();
        assert_eq!(listed.len(), 1);
        assert!(listed[0].in_use);
        assert!(matches!(stores::clear_agent(&listed[0].dir, "tenant", "a"), Err(Error::Locked { .. })));
    }
    let listed = stores::list(&s.root).unwrap();
    let st = &listed[0];
    assert_eq!((st.label.as_str(), st.records, st.agents.len(), st.in_use), ("test model", 5, 2, false));
    assert_eq!(stores::clear_agent(&st.dir, "tenant", "a").unwrap(), Some(2), "only a's own two records");
    assert_eq!(stores::clear_agent(&st.dir, "tenant", "a").unwrap(), None);
    let (o, rx) = s.open(1 << 30);
    assert_eq!(o.agents.iter().map(|m| m.agent.as_str()).collect::<Vec<_>>(), ["b"]);
    assert!(load(&o.tier, &rx, &b).iter().all(Result::is_ok), "b's chain, shared part included, is whole");
    drop(o);
    assert!(stores::clear_store(&st.dir).unwrap() > 0);
    assert!(stores::list(&s.root).unwrap().is_empty());
}
