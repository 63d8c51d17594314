//! A hybrid model (a tiny random Gemma 3: five sliding-window layers to one
//! full layer, window 8, blocks of 4) under page pressure: the sliding
//! layers keep only a few pages, so a cached prefix can outlive the window
//! K/V it needs. The engine must then continue from where that K/V still
//! exists (here: from scratch) and give exactly the tokens a cold engine
//! gives; with the pages still there it must reuse the prefix.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{collect, greedy};
use engine::{EngineConfig, EngineHandle};
use kv::KvDType;
use model::tiny::{write_tiny_gguf, TinySpec};
use model::{MatmulPath, PagedLlama};

/// An engine over the tiny hybrid model with the memory of `blocks`
/// whole-model blocks (a third of it becomes sliding-window pages).
fn engine(path: &std::path::Path, blocks: u32) -> EngineHandle {
    engine_with(path, blocks, EngineConfig::default())
}

fn engine_with(path: &std::path::Path, blocks: u32, config: EngineConfig) -> EngineHandle {
    let (paged, text) = PagedLlama::open(
        path,
        model::KvSizing { live_windows: 2, ..model::KvSizing::new(4, blocks, KvDType::F16) },
        MatmulPath::from_env().unwrap(),
    )
    .unwrap();
    assert!(paged.store().pages().is_some(), "a hybrid store");
    let config = EngineConfig { default_timeout: Some(Duration::from_secs(60)), max_batch_tokens: 64, ..config };
    engine::start(Box::new(paged), Arc::new(text), config).unwrap()
}

fn tiny_gemma(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("tiny-gemma.gguf");
    write_tiny_gguf(&path, &TinySpec::gemma3()).unwrap();
    path
}

/// 40 letters; each seed starts with another letter.
fn prompt(seed: usize) -> String {
    (0..40).map(|i| char::from(b'a' + ((i * 7 + seed * 11 + i * seed) % 26) as u8)).collect()
}

/// 200 characters: longer than the free pages of the small engines below
/// can take in one chunk.
fn long_prompt() -> String {
    (0..8).map(prompt).collect::<Vec<_>>().join(" ")[..200].to_string()
}

/// [`greedy`] as a turn of agent `name`.
fn agent_greedy(name: &str, text: &str, max_tokens: usize) -> engine::Request {
    let mut r = greedy(text, max_tokens);
    r.agent = Some(engine::AgentId::new(name).unwrap());
    r
}

#[tokio::test]
async fn a_prefix_whose_window_pages_were_reclaimed_is_recomputed_and_answers_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_gemma(dir.path());
    let question = format!("{}{}", prompt(0), "the end");

    // Cold: a fresh engine answers the question.
    let cold = collect(engine(&path, 24).generate(greedy(&question, 12)).unwrap()).await;
    assert_eq!(cold.error, None);

    // Warm: the prompt's prefix ran just before; its pages are still there.
    let warm_engine = engine(&path, 24);
    let first = collect(warm_engine.generate(greedy(&prompt(0), 4)).unwrap()).await;
    assert_eq!(first.error, None);
    let warm = collect(warm_engine.generate(greedy(&question, 12)).unwrap()).await;
    assert_eq!(warm.tokens, cold.tokens, "the same tokens from cached K/V");
    assert!(warm.usage.cached_tokens >= 36, "the prefix was reused: {:?}", warm.usage);

    // Pressure: other prompts run in between and take every page, while the
    // full layers' blocks of the first prompt stay cached.
    let busy = engine(&path, 24);
    let first = collect(busy.generate(greedy(&prompt(0), 4)).unwrap()).await;
    assert_eq!(first.error, None);
    for seed in 1..6 {
        let o = collect(busy.generate(greedy(&prompt(seed), 4)).unwrap()).await;
        assert_eq!(o.error, None, "seed {seed}");
    }
    let pages = busy.stats().sliding_pages;
    assert!(pages.is_some_and(|(total, held)| held > 0 && held <= total), "{pages:?}");
    let after = collect(busy.generate(greedy(&question, 12)).unwrap()).await;
    assert_eq!(after.error, None);
    assert_eq!(after.tokens, cold.tokens, "the same tokens, recomputed where the window K/V was gone");
    assert!(after.usage.cached_tokens < 36, "the adoption was cut back: {:?}", after.usage);

    // The recomputed blocks took the place of those without window K/V in
    // the prefix index, so the prefix's next user reuses it. (Before, the
    // page-less blocks stayed indexed and every later user recomputed.)
    let other = format!("{} once more", prompt(0));
    let cold_other = collect(engine(&path, 24).generate(greedy(&other, 12)).unwrap()).await;
    let again = collect(busy.generate(greedy(&other, 12)).unwrap()).await;
    assert_eq!(again.error, None);
    assert_eq!(again.tokens, cold_other.tokens, "the same tokens from the recomputed blocks");
    assert!(again.usage.cached_tokens >= 36, "the recomputed prefix is reused: {:?}", again.usage);
}

