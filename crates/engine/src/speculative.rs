//! Exact speculative decoding: several tokens per weight pass, the output
//! unchanged.
//!
//! One decode step streams every weight once for one token per sequence; at
//! small batch that is memory-bound, so a few more rows in the same step
//! cost little. Agents' text repeats itself (tool results quoted back, code
//! edited in place, a previous answer revised), so the sequence's own
//! tokens often predict what comes next. A sequence's decode entry then
//! carries its last token and `k` drafted tokens; the step computes all
//! `k + 1` rows, and the engine keeps the longest run the model agrees
//! with, plus the model's own next token.
//!
//! # Why the output does not change
//!
//! Row `r` of the entry is position `start + r` with, as its history, the
//! sequence's tokens and drafts `1..r`. Where drafts `1..r` are exactly the
//! tokens plain decoding would have produced, row `r`'s inputs are those of
//! plain decoding's step at that position, and the kernels are
//! batch-invariant (a row's bits never depend on the other rows of its
//! step, nor on how many rows of its own sequence run with it), so its
//! logits are bit-identical. The token of row 0 is sampled as plain
//! decoding samples it; if it equals draft 1, row 1 is valid and gives the
//! next token, and so on: the first disagreement ends the run, its token
//! is the model's own. With a temperature, each position's random number
//! is keyed by the request's seed and the position (`sampling.rs`, a
//! counter-based ChaCha12), so a position sampled in a speculative step
//! draws exactly what plain decoding would have drawn there, and the run
//! is the sequence plain decoding samples; a draft is accepted with the
//! probability the model gives it.
//!
//! # K/V of rejected drafts
//!
//! The step's transaction (`txn.rs`) appends the drafts but marks only the
//! last token computed; after acceptance the engine truncates the sequence
//! to what was accepted and marks that computed. A rejected draft's K/V is
//! never published to the prefix index, so no other request and no tier
//! ever sees it.
//!
//! # Proposers
//!
//! **Forced tokens.** Under constrained decoding (`grammar.rs`), the tokens
//! the grammar forces next (a JSON object's keys and punctuation, a tool
//! call's scaffolding): the only ones the mask will allow, so the model's
//! masked choice agrees with them unless it spells the same bytes with
//! other tokens. Each verified row after the first computes its mask on the
//! engine thread (the mask worker computes the first row's beside the
//! forward pass).
//!
//! **Prompt lookup**, otherwise:
//! the most recent earlier occurrence of the sequence's last `n` tokens
//! (`n` from [`MAX_NGRAM`] down to [`MIN_NGRAM`], longest first) in its own
//! prompt and output, looking back at most [`LOOKBACK`] tokens; the tokens
//! that followed it are the draft. No memory beyond the sequence, and a few
//! microseconds per step.
//!
//! # When to draft
//!
//! Only while it pays: extra rows are nearly free at small batch (weights
//! dominate) and cost compute at large batch. A sequence drafts when the
//! step's decodes are at most [`MAX_BATCH`], it has a proposal, and its
//! running acceptance ([`Drafting`]) has not fallen below [`MIN_RATE`]; a
//! sequence that keeps missing pauses for [`PAUSE_STEPS`] steps, then tries
//! again.

/// Drafted tokens per step at most.
pub(crate) const MAX_DRAFT: usize = 4;
/// Longest n-gram looked up.
pub(crate) const MAX_NGRAM: usize = 4;
/// Shortest n-gram looked up (a single token predicts too little).
pub(crate) const MIN_NGRAM: usize = 2;
/// Tokens looked back at most for a match.
pub(crate) const LOOKBACK: usize = 8192;
/// Decoding sequences in a step at most for any of them to draft.
pub(crate) const MAX_BATCH: usize = 4;
/// Running acceptance below which a sequence pauses drafting.
pub(crate) const MIN_RATE: f32 = 0.3;
/// Steps a sequence that kept missing waits before drafting again.
pub(crate) const PAUSE_STEPS: u32 = 16;

