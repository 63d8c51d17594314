//! Shared by the tests that run `kvserve serve` as a process: start it on a
//! free port, talk HTTP/1.1 to it, read JSON bodies.

#![allow(dead_code, unreachable_pub)] // each test binary uses its own subset

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

pub fn kvserve() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kvserve"))
}

/// One HTTP/1.1 request with `Connection: close`; the whole response.
pub fn http(addr: &str, request: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).expect("timeout");
    s.write_all(request.as_bytes()).expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

/// A running `kvserve serve` (killed when dropped) and its address.
pub struct Server {
    pub child: std::process::Child,
    pub addr: String,
    /// The log up to the line naming the address.
    pub log: Vec<String>,
    /// The lines after it, as they come.
    later: std::sync::Mutex<std::sync::mpsc::Receiver<String>>,
}

impl Server {
    /// Waits (at most `limit`) for a log line containing `needle`, and
    /// returns it.
    pub fn wait_for_log(&self, needle: &str, limit: Duration) -> String {
        let rx = self.later.lock().expect("one reader at a time");
        let deadline = std::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => panic!("no log line with {needle:?} within {limit:?}: {e}"),
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `kvserve serve` on a free port with its disk tier in `cache_dir`.
pub fn serve(cache_dir: &std::path::Path) -> Server {
    serve_with(cache_dir, &[])
}

/// [`serve`] with more flags.
pub fn serve_with(cache_dir: &std::path::Path, extra: &[&str]) -> Server {
    serve_on(cache_dir, 0, extra)
}

/// A free loopback port (for a server that must come back on the same one).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port()
}

/// [`serve_with`] on `port` (0: any free one).
pub fn serve_on(cache_dir: &std::path::Path, port: u16, extra: &[&str]) -> Server {
    let mut cmd = kvserve();
    cmd.args(["serve", "--port", &port.to_string(), "--threads", "2", "--kv-memory", "256MiB", "--cache-dir"])
        .arg(cache_dir)
        .args(extra)
        // The default matmul path, batch-invariant (docs/operations.md:
        // "Reproducibility"), whatever the environment says.
        .env_remove("KVSERVE_MATMUL");
    start_logged(&mut cmd, "listening on http://")
}

/// Starts `cmd` with its log read on a thread, and waits (at most 300 s)
/// for the line where it names its address after `marker`.
pub fn start_logged(cmd: &mut Command, marker: &str) -> Server {
    let mut child = cmd.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().expect("the binary runs");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut log = Vec::new();
    let addr = loop {
        let line = rx.recv_timeout(Duration::from_secs(300)).expect("the process logs its address");
        log.push(line.clone());
        if let Some(rest) = line.split(marker).nth(1) {
            break rest.split_whitespace().next().expect("an address").to_owned();
        }
    };
    Server { child, addr, log, later: std::sync::Mutex::new(rx) }
}

pub fn post(addr: &str, path: &str, body: &str) -> String {
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    http(addr, &req)
}

pub fn get(addr: &str, path: &str) -> String {
    http(addr, &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"))
}

/// The JSON body of a response (chunked transfer encoding undone, as a
/// router relays a replica's answer as it streams).
pub fn json_body(response: &str) -> serde_json::Value {
    let (head, body) = response.split_once("\r\n\r\n").expect("a body");
    let chunked = head.lines().any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding: chunked"));
    let body = if chunked { dechunk(body) } else { body.to_owned() };
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {response}"))
}

/// Chunks may split a character: joined as bytes, then read as UTF-8.
fn dechunk(body: &str) -> String {
    let mut rest = body.as_bytes();
    let mut out = Vec::new();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&rest[..eol]).trim().to_owned();
        let n = usize::from_str_radix(&size, 16).unwrap_or_else(|e| panic!("chunk size {size:?}: {e}"));
        if n == 0 {
            break;
        }
        let data = &rest[eol + 2..];
        out.extend_from_slice(&data[..n]);
        rest = data[n..].strip_prefix(b"\r\n").unwrap_or(&data[n..]);
    }
    String::from_utf8(out).expect("a UTF-8 body")
}

/// A `redis-server` (Debian's) on a free loopback port with its files in a
/// temporary directory, killed when dropped. Tests that need one fail, not
/// skip, where it is not installed (`.ci/run` installs it).
pub struct Redis {
    child: Option<std::process::Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Self {
        let port = free_port();
        let mut r = Self { child: None, port, dir: tempfile::tempdir().expect("a temp dir") };
        r.restart();
        r
    }

    /// Starts it (again, on the same port) and waits until it answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("redis-server must be installed for this test (apt-get install redis-server): {e}")
            });
        self.child = Some(child);
        let started = std::time::Instant::now();
        while !self.answers() {
            assert!(started.elapsed() < Duration::from_secs(20), "redis-server did not answer PING");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether it answers PING.
    pub fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
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

/// The value of an unlabelled metric in a `/metrics` response.
pub fn metric(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits (at most `limit`) until `check` holds.
pub fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(25));
    }
}
