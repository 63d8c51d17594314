//! The tiers below the pool, through the engine, over the fake model (whose
//! every output depends on the K/V it reads back through the block tables,
//! so a wrong payload changes the text): conversations continued from RAM,
//! from disk and after a restart give the tokens of one that never left the
//! pool; loads overlap other work and are not duplicated; corrupt records,
//! slow and full disks are survived; deleted agents stay deleted.

#![allow(clippy::unwrap_used)] // helpers of a test binary: a failed unwrap is a failed test

mod common;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{collect, fake_engine, greedy};
use engine::{
    AgentId, DiskConfig, EngineConfig, EngineHandle, Error, LoadPolicy, Prompt, Request, SamplingParams, TenantId,
    TierConfig, Usage,
};
use model::Message;
use tiers::fs::{Fs, HookedFs, StdFs};

const BS: u32 = 4;

fn base() -> EngineConfig {
    EngineConfig { default_timeout: Some(Duration::from_secs(30)), ..EngineConfig::default() }
}

fn with_tiers(tiers: TierConfig) -> EngineConfig {
    EngineConfig { tiers, ..base() }
}

fn ram(bytes: u64) -> TierConfig {
    TierConfig { ram_bytes: bytes, ..TierConfig::default() }
}

fn disk_cfg(dir: &Path, fs: Arc<dyn Fs>) -> DiskConfig {
    DiskConfig { retry: Duration::from_millis(100), fs, ..DiskConfig::new(dir, 1 << 30) }
}

fn disk(dir: &Path) -> TierConfig {
    disk_with(dir, Arc::new(StdFs))
}

fn disk_with(dir: &Path, fs: Arc<dyn Fs>) -> TierConfig {
    TierConfig {
        ram_bytes: 0,
        disk: Some(disk_cfg(dir, fs)),
        load: LoadPolicy::Always { deadline: Duration::from_secs(10) },
        ..TierConfig::default()
    }
}

fn tenant() -> TenantId {
    TenantId::default_tenant()
}

fn agent(a: &str) -> AgentId {
    AgentId::new(a).unwrap()
}

const USERS: [&str; 4] = [
    "hello there, this is a long first message to fill some blocks",
    "tell me more about it please",
    "and then what happened next?",
    "one last question before we go",
];

fn turn(history: &[Message], agent_name: Option<&str>) -> Request {
    let mut r = Request::new(Prompt::Chat(history.to_vec()));
    r.sampling = SamplingParams::greedy();
    r.max_tokens = Some(10);
    r.agent = agent_name.map(agent);
    r
}

/// One turn of `agent_name`'s conversation: appends the user message and the
/// answer to `history`.
async fn say(engine: &EngineHandle, history: &mut Vec<Message>, agent_name: &str, user: &str) -> (String, Usage) {
    history.push(Message::new("user", user));
    let o = collect(engine.generate(turn(history, Some(agent_name))).unwrap()).await;
    assert_eq!(o.error, None);
    history.push(Message::new("assistant", o.text.clone()));
    (o.text, o.usage)
}

/// The answers of the whole conversation on an engine without tiers and a
/// pool too big to evict anything: what every tier must reproduce.
async fn reference() -> Vec<String> {
    reference_of("").await
}

/// [`reference`] with every user message starting with `prefix` (so that
/// agents have conversations of their own, sharing no block).
async fn reference_of(prefix: &str) -> Vec<String> {
    let (engine, _) = fake_engine(BS, 1024, base());
    let mut h = Vec::new();
    let mut out = Vec::new();
    for u in USERS {
        out.push(say(&engine, &mut h, "ref", &format!("{prefix}{u}")).await.0);
    }
    out
}

/// Tokens of a turn's conversation held in whole blocks afterwards (its
/// last answer token is sampled, never fed): what a later turn finds in the
/// tiers' blocks.
fn held_blocks_tokens(u: &Usage) -> usize {
    held_tokens(u) / BS as usize * BS as usize
}

/// Tokens of a turn's conversation whose K/V exists afterwards: all but
/// its last answer token. What a later turn finds after a restart, the
/// partial last block included (the manifest's tail).
fn held_tokens(u: &Usage) -> usize {
    u.prompt_tokens + u.completion_tokens - 1
}

