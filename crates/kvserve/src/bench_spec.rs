//! `kvserve bench spec`: decode speed with speculative decoding off and on
//! (`engine/src/speculative.rs`), on the same engine, the two alternated
//! (a request opts out with `speculative: false`), so both see the same
//! machine state. Every run asks new prompts (numbered), the drafting one
//! first, so the tenant's suffix index holds earlier runs' answers, never
//! the one being measured.
//!
//! Workloads, greedy:
//! * **copy**: an agent asked to return a 300-word text with small edits
//!   (what prompt lookup is for);
//! * **tool**: a tool call's JSON arguments under a strict schema
//!   (constrained decoding: the keys and punctuation are forced tokens);
//! * **chat**: a short story, nothing to copy from the prompt.
//!
//! Each at one stream (decode tokens/s of the stream, from its first token
//! to its last) and at eight (all tokens over the wall time). Every run
//! also checks that the output is the same with drafting on as off.

use std::time::Instant;

use anyhow::{bail, Result};
use engine::{EngineHandle, Event, Message, Prompt, Request, SamplingParams, Usage};

use crate::bench_grammar::median;
use crate::setup::{start_engine, EngineArgs};

#[derive(clap::Args, Debug)]
pub(crate) struct SpecBenchArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Answer tokens at most per request.
    #[arg(long, default_value_t = 256)]
    tokens: usize,
    /// Runs of each (off, auto) pair; the table shows the medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

const TEXT: &str = "The lighthouse keeper climbed the spiral stairs every evening at dusk, trimmed the wick, wound \
the clockwork that turned the great lens, and wrote the weather in a leather logbook: wind from the west, seas \
moderate, two fishing boats returning to the harbour before dark. In the morning he walked the shore to count the \
gulls, mended the nets that the storm had torn, and carried water up from the well behind the cottage. On Sundays \
the supply boat brought flour, lamp oil, letters from his sister in the city and a newspaper a week old, which he \
read slowly by the stove while the kettle sang and the wind pressed against the shutters. When the fog came in he \
sounded the horn every thirty seconds through the night, counting aloud to stay awake, and in the spring he painted \
the railings white again and watched the terns return to the rocks below the tower.";

/// A tool call's arguments, as constrained decoding produces them.
fn tool_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "harbour_name": { "type": "string", "maxLength": 40 },
            "number_of_fishing_boats": { "type": "integer", "minimum": 0, "maximum": 500 },
            "has_a_lighthouse": { "type": "boolean" },
            "keeper_name": { "type": "string", "maxLength": 40 },
            "opening_hours_of_the_harbour_office": { "type": "string", "maxLength": 40 },
            "main_catch_of_the_fishing_fleet": { "type": "string", "maxLength": 40 }
        },
        "required": ["harbour_name", "number_of_fishing_boats", "has_a_lighthouse", "keeper_name",
            "opening_hours_of_the_harbour_office", "main_catch_of_the_fishing_fleet"],
        "additionalProperties": false
    })
}

fn workload(name: &str, i: usize, tokens: usize, speculative: bool) -> Request {
    if name == "tool" {
        let text = format!("Harbour {i}: fill in the record for the harbour registry.");
        let mut r = Request::new(Prompt::Chat(vec![Message::new("user", text)]));
        r.sampling = SamplingParams::greedy();
        r.max_tokens = Some(tokens);
        r.speculative = speculative;
        let spec = engine::GrammarSpec::JsonSchema { schema: tool_schema(), strict: true };
        r.grammar = Some(engine::Grammar::new(spec, "tools"));
        return r;
    }
    let messages = match name {
        "copy" => vec![
            Message::new("system", "You repeat texts exactly, word for word."),
            Message::new(
                "user",
                format!("Copy {i}. Repeat this text exactly, but write 'lantern' instead of 'lens':\n\n{TEXT}"),
            ),
        ],
        _ => vec![Message::new("user", format!("Story {i}. Write a short story about a cat who learns to sail."))],
    };
    let mut r = Request::new(Prompt::Chat(messages));
    r.sampling = SamplingParams::greedy();
    r.max_tokens = Some(tokens);
    r.speculative = speculative;
    r
}

