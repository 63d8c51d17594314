//! Agents over the fake model: turns reuse the cached conversation, the
//! agent API, retention under pressure, tenants and quotas.

#![allow(clippy::unwrap_used)] // helpers of a test binary: a failed unwrap is a failed test

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::{assert_pool_full, collect, fake_engine, wait_for};
use engine::{
    AgentId, AgentUpdate, EngineConfig, EngineHandle, Error, FinishReason, Prompt, Request, Retention, SamplingParams,
    TenantId,
};
use model::Message;

fn turn(history: &[Message], agent: Option<&str>, max_tokens: usize) -> Request {
    let mut r = Request::new(Prompt::Chat(history.to_vec()));
    r.sampling = SamplingParams::greedy();
    r.max_tokens = Some(max_tokens);
    r.agent = agent.map(|a| AgentId::new(a).unwrap());
    r
}

/// Runs a conversation of `users` turns, returning each answer and usage.
async fn conversation(engine: &EngineHandle, agent: Option<&str>, users: &[&str]) -> Vec<(String, engine::Usage)> {
    let mut history = Vec::new();
    let mut out = Vec::new();
    for u in users {
        history.push(Message::new("user", *u));
        let o = collect(engine.generate(turn(&history, agent, 12)).unwrap()).await;
        assert_eq!(o.error, None);
        history.push(Message::new("assistant", o.text.clone()));
        out.push((o.text, o.usage));
    }
    out
}

/// The engine's own deadline is the tests' watchdog: a stuck request ends
/// with `Timeout` instead of hanging the test.
fn config() -> EngineConfig {
    EngineConfig { default_timeout: Some(Duration::from_secs(30)), ..EngineConfig::default() }
}

fn default_tenant() -> TenantId {
    TenantId::default_tenant()
}

#[tokio::test]
async fn an_agents_next_turn_prefills_only_its_new_tokens() {
    let (engine, control) = fake_engine(16, 256, config());
    let turns = conversation(&engine, Some("a1"), &["hello there", "tell me more", "and then?"]).await;
    let batches = control.batches.lock().unwrap().clone();
    let first_prompt = turns[0].1.prompt_tokens;
    assert_eq!(turns[0].1.cached_tokens, 0);
    // Turn 2's prompt = turn 1's prompt + answer + new message. The agent
    // holds turn 1's prompt and 11 of its 12 answer tokens (the last was
    // sampled, never fed).
    assert_eq!(turns[1].1.cached_tokens, first_prompt + 11);
    let new_tokens = turns[1].1.prompt_tokens - turns[1].1.cached_tokens;
    // Steps: turn 1 = 1 prefill + 11 decodes; turn 2 starts at step 13.
    assert_eq!(batches[12], vec![new_tokens], "only the new tokens were prefilled");
    assert!(turns[2].1.cached_tokens > turns[1].1.prompt_tokens);

    let info = engine.agent(&default_tenant(), &AgentId::new("a1").unwrap()).await.unwrap();
    assert_eq!(info.turns, 3);
    assert_eq!(info.cached_tokens, turns[2].1.prompt_tokens + 11);
    assert_eq!(info.blocks_held, info.cached_tokens.div_ceil(16));
}

#[tokio::test]
async fn greedy_conversations_are_identical_with_the_prefix_cache_on_and_off() {
    let users = ["first question", "second question", "third", "fourth, longer question to cross a block"];
    let (on, _) = fake_engine(4, 512, config());
    let (off, _) = fake_engine(4, 512, EngineConfig { prefix_cache: false, ..config() });
    let with_cache = conversation(&on, Some("agent"), &users).await;
    let without = conversation(&off, Some("agent"), &users).await;
    let texts = |t: &[(String, engine::Usage)]| t.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(texts(&with_cache), texts(&without));
    assert!(with_cache[1..].iter().all(|t| t.1.cached_tokens > 0));
    assert!(without.iter().all(|t| t.1.cached_tokens == 0));
    // Without an agent, the prefix index still finds whole blocks.
    let plain = conversation(&on, None, &users).await;
    assert_eq!(texts(&plain), texts(&with_cache));
}