#[tokio::test]
async fn a_conversation_continued_from_ram_gives_the_same_tokens() {
    let want = reference().await;
    let (engine, _) = fake_engine(BS, 64, with_tiers(ram(1 << 20)));
    let mut h = Vec::new();
    let (t1, u1) = say(&engine, &mut h, "a", USERS[0]).await;
    assert_eq!(t1, want[0]);
    let loc = engine.offload_agent(&tenant(), &agent("a"), engine::OffloadTo::FirstTier).await.unwrap();
    assert_eq!(loc.pool, 0, "{loc:?}");
    assert!(loc.tier("ram") > 0, "{loc:?}");
    let (t2, u2) = say(&engine, &mut h, "a", USERS[1]).await;
    assert_eq!(t2, want[1], "same answer from RAM as from the pool");
    let s = engine.stats();
    assert!(s.tiers.counters.tier("ram").to_pool > 0, "{:?}", s.tiers);
    // The first turn's prompt and answer minus the partial last block came back from RAM.
    let full = (u1.prompt_tokens + u1.completion_tokens - 1) / BS as usize * BS as usize;
    assert!(u2.cached_tokens >= full, "{u1:?} then {u2:?}");
    assert_eq!(s.tiers.counters.tier("ram").hit_tokens as usize, u2.cached_tokens);
    engine.check_invariants().await.unwrap();
}

/// `agents` agents with conversations of their own take `turns` turns,
/// interleaved (every agent's first, then every agent's second...). Each
/// answer must be the reference's, and each turn must find every full
/// block of the agent's previous turn, wherever the tiers kept it.
async fn interleaved(engine: &EngineHandle, agents: usize, turns: usize) {
    let mut want = Vec::new();
    for k in 0..agents {
        want.push(reference_of(&format!("{k} ")).await);
    }
    let mut histories = vec![Vec::new(); agents];
    let mut last: Vec<Option<Usage>> = vec![None; agents];
    for (i, u) in USERS.iter().enumerate().take(turns) {
        for (k, h) in histories.iter_mut().enumerate() {
            let (t, usage) = say(engine, h, &format!("agent-{k}"), &format!("{k} {u}")).await;
            assert_eq!(t, want[k][i], "agent {k}, turn {i}");
            if let Some(prev) = last[k] {
                assert!(usage.cached_tokens >= held_blocks_tokens(&prev), "turn {i} of agent {k}: {usage:?}");
            }
            last[k] = Some(usage);
            // Whatever is on its way to disk is there before the next turn.
            engine.flush_tiers(Duration::from_secs(10)).await.unwrap();
        }
    }
}

#[tokio::test]
async fn a_pool_too_small_for_every_agent_recomputes_nothing_the_ram_tier_kept() {
    // 56 blocks of 4 tokens: one conversation at a time fits, three do not.
    let (engine, _) = fake_engine(BS, 56, with_tiers(ram(64 << 20)));
    interleaved(&engine, 3, 3).await;
    let s = engine.stats();
    assert!(s.cache.evictions > 0 && s.tiers.counters.tier("ram").to_pool > 0, "{:?} {:?}", s.cache, s.tiers);
    engine.check_invariants().await.unwrap();
}

#[tokio::test]
async fn a_conversation_continued_from_disk_gives_the_same_tokens() {
    let want = reference().await;
    let dir = tempfile::tempdir().unwrap();
    let (engine, _) = fake_engine(BS, 64, with_tiers(disk(dir.path())));
    let mut h = Vec::new();
    say(&engine, &mut h, "a", USERS[0]).await;
    assert!(engine.flush_tiers(Duration::from_secs(10)).await.unwrap());
    let loc = engine.offload_agent(&tenant(), &agent("a"), engine::OffloadTo::SecondTier).await.unwrap();
    assert!(loc.durable && loc.tier("disk") > 0 && loc.pool == 0, "{loc:?}");
    let (t2, u2) = say(&engine, &mut h, "a", USERS[1]).await;
    assert_eq!(t2, want[1]);
    let s = engine.stats();
    assert_eq!(s.tiers.counters.tier("disk").to_pool as usize, loc.tier("disk"), "{:?}", s.tiers.counters);
    assert_eq!(s.tiers.counters.tier("disk").hit_tokens as usize, u2.cached_tokens);
    let d = s.tiers.disk.unwrap();
    assert_eq!(d.rejected_total(), 0);
    assert!(d.commits >= 1 && d.read_blocks >= loc.tier("disk") as u64, "{d:?}");
    engine.check_invariants().await.unwrap();
}

