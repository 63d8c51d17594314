//! The remote tier against a real `redis-server` (one per test, on a free
//! loopback port, no persistence): round trips, chains that stop at a miss,
//! `SET NX`, corrupt values, manifests across replicas and turns, a store
//! that dies and comes back, concurrent replicas, credentials in URLs.
//!
//! `redis-server` must be on PATH (Debian: `apt-get install redis-server`);
//! without it these tests fail, they never skip.
#![cfg(not(loom))]
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kv::BlockKey;
use tiers::{
    AgentManifest, Error, LoadTask, Loading, ManifestId, ManifestRetention, Payload, RecordKey, Reject, RemoteConfig,
    RemoteTier, StoreFingerprint, Stored, Tier, TierEvent,
};

use common::{ns, sink, BS};

const PAYLOAD: usize = 3 * 4096;
/// Every wait in these tests is bounded by this.
const WAIT: Duration = Duration::from_secs(10);

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

fn rk(k: &BlockKey) -> RecordKey {
    RecordKey::new(0, k.hash)
}

/// The documented key of a block record.
fn block_key(k: &BlockKey) -> String {
    format!("kvs:{}:{{{}}}:g0", fp().hex(), k.hash)
}

/// The documented key of a manifest.
fn manifest_key(id: &ManifestId) -> String {
    format!("kvs:{}:a:{{{}}}", fp().hex(), id.hex())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `redis-server` child process, killed on drop.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Self {
        let mut r = Self { child: None, port: free_port(), dir: tempfile::tempdir().unwrap() };
        r.restart();
        r
    }

    /// Starts the server (again) on the same port, and waits until it
    /// answers PING.
    fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.child = Some(spawn_redis(self.port, self.dir.path()));
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(mut c) = self.try_raw() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("redis-server on port {} exited at start: {status}", self.port);
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING within {WAIT:?}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn try_raw(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection_with_timeout(Duration::from_secs(1))
    }

    /// A plain connection, to look at and tamper with what the tier wrote.
    fn raw(&self) -> redis::Connection {
        self.try_raw().unwrap()
    }

    /// `kill -9`.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn_redis(port: u16, dir: &Path) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "these tests need a real redis-server on PATH (Debian: apt-get install redis-server), \
                 and starting it failed: {e}"
            )
        })
}

fn open(url: &str) -> (RemoteTier, mpsc::Receiver<TierEvent>) {
    open_with(RemoteConfig::new(url))
}

fn open_with(config: RemoteConfig) -> (RemoteTier, mpsc::Receiver<TierEvent>) {
    let (sink, rx) = sink();
    (RemoteTier::open(config, fp(), BS, PAYLOAD, sink).unwrap(), rx)
}

fn store_all(tier: &mut RemoteTier, keys: &[BlockKey]) {
    for k in keys {
        let got = tier.store(0, k.clone(), payload(k));
        assert!(matches!(got, Stored::Queued), "{got:?} {:?}", tier.stats());
    }
    assert!(tier.flush(WAIT), "writes done within {WAIT:?}");
}

