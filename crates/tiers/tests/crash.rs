//! `kill -9` in the middle of writes, for real: a child process (this test
//! binary, re-run as `crash_child`) commits agents' turns to a disk tier on
//! real files and SIGKILLs itself at a chosen point of the write protocol:
//! after a record's temporary file, halfway through a record or a manifest,
//! before the batch's sync, before a manifest's rename, before or after the
//! directory sync. It prints each commit and deletion once the tier says it
//! is durable. The parent then reopens the store and checks, over many
//! seeded iterations:
//!
//! * every agent whose commit was acknowledged comes back at that turn or a
//!   later one, and every block its manifest names loads and verifies with
//!   exactly the bytes that were written;
//! * every manifest that survived (acknowledged or not) is whole and its
//!   blocks are there (data first, manifest last);
//! * an agent whose deletion was acknowledged never comes back;
//! * no record ever loads with wrong bytes (torn ones are rejected).
//!
//! Bounded by time (about 20 s in all); longer runs: `KVSERVE_CRASH_SECONDS`.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
#![cfg(target_os = "linux")]

mod common;

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{ns, BS};
use kv::BlockKey;
use rand::{Rng, SeedableRng};
use tiers::fs::{Fs, HookedFs, StdFs};
use tiers::{AgentManifest, DiskConfig, DiskTier, ManifestId, ManifestRetention, RecordKey, StoreFingerprint};

const PAYLOAD: usize = 8192;
const AGENTS: u32 = 4;

/// Where in the write protocol the child dies.
const POINTS: [&str; 8] = [
    "mid-block",
    "after-block-temp",
    "mid-manifest",
    "after-manifest-temp",
    "before-sync",
    "before-manifest-rename",
    "before-dir-sync",
    "after-dir-sync",
];

fn fp() -> StoreFingerprint {
    common::fp(b"crash-model")
}

/// Agent `a`'s conversation at turn `t`: two blocks every agent shares (a
/// system prompt), then `t` blocks of its own.
fn conversation(a: u32, t: u32) -> Vec<BlockKey> {
    let mut out: Vec<BlockKey> = Vec::new();
    for i in 0..2 + t {
        let tokens: Vec<u32> = if i < 2 {
            (0..BS as u32).map(|x| 7 + i * 100 + x).collect()
        } else {
            (0..BS as u32).map(|x| 10_000 * (a + 1) + i * 100 + x).collect()
        };
        out.push(BlockKey::new(ns(), out.last().map(|k| k.hash), &tokens));
    }
    out
}

fn payload(k: &BlockKey) -> Vec<u8> {
    common::payload(k, PAYLOAD)
}

fn manifest(a: u32, t: u32) -> AgentManifest {
    let keys = conversation(a, t);
    AgentManifest {
        tenant: "tenant".into(),
        agent: format!("agent-{a}"),
        ns: ns(),
        retention: ManifestRetention::Evictable,
        priority: 0,
        turns: u64::from(t),
        last_used_unix_ms: u64::from(t),
        tokens: keys.iter().flat_map(|k| k.tokens.iter().copied()).collect(),
        blocks: keys.iter().map(|k| RecordKey::new(0, k.hash)).collect(),
        tail: None,
    }
}

/// Counts the operations of the kind `point` names; the `at`-th one is
/// where the process dies.
#[derive(Debug)]
struct CrashPoint {
    point: String,
    at: u32,
    seen: AtomicU32,
}

impl CrashPoint {
    fn hit(&self, point: &str) -> bool {
        point == self.point && self.seen.fetch_add(1, Ordering::SeqCst) + 1 == self.at
    }
}

fn die() -> ! {
    let _ = io::stdout().flush();
    #[allow(unsafe_code)] // the point of the test: an abrupt kill, no destructors
    // SAFETY: kill(2) on our own pid with SIGKILL touches no memory.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    unreachable!("SIGKILL cannot be caught")
}

fn is_manifest(p: &Path) -> bool {
    p.to_string_lossy().contains(".kva")
}

