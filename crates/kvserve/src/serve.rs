//! `kvserve serve`: the main job. Loads the model (fetching the default one
//! on first use), starts the engine and serves the OpenAI-compatible API
//! until SIGINT/SIGTERM, then stops accepting, lets in-flight requests
//! finish within the grace period and exits.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use engine::TenantId;
use server::ServerConfig;

use crate::setup::{parse_bytes, start_engine, EngineArgs};

#[derive(clap::Args, Debug)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Address to listen on.
    #[arg(long, env = "KVSERVE_HOST", default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0 picks a free one; the log says which).
    #[arg(long, env = "KVSERVE_PORT", default_value_t = 8080)]
    port: u16,
    /// API keys, `KEY` or `KEY:TENANT`, comma-separated or repeated. With
    /// none, the server is open (and listens on loopback only).
    #[arg(long = "api-key", env = "KVSERVE_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    api_keys: Vec<String>,
    /// Largest request body, e.g. `4MiB`.
    #[arg(long, env = "KVSERVE_MAX_BODY", default_value = "4MiB", value_parser = parse_bytes)]
    max_body: u64,
    /// Seconds in-flight requests get to finish at shutdown.
    #[arg(long, env = "KVSERVE_SHUTDOWN_GRACE", default_value_t = 10)]
    shutdown_grace: u64,
    /// Block quotas per tenant, `TENANT:BLOCKS`, comma-separated or repeated
    /// (a hybrid model's sliding-window pages count too, each as the blocks
    /// its bytes make).
    #[arg(long = "tenant-quota", env = "KVSERVE_TENANT_QUOTAS", value_delimiter = ',')]
    tenant_quotas: Vec<String>,
    /// Highest priority a client may give a request or agent (from -1000);
    /// the default 0 lets clients only lower theirs.
    #[arg(long, env = "KVSERVE_MAX_PRIORITY", default_value_t = 0, allow_negative_numbers = true)]
    max_priority: i32,
    /// Serve a non-loopback address without API keys (anyone who can reach
    /// it can use it).
    #[arg(long)]
    allow_open: bool,
    /// Host names this server answers to without API keys, besides loopback
    /// names and `--host` (a web page can reach the server under its own
    /// name through DNS rebinding: such requests are refused).
    #[arg(long = "allowed-host", env = "KVSERVE_ALLOWED_HOSTS", value_delimiter = ',')]
    allowed_hosts: Vec<String>,
    /// Browser origins allowed to call the API (CORS), e.g.
    /// `https://app.example.com`; none by default.
    #[arg(long = "cors-origin", env = "KVSERVE_CORS_ORIGINS", value_delimiter = ',')]
    cors_origins: Vec<String>,
    /// Seconds a stored response (`POST /v1/responses` with `store`) is
    /// kept; 30 days by default, as OpenAI keeps them.
    #[arg(long, env = "KVSERVE_RESPONSES_TTL", default_value_t = 30 * 24 * 3600, value_parser = clap::value_parser!(u64).range(1..))]
    responses_ttl: u64,
    /// Serve no web page: without it, `/` is a chat with the model and a
    /// live view of the cache (assets built in, no network needed).
    #[arg(long, env = "KVSERVE_NO_UI")]
    no_ui: bool,
    /// The key `/metrics` requires (`Authorization: Bearer KEY`); without
    /// it, with API keys, any API key reads the metrics.
    #[arg(long, env = "KVSERVE_METRICS_KEY", hide_env_values = true)]
    metrics_key: Option<String>,
    /// Seconds a request's headers may take from their first byte.
    #[arg(long, env = "KVSERVE_HEADER_TIMEOUT", default_value_t = 10)]
    header_timeout: u64,
    /// Seconds a request's body may take.
    #[arg(long, env = "KVSERVE_BODY_TIMEOUT", default_value_t = 60)]
    body_timeout: u64,
    /// Seconds a kept-alive connection may sit idle.
    #[arg(long, env = "KVSERVE_IDLE_TIMEOUT", default_value_t = 75)]
    idle_timeout: u64,
    /// Seconds writes to a client may stay blocked (a stream nobody reads
    /// is cancelled and its blocks freed).
    #[arg(long, env = "KVSERVE_WRITE_TIMEOUT", default_value_t = 30)]
    write_timeout: u64,
    /// Connections open at once; past it new ones get a 503 at once.
    #[arg(long, env = "KVSERVE_MAX_CONNECTIONS", default_value_t = 512)]
    max_connections: usize,
}

