//! Replicas sharing a KV tier on Redis, as real processes on loopback: a
//! real `redis-server` (Debian's; these tests fail without it) and
//! `kvserve serve` replicas with `--remote-cache`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{get, json_body, metric, post, serve_with, wait_until, Redis, Server};

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

fn replica(cache: &std::path::Path, redis: &Redis) -> Server {
    serve_with(cache, &["--remote-cache", &redis.url()])
}

/// One greedy chat turn of `agent` (none: no agent); the whole JSON answer.
fn turn(addr: &str, agent: Option<&str>, messages: &[serde_json::Value]) -> serde_json::Value {
    let mut body = serde_json::json!({"model": MODEL, "messages": messages, "max_tokens": 16, "temperature": 0});
    if let Some(a) = agent {
        body["agent_id"] = a.into();
    }
    let r = post(addr, "/v1/chat/completions", &body.to_string());
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    json_body(&r)
}

fn content(answer: &serde_json::Value) -> String {
    answer["choices"][0]["message"]["content"].as_str().expect("an answer").to_owned()
}

fn usage(answer: &serde_json::Value) -> (u64, u64) {
    let u = &answer["usage"];
    (
        u["prompt_tokens"].as_u64().expect("prompt tokens"),
        u["prompt_tokens_details"]["cached_tokens"].as_u64().expect("cached"),
    )
}

fn metrics(addr: &str) -> String {
    get(addr, "/metrics")
}

fn health(addr: &str) -> serde_json::Value {
    json_body(&get(addr, "/health"))
}

/// The promise of the shared tier: an agent whose replica died with
/// `kill -9` resumes on another replica (its own disk empty) from what the
/// first one wrote to Redis: its manifest (so the turn splices onto its
/// own tokens) and its blocks, at least 90% of the prompt cached, and the
/// same greedy tokens as a replica that computes everything.
#[cfg(unix)]
#[test]
fn an_agent_whose_replica_died_resumes_on_another_from_redis() {
    let redis = Redis::start();
    let (cache_a, cache_b, cache_c) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let system = "You are the lighthouse keeper's logbook assistant. ".repeat(30);
    let mut messages = vec![
        serde_json::json!({"role": "system", "content": system}),
        serde_json::json!({"role": "user", "content": "Which ships passed last night?"}),
    ];
    let first = {
        let mut a = replica(cache_a.path(), &redis);
        let answer = turn(&a.addr, Some("keeper"), &messages);
        // Killed once the turn is in Redis (the lag is the durability
        // metric's and the benchmarks' to measure, not this test's).
        wait_until("the turn committed to Redis", Duration::from_secs(30), || {
            metric(&metrics(&a.addr), "kvserve_tier_remote_commits_total").unwrap_or(0.0) >= 1.0
        });
        let pid = a.child.id().to_string();
        assert!(Command::new("kill").args(["-9", &pid]).status().expect("kill runs").success());
        let _ = a.child.wait();
        answer
    };
    messages.push(serde_json::json!({"role": "assistant", "content": content(&first)}));
    messages.push(serde_json::json!({"role": "user", "content": "And which one is due tonight?"}));

    let b = replica(cache_b.path(), &redis);
    let second = turn(&b.addr, Some("keeper"), &messages);
    let (prompt, cached) = usage(&second);
    assert!(cached * 10 >= prompt * 9, "at least 90% of the prompt came from Redis: {}", second["usage"]);
    let m = metrics(&b.addr);
    assert_eq!(metric(&m, "kvserve_agents_resumed_total"), Some(1.0), "resumed from its manifest");
    assert!(metric(&m, "kvserve_tier_remote_read_blocks_total").unwrap_or(0.0) > 0.0);
    assert_eq!(metric(&m, "kvserve_tier_remote_rejected_total{reason=\"payload_checksum\"}"), Some(0.0));
    let agents = json_body(&get(&b.addr, "/v1/agents"));
    assert_eq!(agents["data"][0]["id"], "keeper", "{agents}");
    assert_eq!(agents["data"][0]["turns"], 2, "{agents}");

    // A replica with nothing cached computes the same tokens.
    let c = serve_with(cache_c.path(), &[]);
    let cold = turn(&c.addr, None, &messages);
    assert_eq!(usage(&cold).1, 0, "the reference computed everything");
    assert_eq!(content(&second), content(&cold), "greedy tokens do not depend on where the prefix came from");
}