/// Real files, and a SIGKILL of this process at the crash point.
fn crash_fs(c: Arc<CrashPoint>) -> HookedFs {
    let (w, r, s, d) = (Arc::clone(&c), Arc::clone(&c), Arc::clone(&c), c);
    HookedFs::new()
        .on_write(move |path, parts| {
            let kind = if is_manifest(path) { "manifest" } else { "block" };
            if w.hit(&format!("mid-{kind}")) {
                let all = parts.concat();
                let _ = StdFs.write_new(path, &[&all[..all.len() / 2]]);
                die();
            }
            let done = StdFs.write_new(path, parts);
            if done.is_ok() && w.hit(&format!("after-{kind}-temp")) {
                die();
            }
            Some(done)
        })
        .on_rename(move |_, to| {
            if is_manifest(to) && r.hit("before-manifest-rename") {
                die();
            }
            None
        })
        .on_sync_batch(move || {
            if s.hit("before-sync") {
                die();
            }
            None
        })
        .on_sync_dir(move |dir| {
            if !dir.ends_with("agents") {
                return None;
            }
            if d.hit("before-dir-sync") {
                die();
            }
            let done = StdFs.sync_dir(dir);
            if done.is_ok() && d.hit("after-dir-sync") {
                die();
            }
            Some(done)
        })
}

/// The child: commits turns (and some deletions and demotions) until the
/// file system kills it. Does nothing unless run by the parent.
#[test]
#[ignore = "run by kill_9_during_writes_never_loses_a_committed_turn, in a process it kills"]
fn crash_child() {
    let Ok(spec) = std::env::var("KVSERVE_CRASH") else { return };
    let parts: Vec<&str> = spec.split(':').collect();
    let (dir, seed, point, at) =
        (PathBuf::from(parts[0]), parts[1].parse::<u64>().unwrap(), parts[2], parts[3].parse().unwrap());
    let point = Arc::new(CrashPoint { point: point.into(), at, seen: AtomicU32::new(0) });
    let config = DiskConfig { fs: Arc::new(crash_fs(point)), ..DiskConfig::new(dir, 1 << 30) };
    let sink: tiers::EventSink = Arc::new(|_| {});
    let o = DiskTier::open(config, fp(), BS, PAYLOAD, sink).unwrap();
    let tier = o.tier;
    let mut turns = [0u32; AGENTS as usize];
    for m in &o.agents {
        let a: u32 = m.agent.trim_start_matches("agent-").parse().unwrap();
        turns[a as usize] = u32::try_from(m.turns).unwrap();
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = io::stdout();
    for step in 0..40 {
        let a = rng.random_range(0..AGENTS);
        if step % 9 == 8 {
            writeln!(out, "X {a}").unwrap();
            out.flush().unwrap();
            let (tx, rx) = mpsc::channel();
            tier.delete_agent(
                ManifestId::of("tenant", &format!("agent-{a}")),
                Some(Box::new(move |r: Result<(), String>| tx.send(r).unwrap())),
            );
            rx.recv().unwrap().expect("a durable deletion");
            turns[a as usize] = 0;
            writeln!(out, "D {a}").unwrap();
        } else {
            turns[a as usize] += 1;
            let t = turns[a as usize];
            // Announced first: from here on this agent may exist on disk
            // whether or not the commit is acknowledged.
            writeln!(out, "S {a} {t}").unwrap();
            out.flush().unwrap();
            // The blocks the tier may lack (it skips those it has).
            let blocks = conversation(a, t).into_iter().map(|k| (0, k.clone(), payload(&k))).collect();
            tier.commit(manifest(a, t), blocks, Instant::now()).unwrap();
            if rng.random_bool(0.3) {
                let k = conversation(AGENTS + a, 1).pop().unwrap();
                tier.demote(0, k.clone(), payload(&k));
            }
            assert!(tier.flush(Duration::from_secs(30)));
            writeln!(out, "C {a} {t}").unwrap();
        }
        out.flush().unwrap();
    }
}

/// What the parent knows of one agent from the children's reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Known {
    /// The last acknowledged event: `Some(t)` committed at turn `t`,
    /// `None` deleted (or never committed).
    acked: Option<u32>,
    /// A deletion was started after it and not acknowledged.
    delete_pending: bool,
    /// A commit was started after it and not acknowledged.
    commit_pending: bool,
}

