//! `kvserve bench agents --url URL`: a seeded multi-agent, multi-turn
//! workload against any OpenAI-compatible server (kvserve, llama-server,
//! vLLM), through its chat API with streaming.
//!
//! `N` agents each hold a conversation: a system prompt of `S` words shared
//! by all of them, then a brief of their own, then `T` turns of a `U`-word
//! user message and an answer of `A` tokens (end-of-sequence ignored, so
//! every server generates the same amount). `C` clients work through the
//! agents: an agent's next turn starts when its previous one ended, and the
//! turns are interleaved across agents, as agents coming back are. With a
//! kvserve server each request names its agent (`agent_id`), elsewhere
//! nothing extra is sent.
//!
//! Reported: wall time, time to first token (p50/p95/p99), inter-token
//! latency, output tokens per second, and the share of prompt tokens the
//! server reports as cached (`usage.prompt_tokens_details.cached_tokens`,
//! where it reports it), as a table or JSON. `--trace` lists the slowest
//! tenth of turns (when each started, its agent, turn and cached share);
//! `--beside-words N` sends uncached N-word prompts one after another for
//! the whole run, to see the agents' latency beside long prefills.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct AgentBenchArgs {
    /// The server's base URL, e.g. `http://127.0.0.1:8080`. Several
    /// (repeated, or comma-separated): requests go to them round robin, as
    /// a balancer that knows nothing of caches would send them.
    #[arg(long, value_delimiter = ',', required = true)]
    url: Vec<String>,
    /// A preset shape; the flags below override its numbers.
    #[arg(long, value_enum, default_value_t = Preset::Agents)]
    preset: Preset,
    /// Agents.
    #[arg(long)]
    agents: Option<usize>,
    /// Turns per agent.
    #[arg(long)]
    turns: Option<usize>,
    /// Words of the system prompt all agents share.
    #[arg(long)]
    system_words: Option<usize>,
    /// Words of each agent's own brief.
    #[arg(long)]
    brief_words: Option<usize>,
    /// Words per user message.
    #[arg(long)]
    user_words: Option<usize>,
    /// Answer tokens per turn.
    #[arg(long)]
    answer_tokens: Option<usize>,
    /// Concurrent clients.
    #[arg(long)]
    clients: Option<usize>,
    /// Seed of the generated text.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// The model id to ask for (default: the server's first).
    #[arg(long)]
    model: Option<String>,
    /// `Authorization: Bearer KEY`.
    #[arg(long, env = "KVSERVE_BENCH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Seconds one request may take.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Also list the slowest tenth of turns by time to first token (when
    /// each started, its agent and turn, prompt and cached tokens), to see
    /// where a tail comes from. The JSON output always lists every turn.
    #[arg(long)]
    trace: bool,
    /// Also send uncached prompts of this many words one after another for
    /// the whole run (`/v1/completions`, one output token), as a client
    /// summarising documents would: the agents' latency beside long
    /// prefills.
    #[arg(long)]
    beside_words: Option<usize>,
}

/// Common workload shapes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Preset {
    /// 12 agents x 4 turns, a 400-word shared system prompt, 4 clients,
    /// 32-token answers: agents coming back turn after turn.
    Agents,
    /// 16 agents x 1 turn, a 600-word shared prefix, 8 clients: many
    /// requests arriving together on one uncached prefix.
    Fanout,
    /// 2 agents x 12 turns, short system prompt, 60-word messages, 1
    /// client: a long multi-turn chat whose history keeps growing.
    LongChat,
}

#[derive(Clone, Copy, Debug)]
struct Shape {
    agents: usize,
    turns: usize,
    system_words: usize,
    brief_words: usize,
    user_words: usize,
    answer_tokens: usize,
    clients: usize,
}

impl AgentBenchArgs {
    fn shape(&self) -> Shape {
        let base = match self.preset {
            Preset::Agents => Shape {
                agents: 12,
                turns: 4,
                system_words: 400,
                brief_words: 40,
                user_words: 30,
                answer_tokens: 32,
                clients: 4,
            },
            Preset::Fanout => Shape {
                agents: 16,
                turns: 1,
                system_words: 600,
                brief_words: 20,
                user_words: 20,
                answer_tokens: 32,
                clients: 8,
            },
            Preset::LongChat => Shape {
                agents: 2,
                turns: 12,
                system_words: 50,
                brief_words: 20,
                user_words: 60,
                answer_tokens: 48,
                clients: 1,
            },
        };
        Shape {
            agents: self.agents.unwrap_or(base.agents).max(1),
            turns: self.turns.unwrap_or(base.turns).max(1),
            system_words: self.system_words.unwrap_or(base.system_words),
            brief_words: self.brief_words.unwrap_or(base.brief_words),
            user_words: self.user_words.unwrap_or(base.user_words).max(1),
            answer_tokens: self.answer_tokens.unwrap_or(base.answer_tokens).max(1),
            clients: self.clients.unwrap_or(base.clients).max(1),
        }
    }
}

