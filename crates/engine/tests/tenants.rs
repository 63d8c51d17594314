//! Tenant boundaries and hostile inputs at the engine, over the fake model:
//! a tenant cannot fill the queue or every running slot, pins are capped
//! for all tenants together, a deleted agent's queued turn cannot bring it
//! back, `logit_bias` works and is bounded, oversized prompts are refused by
//! their length before tokenizing, and nothing the engine reads can
//! overflow its clock.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{collect, collect_blocking, fake_engine, greedy, wait_for};
use engine::{AgentId, AgentUpdate, EngineConfig, Error, Prompt, Request, Retention, TenantId};

fn config() -> EngineConfig {
    EngineConfig { default_timeout: Some(Duration::from_secs(30)), ..EngineConfig::default() }
}

fn of(tenant: &str, text: &str, max_tokens: usize) -> Request {
    let mut r = greedy(text, max_tokens);
    r.tenant = TenantId::new(tenant).unwrap();
    r
}

#[test]
fn one_tenant_cannot_fill_the_queue() {
    let cfg =
        EngineConfig { max_running: 1, max_batch_tokens: 64, max_waiting: 8, max_waiting_per_tenant: 3, ..config() };
    let (engine, control) = fake_engine(16, 256, cfg);
    control.step_delay_ms.store(20, Ordering::SeqCst);
    let mut held = vec![engine.generate(of("greedy", "running", 50)).unwrap()];
    wait_for(&engine, "one running", |s| s.running == 1);
    for i in 0..3 {
        held.push(engine.generate(of("greedy", &format!("q{i}"), 1)).unwrap());
    }
    match engine.generate(of("greedy", "one too many", 1)) {
        Err(Error::Overloaded { queued: 3, limit: 3 }) => {}
        other => panic!("expected the tenant's own limit, got {other:?}"),
    }
    // Another tenant still gets in.
    held.push(engine.generate(of("polite", "my turn", 1)).unwrap());
    drop(held);
}