/// Loads `keys` (as load `load`) and collects the results in order; every
/// task must be answered within [`WAIT`].
fn load(
    tier: &mut RemoteTier,
    rx: &mpsc::Receiver<TierEvent>,
    load: u64,
    keys: &[BlockKey],
) -> Vec<Result<Payload, Reject>> {
    let tasks =
        keys.iter().enumerate().map(|(i, k)| LoadTask { load, index: i, group: 0, expected: k.clone() }).collect();
    assert!(matches!(tier.load(tasks), Loading::Queued));
    let mut out: Vec<Option<Result<Payload, Reject>>> = (0..keys.len()).map(|_| None).collect();
    let deadline = Instant::now() + WAIT;
    while out.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(TierEvent::Loaded { load: l, index, result }) if l == load => {
                assert!(out[index].is_none(), "task {index} answered twice");
                out[index] = Some(result);
            }
            Ok(TierEvent::CommitFailed { .. }) => {}
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => panic!("load {load} not answered within {WAIT:?}: {e}"),
        }
    }
    out.into_iter().map(Option::unwrap).collect()
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    loop {
        if f() {
            return Some(started.elapsed());
        }
        if started.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn manifest(agent: &str, keys: &[BlockKey], turns: u64) -> AgentManifest {
    AgentManifest {
        tenant: "tenant".into(),
        agent: agent.into(),
        ns: ns(),
        retention: ManifestRetention::Evictable,
        priority: 0,
        turns,
        last_used_unix_ms: 1_700_000_000_000 + turns,
        tokens: keys.iter().flat_map(|k| k.tokens.iter().copied()).collect(),
        blocks: keys.iter().map(rk).collect(),
        tail: None,
    }
}

fn blocks_of(keys: &[BlockKey]) -> Vec<(u8, BlockKey, Vec<u8>)> {
    keys.iter().map(|k| (0, k.clone(), payload(k))).collect()
}

#[test]
fn a_stored_chain_loads_back_bit_exact_on_this_and_another_replica() {
    let redis = Redis::start();
    let (mut a, rx_a) = open(&redis.url());
    assert_eq!(a.degraded(), None);
    let keys = chain(1, 5);
    store_all(&mut a, &keys);
    assert_eq!(a.known(&keys.iter().map(rk).collect::<Vec<_>>()), vec![true; 5]);
    for (k, r) in keys.iter().zip(load(&mut a, &rx_a, 1, &keys)) {
        assert_eq!(r.unwrap().bytes(), &payload(k)[..]);
    }
    // Another replica, which never saw these blocks.
    let (mut b, rx_b) = open(&redis.url());
    assert_eq!(b.holds(&keys.iter().map(rk).collect::<Vec<_>>()), vec![true; 5], "optimistic");
    assert_eq!(b.known(&keys.iter().map(rk).collect::<Vec<_>>()), vec![false; 5]);
    for (k, r) in keys.iter().zip(load(&mut b, &rx_b, 7, &keys)) {
        assert_eq!(r.unwrap().bytes(), &payload(k)[..]);
    }
    assert_eq!(b.known(&keys.iter().map(rk).collect::<Vec<_>>()), vec![true; 5], "read blocks are known");
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!((sa.written_blocks, sa.read_blocks, sb.read_blocks), (5, 5, 5));
    assert_eq!(sb.read_bytes, 5 * PAYLOAD as u64);
    assert!(sb.fetch_latency.count() >= 1);
    let snap = b.snapshot();
    assert_eq!((snap.name, snap.degraded.clone()), ("remote", None));
    assert!(snap.remote.is_some_and(|r| r.connected));
}

#[test]
fn a_chain_stops_at_the_first_miss_and_the_miss_is_negative_cached() {
    let redis = Redis::start();
    let (mut tier, rx) =
        open_with(RemoteConfig { negative_ttl: Duration::from_millis(300), ..RemoteConfig::new(redis.url()) });
    let keys = chain(2, 5);
    let stored: Vec<BlockKey> = keys.iter().enumerate().filter(|(i, _)| *i != 2).map(|(_, k)| k.clone()).collect();
    store_all(&mut tier, &stored);
    let got = load(&mut tier, &rx, 1, &keys);
    assert!(got[0].is_ok() && got[1].is_ok());
    for (i, r) in got.iter().enumerate().skip(2) {
        assert_eq!(r.as_ref().err(), Some(&Reject::Missing), "block {i}");
    }
    let s = tier.stats();
    assert_eq!((s.read_blocks, s.misses), (2, 1), "blocks past the miss are not fetched");
    assert_eq!(tier.holds(&[rk(&keys[2]), rk(&keys[3])]), vec![false, true], "only the miss is negative-cached");

    // A second load is cut at the cached miss without asking the store.
    let got = load(&mut tier, &rx, 2, &keys);
    assert!(got[1].is_ok() && got[2..].iter().all(|r| r.as_ref().err() == Some(&Reject::Missing)));
    let s = tier.stats();
    assert_eq!(s.misses, 1, "no second round trip for the miss");
    assert!(s.negative_cache_hits >= 2);

    // The negative cache forgets; and a write of the block clears it.
    assert!(wait_until(WAIT, || tier.holds(&[rk(&keys[2])]) == vec![true]).is_some());
    let _ = load(&mut tier, &rx, 3, &keys[2..3]);
    assert_eq!(tier.holds(&[rk(&keys[2])]), vec![false]);
    store_all(&mut tier, &keys[2..3]);
    assert_eq!(tier.holds(&[rk(&keys[2])]), vec![true]);
    assert!(load(&mut tier, &rx, 4, &keys).iter().all(Result::is_ok));
}

#[test]
fn set_nx_never_overwrites_a_stored_block() {
    let redis = Redis::start();
    let (mut a, _rx_a) = open(&redis.url());
    let (mut b, rx_b) = open(&redis.url());
    let k = chain(3, 1).remove(0);
    store_all(&mut a, std::slice::from_ref(&k));
    assert!(matches!(a.store(0, k.clone(), payload(&k)), Stored::Known), "this process wrote it");
    let before: Vec<u8> = redis::cmd("GET").arg(block_key(&k)).query(&mut redis.raw()).unwrap();

    // Another replica offers a different (valid) payload for the same key.
    let other: Vec<u8> = payload(&k).iter().map(|b| b ^ 0x5a).collect();
    assert!(matches!(b.store(0, k.clone(), other), Stored::Queued));
    assert!(b.flush(WAIT));
    assert_eq!((b.stats().existing, b.stats().written_blocks), (1, 0));
    let after: Vec<u8> = redis::cmd("GET").arg(block_key(&k)).query(&mut redis.raw()).unwrap();
    assert_eq!(before, after, "the first write stays");
    let got = load(&mut b, &rx_b, 1, std::slice::from_ref(&k));
    assert_eq!(got[0].as_ref().unwrap().bytes(), &payload(&k)[..]);
    let ttl: i64 = redis::cmd("PTTL").arg(block_key(&k)).query(&mut redis.raw()).unwrap();
    assert!(ttl > 23 * 3600 * 1000, "the block carries the TTL: {ttl} ms");
}

#[test]
fn corrupt_and_truncated_values_are_rejected_deleted_and_counted() {
    let redis = Redis::start();
    let (mut tier, rx) = open(&redis.url());
    let flipped = chain(4, 1).remove(0);
    let truncated = chain(5, 1).remove(0);
    let header = chain(6, 1).remove(0);
    store_all(&mut tier, &[flipped.clone(), truncated.clone(), header.clone()]);
    let mut raw = redis.raw();
    let get = |raw: &mut redis::Connection, k: &BlockKey| -> Vec<u8> {
        redis::cmd("GET").arg(block_key(k)).query(raw).unwrap()
    };
    let mut v = get(&mut raw, &flipped);
    let last = v.len() - 1;
    v[last] ^= 0x01;
    let () = redis::cmd("SET").arg(block_key(&flipped)).arg(v).query(&mut raw).unwrap();
    let v = get(&mut raw, &truncated);
    let () = redis::cmd("SET").arg(block_key(&truncated)).arg(&v[..v.len() / 2]).query(&mut raw).unwrap();
    let mut v = get(&mut raw, &header);
    v[50] ^= 0x80; // inside the address
    let () = redis::cmd("SET").arg(block_key(&header)).arg(v).query(&mut raw).unwrap();

    let r = load(&mut tier, &rx, 1, std::slice::from_ref(&flipped)).remove(0);
    assert_eq!(r.err(), Some(Reject::PayloadChecksum));
    let r = load(&mut tier, &rx, 2, std::slice::from_ref(&truncated)).remove(0);
    assert!(r.as_ref().is_err_and(Reject::is_corrupt), "{r:?}");
    let r = load(&mut tier, &rx, 3, std::slice::from_ref(&header)).remove(0);
    assert_eq!(r.err(), Some(Reject::HeaderChecksum));
    for k in [&flipped, &truncated, &header] {
        let exists: i64 = redis::cmd("EXISTS").arg(block_key(k)).query(&mut raw).unwrap();
        assert_eq!(exists, 0, "a rejected value is deleted");
    }
    let s = tier.stats();
    assert_eq!(s.rejected_total(), 3);
    assert_eq!(s.rejected.get("payload_checksum"), Some(&1));
    assert_eq!(s.rejected.get("header_checksum"), Some(&1));
    assert_eq!(s.read_blocks, 0);
    // A rejected block is not known: the next demotion writes it again.
    assert!(matches!(tier.store(0, flipped.clone(), payload(&flipped)), Stored::Queued));
    assert!(tier.flush(WAIT));
    assert!(load(&mut tier, &rx, 4, &[flipped]).remove(0).is_ok());
}

#[test]
fn a_manifest_committed_on_one_replica_resumes_on_another() {
    let redis = Redis::start();
    let (mut a, _rx_a) = open(&redis.url());
    let (mut b, rx_b) = open(&redis.url());
    let keys = chain(7, 3);
    let m = manifest("agent-1", &keys, 4);
    a.commit(m.clone(), blocks_of(&keys), Instant::now()).unwrap();
    assert!(a.flush(WAIT));
    assert_eq!(a.durable_turns(&m.id()), Some(4));
    assert_eq!(a.stats().commits, 1);
    assert_eq!(b.durable_turns(&m.id()), None, "only what this process committed");

    assert_eq!(b.manifest(&m.id()).unwrap(), Some(m.clone()));
    assert!(load(&mut b, &rx_b, 1, &keys).iter().all(Result::is_ok), "its blocks were written first");
    assert_eq!(b.manifest(&ManifestId::of("tenant", "nobody")).unwrap(), None);

    // A commit resends only blocks this process does not know.
    let more = chain(7, 4);
    a.commit(manifest("agent-1", &more, 5), blocks_of(&more), Instant::now()).unwrap();
    assert!(a.flush(WAIT));
    assert_eq!(a.stats().written_blocks, 4);
    assert_eq!(b.manifest(&m.id()).unwrap().map(|m| m.turns), Some(5));

    // forget: the manifest goes, the blocks stay (other agents may share them).
    let (tx, rx) = mpsc::channel();
    a.forget(m.id(), &[], Box::new(move |r| tx.send(r).unwrap()));
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), Ok(()));
    assert_eq!(a.durable_turns(&m.id()), None);
    assert_eq!(b.manifest(&m.id()).unwrap(), None);
    assert!(load(&mut b, &rx_b, 2, &more).iter().all(Result::is_ok));
}

