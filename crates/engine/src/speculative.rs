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
//! # When to draft: the step's cost against the tokens it should gain
//!
//! Extra rows are nearly free at small batch (the weights dominate) and
//! cost compute at large batch, so the engine decides each step how many
//! drafted tokens each decoding sequence carries, from two measured facts:
//!
//! - **The step's cost by rows** ([`StepCosts`]): a running mean of the
//!   wall time of steps of `n` rows, for `n` up to [`COST_ROWS`]. Between
//!   measured sizes it interpolates; beyond them, and before anything is
//!   measured, it assumes a step costs in proportion to `n + KNEE` (a fixed
//!   part for the weights, then a part per row), a prior that the
//!   measurements replace as steps of each size run.
//! - **Each sequence's acceptance** ([`Drafting`]): per proposer, the
//!   discounted share of drafted tokens the model took, counted as trials
//!   (a draft of `k` with `a` accepted is `a` successes, and one failure
//!   when `a < k`). The `j`-th token of a draft is kept with probability
//!   `rate^j`.
//!
//! [`choose`] ranks every candidate drafted token of the step by that
//! probability and keeps the count `m` that maximizes expected tokens per
//! second, `(decodes + gains of the first m) / cost(rows + m)`, if that beats
//! not drafting by a margin ([`MARGIN`]): a sequence
//! that keeps missing gets no rows, a step of many decodes (compute-bound)
//! gets few or none, and a long copy at batch one gets all [`MAX_DRAFT`].
//! A sequence that got no rows for a while (its pause, doubling up to
//! [`MAX_PAUSE`] steps after each retry that did not pay) has its rates
//! reset to the priors and is tried again, so a text that starts to repeat
//! is noticed.
//!
//! The step's wall time includes what a drafted row costs besides the
//! forward pass (a grammar mask per verified constrained row), so rows that
//! are dear to verify are drafted less.

/// Drafted tokens per step at most.
pub(crate) const MAX_DRAFT: usize = 4;
/// Longest n-gram looked up.
pub(crate) const MAX_NGRAM: usize = 4;
/// Shortest n-gram looked up (a single token predicts too little).
pub(crate) const MIN_NGRAM: usize = 2;
/// Tokens looked back at most for a match.
pub(crate) const LOOKBACK: usize = 8192;
/// Decoding sequences in a step at most for any of them to draft (bounds
/// the proposers' work per step).
pub(crate) const MAX_BATCH: usize = 16;
/// Steps a sequence that got no rows waits before it is tried again.
pub(crate) const PAUSE_STEPS: u32 = 16;
/// The longest such wait (each retry that does not pay doubles it).
pub(crate) const MAX_PAUSE: u32 = 256;
/// Step sizes whose cost is measured, in rows.
pub(crate) const COST_ROWS: usize = 64;
/// The cost prior's fixed part, in rows: a step of `n` rows costs as
/// `n + KNEE` (measured on the default model: 5 rows cost ~1.8x one).
const KNEE: f64 = 4.0;
/// How much faster than not drafting a step's drafts must expect to make
/// it: the costs and rates are estimates, and a wrong guess at many
/// streams costs more than it gains.
const MARGIN: f64 = 1.05;
/// Acceptance priors by proposer ([`Source`]), before a sequence drafted.
const PRIORS: [f32; 3] = [0.6, 0.5, 0.9];
/// Weight of the prior, in trials.
const PRIOR_TRIALS: f32 = 2.0;
/// Weight of older trials against a new one.
const DECAY: f32 = 0.8;

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

/// Where a draft came from (module doc: Proposers); each proposer has its
/// own acceptance per sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    Lookup = 0,
    Suffix = 1,
    Forced = 2,
}