/// Runs `turns` of agent "a" on a fresh engine over `dir`, then stops it.
async fn session(dir: &Path, fs: Arc<dyn Fs>, history: &mut Vec<Message>, users: &[&str]) -> Vec<(String, Usage)> {
    let (engine, _) = fake_engine(BS, 64, with_tiers(disk_with(dir, fs)));
    let mut out = Vec::new();
    for u in users {
        out.push(say(&engine, history, "a", u).await);
    }
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
    out
}

#[tokio::test]
async fn an_agent_resumes_after_a_restart_with_its_cache_and_the_same_tokens() {
    let want = reference().await;
    let dir = tempfile::tempdir().unwrap();
    let mut h = Vec::new();
    let first = session(dir.path(), Arc::new(StdFs), &mut h, &USERS[..2]).await;
    assert_eq!((first[0].0.as_str(), first[1].0.as_str()), (want[0].as_str(), want[1].as_str()));
    // Its full blocks and one tail: the first turn's tail went when the
    // second turn's manifest replaced it.
    assert_eq!(records(dir.path()).len(), held_blocks_tokens(&first[1].1) / BS as usize + 1);

    let (engine, _) = fake_engine(BS, 64, with_tiers(disk(dir.path())));
    let listed = engine.agents(&tenant()).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].id.as_str(), listed[0].turns), ("a", 2));
    assert!(listed[0].blocks.durable && listed[0].blocks.tier("disk") > 0, "{:?}", listed[0]);
    assert_eq!(engine.stats().tiers.counters.agents_restored, 1);
    let (t3, u3) = say(&engine, &mut h, "a", USERS[2]).await;
    assert_eq!(t3, want[2], "the same answer after a restart");
    // Everything stored came back, the partial last block included: only
    // the last answer token and the new message were prefilled.
    assert_ne!(held_tokens(&first[1].1) % BS as usize, 0, "the conversation ends inside a block");
    assert_eq!(u3.cached_tokens, held_tokens(&first[1].1), "{:?} then {u3:?}", first[1].1);
}

/// A restored agent's tail (its partial last block) is used only where the
/// next prompt continues it: a client that rewrites the agent's last answer
/// gets the tokens of an engine that never stored anything.
#[tokio::test]
async fn a_restored_tail_is_used_only_where_the_prompt_continues_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Vec::new();
    let first = session(dir.path(), Arc::new(StdFs), &mut h, &USERS[..2]).await;
    // Its next to last character: inside the tail (whose last token is the
    // answer's next to last one).
    let last = h.len() - 1;
    let mut answer: Vec<char> = first[1].0.chars().collect();
    let i = answer.len() - 2;
    answer[i] = if answer[i] == 'x' { 'y' } else { 'x' };
    h[last] = Message::new("assistant", answer.into_iter().collect::<String>());
    let mut plain_h = h.clone();
    let (engine, _) = fake_engine(BS, 64, with_tiers(disk(dir.path())));
    let (t3, u3) = say(&engine, &mut h, "a", USERS[2]).await;
    let (plain, _) = fake_engine(BS, 1024, base());
    let (want, _) = say(&plain, &mut plain_h, "ref", USERS[2]).await;
    assert_eq!(t3, want, "the rewritten history's answer");
    assert!(u3.cached_tokens < held_tokens(&first[1].1), "{u3:?}");
    engine.check_invariants().await.unwrap();
}

/// A restart warms restored agents up: their blocks are loaded back into
/// RAM in the background, most recent first, and the next turn takes its
/// history from RAM (no load of its own), with the same answer.
#[tokio::test]
async fn after_a_restart_restored_agents_come_back_into_ram_before_their_next_turn() {
    let want = reference().await;
    let dir = tempfile::tempdir().unwrap();
    let mut h = Vec::new();
    let first = session(dir.path(), Arc::new(StdFs), &mut h, &USERS[..2]).await;
    let mut tiers = disk(dir.path());
    tiers.ram_bytes = 64 << 20;
    let (engine, _) = fake_engine(BS, 64, with_tiers(tiers));
    let stored = engine.agents(&tenant()).await.unwrap()[0].blocks.tier("disk");
    assert!(stored > 0);
    wait_until("the prefetch", || engine.stats().tiers.counters.prefetched as usize >= stored).await;
    let (t3, u3) = say(&engine, &mut h, "a", USERS[2]).await;
    assert_eq!(t3, want[2], "the same answer from prefetched blocks");
    assert_eq!(u3.cached_tokens, held_tokens(&first[1].1));
    let c = engine.stats().tiers.counters;
    assert_eq!(c.tier("ram").hit_tokens as usize, u3.cached_tokens, "all of it from RAM: {c:?}");
    assert_eq!(c.tier("disk").to_pool, 0, "no load of its own: {c:?}");
    engine.check_invariants().await.unwrap();
}