#[test]
fn a_bad_manifest_is_deleted_counted_and_reads_as_absent() {
    let redis = Redis::start();
    let (a, _rx) = open(&redis.url());
    let id = ManifestId::of("tenant", "agent-bad");
    let mut raw = redis.raw();
    let () = redis::cmd("HSET")
        .arg(manifest_key(&id))
        .arg("turns")
        .arg(1)
        .arg("data")
        .arg("garbage")
        .query(&mut raw)
        .unwrap();
    assert_eq!(a.manifest(&id).unwrap(), None);
    let exists: i64 = redis::cmd("EXISTS").arg(manifest_key(&id)).query(&mut raw).unwrap();
    assert_eq!(exists, 0);
    // Another agent's (valid) manifest filed under this id.
    let other = manifest("someone-else", &chain(8, 1), 1);
    let () = redis::cmd("HSET")
        .arg(manifest_key(&id))
        .arg("turns")
        .arg(1)
        .arg("data")
        .arg(other.encode(&fp()))
        .query(&mut raw)
        .unwrap();
    assert_eq!(a.manifest(&id).unwrap(), None);
    assert_eq!(a.stats().rejected_total(), 2);
    assert_eq!(a.stats().rejected.get("misfiled"), Some(&1));
}

#[test]
fn an_older_turn_never_replaces_a_newer_manifest() {
    let redis = Redis::start();
    let (mut a, _rx_a) = open(&redis.url());
    let (mut b, _rx_b) = open(&redis.url());
    let keys = chain(9, 2);
    a.commit(manifest("agent-2", &keys, 5), blocks_of(&keys), Instant::now()).unwrap();
    assert!(a.flush(WAIT));
    // A late replica still holding turn 3.
    b.commit(manifest("agent-2", &keys[..1], 3), blocks_of(&keys[..1]), Instant::now()).unwrap();
    assert!(b.flush(WAIT));
    let id = ManifestId::of("tenant", "agent-2");
    let got = b.manifest(&id).unwrap().unwrap();
    assert_eq!((got.turns, got.blocks.len()), (5, 2));
    assert_eq!(b.stats().stale_manifests, 1);
    assert_eq!(b.durable_turns(&id), None, "its commit did not land");
    // A newer turn does replace it.
    b.commit(manifest("agent-2", &keys[..1], 6), Vec::new(), Instant::now()).unwrap();
    assert!(b.flush(WAIT));
    assert_eq!(a.manifest(&id).unwrap().map(|m| m.turns), Some(6));
    assert_eq!(b.durable_turns(&id), Some(6));
}

