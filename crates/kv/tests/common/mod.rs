//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)] // each test binary uses a different subset

use kv::{AttentionKind, CacheSpec, CacheSpecParams, KvCache, Namespace, OwnerId, SharedKvCache};

pub fn spec(num_blocks: u32, block_size: u32) -> CacheSpec {
    CacheSpec::new(CacheSpecParams { block_size, ..CacheSpecParams::uniform(2, AttentionKind::Full, 1, 8, num_blocks) })
        .expect("valid test spec")
}

pub fn sliding_spec(num_blocks: u32, block_size: u32, window: u32) -> CacheSpec {
    CacheSpec::new(CacheSpecParams {
        block_size,
        ..CacheSpecParams::uniform(2, AttentionKind::SlidingWindow { window }, 1, 8, num_blocks)
    })
    .expect("valid test spec")
}

pub fn cache(num_blocks: u32, block_size: u32) -> KvCache {
    KvCache::new(spec(num_blocks, block_size))
}

pub fn shared(num_blocks: u32, block_size: u32) -> SharedKvCache {
    SharedKvCache::new(spec(num_blocks, block_size))
}

pub fn owner(name: &str) -> OwnerId {
    OwnerId::new(name).expect("valid test owner")
}

pub fn ns() -> Namespace {
    Namespace::new(b"test-model", b"")
}

/// Creates a sequence holding `tokens`, all computed.
pub fn computed_seq(cache: &mut KvCache, who: &OwnerId, tokens: &[u32]) -> kv::SeqId {
    let id = cache.create_sequence(who, ns());
    cache.append(id, tokens).expect("room for the test sequence");
    cache.mark_computed(id, tokens.len()).expect("appended just now");
    id
}

/// Runs `f` on its own thread and fails the test if it does not finish in
/// `limit` (a deadlock), instead of hanging the test run. A panic inside `f`
/// is passed on.
pub fn with_watchdog<F: FnOnce() + Send + 'static>(limit: std::time::Duration, f: F) {
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(limit) {
        Ok(()) => worker.join().expect("worker finished"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("no progress for {limit:?}: deadlock suspected")
        }
    }
}
