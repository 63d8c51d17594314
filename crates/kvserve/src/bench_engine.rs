//! `kvserve bench engine`: what the engine delivers end to end.
//!
//! 1. Aggregate throughput at 1, 4, 8 and 16 concurrent streams: each stream
//!    is a greedy request with its own short prompt and a fixed number of
//!    answer tokens (end-of-sequence ignored), submitted together; the rate
//!    is all generated tokens over the wall time, with the mean time to
//!    first token.
//! 2. Time to first token of an agent's turn whose history is cached,
//!    against the same prompt cold (another tenant, so nothing is shared),
//!    for histories of 1k, 2k and 4k tokens. The history is built by a first
//!    turn under the agent; the measured turn adds a 16-token message.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use engine::{AgentId, EngineHandle, Event, Prompt, Request, SamplingParams, TenantId};

use crate::setup::{start_engine, EngineArgs};

#[derive(clap::Args, Debug)]
pub(crate) struct EngineBenchArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Concurrent streams to measure.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 4, 8, 16])]
    streams: Vec<usize>,
    /// Answer tokens per stream.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// History lengths for the cached-vs-cold time to first token.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1024, 2048, 4096])]
    histories: Vec<usize>,
}

/// What one request measured.
pub(crate) struct Timing {
    /// From submission to the first token.
    pub(crate) ttft: Duration,
    /// From the first token to the last (the decode phase).
    pub(crate) decode: Duration,
    pub(crate) tokens: usize,
    pub(crate) cached: usize,
    pub(crate) prompt: usize,
}

/// Runs `req` to its end from a plain thread.
pub(crate) fn run_one(engine: &EngineHandle, req: Request) -> Result<Timing> {
    let start = Instant::now();
    let mut stream = engine.generate(req)?;
    let (mut first, mut last, mut tokens) = (None, start, 0);
    while let Some(ev) = stream.blocking_next() {
        match ev {
            Event::Token { .. } => {
                last = Instant::now();
                first.get_or_insert(last);
                tokens += 1;
            }
            Event::Finished { usage, .. } => {
                let first = first.unwrap_or_else(Instant::now);
                let (ttft, decode) = (first - start, last.max(first) - first);
                return Ok(Timing { ttft, decode, tokens, cached: usage.cached_tokens, prompt: usage.prompt_tokens });
            }
            Event::Prompt { .. } => {}
            Event::Error(e) => return Err(e.into()),
        }
    }
    bail!("the stream ended without finishing")
}

/// A greedy request for `max_tokens` tokens, end-of-sequence ignored.
pub(crate) fn request(prompt: Prompt, max_tokens: usize) -> Request {
    let mut r = Request::new(prompt);
    r.sampling = SamplingParams::greedy();
    r.max_tokens = Some(max_tokens);
    r.ignore_eos = true;
    r
}

/// Token ids of ordinary text, `len` of them (from the model's tokenizer).
pub(crate) fn text_tokens(engine: &EngineHandle, len: usize, salt: usize) -> Result<Vec<u32>> {
    let para = format!(
        "Note {salt}: the harbour was quiet at dawn, and the fishing boats came back one by one with their nets full. "
    );
    let unit = engine.codec().encode(&para)?;
    Ok(unit.iter().copied().cycle().take(len).collect())
}

#[allow(clippy::print_stdout)] // the tables on stdout are this command's output
pub(crate) fn bench_engine(args: EngineBenchArgs) -> Result<()> {
    let started = start_engine(&args.engine, None)?;
    let engine = started.engine;
    println!("{}", started.summary);
    // Warm-up: lets the measured dispatch time every shape once.
    for n in [1, 4] {
        let reqs: Vec<_> =
            (0..n).map(|i| Ok(request(Prompt::Tokens(text_tokens(&engine, 64, i)?), 8))).collect::<Result<_>>()?;
        concurrent(&engine, reqs)?;
    }

    println!();
    println!("| streams | answer tokens each | aggregate tok/s | mean TTFT ms | wall s |");
    println!("|---|---|---|---|---|");
    for &n in &args.streams {
        let reqs: Vec<_> = (0..n)
            .map(|i| Ok(request(Prompt::Tokens(text_tokens(&engine, 32, 100 + i)?), args.tokens)))
            .collect::<Result<_>>()?;
        let start = Instant::now();
        let timings = concurrent(&engine, reqs)?;
        let wall = start.elapsed().as_secs_f64();
        let tokens: usize = timings.iter().map(|t| t.tokens).sum();
        let ttft = timings.iter().map(|t| t.ttft.as_secs_f64()).sum::<f64>() / timings.len().max(1) as f64;
        println!("| {n} | {} | {:.1} | {:.0} | {wall:.2} |", args.tokens, tokens as f64 / wall, ttft * 1e3);
    }

    println!();
    println!("| history tokens | TTFT cached ms | TTFT cold ms | speed-up | cached tokens |");
    println!("|---|---|---|---|---|");
    for (i, &h) in args.histories.iter().enumerate() {
        let history = text_tokens(&engine, h, 1000 + i)?;
        let agent = AgentId::new(&format!("bench-{h}"))?;
        let mut first = request(Prompt::Tokens(history.clone()), 1);
        first.agent = Some(agent.clone());
        run_one(&engine, first)?;
        let mut turn: Vec<u32> = history;
        turn.extend(text_tokens(&engine, 16, 7)?);
        let mut cached = request(Prompt::Tokens(turn.clone()), 1);
        cached.agent = Some(agent);
        let warm = run_one(&engine, cached)?;
        let mut cold = request(Prompt::Tokens(turn), 1);
        cold.tenant = TenantId::new(&format!("cold-{h}"))?;
        let cold = run_one(&engine, cold)?;
        println!(
            "| {h} | {:.1} | {:.1} | {:.1}x | {} |",
            warm.ttft.as_secs_f64() * 1e3,
            cold.ttft.as_secs_f64() * 1e3,
            cold.ttft.as_secs_f64() / warm.ttft.as_secs_f64().max(1e-9),
            warm.cached
        );
    }
    let s = engine.stats();
    println!();
    println!(
        "engine: {} steps, {} preemptions, prefix hit rate {:.1}%, blocks free/used/cached {}/{}/{}",
        s.steps,
        s.preemptions,
        s.prefix_hit_rate() * 100.0,
        s.cache.free_blocks,
        s.cache.used_blocks,
        s.cache.cached_blocks
    );
    Ok(())
}

/// Submits all requests at once and waits for every one.
pub(crate) fn concurrent(engine: &EngineHandle, reqs: Vec<Request>) -> Result<Vec<Timing>> {
    let handles: Vec<_> = reqs
        .into_iter()
        .map(|r| {
            let engine = engine.clone();
            std::thread::spawn(move || run_one(&engine, r))
        })
        .collect();
    handles.into_iter().map(|h| h.join().map_err(|_| anyhow::anyhow!("a bench thread panicked"))?).collect()
}
