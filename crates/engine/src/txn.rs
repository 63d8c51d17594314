//! One step's cache transaction. The engine owns it; the model only computes.
//!
//! For a batch of `(sequence, new tokens)`:
//!
//! 1. For each entry in turn:
//!    - **append** its tokens to its sequence: the cache hands out a slot
//!      per token and, where the last block is shared, a copy-on-write into
//!      a fresh block. Appending may evict cached blocks (LRU) to get them;
//!    - **hand off evictions**: every block the pool evicted is passed, with
//!      its key, to the caller's sink *before* anything writes to it, so a
//!      tier can copy its payload out (`Model::storage`);
//!    - **copy**: the copy-on-write, through the model's storage, at once:
//!      the sequence already points at the new block and no longer holds
//!      the old one, which a later entry's append may evict and reuse.
//! 2. **Forward**: the model runs the ragged batch, writing every new
//!    token's K/V into its slot.
//! 3. **Mark computed**: full blocks are published to the prefix index
//!    (an entry's drafted tokens, `speculative.rs`, are left to the caller,
//!    which marks what the model agreed with and truncates the rest). A
//!    new block takes the place of an indexed copy of the same tokens that
//!    lost its sliding-window K/V (hybrid models): that copy would send
//!    every later user of the prefix back to recomputing it.
//!
//! If any step fails, every sequence appended to is truncated back to its
//! length before the step, so the cache is as it was (blocks the failed
//! step took are free again; the slots it wrote are unreachable; a sequence
//! that got a copy-on-write keeps its copy, which holds exactly the
//! positions it had). Steps 1 and 3 cannot half-fail on their own: `kv`'s
//! operations change nothing on error.
//!
//! The fake model of the tests and the real one run this same code.

use kv::{BlockStorage, Evicted, KvCache, SeqId};
use model::{Batch, Model, SeqStep};

/// Runs one step (see the module doc) and returns each entry's last-token
/// logits. `on_evicted` receives the storage and the blocks evicted by this
/// step's appends (and any evicted earlier and not yet taken), before the
/// model writes to them.
///
/// # Errors
/// [`model::Error::Kv`] when the cache refuses an append (out of blocks or
/// quota) and any error of [`Model::forward`]; the cache is then unchanged.
pub fn run_step(
    model: &mut dyn Model,
    cache: &mut KvCache,
    work: &[(SeqId, &[u32])],
    on_evicted: &mut dyn FnMut(&mut dyn BlockStorage, Vec<Evicted>),
) -> model::Result<Vec<Vec<f32>>> {
    run_step_rows(model, cache, work, &[], on_evicted)
}

/// [`run_step`], returning for entry `i` the logits of its last
/// `logit_rows[i]` tokens (1 where the slice is short), entry after entry:
/// a prompt's own log-probabilities need every row of its prefill.
///
/// # Errors
/// As [`run_step`].
pub fn run_step_rows(
    model: &mut dyn Model,
    cache: &mut KvCache,
    work: &[(SeqId, &[u32])],
    logit_rows: &[usize],
    on_evicted: &mut dyn FnMut(&mut dyn BlockStorage, Vec<Evicted>),
) -> model::Result<Vec<Vec<f32>>> {
    run_step_drafts(model, cache, work, logit_rows, &[], on_evicted)
}

/// [`run_step_rows`] where the last `tentative[i]` tokens of entry `i`
/// are drafts (`speculative.rs`): computed, but not marked computed, so
/// nothing of them is published; the caller marks what it accepts and
/// truncates the rest.
///
/// # Errors
/// As [`run_step`].
pub(crate) fn run_step_drafts(
    model: &mut dyn Model,
    cache: &mut KvCache,
    work: &[(SeqId, &[u32])],
    logit_rows: &[usize],
    tentative: &[usize],
    on_evicted: &mut dyn FnMut(&mut dyn BlockStorage, Vec<Evicted>),
) -> model::Result<Vec<Vec<f32>>> {
    let mut starts = Vec::with_capacity(work.len());
    let result = transact(model, cache, work, logit_rows, tentative, on_evicted, &mut starts);
    if result.is_err() {
        for (&(seq, _), &start) in work.iter().zip(&starts) {
            // Only sequences appended to are in `starts`; truncating back
            // to a length they had cannot fail.
            let _ = cache.truncate(seq, start);
        }
    }
    result
}