/// Whether the engine drafts tokens (`--speculative`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Speculation {
    /// Never.
    Off,
    /// Where it pays (module doc).
    #[default]
    Auto,
}

/// Up to `k` tokens to try after `tokens` (prompt lookup, module doc);
/// empty when nothing earlier matches.
pub(crate) fn propose(tokens: &[u32], k: usize) -> Vec<u32> {
    if k == 0 {
        return Vec::new();
    }
    let len = tokens.len();
    let from = len.saturating_sub(LOOKBACK);
    for n in (MIN_NGRAM..=MAX_NGRAM).rev() {
        if len < n + 1 {
            continue;
        }
        let tail = &tokens[len - n..];
        // Most recent first; the match must end before the tail starts, and
        // at least one token must follow it.
        let mut end = len - 1;
        while end >= from + n {
            if &tokens[end - n..end] == tail {
                let next = &tokens[end..len.min(end + k)];
                if !next.is_empty() {
                    return next.to_vec();
                }
            }
            end -= 1;
        }
    }
    Vec::new()
}

/// A sequence's drafting record: its running acceptance, and a pause after
/// it kept missing.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Drafting {
    rate: f32,
    paused: u32,
    /// Tokens drafted and accepted so far (reported in the usage).
    pub(crate) drafted: usize,
    pub(crate) accepted: usize,
}

impl Default for Drafting {
    fn default() -> Self {
        // Optimistic at first: one good step keeps it going.
        Self { rate: 0.5, paused: 0, drafted: 0, accepted: 0 }
    }
}

impl Drafting {
    /// Whether to draft this step (counts a paused step down).
    pub(crate) fn wants(&mut self) -> bool {
        if self.paused > 0 {
            self.paused -= 1;
            if self.paused == 0 {
                self.rate = MIN_RATE;
            }
            return false;
        }
        true
    }

    /// Records a step that drafted `drafted` tokens of which the model
    /// agreed with `accepted`.
    pub(crate) fn record(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        self.drafted += drafted;
        self.accepted += accepted;
        self.rate = 0.7 * self.rate + 0.3 * (accepted as f32 / drafted as f32);
        if self.rate < MIN_RATE {
            self.paused = PAUSE_STEPS;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_most_recent_match_proposes_what_followed_it() {
        // "1 2 3 9 ... 1 2 3" : the 3-gram matches, 9 followed.
        let t = [1, 2, 3, 9, 8, 7, 5, 1, 2, 3];
        assert_eq!(propose(&t, 4), vec![9, 8, 7, 5]);
        // Two earlier matches: the most recent wins.
        let t = [4, 5, 6, 4, 5, 7, 4, 5];
        assert_eq!(propose(&t, 1), vec![7]);
        // A longer match beats a more recent shorter one.
        let t = [1, 2, 3, 10, 9, 2, 3, 11, 1, 2, 3];
        assert_eq!(propose(&t, 2), vec![10, 9]);
    }

    #[test]
    fn nothing_matches_nothing_is_proposed() {
        assert!(propose(&[1, 2, 3, 4, 5], 4).is_empty());
        assert!(propose(&[], 4).is_empty());
        assert!(propose(&[7, 7], 4).is_empty(), "one token is no 2-gram match before the tail");
        assert!(propose(&[1, 2, 1, 2], 0).is_empty());
        // The proposal stops where the sequence ends.
        assert_eq!(propose(&[1, 2, 5, 1, 2], 4), vec![5, 1, 2]);
    }

    #[test]
    fn a_sequence_that_keeps_missing_pauses_then_tries_again() {
        let mut d = Drafting::default();
        assert!(d.wants());
        d.record(4, 0);
        d.record(4, 0);
        assert!((0..PAUSE_STEPS).all(|_| !d.wants()), "paused");
        assert!(d.wants(), "tries again");
        d.record(4, 4);
        assert!(d.wants());
        assert_eq!((d.drafted, d.accepted), (12, 4));
    }
}