/// Seconds as a duration, refused when zero or beyond a year.
pub(crate) fn seconds(flag: &str, s: u64) -> Result<Duration> {
    if s == 0 || s > 365 * 24 * 3600 {
        bail!("{flag} must be between 1 second and a year");
    }
    Ok(Duration::from_secs(s))
}

/// API keys (`KEY` or `KEY:TENANT`) to their tenants.
pub(crate) fn parse_keys(keys: &[String]) -> Result<HashMap<String, TenantId>> {
    let mut map = HashMap::new();
    for entry in keys.iter().map(|k| k.trim()).filter(|k| !k.is_empty()) {
        let (key, tenant) = match entry.split_once(':') {
            Some((k, t)) => (k, TenantId::new(t).with_context(|| format!("the tenant of an API key ({t:?})"))?),
            None => (entry, TenantId::default_tenant()),
        };
        if key.len() < 8 {
            bail!("API keys must be at least 8 characters");
        }
        map.insert(key.to_owned(), tenant);
    }
    Ok(map)
}

fn parse_quotas(quotas: &[String]) -> Result<Vec<(TenantId, u32)>> {
    quotas
        .iter()
        .map(|q| q.trim())
        .filter(|q| !q.is_empty())
        .map(|q| {
            let (t, n) = q.split_once(':').with_context(|| format!("tenant quota {q:?} is not TENANT:BLOCKS"))?;
            let blocks = n.parse::<u32>().with_context(|| format!("tenant quota {q:?}: {n:?} is not a block count"))?;
            Ok((TenantId::new(t)?, blocks))
        })
        .collect()
}

/// The host names an open server answers to besides loopback ones: the
/// `--allowed-host` names and the `--host` address.
pub(crate) fn allowed_hosts(host: IpAddr, extra: &[String]) -> Vec<String> {
    let mut names: Vec<String> = extra.iter().map(|h| h.trim().to_ascii_lowercase()).collect();
    names.push(match host {
        IpAddr::V6(ip) => format!("[{ip}]"),
        IpAddr::V4(ip) => ip.to_string(),
    });
    names
}