#[tokio::test]
async fn the_agent_api_lists_inspects_retains_and_deletes() {
    let (engine, _) = fake_engine(16, 256, config());
    let t = default_tenant();
    let (a, b) = (AgentId::new("alpha").unwrap(), AgentId::new("beta").unwrap());
    conversation(&engine, Some("alpha"), &["hi"]).await;
    conversation(&engine, Some("beta"), &["hello"]).await;
    let list = engine.agents(&t).await.unwrap();
    assert_eq!(list.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), vec!["alpha", "beta"]);
    assert!(list.iter().all(|i| i.blocks_held > 0 && i.turns == 1 && !i.busy));

    // Another tenant sees none of them.
    let other = TenantId::new("other").unwrap();
    assert!(engine.agents(&other).await.unwrap().is_empty());
    assert_eq!(engine.agent(&other, &a).await, Err(Error::UnknownAgent("alpha".into())));

    let pinned = engine
        .update_agent(&t, &a, AgentUpdate { retention: Some(Retention::Pinned), priority: Some(3) })
        .await
        .unwrap();
    assert_eq!((pinned.retention, pinned.priority), (Retention::Pinned, 3));

    // A TTL forgets the agent and frees its blocks.
    let ttl = AgentUpdate { retention: Some(Retention::Ttl(Duration::from_millis(30))), priority: None };
    engine.update_agent(&t, &b, ttl).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while engine.agent(&t, &b).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "TTL never expired");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A TTL too long for the clock never expires; the engine keeps going.
    let forever = AgentUpdate { retention: Some(Retention::Ttl(Duration::MAX)), priority: None };
    engine.update_agent(&t, &a, forever).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(engine.agent(&t, &a).await.is_ok() && !engine.is_stopped());

    engine.delete_agent(&t, &a).await.unwrap();
    assert_eq!(engine.delete_agent(&t, &a).await, Err(Error::UnknownAgent("alpha".into())));
    assert!(engine.agents(&t).await.unwrap().is_empty());
    assert_pool_full(&engine);
    engine.check_invariants().await.unwrap();
}

#[tokio::test]
async fn idle_agents_give_way_under_pressure_lowest_priority_first_pinned_never() {
    // 56 blocks of 4 tokens; three agents of 16 blocks (sharing the first,
    // "user") leave 10.
    let (engine, _) = fake_engine(4, 56, config());
    let t = default_tenant();
    for name in ["keep", "low0", "pin0"] {
        conversation(&engine, Some(name), &[&format!("{name} {}", "q".repeat(30))]).await;
    }
    assert_eq!(engine.stats().cache.used_blocks, 46);
    let set = |r, p| AgentUpdate { retention: Some(r), priority: Some(p) };
    engine.update_agent(&t, &AgentId::new("pin0").unwrap(), set(Retention::Pinned, -10)).await.unwrap();
    engine.update_agent(&t, &AgentId::new("keep").unwrap(), set(Retention::Evictable, 5)).await.unwrap();
    engine.update_agent(&t, &AgentId::new("low0").unwrap(), set(Retention::Evictable, 0)).await.unwrap();

    // A request needing 13 more blocks forces one release.
    let out = collect(engine.generate(turn(&[Message::new("user", "z".repeat(30))], None, 8)).unwrap()).await;
    assert_eq!(out.reason, Some(FinishReason::Length), "{out:?} {:?}", engine.agents(&t).await);
    let held = |name: &'static str| {
        let engine = engine.clone();
        async move { engine.agent(&default_tenant(), &AgentId::new(name).unwrap()).await.unwrap().blocks_held }
    };
    assert_eq!(held("low0").await, 0, "lowest priority released first");
    assert_eq!(held("keep").await, 16, "one release was enough");
    assert!(held("pin0").await > 0, "pinned agents are never released");
    assert!(engine.stats().agent_releases >= 1);
    assert_eq!(engine.stats().preemptions, 0, "agents gave way before any running request");
}

