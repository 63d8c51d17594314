//! Choosing the next token from logits: greedy, or temperature with nucleus
//! (top-p) filtering, reproducible under a seed. (The engine will own the full
//! sampler with penalties and stop strings; this is what `run` needs.)

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SamplingParams {
    /// 0 means greedy.
    pub(crate) temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches this.
    pub(crate) top_p: f32,
}

pub(crate) struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub(crate) fn new(params: SamplingParams, seed: u64) -> Self {
        Self { params, rng: StdRng::seed_from_u64(seed) }
    }

    pub(crate) fn sample(&mut self, logits: &[f32]) -> u32 {
        let greedy = || logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i as u32);
        if self.params.temperature <= 0.0 {
            return greedy();
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> =
            logits.iter().enumerate().map(|(i, &l)| (i as u32, ((l - max) / self.params.temperature).exp())).collect();
        let total: f32 = probs.iter().map(|p| p.1).sum();
        if !(total.is_finite() && total > 0.0) {
            return greedy();
        }
        probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        let mut kept = 0.0;
        let mut cut = probs.len();
        for (i, p) in probs.iter().enumerate() {
            kept += p.1 / total;
            if kept >= self.params.top_p {
                cut = i + 1;
                break;
            }
        }
        probs.truncate(cut);
        let mass: f32 = probs.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f32>() * mass;
        for (id, p) in &probs {
            if r < *p {
                return *id;
            }
            r -= p;
        }
        probs.last().map_or(0, |p| p.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_largest_and_seeds_reproduce() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        assert_eq!(Sampler::new(SamplingParams { temperature: 0.0, top_p: 1.0 }, 1).sample(&logits), 1);
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 1.0 }, seed);
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        assert!(draw(5).contains(&2), "temperature 1 explores");
        let mut tight = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.01 }, 9);
        assert!((0..50).all(|_| tight.sample(&logits) == 1), "top-p keeps only the best");
    }
}
