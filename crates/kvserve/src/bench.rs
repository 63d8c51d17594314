//! `kvserve bench model`: prefill and decode throughput of the model
//! runtime, printed as a table with the matmul path that ran.
//!
//! Prefill: one sequence, the whole prompt in one forward call, for each
//! prompt length. Decode: `B` sequences with `--context`-token prompts
//! (32 by default, like `llama-bench`'s empty-context tg; ~730 is an agent
//! turn), then `--steps`
//! greedy steps in which every step is one ragged batch of `B` single-token
//! decodes; the rate is aggregate tokens per second. A short warm-up runs
//! first so the measured dispatch has timings for every shape it will meet;
//! the table after the rates is the dispatch tracker's snapshot.

use std::time::Instant;

use anyhow::Result;
use kv::{KvCache, KvDType, Namespace, OwnerId, SeqId};
use model::dispatch::Path;
use model::{LlamaModel, MatmulPath, Model, PagedLlama};

use crate::setup::{init_threads, resolve_model};
use crate::ModelArgs;

#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(clap::Subcommand, Debug)]
enum BenchWhat {
    /// Prefill and batched decode throughput of the model.
    Model(ModelBenchArgs),
    /// Engine throughput at several concurrent streams, and an agent's
    /// time to first token with its history cached vs cold.
    Engine(crate::bench_engine::EngineBenchArgs),
    /// An agent's next-turn time to first token served from the pool, RAM,
    /// disk and after a restart, against recomputing; disk bandwidth.
    Tiers(crate::bench_tiers::TierBenchArgs),
    /// A seeded multi-agent, multi-turn workload against any
    /// OpenAI-compatible server (`--url`): wall time, TTFT, ITL, cached share.
    Agents(crate::bench_agents::AgentBenchArgs),
    /// Constrained decoding: decode speed with a JSON schema vs without at
    /// 1 and 8 streams, and time to first token with a new tool schema.
    Grammar(crate::bench_grammar::GrammarBenchArgs),
    /// The router's index and choice at fleet scale (`--simulate`: 100
    /// replicas, 10M blocks): decisions per second, latency, memory.
    Route(crate::bench_route::RouteBenchArgs),
    /// Speculative decoding: decode speed with drafting off and on,
    /// alternated on one engine, copy-heavy and plain chat, 1 and 8 streams.
    Spec(crate::bench_spec::SpecBenchArgs),
}

#[derive(clap::Args, Debug)]
struct ModelBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt lengths to prefill.
    #[arg(long, value_delimiter = ',', default_values_t = vec![128, 512])]
    prompt_lens: Vec<usize>,
    /// Concurrent sequences to decode.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 4, 8, 16])]
    batches: Vec<usize>,
    /// Decode steps per batch size.
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Tokens each decoding sequence holds before its first measured step.
    #[arg(long, default_value_t = 32)]
    context: usize,
}

#[allow(clippy::print_stdout)] // the table on stdout is this command's output
pub(crate) fn bench(args: BenchArgs) -> Result<()> {
    let args = match args.what {
        BenchWhat::Model(args) => args,
        BenchWhat::Engine(args) => return crate::bench_engine::bench_engine(args),
        BenchWhat::Tiers(args) => return crate::bench_tiers::bench_tiers(args),
        BenchWhat::Agents(args) => return crate::bench_agents::bench_agents(args),
        BenchWhat::Grammar(args) => return crate::bench_grammar::bench_grammar(args),
        BenchWhat::Route(args) => return crate::bench_route::bench_route(args),
        BenchWhat::Spec(args) => return crate::bench_spec::bench_spec(args),
    };
    init_threads(args.model.threads)?;
    let path = resolve_model(&args.model)?;
    let (base, _) = PagedLlama::open(&path, model::KvSizing::new(16, 4, KvDType::F16), MatmulPath::from_env()?)?;
    let model = &base;
    let threads = rayon::current_num_threads();
    println!("model: {} | threads: {threads} | matmul: {}", path.display(), model.model().matmul_path().name());

    // Warm-up: every shape the measurement will use, enough times for the
    // tracker to have measured both paths.
    for _ in 0..2 {
        for &len in &args.prompt_lens {
            prefill_rate(model, len)?;
        }
        for &b in &args.batches {
            decode_rate(model, b, 4, args.context)?;
        }
    }

    println!();
    println!("| phase | size | tok/s | path (rows bucket: choice) |");
    println!("|---|---|---|---|");
    for &len in &args.prompt_lens {
        let rate = prefill_rate(model, len)?;
        println!("| prefill | {len} tokens | {rate:.1} | {} |", choice(model, len));
    }
    for &b in &args.batches {
        let rate = decode_rate(model, b, args.steps, args.context)?;
        println!("| decode | batch {b} | {rate:.1} | {} |", choice(model, b));
    }

    println!();
    println!("| n | k | rows | quantized µs (samples) | dense µs (samples) | choice |");
    println!("|---|---|---|---|---|---|");
    for r in model.model().perf().snapshot() {
        println!(
            "| {} | {} | {} | {:.1} ({}) | {:.1} ({}) | {} |",
            r.key.n,
            r.key.k,
            r.key.rows,
            r.quantized.0 / 1e3,
            r.quantized.1,
            r.dense.0 / 1e3,
            r.dense.1,
            r.choice.name()
        );
    }
    Ok(())
}

