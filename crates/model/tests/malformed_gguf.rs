//! Model files from anyone: each hole found in the GGUF loader has a
//! regression test named after it, and a bounded fuzz run (proptest, stable
//! toolchain) mutates tiny and real files and loads them: a typed error or
//! a model, never a panic, never a hang.
//!
//! `KVSERVE_FUZZ_SECONDS` (default 20 per target) sets the fuzz budget; a
//! longer local run: `KVSERVE_FUZZ_SECONDS=600 cargo test -p model --test
//! malformed_gguf --release`.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file::Value;
use kv::KvDType;
use model::tiny::{write_tiny_gguf, TinySpec};
use model::{Error, GgufFile, MatmulPath, PagedLlama};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

fn tiny(dir: &Path, spec: &TinySpec) -> PathBuf {
    let path = dir.join("tiny.gguf");
    write_tiny_gguf(&path, spec).unwrap();
    path
}

/// Everything the server does with a model file before serving it.
fn load(path: &Path) -> model::Result<()> {
    PagedLlama::open(path, model::KvSizing::new(16, 8, KvDType::F16), MatmulPath::Candle).map(drop)
}

/// The offset just after `needle`'s first occurrence.
fn after(bytes: &[u8], needle: &[u8]) -> usize {
    bytes.windows(needle.len()).position(|w| w == needle).unwrap() + needle.len()
}

#[test]
fn general_alignment_zero_is_a_typed_error_not_a_division_panic() {
    let dir = tempfile::tempdir().unwrap();
    for bad in [Value::U32(0), Value::U32(3), Value::U32(1 << 30), Value::I32(-32), Value::String("32".into())] {
        let spec = TinySpec { extra_metadata: vec![("general.alignment".into(), bad.clone())], ..TinySpec::default() };
        let path = tiny(dir.path(), &spec);
        let err = GgufFile::open(&path).unwrap_err();
        assert!(matches!(&err, Error::Metadata { key, .. } if key == "general.alignment"), "{bad:?}: {err}");
        assert!(err.to_string().contains("tiny.gguf"), "names the file: {err}");
    }
}

/// Ways past a pre-scan that reads the header differently from candle:
/// a repeated key (candle keeps the last), a key with a trailing NUL
/// (candle strips it), an alignment after values nested 64 deep.
#[test]
fn an_alignment_of_zero_hidden_from_the_prescan_is_still_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut nested = Value::Array(Vec::new());
    for _ in 0..64 {
        nested = Value::Array(vec![nested]);
    }
    let cases = [
        vec![("general.alignment".to_owned(), Value::U32(32)), ("general.alignment".to_owned(), Value::U32(0))],
        vec![("general.alignment\0".to_owned(), Value::U32(0))],
        vec![("deep".to_owned(), nested), ("general.alignment".to_owned(), Value::U32(0))],
    ];
    for extra in cases {
        let spec = TinySpec { extra_metadata: extra, ..TinySpec::default() };
        let err = GgufFile::open(tiny(dir.path(), &spec)).unwrap_err();
        assert!(matches!(err, Error::Metadata { .. } | Error::Corrupt { .. }), "{err}");
    }
}

#[test]
fn tensor_dims_whose_product_wraps_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = tiny(dir.path(), &TinySpec::default());
    let bytes = std::fs::read(&good).unwrap();
    // [2^59, 32] multiplies to 2^64: zero in wrapping arithmetic.
    let at = after(&bytes, b"blk.0.attn_q.weight");
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    assert_eq!(n_dims, 2);
    for dims in [[32u64, 1 << 59], [1 << 40, 1 << 30], [u64::MAX, 2]] {
        let mut b = bytes.clone();
        b[at + 4..at + 12].copy_from_slice(&dims[0].to_le_bytes());
        b[at + 12..at + 20].copy_from_slice(&dims[1].to_le_bytes());
        let path = dir.path().join("wrap.gguf");
        std::fs::write(&path, &b).unwrap();
        let err = GgufFile::open(&path).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{dims:?}: {err}");
        assert!(err.to_string().contains("blk.0.attn_q.weight"), "names the tensor: {err}");
    }
}

#[test]
fn a_tensor_offset_near_u64_max_is_refused_not_wrapped() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(tiny(dir.path(), &TinySpec::default())).unwrap();
    let at = after(&bytes, b"blk.0.attn_q.weight") + 4 + 16 + 4; // n_dims, 2 dims, dtype
    let mut b = bytes.clone();
    b[at..at + 8].copy_from_slice(&(u64::MAX - 8).to_le_bytes());
    let path = dir.path().join("offset.gguf");
    std::fs::write(&path, &b).unwrap();
    assert!(matches!(GgufFile::open(&path), Err(Error::Corrupt { .. })));
}

// --- fuzzing -------------------------------------------------------------

