//! `kvserve bench grammar`: what constrained decoding costs.
//!
//! 1. Decode speed with a JSON-schema constraint against none, at 1 and 8
//!    concurrent streams (all eight constrained together). Constrained
//!    answers end when their structure does, so the rate is taken from each
//!    request's own decode time: tokens after the first over the time from
//!    the first token to the last, summed over the streams that ran together;
//!    free and constrained rounds alternate, and the medians are reported.
//! 2. Time to first token of a ~100-token chat prompt with a new tool of 10
//!    properties (compiling its grammar included: every repetition names
//!    other properties, so nothing comes from the grammar cache), against the
//!    same rendered prompt, tools described, without a constraint. Every
//!    prompt starts with its own salt, so both are cold in the KV cache.

use std::time::Instant;

use anyhow::Result;
use engine::tools::{ToolChoice, ToolSpec, Turn};
use engine::{Grammar, GrammarSpec, Message, Prompt, Request, SamplingParams};

use crate::bench_engine::{concurrent, run_one, Timing};
use crate::setup::{start_engine, EngineArgs};

#[derive(clap::Args, Debug)]
pub(crate) struct GrammarBenchArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Most answer tokens per request.
    #[arg(long, default_value_t = 96)]
    tokens: usize,
    /// Repetitions of each time-to-first-token measurement (the median is
    /// reported).
    #[arg(long, default_value_t = 7)]
    reps: usize,
    /// Alternated rounds of free and constrained decoding per batch size
    /// (the median is reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

fn report_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "title": { "type": "string", "maxLength": 60 },
            "year": { "type": "integer", "minimum": 1800, "maximum": 2100 },
            "summary": { "type": "string" },
            "tags": { "type": "array", "items": { "type": "string", "maxLength": 20 } }
        },
        "required": ["title", "year", "summary", "tags"],
        "additionalProperties": false
    })
}

fn ask(i: usize, max_tokens: usize, constrained: bool) -> Request {
    let text = format!("Write a short report about harbour number {i} and its history, as JSON.");
    let mut r = Request::new(Prompt::Chat(vec![Message::new("user", text)]));
    r.sampling = SamplingParams::greedy();
    r.max_tokens = Some(max_tokens);
    r.ignore_eos = !constrained;
    if constrained {
        r.grammar =
            Some(Grammar::new(GrammarSpec::JsonSchema { schema: report_schema(), strict: false }, "response_format"));
    }
    r
}

/// Decode tokens per second of streams that ran together.
fn rate(runs: &[Timing]) -> (f64, usize) {
    let per_stream: f64 =
        runs.iter().filter(|r| r.tokens > 1).map(|r| (r.tokens - 1) as f64 / r.decode.as_secs_f64().max(1e-9)).sum();
    (per_stream, runs.iter().map(|r| r.tokens).sum())
}

fn tool(salt: usize) -> ToolSpec {
    let props: serde_json::Map<String, serde_json::Value> = (0..10)
        .map(|p| {
            let kind = if p % 3 == 0 { "integer" } else { "string" };
            (format!("field_{salt}_{p}"), serde_json::json!({ "type": kind }))
        })
        .collect();
    let required: Vec<&String> = props.keys().collect();
    ToolSpec {
        name: format!("record_{salt}"),
        description: Some("Records a shipment in the harbour register".into()),
        parameters: serde_json::json!({ "type": "object", "properties": props, "required": required }),
        strict: false,
    }
}

/// The tool prompt of repetition `salt`, and its constrained twin.
fn tool_request(salt: usize, constrained: bool) -> Result<Request> {
    let spec = tool(salt);
    let turns = vec![
        Turn { role: "system".into(), content: format!("Session {salt}. You keep the register."), ..Turn::default() },
        Turn { role: "user".into(), content: "A ship brought 40 crates of tea from Ceylon.".into(), ..Turn::default() },
    ];
    let messages = engine::tools::render_generic(&turns, std::slice::from_ref(&spec), false);
    let mut r = Request::new(Prompt::Chat(messages));
    r.sampling = SamplingParams::greedy();
    r.max_tokens = Some(1);
    if constrained {
        let lark = engine::tools::grammar(&[spec], &ToolChoice::Required, false, None, &engine::grammar_schema)
            .map_err(anyhow::Error::msg)?;
        r.grammar = Some(Grammar::new(GrammarSpec::Lark(lark), "tools"));
    }
    Ok(r)
}

/// The middle value (the upper one of an even count); 0 for none.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

#[allow(clippy::print_stdout)] // the tables on stdout are this command's output
pub(crate) fn bench_grammar(args: GrammarBenchArgs) -> Result<()> {
    let started = start_engine(&args.engine, None)?;
    let engine = started.engine;
    println!("{}", started.summary);
    let t = Instant::now();
    engine.warm_grammars();
    println!("grammar compiler (token trie) built in {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    // Warm-up: dispatch timings for every shape, the schema compiled once.
    concurrent(&engine, (0..8).map(|i| ask(i, 8, i % 2 == 0)).collect())?;

    println!();
    println!("| streams | unconstrained tok/s | JSON-schema tok/s | ratio | tokens (free / constrained) |");
    println!("|---|---|---|---|---|");
    for n in [1, 8] {
        // Alternated rounds, medians: this machine's speed drifts by more
        // than the difference being measured.
        let (mut frs, mut jrs, mut counts) = (Vec::new(), Vec::new(), (0, 0));
        for round in 0..args.rounds {
            let salt = 100 + round * 20;
            let free = concurrent(&engine, (0..n).map(|i| ask(salt + i, args.tokens, false)).collect())?;
            let json = concurrent(&engine, (0..n).map(|i| ask(salt + 10 + i, args.tokens, true)).collect())?;
            let ((fr, ft), (jr, jt)) = (rate(&free), rate(&json));
            frs.push(fr);
            jrs.push(jr);
            counts = (counts.0 + ft, counts.1 + jt);
        }
        let (fr, jr) = (median(frs), median(jrs));
        println!("| {n} | {fr:.1} | {jr:.1} | {:.2} | {} / {} |", jr / fr.max(1e-9), counts.0, counts.1);
    }

    let mut plain = Vec::new();
    let mut constrained = Vec::new();
    let mut prompt_tokens = 0;
    for rep in 0..args.reps {
        let a = run_one(&engine, tool_request(1000 + rep, false)?)?;
        let b = run_one(&engine, tool_request(2000 + rep, true)?)?;
        plain.push(a.ttft.as_secs_f64() * 1e3);
        constrained.push(b.ttft.as_secs_f64() * 1e3);
        prompt_tokens = engine.validate(tool_request(rep, false)?)?.prompt_tokens().len();
    }
    let (p, c) = (median(plain), median(constrained));
    println!();
    println!(
        "| prompt tokens (tools rendered) | TTFT without constraint ms | TTFT with a new 10-property tool ms | ratio |"
    );
    println!("|---|---|---|---|");
    println!("| {prompt_tokens} | {p:.1} | {c:.1} | {:.2} |", c / p.max(1e-9));
    Ok(())
}
