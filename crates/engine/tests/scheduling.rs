//! Scheduling over the fake model: batching, chunked prefill, preemption,
//! fairness, admission limits, cancellation, timeouts, injected failures.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{assert_pool_full, collect, collect_blocking, fake_engine, greedy, wait_for};
use engine::{EngineConfig, Error, FinishReason};

fn config() -> EngineConfig {
    EngineConfig { default_timeout: Some(Duration::from_secs(30)), ..EngineConfig::default() }
}

#[test]
fn concurrent_requests_share_steps() {
    let (engine, control) = fake_engine(16, 256, config());
    control.step_delay_ms.store(2, Ordering::SeqCst);
    let streams: Vec<_> = (0..8).map(|i| engine.generate(greedy(&format!("prompt {i}"), 20)).unwrap()).collect();
    let outs: Vec<_> = streams.into_iter().map(collect_blocking).collect();
    for o in &outs {
        assert_eq!(o.reason, Some(FinishReason::Length), "{o:?}");
        assert_eq!(o.usage.completion_tokens, 20);
        assert_eq!(o.text.len(), 20);
    }
    let widest = control.batches.lock().unwrap().iter().map(Vec::len).max().unwrap();
    assert!(widest >= 4, "decodes were batched together (widest batch {widest})");
    assert_pool_full(&engine);
}

#[test]
fn chunked_prefill_stays_within_the_budget_and_decodes_go_first() {
    let cfg = EngineConfig { max_batch_tokens: 32, max_running: 8, ..config() };
    let (engine, control) = fake_engine(16, 256, cfg);
    control.step_delay_ms.store(3, Ordering::SeqCst);
    let short = engine.generate(greedy("hi", 30)).unwrap();
    wait_for(&engine, "the short request decoding", |s| s.generated_tokens >= 2);
    let long = engine.generate(greedy(&"x".repeat(100), 3)).unwrap();
    let (a, b) = (collect_blocking(short), collect_blocking(long));
    assert_eq!(a.usage.completion_tokens, 30);
    assert_eq!(b.usage.completion_tokens, 3);
    let batches = control.batches.lock().unwrap().clone();
    assert!(batches.iter().all(|b| b.iter().sum::<usize>() <= 32), "{batches:?}");
    // While the long prompt was prefilled, the short request kept decoding
    // in the same steps: [1, 31], [1, 31], ...
    let mixed = batches.iter().filter(|b| b.len() == 2 && b[0] == 1 && b[1] > 1).count();
    assert!(mixed >= 3, "prefill chunks rode along with decodes: {batches:?}");
}

/// Prompts arriving together are prefilled one after another once a step
/// holds 64 prefill rows, so each answers as soon as its own prefill is
/// done; short prompts still share steps.
#[test]
fn prompts_arriving_together_finish_one_after_another_and_short_ones_share_steps() {
    let cfg = EngineConfig { max_batch_tokens: 512, max_running: 16, ..config() };
    let (engine, control) = fake_engine(16, 512, cfg);
    control.step_delay_ms.store(40, Ordering::SeqCst);
    // A decoding request keeps the engine in a step while the others
    // arrive, so they all wait for the same admission.
    let busy = engine.generate(greedy("hi", 12)).unwrap();
    wait_for(&engine, "the first request decoding", |s| s.generated_tokens >= 1);
    let long: Vec<_> = (0..3).map(|i| engine.generate(greedy(&format!("{i}{}", "y".repeat(99)), 2)).unwrap()).collect();
    let short: Vec<_> = (0..6).map(|i| engine.generate(greedy(&format!("s{i}"), 2)).unwrap()).collect();
    for o in long.into_iter().chain(short).chain([busy]).map(collect_blocking) {
        assert_eq!(o.error, None);
    }
    let batches = control.batches.lock().unwrap().clone();
    let prefills = |b: &Vec<usize>| b.iter().filter(|&&n| n > 1).count();
    let long_steps: Vec<&Vec<usize>> = batches.iter().filter(|b| b.iter().any(|&n| n >= 64)).collect();
    assert_eq!(long_steps.len(), 3, "each 100-token prompt had a step: {batches:?}");
    assert!(long_steps.iter().all(|b| prefills(b) == 1), "one long prefill per step: {batches:?}");
    assert!(batches.iter().any(|b| prefills(b) >= 2), "short prompts shared a step: {batches:?}");
    assert!(batches.iter().all(|b| b.iter().filter(|&&n| n > 1).sum::<usize>() <= 512), "{batches:?}");
    assert_pool_full(&engine);
}

