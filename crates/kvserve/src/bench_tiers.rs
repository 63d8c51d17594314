//! `kvserve bench tiers`: what each tier saves an agent's next turn.
//!
//! For each history length, an agent's first turn builds the history; then
//! each measured turn adds a 16-token message and asks for one token (its
//! time to first token is the prefill of whatever was not reused):
//!
//! | row | the history's blocks were |
//! |---|---|
//! | T0 | still in the pool |
//! | T1 | moved to the RAM tier (`offload_agent`) |
//! | T2 | moved to the disk tier and dropped from the page cache |
//! | restart | on disk, read by a new engine after a clean stop (page cache dropped), asked at once |
//! | restart +1 s | the same, for a second agent asked a second after the start (the prewarm into RAM has run) |
//! | other replica | with `--remote-cache`: only in Redis, asked of a new engine on an empty disk (a replica the agent never ran on) |
//! | recompute | nowhere: the same prompt under another tenant |
//!
//! Then the disk tier's own write and cold-read bandwidth with records of
//! this model's size, and with `--remote-cache` the remote tier's.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use engine::{AgentId, EngineHandle, Prompt, Request, TenantId};

use crate::bench_engine::{run_one, text_tokens, Timing};
use crate::setup::{start_engine, EngineArgs, Started};

#[derive(clap::Args, Debug)]
pub(crate) struct TierBenchArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// History lengths, in tokens.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1024, 4096, 8000])]
    histories: Vec<usize>,
    /// Records written and read for the bandwidth rows.
    #[arg(long, default_value_t = 512)]
    records: usize,
}

fn request(tokens: Vec<u32>, agent: Option<&AgentId>) -> Request {
    let mut r = crate::bench_engine::request(Prompt::Tokens(tokens), 1);
    r.agent = agent.cloned();
    r
}