#[test]
fn running_slots_are_shared_fairly_between_tenants() {
    // Two slots. Tenant A queues six requests, then B queues two: B must
    // not wait for all of A's to finish.
    let cfg = EngineConfig { max_running: 2, max_batch_tokens: 64, ..config() };
    let (engine, control) = fake_engine(16, 256, cfg);
    control.step_delay_ms.store(5, Ordering::SeqCst);
    let a: Vec<_> = (0..6).map(|i| engine.generate(of("a", &format!("a{i}"), 20)).unwrap()).collect();
    let b: Vec<_> = (0..2).map(|i| engine.generate(of("b", &format!("b{i}"), 20)).unwrap()).collect();
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let threads: Vec<_> = a
        .into_iter()
        .map(|s| ("a", s))
        .chain(b.into_iter().map(|s| ("b", s)))
        .map(|(t, s)| {
            let order = std::sync::Arc::clone(&order);
            std::thread::spawn(move || {
                collect_blocking(s);
                order.lock().unwrap().push(t);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let order = order.lock().unwrap().clone();
    let last_b = order.iter().rposition(|t| *t == "b").unwrap();
    assert!(last_b < 5, "b's requests finished among the first, not after all of a's: {order:?}");
}

#[tokio::test]
async fn tenants_together_cannot_pin_more_than_the_total_share() {
    let cfg = EngineConfig { max_pinned_share: 0.5, max_pinned_share_total: 0.5, ..config() };
    let (engine, _) = fake_engine(16, 16, cfg);
    // Each agent holds 5 blocks (about 70 tokens); each tenant may pin 8,
    // both together 8.
    let pin = AgentUpdate { retention: Some(Retention::Pinned), priority: None };
    for tenant in ["t1", "t2"] {
        let mut r = of(tenant, &"x".repeat(70), 2);
        r.agent = Some(AgentId::new("a").unwrap());
        collect(engine.generate(r).unwrap()).await;
    }
    let t1 = TenantId::new("t1").unwrap();
    let t2 = TenantId::new("t2").unwrap();
    let a = AgentId::new("a").unwrap();
    engine.update_agent(&t1, &a, pin).await.unwrap();
    match engine.update_agent(&t2, &a, pin).await {
        Err(Error::PinLimit { .. }) => {}
        other => panic!("the second tenant's pin passes the total share: {other:?}"),
    }
}

#[tokio::test]
async fn a_deleted_agents_queued_turn_does_not_bring_it_back() {
    let cfg = EngineConfig { max_running: 1, max_batch_tokens: 64, ..config() };
    let (engine, control) = fake_engine(16, 256, cfg);
    let agent = AgentId::new("gone").unwrap();
    let tenant = TenantId::default_tenant();
    let mut first = greedy("first turn", 3);
    first.agent = Some(agent.clone());
    collect(engine.generate(first).unwrap()).await;
    // Hold the only slot, queue the agent's next turn, delete the agent.
    control.step_delay_ms.store(10, Ordering::SeqCst);
    let blocker = engine.generate(greedy("blocker", 30)).unwrap();
    wait_for(&engine, "the blocker running", |s| s.running == 1);
    let mut second = greedy("first turn and more", 3);
    second.agent = Some(agent.clone());
    let queued = engine.generate(second).unwrap();
    engine.delete_agent(&tenant, &agent).await.unwrap();
    let (_, out) = (collect(blocker).await, collect(queued).await);
    assert_eq!(out.error, None, "the turn still runs");
    assert!(matches!(engine.agent(&tenant, &agent).await, Err(Error::UnknownAgent(_))), "and the agent stays deleted");
}

#[test]
fn logit_bias_steers_and_bans_tokens() {
    let (engine, _) = fake_engine(16, 256, config());
    let plain = collect_blocking(engine.generate(greedy("hello", 6)).unwrap());
    // Ban the token greedy decoding chose first: the answer changes.
    let first = plain.tokens[0];
    let mut banned = greedy("hello", 6);
    banned.logit_bias = vec![(first, -100.0)];
    let out = collect_blocking(engine.generate(banned).unwrap());
    assert!(!out.tokens.contains(&first), "{:?} still has {first}", out.tokens);
    // Force a token: +100 on 'q' makes every pick 'q'.
    let mut forced = greedy("hello", 6);
    forced.logit_bias = vec![(u32::from(b'q'), 100.0)];
    assert_eq!(collect_blocking(engine.generate(forced).unwrap()).text, "qqqqqq");
    // Out of the vocabulary: named as logit_bias.
    let mut bad = greedy("hello", 6);
    bad.logit_bias = vec![(1 << 20, 1.0)];
    assert!(matches!(engine.generate(bad), Err(Error::InvalidRequest { field: "logit_bias", .. })));
    let mut bad = greedy("hello", 6);
    bad.stop_token_ids = vec![1 << 20];
    assert!(matches!(engine.generate(bad), Err(Error::InvalidRequest { field: "stop_token_ids", .. })));
}

#[test]
fn a_prompt_longer_than_the_context_in_bytes_alone_is_refused_before_tokenizing() {
    let (engine, _) = fake_engine(16, 256, config());
    // The fake codec's tokens are one byte each: 4096 tokens of context.
    let huge = Request::new(Prompt::Text("x".repeat(5000)));
    assert!(matches!(engine.generate(huge), Err(Error::PromptTooLong { bytes: 5000, .. })));
}

#[test]
fn timeouts_that_would_overflow_the_clock_are_refused() {
    let cfg = EngineConfig { default_timeout: Some(Duration::from_secs(u64::MAX)), ..config() };
    assert!(matches!(cfg.validate(), Err(Error::InvalidConfig(_))));
    let (engine, _) = fake_engine(16, 256, config());
    let mut r = greedy("hi", 2);
    r.timeout = Some(Duration::from_secs(u64::MAX));
    assert!(matches!(engine.generate(r), Err(Error::InvalidRequest { field: "timeout", .. })));
}
