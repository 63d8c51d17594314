//! `kvserve route` in front of real replicas sharing Redis, as processes on
//! loopback: turns of an agent land on one replica and hit its cache; when
//! that replica is killed with -9 the router sends the next turn to another,
//! which resumes the agent from Redis; the killed replica restarted on its
//! port (a new epoch) is read again from its snapshot and routed to.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{free_port, get, json_body, metric, post, serve_on, wait_until, Redis, Server};

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

/// `kvserve route` in front of `replicas` (killed when dropped).
fn route(replicas: &[&str]) -> Server {
    let mut cmd = common::kvserve();
    cmd.args(["route", "--port", "0"]);
    for r in replicas {
        cmd.args(["--replica", r]);
    }
    common::start_logged(&mut cmd, "routing on http://")
}

fn replica(cache: &std::path::Path, port: u16, redis: &Redis) -> Server {
    serve_on(cache, port, &["--remote-cache", &redis.url()])
}

fn turn(addr: &str, messages: &[serde_json::Value]) -> serde_json::Value {
    let body = serde_json::json!({
        "model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 0, "agent_id": "navigator",
    });
    let r = post(addr, "/v1/chat/completions", &body.to_string());
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    json_body(&r)
}

fn cached_share(answer: &serde_json::Value) -> f64 {
    let u = &answer["usage"];
    let prompt = u["prompt_tokens"].as_f64().expect("prompt tokens");
    u["prompt_tokens_details"]["cached_tokens"].as_f64().expect("cached") / prompt
}

/// Which of `replicas` list the agent.
fn holders(replicas: &[&str]) -> Vec<usize> {
    (0..replicas.len())
        .filter(|&i| {
            let list = json_body(&get(replicas[i], "/v1/agents"));
            list["data"].as_array().is_some_and(|a| a.iter().any(|x| x["id"] == "navigator"))
        })
        .collect()
}

#[cfg(unix)]
#[test]
fn an_agent_sticks_to_one_replica_then_resumes_on_another_when_it_dies() {
    let redis = Redis::start();
    let (c0, c1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ports = [free_port(), free_port()];
    let mut servers = [replica(c0.path(), ports[0], &redis), replica(c1.path(), ports[1], &redis)];
    let urls: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
    let addrs: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
    let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let router = route(&urls.iter().map(String::as_str).collect::<Vec<_>>());
    wait_until("the router's replicas healthy", Duration::from_secs(30), || {
        json_body(&get(&router.addr, "/health"))["replicas"]["healthy"] == 2
    });

    let system = "You chart courses for coastal freighters. ".repeat(30);
    let mut messages = vec![serde_json::json!({"role": "system", "content": system})];
    let mut answers = Vec::new();
    for q in ["Where is the nearest port?", "How deep is its channel?", "And at low tide?"] {
        messages.push(serde_json::json!({"role": "user", "content": q}));
        let a = turn(&router.addr, &messages);
        messages.push(serde_json::json!({"role": "assistant", "content": a["choices"][0]["message"]["content"]}));
        answers.push(a);
    }
    let home = holders(&addrs);
    assert_eq!(home.len(), 1, "the agent lives on one replica: {home:?}");
    for a in &answers[1..] {
        assert!(cached_share(a) >= 0.8, "each later turn hits its cache: {}", a["usage"]);
    }
    let m = get(&router.addr, "/metrics");
    assert!(metric(&m, "kvserve_router_decisions_total{reason=\"affinity\"}").unwrap_or(0.0) >= 3.0, "{m}");
    wait_until("the router's index follows the replicas' events", Duration::from_secs(10), || {
        metric(&get(&router.addr, "/metrics"), "kvserve_router_index_blocks").unwrap_or(0.0) > 0.0
    });

    // Its replica dies once its turns are in Redis.
    let home = home[0];
    wait_until("the turns committed to Redis", Duration::from_secs(30), || {
        metric(&get(addrs[home], "/metrics"), "kvserve_tier_remote_commits_total").unwrap_or(0.0) >= 3.0
    });
    let pid = servers[home].child.id().to_string();
    assert!(Command::new("kill").args(["-9", &pid]).status().expect("kill runs").success());
    let _ = servers[home].child.wait();
    messages.push(serde_json::json!({"role": "user", "content": "Plot the course, then."}));
    let resumed = turn(&router.addr, &messages);
    assert!(cached_share(&resumed) >= 0.9, "resumed from Redis on the other replica: {}", resumed["usage"]);
    let other = 1 - home;
    assert_eq!(metric(&get(addrs[other], "/metrics"), "kvserve_agents_resumed_total"), Some(1.0));

    // The dead replica comes back on its port: a new epoch, read again from
    // its snapshot, routable again.
    let cache = if home == 0 { c0.path() } else { c1.path() };
    servers[home] = replica(cache, ports[home], &redis);
    wait_until("the restarted replica healthy and resynced", Duration::from_secs(30), || {
        let m = get(&router.addr, "/metrics");
        json_body(&get(&router.addr, "/health"))["replicas"]["healthy"] == 2
            && metric(&m, "kvserve_router_resyncs_total").unwrap_or(0.0) >= 1.0
    });
}
