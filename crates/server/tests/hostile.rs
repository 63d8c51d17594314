//! Clients that misbehave on purpose, over real sockets against the server's
//! own accept loop (`server::serve`) and the fake model: each test is named
//! after the failure it prevents. Limits are shortened so the tests run in
//! seconds; every wait is bounded by a real timeout, never a hang.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::testing::{FakeCodec, FakeControl, FakeModel};
use engine::{EngineConfig, EngineHandle};
use server::conn::Limits;
use server::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Srv {
    addr: std::net::SocketAddr,
    engine: EngineHandle,
    control: Arc<FakeControl>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Limits short enough for tests.
fn short() -> Limits {
    Limits {
        header_timeout: Duration::from_millis(400),
        body_timeout: Duration::from_millis(400),
        idle_timeout: Duration::from_millis(400),
        write_timeout: Duration::from_millis(400),
        max_connections: 64,
    }
}

async fn start(limits: Limits, blocks: u32, grace: Duration) -> Srv {
    let (model, control) = FakeModel::new(16, blocks);
    let config = EngineConfig {
        model_name: "fake".into(),
        default_timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    };
    let engine = engine::start(Box::new(model), Arc::new(FakeCodec::new()), config).unwrap();
    let app = server::router(engine.clone(), ServerConfig { limits, ..ServerConfig::default() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        let _ = stopped.await;
    };
    let task = tokio::spawn(server::serve(listener, app, engine.clone(), signal, grace, limits));
    Srv { addr, engine, control, stop: Some(stop), task }
}

/// Reads until the peer closes (or `within` passes: then `None`).
async fn read_to_close(s: &mut TcpStream, within: Duration) -> Option<String> {
    let mut out = Vec::new();
    match tokio::time::timeout(within, s.read_to_end(&mut out)).await {
        Ok(Ok(_)) => Some(String::from_utf8_lossy(&out).into_owned()),
        // A reset is a close too.
        Ok(Err(_)) => Some(String::from_utf8_lossy(&out).into_owned()),
        Err(_) => None,
    }
}

fn chat(max_tokens: u32, stream: bool) -> String {
    serde_json::json!({
        "model": "fake", "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": max_tokens, "temperature": 0, "stream": stream,
    })
    .to_string()
}

fn post_head(body_len: usize) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {body_len}\r\n\r\n"
    )
}