/// A sequence's drafting record: its acceptance per proposer, and how long
/// it has gone without drafting.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Drafting {
    /// Discounted accepted tokens and trials, per [`Source`].
    hits: [f32; 3],
    trials: [f32; 3],
    /// Steps in a row it had a proposal but got no rows, and how many it
    /// waits before being tried again.
    idle: u32,
    pause: u32,
    /// Tokens drafted and accepted so far (reported in the usage).
    pub(crate) drafted: usize,
    pub(crate) accepted: usize,
}

impl Default for Drafting {
    fn default() -> Self {
        let mut d = Self { hits: [0.0; 3], trials: [0.0; 3], idle: 0, pause: PAUSE_STEPS, drafted: 0, accepted: 0 };
        d.reset();
        d
    }
}

impl Drafting {
    fn reset(&mut self) {
        self.trials = [PRIOR_TRIALS; 3];
        self.hits = PRIORS.map(|p| p * PRIOR_TRIALS);
    }

    /// The chance that each further token of a draft from `source` is kept.
    pub(crate) fn rate(&self, source: Source) -> f32 {
        let s = source as usize;
        self.hits[s] / self.trials[s]
    }

    /// Its best rate over the proposers.
    pub(crate) fn likeliest(&self) -> f32 {
        [Source::Lookup, Source::Suffix, Source::Forced].map(|s| self.rate(s)).into_iter().fold(0.0, f32::max)
    }

    /// A step in which it had a proposal but got no rows; after its pause
    /// its rates go back to the priors, so that it is tried again.
    pub(crate) fn skipped(&mut self) {
        self.idle += 1;
        if self.idle >= self.pause {
            self.reset();
            self.idle = 0;
            self.pause = (self.pause * 2).min(MAX_PAUSE);
        }
    }

    /// Records a step that drafted `drafted` tokens from `source` of which
    /// the model agreed with `accepted`.
    pub(crate) fn record(&mut self, source: Source, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        self.drafted += drafted;
        self.accepted += accepted;
        self.idle = 0;
        let s = source as usize;
        self.hits[s] = DECAY * self.hits[s] + accepted as f32;
        self.trials[s] = DECAY * self.trials[s] + accepted as f32 + f32::from(u8::from(accepted < drafted));
        if accepted == drafted {
            self.pause = PAUSE_STEPS;
        }
    }
}

/// The wall time of steps by their rows (module doc).
#[derive(Clone, Debug)]
pub(crate) struct StepCosts {
    /// Running mean in microseconds of steps of `n` rows at `[n]`, and the
    /// steps it counts (0 where none ran yet).
    us: [f64; COST_ROWS + 1],
    steps: [u32; COST_ROWS + 1],
}

impl Default for StepCosts {
    fn default() -> Self {
        Self { us: [0.0; COST_ROWS + 1], steps: [0; COST_ROWS + 1] }
    }
}

/// A mean counts this many steps at most, as a weight in the fit.
const FULL_WEIGHT: u32 = 20;

impl StepCosts {
    /// Counts a step of `rows` rows that took `took`.
    pub(crate) fn record(&mut self, rows: usize, took: std::time::Duration) {
        let (Some(mean), Some(steps)) = (self.us.get_mut(rows), self.steps.get_mut(rows)) else { return };
        if rows == 0 {
            return;
        }
        let t = took.as_secs_f64() * 1e6;
        *mean = if *steps == 0 { t } else { 0.9 * *mean + 0.1 * t };
        *steps = (*steps + 1).min(FULL_WEIGHT);
    }