#[test]
fn a_killed_store_degrades_within_2s_and_nothing_hangs() {
    let mut redis = Redis::start();
    let (mut tier, rx) = open(&redis.url());
    let keys = chain(10, 3);
    store_all(&mut tier, &keys);
    redis.kill();
    let took = wait_until(Duration::from_secs(2), || tier.snapshot().degraded.is_some());
    assert!(took.is_some(), "degraded within 2 s of the store dying");
    let rks: Vec<RecordKey> = keys.iter().map(rk).collect();
    assert_eq!(tier.holds(&rks), vec![false; 3]);
    let fresh = chain(11, 1).remove(0);
    assert!(matches!(tier.store(0, fresh.clone(), payload(&fresh)), Stored::Dropped));
    assert!(tier.commit(manifest("agent-3", &keys, 1), blocks_of(&chain(12, 1)), Instant::now()).is_err());
    let started = Instant::now();
    let got = load(&mut tier, &rx, 1, &keys);
    assert!(got.iter().all(|r| matches!(r, Err(Reject::Unreadable(_)))), "{got:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "answered promptly");
    let (tx, done) = mpsc::channel();
    tier.forget(ManifestId::of("tenant", "agent-3"), &[], Box::new(move |r| tx.send(r).unwrap()));
    assert!(done.recv_timeout(WAIT).unwrap().is_err());
    assert!(matches!(tier.manifest(&ManifestId::of("tenant", "agent-3")), Err(Error::Remote { .. })));
    let s = tier.stats();
    assert!(!s.connected);
    assert!(s.dropped_writes >= 2 && s.errors >= 1, "{s:?}");
}

#[test]
fn a_restarted_store_clears_degraded_within_5s_and_round_trips_work_again() {
    let mut redis = Redis::start();
    let (mut tier, rx) = open(&redis.url());
    store_all(&mut tier, &chain(13, 2));
    redis.kill();
    assert!(wait_until(Duration::from_secs(2), || tier.degraded().is_some()).is_some());
    // Stay down long enough for the reconnects to back off.
    std::thread::sleep(Duration::from_secs(3));
    redis.restart();
    let took = wait_until(Duration::from_secs(5), || tier.degraded().is_none());
    assert!(took.is_some(), "serving again within 5 s of the store's return");
    // The store came back empty (no persistence): write and read again.
    let keys = chain(14, 3);
    store_all(&mut tier, &keys);
    for (k, r) in keys.iter().zip(load(&mut tier, &rx, 1, &keys)) {
        assert_eq!(r.unwrap().bytes(), &payload(k)[..]);
    }
    assert!(tier.stats().reconnects >= 1);
}

#[test]
fn connections_the_store_closed_are_made_again_without_degrading() {
    let redis = Redis::start();
    // No health check during the test: only the calls themselves can
    // notice that their connections are gone.
    let (mut tier, rx) = open_with(RemoteConfig { ping: Duration::from_secs(600), ..RemoteConfig::new(redis.url()) });
    let first = chain(17, 2);
    store_all(&mut tier, &first);
    assert!(load(&mut tier, &rx, 1, &first).iter().all(Result::is_ok));
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query(&mut redis.raw())
        .unwrap();
    assert!(killed >= 2, "the writer's and a reader's connections: {killed}");
    let more = chain(18, 2);
    store_all(&mut tier, &more);
    assert!(load(&mut tier, &rx, 2, &more).iter().all(Result::is_ok));
    let s = tier.stats();
    assert_eq!((s.degraded.clone(), s.written_blocks, s.errors), (None, 4, 0), "{s:?}");
    assert!(s.reconnects >= 1);
}

#[test]
fn a_tier_opened_while_its_store_is_down_serves_once_it_starts() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let (mut tier, rx) = open(&format!("redis://127.0.0.1:{port}"));
    assert!(tier.degraded().is_some(), "opened degraded, not failed");
    let k = chain(15, 1);
    assert!(matches!(tier.store(0, k[0].clone(), payload(&k[0])), Stored::Dropped));
    let mut redis = Redis { child: None, port, dir };
    redis.restart();
    assert!(wait_until(Duration::from_secs(5), || tier.degraded().is_none()).is_some());
    store_all(&mut tier, &k);
    assert!(load(&mut tier, &rx, 1, &k).remove(0).is_ok());
}