#[tokio::test]
async fn tenants_never_share_blocks_and_quotas_refuse_what_cannot_fit() {
    let (engine, control) = fake_engine(4, 256, config());
    let prompt = "a system prompt shared by both tenants, long enough for blocks";
    let run = |tenant: &str| {
        let mut r = turn(&[Message::new("system", prompt), Message::new("user", "hi")], None, 4);
        r.tenant = TenantId::new(tenant).unwrap();
        engine.generate(r).unwrap()
    };
    let a1 = collect(run("acme")).await;
    let a2 = collect(run("acme")).await;
    let b1 = collect(run("bravo")).await;
    assert_eq!(a1.usage.cached_tokens, 0);
    assert!(a2.usage.cached_tokens > 40, "same tenant reuses: {:?}", a2.usage);
    assert_eq!(b1.usage.cached_tokens, 0, "another tenant does not");
    assert_eq!(a1.text, b1.text);

    let small = TenantId::new("small").unwrap();
    engine.set_quota(&small, Some(4)).await.unwrap();
    let out = collect(run("small")).await;
    assert_eq!(out.error, Some(Error::QuotaExceeded { tenant: "small".into(), quota: 4 }));
    control.step_delay_ms.store(0, Ordering::SeqCst);
    wait_for(&engine, "idle", |s| s.running == 0);
    engine.set_quota(&small, None).await.unwrap();
    assert_eq!(collect(run("small")).await.error, None);
    assert_pool_full(&engine);
}

fn for_tenant(text: &str, tenant: &str, max_tokens: usize) -> Request {
    let mut r = Request::new(Prompt::Text(text.into()));
    r.sampling = SamplingParams::greedy();
    r.max_tokens = Some(max_tokens);
    r.ignore_eos = true;
    r.tenant = TenantId::new(tenant).unwrap();
    r
}

/// Four requests that each fit the tenant's quota alone but not together:
/// they take turns (the newest waits or is preempted) instead of refusing
/// each other's steps forever.
#[tokio::test]
async fn requests_that_fit_a_quota_only_one_at_a_time_all_finish() {
    let (engine, _control) =
        fake_engine(4, 256, EngineConfig { default_timeout: Some(Duration::from_secs(20)), ..EngineConfig::default() });
    let prompts: Vec<String> = (0..4).map(|i| format!("request {i} with a prompt of some length")).collect();
    let mut expected = Vec::new();
    for p in &prompts {
        expected.push(collect(engine.generate(for_tenant(p, "free", 24)).unwrap()).await.text);
    }
    let small = TenantId::new("small").unwrap();
    // One request: 40 prompt + 24 answer tokens = 16 blocks of 4.
    engine.set_quota(&small, Some(20)).await.unwrap();
    let streams: Vec<_> = prompts.iter().map(|p| engine.generate(for_tenant(p, "small", 24)).unwrap()).collect();
    for (s, want) in streams.into_iter().zip(&expected) {
        let out = collect(s).await;
        assert_eq!(out.error, None);
        assert_eq!(&out.text, want, "a preempted request continues as if alone");
    }
    assert_pool_full(&engine);
}

/// A tenant waiting for its own quota does not hold up other tenants.
#[tokio::test]
async fn a_tenant_at_its_quota_does_not_block_other_tenants() {
    let (engine, control) = fake_engine(4, 256, config());
    let small = TenantId::new("small").unwrap();
    engine.set_quota(&small, Some(20)).await.unwrap();
    control.step_delay_ms.store(20, Ordering::SeqCst);
    let first = engine.generate(for_tenant("the first request of the small tenant", "small", 40)).unwrap();
    wait_for(&engine, "first running", |s| s.running == 1);
    let second = engine.generate(for_tenant("the second request of the small tenant", "small", 40)).unwrap();
    wait_for(&engine, "second waiting", |s| s.waiting == 1);
    let other = collect(engine.generate(for_tenant("another tenant", "other", 2)).unwrap()).await;
    assert_eq!(other.error, None);
    wait_for(&engine, "the other request counted", |s| s.finished.length >= 1);
    assert_eq!(engine.stats().finished.length, 1, "the other tenant finished while small's requests were still in");
    control.step_delay_ms.store(0, Ordering::SeqCst);
    assert_eq!(collect(first).await.error, None);
    assert_eq!(collect(second).await.error, None);
    assert_pool_full(&engine);
}