const WORDS: &[&str] = &[
    "the", "harbour", "ship", "crew", "engine", "storm", "north", "river", "market", "report", "signal", "plan",
    "weather", "cargo", "light", "station", "route", "island", "morning", "evening", "supply", "repair", "team",
    "message", "window", "bridge", "garden", "library", "winter", "summer", "village", "mountain", "forest", "road",
    "question", "answer", "record", "careful", "quick", "quiet", "bright", "heavy", "simple", "strange", "useful",
    "check", "write", "send", "carry", "build", "follow", "measure", "explain", "compare", "remember", "describe",
    "and", "but", "with", "before", "after", "because", "while", "under", "over", "near", "each", "every", "some",
];

fn words(rng: &mut impl Rng, n: usize) -> String {
    (0..n).map(|_| *WORDS.choose(rng).unwrap_or(&"word")).collect::<Vec<_>>().join(" ")
}

/// One agent's conversation so far.
struct Agent {
    index: usize,
    id: String,
    messages: Vec<Value>,
    turns_done: usize,
    rng: rand::rngs::StdRng,
}

/// What one request measured.
#[derive(Clone, Debug, Default)]
struct Sample {
    /// The agent (its index) and which of its turns, from 1.
    agent: usize,
    turn: usize,
    /// Seconds from the workload's start to the request's.
    started: f64,
    ttft: f64,
    itl: Vec<f64>,
    tokens: usize,
    prompt: Option<u64>,
    cached: Option<u64>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[allow(clippy::print_stdout)] // the table (or JSON) on stdout is this command's output
pub(crate) fn bench_agents(args: AgentBenchArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run(args))
}

