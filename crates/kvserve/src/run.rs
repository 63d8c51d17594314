//! `kvserve run "PROMPT"`: one chat turn through the engine, streamed to
//! stdout as the tokens come. Timings go to stderr.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use engine::{Event, Message, Prompt, Request, SamplingParams};
use kv::KvDType;

use crate::setup::{parse_kv_dtype, start_engine, EngineArgs};
use crate::ModelArgs;

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
    /// K/V element type: f16 (default), bf16 or f32.
    #[arg(long, default_value = "f16", value_parser = parse_kv_dtype)]
    kv_dtype: KvDType,
}

pub(crate) fn run(args: RunArgs) -> Result<()> {
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1]");
    }
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        bail!("--temperature must be a finite number >= 0");
    }
    let engine_args = EngineArgs {
        model: args.model.clone(),
        served_model_names: Vec::new(),
        kv_memory: 256 << 20,
        block_size: kv::CacheSpec::DEFAULT_BLOCK_SIZE,
        kv_dtype: args.kv_dtype,
        max_batch_tokens: 512,
        max_running: 1,
        speculative: engine::Speculation::Auto,
        queue_limit: 1,
        request_timeout: 3600,
        max_agents_per_tenant: 1,
        max_pinned_share: 0.0,
        queue_limit_per_tenant: Some(1),
        max_pinned_share_total: 0.0,
        tenant_weights: Vec::new(),
        // One turn, no agent: nothing to keep below the pool (and no lock
        // on the cache directory a server may be using).
        tiers: crate::setup::TierArgs::none(),
    };
    let started = start_engine(&engine_args, None)?;
    tracing::info!("loaded {}", started.summary);

    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(Message::new("system", system));
    }
    messages.push(Message::new("user", &args.prompt));
    let mut request = Request::new(Prompt::Chat(messages));
    request.max_tokens = Some(args.max_tokens);
    request.sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: Some(args.seed),
        ..SamplingParams::default()
    };
    let start = Instant::now();
    let mut events = started.engine.generate(request)?;
    let mut out = std::io::stdout().lock();
    let mut first: Option<Instant> = None;
    loop {
        match events.blocking_next() {
            Some(Event::Token { text, .. }) => {
                first.get_or_insert_with(Instant::now);
                out.write_all(text.as_bytes())?;
                out.flush()?;
            }
            Some(Event::Prompt { .. }) => {}
            Some(Event::Finished { text, usage, .. }) => {
                writeln!(out, "{text}")?;
                let end = Instant::now();
                let prefill = first.map_or(end - start, |f| f - start);
                let decode = first.map_or(Duration::ZERO, |f| end - f);
                let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
                eprintln!(
                    "[{} prompt tokens: {:.1} tok/s prefill | {} tokens: {:.1} tok/s decode]",
                    usage.prompt_tokens,
                    rate(usage.prompt_tokens, prefill),
                    usage.completion_tokens,
                    rate(usage.completion_tokens.saturating_sub(1), decode)
                );
                return Ok(());
            }
            Some(Event::Error(e)) => return Err(e.into()),
            None => bail!("the engine stopped before the answer ended"),
        }
    }
}