fn tiered(path: &std::path::Path, dir: &std::path::Path) -> EngineHandle {
    let sizing = model::KvSizing { live_windows: 2, ..model::KvSizing::new(4, 64, KvDType::F16) };
    let (paged, text) = PagedLlama::open(path, sizing, MatmulPath::from_env().unwrap()).unwrap();
    assert!(paged.store().pages().is_some(), "a hybrid store");
    let tiers = engine::TierConfig {
        ram_bytes: 1 << 20,
        disk: Some(engine::DiskConfig::new(dir, 64 << 20)),
        // A tiny model recomputes faster than the disk loads: load anyway.
        load: engine::LoadPolicy::Always { deadline: Duration::from_secs(30) },
        ..engine::TierConfig::default()
    };
    let config = EngineConfig {
        default_timeout: Some(Duration::from_secs(60)),
        max_batch_tokens: 64,
        tiers,
        ..EngineConfig::default()
    };
    engine::start(Box::new(paged), Arc::new(text), config).unwrap()
}

/// A hybrid model's agent goes to disk and comes back after a restart: its
/// blocks carry the sliding-window runs (where they had them), and the next
/// turn gives the tokens an engine that never stored anything gives.
#[tokio::test]
async fn a_hybrid_agent_survives_disk_and_a_restart_with_the_same_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_gemma(dir.path());
    let kv_dir = dir.path().join("kv");
    let turn = |text: String| agent_greedy("gem", &text, 8);
    let first = prompt(3);
    let reference = {
        let e = engine(&path, 64);
        let a = collect(e.generate(turn(first.clone())).unwrap()).await;
        let second = format!("{first}{} and more", a.text);
        collect(e.generate(turn(second)).unwrap()).await
    };
    let e = tiered(&path, &kv_dir);
    let a = collect(e.generate(turn(first.clone())).unwrap()).await;
    assert_eq!(a.error, None);
    e.flush_tiers(Duration::from_secs(30)).await.unwrap();
    e.shutdown(Duration::from_secs(30)).await.unwrap();
    let e = tiered(&path, &kv_dir);
    let second = format!("{first}{} and more", a.text);
    let b = collect(e.generate(turn(second)).unwrap()).await;
    assert_eq!(b.error, None);
    assert_eq!(b.tokens, reference.tokens, "the same tokens after a restart");
    eprintln!("after a restart: {:?}", b.usage);
    assert!(b.usage.cached_tokens >= 40, "the history came back from disk: {:?}", b.usage);
}

