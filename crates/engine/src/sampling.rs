//! Choosing the next token from a row of logits.
//!
//! Order of operations (the one vLLM and llama.cpp use): `logit_bias` added
//! to the raw logits, then penalties (repetition over prompt and answer, frequency and presence over the
//! answer), then greedy argmax at temperature 0; otherwise divide by the
//! temperature, softmax, keep the top k, keep the nucleus (top p), drop what
//! is below `min_p` of the best, renormalise and draw. Log-probabilities are
//! those of the penalised logits at temperature 1 (what the model, after
//! penalties, believes), so they do not depend on the sampling knobs.
//!
//! A grammar's mask (constrained decoding, `grammar.rs`) is applied after
//! the bias and the penalties, as `-inf`: a `logit_bias` never re-enables a
//! token the grammar forbids, and log-probabilities are those of the
//! allowed tokens.
//!
//! Cost: O(vocab) per token, plus a sort of the candidates only when a
//! filter needs an order (top-k, top-p or logprobs alternatives).
//!
//! # Draws are keyed by position
//!
//! The random number for the answer's `n`-th token is word `n` of a ChaCha12
//! stream keyed by the request's seed (a drawn one without a seed): a
//! counter-based generator, so a token's draw depends on its position only,
//! not on how many draws came before in this process. Speculative decoding
//! (`speculative.rs`) samples several positions in one step and discards
//! some; each position still gets exactly the draw plain decoding would
//! have given it. (It is the stream `StdRng` gave before, word for word, as
//! each draw takes one word.)

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;

use crate::request::{Logprobs, SamplingParams};

/// One request's sampler: its parameters and its random stream.
pub(crate) struct Sampler {
    params: SamplingParams,
    /// Added to these logits first (`logit_bias`).
    bias: Vec<(u32, f32)>,
    /// Read at the word of the position drawn for (module doc).
    rng: ChaCha12Rng,
    /// Occurrences of each token in the answer so far.
    counts: HashMap<u32, u32>,
}

impl Sampler {
    #[cfg(test)]
    fn with(params: SamplingParams) -> Self {
        Self::new(params, Vec::new())
    }

    pub(crate) fn new(params: SamplingParams, bias: Vec<(u32, f32)>) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha12Rng::seed_from_u64(seed),
            None => ChaCha12Rng::from_os_rng(),
        };
        Self { params, bias, rng, counts: HashMap::new() }
    }

    /// Picks the next token given the `prompt` and the answer so far (the
    /// answer's counts are tracked here as tokens are [`Sampler::accept`]ed).
    pub(crate) fn sample(&mut self, logits: &[f32], prompt: &[u32], answer: &[u32]) -> (u32, Option<Logprobs>) {
        let mut logits = logits.to_vec();
        self.penalize(&mut logits, prompt, answer);
        self.choose(&logits, answer.len())
    }

    /// [`Sampler::sample`] with a grammar's mask applied after the bias and
    /// the penalties (`mask` sets forbidden logits to `-inf`).
    ///
    /// # Errors
    /// Whatever `mask` returns.
    pub(crate) fn sample_masked<E>(
        &mut self,
        logits: &[f32],
        prompt: &[u32],
        answer: &[u32],
        mask: impl FnOnce(&mut [f32]) -> Result<(), E>,
    ) -> Result<(u32, Option<Logprobs>), E> {
        let mut logits = logits.to_vec();
        self.penalize(&mut logits, prompt, answer);
        mask(&mut logits)?;
        Ok(self.choose(&logits, answer.len()))
    }

    /// The token for answer position `at`.
    fn choose(&mut self, logits: &[f32], at: usize) -> (u32, Option<Logprobs>) {
        let token = if self.params.temperature <= 0.0 { argmax(logits) } else { self.draw(logits, at) };
        let logprobs = self.params.logprobs.map(|n| logprobs_of(logits, token, n));
        (token, logprobs)
    }

    /// Records a generated token for the frequency and presence penalties.
    pub(crate) fn accept(&mut self, token: u32) {
        *self.counts.entry(token).or_default() += 1;
    }

    fn penalize(&self, logits: &mut [f32], prompt: &[u32], answer: &[u32]) {
        for &(t, b) in &self.bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = std::collections::HashSet::new();
            for &t in prompt.iter().chain(answer) {
                if let Some(l) = logits.get_mut(t as usize) {
                    if seen.insert(t) {
                        *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                    }
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&t, &n) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.frequency_penalty * n as f32 + p.presence_penalty;
                }
            }
        }
    }

    fn draw(&mut self, logits: &[f32], at: usize) -> u32 {
        let p = &self.params;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return argmax(logits);
        }
        let mut probs: Vec<(u32, f32)> =
            logits.iter().enumerate().map(|(i, &l)| (i as u32, ((l - max) / p.temperature).exp())).collect();
        if p.top_k > 0 || p.top_p < 1.0 {
            probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        }
        if p.top_k > 0 {
            probs.truncate(p.top_k);
        }
        if p.top_p < 1.0 {
            let total: f32 = probs.iter().map(|x| x.1).sum();
            let mut kept = 0.0;
            if let Some(cut) = probs.iter().position(|x| {
                kept += x.1 / total;
                kept >= p.top_p
            }) {
                probs.truncate(cut + 1);
            }
        }
        if p.min_p > 0.0 {
            // The best token has weight exp(0) = 1 after the max shift.
            probs.retain(|x| x.1 >= p.min_p);
        }
        let mass: f32 = probs.iter().map(|x| x.1).sum();
        if !(mass.is_finite() && mass > 0.0) {
            return argmax(logits);
        }
        self.rng.set_word_pos(at as u128);
        let mut r = self.rng.random::<f32>() * mass;
        for &(id, w) in &probs {
            if r < w {
                return id;
            }
            r -= w;
        }
        probs.last().map_or_else(|| argmax(logits), |x| x.0)
    }
}