    /// The cost curve the measurements give: a step never costs less for
    /// more rows, so the means are fitted by isotonic regression (pool
    /// adjacent violators, weighted by their steps), which irons out a
    /// size measured once in a noisy moment.
    pub(crate) fn curve(&self) -> Curve {
        // Blocks of pooled sizes: (first size, last size, weighted sum, weight).
        let mut blocks: Vec<(usize, usize, f64, f64)> = Vec::new();
        for n in 1..=COST_ROWS {
            if self.steps[n] == 0 {
                continue;
            }
            let w = f64::from(self.steps[n]);
            blocks.push((n, n, self.us[n] * w, w));
            while let [.., (a0, _, s0, w0), (_, b1, s1, w1)] = blocks[..] {
                if s0 / w0 <= s1 / w1 {
                    break;
                }
                blocks.truncate(blocks.len() - 2);
                blocks.push((a0, b1, s0 + s1, w0 + w1));
            }
        }
        let mut points = Vec::new();
        for (a, b, sum, w) in blocks {
            points.extend((a..=b).filter(|&n| self.steps[n] > 0).map(|n| (n, sum / w)));
        }
        Curve { points }
    }
}

/// Step cost by rows, from [`StepCosts::curve`].
#[derive(Clone, Debug)]
pub(crate) struct Curve {
    /// Measured sizes and their fitted cost in microseconds, by size.
    points: Vec<(usize, f64)>,
}

impl Curve {
    /// The expected cost of a step of `rows` rows: microseconds where steps
    /// near that size were measured (module doc).
    pub(crate) fn at(&self, rows: usize) -> f64 {
        let after = self.points.partition_point(|&(n, _)| n < rows);
        if let Some(&(n, t)) = self.points.get(after).filter(|p| p.0 == rows) {
            debug_assert_eq!(n, rows);
            return t;
        }
        let scale = |(n, t): (usize, f64)| t * (rows as f64 + KNEE) / (n as f64 + KNEE);
        let below = after.checked_sub(1).and_then(|i| self.points.get(i)).copied();
        match (below, self.points.get(after).copied()) {
            (Some((b, tb)), Some((a, ta))) => tb + (ta - tb) * (rows - b) as f64 / (a - b) as f64,
            (Some(p), None) | (None, Some(p)) => scale(p),
            (None, None) => rows as f64 + KNEE,
        }
    }
}

