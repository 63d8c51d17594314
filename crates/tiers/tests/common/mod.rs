//! Helpers shared by the disk tier's test binaries.
#![allow(dead_code, unreachable_pub)] // each test binary uses a different subset
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use kv::{AttentionKind, BlockKey, CacheSpec, CacheSpecParams, Namespace};
use tiers::{DiskTier, EventSink, LoadTask, Payload, Reject, StoreFingerprint, TierEvent};

/// Tokens per block in these tests.
pub const BS: usize = 16;

/// The store fingerprint of a test model called `model`.
pub fn fp(model: &[u8]) -> StoreFingerprint {
    let spec = CacheSpec::new(CacheSpecParams::uniform(2, AttentionKind::Full, 1, 8, 4)).unwrap();
    StoreFingerprint::new(model, &spec, &["test-layout".into()])
}

/// The one tenant's namespace.
pub fn ns() -> Namespace {
    Namespace::new(b"test-model", b"tenant")
}

/// A payload of `len` bytes that depends on the block, so a swapped record
/// is visible.
pub fn payload(k: &BlockKey, len: usize) -> Vec<u8> {
    let seed = k.hash.to_u128();
    (0..len).map(|i| (seed.rotate_left((i % 128) as u32) as u8) ^ (i as u8)).collect()
}

/// A sink that forwards the tier's events to a channel.
pub fn sink() -> (EventSink, mpsc::Receiver<TierEvent>) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let sink: EventSink = Arc::new(move |ev| {
        let _ = tx.lock().unwrap().send(ev);
    });
    (sink, rx)
}

/// Loads `keys` (as load `load`) and collects the results in order.
pub fn load(
    tier: &DiskTier,
    rx: &mpsc::Receiver<TierEvent>,
    load: u64,
    keys: &[BlockKey],
) -> Vec<Result<Payload, Reject>> {
    let tasks =
        keys.iter().enumerate().map(|(i, k)| LoadTask { load, index: i, group: 0, expected: k.clone() }).collect();
    tier.load(tasks);
    let mut out: Vec<Option<Result<Payload, Reject>>> = (0..keys.len()).map(|_| None).collect();
    let mut left = keys.len();
    while left > 0 {
        match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
            TierEvent::Loaded { load: l, index, result } if l == load => {
                out[index] = Some(result);
                left -= 1;
            }
            // The budget's evictions are told as they happen.
            TierEvent::Evicted { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    out.into_iter().map(Option::unwrap).collect()
}