async fn run(args: AgentBenchArgs) -> Result<()> {
    let shape = args.shape();
    let bases: Vec<String> = args.url.iter().map(|u| u.trim_end_matches('/').to_owned()).collect();
    let base = bases[0].clone();
    let bases = Arc::new(bases);
    let next_base = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // A fresh connection per request (loopback: a fraction of a millisecond).
    // Reusing one failed against llama-server, which closes a streamed
    // response's connection on its own schedule: the next turn written onto
    // it died with "connection closed before message completed".
    let client =
        reqwest::Client::builder().timeout(Duration::from_secs(args.timeout)).pool_max_idle_per_host(0).build()?;
    let auth = |r: reqwest::RequestBuilder| match &args.api_key {
        Some(k) => r.bearer_auth(k),
        None => r,
    };
    let models: Value = auth(client.get(format!("{base}/v1/models")))
        .send()
        .await
        .with_context(|| format!("GET {base}/v1/models"))?
        .json()
        .await?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => models["data"][0]["id"].as_str().context("the server lists no model")?.to_owned(),
    };
    // kvserve answers its agent API; other servers 404.
    let kvserve = auth(client.get(format!("{base}/v1/agents"))).send().await.is_ok_and(|r| r.status().is_success());

    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let system =
        format!("You are a helpful assistant for a coastal shipping company. {}", words(&mut rng, shape.system_words));
    let run_tag: u32 = rng.random();
    let agents: Vec<Arc<Mutex<Agent>>> = (0..shape.agents)
        .map(|i| {
            let mut arng = rand::rngs::StdRng::seed_from_u64(args.seed ^ ((i as u64 + 1) * 0x9e37_79b9));
            let brief = format!("Agent {i} brief: {}", words(&mut arng, shape.brief_words));
            Arc::new(Mutex::new(Agent {
                index: i,
                id: format!("bench-{run_tag:08x}-{i}"),
                messages: vec![json!({"role": "system", "content": format!("{system}\n\n{brief}")})],
                turns_done: 0,
                rng: arng,
            }))
        })
        .collect();
    // Turns interleaved across agents: every agent's turn 1, then turn 2...
    // Each client takes the next ready turn of its own agents.
    let total = shape.agents * shape.turns;
    let bar = if args.json { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(total as u64) };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} turns {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(format!("{} agents x {} turns, {} clients", shape.agents, shape.turns, shape.clients));
    let samples = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let started = Instant::now();
    let beside_took = Arc::new(Mutex::new(Vec::new()));
    let beside = args.beside_words.map(|n| {
        let (client, base, model, key) = (client.clone(), base.clone(), model.clone(), args.api_key.clone());
        let took = Arc::clone(&beside_took);
        let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed ^ 0xb5e1_de00);
        tokio::spawn(async move {
            loop {
                // A fresh first word each time: nothing of it is cached.
                let prompt = format!("{} {}", rng.random::<u64>(), words(&mut rng, n));
                let body = json!({"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0});
                let mut req = client.post(format!("{base}/v1/completions")).json(&body);
                if let Some(k) = &key {
                    req = req.bearer_auth(k);
                }
                let t = Instant::now();
                let ok = match req.send().await {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if !ok {
                    bail!("a long prompt beside the agents failed");
                }
                if let Ok(mut took) = took.lock() {
                    took.push(t.elapsed().as_secs_f64());
                }
            }
        })
    });
    let mut tasks = Vec::new();
    for c in 0..shape.clients {
        let mine: VecDeque<Arc<Mutex<Agent>>> =
            agents.iter().enumerate().filter(|(i, _)| i % shape.clients == c).map(|(_, a)| Arc::clone(a)).collect();
        let (client, bases, next_base, model, samples, bar) = (
            client.clone(),
            Arc::clone(&bases),
            Arc::clone(&next_base),
            model.clone(),
            Arc::clone(&samples),
            bar.clone(),
        );
        let api_key = args.api_key.clone();
        tasks.push(tokio::spawn(async move {
            let mut queue = mine;
            while let Some(agent) = queue.pop_front() {
                let i = next_base.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % bases.len();
                let how =
                    How { client: &client, model: &model, api_key: api_key.as_deref(), kvserve, shape, epoch: started };
                let sample = turn(&how, &bases[i], &agent).await?;
                if let Ok(mut s) = samples.lock() {
                    s.push(sample);
                }
                bar.inc(1);
                let more = agent.lock().map(|a| a.turns_done < shape.turns).unwrap_or(false);
                if more {
                    queue.push_back(agent);
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await.context("a client task")??;
    }
    let wall = started.elapsed().as_secs_f64();
    if let Some(b) = beside {
        if b.is_finished() {
            // It only ends by failing.
            b.await.context("the long prompts' task")??;
        } else {
            b.abort();
        }
    }
    bar.finish_and_clear();
    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    let beside = beside_took.lock().map(|t| t.clone()).unwrap_or_default();
    report(&args, shape, &model, kvserve, wall, &samples, &beside);
    Ok(())
}

/// What every turn is sent with.
struct How<'a> {
    client: &'a reqwest::Client,
    model: &'a str,
    api_key: Option<&'a str>,
    /// Whether the server is kvserve (the request names its agent).
    kvserve: bool,
    shape: Shape,
    /// The workload's start.
    epoch: Instant,
}

/// One turn of `agent`: a new user message, a streamed answer.
async fn turn(how: &How<'_>, base: &str, agent: &Mutex<Agent>) -> Result<Sample> {
    let How { client, model, api_key, kvserve, shape, epoch } = *how;
    let (body, id, agent_index, turn) = {
        let mut a = agent.lock().map_err(|_| anyhow::anyhow!("agent lock"))?;
        let user = words(&mut a.rng, shape.user_words);
        a.messages.push(json!({"role": "user", "content": user}));
        let mut body = json!({
            "model": model,
            "messages": a.messages,
            "max_tokens": shape.answer_tokens,
            "temperature": 0,
            "stream": true,
            "stream_options": {"include_usage": true},
            "ignore_eos": true,
        });
        if kvserve {
            body["agent_id"] = json!(a.id);
        }
        (body, a.id.clone(), a.index, a.turns_done + 1)
    };
    let mut req = client.post(format!("{base}/v1/chat/completions")).json(&body);
    if let Some(k) = api_key {
        req = req.bearer_auth(k);
    }
    let start = Instant::now();
    let resp = req.send().await.with_context(|| format!("agent {id}"))?;
    if !resp.status().is_success() {
        let status = resp.status();
        bail!("agent {id}: HTTP {status}: {}", resp.text().await.unwrap_or_default());
    }
    let mut sample = Sample { agent: agent_index, turn, started: (start - epoch).as_secs_f64(), ..Sample::default() };
    let mut text = String::new();
    let mut last: Option<Instant> = None;
    let mut buf = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk?);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            for line in String::from_utf8_lossy(&event).lines() {
                let Some(data) = line.strip_prefix("data:").map(str::trim) else { continue };
                if data == "[DONE]" {
                    continue;
                }
                let v: Value = serde_json::from_str(data).with_context(|| format!("a stream event: {data}"))?;
                if let Some(delta) = v["choices"][0]["delta"]["content"].as_str().filter(|d| !d.is_empty()) {
                    let now = Instant::now();
                    match last {
                        None => sample.ttft = (now - start).as_secs_f64(),
                        Some(t) => sample.itl.push((now - t).as_secs_f64()),
                    }
                    last = Some(now);
                    sample.tokens += 1;
                    text.push_str(delta);
                }
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                    sample.prompt = u["prompt_tokens"].as_u64();
                    sample.cached = u["prompt_tokens_details"]["cached_tokens"].as_u64();
                    if let Some(n) = u["completion_tokens"].as_u64() {
                        sample.tokens = usize::try_from(n).unwrap_or(sample.tokens);
                    }
                }
            }
        }
    }
    let mut a = agent.lock().map_err(|_| anyhow::anyhow!("agent lock"))?;
    a.messages.push(json!({"role": "assistant", "content": text}));
    a.turns_done += 1;
    Ok(sample)
}

#[allow(clippy::print_stdout)]
/// `beside`: how long each long prompt sent beside the agents took.
fn report(
    args: &AgentBenchArgs,
    shape: Shape,
    model: &str,
    kvserve: bool,
    wall: f64,
    samples: &[Sample],
    beside: &[f64],
) {
    let beside_mean = (!beside.is_empty()).then(|| beside.iter().sum::<f64>() / beside.len() as f64);
    let mut ttft: Vec<f64> = samples.iter().map(|s| s.ttft).collect();
    ttft.sort_by(f64::total_cmp);
    let mut itl: Vec<f64> = samples.iter().flat_map(|s| s.itl.iter().copied()).collect();
    itl.sort_by(f64::total_cmp);
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    let (prompt, cached) = samples
        .iter()
        .filter_map(|s| Some((s.prompt?, s.cached?)))
        .fold((0u64, 0u64), |(p, c), (sp, sc)| (p + sp, c + sc));
    let cached_share = (prompt > 0).then(|| cached as f64 / prompt as f64);
    let itl_mean = if itl.is_empty() { 0.0 } else { itl.iter().sum::<f64>() / itl.len() as f64 };
    if args.json {
        let v = json!({
            "url": args.url, "model": model, "kvserve": kvserve, "preset": format!("{:?}", args.preset),
            "agents": shape.agents, "turns": shape.turns, "clients": shape.clients,
            "system_words": shape.system_words, "brief_words": shape.brief_words,
            "user_words": shape.user_words, "answer_tokens": shape.answer_tokens, "seed": args.seed,
            "wall_s": wall, "requests": samples.len(), "output_tokens": tokens,
            "output_tok_s": tokens as f64 / wall,
            "ttft_s": {"p50": percentile(&ttft, 0.5), "p95": percentile(&ttft, 0.95), "p99": percentile(&ttft, 0.99)},
            "itl_s": {"mean": itl_mean, "p50": percentile(&itl, 0.5), "p95": percentile(&itl, 0.95)},
            "prompt_tokens": prompt, "cached_tokens": cached, "cached_share": cached_share,
            "beside": args.beside_words.map(|w| json!({"words": w, "prompts": beside.len(), "mean_s": beside_mean})),
            "turns": samples.iter().map(|s| json!({
                "agent": s.agent, "turn": s.turn, "started_s": s.started, "ttft_s": s.ttft,
                "prompt_tokens": s.prompt, "cached_tokens": s.cached,
            })).collect::<Vec<_>>(),
        });
        println!("{v}");
        return;
    }
    println!(
        "{} agents x {} turns, {} clients, system {} words, brief {}, user {}, answers {} tokens | {} | agent_id sent: {kvserve}",
        shape.agents,
        shape.turns,
        shape.clients,
        shape.system_words,
        shape.brief_words,
        shape.user_words,
        shape.answer_tokens,
        args.url.join(", ")
    );
    println!();
    println!(
        "| wall s | TTFT p50 ms | p95 ms | p99 ms | ITL mean ms | ITL p95 ms | output tok/s | cached prompt share |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {wall:.1} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {} |",
        percentile(&ttft, 0.5) * 1e3,
        percentile(&ttft, 0.95) * 1e3,
        percentile(&ttft, 0.99) * 1e3,
        itl_mean * 1e3,
        percentile(&itl, 0.95) * 1e3,
        tokens as f64 / wall,
        cached_share.map_or("not reported".into(), |c| format!("{:.2}", c)),
    );
    if let Some(w) = args.beside_words {
        println!();
        println!(
            "Beside the agents: {} prompts of {w} words, {} each on average.",
            beside.len(),
            beside_mean.map_or("none finished".into(), |m| format!("{m:.2} s"))
        );
    }
    if args.trace {
        let mut slow: Vec<&Sample> = samples.iter().collect();
        slow.sort_by(|a, b| b.ttft.total_cmp(&a.ttft));
        println!();
        println!("The slowest tenth of turns:");
        println!();
        println!("| agent | turn | started s | TTFT ms | prompt | cached |");
        println!("|---|---|---|---|---|---|");
        let show = |n: Option<u64>| n.map_or("-".into(), |n| n.to_string());
        for s in slow.iter().take(samples.len().div_ceil(10)) {
            println!(
                "| {} | {} | {:.2} | {:.0} | {} | {} |",
                s.agent,
                s.turn,
                s.started,
                s.ttft * 1e3,
                show(s.prompt),
                show(s.cached)
            );
        }
    }
}
