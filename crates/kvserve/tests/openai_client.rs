//! Tool calling and structured outputs through the official `openai` Python
//! client against `kvserve serve` on the default model: `tools` with auto,
//! required and named choices (streaming included), a Pydantic
//! `response_format` parsed by the client, and a three-turn tool loop as an
//! agent that reports its cached tokens. The checks are in
//! `openai_client.py`; this test sets up a virtual environment with the
//! client (once, under the target directory) and runs it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The interpreter the model fetch also uses.
fn python() -> String {
    std::env::var("KVSERVE_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A venv with `openai` and `pydantic`, made on first use.
fn venv() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("openai-venv");
    let py = dir.join("bin").join("python");
    let ready = dir.join(".ready");
    if !ready.exists() {
        let made = Command::new(python()).args(["-m", "venv"]).arg(&dir).status().expect("python3 runs");
        assert!(made.success(), "python3 -m venv failed");
        let pip = Command::new(&py)
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "openai>=1.40,<3", "pydantic>=2"])
            .status()
            .expect("pip runs");
        assert!(pip.success(), "pip install openai pydantic failed");
        std::fs::write(&ready, b"").expect("mark the venv ready");
    }
    py
}

#[cfg(unix)]
#[test]
fn the_official_client_calls_tools_and_parses_structured_outputs() {
    let py = venv();
    let cache = tempfile::tempdir().expect("a temp dir");
    let server = common::serve(cache.path());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("openai_client.py");
    let out = Command::new(py).arg(script).arg(format!("http://{}", server.addr)).output().expect("the script runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{stdout}");
    assert!(out.status.success(), "the client's checks failed:\n{stdout}\n{stderr}");
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
}