/// The tracker's choices for `rows` activation rows, summarised.
fn choice(model: &PagedLlama, rows: usize) -> String {
    let model: &LlamaModel = model.model();
    let bucket = rows.max(1).next_power_of_two().min(1024);
    let snap: Vec<_> = model.perf().snapshot().into_iter().filter(|r| r.key.rows == bucket).collect();
    if snap.is_empty() {
        return model.matmul_path().name();
    }
    let dense = snap.iter().filter(|r| r.choice == Path::DenseGemm).count();
    format!("{bucket}: {} quantized, {dense} dense", snap.len() - dense)
}

/// The model with fresh arenas and an empty cache for `tokens` tokens.
fn fresh(model: &PagedLlama, tokens: usize) -> Result<(KvCache, PagedLlama)> {
    let m = model.sibling(u32::try_from(tokens.div_ceil(16) + 4)?)?;
    Ok((KvCache::new(m.spec().clone()), m))
}

fn prompt(len: usize, salt: usize) -> Vec<u32> {
    (0..len).map(|i| (1000 + (i * 37 + salt * 101) % 20_000) as u32).collect()
}

fn prefill_rate(model: &PagedLlama, len: usize) -> Result<f64> {
    let (mut cache, mut m) = fresh(model, len)?;
    let seq = cache.create_sequence(&OwnerId::new("bench")?, Namespace::new(b"bench", b""));
    let tokens = prompt(len, 0);
    let start = Instant::now();
    engine::txn::run_step(&mut m, &mut cache, &[(seq, &tokens)], &mut |_, _| {})?;
    Ok(len as f64 / start.elapsed().as_secs_f64())
}

fn decode_rate(model: &PagedLlama, batch: usize, steps: usize, context: usize) -> Result<f64> {
    let context = context.max(1); // a first step needs a token to decode from
    let (mut cache, mut m) = fresh(model, batch * (context + steps + 16))?;
    let owner = OwnerId::new("bench")?;
    let seqs: Vec<SeqId> = (0..batch).map(|_| cache.create_sequence(&owner, Namespace::new(b"bench", b""))).collect();
    let prompts: Vec<Vec<u32>> = (0..batch).map(|i| prompt(context, i)).collect();
    let mut next = run_batch(&mut cache, &mut m, &seqs, &prompts)?;
    let start = Instant::now();
    for _ in 0..steps {
        let work: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
        next = run_batch(&mut cache, &mut m, &seqs, &work)?;
    }
    Ok((batch * steps) as f64 / start.elapsed().as_secs_f64())
}

/// One ragged batch; returns each sequence's greedy next token.
fn run_batch(cache: &mut KvCache, m: &mut PagedLlama, seqs: &[SeqId], tokens: &[Vec<u32>]) -> Result<Vec<u32>> {
    let work: Vec<(SeqId, &[u32])> = seqs.iter().copied().zip(tokens.iter().map(Vec::as_slice)).collect();
    let rows = engine::txn::run_step(m, cache, &work, &mut |_, _| {})?;
    Ok(rows.iter().map(|r| argmax(r)).collect())
}

/// Index of the largest logit (the first of equals).
fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}
