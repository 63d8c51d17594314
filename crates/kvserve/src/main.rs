//! `kvserve`: the one binary. Thin: parses arguments, sets up logging and the
//! thread pool, and calls into the library crates.

mod bench;
mod bench_agents;
mod bench_engine;
mod bench_grammar;
mod bench_route;
mod bench_spec;
mod bench_tiers;
mod cache;
mod route;
mod run;
mod serve;
mod setup;

use clap::{Parser, Subcommand};

/// kvserve: LLM inference over a paged, shared, durable KV cache.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (tracing syntax), for example `warn` or `engine=debug`.
    #[arg(long, env = "KVSERVE_LOG", default_value = "info", global = true)]
    log: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the OpenAI-compatible API (the main job): fetches the default
    /// model if needed and listens on 127.0.0.1:8080.
    Serve(serve::ServeArgs),
    /// Route requests to `kvserve serve` replicas by where their prompts'
    /// KV blocks are (agents stick to a home replica), within a load bound.
    Route(route::RouteArgs),
    /// Answer one prompt with the chat template applied, streaming to stdout.
    Run(run::RunArgs),
    /// Measure throughput and print a table.
    Bench(bench::BenchArgs),
    /// List the models `--model NAME` fetches, and which are cached.
    Models,
    /// Show what the disk tier keeps (per model, per agent), or clear it.
    Cache(cache::CacheArgs),
}

/// Options shared by every command that loads a model.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct ModelArgs {
    /// A known model's name (`kvserve models`: `smollm2-135m`, the default,
    /// or `gemma3-270m`), fetched on first use, or the path of a GGUF file.
    #[arg(long, env = "KVSERVE_MODEL")]
    model: Option<String>,
    /// Worker threads for the model (default: all cores).
    #[arg(long, env = "KVSERVE_THREADS")]
    threads: Option<usize>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve::serve(args),
        Command::Route(args) => route::route(args),
        Command::Run(args) => run::run(args),
        Command::Bench(args) => bench::bench(args),
        Command::Models => setup::list_models(),
        Command::Cache(args) => cache::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