/// One change to a file's bytes.
#[derive(Clone, Debug)]
enum Mutation {
    /// XOR a byte (position as a fraction of the region).
    Flip(f64, u8),
    /// Overwrite 8 bytes with a value chosen to break arithmetic.
    Word(f64, u64),
    /// Overwrite 4 bytes.
    Half(f64, u32),
    /// Cut the file there.
    Truncate(f64),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let nasty64 =
        prop_oneof![Just(0u64), Just(1), Just(u64::MAX), Just(1 << 59), Just(1 << 32), Just(1 << 63), any::<u64>()];
    let nasty32 = prop_oneof![Just(0u32), Just(1), Just(u32::MAX), Just(1 << 31), Just(9), Just(12), any::<u32>()];
    prop_oneof![
        4 => (0.0..1.0f64, 1..=255u8).prop_map(|(p, x)| Mutation::Flip(p, x)),
        2 => (0.0..1.0f64, nasty64).prop_map(|(p, v)| Mutation::Word(p, v)),
        2 => (0.0..1.0f64, nasty32).prop_map(|(p, v)| Mutation::Half(p, v)),
        1 => (0.0..1.0f64).prop_map(Mutation::Truncate),
    ]
}

/// Applies `muts` within the first `region` bytes (the header, where the
/// structure is; flips in tensor data only change weights).
fn apply(bytes: &mut Vec<u8>, region: usize, muts: &[Mutation]) {
    for m in muts {
        // A cut earlier in the list shortens what the rest can touch.
        let region = region.min(bytes.len());
        if region < 8 {
            return;
        }
        let at = |p: f64, width: usize| ((p * region as f64) as usize).min(region - width);
        match *m {
            Mutation::Flip(p, x) => {
                let i = at(p, 1);
                bytes[i] ^= x;
            }
            Mutation::Word(p, v) => {
                let i = at(p, 8);
                bytes[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            Mutation::Half(p, v) => {
                let i = at(p, 4);
                bytes[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            Mutation::Truncate(p) => bytes.truncate(at(p, 0)),
        }
    }
}

fn fuzz_budget() -> Duration {
    let secs = std::env::var("KVSERVE_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    Duration::from_secs(secs)
}

/// Where mutated copies are written: the original once in full, then per
/// case only the mutated header over it (restored after), so a case costs a
/// small write even for a 98 MB model. A truncated case is written whole
/// (it is shorter than the header) to its own file.
struct Target {
    original: Vec<u8>,
    region: usize,
    full: PathBuf,
    short: PathBuf,
}

impl Target {
    fn new(original: Vec<u8>, region: usize, dir: &Path) -> Self {
        let full = dir.join("fuzzed.gguf");
        std::fs::write(&full, &original).unwrap();
        let region = region.min(original.len());
        Self { original, region, full, short: dir.join("fuzzed-short.gguf") }
    }

    /// Writes `bytes` (the original with its first `region` bytes mutated,
    /// or cut short) and returns where.
    fn write(&self, bytes: &[u8]) -> std::io::Result<&Path> {
        use std::os::unix::fs::FileExt;
        if bytes.len() < self.original.len() {
            std::fs::write(&self.short, bytes)?;
            return Ok(&self.short);
        }
        let f = std::fs::OpenOptions::new().write(true).open(&self.full)?;
        f.write_all_at(&bytes[..self.region], 0)?;
        Ok(&self.full)
    }

    fn restore(&self) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&self.full)?;
        f.write_all_at(&self.original[..self.region], 0)
    }
}

/// Runs batches of proptest cases over mutations of the target's header
/// until the budget is spent; every case must load or fail with a typed
/// error. Returns the number of cases.
fn fuzz(target: &Target, budget: Duration) -> usize {
    let started = Instant::now();
    let mut cases = 0;
    let mut batch = 0u64;
    while started.elapsed() < budget {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&batch.to_le_bytes());
        batch += 1;
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed);
        let config = Config { cases: 8, failure_persistence: None, ..Config::default() };
        let mut runner = TestRunner::new_with_rng(config, rng);
        let result = runner.run(&proptest::collection::vec(mutation(), 1..6), |muts| {
            let mut bytes = target.original.clone();
            apply(&mut bytes, target.region, &muts);
            let path = target.write(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
            // Any outcome but a panic is fine: a typed error or a model.
            let _ = load(path);
            target.restore().map_err(|e| TestCaseError::fail(e.to_string()))?;
            Ok(())
        });
        if let Err(e) = result {
            panic!("a mutated GGUF made the loader fail badly: {e}");
        }
        cases += 8;
    }
    cases
}

#[test]
fn fuzzed_tiny_gguf_files_give_typed_errors_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec { layers: 1, hidden: 32, heads: 2, kv_heads: 1, ffn: 64, ..TinySpec::default() };
    let path = tiny(dir.path(), &spec);
    let bytes = std::fs::read(&path).unwrap();
    // Small enough to mutate everywhere, tensor data included.
    let target = Target::new(bytes.clone(), bytes.len(), dir.path());
    let cases = fuzz(&target, fuzz_budget());
    eprintln!("{cases} mutated tiny files loaded or refused cleanly");
}

#[test]
fn fuzzed_real_gguf_headers_give_typed_errors_never_panics() {
    let path = model::fetch::ensure_default_model(&mut |_| {}).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let header = usize::try_from(GgufFile::open(&path).unwrap().data_offset()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let target = Target::new(bytes, header, dir.path());
    let cases = fuzz(&target, fuzz_budget());
    eprintln!("{cases} mutated copies of the default model's header loaded or refused cleanly");
}