/// A short prompt arriving while a long one is prefilled goes first: it is
/// admitted at the next step and answered long before the long prompt's
/// prefill ends, and steps shared with other work hold at most 128 prefill
/// rows (alone, the long prompt takes the whole 512-row budget).
#[test]
fn a_short_prompt_is_not_stuck_behind_a_long_prefill() {
    let cfg = EngineConfig { max_batch_tokens: 512, max_running: 16, ..config() };
    let (engine, control) = fake_engine(16, 512, cfg);
    control.step_delay_ms.store(20, Ordering::SeqCst);
    let long_prompt = "z".repeat(3000);
    let long = engine.generate(greedy(&long_prompt, 2)).unwrap();
    wait_for(&engine, "the long prompt running", |s| s.steps >= 1);
    let short = collect_blocking(engine.generate(greedy("hi", 2)).unwrap());
    let long_rows_before_short_ended: usize =
        control.batches.lock().unwrap().iter().flatten().filter(|&&n| n > 2).sum();
    let long = collect_blocking(long);
    assert_eq!((short.error, long.error), (None, None));
    assert!(
        long_rows_before_short_ended < 3000,
        "the short prompt was answered mid-prefill ({long_rows_before_short_ended} of 3000 rows done)"
    );
    let batches = control.batches.lock().unwrap().clone();
    let prefill_rows = |b: &Vec<usize>| b.iter().filter(|&&n| n > 1).sum::<usize>();
    assert!(batches.iter().any(|b| b == &vec![512]), "alone, the long prompt took whole steps: {batches:?}");
    assert!(batches.iter().filter(|b| b.len() > 1).all(|b| prefill_rows(b) <= 128), "shared steps: {batches:?}");
    assert_pool_full(&engine);
}

/// Prompts that each fill a step's prefill room keep arriving while a long
/// prompt waits: shortest-first would starve it, but one kept waiting past
/// half a second goes first, so it finishes while they are still coming.
#[test]
fn a_long_prefill_is_not_starved_by_a_stream_of_shorter_prompts() {
    let cfg = EngineConfig { max_batch_tokens: 512, max_running: 32, ..config() };
    let (engine, control) = fake_engine(16, 2048, cfg);
    control.step_delay_ms.store(5, Ordering::SeqCst);
    let busy = engine.generate(greedy("hi", 8)).unwrap();
    wait_for(&engine, "a request decoding", |s| s.generated_tokens >= 1);
    let long = engine.generate(greedy(&"w".repeat(700), 1)).unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let senders: Vec<_> = (0..4)
        .map(|t| {
            let (engine, done) = (engine.clone(), std::sync::Arc::clone(&done));
            std::thread::spawn(move || {
                let mut served = 0;
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                while !done.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                    // 100 rows each: one fills a step's prefill room.
                    let o = collect_blocking(
                        engine.generate(greedy(&format!("{t}{served:03}{}", "q".repeat(96)), 1)).unwrap(),
                    );
                    assert_eq!(o.error, None);
                    served += 1;
                }
                served
            })
        })
        .collect();
    let long = collect_blocking(long);
    let shorts_still_coming = !done.swap(true, Ordering::SeqCst);
    let served: usize = senders.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(long.error, None);
    assert!(shorts_still_coming && served > 0, "the long prompt finished while short ones kept arriving ({served})");
    assert_eq!(collect_blocking(busy).error, None);
    assert_pool_full(&engine);
}

#[test]
fn preemption_under_block_pressure_finishes_everything_with_the_same_text() {
    // Alone, each request needs 40 + 40 = 80 tokens = 20 blocks of 4; the
    // pool holds 40 blocks, so six at once cannot all fit.
    let prompts: Vec<String> = (0..6).map(|i| format!("{i:-<40}")).collect();
    let (roomy, _) = fake_engine(4, 1024, config());
    let expected: Vec<_> =
        prompts.iter().map(|p| collect_blocking(roomy.generate(greedy(p, 40)).unwrap()).text).collect();

    let (tight, _) = fake_engine(4, 40, config());
    let streams: Vec<_> = prompts.iter().map(|p| tight.generate(greedy(p, 40)).unwrap()).collect();
    let outs: Vec<_> = streams.into_iter().map(collect_blocking).collect();
    for (o, want) in outs.iter().zip(&expected) {
        assert_eq!(o.error, None);
        assert_eq!(&o.text, want, "recomputed after preemption, same answer");
    }
    let s = tight.stats();
    assert!(s.preemptions > 0, "the pool was short: {s:?}");
    assert_pool_full(&tight);
}