pub(crate) fn serve(args: ServeArgs) -> Result<()> {
    let api_keys = parse_keys(&args.api_keys)?;
    let quotas = parse_quotas(&args.tenant_quotas)?;
    if api_keys.is_empty() && !args.host.is_loopback() && !args.allow_open {
        bail!(
            "refusing to serve {} without API keys: pass --api-key KEY[:TENANT] (or KVSERVE_API_KEYS), \
             or --allow-open to serve it open",
            args.host
        );
    }
    let max_body = usize::try_from(args.max_body).unwrap_or(usize::MAX);
    let limits = server::conn::Limits {
        header_timeout: seconds("--header-timeout", args.header_timeout)?,
        body_timeout: seconds("--body-timeout", args.body_timeout)?,
        idle_timeout: seconds("--idle-timeout", args.idle_timeout)?,
        write_timeout: seconds("--write-timeout", args.write_timeout)?,
        max_connections: args.max_connections.max(1),
    };
    let grace = seconds("--shutdown-grace", args.shutdown_grace.max(1))?;
    for origin in &args.cors_origins {
        server::check_cors_origin(origin).map_err(|e| anyhow::anyhow!("--cors-origin: {e}"))?;
    }
    let allowed_hosts = allowed_hosts(args.host, &args.allowed_hosts);
    let mut engine_args = args.engine.clone();
    let tenants: std::collections::HashSet<_> = api_keys.values().collect();
    if engine_args.queue_limit_per_tenant.is_none() && tenants.len() > 1 {
        // Several tenants: none may fill the whole queue.
        engine_args.queue_limit_per_tenant = Some((engine_args.queue_limit / 4).max(1));
    }
    let started = start_engine(&engine_args, None)?;
    tracing::info!("loaded {}", started.summary);
    if let (Some(disk), Some(d)) = (
        started.engine.stats().tiers.tiers.iter().find(|t| t.name == "disk").cloned(),
        &started.engine.config().tiers.disk,
    ) {
        tracing::info!(
            "KV disk cache in {}: {} of agents' and evicted blocks kept, up to {} (--disk-cache); `kvserve cache` shows and clears it",
            d.root.display(),
            crate::setup::mib(disk.bytes),
            crate::setup::mib(disk.budget),
        );
    }
    // The grammar compiler's token trie, built soon after start rather than
    // on the first request with tools or a schema (which builds it at once
    // if it comes first), a few seconds in and at the lowest CPU priority:
    // its ~150 ms of work slowed the first turn after a restart by ~25 ms
    // even at nice 19 (on 2 cores, measured).
    let warm = started.engine.clone();
    std::thread::spawn(move || {
        lowest_priority();
        std::thread::sleep(GRAMMAR_WARM_DELAY);
        warm.warm_grammars();
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kvserve-http")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((args.host, args.port))
            .await
            .with_context(|| format!("listening on {}:{}", args.host, args.port))?;
        let addr = listener.local_addr()?;
        let auth = if api_keys.is_empty() {
            "without API keys (anyone who reaches it may use it)".to_owned()
        } else {
            format!("with {} API keys", api_keys.len())
        };
        let also = started.model_aliases.join(", ");
        tracing::info!(model = %started.model_name, also = %also, "listening on http://{addr} {auth}");
        if !args.no_ui {
            tracing::info!("web page: chat and cache view at http://{addr}/ (--no-ui turns it off)");
        }
        let engine = started.engine.clone();
        for (tenant, blocks) in &quotas {
            engine.set_quota(tenant, Some(*blocks)).await?;
            tracing::info!(%tenant, blocks, "tenant quota");
        }
        let config = ServerConfig {
            api_keys,
            max_body_bytes: max_body,
            max_priority: args.max_priority,
            allowed_hosts,
            cors_origins: args.cors_origins,
            metrics_key: args.metrics_key,
            limits,
            model_aliases: started.model_aliases.clone(),
            ui: !args.no_ui,
            responses_dir: args.engine.tiers.responses_dir()?,
            responses_ttl: std::time::Duration::from_secs(args.responses_ttl),
        };
        let app = server::router(started.engine, config);
        // A dead engine ends `serve` with an error: the process then exits
        // with a failure status (a supervisor restarts it) instead of
        // staying up answering 503s.
        server::serve(listener, app, engine, server::shutdown_signal(), grace, limits).await.context("serving")?;
        tracing::info!("stopped");
        Ok(())
    })
}

/// How long after start the grammar compiler is built (see `serve`).
const GRAMMAR_WARM_DELAY: std::time::Duration = std::time::Duration::from_secs(5);

/// Gives the calling thread the lowest CPU priority (nice 19): it runs when
/// nothing else wants the CPU. Linux only (there a nice value is per
/// thread); elsewhere nothing changes.
fn lowest_priority() {
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    // SAFETY: setpriority takes plain integers and touches no memory of
    // ours; `who = 0` is the calling thread on Linux.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_keys, parse_quotas};

    #[test]
    fn keys_map_to_tenants_and_weak_ones_are_refused() {
        let m = parse_keys(&["sk-aaaaaaaa:acme".into(), "sk-bbbbbbbb".into()]).unwrap();
        assert_eq!(m["sk-aaaaaaaa"].as_str(), "acme");
        assert_eq!(m["sk-bbbbbbbb"].as_str(), "default");
        assert!(parse_keys(&["short".into()]).is_err());
        assert!(parse_keys(&["sk-cccccccc:bad tenant".into()]).is_err());
    }

    #[test]
    fn quotas_parse_and_bad_ones_say_why() {
        let q = parse_quotas(&["acme:100".into(), " ".into()]).unwrap();
        assert_eq!((q[0].0.as_str(), q[0].1), ("acme", 100));
        assert!(parse_quotas(&["acme".into()]).is_err());
        assert!(parse_quotas(&["acme:lots".into()]).is_err());
    }
}