async fn wait_idle(engine: &EngineHandle, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let s = engine.stats();
        if s.running == 0 && s.waiting == 0 && s.cache.used_blocks == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "the engine kept work or blocks: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Header limit short, idle limit long: only the header timer can close.
fn header_only() -> Limits {
    Limits { idle_timeout: Duration::from_secs(600), ..short() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_request_line_does_not_hold_a_connection_forever() {
    let srv = start(header_only(), 64, Duration::from_secs(1)).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"POST /v1/chat/compl").await.unwrap();
    let closed = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(closed.is_some(), "the connection stayed open past the header timeout");
}

/// 512 bare connects that never send a byte must not lock everyone out
/// for the idle limit: a silent new connection owes its headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_new_connection_gets_the_header_limit_not_the_idle_one() {
    let srv = start(header_only(), 64, Duration::from_secs(1)).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let closed = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(closed.is_some(), "a silent connection stayed open past the header timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_body_gets_408_instead_of_waiting_forever() {
    let srv = start(short(), 64, Duration::from_secs(1)).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let body = chat(4, false);
    s.write_all(post_head(body.len()).as_bytes()).await.unwrap();
    s.write_all(&body.as_bytes()[..10]).await.unwrap();
    let reply = read_to_close(&mut s, Duration::from_secs(10)).await.expect("answered and closed");
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("\"error\""), "OpenAI error shape: {reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed() {
    let srv = start(short(), 64, Duration::from_secs(1)).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    // The answer comes, the connection is kept alive, then closed when idle.
    let reply = read_to_close(&mut s, Duration::from_secs(10)).await.expect("closed when idle");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_a_client_is_refused_at_once_not_queued() {
    let limits = Limits { max_connections: 4, idle_timeout: Duration::from_secs(60), ..short() };
    let srv = start(limits, 64, Duration::from_secs(1)).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        // A full request each, kept alive: the connection holds its slot.
        s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    let mut extra = TcpStream::connect(srv.addr).await.unwrap();
    let reply = read_to_close(&mut extra, Duration::from_secs(5)).await.expect("refused at once");
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    assert!(reply.contains("Retry-After"), "{reply}");
    // A slot freed is a slot usable again.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
        let reply = read_to_close(&mut s, Duration::from_secs(5)).await.unwrap_or_default();
        if reply.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot never came back: {reply}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A stream whose reader stops reading: tiny receive buffer, never read.
async fn stalled_stream(addr: std::net::SocketAddr, max_tokens: u32) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(addr).await.unwrap();
    // With 20 alternatives per token each chunk is a few KiB: 4,000 of
    // them are far more than the kernel buffers on both sides hold.
    let mut body: serde_json::Value = serde_json::from_str(&chat(max_tokens, true)).unwrap();
    body["logprobs"] = true.into();
    body["top_logprobs"] = 20.into();
    let body = body.to_string();
    s.write_all(post_head(body.len()).as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sse_reader_is_cut_off_and_its_request_cancelled() {
    let srv = start(short(), 256, Duration::from_secs(1)).await;
    // Slower than the stall is noticed (4,000 steps take 8 s or more).
    srv.control.step_delay_ms.store(2, Ordering::SeqCst);
    let _stalled = stalled_stream(srv.addr, 4000).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let f = srv.engine.stats().finished;
        if f.cancelled + f.length + f.error + f.timeout > 0 {
            assert_eq!((f.cancelled, f.length), (1, 0), "cancelled, not run to its end: {f:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the stalled stream was never cut off");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_idle(&srv.engine, Duration::from_secs(10)).await;
    // Others are still served.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let reply = read_to_close(&mut s, Duration::from_secs(5)).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_within_the_grace_whatever_clients_do() {
    // Long client-side limits, so only the shutdown can end these.
    let limits = Limits {
        header_timeout: Duration::from_secs(600),
        body_timeout: Duration::from_secs(600),
        idle_timeout: Duration::from_secs(600),
        write_timeout: Duration::from_secs(600),
        max_connections: 64,
    };
    let grace = Duration::from_millis(500);
    let mut srv = start(limits, 256, grace).await;
    srv.control.step_delay_ms.store(2, Ordering::SeqCst);
    let mut half_line = TcpStream::connect(srv.addr).await.unwrap();
    half_line.write_all(b"GET /hea").await.unwrap();
    let mut half_body = TcpStream::connect(srv.addr).await.unwrap();
    half_body.write_all(post_head(100).as_bytes()).await.unwrap();
    half_body.write_all(b"{\"model\"").await.unwrap();
    let _idle = TcpStream::connect(srv.addr).await.unwrap();
    let _stalled = stalled_stream(srv.addr, 4000).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while srv.engine.stats().running == 0 {
        assert!(Instant::now() < deadline, "the stream never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    srv.stop.take().unwrap().send(()).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(20), srv.task).await;
    let took = started.elapsed();
    assert!(ended.is_ok(), "serve never returned");
    assert!(ended.unwrap().unwrap().is_ok());
    // Grace plus the one second of closing the documented bound promises;
    // the rest is scheduling slack for a loaded CI machine.
    assert!(took < grace + Duration::from_secs(5), "shutdown took {took:?}");
    assert!(read_to_close(&mut half_line, Duration::from_secs(5)).await.is_some());
    assert!(read_to_close(&mut half_body, Duration::from_secs(5)).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_thread_panic_ends_serve_with_an_error_not_a_zombie() {
    let srv = start(short(), 64, Duration::from_millis(200)).await;
    srv.control.panic_at_step.store(1, Ordering::SeqCst);
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let body = chat(4, false);
    s.write_all(post_head(body.len()).as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(20), srv.task).await;
    let result = ended.expect("serve returned after the engine died").unwrap();
    let err = result.expect_err("an error, so the process exits non-zero");
    assert!(err.to_string().contains("engine"), "{err}");
}