/// A turn that arrives while its blocks are still being prefetched waits
/// for them instead of loading them a second time.
#[tokio::test]
async fn a_turn_arriving_mid_prefetch_waits_for_it_instead_of_loading_twice() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Vec::new();
    let first = session(dir.path(), Arc::new(StdFs), &mut h, &USERS[..2]).await;
    let mut tiers = disk(dir.path());
    tiers.ram_bytes = 64 << 20;
    let (engine, _) = fake_engine(BS, 64, with_tiers(tiers));
    // At once: the prefetch has just been queued.
    let (_, u3) = say(&engine, &mut h, "a", USERS[2]).await;
    assert_eq!(u3.cached_tokens, held_tokens(&first[1].1));
    let s = engine.stats();
    let d = s.tiers.disk.clone().unwrap();
    // Its full blocks and its tail.
    let stored = held_blocks_tokens(&first[1].1) / BS as usize + 1;
    assert!(d.read_blocks as usize <= stored, "each record read once: {d:?} {:?}", s.tiers.counters);
    engine.check_invariants().await.unwrap();
}

#[tokio::test]
async fn a_deleted_agent_never_comes_back_and_its_records_are_gone() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Vec::new();
    session(dir.path(), Arc::new(StdFs), &mut h, &USERS[..1]).await;
    let (engine, _) = fake_engine(BS, 64, with_tiers(disk(dir.path())));
    assert_eq!(engine.agents(&tenant()).await.unwrap().len(), 1);
    engine.delete_agent(&tenant(), &agent("a")).await.unwrap();
    // The deletion is durable when the call returns: stop at once.
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
    let (engine, _) = fake_engine(BS, 64, with_tiers(disk(dir.path())));
    assert!(engine.agents(&tenant()).await.unwrap().is_empty());
    let s = engine.stats().tiers.disk.unwrap();
    assert_eq!((s.blocks, s.agents), (0, 0), "its conversation's records went with it: {s:?}");
}

