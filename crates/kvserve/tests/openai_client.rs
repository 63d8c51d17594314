//! Tool calling and structured outputs through the official `openai` Python
//! client against `kvserve serve` on the default model: `tools` with auto,
//! required and named choices (streaming included), a Pydantic
//! `response_format` parsed by the client, and a three-turn tool loop as an
//! agent that reports its cached tokens. The checks are in
//! `openai_client.py`; this test sets up a virtual environment with the
//! client (once, under the target directory) and runs it. A second test runs
//! the README's quick-start Python as a new user pastes it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The interpreter the model fetch also uses.
fn python() -> String {
    std::env::var("KVSERVE_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A venv with `openai` (pinned: the Responses and Conversations tests
/// follow its types) and `pydantic`, made on first use (once per test
/// binary: the tests run in parallel and must not build it twice at once).
fn venv() -> PathBuf {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(make_venv).clone()
}

fn make_venv() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("openai-venv");
    let py = dir.join("bin").join("python");
    let ready = dir.join(".ready");
    if !ready.exists() {
        let made = Command::new(python()).args(["-m", "venv"]).arg(&dir).status().expect("python3 runs");
        assert!(made.success(), "python3 -m venv failed");
        let pip = Command::new(&py)
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "openai==2.54.0", "pydantic>=2"])
            .status()
            .expect("pip runs");
        assert!(pip.success(), "pip install openai pydantic failed");
        std::fs::write(&ready, b"").expect("mark the venv ready");
    }
    py
}

/// Runs the checks of `script` (under `tests/`) with the official client
/// against a fresh server; they print "ok" last when all passed.
#[allow(clippy::print_stdout)] // the script's report, shown with the test's output
fn run_checks(script: &str) {
    let py = venv();
    let cache = tempfile::tempdir().expect("a temp dir");
    let server = common::serve(cache.path());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(script);
    let out = Command::new(py).arg(script).arg(format!("http://{}", server.addr)).output().expect("the script runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{stdout}");
    assert!(out.status.success(), "the client's checks failed:\n{stdout}\n{stderr}");
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
}

#[cfg(unix)]
#[test]
fn the_official_client_calls_tools_and_parses_structured_outputs() {
    run_checks("openai_client.py");
}

/// The Responses API through the official client (`openai_responses.py`):
/// create, a `previous_response_id` chain with its prefix cached, a stream
/// through the client's helper, a fork, a function tool round trip, a
/// Pydantic `text_format`, retrieve, input items, delete, `store: false`,
/// conversations (CRUD, responses in one, an item deleted from the middle),
/// and the 400s for what cannot be honoured.
#[cfg(unix)]
#[test]
fn the_official_client_drives_the_responses_api() {
    run_checks("openai_responses.py");
}

/// The base URL the README's examples use; the test points it at its server.
const README_BASE: &str = "http://127.0.0.1:8080/v1";

/// The line that marks a README block this test runs.
const MARKER: &str = "<!-- tested: quickstart";

/// The fenced ```python block after each line starting with `marker` (the
/// fence must be the next non-blank line).
fn marked_python_blocks(text: &str, marker: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if !line.starts_with(marker) {
            continue;
        }
        let fence = lines.by_ref().find(|l| !l.trim().is_empty());
        assert_eq!(fence.map(str::trim_end), Some("```python"), "a ```python fence right after {line:?}");
        let body: Vec<&str> = lines.by_ref().take_while(|l| l.trim_end() != "```").collect();
        blocks.push(body.join("\n") + "\n");
    }
    blocks
}

/// The README's quick start is what a new user pastes first: each marked
/// block runs against a fresh server (its base URL pointed there) and exits
/// 0 within two minutes (a reply without `max_tokens` can stream for many).
#[cfg(unix)]
#[test]
fn the_readme_quick_start_runs_as_pasted() {
    let readme_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let readme = std::fs::read_to_string(readme_path).expect("the README");
    let blocks = marked_python_blocks(&readme, MARKER);
    assert!(!blocks.is_empty(), "no block in README.md is marked {MARKER:?}");
    let py = venv();
    let cache = tempfile::tempdir().expect("a temp dir");
    let server = common::serve(cache.path());
    let scripts = tempfile::tempdir().expect("a temp dir");
    for (i, block) in blocks.iter().enumerate() {
        assert!(block.contains(README_BASE), "quick-start block {i} does not talk to {README_BASE}:\n{block}");
        let path = scripts.path().join(format!("quickstart{i}.py"));
        std::fs::write(&path, block.replace(README_BASE, &format!("http://{}/v1", server.addr))).expect("write");
        let (stdout, stderr) = (scripts.path().join(format!("{i}.out")), scripts.path().join(format!("{i}.err")));
        let started = Instant::now();
        let mut child = Command::new(&py)
            .arg(path)
            .stdout(Stdio::from(std::fs::File::create(&stdout).expect("stdout file")))
            .stderr(Stdio::from(std::fs::File::create(&stderr).expect("stderr file")))
            .spawn()
            .expect("the script runs");
        let limit = Duration::from_secs(120);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break Some(status);
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let out = std::fs::read_to_string(stdout).unwrap_or_default();
        let err = std::fs::read_to_string(stderr).unwrap_or_default();
        println!("quick-start block {i} ({:.1} s):\n{out}", started.elapsed().as_secs_f64());
        let status = status.unwrap_or_else(|| panic!("quick-start block {i} ran past {limit:?}:\n{out}\n{err}"));
        assert!(status.success(), "quick-start block {i} failed ({status}):\n{out}\n{err}");
    }
}