/// Under a sliding window the agent's sequence no longer holds blocks far
/// behind its end; a next turn that edits history back there cannot cut the
/// agent's sequence and starts from the prefix index instead of waiting.
#[tokio::test]
async fn an_agent_edit_older_than_the_window_falls_back_to_the_prefix_index() {
    let windowed = || {
        let window = kv::AttentionKind::SlidingWindow { window: 8 };
        let (model, _) = engine::testing::FakeModel::with_attention(4, 256, window);
        engine::start(Box::new(model), Arc::new(engine::testing::FakeCodec::new()), config()).unwrap()
    };
    let engine = windowed();
    let system = Message::new("system", "a system prompt of a few blocks");
    let first = [system.clone(), Message::new("user", "the first question, long enough to leave the window")];
    let o1 = collect(engine.generate(turn(&first, Some("w"), 8)).unwrap()).await;
    assert_eq!(o1.error, None);
    let edited = [system, Message::new("user", "a rewritten first question")];
    let o2 = collect(engine.generate(turn(&edited, Some("w"), 8)).unwrap()).await;
    assert_eq!(o2.error, None);
    assert!(o2.usage.cached_tokens >= 40, "the system prompt came from the prefix index: {:?}", o2.usage);
    let fresh = collect(windowed().generate(turn(&edited, None, 8)).unwrap()).await;
    assert_eq!(o2.text, fresh.text);
    engine.delete_agent(&default_tenant(), &AgentId::new("w").unwrap()).await.unwrap();
    assert_pool_full(&engine);
}

/// A tenant keeps at most `max_agents_per_tenant` agents: the least
/// recently used evictable one is forgotten for a new one; pinned agents
/// are not, and with only those left a new agent is refused. A first turn
/// that fails leaves no agent behind.
#[tokio::test]
async fn a_tenant_keeps_at_most_its_agent_limit() {
    let (engine, control) = fake_engine(4, 256, EngineConfig { max_agents_per_tenant: 2, ..config() });
    let tenant = default_tenant();
    let id = |s: &str| AgentId::new(s).unwrap();
    let say = |agent: &str| collect(engine.generate(turn(&[Message::new("user", "hi")], Some(agent), 4)).unwrap());
    assert_eq!(say("a").await.error, None);
    assert_eq!(say("b").await.error, None);
    assert_eq!(say("a").await.error, None); // b is now the least recently used
    assert_eq!(say("c").await.error, None);
    let names = |list: Vec<engine::AgentInfo>| list.into_iter().map(|a| a.id.to_string()).collect::<Vec<_>>();
    assert_eq!(names(engine.agents(&tenant).await.unwrap()), ["a", "c"]);
    assert_eq!(engine.stats().agents_forgotten, 1);

    let pin = AgentUpdate { retention: Some(Retention::Pinned), priority: None };
    engine.update_agent(&tenant, &id("a"), pin).await.unwrap();
    engine.update_agent(&tenant, &id("c"), pin).await.unwrap();
    assert_eq!(say("d").await.error, Some(Error::TooManyAgents { tenant: tenant.to_string(), limit: 2 }));

    engine.delete_agent(&tenant, &id("c")).await.unwrap();
    control.fail_at_step.store(control.steps.load(Ordering::SeqCst) + 1, Ordering::SeqCst);
    assert!(matches!(say("e").await.error, Some(Error::Model(_))));
    assert_eq!(names(engine.agents(&tenant).await.unwrap()), ["a"], "a failed first turn leaves no agent");
    engine.delete_agent(&tenant, &id("a")).await.unwrap();
    assert_pool_full(&engine);
}