/// Record files under the store.
fn records(dir: &Path) -> Vec<PathBuf> {
    let store = std::fs::read_dir(dir).unwrap().next().unwrap().unwrap().path();
    let mut out: Vec<PathBuf> = std::fs::read_dir(store.join("blocks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "kvb"))
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn a_corrupt_record_is_a_counted_miss_recomputed_to_the_same_tokens() {
    let want = reference().await;
    let dir = tempfile::tempdir().unwrap();
    let mut h = Vec::new();
    session(dir.path(), Arc::new(StdFs), &mut h, &USERS[..1]).await;
    let files = records(dir.path());
    assert!(files.len() >= 3);
    // Flip the last payload byte of every record.
    for f in &files {
        let mut b = std::fs::read(f).unwrap();
        let last = b.len() - 1;
        b[last] ^= 0x40;
        std::fs::write(f, b).unwrap();
    }
    let (engine, _) = fake_engine(BS, 64, with_tiers(disk(dir.path())));
    let (t2, u2) = say(&engine, &mut h, "a", USERS[1]).await;
    assert_eq!(t2, want[1], "recomputed, not loaded wrongly");
    let s = engine.stats();
    let d = s.tiers.disk.unwrap();
    // The readers checked (and deleted) every record the load asked for;
    // the first reject ended the load.
    assert_eq!(d.rejected.get("payload_checksum").copied(), Some(files.len() as u64), "{d:?}");
    assert_eq!(s.tiers.counters.load_rejects, 1);
    assert_eq!(u2.cached_tokens, 0);
    // The recomputed turn replaced the bad records with good ones.
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
    let (engine, _) = fake_engine(BS, 64, with_tiers(disk(dir.path())));
    let (t3, u3) = say(&engine, &mut h, "a", USERS[2]).await;
    assert_eq!(t3, want[2]);
    assert_eq!(u3.cached_tokens, held_tokens(&u2), "{u2:?} then {u3:?}");
    assert_eq!(engine.stats().tiers.disk.unwrap().rejected_total(), 0);
}

/// Real files whose reads take `delay` each; counts them.
fn slow_reads(delay: Duration, reads: Arc<AtomicU64>) -> HookedFs {
    HookedFs::new().on_read(move |_| {
        reads.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(delay);
        None
    })
}

#[tokio::test]
async fn a_load_runs_while_others_step_and_a_second_request_waits_for_it_instead_of_loading_twice() {
    let want = reference().await;
    let dir = tempfile::tempdir().unwrap();
    let mut h = Vec::new();
    session(dir.path(), Arc::new(StdFs), &mut h, &USERS[..1]).await;
    let blocks = records(dir.path()).len();
    let reads = Arc::new(AtomicU64::new(0));
    let slow = Arc::new(slow_reads(Duration::from_millis(150), Arc::clone(&reads)));
    let (engine, _) = fake_engine(BS, 64, with_tiers(disk_with(dir.path(), slow)));
    h.push(Message::new("user", USERS[1]));
    let started = Instant::now();
    let a = engine.generate(turn(&h, Some("a"))).unwrap();
    // The same conversation without the agent: it meets the blocks being
    // loaded and waits for them.
    let twin = engine.generate(turn(&h, None)).unwrap();
    // Unrelated work finishes while the load is in flight.
    let other = collect(engine.generate(greedy("something else entirely", 5)).unwrap()).await;
    let other_done = started.elapsed();
    let (a, twin) = (collect(a).await, collect(twin).await);
    assert_eq!(other.error, None);
    assert_eq!(a.text, want[1]);
    assert_eq!(twin.text, want[1]);
    assert!(other_done < Duration::from_millis(150) * blocks as u32 / 2, "the engine kept stepping: {other_done:?}");
    let s = engine.stats();
    assert_eq!(s.tiers.counters.tier("disk").to_pool as usize, blocks, "loaded once: {:?}", s.tiers.counters);
    assert!(twin.usage.cached_tokens >= a.usage.cached_tokens - BS as usize, "{:?} {:?}", twin.usage, a.usage);
    assert_eq!(reads.load(Ordering::SeqCst) as usize, blocks + 1, "each record once, and the manifest at start");
}

#[tokio::test]
async fn a_load_past_its_deadline_falls_back_to_recomputing() {
    let want = reference().await;
    let dir = tempfile::tempdir().unwrap();
    let mut h = Vec::new();
    session(dir.path(), Arc::new(StdFs), &mut h, &USERS[..1]).await;
    let slow = Arc::new(slow_reads(Duration::from_secs(2), Arc::new(AtomicU64::new(0))));
    let mut tiers = disk_with(dir.path(), slow);
    tiers.load = LoadPolicy::Always { deadline: Duration::from_millis(200) };
    let (engine, _) = fake_engine(BS, 64, with_tiers(tiers));
    let started = Instant::now();
    let (t2, u2) = say(&engine, &mut h, "a", USERS[1]).await;
    assert!(started.elapsed() < Duration::from_secs(2), "did not wait for the slow disk: {:?}", started.elapsed());
    assert_eq!(t2, want[1]);
    let c = engine.stats().tiers.counters;
    assert_eq!(c.load_timeouts, 1, "{c:?}");
    assert!(u2.cached_tokens < u2.prompt_tokens / 2, "{u2:?}");
}

/// Real files that can fill up: while `full`, a write creates the file
/// and fails with ENOSPC, as a real full disk does.
fn full_disk(full: Arc<AtomicBool>) -> HookedFs {
    HookedFs::new().on_write(move |path, _| {
        full.load(Ordering::SeqCst).then(|| {
            let _ = StdFs.write_new(path, &[]);
            Err(io::Error::from_raw_os_error(28))
        })
    })
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_full_disk_degrades_the_tier_serving_goes_on_and_it_resumes_by_itself() {
    let want = reference().await;
    let dir = tempfile::tempdir().unwrap();
    let full = Arc::new(AtomicBool::new(false));
    let (engine, _) = fake_engine(BS, 64, with_tiers(disk_with(dir.path(), Arc::new(full_disk(Arc::clone(&full))))));
    full.store(true, Ordering::SeqCst);
    let mut h = Vec::new();
    let (t1, _) = say(&engine, &mut h, "a", USERS[0]).await;
    assert_eq!(t1, want[0], "serving goes on");
    engine.flush_tiers(Duration::from_secs(10)).await.unwrap();
    let reason = engine.degraded().expect("degraded");
    assert!(reason.contains("No space left") || reason.contains("28"), "{reason}");
    let d = engine.stats().tiers.disk.unwrap();
    assert!(d.failed_commits >= 1 && d.io_errors >= 1, "{d:?}");
    // Space returns: the tier probes and resumes; the deferred commit of
    // the agent's turn is retried and becomes durable.
    full.store(false, Ordering::SeqCst);
    wait_until("the disk tier to resume", || engine.degraded().is_none()).await;
    wait_until("the retried commit", || engine.stats().tiers.disk.unwrap().commits >= 1).await;
    let (t2, _) = say(&engine, &mut h, "a", USERS[1]).await;
    assert_eq!(t2, want[1]);
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
    let (engine, _) = fake_engine(BS, 64, with_tiers(disk(dir.path())));
    let listed = engine.agents(&tenant()).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].turns, 2, "the turn after the resume is durable");
    // No leftover temporary files of the failed writes.
    let store = std::fs::read_dir(dir.path()).unwrap().next().unwrap().unwrap().path();
    for sub in ["blocks", "agents"] {
        for e in std::fs::read_dir(store.join(sub)).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            assert!(!name.contains(".tmp-"), "{name}");
        }
    }
}

#[tokio::test]
async fn a_second_engine_on_the_same_cache_directory_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let (first, _) = fake_engine(BS, 64, with_tiers(disk(dir.path())));
    let (model, _) = engine::testing::FakeModel::new(BS, 64);
    let second =
        engine::start(Box::new(model), Arc::new(engine::testing::FakeCodec::new()), with_tiers(disk(dir.path())));
    match second {
        Err(Error::Storage(msg)) => assert!(msg.contains("in use by another kvserve process"), "{msg}"),
        other => panic!("expected a storage error, got {other:?}"),
    }
    first.shutdown(Duration::from_secs(5)).await.unwrap();
    let (model, _) = engine::testing::FakeModel::new(BS, 64);
    let third =
        engine::start(Box::new(model), Arc::new(engine::testing::FakeCodec::new()), with_tiers(disk(dir.path())));
    assert!(third.is_ok(), "free once the first one stopped");
}

