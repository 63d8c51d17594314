//! The bookkeeping around a raw forward pass, for tests of the model alone:
//! append, copy-on-write, forward, mark computed; no rollback. (The
//! product's step, with rollback and tier hand-offs, is `engine::txn`; this
//! crate cannot depend on the engine.)
#![allow(dead_code, unreachable_pub)] // each test binary uses a different subset
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use candle_core::Tensor;
use kv::{BlockStorage, KvCache, SeqId};
use model::{LlamaModel, PagedKvStore, SeqStep};

/// Runs `work` as one ragged batch; the last-token logits of each entry.
pub fn forward(
    model: &LlamaModel,
    cache: &mut KvCache,
    store: &mut PagedKvStore,
    work: &[(SeqId, &[u32])],
) -> model::Result<Tensor> {
    let mut starts = Vec::new();
    let mut slots = Vec::new();
    for &(seq, tokens) in work {
        starts.push(cache.seq_len(seq)?);
        let appended = cache.append(seq, tokens)?;
        if let Some(copy) = appended.copy {
            store.copy_block(copy)?;
        }
        slots.push(appended.slots);
    }
    let tables: Vec<kv::BlockTable> = work.iter().map(|&(seq, _)| cache.block_table(seq).unwrap().clone()).collect();
    let batch: Vec<SeqStep<'_>> = work
        .iter()
        .zip(&starts)
        .zip(slots.iter().zip(&tables))
        .map(|((&(_, tokens), &start_pos), (slots, table))| SeqStep { tokens, start_pos, table, slots })
        .collect();
    let logits = model.forward(&batch, store)?;
    for (&(seq, tokens), &start) in work.iter().zip(&starts) {
        cache.mark_computed(seq, start + tokens.len())?;
    }
    Ok(logits)
}
