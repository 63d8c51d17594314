//! `kvserve cache`: what the disk tier keeps (where, how much, which model,
//! which agents), and clearing it, per store or per agent. The work is
//! `tiers::disk::stores`; this prints it and refuses what would touch a
//! store a server is using.

use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{bail, Result};
use tiers::disk::stores::{self, StoreInfo};

use crate::setup::mib;

/// `kvserve cache [clear ...]`.
#[derive(clap::Args, Debug)]
pub(crate) struct CacheArgs {
    /// The disk tier's directory (as `serve --cache-dir`). Default: `kv` in
    /// the per-user cache directory (`~/.cache/kvserve/kv`).
    #[arg(long, env = "KVSERVE_KV_CACHE_DIR", global = true)]
    cache_dir: Option<PathBuf>,
    #[command(subcommand)]
    action: Option<Action>,
}

#[derive(clap::Subcommand, Debug)]
enum Action {
    /// Delete stores or one agent (refused for a store a server is using:
    /// stop it, or delete the agent through its API).
    Clear(ClearArgs),
}

#[derive(clap::Args, Debug)]
struct ClearArgs {
    /// Every store.
    #[arg(long, conflicts_with_all = ["store", "agent"])]
    all: bool,
    /// The store whose id starts with this (as `kvserve cache` lists it).
    #[arg(long)]
    store: Option<String>,
    /// Only this agent (in every store, or in `--store`'s).
    #[arg(long)]
    agent: Option<String>,
    /// The agent's tenant.
    #[arg(long, default_value = "default", requires = "agent")]
    tenant: String,
}

pub(crate) fn run(args: CacheArgs) -> Result<()> {
    let root = match args.cache_dir {
        Some(d) => d,
        None => model::fetch::cache_dir()?.join("kv"),
    };
    let found = stores::list(&root)?;
    match args.action {
        None => show(&root, &found),
        Some(Action::Clear(c)) => clear(&found, &c),
    }
}

#[allow(clippy::print_stdout)] // the listing on stdout is this command's output
fn show(root: &std::path::Path, found: &[StoreInfo]) -> Result<()> {
    let total: u64 = found.iter().map(|s| s.bytes).sum();
    println!("KV disk cache in {}: {} stores, {}", root.display(), found.len(), mib(total));
    for s in found {
        let busy = if s.in_use { " (in use by a running server)" } else { "" };
        let label = if s.label.is_empty() { "model not recorded" } else { &s.label };
        println!(
            "store {}  {label}: {} in {} records, {} agents{busy}",
            id(s),
            mib(s.bytes),
            s.records,
            s.agents.len()
        );
        for a in &s.agents {
            let when = UNIX_EPOCH + Duration::from_millis(a.last_used_unix_ms);
            println!(
                "  agent {}/{}: {} turns, {} tokens in {} blocks, last used {}, {:?}",
                a.tenant,
                a.agent,
                a.turns,
                a.tokens.len(),
                a.blocks.len(),
                humantime::format_rfc3339_seconds(when),
                a.retention
            );
        }
    }
    if !found.is_empty() {
        println!("(`kvserve cache clear --all`, `--store ID` or `--agent ID [--tenant T]` deletes)");
    }
    Ok(())
}

#[allow(clippy::print_stdout)] // what was deleted, on stdout
fn clear(found: &[StoreInfo], c: &ClearArgs) -> Result<()> {
    if !c.all && c.store.is_none() && c.agent.is_none() {
        bail!("say what to clear: --all, --store ID or --agent ID");
    }
    let chosen: Vec<&StoreInfo> =
        found.iter().filter(|s| c.store.as_deref().is_none_or(|p| id(s).starts_with(&p.to_lowercase()))).collect();
    if chosen.is_empty() {
        bail!("no store matches{}", c.store.as_deref().map(|p| format!(" {p:?}")).unwrap_or_default());
    }
    let mut failed = 0;
    for s in chosen {
        let outcome = match &c.agent {
            None => stores::clear_store(&s.dir).map(|b| format!("store {} deleted ({})", id(s), mib(b))),
            Some(agent) => stores::clear_agent(&s.dir, &c.tenant, agent).map(|n| match n {
                Some(n) => {
                    format!("agent {}/{agent} deleted from store {} ({n} records only it used)", c.tenant, id(s))
                }
                None => format!("store {} has no agent {}/{agent}", id(s), c.tenant),
            }),
        };
        match outcome {
            Ok(said) => println!("{said}"),
            Err(e) => {
                failed += 1;
                eprintln!("store {}: {e}", id(s));
            }
        }
    }
    if failed > 0 {
        bail!("{failed} stores could not be cleared");
    }
    Ok(())
}

/// A store's id: its directory's name (the store fingerprint).
fn id(s: &StoreInfo) -> String {
    s.dir.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}