fn transact(
    model: &mut dyn Model,
    cache: &mut KvCache,
    work: &[(SeqId, &[u32])],
    logit_rows: &[usize],
    tentative: &[usize],
    on_evicted: &mut dyn FnMut(&mut dyn BlockStorage, Vec<Evicted>),
    starts: &mut Vec<usize>,
) -> model::Result<Vec<Vec<f32>>> {
    let mut slots = Vec::with_capacity(work.len());
    for &(seq, tokens) in work {
        let start = cache.seq_len(seq)?;
        let appended = cache.append(seq, tokens)?;
        starts.push(start);
        let evicted = cache.take_evicted();
        if !evicted.is_empty() {
            on_evicted(model.storage(), evicted);
        }
        if let Some(copy) = appended.copy {
            model.storage().copy_block(copy)?;
        }
        slots.push(appended.slots);
    }
    // Borrow the tables (no copy per step); the borrow ends before the cache
    // is written again below.
    let logits = {
        let tables = work.iter().map(|&(seq, _)| cache.block_table(seq)).collect::<kv::Result<Vec<_>>>()?;
        let seqs: Vec<SeqStep<'_>> = work
            .iter()
            .zip(starts.iter())
            .zip(slots.iter().zip(&tables))
            .enumerate()
            .map(|(i, ((&(_, tokens), &start_pos), (slots, table)))| SeqStep {
                tokens,
                start_pos,
                table,
                slots,
                logit_rows: logit_rows.get(i).copied().unwrap_or(1),
            })
            .collect();
        let want: usize = seqs.iter().map(SeqStep::rows_out).sum();
        let logits = model.forward(Batch { seqs: &seqs })?;
        if logits.len() != want {
            return Err(model::Error::InvalidBatch(format!("{} logit rows, {want} expected", logits.len())));
        }
        logits
    };
    let whole = |b| model.holds_window_kv(b);
    for (i, (&(seq, tokens), &start)) in work.iter().zip(starts.iter()).enumerate() {
        let upto = start + tokens.len() - tentative.get(i).copied().unwrap_or(0).min(tokens.len());
        cache.mark_computed_superseding(seq, upto, |indexed, ours| !whole(indexed) && whole(ours))?;
    }
    Ok(logits)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use kv::{BlockStorage, KvCache, Namespace, OwnerId};

    use super::*;
    use crate::testing::FakeModel;

    fn owner() -> OwnerId {
        OwnerId::new("t").expect("valid")
    }

    /// Regression for leaks on error paths: a step that fails after every
    /// sequence was appended to leaves each as it was, and the pool too.
    #[test]
    fn a_failed_step_rolls_back_every_sequence() {
        let (mut model, control) = FakeModel::new(4, 16);
        let mut cache = KvCache::new(model.spec().clone());
        let ns = Namespace::new(b"fake", b"");
        let (a, b) = (cache.create_sequence(&owner(), ns), cache.create_sequence(&owner(), ns));
        let none = &mut |_: &mut dyn BlockStorage, _: Vec<Evicted>| {};
        run_step(&mut model, &mut cache, &[(a, &[1, 2, 3, 4, 5][..]), (b, &[6, 7][..])], none).expect("runs");
        let before = (cache.snapshot(a).expect("a"), cache.snapshot(b).expect("b"), cache.stats());
        control.fail_at_step.store(2, Ordering::SeqCst);
        let err = run_step(&mut model, &mut cache, &[(a, &[9, 9, 9, 9][..]), (b, &[8][..])], none);
        assert!(matches!(err, Err(model::Error::InvalidBatch(_))));
        assert_eq!((cache.snapshot(a).expect("a"), cache.snapshot(b).expect("b"), cache.stats()), before);
        cache.check_invariants().expect("consistent");
        // A refused append (out of blocks) rolls back the entries before it.
        let big = vec![1u32; 64];
        let err = run_step(&mut model, &mut cache, &[(a, &[3][..]), (b, &big[..])], none);
        assert!(matches!(err, Err(model::Error::Kv(kv::Error::Exhausted { .. }))));
        assert_eq!((cache.snapshot(a).expect("a"), cache.snapshot(b).expect("b"), cache.stats()), before);
    }

    /// Regression: a copy-on-write in an entry whose batch is then refused
    /// (a later entry's append is out of blocks) left the sequence on a
    /// block that was never copied. The copy happens with its append now,
    /// so after the rollback the sequence still reads its own history.
    #[test]
    fn a_rolled_back_step_keeps_copy_on_writes_correct() {
        let none = &mut |_: &mut dyn BlockStorage, _: Vec<Evicted>| {};
        let ns = Namespace::new(b"fake", b"");
        // What continuing [1..=5] with 6 gives, computed straight.
        let (mut fresh, _) = FakeModel::new(4, 8);
        let mut c = KvCache::new(fresh.spec().clone());
        let s = c.create_sequence(&owner(), ns);
        run_step(&mut fresh, &mut c, &[(s, &[1, 2, 3, 4, 5][..])], none).expect("runs");
        let want = run_step(&mut fresh, &mut c, &[(s, &[6][..])], none).expect("runs");

        let (mut model, _) = FakeModel::new(4, 5);
        let mut cache = KvCache::new(model.spec().clone());
        let a = cache.create_sequence(&owner(), ns);
        run_step(&mut model, &mut cache, &[(a, &[1, 2, 3, 4, 5][..])], none).expect("runs");
        let b = cache.fork(a).expect("fork");
        let c = cache.create_sequence(&owner(), Namespace::new(b"fake", b"other"));
        // b copies the shared partial block; c needs more blocks than are left.
        let err = run_step(&mut model, &mut cache, &[(b, &[6][..]), (c, &[9; 12][..])], none);
        assert!(matches!(err, Err(model::Error::Kv(kv::Error::Exhausted { .. }))), "{err:?}");
        cache.remove(a).expect("a");
        let got = run_step(&mut model, &mut cache, &[(b, &[6][..])], none).expect("runs");
        assert_eq!(got, want, "b reads the history it had, not an uncopied block");
        cache.check_invariants().expect("consistent");
    }

    /// Drafts (`speculative.rs`) are computed but not marked computed: a
    /// block they fill is not published, so no prefix lookup finds a
    /// rejected draft; what the caller then accepts and marks is.
    #[test]
    fn drafted_tokens_are_not_published_until_accepted() {
        let (mut model, _) = FakeModel::new(4, 8);
        let mut cache = KvCache::new(model.spec().clone());
        let ns = Namespace::new(b"fake", b"");
        let a = cache.create_sequence(&owner(), ns);
        let none = &mut |_: &mut dyn BlockStorage, _: Vec<Evicted>| {};
        run_step(&mut model, &mut cache, &[(a, &[1, 2, 3][..])], none).expect("runs");
        // Last token 4, drafts 5 6 7 8: positions 3..=7, the second block
        // all drafts.
        let work = [(a, &[4, 5, 6, 7, 8][..])];
        let rows = run_step_drafts(&mut model, &mut cache, &work, &[5], &[4], none).expect("runs");
        assert_eq!(rows.len(), 5, "a logit row per token");
        assert_eq!((cache.seq_len(a).expect("a"), cache.computed(a).expect("a")), (8, 4));
        assert_eq!(cache.lookup_prefix(ns, &[1, 2, 3, 4, 5, 6, 7, 8, 9]), 4, "only the real block");
        // The model agreed with draft 5 only: the rest is cut, 5 marked.
        cache.truncate(a, 5).expect("truncate");
        cache.mark_computed(a, 5).expect("mark");
        assert_eq!(cache.lookup_prefix(ns, &[1, 2, 3, 4, 5, 6, 7, 8, 9]), 4, "6 7 8 were never published");
        cache.check_invariants().expect("consistent");
    }

    /// The tiers' premise: an evicted block reaches the sink, with its key,
    /// while it still holds what was written to it.
    #[test]
    fn evicted_blocks_reach_the_sink_before_they_are_overwritten() {
        let (mut model, _) = FakeModel::new(4, 3);
        let mut cache = KvCache::new(model.spec().clone());
        cache.report_evictions(true);
        let ns = Namespace::new(b"fake", b"");
        let a = cache.create_sequence(&owner(), ns);
        let none = &mut |_: &mut dyn BlockStorage, _: Vec<Evicted>| {};
        run_step(&mut model, &mut cache, &[(a, &[1, 2, 3, 4, 5, 6, 7, 8][..])], none).expect("runs");
        let table = cache.block_table(a).expect("a").blocks().to_vec();
        let mut before = vec![0u8; model.storage().block_bytes()];
        model.storage().export_block(table[0], &mut before).expect("export");
        cache.remove(a).expect("a");
        // Two cached blocks, one free: a 12-token sequence evicts both.
        let b = cache.create_sequence(&owner(), Namespace::new(b"fake", b"other"));
        let mut seen = Vec::new();
        let mut sink = |storage: &mut dyn BlockStorage, evicted: Vec<Evicted>| {
            for e in evicted {
                let mut p = vec![0u8; storage.block_bytes()];
                storage.export_block(e.block, &mut p).expect("export");
                seen.push((e.key, p));
            }
        };
        run_step(&mut model, &mut cache, &[(b, &[9; 12][..])], &mut sink).expect("runs");
        assert_eq!(seen.len(), 2, "both cached blocks were evicted");
        assert_eq!(seen[0].0.tokens.as_ref(), &[5, 6, 7, 8], "a chain is evicted tail first");
        assert_eq!(seen[1].0.tokens.as_ref(), &[1, 2, 3, 4]);
        assert_eq!(seen[1].1, before, "the payload as the first step wrote it");
        assert!(seen.iter().all(|(k, _)| k.is_consistent()));
    }
}