#[allow(clippy::print_stdout)] // the tables on stdout are this command's output
pub(crate) fn bench_tiers(mut args: TierBenchArgs) -> Result<()> {
    let scratch = tempfile::tempdir().context("a scratch directory for the disk tier")?;
    if args.engine.tiers.cache_dir.is_none() {
        args.engine.tiers.cache_dir = Some(scratch.path().join("kv"));
    }
    if args.engine.tiers.disk_cache == 0 || args.engine.tiers.ram_cache == Some(0) {
        bail!("bench tiers needs both the RAM and the disk tier (--ram-cache, --disk-cache not 0)");
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut started = start_engine(&args.engine, None)?;
    println!("{}", started.summary);
    // Warm-up: the measured dispatch times the shapes once.
    run_one(&started.engine, request(text_tokens(&started.engine, 256, 0)?, None))?;

    println!();
    println!("| history tokens | TTFT T0 pool ms | T1 RAM ms | T2 disk ms | after restart ms | restart +1 s ms | other replica ms | recompute ms | RAM import ms | disk load ms | restart load ms | cached at restart | cached on other replica |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let remote = args.engine.tiers.remote_cache.is_some();
    let mut replica_notes = Vec::new();
    for (i, &h) in args.histories.iter().enumerate() {
        let engine = started.engine.clone();
        let agent = AgentId::new(&format!("bench-{h}"))?;
        let mut conversation = text_tokens(&engine, h, 1000 + i)?;
        run_one(&engine, request(conversation.clone(), Some(&agent)))?;
        // A second agent, asked a second after the restart.
        let late = AgentId::new(&format!("bench-{h}-late"))?;
        let mut late_conversation = text_tokens(&engine, h, 5000 + i)?;
        run_one(&engine, request(late_conversation.clone(), Some(&late)))?;
        let mut turn = |engine: &EngineHandle, salt: usize| -> Result<Timing> {
            // The one answer token is sampled, never fed: the agent holds
            // exactly the prompt, and the next turn extends it.
            conversation.extend(text_tokens(engine, 16, salt)?);
            run_one(engine, request(conversation.clone(), Some(&agent)))
        };
        let t0 = turn(&engine, 1)?;
        rt.block_on(engine.offload_agent(&TenantId::default_tenant(), &agent, engine::OffloadTo::FirstTier))?;
        let before = engine.stats().tiers.counters;
        let t1 = turn(&engine, 2)?;
        let import_ms = (engine.stats().tiers.counters.promote_seconds - before.promote_seconds) * 1e3;
        rt.block_on(engine.offload_agent(&TenantId::default_tenant(), &agent, engine::OffloadTo::SecondTier))?;
        rt.block_on(engine.flush_tiers(Duration::from_secs(60)))?;
        rt.block_on(engine.forget_disk_cache())?;
        let before = engine.stats().tiers.counters.load_latency.sum;
        let t2 = turn(&engine, 3)?;
        let load_ms = (engine.stats().tiers.counters.load_latency.sum - before) * 1e3;
        // Restart: a clean stop, a new engine on the same directory.
        rt.block_on(engine.flush_tiers(Duration::from_secs(60)))?;
        rt.block_on(engine.shutdown(Duration::from_secs(30)))?;
        drop(engine);
        started = start_engine(&args.engine, None)?;
        let engine = started.engine.clone();
        rt.block_on(engine.forget_disk_cache())?;
        let restarted = turn(&engine, 4)?;
        let restart_load_ms = engine.stats().tiers.counters.load_latency.sum * 1e3;
        std::thread::sleep(Duration::from_secs(1));
        late_conversation.extend(text_tokens(&engine, 16, 6)?);
        let restarted_late = run_one(&engine, request(late_conversation.clone(), Some(&late)))?;
        let replica = if remote {
            // Every turn is in Redis within the commit lag.
            rt.block_on(engine.flush_tiers(Duration::from_secs(60)))?;
            std::thread::sleep(Duration::from_millis(500));
            let mut other = args.engine.clone();
            other.tiers.cache_dir = Some(scratch.path().join(format!("replica-{h}")));
            let b = start_engine(&other, None)?;
            let t = turn(&b.engine, 7)?;
            let s = b.engine.stats();
            let r = s.tiers.tiers.iter().find_map(|x| x.remote.clone()).unwrap_or_default();
            replica_notes.push(format!(
                "{h}: agent resumed {}, its load {:.1} ms, {} blocks read from Redis in {} round trips of {:.1} ms total",
                s.tiers.counters.agents_resumed,
                s.tiers.counters.load_latency.sum * 1e3,
                r.read_blocks,
                r.fetch_latency.count(),
                r.fetch_latency.sum * 1e3,
            ));
            rt.block_on(b.engine.shutdown(Duration::from_secs(30)))?;
            Some(t)
        } else {
            None
        };
        let mut cold = request(conversation.clone(), None);
        cold.tenant = TenantId::new(&format!("cold-{h}"))?;
        let cold = run_one(&engine, cold)?;
        let ms = |t: &Timing| t.ttft.as_secs_f64() * 1e3;
        let (replica_ms, replica_cached) = match &replica {
            Some(t) => (format!("{:.1}", ms(t)), format!("{} of {}", t.cached, t.prompt)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {h} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {replica_ms} | {:.0} | {import_ms:.1} | {load_ms:.1} | {restart_load_ms:.1} | {} of {} | {replica_cached} |",
            ms(&t0),
            ms(&t1),
            ms(&t2),
            ms(&restarted),
            ms(&restarted_late),
            ms(&cold),
            restarted.cached,
            restarted.prompt
        );
        if [&t0, &t1, &t2, &restarted].iter().any(|t| t.cached + 64 < t.prompt) {
            println!(
                "(a turn reused less than its history: {} {} {} {})",
                t0.cached, t1.cached, t2.cached, restarted.cached
            );
        }
    }
    for n in &replica_notes {
        println!("other replica, {n}");
    }
    let s = started.engine.stats();
    let c = &s.tiers.counters;
    println!();
    println!(
        "tiers: {} promoted from RAM, {} loaded from disk (load p50 bucket sum {:.1} ms over {} loads), {} skipped, {} dropped",
        c.tier("ram").to_pool,
        c.tier("disk").to_pool,
        c.load_latency.sum * 1e3,
        c.load_latency.count(),
        c.loads_skipped,
        c.dropped
    );
    bandwidth(&started, &args, scratch.path())?;
    if let Some(url) = &args.engine.tiers.remote_cache {
        remote_bandwidth(&started, &args, url)?;
    }
    Ok(())
}

/// Synthetic chained keys of `n` blocks.
fn chain_keys(n: usize, block_size: usize, salt: &[u8]) -> Vec<kv::BlockKey> {
    let ns = kv::Namespace::new(b"bench", salt);
    let mut parent = None;
    (0..n)
        .map(|i| {
            let tokens: Vec<u32> = (0..block_size as u32).map(|t| t + 16 * i as u32).collect();
            let k = kv::BlockKey::new(ns, parent, &tokens);
            parent = Some(k.hash);
            k
        })
        .collect()
}

/// The remote tier's write and read bandwidth with records of this model's
/// payload size: the chain of a 2,048-token history (what an agent resumed
/// on another replica reads) and of all `--records`.
#[allow(clippy::print_stdout)]
fn remote_bandwidth(started: &Started, args: &TierBenchArgs, url: &str) -> Result<()> {
    use std::sync::{mpsc, Arc, Mutex};
    use tiers::Tier;
    let payload = started.block_bytes;
    let block_size = started.block_size;
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let sink: tiers::EventSink = Arc::new(move |ev| {
        if let Ok(tx) = tx.lock() {
            let _ = tx.send(ev);
        }
    });
    let fp = tiers::StoreFingerprint::from_bytes([0xbf; 16]);
    let config = tiers::RemoteConfig { take_evictions: true, ..tiers::RemoteConfig::new(url) };
    let mut tier = tiers::RemoteTier::open(config, fp, block_size, payload, sink)?;
    if let Some(reason) = tier.degraded() {
        bail!("the remote store does not answer: {reason}");
    }
    println!();
    println!("| remote tier ({}), records of {} KiB | MB/s | ms total | ms per record |", tier.url(), payload >> 10);
    println!("|---|---|---|---|");
    let salt = format!("{}", std::process::id());
    for (what, n) in [("a 2,048-token history", 2048 / block_size), ("all records", args.records)] {
        let keys = chain_keys(n, block_size, salt.as_bytes());
        let bytes = (n * payload) as f64;
        let start = Instant::now();
        for k in &keys {
            tier.store(0, k.clone(), vec![0x5a; payload]);
            if tier.stats().queued_bytes > 128 << 20 {
                tier.flush(Duration::from_secs(120));
            }
        }
        tier.flush(Duration::from_secs(120));
        let write = start.elapsed();
        let load = 100 + n as u64;
        let tasks = keys
            .iter()
            .enumerate()
            .map(|(i, k)| tiers::LoadTask { load, index: i, group: 0, expected: k.clone() })
            .collect();
        let start = Instant::now();
        let _ = tier.load(tasks);
        let mut ok = 0;
        for _ in 0..n {
            if let Ok(tiers::TierEvent::Loaded { result: Ok(_), .. }) = rx.recv_timeout(Duration::from_secs(60)) {
                ok += 1;
            }
        }
        let read = start.elapsed();
        let row = |op: &str, d: Duration| {
            println!(
                "| {op} {what}, {n} records ({ok} ok) | {:.0} | {:.1} | {:.2} |",
                bytes / d.as_secs_f64() / 1e6,
                d.as_secs_f64() * 1e3,
                d.as_secs_f64() * 1e3 / n as f64
            );
        };
        row("write (SET NX, pipelined)", write);
        row("read + verify (GETEX, 8 per round trip)", read);
    }
    Ok(())
}

/// The disk tier's write (synced) and cold-read bandwidth, with records of
/// this model's payload size, in a directory of its own.
#[allow(clippy::print_stdout)]
fn bandwidth(started: &Started, args: &TierBenchArgs, scratch: &std::path::Path) -> Result<()> {
    use std::sync::{mpsc, Arc, Mutex};
    let payload = started.block_bytes;
    let block_size = started.block_size;
    let dir = scratch.join("bandwidth");
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let sink: tiers::EventSink = Arc::new(move |ev| {
        if let Ok(tx) = tx.lock() {
            let _ = tx.send(ev);
        }
    });
    let fp = tiers::StoreFingerprint::from_bytes([0xbe; 16]);
    let opened = tiers::DiskTier::open(tiers::DiskConfig::new(&dir, u64::MAX / 2), fp, block_size, payload, sink)?;
    let tier = opened.tier;
    let keys = chain_keys(args.records, block_size, b"");
    let bytes = (args.records * payload) as f64;
    let start = Instant::now();
    // In chunks the write queue accepts, as the engine hands them over.
    for chunk in keys.chunks(64) {
        for k in chunk {
            tier.demote(0, k.clone(), vec![0x5a; payload]);
        }
        tier.flush(Duration::from_secs(120));
    }
    let write = start.elapsed();
    tier.forget_cached();
    let start = Instant::now();
    let tasks = keys
        .iter()
        .enumerate()
        .map(|(i, k)| tiers::LoadTask { load: 1, index: i, group: 0, expected: k.clone() })
        .collect();
    tier.load(tasks);
    let mut ok = 0;
    for _ in 0..keys.len() {
        if let Ok(tiers::TierEvent::Loaded { result: Ok(_), .. }) = rx.recv_timeout(Duration::from_secs(60)) {
            ok += 1;
        }
    }
    let read = start.elapsed();
    println!();
    println!("| disk tier, {} records of {} KiB | MB/s | ms per record |", args.records, payload >> 10);
    println!("|---|---|---|");
    println!(
        "| write (temp + rename, one sync per batch) | {:.0} | {:.2} |",
        bytes / write.as_secs_f64() / 1e6,
        write.as_secs_f64() * 1e3 / args.records as f64
    );
    println!(
        "| cold read + verify, 4 readers ({ok} ok) | {:.0} | {:.2} |",
        bytes / read.as_secs_f64() / 1e6,
        read.as_secs_f64() * 1e3 / args.records as f64
    );
    Ok(())
}
