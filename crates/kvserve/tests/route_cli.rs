//! `kvserve route` as a process: it starts on a model file's text side
//! alone, reports its replicas on `/health` and `/metrics`, answers 503
//! while none can take a request, and exits cleanly on SIGTERM. (Routing
//! itself is tested in-process over fake replicas: `crates/router/tests`.)

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{get, json_body, kvserve, post, start_logged};

#[cfg(unix)]
#[test]
fn route_starts_without_weights_reports_its_replicas_and_exits_on_sigterm() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let gguf = dir.path().join("tiny.gguf");
    model::tiny::write_tiny_gguf(&gguf, &model::tiny::TinySpec::default()).expect("a tiny model");
    // Port 9 (discard) on loopback: nothing listens, the replica is down.
    let mut cmd = kvserve();
    cmd.args(["route", "--port", "0", "--replica", "http://127.0.0.1:9", "--model"]).arg(&gguf);
    let mut server = start_logged(&mut cmd, "routing on http://");
    let addr = server.addr.clone();
    let health = get(&addr, "/health");
    assert!(health.starts_with("HTTP/1.1 503"), "{health}");
    assert_eq!(
        json_body(&health),
        serde_json::json!({"status": "unavailable", "replicas": {"healthy": 0, "total": 1}})
    );
    let metrics = get(&addr, "/metrics");
    assert!(metrics.contains("kvserve_router_replica_healthy{replica=\"http://127.0.0.1:9\"} 0"), "{metrics}");
    let answer = post(&addr, "/v1/chat/completions", r#"{"model":"tiny","messages":[{"role":"user","content":"hi"}]}"#);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert_eq!(json_body(&answer)["error"]["code"], "no_replica");
    // A web page's rebound name is refused, as `serve` refuses it.
    let rebound = common::http(&addr, "GET /health HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n");
    assert!(rebound.starts_with("HTTP/1.1 403"), "{rebound}");

    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs").success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = server.child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "the router did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn route_needs_a_replica() {
    let out = kvserve()
        .args(["route", "--model", "/nonexistent.gguf"])
        .env_remove("KVSERVE_REPLICAS")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--replica"), "{}", String::from_utf8_lossy(&out.stderr));
}