/// How many tokens each sequence drafts this step (module doc). `rows`:
/// the step's rows without drafts; `decodes`: its decoding sequences;
/// `offers[s]`: sequence `s`'s acceptance rate and proposal length. Returns
/// the tokens each keeps, in the same order.
pub(crate) fn choose(costs: &Curve, rows: usize, decodes: usize, offers: &[(f32, usize)]) -> Vec<usize> {
    // Every candidate token, likeliest kept first (a sequence's own tokens
    // stay in order: rate^j falls with j, and the sort is stable).
    let mut candidates: Vec<(f32, usize)> = offers
        .iter()
        .enumerate()
        .flat_map(|(s, &(rate, len))| (1..=len).map(move |j| (rate.clamp(0.0, 1.0).powi(j as i32), s)))
        .collect();
    candidates.sort_by(|a, b| b.0.total_cmp(&a.0));
    let base = decodes.max(1) as f64;
    let (mut best, mut best_value, mut gain) = (0, MARGIN * base / costs.at(rows), 0.0);
    for (m, &(g, _)) in candidates.iter().enumerate() {
        gain += f64::from(g);
        let value = (base + gain) / costs.at(rows + m + 1);
        if value > best_value {
            (best, best_value) = (m + 1, value);
        }
    }
    let mut keep = vec![0; offers.len()];
    for &(_, s) in &candidates[..best] {
        keep[s] += 1;
    }
    keep
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
    fn a_sequence_that_keeps_missing_loses_its_rows_then_is_tried_again() {
        let mut d = Drafting::default();
        assert!((d.rate(Source::Forced) - 0.9).abs() < 1e-6);
        d.record(Source::Lookup, 4, 0);
        d.record(Source::Lookup, 4, 0);
        assert!(d.rate(Source::Lookup) < 0.4, "{}", d.rate(Source::Lookup));
        assert!((d.rate(Source::Suffix) - 0.5).abs() < 1e-6, "each proposer has its own rate");
        for _ in 0..PAUSE_STEPS {
            d.skipped();
        }
        assert!((d.rate(Source::Lookup) - 0.6).abs() < 1e-6, "tried again with the prior");
        // The next retry waits twice as long.
        d.record(Source::Lookup, 4, 0);
        for _ in 0..PAUSE_STEPS {
            d.skipped();
        }
        assert!(d.rate(Source::Lookup) < 0.6);
        for _ in 0..PAUSE_STEPS {
            d.skipped();
        }
        assert!((d.rate(Source::Lookup) - 0.6).abs() < 1e-6);
        d.record(Source::Lookup, 4, 4);
        assert!(d.rate(Source::Lookup) > 0.7);
        assert_eq!((d.drafted, d.accepted), (16, 4));
    }

    #[test]
    fn step_costs_interpolate_between_measured_sizes_and_scale_beyond() {
        let us = std::time::Duration::from_micros;
        let mut c = StepCosts::default();
        assert_eq!(c.curve().at(1), 5.0, "the prior alone");
        c.record(1, us(6000));
        c.record(5, us(10000));
        let curve = c.curve();
        assert_eq!(curve.at(1), 6000.0);
        assert_eq!(curve.at(3), 8000.0);
        assert_eq!(curve.at(9), 10000.0 * 13.0 / 9.0);
        c.record(5, us(20000));
        assert_eq!(c.curve().at(5), 11000.0, "a running mean");
        c.record(0, us(1));
        c.record(COST_ROWS + 1, us(1));
        assert_eq!(c.curve().at(COST_ROWS + 1), 11000.0 * (COST_ROWS as f64 + 1.0 + KNEE) / 9.0, "not recorded");
    }

    #[test]
    fn a_size_measured_in_a_noisy_moment_is_pooled_with_its_neighbours() {
        let us = std::time::Duration::from_micros;
        let mut c = StepCosts::default();
        for _ in 0..FULL_WEIGHT {
            c.record(8, us(16000));
            c.record(12, us(20000));
        }
        // Once, cheaper than a smaller step: pooled with 8, by weight.
        c.record(10, us(4000));
        let curve = c.curve();
        let pooled = (16000.0 * 20.0 + 4000.0) / 21.0;
        assert!((curve.at(8) - pooled).abs() < 1e-6 && (curve.at(10) - pooled).abs() < 1e-6);
        assert_eq!(curve.at(12), 20000.0);
        assert!((1..=COST_ROWS).all(|n| curve.at(n) <= curve.at(n + 1)), "never cheaper for more rows");
    }

    #[test]
    fn drafts_go_where_they_pay() {
        let mut costs = StepCosts::default();
        for (rows, us) in [(1, 6000), (2, 7000), (3, 8000), (4, 9000), (5, 10000)] {
            costs.record(rows, std::time::Duration::from_micros(us));
        }
        let c = costs.curve();
        // One stream: a sequence that is usually right drafts all it has,
        // one that is usually wrong nothing, one in between a little.
        assert_eq!(choose(&c, 1, 1, &[(0.9, 4)]), vec![4]);
        assert_eq!(choose(&c, 1, 1, &[(0.1, 4)]), vec![0]);
        assert_eq!(choose(&c, 1, 1, &[(0.5, 4)]), vec![2]);
        assert_eq!(choose(&c, 1, 1, &[(0.9, 0)]), vec![0], "no proposal, no rows");
        // The likelier sequence goes first.
        assert_eq!(choose(&c, 2, 2, &[(0.3, 4), (0.95, 2)]), vec![0, 2]);
        // A compute-bound step (cost in proportion to rows) drafts nothing.
        let mut busy = StepCosts::default();
        for rows in 8..=COST_ROWS {
            busy.record(rows, std::time::Duration::from_micros(1000 * rows as u64));
        }
        assert_eq!(choose(&busy.curve(), 8, 8, &[(0.8, 4); 8]), vec![0; 8]);
    }
}
