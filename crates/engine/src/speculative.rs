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
//! **Suffix index**, where the sequence itself has no match: the tenant's
//! recent answers (other agents' turns, this agent's earlier ones, earlier
//! tool calls' arguments spelled as the model spells them), in a ring of
//! [`SUFFIX_TOKENS`] tokens with an n-gram map, for at most
//! [`SUFFIX_TENANTS`] tenants: bounded memory (about 2 MB a tenant). A
//! tenant's drafts come only from its own answers, so no tenant's text
//! speeds up, or is revealed by the timing of, another's.
//!
//! Order: the sequence's own text, then the tenant's answers, then (under a
//! grammar) the grammar's forced bytes.
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

/// Tokens a tenant's suffix index keeps (the most recent answers).
pub(crate) const SUFFIX_TOKENS: usize = 16 * 1024;
/// Tenants with a suffix index at most (the least recently fed go first).
pub(crate) const SUFFIX_TENANTS: usize = 32;
/// Between two sequences in a suffix index: never a token.
const SEPARATOR: u32 = u32::MAX;

/// Recent answers of one tenant (module doc, "Suffix index"): a ring of
/// [`SUFFIX_TOKENS`] tokens and, for each n-gram of [`MIN_NGRAM`] to
/// [`MAX_NGRAM`] tokens in it, where it last ended. Bounded: the ring
/// overwrites its oldest tokens, and the map is rebuilt from the ring when
/// stale entries make it twice the ring's n-grams.
#[derive(Debug)]
pub(crate) struct SuffixIndex {
    ring: Vec<u32>,
    /// Tokens ever added (the next one's absolute position).
    total: u64,
    /// N-gram hash to the absolute position right after its latest end.
    ends: std::collections::HashMap<u64, u64>,
}

impl Default for SuffixIndex {
    fn default() -> Self {
        Self { ring: vec![SEPARATOR; SUFFIX_TOKENS], total: 0, ends: std::collections::HashMap::new() }
    }
}