/// One request's text, usage and decode time (first token to last).
struct Run {
    text: String,
    usage: Usage,
    decode_s: f64,
}

fn run_all(engine: &EngineHandle, reqs: Vec<Request>) -> Result<(Vec<Run>, f64)> {
    let start = Instant::now();
    let streams: Vec<_> = reqs.into_iter().map(|r| engine.generate(r)).collect::<engine::Result<_>>()?;
    let handles: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || -> Result<Run> {
                let (mut first, mut last, mut text) = (None, Instant::now(), String::new());
                while let Some(ev) = s.blocking_next() {
                    match ev {
                        Event::Token { text: t, .. } => {
                            last = Instant::now();
                            first.get_or_insert(last);
                            text.push_str(&t);
                        }
                        Event::Finished { usage, text: rest, .. } => {
                            text.push_str(&rest);
                            let decode_s = first.map_or(0.0, |f| (last - f).as_secs_f64());
                            return Ok(Run { text, usage, decode_s });
                        }
                        Event::Prompt { .. } => {}
                        Event::Error(e) => return Err(e.into()),
                    }
                }
                bail!("the stream ended without finishing")
            })
        })
        .collect();
    let mut runs = Vec::new();
    for h in handles {
        runs.push(h.join().map_err(|_| anyhow::anyhow!("a stream reader panicked"))??);
    }
    Ok((runs, start.elapsed().as_secs_f64()))
}

/// Tokens/s of a run: one stream's decode rate, or all streams' tokens
/// over the wall time.
fn rate(runs: &[Run], wall: f64) -> f64 {
    let tokens: usize = runs.iter().map(|r| r.usage.completion_tokens).sum();
    match runs {
        [one] => (one.usage.completion_tokens.saturating_sub(1)) as f64 / one.decode_s.max(1e-9),
        _ => tokens as f64 / wall.max(1e-9),
    }
}

#[allow(clippy::print_stdout)] // the table on stdout is this command's output
pub(crate) fn bench_spec(args: SpecBenchArgs) -> Result<()> {
    let started = start_engine(&args.engine, None)?;
    let engine = started.engine;
    println!("{}", started.summary);
    if engine.config().speculative == engine::Speculation::Off {
        bail!("--speculative off: nothing to compare");
    }
    println!();
    println!("| workload | streams | off tok/s | auto tok/s | auto / off | drafted | accepted | same output |");
    println!("|---|---|---|---|---|---|---|---|");
    for name in ["copy", "tool", "chat"] {
        for streams in [1, 8] {
            let (mut off, mut auto, mut same) = (Vec::new(), Vec::new(), true);
            let (mut drafted, mut accepted) = (0, 0);
            // A first pair unmeasured (warm-up). Each run asks new prompts,
            // drafting on first: its answers are new to the tenant's
            // suffix index (which would otherwise hold the very answer the
            // off run just gave), as a tool loop's next call is.
            for run in 0..=args.runs {
                let reqs =
                    |spec, tokens| (0..streams).map(|i| workload(name, run * streams + i, tokens, spec)).collect();
                // The prompts prefilled first, so that both runs find them
                // cached and the aggregate rates compare decoding.
                run_all(&engine, reqs(false, 1))?;
                let (b, wall_b) = run_all(&engine, reqs(true, args.tokens))?;
                let (a, wall_a) = run_all(&engine, reqs(false, args.tokens))?;
                same &= a.iter().zip(&b).all(|(x, y)| x.text == y.text);
                if run > 0 {
                    off.push(rate(&a, wall_a));
                    auto.push(rate(&b, wall_b));
                    drafted += b.iter().map(|r| r.usage.drafted_tokens).sum::<usize>();
                    accepted += b.iter().map(|r| r.usage.accepted_tokens).sum::<usize>();
                }
            }
            let (off, auto) = (median(off), median(auto));
            println!(
                "| {name} | {streams} | {off:.1} | {auto:.1} | {:.2}x | {drafted} | {accepted} | {} |",
                auto / off.max(1e-9),
                if same { "yes" } else { "NO" }
            );
        }
    }
    Ok(())
}