#[test]
fn two_replicas_writing_the_same_blocks_at_once_both_leave_them_intact() {
    let redis = Redis::start();
    let keys = chain(16, 48);
    let writers: Vec<_> = (0..2)
        .map(|_| {
            let (mut tier, _rx) = open(&redis.url());
            let keys = keys.clone();
            std::thread::spawn(move || {
                for k in &keys {
                    assert!(matches!(tier.store(0, k.clone(), payload(k)), Stored::Queued));
                    if k.hash == keys[24].hash {
                        tier.commit(manifest("shared", &keys[..1], 1), Vec::new(), Instant::now()).unwrap();
                    }
                }
                assert!(tier.flush(WAIT));
                tier.stats()
            })
        })
        .collect();
    let stats: Vec<_> = writers.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(stats.iter().map(|s| s.written_blocks).sum::<u64>(), 48, "each block written once");
    assert_eq!(stats.iter().map(|s| s.existing).sum::<u64>(), 48, "the other write found it");
    let (mut reader, rx) = open(&redis.url());
    for (k, r) in keys.iter().zip(load(&mut reader, &rx, 1, &keys)) {
        assert_eq!(r.unwrap().bytes(), &payload(k)[..]);
    }
}

#[test]
fn a_password_never_shows_in_errors_logs_or_debug() {
    // Nothing listens on a port just freed: the tier starts degraded.
    let port = free_port();
    let url = format!("redis://user:hunter2@127.0.0.1:{port}/0");
    let config = RemoteConfig::new(url);
    assert!(!format!("{config:?}").contains("hunter2"));
    let (tier, _rx) = open_with(config);
    let reason = tier.degraded().unwrap();
    assert!(!reason.contains("hunter2"), "{reason}");
    assert!(!format!("{tier:?}").contains("hunter2"));
    assert_eq!(tier.url(), format!("redis://***@127.0.0.1:{port}/0"));
    let (events, _rx) = sink();
    let err =
        RemoteTier::open(RemoteConfig::new("redis://:hunter2@host:notaport/0"), fp(), BS, PAYLOAD, events).unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
    assert!(!err.to_string().contains("hunter2"), "{err}");
    let (events, _rx) = sink();
    let zero = RemoteConfig { timeout: Duration::ZERO, ..RemoteConfig::new("redis://127.0.0.1:1") };
    assert!(matches!(RemoteTier::open(zero, fp(), BS, PAYLOAD, events), Err(Error::Config(_))));
}