fn ngram_key(tokens: &[u32]) -> u64 {
    let mut bytes = Vec::with_capacity(4 * tokens.len());
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

impl SuffixIndex {
    fn at(&self, pos: u64) -> Option<u32> {
        let live = pos < self.total && pos + SUFFIX_TOKENS as u64 >= self.total;
        live.then(|| self.ring[(pos % SUFFIX_TOKENS as u64) as usize])
    }

    /// The last `n` tokens before absolute position `end`, if all are live
    /// and none is a separator.
    fn gram(&self, end: u64, n: usize) -> Option<Vec<u32>> {
        let start = end.checked_sub(n as u64)?;
        let g: Vec<u32> = (start..end).map(|p| self.at(p)).collect::<Option<_>>()?;
        (!g.contains(&SEPARATOR)).then_some(g)
    }

    /// Adds one sequence's tokens (an answer), after a separator.
    pub(crate) fn add(&mut self, tokens: &[u32]) {
        for &t in std::iter::once(&SEPARATOR).chain(tokens) {
            self.ring[(self.total % SUFFIX_TOKENS as u64) as usize] = t;
            self.total += 1;
            for n in MIN_NGRAM..=MAX_NGRAM {
                if let Some(g) = self.gram(self.total, n) {
                    self.ends.insert(ngram_key(&g), self.total);
                }
            }
        }
        if self.ends.len() > 2 * (MAX_NGRAM - MIN_NGRAM + 1) * SUFFIX_TOKENS {
            self.rebuild();
        }
    }

    /// Keeps only the entries that still point into the ring.
    fn rebuild(&mut self) {
        let total = self.total;
        self.ends.retain(|_, &mut end| end <= total && end + SUFFIX_TOKENS as u64 > total);
    }

    /// Up to `k` tokens that followed the longest n-gram ending `context`
    /// where it last occurred; empty without a match.
    pub(crate) fn propose(&self, context: &[u32], k: usize) -> Vec<u32> {
        for n in (MIN_NGRAM..=MAX_NGRAM).rev() {
            let Some(tail) = context.len().checked_sub(n).map(|s| &context[s..]) else { continue };
            let Some(&end) = self.ends.get(&ngram_key(tail)) else { continue };
            // A hash collision is a miss: the stored n-gram must be the tail.
            if self.gram(end, n).as_deref() != Some(tail) {
                continue;
            }
            let next: Vec<u32> = (end..end + k as u64).map_while(|p| self.at(p).filter(|&t| t != SEPARATOR)).collect();
            if !next.is_empty() {
                return next;
            }
        }
        Vec::new()
    }

    /// Entries in its map (for the memory bound's test).
    #[cfg(test)]
    fn entries(&self) -> usize {
        self.ends.len()
    }
}

/// The suffix indexes of the most recently active tenants.
#[derive(Debug, Default)]
pub(crate) struct SuffixIndexes {
    /// Least recently fed first.
    tenants: Vec<(crate::TenantId, SuffixIndex)>,
}

impl SuffixIndexes {
    /// Adds a finished answer of `tenant`'s.
    pub(crate) fn add(&mut self, tenant: &crate::TenantId, tokens: &[u32]) {
        let mut index = match self.tenants.iter().position(|(t, _)| t == tenant) {
            Some(i) => self.tenants.remove(i).1,
            None => SuffixIndex::default(),
        };
        index.add(tokens);
        if self.tenants.len() >= SUFFIX_TENANTS {
            self.tenants.remove(0);
        }
        self.tenants.push((tenant.clone(), index));
    }

    /// [`SuffixIndex::propose`] from `tenant`'s index.
    pub(crate) fn propose(&self, tenant: &crate::TenantId, context: &[u32], k: usize) -> Vec<u32> {
        self.tenants.iter().find(|(t, _)| t == tenant).map_or_else(Vec::new, |(_, i)| i.propose(context, k))
    }
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
    fn a_suffix_index_proposes_what_followed_in_earlier_answers() {
        let mut ix = SuffixIndex::default();
        ix.add(&[1, 2, 3, 4, 5, 6]);
        ix.add(&[9, 2, 3, 7, 8]);
        // The longest match, then its most recent occurrence.
        assert_eq!(ix.propose(&[0, 1, 2, 3], 3), vec![4, 5, 6]);
        assert_eq!(ix.propose(&[0, 2, 3], 4), vec![7, 8], "stops at the end of its answer");
        assert!(ix.propose(&[4, 9], 4).is_empty(), "no n-gram across two answers");
        assert!(ix.propose(&[42, 43], 4).is_empty());
    }

    /// Memory stays bounded however much goes in: the ring has a fixed size
    /// and the map is pruned to what the ring holds.
    #[test]
    fn a_suffix_index_stays_bounded_under_a_long_soak() {
        let mut ix = SuffixIndex::default();
        let mut x: u32 = 1;
        let (mut most, mut first, mut last) = (0, Vec::new(), Vec::new());
        for i in 0..2_000 {
            let answer: Vec<u32> = (0..200)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    x >> 8 & 0xff_ffff
                })
                .collect();
            ix.add(&answer);
            most = most.max(ix.entries());
            if i == 0 {
                first.clone_from(&answer);
            }
            last = answer;
        }
        assert_eq!(ix.ring.len(), SUFFIX_TOKENS);
        assert!(most <= 2 * (MAX_NGRAM - MIN_NGRAM + 1) * SUFFIX_TOKENS + MAX_NGRAM * 201, "{most}");
        // What is recent is found; what the ring overwrote is not.
        assert_eq!(ix.propose(&last[..4], 3), last[4..7].to_vec());
        assert!(ix.propose(&first[..4], 3).is_empty());
    }

    #[test]
    fn tenants_have_their_own_indexes_and_the_oldest_goes() {
        let mut all = SuffixIndexes::default();
        let a = crate::TenantId::new("a").unwrap();
        let b = crate::TenantId::new("b").unwrap();
        all.add(&a, &[1, 2, 3, 4]);
        assert_eq!(all.propose(&a, &[1, 2], 2), vec![3, 4]);
        assert!(all.propose(&b, &[1, 2], 2).is_empty(), "another tenant's answers are never proposed");
        for i in 0..SUFFIX_TENANTS {
            all.add(&crate::TenantId::new(&format!("t{i}")).unwrap(), &[5, 6, 7]);
        }
        assert!(all.propose(&a, &[1, 2], 2).is_empty(), "the least recently fed tenant went");
        assert_eq!(all.tenants.len(), SUFFIX_TENANTS);
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