/// Idle agents keep their last window's pages (their next turn reads them),
/// so more agents than the pages hold used to leave every later step short
/// of a page: refused, preempted, readmitted, refused again, forever. Pages
/// now count as memory when admitting and planning, and short of them the
/// engine releases the least recently used idle agent, as it does for
/// blocks. Every turn answers; the newest agent still continues from its
/// cache; a released one recomputes and answers the same.
#[tokio::test]
async fn idle_agents_beyond_the_pages_are_released_instead_of_stalling_every_step() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_gemma(dir.path());
    let turn = |agent: usize, text: &str| agent_greedy(&format!("agent-{agent}"), text, 4);
    let run = |e: &EngineHandle, r| {
        let stream = e.generate(r).unwrap();
        async move { tokio::time::timeout(Duration::from_secs(30), collect(stream)).await.expect("the turn ends") }
    };
    // The memory of 50 blocks of every layer: 30 pages and 150 blocks. An
    // idle agent of ~14 tokens holds 4 blocks and its window 3 pages (every
    // page of a short conversation): twelve agents need more pages than
    // there are, while their blocks fit (so every release is for pages).
    let short = |agent: usize| prompt(agent)[..10].to_string();
    let e = engine(&path, 50);
    assert_eq!(e.stats().sliding_pages.map(|p| p.0), Some(30));
    assert_eq!(e.stats().cache.total_blocks, 150);
    let mut firsts = Vec::new();
    for agent in 0..12 {
        let o = run(&e, turn(agent, &short(agent))).await;
        assert_eq!(o.error, None, "agent {agent}");
        firsts.push(o.text);
    }
    let stats = e.stats();
    assert!(stats.agent_releases >= 1, "idle agents were released for pages: {}", stats.agent_releases);
    assert!(stats.cache.used_blocks <= 150, "{:?}", stats.cache);
    let second = |agent: usize| format!("{}{} and more", short(agent), firsts[agent]);
    // What each second turn gives where nothing was ever short.
    let reference = |agent: usize| {
        let (path, first) = (path.clone(), short(agent));
        async move {
            let roomy = engine(&path, 256);
            assert_eq!(run(&roomy, turn(agent, &first)).await.error, None);
            run(&roomy, turn(agent, &second(agent))).await
        }
    };
    let newest = run(&e, turn(11, &second(11))).await;
    assert_eq!(newest.error, None);
    assert_eq!(newest.tokens, reference(11).await.tokens);
    assert!(newest.usage.cached_tokens >= 12, "the newest agent kept its window: {:?}", newest.usage);
    let oldest = run(&e, turn(0, &second(0))).await;
    assert_eq!(oldest.error, None);
    assert_eq!(oldest.tokens, reference(0).await.tokens, "released, recomputed, the same answer");
}

/// On a hybrid model a tenant's quota counts its sliding-window pages too,
/// each as the blocks its bytes make (five here, as on Gemma-3 270M: five
/// sliding layers to one full layer), and an agent reports the pages its
/// window holds.
#[tokio::test]
async fn a_tenants_quota_counts_its_sliding_window_pages() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_gemma(dir.path());
    let e = engine(&path, 256);
    let tenant = engine::TenantId::default_tenant();
    // About 40 prompt tokens: 10 or 11 blocks. Its window then holds at
    // most 3 pages of 5 blocks each: 26 blocks in all. Counted in blocks
    // alone a quota of 20 would hold it; with its pages it cannot. (How
    // long the prefill chunks are does not matter: the pages of a chunk's
    // blocks that leave the window are not the tenant's.)
    e.set_quota(&tenant, Some(20)).await.unwrap();
    let refused = collect(e.generate(greedy(&prompt(0), 4)).unwrap()).await;
    assert!(
        matches!(refused.error, Some(engine::Error::QuotaExceeded { quota: 20, .. })),
        "refused for its pages: {:?}",
        refused.error
    );
    e.set_quota(&tenant, Some(27)).await.unwrap();
    let o = collect(e.generate(agent_greedy("paged", &prompt(0), 4)).unwrap()).await;
    assert_eq!(o.error, None);
    let info = e.agent(&tenant, &engine::AgentId::new("paged").unwrap()).await.unwrap();
    // 44 or 45 tokens: the next one reads positions 37.. (window 8), in the
    // last two or three blocks of 4.
    let pages = info.window_pages.expect("a hybrid model reports pages");
    assert!((2..=3).contains(&pages), "{pages} pages in its window, {} blocks", info.blocks_held);
    e.check_invariants().await.unwrap();
}