#[test]
fn priority_first_and_fifo_within_a_priority() {
    let cfg = EngineConfig { max_running: 1, ..config() };
    let (engine, control) = fake_engine(16, 256, cfg);
    control.step_delay_ms.store(2, Ordering::SeqCst);
    let first = engine.generate(greedy("first", 10)).unwrap();
    wait_for(&engine, "the first request running", |s| s.running == 1);
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for (name, priority) in [("low-a", 0), ("low-b", 0), ("high", 5), ("low-c", 0)] {
        let mut r = greedy(name, 3);
        r.priority = priority;
        let stream = engine.generate(r).unwrap();
        let order = std::sync::Arc::clone(&order);
        handles.push(std::thread::spawn(move || {
            collect_blocking(stream);
            order.lock().unwrap().push(name);
        }));
    }
    collect_blocking(first);
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec!["high", "low-a", "low-b", "low-c"]);
}

#[test]
fn a_full_queue_is_a_typed_overloaded_error() {
    let cfg = EngineConfig { max_running: 1, max_waiting: 2, ..config() };
    let (engine, control) = fake_engine(16, 256, cfg);
    control.step_delay_ms.store(5, Ordering::SeqCst);
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..10 {
        match engine.generate(greedy(&format!("r{i}"), 5)) {
            Ok(s) => accepted.push(s),
            Err(Error::Overloaded { limit: 2, .. }) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused > 0 && accepted.len() >= 2, "{refused} refused, {} accepted", accepted.len());
    for s in accepted {
        assert_eq!(collect_blocking(s).reason, Some(FinishReason::Length));
    }
    // Places in the queue came back.
    assert!(engine.generate(greedy("again", 2)).is_ok());
    assert_pool_full(&engine);
}

#[test]
fn cancelled_and_dropped_requests_free_their_blocks() {
    let (engine, control) = fake_engine(16, 256, config());
    control.step_delay_ms.store(2, Ordering::SeqCst);
    let cancelled = engine.generate(greedy("cancel me", 2000)).unwrap();
    let dropped = engine.generate(greedy("drop me", 2000)).unwrap();
    let queued_then_dropped = engine.generate(greedy("never run", 2000)).unwrap();
    wait_for(&engine, "both generating", |s| s.generated_tokens >= 10);
    assert!(engine.stats().cache.used_blocks > 0);
    engine.cancel(cancelled.id()).unwrap();
    drop(dropped);
    drop(queued_then_dropped);
    let out = collect_blocking(cancelled);
    assert_eq!(out.reason, Some(FinishReason::Cancelled));
    assert!(out.usage.completion_tokens < 2000);
    assert_pool_full(&engine);
    wait_for(&engine, "cancellations counted", |s| s.finished.cancelled == 3);
}

#[test]
fn a_request_past_its_deadline_ends_with_a_timeout() {
    let (engine, control) = fake_engine(16, 256, config());
    control.step_delay_ms.store(5, Ordering::SeqCst);
    let mut r = greedy("slow", 3_000);
    r.timeout = Some(Duration::from_millis(60));
    let out = collect_blocking(engine.generate(r).unwrap());
    assert_eq!(out.error, Some(Error::Timeout(Duration::from_millis(60))));
    assert_pool_full(&engine);
}

#[test]
fn a_model_error_mid_step_fails_that_batch_and_leaks_nothing() {
    let (engine, control) = fake_engine(16, 256, config());
    control.step_delay_ms.store(1, Ordering::SeqCst);
    control.fail_at_step.store(4, Ordering::SeqCst);
    let streams: Vec<_> = (0..4).map(|i| engine.generate(greedy(&format!("p{i}"), 50)).unwrap()).collect();
    let outs: Vec<_> = streams.into_iter().map(collect_blocking).collect();
    assert!(outs.iter().any(|o| matches!(o.error, Some(Error::Model(_)))), "{outs:?}");
    assert_pool_full(&engine);
    // The engine keeps serving.
    let after = collect_blocking(engine.generate(greedy("after", 5)).unwrap());
    assert_eq!(after.reason, Some(FinishReason::Length));
    assert_pool_full(&engine);
}

#[test]
fn many_threads_submitting_at_once_are_all_served_or_cleanly_refused() {
    let cfg = EngineConfig { max_waiting: 40, max_running: 16, ..config() };
    let (engine, _) = fake_engine(8, 512, cfg);
    let threads: Vec<_> = (0..32)
        .map(|t| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                let mut served = 0;
                let mut refused = 0;
                for i in 0..4 {
                    let prompt = format!("shared system prompt; thread {t} request {i}");
                    match engine.generate(greedy(&prompt, 8 + i)) {
                        Ok(s) => {
                            let out = collect_blocking(s);
                            assert_eq!(out.error, None);
                            assert_eq!(out.usage.completion_tokens, 8 + i);
                            served += 1;
                        }
                        Err(Error::Overloaded { .. }) => refused += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
                (served, refused)
            })
        })
        .collect();
    let (served, refused) = threads.into_iter().map(|t| t.join().unwrap()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    assert_eq!(served + refused, 128);
    assert!(served >= 40, "{served} served");
    assert_pool_full(&engine);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(engine.check_invariants()).unwrap();
    let s = engine.stats();
    assert!(s.cached_prompt_tokens > 0, "the shared system prompt was reused: {s:?}");
}

#[tokio::test]
async fn a_stopped_engine_is_a_typed_error_not_a_panic() {
    let (engine, control) = fake_engine(16, 64, config());
    control.step_delay_ms.store(2, Ordering::SeqCst);
    let running = engine.generate(greedy("long", 1_000)).unwrap();
    engine.shutdown(Duration::from_millis(20)).await.unwrap();
    let out = collect(running).await;
    assert_eq!(out.error, Some(Error::EngineStopped));
    assert!(matches!(engine.generate(greedy("late", 2)), Err(Error::EngineStopped)));
    assert_eq!(engine.agents(&engine::TenantId::default_tenant()).await, Err(Error::EngineStopped));
}

/// Two shutdown calls: both return only once the engine has stopped, and
/// the shorter grace wins.
#[tokio::test]
async fn every_shutdown_call_waits_for_the_stop() {
    let (engine, control) = fake_engine(16, 64, config());
    control.step_delay_ms.store(2, Ordering::SeqCst);
    let running = engine.generate(greedy("long", 1_000)).unwrap();
    wait_for(&engine, "running", |s| s.running == 1);
    let (a, b) = (engine.clone(), engine.clone());
    let long = tokio::spawn(async move {
        a.shutdown(Duration::from_secs(3600)).await.unwrap();
        a.is_stopped()
    });
    wait_for(&engine, "a step after the first call", |s| s.steps > 2);
    let short = tokio::spawn(async move {
        b.shutdown(Duration::from_millis(20)).await.unwrap();
        b.is_stopped()
    });
    assert!(long.await.unwrap(), "the first caller was answered before the engine stopped");
    assert!(short.await.unwrap());
    assert_eq!(collect(running).await.error, Some(Error::EngineStopped));
}

#[test]
fn configurations_that_cannot_progress_are_refused_at_start() {
    for (config, what) in [
        (EngineConfig { max_batch_tokens: 0, ..config() }, "max_batch_tokens"),
        (EngineConfig { max_running: 0, ..config() }, "max_running"),
        (EngineConfig { max_waiting: 0, ..config() }, "max_waiting"),
        (EngineConfig { max_running: 65, max_batch_tokens: 64, ..config() }, "max_running must not exceed"),
    ] {
        let (model, _) = engine::testing::FakeModel::new(16, 64);
        match engine::start(Box::new(model), std::sync::Arc::new(engine::testing::FakeCodec::new()), config) {
            Err(Error::InvalidConfig(msg)) => assert!(msg.contains(what), "{msg}"),
            other => panic!("{what}: {other:?}"),
        }
    }
}

#[test]
fn stop_strings_stop_ids_and_seeds() {
    let (engine, _) = fake_engine(16, 256, config());
    let free = collect_blocking(engine.generate(greedy("seed text", 30)).unwrap());
    let stop = free.text[5..8].to_owned();
    let first = free.text.find(&stop).unwrap();
    let mut r = greedy("seed text", 30);
    r.stop = vec![stop.clone()];
    let out = collect_blocking(engine.generate(r).unwrap());
    assert_eq!(out.reason, Some(FinishReason::Stop));
    assert_eq!(out.text, free.text[..first], "text ends before the stop string {stop:?}");

    let mut r = greedy("seed text", 30);
    r.stop_token_ids = vec![free.tokens[3]];
    let out = collect_blocking(engine.generate(r).unwrap());
    let at = free.tokens.iter().position(|&t| t == free.tokens[3]).unwrap();
    assert_eq!(out.reason, Some(FinishReason::Stop));
    assert_eq!(out.usage.completion_tokens, at + 1);

    let sampled = |seed| {
        let mut r = greedy("seed text", 30);
        r.sampling = engine::SamplingParams { seed: Some(seed), ..engine::SamplingParams::default() };
        collect_blocking(engine.generate(r).unwrap()).text
    };
    assert_eq!(sampled(3), sampled(3));
    assert_ne!(sampled(3), sampled(4));
}

#[test]
fn bad_requests_are_typed_errors_before_queueing() {
    let (engine, _) = fake_engine(16, 8, config());
    assert!(matches!(engine.generate(greedy("x", 1000)), Err(Error::ContextExceeded { limit: 128, .. })));
    let mut r = greedy("x", 5);
    r.sampling.top_p = 2.0;
    assert!(matches!(engine.generate(r), Err(Error::InvalidRequest { field: "top_p", .. })));
    let mut r = greedy("x", 5);
    r.prompt = engine::Prompt::Tokens(vec![1, 999_999]);
    assert!(matches!(engine.generate(r), Err(Error::InvalidRequest { field: "prompt", .. })));
    assert_eq!(engine.stats().waiting, 0);
}

/// In-flight prefix sharing: four requests that arrive together with the
/// same uncached 256-token prefix compute it once. Without it the second
/// one computes the prefix too, in the same step as the first (the budget
/// has room for both), and the output is the same either way.
#[test]
fn requests_arriving_together_compute_a_shared_prefix_once() {
    let shared = "s".repeat(256);
    let prompts: Vec<String> = (0..4).map(|i| format!("{shared}tail {i}!")).collect();
    let (alone, _) = fake_engine(16, 256, config());
    let expected: Vec<String> =
        prompts.iter().map(|p| collect_blocking(alone.generate(greedy(p, 6)).unwrap()).text).collect();

    let (engine, control) = fake_engine(16, 256, config());
    // Hold the engine in a step so the four arrive in the same admission.
    control.step_delay_ms.store(150, Ordering::SeqCst);
    let warm = engine.generate(greedy("warm", 2)).unwrap();
    wait_for(&engine, "the first step running", |s| s.running == 1);
    let streams: Vec<_> = prompts.iter().map(|p| engine.generate(greedy(p, 6)).unwrap()).collect();
    control.step_delay_ms.store(0, Ordering::SeqCst);
    collect_blocking(warm);
    let outs: Vec<_> = streams.into_iter().map(collect_blocking).collect();
    for (o, want) in outs.iter().zip(&expected) {
        assert_eq!(o.error, None);
        assert_eq!(&o.text, want, "adopting the shared blocks gives the same answer");
    }
    let prefilled: usize = control.batches.lock().unwrap().iter().flatten().filter(|&&n| n > 1).sum();
    // The prefix once (256), each prompt's tail and the block it starts
    // (at most 16 + 7 each), and "warm".
    assert!(prefilled <= 256 + 4 * 23 + 4, "the shared prefix was computed more than once: {prefilled} tokens");
    let cached: u64 = outs.iter().map(|o| o.usage.cached_tokens as u64).sum();
    assert!(cached >= 3 * 256, "three of four adopted the prefix: {cached}");
    assert_pool_full(&engine);
}

/// Commands that keep coming (as a restart's prewarm floods the engine with
/// tier reports, each asking for the next read) do not keep the engine from
/// stepping: a request runs to its end while the flood goes on.
#[test]
fn a_flood_of_commands_does_not_keep_the_engine_from_stepping() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    let (engine, control) = fake_engine(16, 256, config());
    let stop = Arc::new(AtomicBool::new(false));
    let flooders: Vec<_> = (0..2)
        .map(|_| {
            let (engine, stop) = (engine.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // A request long gone: nothing to do, but a command.
                    let _ = engine.cancel(engine::RequestId(u64::MAX));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    let stream = engine.generate(greedy("a turn during the flood", 8)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(collect_blocking(stream));
    });
    // Generous: the request takes milliseconds; without steps it never ends.
    let out = rx.recv_timeout(Duration::from_secs(30));
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.join().unwrap();
    }
    let out = out.expect("the request never finished while commands kept coming");
    assert_eq!(out.reason, Some(FinishReason::Length), "{out:?}");
    assert!(control.steps.load(Ordering::SeqCst) > 0);
}