#[tokio::test]
async fn ttls_are_wall_clock_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, _) = fake_engine(BS, 64, with_tiers(disk(dir.path())));
    let (mut ha, mut hb) = (Vec::new(), Vec::new());
    say(&engine, &mut ha, "short", USERS[0]).await;
    say(&engine, &mut hb, "long", USERS[0]).await;
    for (name, secs) in [("short", 1), ("long", 3600)] {
        let update =
            engine::AgentUpdate { retention: Some(engine::Retention::Ttl(Duration::from_secs(secs))), priority: None };
        engine.update_agent(&tenant(), &agent(name), update).await.unwrap();
    }
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let (engine, _) = fake_engine(BS, 64, with_tiers(disk(dir.path())));
    let listed = engine.agents(&tenant()).await.unwrap();
    assert_eq!(listed.len(), 1, "the expired one is gone: {listed:?}");
    assert_eq!(listed[0].id.as_str(), "long");
    assert_eq!(listed[0].retention, engine::Retention::Ttl(Duration::from_secs(3600)));
}

#[tokio::test]
async fn blocks_ram_cannot_hold_go_down_to_disk_and_come_back_from_there() {
    let dir = tempfile::tempdir().unwrap();
    // RAM for two fake blocks only: the pool's evictions overflow it to disk.
    let mut tiers = disk(dir.path());
    tiers.ram_bytes = 400;
    let (engine, _) = fake_engine(BS, 40, with_tiers(tiers));
    interleaved(&engine, 2, 2).await;
    let c = engine.stats().tiers.counters;
    assert!(c.tier("ram").stored > 0 && c.tier("disk").to_pool > 0, "{c:?}");
    engine.check_invariants().await.unwrap();
}