/// A tenant's pinned agents hold at most `max_pinned_share` of the pool:
/// pinning past it is refused, and a pinned agent whose turn takes the
/// tenant past it becomes evictable.
#[tokio::test]
async fn pinned_agents_hold_at_most_their_share_of_the_pool() {
    // 256 blocks × 0.04 = 10 blocks may be pinned.
    let (engine, _) = fake_engine(4, 256, EngineConfig { max_pinned_share: 0.04, ..config() });
    let tenant = default_tenant();
    let id = |s: &str| AgentId::new(s).unwrap();
    let hello = [Message::new("user", "hi")];
    for agent in ["a", "b"] {
        assert_eq!(collect(engine.generate(turn(&hello, Some(agent), 4)).unwrap()).await.error, None);
    }
    let pin = AgentUpdate { retention: Some(Retention::Pinned), priority: None };
    let a = engine.update_agent(&tenant, &id("a"), pin).await.unwrap();
    assert!(a.blocks_held <= 10 && 2 * a.blocks_held > 10, "the test needs two agents to pass the limit: {a:?}");
    let refused = engine.update_agent(&tenant, &id("b"), pin).await;
    assert_eq!(
        refused,
        Err(Error::PinLimit { tenant: tenant.to_string(), what: "blocks", limit: 10, wanted: 2 * a.blocks_held })
    );
    assert_eq!(engine.agent(&tenant, &id("b")).await.unwrap().retention, Retention::Evictable, "nothing changed");

    let long = [Message::new("user", "hi"), Message::new("assistant", "x"), Message::new("user", "y".repeat(40))];
    assert_eq!(collect(engine.generate(turn(&long, Some("a"), 4)).unwrap()).await.error, None);
    let a = engine.agent(&tenant, &id("a")).await.unwrap();
    assert!(a.blocks_held > 10);
    assert_eq!(a.retention, Retention::Evictable, "a turn past the share unpins");
}

/// Sixteen threads, four tenants (three with tight quotas), a tight pool,
/// agents, and cancellations: every request ends on its own (no timeout, so
/// no livelock), `QuotaExceeded` only for a request its quota cannot hold
/// alone, and afterwards the pool is full and the cache consistent.
#[test]
fn many_threads_across_tenants_with_quotas_all_progress() {
    let cfg =
        EngineConfig { max_running: 16, default_timeout: Some(Duration::from_secs(60)), ..EngineConfig::default() };
    let (engine, control) = fake_engine(4, 160, cfg);
    control.step_delay_ms.store(1, Ordering::SeqCst);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let quotas = [Some(24_u32), Some(40), None, Some(16)];
    for (t, q) in quotas.iter().enumerate() {
        rt.block_on(engine.set_quota(&TenantId::new(&format!("t{t}")).unwrap(), *q)).unwrap();
    }
    let threads: Vec<_> = (0..16)
        .map(|thread| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                let mut seen = (0, 0, 0); // finished, cancelled, refused for quota
                for i in 0..6_usize {
                    let tenant = (thread + i) % 4;
                    let prompt_len = 10 + (thread * 7 + i * 13) % 50;
                    let max_tokens = 4 + (thread * 5 + i * 3) % 27;
                    let text: String =
                        (0..prompt_len).map(|k| char::from(b'a' + ((thread + k * i) % 26) as u8)).collect();
                    let mut r = for_tenant(&text, &format!("t{tenant}"), max_tokens);
                    if tenant == 2 && i % 2 == 0 {
                        r.agent = Some(AgentId::new(&format!("agent-{thread}")).unwrap());
                    }
                    let mut stream = engine.generate(r).unwrap();
                    if (thread + i) % 5 == 0 {
                        let _ = stream.blocking_next(); // drop mid-answer: cancelled
                        seen.1 += 1;
                        continue;
                    }
                    let out = common::collect_blocking(stream);
                    match out.error {
                        None => seen.0 += 1,
                        Some(Error::QuotaExceeded { quota, .. }) => {
                            let alone = (prompt_len + max_tokens).div_ceil(4);
                            assert!(alone > quota as usize, "{alone} blocks fit a quota of {quota}");
                            seen.2 += 1;
                        }
                        Some(e) => panic!("thread {thread} request {i}: {e}"),
                    }
                }
                seen
            })
        })
        .collect();
    let mut total = (0, 0, 0);
    for t in threads {
        let (a, b, c) = t.join().unwrap();
        total = (total.0 + a, total.1 + b, total.2 + c);
    }
    assert_eq!(total.0 + total.1 + total.2, 96);
    assert!(total.0 >= 60, "{total:?}");
    let stats = engine.stats();
    assert_eq!(stats.finished.timeout, 0, "{stats:?}");
    common::wait_idle(&engine);
    for thread in 0..16 {
        let _ = rt.block_on(
            engine.delete_agent(&TenantId::new("t2").unwrap(), &AgentId::new(&format!("agent-{thread}")).unwrap()),
        );
    }
    assert_pool_full(&engine);
    rt.block_on(engine.check_invariants()).unwrap();
}