/// Index of the largest logit (the first one on ties).
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// `token`'s log-probability under `logits` (a log-softmax), and the `n`
/// most likely tokens' (best first): what a chosen token reports, and a
/// prompt token's ([`crate::Request::prompt_logprobs`]).
pub(crate) fn logprobs_of(logits: &[f32], token: u32, n: usize) -> Logprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_total = logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln() + max;
    let lp = |t: u32| logits.get(t as usize).map_or(f32::NEG_INFINITY, |l| l - log_total);
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n);
    if n > 0 {
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let n = n.min(order.len());
        order.select_nth_unstable_by(n - 1, |a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
        order.truncate(n);
        order.sort_unstable_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
        top = order.into_iter().map(|t| (t, lp(t))).collect();
    }
    Logprobs { logprob: lp(token), top }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams { seed: Some(7), ..SamplingParams::default() };
        f(&mut p);
        p
    }

    fn draws(p: SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut s = Sampler::new(p, Vec::new());
        let mut answer = Vec::new();
        for _ in 0..n {
            let t = s.sample(logits, &[], &answer).0;
            s.accept(t);
            answer.push(t);
        }
        answer
    }

    const LOGITS: [f32; 5] = [1.0, 3.0, 2.9, 2.8, -1.0];

    /// A position's draw is the same whatever was drawn before it (what
    /// lets speculative decoding sample positions out of order), and the
    /// stream is the one a seeded `StdRng` gives, so seeded answers did not
    /// change.
    #[test]
    fn a_draw_depends_on_its_position_only_and_keeps_the_seeded_stream() {
        let p = params(|_| {});
        let seq = draws(p, &LOGITS, 12);
        let mut fresh = Sampler::new(p, Vec::new());
        assert_eq!(fresh.sample(&LOGITS, &[], &seq[..9]).0, seq[9], "position 9 drawn alone");
        let mut std = rand::rngs::StdRng::seed_from_u64(7);
        let mut s = Sampler::new(p, Vec::new());
        for at in 0..12 {
            let u: f32 = std.random();
            s.rng.set_word_pos(at as u128);
            assert_eq!(s.rng.random::<f32>(), u);
        }
    }

    #[test]
    fn greedy_takes_the_best_and_a_seed_reproduces_a_draw() {
        assert_eq!(draws(SamplingParams::greedy(), &LOGITS, 3), vec![1, 1, 1]);
        let p = params(|_| {});
        assert_eq!(draws(p, &LOGITS, 50), draws(p, &LOGITS, 50));
        assert_ne!(draws(p, &LOGITS, 50), draws(params(|p| p.seed = Some(8)), &LOGITS, 50));
    }

    #[test]
    fn filters_keep_only_what_they_should() {
        let all = draws(params(|_| {}), &LOGITS, 400);
        assert!([0, 1, 2, 3].iter().all(|t| all.contains(t)), "temperature 1 explores");
        let k2 = draws(params(|p| p.top_k = 2), &LOGITS, 200);
        assert!(k2.iter().all(|t| [1, 2].contains(t)) && k2.contains(&2));
        let nucleus = draws(params(|p| p.top_p = 0.01), &LOGITS, 50);
        assert!(nucleus.iter().all(|&t| t == 1));
        // min_p 0.85: keeps tokens within ln(1/0.85) ≈ 0.16 of the best.
        let m = draws(params(|p| p.min_p = 0.85), &LOGITS, 200);
        assert!(m.iter().all(|t| [1, 2].contains(t)) && m.contains(&2));
    }

    #[test]
    fn penalties_steer_away_from_repeats() {
        let mut s = Sampler::with(params(|p| {
            p.temperature = 0.0;
            p.repetition_penalty = 1.5;
        }));
        // Token 1 in the prompt: 3.0 / 1.5 = 2.0 < 2.9.
        assert_eq!(s.sample(&LOGITS, &[1], &[]).0, 2);
        let mut s = Sampler::with(params(|p| {
            p.temperature = 0.0;
            p.frequency_penalty = 0.06;
        }));
        s.accept(1);
        assert_eq!(s.sample(&LOGITS, &[], &[1]).0, 1, "3.0 - 0.06 still leads");
        s.accept(1);
        assert_eq!(s.sample(&LOGITS, &[], &[1, 1]).0, 2, "3.0 - 0.12 no longer does");
        let mut s = Sampler::with(params(|p| {
            p.temperature = 0.0;
            p.presence_penalty = 0.5;
        }));
        s.accept(1);
        s.accept(1);
        assert_eq!(s.sample(&LOGITS, &[], &[1, 1]).0, 2);
    }

    #[test]
    fn logprobs_are_normalised_and_ordered() {
        let mut s = Sampler::with(params(|p| {
            p.temperature = 0.0;
            p.logprobs = Some(3);
        }));
        let (t, lp) = s.sample(&LOGITS, &[], &[]);
        let lp = lp.unwrap();
        assert_eq!(t, 1);
        assert_eq!(lp.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(lp.top[0].1, lp.logprob);
        let total: f32 = LOGITS.iter().map(|l| (l - 3.0f32).exp()).sum();
        assert!((lp.logprob - (-total.ln())).abs() < 1e-5);
    }

    #[test]
    fn non_finite_logits_fall_back_to_greedy_instead_of_panicking() {
        let bad = [f32::NAN, f32::NEG_INFINITY, 1.0];
        let t = draws(params(|_| {}), &bad, 3);
        assert!(t.iter().all(|&x| x < 3));
        assert_eq!(draws(params(|_| {}), &[f32::NEG_INFINITY; 4], 1), vec![0]);
    }
}