/// Runs a child and folds its reports into `known`.
fn run_child(dir: &Path, seed: u64, point: &str, at: u32, known: &mut BTreeMap<u32, Known>) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--ignored", "--nocapture", "--test-threads", "1"])
        .env("KVSERVE_CRASH", format!("{}:{seed}:{point}:{at}", dir.display()))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if std::env::var_os("KVSERVE_CRASH_DEBUG").is_some() {
        eprintln!("--- seed {seed} point {point} at {at} status {:?}\n{stdout}", out.status);
    }
    // Either killed, or it ran out of steps before reaching the point.
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert!(out.status.signal() == Some(9) || out.status.success(), "child: {:?}\n{stdout}", out.status);
    }
    for line in stdout.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (event, a) = match f.as_slice() {
            [e, a, ..] if ["S", "C", "X", "D"].contains(e) => (*e, a.parse::<u32>().unwrap()),
            _ => continue,
        };
        let k = known.entry(a).or_default();
        match event {
            "S" => k.commit_pending = true,
            "X" => k.delete_pending = true,
            "C" => *k = Known { acked: Some(f[2].parse().unwrap()), ..Known::default() },
            _ => *k = Known::default(),
        }
    }
}

#[test]
fn kill_9_during_writes_never_loses_a_committed_turn_nor_loads_a_corrupt_block() {
    let seconds = std::env::var("KVSERVE_CRASH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let started = Instant::now();
    let mut iterations = 0;
    let mut killed_at: BTreeMap<&str, u32> = BTreeMap::new();
    let mut seed = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) || iterations < POINTS.len() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("kv");
        // Two lives per directory: the second child starts from what the
        // first one's crash left.
        let mut known = BTreeMap::new();
        for life in 0..2 {
            let point = POINTS[(seed as usize + life) % POINTS.len()];
            let at = 1 + ((seed * 7 + life as u64 * 13) % 30) as u32;
            run_child(&root, seed * 2 + life as u64, point, at, &mut known);
            *killed_at.entry(point).or_default() += 1;
        }
        check(&root, &known, seed);
        iterations += 1;
        seed += 1;
    }
    eprintln!("{iterations} crash iterations: {killed_at:?}");
}

/// Reopens the store and checks what the module doc promises.
fn check(root: &Path, known: &BTreeMap<u32, Known>, seed: u64) {
    let (sink, rx) = common::sink();
    let o = DiskTier::open(DiskConfig::new(root, 1 << 30), fp(), BS, PAYLOAD, sink).unwrap();
    let found: BTreeMap<u32, &AgentManifest> =
        o.agents.iter().map(|m| (m.agent.trim_start_matches("agent-").parse().unwrap(), m)).collect();
    for (a, k) in known {
        match (k.acked, found.get(a)) {
            // Committed and not being deleted: there, at that turn or later.
            (Some(t), m) if !k.delete_pending => {
                let m = m.unwrap_or_else(|| panic!("seed {seed}: acknowledged agent {a} (turn {t}) is gone: {k:?}"));
                assert!(m.turns >= u64::from(t), "seed {seed}: agent {a} went back from turn {t} to {}", m.turns);
            }
            // Deleted and not being committed again: gone for good.
            (None, m) if !k.commit_pending => assert!(m.is_none(), "seed {seed}: deleted agent {a} came back"),
            _ => {}
        }
    }
    for (a, m) in &found {
        let t = u32::try_from(m.turns).unwrap();
        assert_eq!(**m, manifest(*a, t), "seed {seed}: agent {a}'s manifest is not the one written");
        let keys = conversation(*a, t);
        for (k, r) in keys.iter().zip(common::load(&o.tier, &rx, 1, &keys)) {
            let p =
                r.unwrap_or_else(|e| panic!("seed {seed}: agent {a} turn {t}: a block of a committed manifest: {e}"));
            assert_eq!(p.bytes(), &payload(k)[..]);
        }
    }
    // Any other record the children may have written: right bytes or a miss.
    let all: Vec<BlockKey> = (0..2 * AGENTS).flat_map(|a| conversation(a, 45)).collect();
    for (k, r) in all.iter().zip(common::load(&o.tier, &rx, 2, &all)) {
        if let Ok(p) = r {
            assert_eq!(p.bytes(), &payload(k)[..], "seed {seed}: a record loaded with wrong bytes");
        }
    }
    o.tier.check_invariants().unwrap();
}
