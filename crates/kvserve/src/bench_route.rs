//! `kvserve bench route --simulate`: the router's index and choice at
//! fleet scale, without HTTP or replicas (`router::simulate`): builds the
//! index of a synthetic fleet, then times routing decisions one by one
//! (lock, prefix costs over the prompt's block addresses, bounded choice)
//! and prints a table.

use std::time::Instant;

use anyhow::{bail, Result};

#[derive(clap::Args, Debug)]
pub(crate) struct RouteBenchArgs {
    /// Simulate the fleet in-process (the only mode so far).
    #[arg(long)]
    simulate: bool,
    /// Replicas.
    #[arg(long, default_value_t = 100)]
    replicas: usize,
    /// Distinct blocks indexed, in all.
    #[arg(long, default_value_t = 10_000_000)]
    blocks: usize,
    /// Blocks per synthetic chain (a prompt of 16 × this many tokens).
    #[arg(long, default_value_t = 64)]
    chain_blocks: usize,
    /// Decisions to time.
    #[arg(long, default_value_t = 200_000)]
    decisions: usize,
    /// Seed of the synthetic fleet.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[allow(clippy::print_stdout)] // the table on stdout is this command's output
pub(crate) fn bench_route(args: RouteBenchArgs) -> Result<()> {
    if !args.simulate {
        bail!("only --simulate is implemented: `kvserve bench route --simulate`");
    }
    if args.replicas == 0 || args.replicas > router::index::ReplicaId::MAX {
        bail!("--replicas must be between 1 and {}", router::index::ReplicaId::MAX);
    }
    let params = router::simulate::SimParams {
        replicas: args.replicas,
        blocks: args.blocks,
        chain_blocks: args.chain_blocks,
        decisions: args.decisions,
        seed: args.seed,
    };
    let started = Instant::now();
    let r = router::simulate::simulate(params);
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    println!(
        "fleet: {} replicas, {} blocks in chains of {} | {} decisions, prompts of {:.1} blocks on average | {:.1} s in all",
        r.params.replicas,
        r.params.blocks,
        r.params.chain_blocks,
        r.params.decisions,
        r.prompt_blocks,
        started.elapsed().as_secs_f64()
    );
    println!();
    println!("| index | value |");
    println!("|---|---|");
    println!("| distinct blocks | {} |", r.indexed_blocks);
    println!("| (replica, block) pairs | {} |", r.held_pairs);
    println!("| spilled entries (> 4 holders) | {} |", r.spilled);
    println!(
        "| build (all snapshots applied) | {:.2} s ({:.0} pairs/s) |",
        r.build_seconds,
        r.held_pairs as f64 / r.build_seconds
    );
    println!(
        "| memory, allocated | {:.1} MiB, {:.1} bytes per block |",
        mib(r.index_bytes),
        r.index_bytes as f64 / r.indexed_blocks.max(1) as f64
    );
    if let Some(rss) = r.rss_growth {
        println!(
            "| memory, RSS growth while building | {:.1} MiB, {:.1} bytes per block |",
            mib(rss),
            rss as f64 / r.indexed_blocks.max(1) as f64
        );
    }
    println!();
    println!("| decisions | decisions/s | µs p50 | µs p99 | µs p99.9 | µs max |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} |",
        r.params.decisions,
        r.params.decisions as f64 / r.decide_seconds,
        r.micros[0],
        r.micros[1],
        r.micros[2],
        r.micros[3]
    );
    println!();
    println!("| reason | decisions |");
    println!("|---|---|");
    for (reason, n) in router::policy::Reason::ALL.iter().zip(r.reasons) {
        println!("| {} | {n} |", reason.name());
    }
    Ok(())
}
