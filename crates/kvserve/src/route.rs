//! `kvserve route`: the KV-aware router in front of `kvserve serve`
//! replicas (the `router` crate). Loads only the model's text side (the
//! tokenizer and chat template, to compute the replicas' block addresses)
//! and its fingerprint, never its weights; serves until SIGINT/SIGTERM.

use std::net::IpAddr;

use anyhow::{bail, Context, Result};
use model::{GgufFile, LlamaText};

use crate::serve::{allowed_hosts, parse_keys, seconds};
use crate::setup::{parse_bytes, resolve_model};
use crate::ModelArgs;

#[derive(clap::Args, Debug)]
pub(crate) struct RouteArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A replica's base URL (`http://host:port`), repeated or
    /// comma-separated; at least one.
    #[arg(long = "replica", env = "KVSERVE_REPLICAS", value_delimiter = ',', required = true)]
    replicas: Vec<String>,
    /// A replica is skipped for a request while its load (running +
    /// waiting + in flight from this router) exceeds this many times the
    /// mean, plus one: a hot agent or prefix overflows to other replicas.
    #[arg(long, env = "KVSERVE_LOAD_BOUND", default_value_t = 1.5)]
    load_bound: f64,
    /// Blocks of prefill one queued or running request weighs against
    /// when choosing by cache overlap.
    #[arg(long, env = "KVSERVE_LOAD_WEIGHT", default_value_t = 1.0)]
    load_weight: f64,
    /// Tokens per KV block: the replicas' `--block-size` (a replica with
    /// another is refused).
    #[arg(long, env = "KVSERVE_BLOCK_SIZE", default_value_t = 16)]
    block_size: u32,
    /// Address to listen on.
    #[arg(long, env = "KVSERVE_HOST", default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0 picks a free one; the log says which).
    #[arg(long, env = "KVSERVE_PORT", default_value_t = 8080)]
    port: u16,
    /// API keys, `KEY` or `KEY:TENANT`, as the replicas have them: the key
    /// names the tenant, part of every block address. With none, the
    /// router is open (and listens on loopback only).
    #[arg(long = "api-key", env = "KVSERVE_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    api_keys: Vec<String>,
    /// Serve a non-loopback address without API keys.
    #[arg(long)]
    allow_open: bool,
    /// Host names this router answers to without API keys, besides loopback
    /// names and `--host`.
    #[arg(long = "allowed-host", env = "KVSERVE_ALLOWED_HOSTS", value_delimiter = ',')]
    allowed_hosts: Vec<String>,
    /// The key `/metrics` requires, here and on the replicas (the router
    /// sends it to read their KV events; without it, the first API key).
    #[arg(long, env = "KVSERVE_METRICS_KEY", hide_env_values = true)]
    metrics_key: Option<String>,
    /// Largest request body, e.g. `4MiB`.
    #[arg(long, env = "KVSERVE_MAX_BODY", default_value = "4MiB", value_parser = parse_bytes)]
    max_body: u64,
    /// Seconds in-flight requests get to finish at shutdown.
    #[arg(long, env = "KVSERVE_SHUTDOWN_GRACE", default_value_t = 10)]
    shutdown_grace: u64,
}

pub(crate) fn route(args: RouteArgs) -> Result<()> {
    let api_keys = parse_keys(&args.api_keys)?;
    if api_keys.is_empty() && !args.host.is_loopback() && !args.allow_open {
        bail!(
            "refusing to route {} without API keys: pass --api-key KEY[:TENANT] (or KVSERVE_API_KEYS), \
             or --allow-open to serve it open",
            args.host
        );
    }
    let grace = seconds("--shutdown-grace", args.shutdown_grace.max(1))?;
    let path = resolve_model(&args.model)?;
    let file = GgufFile::open(&path)?;
    let codec = LlamaText::from_gguf(&file).with_context(|| format!("reading the tokenizer of {}", path.display()))?;
    let fingerprint = model::model_fingerprint(&file);
    drop(file);
    // The replicas' KV event API wants their metrics key, or any API key.
    let first_key = args.api_keys.iter().map(|k| k.trim()).find(|k| !k.is_empty()).map(|k| match k.split_once(':') {
        Some((key, _)) => key.to_owned(),
        None => k.to_owned(),
    });
    let replica_key = args.metrics_key.clone().or(first_key);
    let guard =
        server::Guard::new(api_keys, args.metrics_key.clone(), &allowed_hosts(args.host, &args.allowed_hosts), &[]);
    let mut config = router::Config::new(args.replicas.clone(), std::sync::Arc::new(codec), fingerprint);
    config.block_size = args.block_size as usize;
    config.guard = guard;
    config.replica_key = replica_key;
    config.load_bound = args.load_bound;
    config.load_weight = args.load_weight;
    config.max_body_bytes = usize::try_from(args.max_body).unwrap_or(usize::MAX);
    let limits = server::conn::Limits::default();
    config.body_timeout = limits.body_timeout;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kvserve-route")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((args.host, args.port))
            .await
            .with_context(|| format!("listening on {}:{}", args.host, args.port))?;
        let addr = listener.local_addr()?;
        let router = router::KvRouter::start(config)?;
        tracing::info!(
            model = %path.display(),
            replicas = args.replicas.len(),
            "routing on http://{addr} (load bound {}, block size {})",
            args.load_bound,
            args.block_size
        );
        server::conn::serve_with_limits(listener, router.app(), limits, server::shutdown_signal(), grace, || {})
            .await
            .context("serving")?;
        tracing::info!("stopped");
        Ok(())
    })
}