/// Redis going away mid-run fails no request: the replica serves from its
/// local tiers, `/health` says degraded (still 200) within 2 s, and once
/// Redis is back it reconnects by itself and says ok again.
#[test]
fn redis_killed_and_restarted_fails_no_request_and_health_follows() {
    let mut redis = Redis::start();
    let cache = tempfile::tempdir().unwrap();
    let a = replica(cache.path(), &redis);
    let ask = |agent: &str, q: &str| {
        let messages = [serde_json::json!({"role": "user", "content": q})];
        turn(&a.addr, Some(agent), &messages)
    };
    ask("tide", "When is high tide?");
    assert_eq!(health(&a.addr)["status"], "ok");
    redis.kill();
    wait_until("health says degraded", Duration::from_secs(3), || health(&a.addr)["status"] == "degraded");
    let h = health(&a.addr);
    assert!(h["reason"].as_str().is_some_and(|r| r.contains("remote tier")), "{h}");
    // Served while Redis is down: a new agent (its manifest cannot be
    // looked up), and the same agent again.
    ask("storm", "Is a storm coming?");
    ask("tide", "When is low tide?");
    redis.restart();
    wait_until("health says ok again", Duration::from_secs(6), || health(&a.addr)["status"] == "ok");
    ask("tide", "And tomorrow?");
    let m = metrics(&a.addr);
    assert!(metric(&m, "kvserve_tier_remote_errors_total").unwrap_or(0.0) > 0.0, "the outage is counted");
    // The deferred commits reach Redis once it is back.
    wait_until("commits after the outage", Duration::from_secs(10), || {
        metric(&metrics(&a.addr), "kvserve_tier_remote_commits_total").unwrap_or(0.0) >= 2.0
    });
}

/// What a router asks of the replica an agent moved away from: the agent
/// leaves it (listed nowhere there, its disk copy gone) but stays in Redis,
/// and its next turn on another replica resumes from there.
#[test]
fn a_handed_over_agent_leaves_its_replica_and_resumes_on_another() {
    let redis = Redis::start();
    let (cache_a, cache_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = replica(cache_a.path(), &redis);
    let mut messages = vec![
        serde_json::json!({"role": "system", "content": "You keep the tide tables. ".repeat(30)}),
        serde_json::json!({"role": "user", "content": "High tide today?"}),
    ];
    let first = turn(&a.addr, Some("tides"), &messages);
    wait_until("the turn committed to Redis", Duration::from_secs(30), || {
        metric(&metrics(&a.addr), "kvserve_tier_remote_commits_total").unwrap_or(0.0) >= 1.0
    });
    let r = post(&a.addr, "/v1/agents/tides/hand-over", "");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let listed = json_body(&get(&a.addr, "/v1/agents"));
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(0), "gone from here: {listed}");
    messages.push(serde_json::json!({"role": "assistant", "content": content(&first)}));
    messages.push(serde_json::json!({"role": "user", "content": "And tomorrow?"}));
    let b = replica(cache_b.path(), &redis);
    let (prompt, cached) = usage(&turn(&b.addr, Some("tides"), &messages));
    // All but the new message and the partial last block.
    assert!(cached + 32 >= prompt, "resumed from Redis: {cached} of {prompt}");
}

/// `--remote-write all`: blocks the disk tier's budget pushes out are read
/// back, verified and written to Redis (no agent here, so nothing else is),
/// and their leaving the disk is told in the KV events.
#[test]
fn with_remote_write_all_what_the_disk_budget_evicts_goes_to_redis() {
    let redis = Redis::start();
    let cache = tempfile::tempdir().unwrap();
    // A pool of 22 blocks, no RAM tier and a disk of 5 records: a few
    // prompts push blocks through both.
    let a = common::start_logged(
        common::kvserve()
            .args(["serve", "--port", "0", "--threads", "2", "--kv-memory", "8MiB", "--ram-cache", "0"])
            .args(["--disk-cache", "2MiB", "--remote-write", "all", "--remote-cache", &redis.url(), "--cache-dir"])
            .arg(cache.path())
            .env_remove("KVSERVE_MATMUL"),
        "listening on http://",
    );
    for topic in ["harbours", "glaciers", "orchards", "comets", "bridges"] {
        let q = format!("Tell me about {topic}. {}", "Be thorough, precise and kind. ".repeat(20));
        turn(&a.addr, None, &[serde_json::json!({"role": "user", "content": q})]);
    }
    wait_until("evicted blocks written to Redis", Duration::from_secs(10), || {
        metric(&metrics(&a.addr), "kvserve_tier_remote_written_blocks_total").unwrap_or(0.0) > 0.0
    });
    let m = metrics(&a.addr);
    assert_eq!(metric(&m, "kvserve_tier_remote_commits_total"), Some(0.0), "no agent, no commit");
    let events = json_body(&get(&a.addr, "/v1/kv/events?since=0"));
    let of = |kind: &str, tier: &str| -> std::collections::HashSet<String> {
        let list = events["events"].as_array().expect("events");
        list.iter()
            .filter(|e| e["type"] == kind && e["tier"] == tier)
            .map(|e| e["hash"].as_str().expect("a hash").to_owned())
            .collect()
    };
    let (left_disk, to_remote) = (of("removed", "disk"), of("stored", "remote"));
    assert!(!left_disk.is_empty(), "the disk budget's evictions are told: {events}");
    assert!(!to_remote.is_empty() && to_remote.is_subset(&left_disk), "only what left the disk went up");
}