/// Pinned agents hold at most their share of the sliding-window pages, as
/// of the blocks: pages are five times fewer here, and a short conversation
/// holds as many pages as blocks, so the blocks' share alone would let
/// pinned agents hold every page.
#[tokio::test]
async fn pinned_agents_hold_at_most_their_share_of_the_pages() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_gemma(dir.path());
    let e = engine_with(&path, 256, EngineConfig { max_pinned_share: 0.05, ..EngineConfig::default() });
    let (total, _) = e.stats().sliding_pages.unwrap();
    let tenant = engine::TenantId::default_tenant();
    let pin = engine::AgentUpdate { retention: Some(engine::Retention::Pinned), priority: None };
    let limit = (total as f64 * 0.05) as usize;
    let mut pinned = 0;
    for agent in 0..8 {
        let name = format!("pin-{agent}");
        // Short conversations: a page per block.
        assert_eq!(collect(e.generate(agent_greedy(&name, &prompt(agent)[..10], 4)).unwrap()).await.error, None);
        let id = engine::AgentId::new(&name).unwrap();
        match e.update_agent(&tenant, &id, pin).await {
            Ok(info) => pinned += info.window_pages.unwrap(),
            Err(engine::Error::PinLimit { what, limit: l, wanted, .. }) => {
                assert_eq!((what, l), ("sliding-window pages", limit));
                assert!(wanted > limit && pinned <= limit, "{pinned} pinned, {wanted} wanted, {limit} allowed");
                return;
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("{pinned} pages pinned of {total}: the share was never enforced");
}

/// A prefill chunk holds a page for each block it writes, though its
/// window keeps only the last few: when pinned agents leave fewer pages
/// than a chunk needs, the prompt goes through in shorter chunks (the same
/// tokens) instead of failing for a full cache.
#[tokio::test]
async fn a_prompt_longer_than_the_free_pages_prefills_in_shorter_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_gemma(dir.path());
    let long = long_prompt();
    let cold = collect(engine(&path, 256).generate(greedy(&long, 8)).unwrap()).await;
    assert_eq!(cold.error, None);
    // 16 pages; two pinned agents hold 3 each. A chunk of 64 tokens writes
    // 16 blocks.
    let e = engine(&path, 24);
    let tenant = engine::TenantId::default_tenant();
    let pin = engine::AgentUpdate { retention: Some(engine::Retention::Pinned), priority: None };
    for agent in 0..2 {
        let name = format!("pinned-{agent}");
        assert_eq!(collect(e.generate(agent_greedy(&name, &prompt(agent)[..10], 4)).unwrap()).await.error, None);
        let id = engine::AgentId::new(&name).unwrap();
        assert_eq!(e.update_agent(&tenant, &id, pin).await.unwrap().window_pages, Some(3));
    }
    let o = collect(e.generate(greedy(&long, 8)).unwrap()).await;
    assert_eq!(o.error, None);
    assert_eq!(o.tokens, cold.tokens);
    e.check_invariants().await.unwrap();
}

/// While idle agents hold most pages, a long prompt is not cut to a block
/// per step for its whole length: below a window's worth of tokens per
/// chunk, releasing an idle agent (which frees about as many pages) comes
/// first.
#[tokio::test]
async fn idle_agents_give_way_before_a_prefill_crawls() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_gemma(dir.path());
    let long = long_prompt();
    // 16 pages, 64 blocks: five idle agents' windows hold 15 pages.
    let e = engine(&path, 24);
    for agent in 0..5 {
        let r = agent_greedy(&format!("idle-{agent}"), &prompt(agent)[..10], 4);
        assert_eq!(collect(e.generate(r).unwrap()).await.error, None);
    }
    let before = e.stats();
    let o = collect(e.generate(greedy(&long, 8)).unwrap()).await;
    assert_eq!(o.error, None);
    let after = e.stats();
    let steps = after.steps - before.steps;
    // ~200 prompt tokens and 8 answers took 18 steps; cutting chunks to
    // whatever pages were free, without releasing, took 28.
    assert!(steps <= 22, "{steps} steps");
    assert!(after.agent_releases > before.agent_releases, "idle agents gave way");
}