/// Runs `openssl` (the CLI; Debian's `openssl` package) in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out =
        Command::new("openssl").args(args).current_dir(dir).output().unwrap_or_else(|e| {
            panic!("the TLS test needs the openssl command (Debian: apt-get install openssl): {e}")
        });
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A private CA, and a certificate it signed for 127.0.0.1, in `dir`:
/// `ca.pem`, `server.pem`, `server.key`.
fn private_ca(dir: &Path) {
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
    let run = |line: String| openssl(dir, &line.split(' ').collect::<Vec<_>>());
    run(format!("req -x509 {ec} -keyout ca.key -out ca.pem -days 2 -subj /CN=kvserve-test-ca"));
    run(format!("req {ec} -keyout server.key -out server.csr -subj /CN=127.0.0.1"));
    let ext = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n";
    std::fs::write(dir.join("ext.cnf"), ext).unwrap();
    run("x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile ext.cnf"
        .into());
}

/// `rediss://`: with the private CA that signed the server's certificate
/// the tier reads and writes over TLS; with the system's roots (which do
/// not know that CA) it refuses the server, stays degraded and loads
/// nothing, without failing anything else.
#[test]
fn rediss_checks_the_servers_certificate_and_round_trips_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    private_ca(dir.path());
    let port = free_port();
    let mut server = Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
        .args(["--appendonly", "no", "--tls-auth-clients", "no"])
        .args(["--tls-cert-file", "server.pem", "--tls-key-file", "server.key", "--tls-ca-cert-file", "ca.pem"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (Debian's is built with TLS) on PATH");
    let url = format!("rediss://127.0.0.1:{port}/0");
    let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
    let (mut tier, rx) = open_with(RemoteConfig { ca_pem: Some(ca), ..RemoteConfig::new(url.clone()) });
    let up = wait_until(WAIT, || tier.degraded().is_none());
    assert!(up.is_some(), "connected over TLS: {:?}", tier.stats());
    let keys = chain(40, 3);
    store_all(&mut tier, &keys);
    for (k, r) in keys.iter().zip(load(&mut tier, &rx, 1, &keys)) {
        assert_eq!(r.unwrap().bytes(), &payload(k)[..]);
    }
    // The system's roots do not know the private CA: never connected.
    let (mut untrusting, rx) = open(&url);
    std::thread::sleep(Duration::from_millis(1500));
    let reason = untrusting.degraded().expect("a server whose certificate is not trusted is never used");
    assert!(untrusting.holds(&[rk(&keys[0])]) == vec![false], "nothing presumed while degraded: {reason}");
    assert!(load(&mut untrusting, &rx, 2, &keys).iter().all(Result::is_err));
    // A CA for a plain URL is a mistake said at once.
    let plain = RemoteConfig { ca_pem: Some(b"x".to_vec()), ..RemoteConfig::new("redis://127.0.0.1:1/0") };
    let (sink, _rx) = sink();
    assert!(matches!(RemoteTier::open(plain, fp(), BS, PAYLOAD, sink), Err(Error::Config(_))));
    let _ = server.kill();
    let _ = server.wait();
}
